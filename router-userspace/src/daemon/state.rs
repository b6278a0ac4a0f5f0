//! The daemon's state behind its one lock: the datapath, the control
//! loop, the config, and what operators read (status, views, metrics
//! snapshots). The servers reach it only through [`Handle`].

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::{load_for_host, load_options, overrides_file};
use crate::{
    api::{
        Override, OverrideChange, OverrideError, ReloadReply, StatusReply,
        views::{self, BackendView, RateWindow, ServiceView},
    },
    config::Config,
    control_loop::Controller,
    datapath::{BackendRole, ConnScan, ConnTable, Datapath},
    health::ProbeFailure,
    policy::Measured,
    server::{control, metrics},
    telemetry::{Reading, TelemetryError},
};

pub struct DaemonState {
    pub(super) dp: Datapath,
    pub(super) ctl: Option<Controller>,
    pub(super) config_path: PathBuf,
    pub(super) config: Config,
    pub(super) started: Instant,
    pub(super) last_reload: Option<ReloadReply>,
    /// Latest connection-table scan, written by the scanner thread.
    pub(super) scan: Arc<std::sync::Mutex<Option<ConnScan>>>,
    pub(super) rates: RateWindow,
    pub(super) last_rate_sample: Option<Instant>,
    /// Hands `/metrics` its snapshots, so scrapes never take this lock.
    pub(super) metrics: metrics::Publisher,
    /// Keeps the backends' next hops resolved; `None` without CAP_NET_ADMIN.
    pub(super) neighbours: Option<super::neighbour_helper::Helper>,
    /// The BGP speaker announcing the VIPs; `None` without `[bgp]`.
    pub(super) bgp: Option<crate::bgp::Speaker>,
    /// The EndpointSlice watchers of discovered services.
    pub(super) discovery: crate::discovery::Watchers,
}

/// How often new-connection counters are sampled for rates and cost.
const RATE_SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Shortest pause between connection-table scans; a scan that takes long
/// (a full table) stretches the pause so scanning stays under ~20% of a core.
const SCAN_EVERY: Duration = Duration::from_secs(2);

/// The datapath's counts of a backend, for the policy's speed estimate:
/// flows in flight, and flows the datapath saw end (the scan's corrections
/// for flows that vanished are left out: they are not completions).
pub(super) fn measurer<'a>(
    dp: &'a Datapath,
    scan: &std::sync::Mutex<Option<ConnScan>>,
) -> impl Fn(&str, &str) -> Option<Measured> + 'a {
    let leaked: std::collections::BTreeMap<u32, u64> = scan
        .lock()
        .ok()
        .and_then(|s| {
            s.as_ref().map(|s| {
                s.corrections_total
                    .iter()
                    .map(|(id, c)| (*id, c.leaked))
                    .collect()
            })
        })
        .unwrap_or_default();
    let load = dp.load_counters();
    move |service, backend| {
        let id = dp.backend_id(service, backend)?;
        let l = load.get(id);
        Some(Measured {
            in_flight: l.in_flight(),
            ended: l
                .closed
                .saturating_sub(leaked.get(&id).copied().unwrap_or(0)),
        })
    }
}

/// Seconds since the Unix epoch (drain deadlines are wall-clock times).
pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The control server's handle on the daemon: the four things the API
/// may ask, each under the daemon's lock for no longer than it takes.
pub(super) struct Handle(pub(super) Arc<Mutex<DaemonState>>);

impl control::Control for Handle {
    async fn status(&self) -> Result<StatusReply> {
        let daemon = self.0.lock().await;
        let mut st = daemon.status()?;
        // Here and not in `status()`, which every metrics publish calls:
        // it reads every slot of every table.
        st.table_fingerprint = daemon.dp.table_fingerprint();
        st.bgp = daemon.bgp.as_ref().map(crate::bgp::Speaker::status);
        Ok(st)
    }

    async fn reload(&self) -> ReloadReply {
        self.0.lock().await.reload()
    }

    async fn views(&self) -> Result<(Vec<ServiceView>, Vec<BackendView>)> {
        let (services, backends, _) = self.0.lock().await.views()?;
        Ok((services, backends))
    }

    async fn change_override(
        &self,
        service: String,
        backend: String,
        change: OverrideChange,
    ) -> std::result::Result<Override, OverrideError> {
        self.0
            .lock()
            .await
            .override_backend(&service, &backend, change)
    }

    async fn pools(&self) -> Result<Vec<views::PoolView>> {
        self.0.lock().await.pool_views()
    }

    async fn set_pool_share(
        &self,
        service: String,
        pool: String,
        share: u32,
    ) -> std::result::Result<Vec<(String, u32)>, OverrideError> {
        self.0
            .lock()
            .await
            .set_pool_share(&service, &pool, share, "operator")
    }
}

/// Counts live flows per backend in the background, on its own descriptor
/// of the connection table, so a scan never holds the daemon's lock.
pub(super) fn spawn_conn_scanner(
    table: ConnTable,
    out: Arc<std::sync::Mutex<Option<ConnScan>>>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("conn-scan".into())
        .spawn(move || {
            let mut total: std::collections::BTreeMap<u32, crate::datapath::Correction> =
                std::collections::BTreeMap::new();
            loop {
                let t = Instant::now();
                match table.scan() {
                    Ok(mut scan) => {
                        for (id, c) in &scan.corrections {
                            total.entry(*id).or_default().add(c);
                        }
                        scan.corrections_total = total.clone();
                        if let Ok(mut slot) = out.lock() {
                            *slot = Some(scan);
                        }
                    }
                    Err(e) => warn!("scanning the connection table: {e}"),
                }
                std::thread::sleep(SCAN_EVERY.max(t.elapsed() * 4));
            }
        })
        .map(drop)
}

impl DaemonState {
    /// Asks the neighbour helper to give every configured backend's next
    /// hop a managed entry and remove those of backends that left.
    pub(super) fn keep_next_hops_resolved(&self) {
        if let Some(h) = &self.neighbours {
            h.request(&crate::host::neighbours::targets(&self.config));
        }
    }

    pub fn status(&self) -> Result<StatusReply> {
        let datapath = self.dp.status()?;
        let fallback_connections = datapath
            .services
            .iter()
            .flat_map(|s| &s.backends)
            .filter(|b| b.role == BackendRole::Fallback)
            .map(|b| b.counters.new_conns)
            .sum();
        Ok(StatusReply {
            fallback_connections,
            config: self.config_path.display().to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            last_reload: self.last_reload.clone(),
            datapath,
            policy: self
                .ctl
                .as_ref()
                .map(|c| c.status(self.started.elapsed()))
                .unwrap_or_default(),
            all_saturated_ticks: self.ctl.as_ref().map_or(0, |c| c.all_saturated_ticks),
            health_local_errors: self.ctl.as_ref().map_or(0, |c| c.health_local_errors),
            health_probes_done: self.ctl.as_ref().map_or(0, |c| c.health_probes_done),
            policy_ticks: self.ctl.as_ref().map_or(0, |c| c.policy_ticks),
            telemetry_polls_done: self.ctl.as_ref().map_or(0, |c| c.telemetry_polls_done),
            pools: self
                .ctl
                .as_ref()
                .map(|c| c.pools_status(&self.config))
                .unwrap_or_default(),
            table_fingerprint: None,
            bgp: None,
        })
    }

    /// Services and backends as operators see them (API, CLI, top, metrics).
    pub fn views(&self) -> Result<(Vec<ServiceView>, Vec<BackendView>, StatusReply)> {
        let st = self.status()?;
        let scan = self.scan.lock().ok().and_then(|s| s.clone());
        let backends = views::backends(&st, scan.as_ref(), &self.rates.rates());
        let services = views::services(&st, &backends);
        Ok((services, backends, st))
    }

    /// Connection-table occupancy from the latest scan.
    pub fn conn_entries(&self) -> Option<u64> {
        self.scan
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|s| s.entries))
    }

    /// `NAT6_CONNS` occupancy (IPv6 NAT flows) from the latest scan.
    pub fn nat6_conn_entries(&self) -> Option<u64> {
        self.scan
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|s| s.nat6_entries))
    }

    pub fn conn_table_size(&self) -> u32 {
        self.dp.options().conn_table_size
    }

    /// Publishes what `/metrics` serves: after a poll round (`force` false,
    /// at most every quarter second) and after anything an operator
    /// changed (`force` true), and only while a metrics server runs.
    pub(super) fn publish_metrics(&mut self, force: bool) {
        if self.metrics.due(force) {
            let snapshot = self.snapshot();
            self.metrics.publish(snapshot);
        }
    }

    /// What a scrape reports, captured under the daemon's lock and
    /// published, so the metrics server never takes it.
    pub(super) fn snapshot(&self) -> Result<metrics::Snapshot> {
        let (services, backends, status) = self.views()?;
        let pools = views::pools(&status, &backends);
        Ok(metrics::Snapshot {
            services,
            backends,
            status,
            conn_entries: self.conn_entries(),
            nat6_conn_entries: self.nat6_conn_entries(),
            conn_capacity: self.conn_table_size(),
            pools,
        })
    }

    pub(super) fn sample_rates(&mut self) {
        let now = Instant::now();
        if self
            .last_rate_sample
            .is_some_and(|t| now.duration_since(t) < RATE_SAMPLE_EVERY)
        {
            return;
        }
        match self.dp.status() {
            Ok(st) => {
                let counts = st
                    .services
                    .iter()
                    .flat_map(|s| {
                        s.backends
                            .iter()
                            .map(|b| ((s.name.clone(), b.name.clone()), b.counters.new_conns))
                    })
                    .collect();
                self.rates.push(now, counts);
                self.last_rate_sample = Some(now);
                self.check_guards(&st);
            }
            Err(e) => warn!("sampling connection counters: {e}"),
        }
    }

    /// Ends the flows of drained backends whose deadline has passed.
    pub(super) fn enforce_drain_deadlines(&mut self) {
        let Some(ctl) = self.ctl.as_mut() else { return };
        let mut ended_any = false;
        for (service, backend) in ctl.due_drains(unix_now()) {
            let ended = match self.dp.backend_id(&service, &backend) {
                None => Ok(0),
                Some(id) => self
                    .dp
                    .conn_table()
                    .and_then(|mut t| t.end_backend_flows(id)),
            };
            match ended {
                Ok(n) => {
                    info!(
                        service,
                        backend, "drain deadline passed: {n} connections ended"
                    );
                    ctl.mark_flows_ended(&service, &backend, n);
                    ended_any = true;
                }
                Err(e) => warn!(service, backend, "ending drained flows: {e}"),
            }
        }
        if ended_any {
            self.persist_overrides();
        }
    }

    /// Applies an operator override at once (not at the next poll), so a
    /// drain takes effect for the very next new connection.
    pub fn override_backend(
        &mut self,
        service: &str,
        backend: &str,
        change: OverrideChange,
    ) -> std::result::Result<Override, OverrideError> {
        let now = self.started.elapsed();
        let ctl = self.ctl.as_mut().ok_or(OverrideError::NotRunning)?;
        let before = ctl.overrides().clone();
        let ov = ctl.set_override(service, backend, change, unix_now())?;
        let (specs, _) = ctl.decide(now, &self.config, &measurer(&self.dp, &self.scan));
        if let Err(e) = self.dp.apply(&specs) {
            // Nothing half-applied: the override goes back to what it was.
            if let Some(c) = self.ctl.as_mut() {
                c.restore_overrides_exactly(before);
            }
            return Err(OverrideError::Datapath(e));
        }
        self.persist_overrides();
        self.publish_metrics(true);
        info!(service, backend, "override now {ov:?}");
        Ok(ov)
    }

    /// Saves the operator overrides beside the control socket, so a
    /// restarted daemon keeps them (see `overrides_file`).
    /// Saves the discovered lists for a restarted daemon (see
    /// `discovered_file`).
    pub(super) fn persist_discovered(&self) {
        let path = super::discovered_file::path_for(&self.config.daemon.control_socket);
        let lists = super::discovered_file::lists_of(&self.config, self.discovery.applied());
        if let Err(e) = super::discovered_file::save(&path, &lists) {
            warn!(
                "saving discovered backends: {e:#}; a restarted daemon would wait for its first                  lists"
            );
        }
    }

    pub(super) fn persist_overrides(&self) {
        let Some(ctl) = self.ctl.as_ref() else { return };
        let path = overrides_file::path_for(&self.config.daemon.control_socket);
        if let Err(e) = overrides_file::save(&path, ctl.overrides()) {
            warn!("saving overrides: {e:#}; a restarted daemon would not keep them");
        }
    }

    /// Records a poll round's results, runs the policy and writes the
    /// datapath if any weight changed.
    fn finish_round(&mut self, generation: u64, results: Vec<RoundResult>) {
        let now = self.started.elapsed();
        let Some(ctl) = self.ctl.as_mut() else { return };
        if ctl.generation() != generation {
            return;
        }
        for r in results {
            match r {
                RoundResult::Reading(s, b, res) => ctl.record_reading(s, b, now, res),
                RoundResult::Probe(s, b, res) => ctl.record_probe(s, b, res),
            }
        }
        let (specs, changed) = ctl.decide(now, &self.config, &measurer(&self.dp, &self.scan));
        ctl.telemetry_polls_done += 1;
        if changed && let Err(e) = self.dp.apply(&specs) {
            warn!("writing weights to the datapath: {e}");
        }
        self.enforce_drain_deadlines();
        self.sample_rates();
    }

    /// Validate-then-swap: a config that fails any check changes nothing.
    /// Announces the VIPs that have a backend to serve and withdraws the
    /// others (the XDP program is attached while the daemon runs).
    pub(super) fn sync_bgp(&mut self) {
        let want = self.dp.serving_vips();
        if let Some(sp) = self.bgp.as_mut() {
            match sp.sync(&want) {
                Ok(lines) => {
                    for l in lines {
                        info!("bgp: {l}");
                    }
                }
                Err(e) => warn!("bgp: {e}"),
            }
        }
    }

    pub fn reload(&mut self) -> ReloadReply {
        let reply = match self.try_reload() {
            Ok(msg) => {
                info!("reload: {msg}");
                ReloadReply {
                    ok: true,
                    message: msg,
                }
            }
            Err(e) => {
                warn!("reload refused: {e:#}");
                ReloadReply {
                    ok: false,
                    message: format!("{e:#}"),
                }
            }
        };
        self.last_reload = Some(reply.clone());
        self.publish_metrics(true);
        reply
    }

    /// Makes `cfg` the running config: the controller carries its state
    /// over, the datapath takes the new specs, then overrides and pool
    /// shares are saved, next hops resolved and the VIPs announced. A
    /// config the datapath refuses changes nothing: the controller goes
    /// back to the old config, with its overrides as they were.
    pub(super) fn apply_config(&mut self, cfg: Config) -> Result<Applied> {
        let overrides_before = self.ctl.as_ref().map(|c| c.overrides().clone());
        let mut ctl = Controller::new(&cfg, self.ctl.take());
        let (specs, _) = ctl.decide(
            self.started.elapsed(),
            &cfg,
            &measurer(&self.dp, &self.scan),
        );
        let report = match self.dp.apply(&specs) {
            Ok(r) => r,
            Err(e) => {
                let mut back = Controller::new(&self.config, Some(ctl));
                if let Some(o) = overrides_before {
                    back.restore_overrides_exactly(o);
                }
                self.ctl = Some(back);
                return Err(e.into());
            }
        };
        self.ctl = Some(ctl);
        self.config = cfg;
        // Overrides of backends the new config dropped are gone now.
        self.persist_overrides();
        self.persist_pool_shares();
        self.keep_next_hops_resolved();
        // New VIPs are announced, removed ones withdrawn, now.
        self.sync_bgp();
        Ok(Applied {
            added: report.added.len(),
            removed: report.removed.len(),
            swapped: report.swapped.len(),
        })
    }

    /// Applies a discovered service's new backends to a copy of the
    /// running config, through `apply_config`; refused, the service keeps
    /// the backends it has.
    pub(super) fn apply_discovered(&mut self, update: crate::discovery::Update) {
        if !self.discovery.is_current(&update) {
            return;
        }
        let service = update.service.as_str();
        let Some(index) = self.config.services.iter().position(|s| s.name == service) else {
            return;
        };
        if self.config.services[index].backends == update.backends {
            self.discovery.record(service, update.backends);
            return;
        }
        let applied = self
            .config
            .with_backends(index, update.backends.clone())
            .map_err(anyhow::Error::from)
            .and_then(|cfg| self.apply_config(cfg));
        match applied {
            Ok(report) => {
                let drained = update.backends.iter().filter(|b| b.drain).count();
                info!(
                    service,
                    "discovered backends applied: {} ({drained} drained); {} added, {} removed, {} tables swapped",
                    update.backends.len(),
                    report.added,
                    report.removed,
                    report.swapped
                );
                self.discovery.record(service, update.backends);
                self.persist_discovered();
                self.publish_metrics(true);
            }
            Err(e) => warn!(
                service,
                "discovered backends not applied: {e:#}; the service keeps the ones it has"
            ),
        }
    }

    pub(super) fn try_reload(&mut self) -> Result<String> {
        let cfg = load_for_host(&self.config_path)?;
        if load_options(&cfg) != *self.dp.options() {
            anyhow::bail!(
                "{}: table_size, conn_table_size, timeouts and datapath_log are fixed at load time; \
                 a restart changes timeouts and datapath_log hitlessly, the sizes only after \
                 `router daemon --cleanup`",
                cfg.origin()
            );
        }
        // Attaching needs capabilities the daemon dropped after start, and
        // the pins are where the running program lives.
        if cfg.daemon.interfaces != self.config.daemon.interfaces
            || cfg.daemon.xdp_mode != self.config.daemon.xdp_mode
            || cfg.daemon.pin_path != self.config.daemon.pin_path
        {
            anyhow::bail!(
                "{}: interface, xdp_mode and pin_path changes need a restart (interfaces: \
                 hitless; xdp_mode and pin_path: after `router daemon --cleanup`)",
                cfg.origin()
            );
        }
        // The speaker was started before the capabilities went, with this
        // config; another needs another start.
        if cfg.bgp != self.config.bgp {
            anyhow::bail!(
                "{}: [bgp] changes need a restart (the daemon starts gobgpd before it drops \
                 its capabilities; a SIGTERM withdraws and drains first)",
                cfg.origin()
            );
        }
        // The daemon sets IPv6 forwarding at start, before it drops its
        // capabilities; without it router_v6 resolves no next hop.
        if cfg.has_ipv6_service() && !self.config.has_ipv6_service() {
            let missing = crate::host::settings::needed_ipv6(&cfg.daemon.interfaces)?;
            if let Some(c) = missing.first() {
                anyhow::bail!(
                    "{}: IPv6 services need {}, which the daemon sets only at start: restart it \
                     (hitless), or set it by hand and reload",
                    cfg.origin(),
                    c.describe()
                );
            }
        }
        let mut cfg = cfg;
        // The file lists no backends for a discovered service: it keeps
        // the ones discovered.
        self.discovery.keep_discovered(&mut cfg);
        let report = self.apply_config(cfg)?;
        self.discovery.reconcile(&self.config);
        self.persist_discovered();
        Ok(format!(
            "applied {}: {} added, {} removed, {} tables swapped",
            self.config_path.display(),
            report.added,
            report.removed,
            report.swapped
        ))
    }
}

/// What applying a config changed in the datapath, in counts.
pub(super) struct Applied {
    added: usize,
    removed: usize,
    swapped: usize,
}

enum RoundResult {
    Reading(usize, usize, Result<Reading, TelemetryError>),
    Probe(usize, usize, Result<(), ProbeFailure>),
}

/// One poll round: every source and due probe runs concurrently, each with
/// its own deadline, and without the state lock, so a slow backend delays
/// nobody and the control API stays responsive.
pub(super) async fn poll_round(state: &Mutex<DaemonState>) {
    let (generation, polls, probes, timeout) = {
        let mut st = state.lock().await;
        let now = st.started.elapsed();
        let Some(ctl) = st.ctl.as_mut() else { return };
        // Leave a fifth of the interval for the policy and the map writes.
        let timeout = ctl.poll_interval().mul_f64(0.8);
        (
            ctl.generation(),
            ctl.poll_jobs(),
            ctl.probe_jobs(now),
            timeout,
        )
    };
    let mut set = tokio::task::JoinSet::new();
    for j in polls {
        set.spawn(async move {
            RoundResult::Reading(j.service, j.backend, j.source.read(timeout).await)
        });
    }
    for p in probes {
        set.spawn(async move { RoundResult::Probe(p.service, p.backend, p.check.probe().await) });
    }
    let mut results = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(r) => results.push(r),
            Err(e) => warn!("poll task failed: {e}"),
        }
    }
    let mut st = state.lock().await;
    st.finish_round(generation, results);
    st.publish_metrics(false);
    st.sync_bgp();
}
