//! The weight policy: a pure function from telemetry readings, health,
//! operator overrides and an injected clock to one integer Maglev weight
//! and a reason per backend. Owns smoothing, saturation, the bounded step,
//! slow start, staleness and the all-saturated fallback.
//!
//! It must never do I/O, read the wall clock, draw random numbers or
//! depend on hash-map order: several ingress nodes fed the same inputs
//! must compute the same weights, or their Maglev tables (and so ECMP'd
//! flows) would disagree.
//!
//! Rules, in order of precedence for each backend:
//! 1. drained → 0; unhealthy → 0 (immediately, no step limit);
//! 2. pinned weight → that weight (a share, not a promise: a pinned
//!    backend that fails health still gets 0);
//! 3. never reported → `stale_fraction` of its full weight;
//! 4. telemetry stale (no fresh reading for `stale_after`) → the last
//!    weight, decaying linearly over `stale_decay` to at most
//!    `stale_fraction` of full; never treated as idle;
//! 5. saturated → the floor, immediately (probe traffic, not zero);
//! 6. otherwise floor + (full − floor) × headroom below target, scaled by
//!    the slow-start factor while the window from readiness runs;
//! 7. every move that is not to 0, to a pinned weight or into saturation is
//!    limited to `max_step_fraction` of full per tick.
//!
//! A healthy, undrained backend that is not pinned to 0 never gets weight
//! 0: the floor is at least 1. When every such backend is saturated they
//! all sit at their floors (an equal spread by capacity) and the tick
//! reports `all_saturated` so the daemon can count the fallback.
//!
//! That is the policy of `Mode::Shares` (Maglev services: the weight is the
//! backend's share of new flows). Least-loaded services run `Mode::Capacity`
//! (see `capacity`): the datapath counts in-flight flows and places each new
//! one itself, so the weight is the backend's capacity, measured, and the
//! rules above keep only drain, health, pins and slow start.

pub mod capacity;
mod signal;
mod slow_start;
mod state;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

pub use capacity::Measured;
pub use signal::SignalMix;
use state::{BackendState, StaleEpisode};

use crate::telemetry::Reading;

/// Tunables. `Default` gives the documented defaults (see the field docs
/// and `examples/router.toml`).
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyConfig {
    /// How often the daemon polls telemetry and ticks the policy; the
    /// policy itself only sees the clock it is given.
    pub poll_interval: Duration,
    /// Load at which a backend's weight reaches the floor.
    pub target_utilization: f64,
    /// Load at which a backend counts as saturated.
    pub saturation: f64,
    /// A saturated backend leaves saturation only below
    /// `saturation - hysteresis` (raw and smoothed load both).
    pub hysteresis: f64,
    /// Consecutive raw readings at or above `saturation` that saturate a
    /// backend before its EWMA gets there.
    pub saturation_confirm: u32,
    /// EWMA weight of the newest reading, in (0, 1].
    pub ewma_alpha: f64,
    /// Slow-start window from readiness; zero disables slow start.
    pub slow_start: Duration,
    /// 1 is a linear ramp; larger ramps faster early.
    pub slow_start_aggression: f64,
    /// The floor, as a fraction of a backend's full weight (at least 1).
    pub min_weight_fraction: f64,
    /// Largest move per tick, as a fraction of a backend's full weight.
    pub max_step_fraction: f64,
    /// Fraction of the gap to a higher headroom target closed per tick.
    /// Weights steer the load they are computed from: a backend given more
    /// weight gets more connections and so more load. Closing the whole gap
    /// at once gives that loop a gain above 1 near capacity, and the weights
    /// swing between the floor and full. Increases are therefore damped;
    /// cuts still take effect at once (bounded by the step), because an
    /// overloaded replica queues every request it is sent meanwhile.
    pub weight_gain: f64,
    /// Headroom targets closer than this fraction of full weight to the
    /// current weight are ignored: telemetry is noisy (a batch of 4 moves
    /// in steps of 25%), and a weight that tracks every wiggle rebuilds the
    /// Maglev table every poll without improving anything.
    pub weight_deadband: f64,
    /// A reading older than this is stale.
    pub stale_after: Duration,
    /// How long a stale backend's weight takes to decay to its
    /// conservative share.
    pub stale_decay: Duration,
    /// The conservative share of backends whose load is unknown (never
    /// reported, or stale), as a fraction of full weight.
    pub stale_fraction: f64,
    pub signal: SignalMix,
    /// Weight of an idle capacity-1.0 backend.
    pub full_weight: u32,
    /// Least-loaded services: the time constant of the measured speed (how
    /// far back completions and flow-seconds count).
    pub speed_window: Duration,
    /// Least-loaded services: a new capacity is published only when it
    /// differs from the current one by more than this fraction.
    pub capacity_deadband: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            poll_interval: Duration::from_millis(500),
            target_utilization: 0.80,
            saturation: 0.95,
            hysteresis: 0.05,
            saturation_confirm: 2,
            ewma_alpha: 0.3,
            slow_start: Duration::from_secs(30),
            slow_start_aggression: 1.0,
            min_weight_fraction: 0.02,
            max_step_fraction: 0.25,
            weight_gain: 0.3,
            weight_deadband: 0.1,
            stale_after: Duration::from_secs(3),
            stale_decay: Duration::from_secs(10),
            stale_fraction: 0.25,
            signal: SignalMix::default(),
            // Equal to the static default weight, so an idle capacity-1.0
            // backend and a static one without a weight get equal shares.
            full_weight: 100,
            // Some hundreds of completions at inference rates: heavy-tailed
            // lengths average out, a real slowdown shows within a minute.
            speed_window: Duration::from_secs(15),
            capacity_deadband: 0.15,
        }
    }
}

/// `x` rounded to a weight; NaN and negatives give 0.
fn to_weight(x: f64) -> u32 {
    if x.is_finite() && x > 0.0 {
        // `as` saturates at u32::MAX, which is what a huge weight should do.
        x.round() as u32
    } else {
        0
    }
}

impl PolicyConfig {
    /// Weight of an idle backend of this capacity (at least 1).
    pub fn full(&self, capacity: f64) -> u32 {
        to_weight(f64::from(self.full_weight) * capacity).max(1)
    }

    /// The least weight a healthy, telemetry-driven backend gets (at
    /// least 1, so it keeps receiving probe traffic).
    pub fn floor(&self, capacity: f64) -> u32 {
        to_weight(self.min_weight_fraction * f64::from(self.full_weight) * capacity).max(1)
    }

    /// Weight of a backend whose load is unknown: never reported, or the
    /// end of a stale decay.
    pub fn unknown(&self, capacity: f64) -> u32 {
        to_weight(self.stale_fraction * f64::from(self.full_weight) * capacity)
            .max(self.floor(capacity))
    }

    fn max_step(&self, capacity: f64) -> u32 {
        to_weight(self.max_step_fraction * f64::from(self.full_weight) * capacity).max(1)
    }
}

/// One backend's inputs for a tick.
#[derive(Clone, Copy, Debug)]
pub struct BackendInput<'a> {
    /// Unique within the policy (one policy per service).
    pub name: &'a str,
    /// Relative static capacity, > 0 and finite (others get weight 1).
    pub capacity: f64,
    pub pinned_weight: Option<u32>,
    pub drained: bool,
    pub healthy: bool,
    /// The newest validated reading and when it was taken, on the same
    /// clock as `tick`'s `now`.
    pub latest: Option<(Duration, &'a Reading)>,
    /// The datapath's counts for the backend at this tick (capacity mode).
    pub measured: Option<Measured>,
    /// `max_in_flight` from the config (capacity mode).
    pub max_in_flight: Option<u32>,
}

/// What a service's weights mean.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Shares of new flows through the Maglev table.
    #[default]
    Shares,
    /// Capacities that the datapath's least-loaded pick divides by.
    Capacity,
}

/// Why a backend got its weight.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reason {
    Pinned,
    Drained,
    Unhealthy,
    /// Never reported a usable reading: conservative share.
    NoTelemetry,
    /// Ramping after readiness; `progress` is 0.0–1.0 of the window.
    SlowStart {
        progress: f64,
    },
    Saturated,
    /// Weight follows headroom below the target utilization.
    Headroom,
    /// Telemetry went stale; decaying toward the conservative share.
    StaleDecay {
        progress: f64,
    },
    /// Telemetry stale; at the conservative share.
    Stale,
    /// Every live backend is saturated: all at their floors.
    AllSaturatedSpread,
    /// Capacity from the measured speed, relative to the fastest backend
    /// (`None` until enough flows have completed).
    Capacity {
        speed: Option<f64>,
    },
}

impl Reason {
    /// The reason without its figures, from a fixed set: a metric label must
    /// not carry a percentage or a speed, or every tick would mint a new
    /// series.
    pub fn label(&self) -> &'static str {
        match self {
            Reason::Pinned => "pinned",
            Reason::Drained => "drained",
            Reason::Unhealthy => "unhealthy",
            Reason::NoTelemetry => "no_telemetry",
            Reason::SlowStart { .. } => "slow_start",
            Reason::Saturated => "saturated",
            Reason::Headroom => "headroom",
            Reason::StaleDecay { .. } => "stale_decay",
            Reason::Stale => "stale",
            Reason::AllSaturatedSpread => "all_saturated",
            Reason::Capacity { speed: Some(_) } => "capacity",
            Reason::Capacity { speed: None } => "capacity_unmeasured",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Pinned => f.write_str("pinned"),
            Reason::Drained => f.write_str("drained"),
            Reason::Unhealthy => f.write_str("unhealthy"),
            Reason::NoTelemetry => f.write_str("no telemetry yet"),
            Reason::SlowStart { progress } => write!(f, "slow start {:.0}%", progress * 100.0),
            Reason::Saturated => f.write_str("saturated"),
            Reason::Headroom => f.write_str("headroom"),
            Reason::StaleDecay { progress } => {
                write!(f, "telemetry stale, decaying {:.0}%", progress * 100.0)
            }
            Reason::Stale => f.write_str("telemetry stale"),
            Reason::AllSaturatedSpread => f.write_str("all saturated, spread at floor"),
            Reason::Capacity { speed: Some(s) } => write!(f, "capacity: speed {s:.2}"),
            Reason::Capacity { speed: None } => f.write_str("capacity: not measured yet"),
        }
    }
}

/// One backend's outcome of a tick.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub name: String,
    pub weight: u32,
    /// Where the weight is heading; differs from `weight` only while the
    /// step limit holds it back.
    pub target: u32,
    pub reason: Reason,
    /// Smoothed load, if any reading was taken in since the last failure.
    pub load: Option<f64>,
    pub saturated: bool,
    pub stale: bool,
    pub step_limited: bool,
    /// Flows in flight at which the backend has no room (0: no limit);
    /// capacity mode only.
    pub max_in_flight: u32,
}

/// The outcome of one tick.
#[derive(Clone, Debug, PartialEq)]
pub struct Tick {
    /// In input order.
    pub decisions: Vec<Decision>,
    /// Every healthy, undrained backend is saturated (and at least one
    /// exists); the daemon counts these fallbacks.
    pub all_saturated: bool,
    /// Some weight differs from the previous tick, or a backend came or
    /// went: the Maglev table needs a rebuild.
    pub changed: bool,
}

/// The policy for one service's backends.
#[derive(Clone, Debug)]
pub struct Policy {
    cfg: PolicyConfig,
    mode: Mode,
    /// BTreeMap so nothing can depend on hash order.
    states: BTreeMap<String, BackendState>,
}

impl Policy {
    pub fn new(cfg: PolicyConfig) -> Self {
        Self::with_mode(cfg, Mode::Shares)
    }

    pub fn with_mode(cfg: PolicyConfig, mode: Mode) -> Self {
        Policy {
            cfg,
            mode,
            states: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Computes this tick's weights. `now` is time since an arbitrary
    /// epoch, shared with the readings' timestamps. Backends absent from
    /// `inputs` are forgotten (coming back means slow start again).
    pub fn tick(&mut self, now: Duration, inputs: &[BackendInput<'_>]) -> Tick {
        let mut changed = false;
        let mut decisions = Vec::with_capacity(inputs.len());
        let fastest = if self.mode == Mode::Capacity {
            self.measure(now, inputs)
        } else {
            None
        };
        for input in inputs {
            let st = self.states.entry(input.name.to_owned()).or_default();
            let decision = match self.mode {
                Mode::Shares => decide(&self.cfg, st, now, input),
                Mode::Capacity => decide_capacity(&self.cfg, st, now, input, fastest),
            };
            changed |= st.weight != Some(decision.weight);
            st.weight = Some(decision.weight);
            decisions.push(decision);
        }
        let present: BTreeSet<&str> = inputs.iter().map(|i| i.name).collect();
        let before = self.states.len();
        self.states
            .retain(|name, _| present.contains(name.as_str()));
        changed |= self.states.len() != before;

        let mut live = decisions
            .iter()
            .zip(inputs)
            .filter(|(_, i)| i.healthy && !i.drained)
            .peekable();
        let all_saturated = live.peek().is_some()
            && live.all(|(d, _)| match self.mode {
                Mode::Shares => d.reason == Reason::Saturated,
                Mode::Capacity => d.saturated,
            });
        if all_saturated && self.mode == Mode::Shares {
            for d in &mut decisions {
                if d.reason == Reason::Saturated {
                    d.reason = Reason::AllSaturatedSpread;
                }
            }
        }
        Tick {
            decisions,
            all_saturated,
            changed,
        }
    }
}

impl Policy {
    /// Takes in the datapath's counts; returns the fastest completion rate
    /// per flow among the backends that take traffic by the policy's word.
    fn measure(&mut self, now: Duration, inputs: &[BackendInput<'_>]) -> Option<f64> {
        let mut fastest: Option<f64> = None;
        for input in inputs {
            let st = self.states.entry(input.name.to_owned()).or_default();
            if let Some(m) = input.measured {
                st.speed.observe(now, m, self.cfg.speed_window);
            }
            if input.healthy
                && !input.drained
                && input.pinned_weight.is_none()
                && let Some(r) = st.speed.rate()
            {
                fastest = Some(fastest.map_or(r, |f| f.max(r)));
            }
        }
        fastest
    }
}

/// Takes in a new, fresh reading (load and saturation, and in capacity
/// mode the batch limit it shows).
fn ingest_reading(
    cfg: &PolicyConfig,
    st: &mut BackendState,
    now: Duration,
    input: &BackendInput<'_>,
) {
    if !input.healthy {
        st.reset_after_failure();
    } else if let Some((when, reading)) = input.latest {
        let is_new = st.last_when.is_none_or(|last| when > last);
        // A late reading says nothing about the load now.
        let fresh = age(now, when) < cfg.stale_after;
        if is_new && fresh {
            st.limit.observe(reading);
            if let Some(raw) = signal::load(reading, &cfg.signal) {
                st.ingest(when, raw, cfg);
            }
        }
    }
}

/// A capacity-mode decision (see `capacity`): drain, health and pins as in
/// share mode; otherwise full weight × configured capacity × measured
/// relative speed, ramped by slow start, and published past the deadband.
fn decide_capacity(
    cfg: &PolicyConfig,
    st: &mut BackendState,
    now: Duration,
    input: &BackendInput<'_>,
    fastest: Option<f64>,
) -> Decision {
    ingest_reading(cfg, st, now, input);
    let prev = st.weight.unwrap_or(0);
    let limit = input.max_in_flight.or_else(|| st.limit.get()).unwrap_or(0);
    let decision = |weight: u32, target: u32, reason: Reason, st: &BackendState| Decision {
        name: input.name.to_owned(),
        weight,
        target,
        reason,
        load: st.ewma,
        saturated: st.saturated,
        stale: false,
        step_limited: weight != target,
        max_in_flight: limit,
    };
    if input.drained {
        st.ready_at = None;
        return decision(0, 0, Reason::Drained, st);
    }
    if !input.healthy {
        return decision(0, 0, Reason::Unhealthy, st);
    }
    if let Some(w) = input.pinned_weight {
        if w == 0 {
            st.ready_at = None;
        }
        return decision(w, w, Reason::Pinned, st);
    }
    let ready_at = *st.ready_at.get_or_insert(now);
    let rate = st.speed.rate();
    let speed = capacity::relative_speed(rate, fastest);
    let full = f64::from(cfg.full(input.capacity));
    let elapsed = now.saturating_sub(ready_at);
    if elapsed < cfg.slow_start {
        let f = slow_start::factor(
            elapsed,
            cfg.slow_start,
            cfg.slow_start_aggression,
            cfg.min_weight_fraction,
        );
        let target = to_weight(full * speed * f).max(1);
        let progress = slow_start::progress(elapsed, cfg.slow_start);
        st.ramped = true;
        return decision(target, target, Reason::SlowStart { progress }, st);
    }
    let target = to_weight(full * speed).max(1);
    // A move is published when it is larger than the deadband and than
    // what the estimate's own noise explains (see `SpeedEstimate::noise`);
    // the end of a ramp always is.
    let band = cfg.capacity_deadband.max(st.speed.noise().min(0.4));
    let ramp_ended = std::mem::take(&mut st.ramped);
    let weight = if prev == 0 || ramp_ended || capacity::moved(prev, target, band) {
        target
    } else {
        prev
    };
    let reason = Reason::Capacity {
        speed: rate.map(|_| speed),
    };
    decision(weight, target, reason, st)
}

/// Age of a reading taken at `when`; a timestamp ahead of `now` is new.
fn age(now: Duration, when: Duration) -> Duration {
    now.saturating_sub(when)
}

fn step_toward(prev: u32, target: u32, max_step: u32) -> u32 {
    if target >= prev {
        prev.saturating_add((target - prev).min(max_step))
    } else {
        prev - (prev - target).min(max_step)
    }
}

fn decide(
    cfg: &PolicyConfig,
    st: &mut BackendState,
    now: Duration,
    input: &BackendInput<'_>,
) -> Decision {
    if !input.healthy {
        st.reset_after_failure();
    } else if let Some((when, reading)) = input.latest {
        let is_new = st.last_when.is_none_or(|last| when > last);
        // A late reading says nothing about the load now.
        let fresh = age(now, when) < cfg.stale_after;
        if is_new
            && fresh
            && let Some(raw) = signal::load(reading, &cfg.signal)
        {
            st.ingest(when, raw, cfg);
        }
    }

    let cap = input.capacity;
    let prev = st.weight.unwrap_or(0);
    let fixed = |weight: u32, reason: Reason, st: &BackendState| Decision {
        name: input.name.to_owned(),
        weight,
        target: weight,
        reason,
        load: st.ewma,
        saturated: st.saturated,
        stale: false,
        step_limited: false,
        max_in_flight: 0,
    };

    if input.drained {
        // Undraining ramps up again like a new backend.
        st.ready_at = None;
        st.stale = None;
        return fixed(0, Reason::Drained, st);
    }
    if !input.healthy {
        return fixed(0, Reason::Unhealthy, st);
    }
    if let Some(w) = input.pinned_weight {
        if w == 0 {
            st.ready_at = None;
        }
        return fixed(w, Reason::Pinned, st);
    }

    let floor = cfg.floor(cap);
    let fresh = st.last_when.is_some_and(|w| age(now, w) < cfg.stale_after);
    let mut stale = false;
    let mut damped = false;
    let (target, reason, immediate) = if !fresh && !st.ever_reported {
        (cfg.unknown(cap), Reason::NoTelemetry, false)
    } else if !fresh {
        stale = true;
        // Hold what it had; a backend that had nothing (just recovered)
        // holds the floor, since nothing shows it can take more.
        let episode = *st.stale.get_or_insert(StaleEpisode {
            since: now,
            hold: if prev > 0 { prev } else { floor },
        });
        // Toward the conservative share, never up: a stale backend that
        // was saturated stays at its floor.
        let goal = episode.hold.min(cfg.unknown(cap));
        let progress = slow_start::progress(now.saturating_sub(episode.since), cfg.stale_decay);
        let w = f64::from(episode.hold) + (f64::from(goal) - f64::from(episode.hold)) * progress;
        let reason = if progress < 1.0 {
            Reason::StaleDecay { progress }
        } else {
            Reason::Stale
        };
        (to_weight(w), reason, false)
    } else {
        st.stale = None;
        let ready_at = *st.ready_at.get_or_insert(now);
        if st.saturated {
            // Not step-limited: cutting a saturated replica's share within
            // two polls is a product requirement, and every new request
            // sent to it meanwhile queues.
            (floor, Reason::Saturated, true)
        } else {
            let load = st.ewma.unwrap_or(1.0);
            let headroom = if cfg.target_utilization > 0.0 {
                ((cfg.target_utilization - load) / cfg.target_utilization).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let floor_f = f64::from(floor);
            let w = floor_f + (f64::from(cfg.full(cap)) - floor_f).max(0.0) * headroom;
            let elapsed = now.saturating_sub(ready_at);
            if elapsed < cfg.slow_start {
                let f = slow_start::factor(
                    elapsed,
                    cfg.slow_start,
                    cfg.slow_start_aggression,
                    cfg.min_weight_fraction,
                );
                let progress = slow_start::progress(elapsed, cfg.slow_start);
                (
                    to_weight(w * f).max(floor),
                    Reason::SlowStart { progress },
                    false,
                )
            } else {
                damped = true;
                (to_weight(w).max(floor), Reason::Headroom, false)
            }
        }
    };

    // From 0 (new, recovered, undrained) the targets above are already
    // conservative (floor or the unknown share), so no ramp is needed.
    let weight = if immediate || prev == 0 {
        target
    } else if damped
        // Full weight and the floor are always reached exactly: an idle or
        // loaded backend ends where the rules say, not a deadband short.
        && target != cfg.full(cap)
        && target != floor
        && f64::from(target.abs_diff(prev)) < cfg.weight_deadband * f64::from(cfg.full(cap))
    {
        prev
    } else if damped && target > prev {
        let gap = f64::from(target) - f64::from(prev);
        let goal = to_weight(f64::from(prev) + cfg.weight_gain * gap);
        // Never stall one unit short: a small gap closes fully.
        let goal = if goal == prev { target } else { goal };
        step_toward(prev, goal, cfg.max_step(cap))
    } else {
        step_toward(prev, target, cfg.max_step(cap))
    };
    Decision {
        name: input.name.to_owned(),
        weight,
        target,
        reason,
        load: st.ewma,
        saturated: st.saturated,
        stale,
        step_limited: weight != target,
        max_in_flight: 0,
    }
}

/// The load a reading shows under `mix`, for status displays.
pub fn reading_load(reading: &Reading, mix: &SignalMix) -> Option<f64> {
    signal::load(reading, mix)
}
