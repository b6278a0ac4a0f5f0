//! The control loop's state: per backend, its telemetry source, health
//! probe, latest reading and the policy's last decision; per service, its
//! policy. It turns a poll round into datapath specs. It owns no maps (the
//! datapath does) and does no I/O of its own beyond what sources and probes
//! do when the daemon drives them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use tracing::{info, warn};

use crate::{
    api::{
        BackendMode, BackendPolicyStatus, Override, OverrideChange, OverrideError, TelemetryStats,
    },
    config::{BackendConfig, Config, HealthConfig},
    datapath::{BackendRole, BackendSpec, Selection, ServiceSpec},
    health::{HealthCheck, HealthState, ProbeFailure},
    policy::{BackendInput, Decision, Measured, Mode, Policy},
    telemetry::{Reading, TelemetryError, source::Source},
};

struct BackendCtl {
    cfg: BackendConfig,
    source: Option<Arc<Source>>,
    health: Option<(Arc<HealthCheck>, HealthState)>,
    next_probe: Duration,
    latest: Option<(Duration, Reading)>,
    /// The policy tick that took in `latest`.
    latest_tick: Option<u64>,
    stats: TelemetryStats,
    decision: Option<Decision>,
    weight: u32,
    /// Room published to the datapath (least-loaded services; 0: none).
    max_in_flight: u32,
    last_change: Option<String>,
    last_change_tick: Option<u64>,
    changes: u64,
}

struct ServiceCtl {
    name: String,
    policy: Policy,
    backends: Vec<BackendCtl>,
    /// Every backend saturated at the last tick: new connections overflow
    /// to the fallback service's backends, if one is configured.
    overflowing: bool,
    /// Probes failing on local errors since the last probe that ran (see
    /// `record_probe`); 0 outside such an episode.
    local_failures: u64,
    /// Per pool (config order): no room at the last tick.
    pools_no_room: Vec<bool>,
}

/// Prefix of a fallback service's backends' names inside the service they
/// serve, so they never clash with its own; what they are is their `role`.
pub const FALLBACK_PREFIX: &str = "fallback/";

fn override_in<'a>(
    overrides: &'a BTreeMap<String, BTreeMap<String, Override>>,
    service: &str,
    backend: &str,
) -> Option<&'a Override> {
    overrides.get(service).and_then(|b| b.get(backend))
}

/// A poll job the daemon runs without holding its state lock.
pub struct PollJob {
    pub service: usize,
    pub backend: usize,
    pub source: Arc<Source>,
}

pub struct ProbeJob {
    pub service: usize,
    pub backend: usize,
    pub check: Arc<HealthCheck>,
}

pub struct Controller {
    services: Vec<ServiceCtl>,
    poll_interval: Duration,
    /// Changes on every rebuild (reload), so results of a poll round that
    /// started before it are dropped instead of landing on other backends.
    generation: u64,
    /// Ticks on which every healthy backend of a service was saturated.
    pub all_saturated_ticks: u64,
    /// Health probes that have finished (passed, failed, or failed
    /// locally) since the daemon started: what a test reads to know that a
    /// probe round has or has not completed, instead of timing it.
    pub health_probes_done: u64,
    /// Probes that failed on a local error and so changed no verdict.
    pub health_local_errors: u64,
    /// Times `decide` ran: the clock of `BackendCtl`'s ticks, counted so
    /// tests can judge reactions in ticks rather than by the wall clock.
    pub policy_ticks: u64,
    /// Poll rounds whose results reached the policy (the daemon counts
    /// them as it finishes each round).
    pub telemetry_polls_done: u64,
    /// Episodes of such failures (a service's probes failing locally until
    /// one of them runs again), each logged once.
    pub health_local_episodes: u64,
    /// service → backend → override; looked up by `&str`, no allocation per poll.
    overrides: BTreeMap<String, BTreeMap<String, Override>>,
    /// Pool shares set at run time (see `pools`).
    pool_shares: PoolShares,
    /// Rollback guards' windows and trips (see `guard`).
    guards: guard::Guards,
}

fn health_check(addr: SocketAddr, h: &HealthConfig) -> HealthCheck {
    HealthCheck {
        addr,
        http_path: h.http_path.clone(),
        tcp: h.tcp,
        timeout: h.timeout,
        fall: h.fall,
        rise: h.rise,
    }
}

impl Controller {
    /// Builds the control state for `cfg`, keeping what it can from
    /// `previous` (policy state, readings, health) for backends that stay.
    pub fn new(cfg: &Config, previous: Option<Controller>) -> Self {
        let generation = previous.as_ref().map_or(0, |p| p.generation + 1);
        let all_saturated_ticks = previous.as_ref().map_or(0, |p| p.all_saturated_ticks);
        let health_probes_done = previous.as_ref().map_or(0, |p| p.health_probes_done);
        let health_local_errors = previous.as_ref().map_or(0, |p| p.health_local_errors);
        let health_local_episodes = previous.as_ref().map_or(0, |p| p.health_local_episodes);
        let policy_ticks = previous.as_ref().map_or(0, |p| p.policy_ticks);
        let telemetry_polls_done = previous.as_ref().map_or(0, |p| p.telemetry_polls_done);
        let mut overrides = previous
            .as_ref()
            .map(|p| p.overrides.clone())
            .unwrap_or_default();
        overrides.retain(|svc: &String, backends: &mut BTreeMap<String, Override>| {
            let Some(s) = cfg.services.iter().find(|s| &s.name == svc) else {
                return false;
            };
            backends.retain(|be, _| s.backends.iter().any(|b| &b.name == be));
            !backends.is_empty()
        });
        let mut pool_shares = previous
            .as_ref()
            .map(|p| p.pool_shares.clone())
            .unwrap_or_default();
        Self::retain_pool_shares(&mut pool_shares, cfg);
        let mut guards = previous
            .as_ref()
            .map(|p| p.guards.clone())
            .unwrap_or_default();
        guards.retain(|(svc, pool), _| {
            cfg.services.iter().any(|s| {
                &s.name == svc && s.pools.iter().any(|p| &p.name == pool && p.guard.is_some())
            })
        });
        let mut old: BTreeMap<String, ServiceCtl> = previous
            .map(|p| {
                p.services
                    .into_iter()
                    .map(|s| (s.name.clone(), s))
                    .collect()
            })
            .unwrap_or_default();
        let services = cfg
            .services
            .iter()
            .map(|s| {
                let prev = old.remove(&s.name);
                let mode = match s.selection {
                    Selection::LeastLoaded => Mode::Capacity,
                    Selection::Maglev => Mode::Shares,
                };
                let (policy, mut prev_backends) = match prev {
                    Some(p) if p.policy.config() == &cfg.policy && p.policy.mode() == mode => {
                        let map: BTreeMap<String, BackendCtl> = p
                            .backends
                            .into_iter()
                            .map(|b| (b.cfg.name.clone(), b))
                            .collect();
                        (p.policy, map)
                    }
                    _ => (Policy::with_mode(cfg.policy.clone(), mode), BTreeMap::new()),
                };
                let backends = s
                    .backends
                    .iter()
                    .map(|b| {
                        let kept = prev_backends.remove(&b.name).filter(|k| {
                            k.cfg.address == b.address
                                && k.cfg.telemetry == b.telemetry
                                && k.cfg.health == b.health
                        });
                        match kept {
                            Some(mut k) => {
                                k.cfg = b.clone();
                                k
                            }
                            None => BackendCtl {
                                source: b.telemetry.as_ref().map(|t| Arc::new(Source::new(t))),
                                health: b.health.as_ref().map(|h| {
                                    (Arc::new(health_check(b.address, h)), HealthState::new())
                                }),
                                next_probe: Duration::ZERO,
                                latest: None,
                                latest_tick: None,
                                stats: TelemetryStats::default(),
                                decision: None,
                                weight: b
                                    .pinned()
                                    .unwrap_or_else(|| cfg.policy.unknown(b.capacity)),
                                max_in_flight: 0,
                                last_change: None,
                                last_change_tick: None,
                                changes: 0,
                                cfg: b.clone(),
                            },
                        }
                    })
                    .collect();
                ServiceCtl {
                    name: s.name.clone(),
                    policy,
                    backends,
                    overflowing: false,
                    local_failures: 0,
                    pools_no_room: Vec::new(),
                }
            })
            .collect();
        Self {
            services,
            poll_interval: cfg.policy.poll_interval,
            generation,
            all_saturated_ticks,
            health_probes_done,
            health_local_errors,
            health_local_episodes,
            policy_ticks,
            telemetry_polls_done,
            overrides,
            pool_shares,
            guards,
        }
    }

    /// Changes one backend's override; unknown names and a refused change
    /// leave every override as it was.
    pub fn set_override(
        &mut self,
        service: &str,
        backend: &str,
        change: OverrideChange,
        now_unix: u64,
    ) -> Result<Override, OverrideError> {
        let svc = self
            .services
            .iter()
            .find(|s| s.name == service)
            .ok_or_else(|| OverrideError::NoService(service.to_string()))?;
        if !svc.backends.iter().any(|b| b.cfg.name == backend) {
            return Err(OverrideError::NoBackend {
                service: service.to_string(),
                backend: backend.to_string(),
            });
        }
        let mut now = self
            .override_of(service, backend)
            .cloned()
            .unwrap_or_default();
        change.apply(&mut now, now_unix)?;
        let backends = self.overrides.entry(service.to_string()).or_default();
        if now == Override::default() {
            backends.remove(backend);
            if backends.is_empty() {
                self.overrides.remove(service);
            }
        } else {
            backends.insert(backend.to_string(), now.clone());
        }
        Ok(now)
    }

    /// Every override, for persisting across daemon restarts.
    pub fn overrides(&self) -> &BTreeMap<String, BTreeMap<String, Override>> {
        &self.overrides
    }

    /// Marks the health-checked backends that an adopted datapath was
    /// routing to, by (service, backend) name, as healthy until their first
    /// probe (see `HealthState::assumed`): a restart must not pull them from
    /// the tables for the half second before the probes have run.
    pub fn assume_routable(&mut self, routed: &BTreeSet<(String, String)>) -> usize {
        let mut marked = 0;
        for s in &mut self.services {
            for b in &mut s.backends {
                if let Some((_, state)) = &mut b.health
                    && routed.contains(&(s.name.clone(), b.cfg.name.clone()))
                {
                    *state = HealthState::assumed();
                    marked += 1;
                }
            }
        }
        marked
    }

    /// Restores overrides saved by an earlier daemon; entries naming a
    /// service or backend the config no longer has are dropped and returned.
    pub fn restore_overrides(
        &mut self,
        saved: BTreeMap<String, BTreeMap<String, Override>>,
    ) -> Vec<String> {
        let mut dropped = Vec::new();
        for (svc, backends) in saved {
            for (be, ov) in backends {
                let known = self
                    .services
                    .iter()
                    .find(|s| s.name == svc)
                    .is_some_and(|s| s.backends.iter().any(|b| b.cfg.name == be));
                if known && ov != Override::default() {
                    self.overrides
                        .entry(svc.clone())
                        .or_default()
                        .insert(be, ov);
                } else if !known {
                    dropped.push(format!("{svc}/{be}"));
                }
            }
        }
        dropped
    }

    /// Puts back an earlier set of overrides as it was (undoing a change
    /// that could not be applied).
    pub fn restore_overrides_exactly(
        &mut self,
        saved: BTreeMap<String, BTreeMap<String, Override>>,
    ) {
        self.overrides = saved;
    }

    /// Drains whose deadline has passed and whose flows are not ended yet.
    pub fn due_drains(&self, now_unix: u64) -> Vec<(String, String)> {
        let mut due = Vec::new();
        for (svc, backends) in &self.overrides {
            for (name, o) in backends {
                if o.drain
                    && o.flows_ended.is_none()
                    && o.drain_deadline_unix.is_some_and(|d| d <= now_unix)
                {
                    due.push((svc.clone(), name.clone()));
                }
            }
        }
        due
    }

    /// Records that a drain's deadline was enforced.
    pub fn mark_flows_ended(&mut self, service: &str, backend: &str, ended: u64) {
        if let Some(o) = self
            .overrides
            .get_mut(service)
            .and_then(|b| b.get_mut(backend))
        {
            o.flows_ended = Some(ended);
        }
    }

    fn override_of(&self, service: &str, backend: &str) -> Option<&Override> {
        override_in(&self.overrides, service, backend)
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
    }

    /// Every backend with a telemetry source is polled every tick.
    pub fn poll_jobs(&self) -> Vec<PollJob> {
        let mut jobs = Vec::new();
        for (si, s) in self.services.iter().enumerate() {
            for (bi, b) in s.backends.iter().enumerate() {
                if let Some(src) = &b.source {
                    jobs.push(PollJob {
                        service: si,
                        backend: bi,
                        source: src.clone(),
                    });
                }
            }
        }
        jobs
    }

    /// Health probes whose interval has come round.
    pub fn probe_jobs(&mut self, now: Duration) -> Vec<ProbeJob> {
        let mut jobs = Vec::new();
        for (si, s) in self.services.iter_mut().enumerate() {
            for (bi, b) in s.backends.iter_mut().enumerate() {
                if let (Some((check, _)), Some(h)) = (&b.health, &b.cfg.health)
                    && now >= b.next_probe
                {
                    b.next_probe = now + h.interval;
                    jobs.push(ProbeJob {
                        service: si,
                        backend: bi,
                        check: check.clone(),
                    });
                }
            }
        }
        jobs
    }

    pub fn record_reading(
        &mut self,
        service: usize,
        backend: usize,
        now: Duration,
        result: Result<Reading, TelemetryError>,
    ) {
        let Some(b) = self
            .services
            .get_mut(service)
            .and_then(|s| s.backends.get_mut(backend))
        else {
            return;
        };
        b.stats.polls += 1;
        match result {
            Ok(r) => {
                b.latest = Some((now, r));
                // A poll round records its readings and then runs the
                // policy: the next tick is the one that takes this in.
                b.latest_tick = Some(self.policy_ticks + 1);
                b.stats.last_error = None;
            }
            Err(e) => {
                if matches!(e, TelemetryError::Invalid(_) | TelemetryError::Parse(_)) {
                    b.stats.invalid += 1;
                } else {
                    b.stats.errors += 1;
                    if matches!(e, TelemetryError::Timeout(_)) {
                        b.stats.timeouts += 1;
                    }
                }
                let msg = e.to_string();
                if b.stats.last_error.as_deref() != Some(msg.as_str()) {
                    warn!(backend = %b.cfg.name, "telemetry: {msg}");
                }
                b.stats.last_error = Some(msg);
            }
        }
    }

    /// Feeds one probe result to the backend's fall/rise state. A failure
    /// on a local error (the daemon out of sockets, say) is no verdict on
    /// the backend: it is counted and changes nothing, so the datapath keeps
    /// the last weights (fails open) instead of taking every backend out
    /// when the daemon itself cannot probe. It is logged once per episode:
    /// when a service's probes start failing locally, and when one of them
    /// runs again.
    pub fn record_probe(
        &mut self,
        service: usize,
        backend: usize,
        result: Result<(), ProbeFailure>,
    ) {
        let Some(s) = self.services.get_mut(service) else {
            return;
        };
        let Some(b) = s.backends.get_mut(backend) else {
            return;
        };
        let Some((check, state)) = &mut b.health else {
            return;
        };
        self.health_probes_done += 1;
        match &result {
            Err(e) if e.local => {
                self.health_local_errors += 1;
                if s.local_failures == 0 {
                    self.health_local_episodes += 1;
                    warn!(
                        service = %s.name, backend = %b.cfg.name,
                        "health: probe failed on a local error ({e}); keeping the last \
                         verdicts and weights until probes run again"
                    );
                }
                s.local_failures += 1;
                return;
            }
            _ => {}
        }
        if s.local_failures > 0 {
            info!(
                service = %s.name,
                "health: probes run again after {} failed on local errors",
                s.local_failures
            );
            s.local_failures = 0;
        }
        if let Some(now) = state.record(result.is_ok(), check.fall, check.rise) {
            match &result {
                Ok(()) => info!(backend = %b.cfg.name, "health: now {now:?}"),
                Err(e) => warn!(backend = %b.cfg.name, "health: now {now:?} ({e})"),
            }
        }
    }

    /// Runs every service's policy. Returns the datapath specs and whether
    /// any weight or room changed (the daemon only rebuilds tables when one
    /// did). `measured` gives the datapath's counts of a (service, backend).
    pub fn decide(
        &mut self,
        now: Duration,
        cfg: &Config,
        measured: &dyn Fn(&str, &str) -> Option<Measured>,
    ) -> (Vec<ServiceSpec>, bool) {
        self.policy_ticks += 1;
        let tick_no = self.policy_ticks;
        let mut changed = false;
        // Every policy ticks first: a service's overflow goes to its
        // fallback's backends at the weights the fallback's own policy gave
        // them this tick.
        for s in &mut self.services {
            let overrides = &self.overrides;
            let ov = |b: &BackendCtl| override_in(overrides, &s.name, &b.cfg.name);
            let inputs: Vec<BackendInput<'_>> = s
                .backends
                .iter()
                .map(|b| BackendInput {
                    name: &b.cfg.name,
                    capacity: b.cfg.capacity,
                    pinned_weight: ov(b).and_then(|o| o.weight).or(b.cfg.pinned()),
                    drained: b.cfg.drain || ov(b).is_some_and(|o| o.drain),
                    healthy: b.health.as_ref().is_none_or(|(_, h)| h.is_routable()),
                    latest: b.latest.as_ref().map(|(t, r)| (*t, r)),
                    measured: measured(&s.name, &b.cfg.name),
                    max_in_flight: b.cfg.max_in_flight,
                })
                .collect();
            let tick = s.policy.tick(now, &inputs);
            if tick.all_saturated {
                self.all_saturated_ticks += 1;
            }
            if tick.all_saturated != s.overflowing {
                if tick.all_saturated {
                    warn!(service = %s.name, "every backend saturated");
                } else {
                    info!(service = %s.name, "no longer saturated");
                }
                s.overflowing = tick.all_saturated;
                changed = true;
            }
            for (b, d) in s.backends.iter_mut().zip(tick.decisions) {
                if d.weight != b.weight {
                    let msg = format!("{} → {} ({})", b.weight, d.weight, d.reason);
                    info!(service = %s.name, backend = %b.cfg.name, "weight {msg}");
                    b.last_change = Some(msg);
                    b.last_change_tick = Some(tick_no);
                    b.changes += 1;
                    b.weight = d.weight;
                    changed = true;
                }
                if d.max_in_flight != b.max_in_flight {
                    info!(service = %s.name, backend = %b.cfg.name, "room {} → {} flows", b.max_in_flight, d.max_in_flight);
                    b.max_in_flight = d.max_in_flight;
                    changed = true;
                }
                b.decision = Some(d);
            }
        }
        let mut specs = Vec::with_capacity(self.services.len());
        let mut pooled = Vec::with_capacity(self.services.len());
        for (s, scfg) in self.services.iter_mut().zip(&cfg.services) {
            let (pools, segments, room_changed) = s.pool_specs(scfg, &self.pool_shares);
            changed |= room_changed;
            pooled.push((pools, segments));
        }
        for ((s, scfg), (pools, segments)) in self.services.iter().zip(&cfg.services).zip(pooled) {
            let mut backends: Vec<BackendSpec> = s
                .backends
                .iter()
                .map(|b| BackendSpec {
                    name: b.cfg.name.clone(),
                    role: BackendRole::Primary,
                    address: b.cfg.address,
                    weight: b.weight,
                    max_in_flight: b.max_in_flight,
                })
                .collect();
            if let Some(fb) = scfg
                .fallback
                .as_ref()
                .and_then(|f| self.services.iter().find(|o| &o.name == f))
            {
                // Always present, at weight 0 unless overflowing, and named
                // apart: the datapath counts their new connections as this
                // service's fallbacks, and the count survives overflow ending.
                backends.extend(fb.backends.iter().map(|b| BackendSpec {
                    name: format!("{FALLBACK_PREFIX}{}", b.cfg.name),
                    role: BackendRole::Fallback,
                    address: b.cfg.address,
                    weight: if s.overflowing { b.weight } else { 0 },
                    max_in_flight: b.max_in_flight,
                }));
            }
            specs.push(ServiceSpec {
                forwarding: scfg.forwarding,
                name: scfg.name.clone(),
                vip: scfg.vip,
                proto: scfg.protocol.number(),
                snat: scfg.snat.clone(),
                snat_port_min: cfg.daemon.snat_port_min,
                snat_port_max: cfg.daemon.snat_port_max,
                selection: scfg.selection,
                backends,
                pools,
                segments,
            });
        }
        (specs, changed)
    }

    pub fn status(&self, now: Duration) -> Vec<BackendPolicyStatus> {
        let mut out = Vec::new();
        for s in &self.services {
            for b in &s.backends {
                let d = b.decision.as_ref();
                out.push(BackendPolicyStatus {
                    service: s.name.clone(),
                    backend: b.cfg.name.clone(),
                    weight: b.weight,
                    mode: if b.cfg.drain
                        || self
                            .override_of(&s.name, &b.cfg.name)
                            .is_some_and(|o| o.drain)
                    {
                        BackendMode::Drain
                    } else if self
                        .override_of(&s.name, &b.cfg.name)
                        .is_some_and(|o| o.weight.is_some())
                    {
                        BackendMode::Manual
                    } else if b.cfg.pinned().is_some() {
                        BackendMode::Pinned
                    } else {
                        BackendMode::Auto
                    },
                    reason: d
                        .map(|d| d.reason.to_string())
                        .unwrap_or_else(|| "starting".into()),
                    reason_label: d.map_or("starting", |d| d.reason.label()).into(),
                    load: d.and_then(|d| d.load),
                    saturated: d.is_some_and(|d| d.saturated),
                    stale: d.is_some_and(|d| d.stale),
                    healthy: b.health.as_ref().map(|(_, h)| h.is_routable()),
                    telemetry_source: b.source.as_ref().map(|s| s.describe().to_string()),
                    telemetry: b.latest.as_ref().map(|(_, r)| r.clone()),
                    telemetry_age_ms: b
                        .latest
                        .as_ref()
                        .map(|(t, _)| now.saturating_sub(*t).as_millis() as u64),
                    stats: b.stats.clone(),
                    weight_changes: b.changes,
                    last_change: b.last_change.clone(),
                    last_change_tick: b.last_change_tick,
                    telemetry_tick: b.latest_tick,
                    cost_per_hour: b.cfg.cost_per_hour,
                    drain_deadline_unix: self
                        .override_of(&s.name, &b.cfg.name)
                        .and_then(|o| o.drain_deadline_unix),
                    flows_ended: self
                        .override_of(&s.name, &b.cfg.name)
                        .and_then(|o| o.flows_ended),
                });
            }
        }
        out
    }
}

mod guard;
mod pools;
pub use crate::pools::PoolError;
pub use guard::Trip;
pub use pools::{PoolShares, PoolState};

#[cfg(test)]
mod tests;
