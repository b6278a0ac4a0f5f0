//! Capacity for least-loaded services: how much concurrent work a backend
//! takes relative to its service's others, and how many flows it holds
//! before it has no room. The datapath places each new flow by
//! `(in_flight + 1) / capacity` among the backends with room, so the policy
//! no longer splits traffic: it only says how fast each replica is and how
//! much it can hold.
//!
//! - **Speed** comes from what the datapath measures, not from what a
//!   replica says about itself: flows completed per second per flow in
//!   flight (Little's law: the inverse of a flow's mean time on the
//!   backend), over an exponentially decaying window, relative to the
//!   fastest backend of the service. A replica that reports itself idle
//!   while its flows take long gains nothing by it: telemetry can lower a
//!   backend's room but never raises its capacity.
//! - **Room** (`max_in_flight`) is the backend's `max_in_flight` from the
//!   config, or else learned from telemetry: the batch an engine was running
//!   while a queue of waiting requests lasted through several polls is the
//!   most it runs at once (see `LearnedLimit`).
//! - **Slow start** ramps capacity from readiness, so a replica that joins
//!   cold takes a few flows first instead of everything leastconn would send
//!   an empty server.
//! - **Stability**: a new capacity is published only when it moved more
//!   than the deadband from the last one, so measurement noise does not
//!   rebuild tables every poll.
//!
//! Pure arithmetic on its inputs and the clock it is given: no I/O, no
//! floating-point library calls whose last bits differ between machines.

use std::time::Duration;

use crate::telemetry::Reading;

/// Completions a speed estimate must rest on before it is used; fewer say
/// too little about a heavy-tailed workload.
pub const MIN_COMPLETIONS: f64 = 20.0;
/// The slowest speed a backend is credited with, relative to the fastest,
/// so it always receives some flows to be measured by.
pub const MIN_SPEED: f64 = 0.05;

/// What the datapath counted for one backend, read at a tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Measured {
    /// Flows open now.
    pub in_flight: u64,
    /// Flows ended so far (a counter; it only restarts with a new backend slot).
    pub ended: u64,
}

/// A decaying record of a backend's completions and of its flow-seconds
/// in flight; their ratio is its completion rate per flow.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpeedEstimate {
    last: Option<(Duration, Measured)>,
    completions: f64,
    flow_seconds: f64,
    /// The last rate that rested on enough completions.
    rate: Option<f64>,
}

impl SpeedEstimate {
    /// Takes in the counts at `now`. `window` is the decay's time constant:
    /// each sample's weight falls to a half after about 0.7 windows.
    pub fn observe(&mut self, now: Duration, m: Measured, window: Duration) {
        if let Some((then, prev)) = self.last {
            let dt = now.saturating_sub(then).as_secs_f64();
            if dt <= 0.0 {
                return;
            }
            // First-order decay w / (w + dt): exp(-dt / w) to within a few
            // percent at poll intervals, and the same bits on every machine.
            let w = window.as_secs_f64().max(1e-3);
            let keep = w / (w + dt);
            // A counter that went back (a reused slot) restarts the record.
            let done = m.ended.saturating_sub(prev.ended) as f64;
            let held = (prev.in_flight + m.in_flight) as f64 / 2.0 * dt;
            self.completions = self.completions * keep + done;
            self.flow_seconds = self.flow_seconds * keep + held;
            if self.completions >= MIN_COMPLETIONS && self.flow_seconds > 0.0 {
                self.rate = Some(self.completions / self.flow_seconds);
            }
        }
        self.last = Some((now, m));
    }

    /// Completions per second per flow in flight, once there was enough to
    /// go on. A backend that takes few flows (a slow one, by the estimate
    /// itself) may fall below that evidence again: it keeps its last
    /// estimate rather than count as unmeasured, which would hand it full
    /// capacity and flip it back and forth.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// The relative change in the estimate that its own noise can explain:
    /// two standard errors of a mean of `completions` flow times, taking
    /// their coefficient of variation as 1 (heavy-tailed lengths are about
    /// that). A replica that completes few flows (a slow one, or a lightly
    /// used one) has a noisy estimate, and a capacity that followed every
    /// wobble of it would change several times a minute.
    pub fn noise(&self) -> f64 {
        if self.completions >= 1.0 {
            2.0 / self.completions.sqrt()
        } else {
            1.0
        }
    }
}

/// The most requests a backend's engine runs at once, learned from
/// readings that show it full: requests waiting in every one of
/// `LIMIT_EVIDENCE` fresh readings in a row. One reading with a request
/// waiting proves nothing: a continuous-batching engine admits new
/// requests at its next step, so a poll often finds one waiting while the
/// batch has room (seen with the mock replicas: a limit of 3 learned on
/// replicas that batch 8, and the slow replica flooded). A queue that
/// lasts through several polls only forms in a full batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LearnedLimit {
    /// Consecutive readings with requests waiting, and the largest batch among them.
    streak: u32,
    streak_batch: u32,
    value: Option<u32>,
}

/// Readings in a row with requests waiting that show a full batch.
pub const LIMIT_EVIDENCE: u32 = 4;

impl LearnedLimit {
    /// Takes in one fresh reading.
    pub fn observe(&mut self, r: &Reading) {
        let (Some(running), Some(waiting)) = (r.requests_running, r.requests_waiting) else {
            self.streak = 0;
            return;
        };
        if !(waiting > 0.0 && running >= 1.0 && running.is_finite()) {
            self.streak = 0;
            return;
        }
        // Readings are validated finite and non-negative; batches are small.
        let batch = running.round().min(f64::from(u32::MAX)) as u32;
        self.streak_batch = if self.streak == 0 {
            batch
        } else {
            self.streak_batch.max(batch)
        };
        self.streak += 1;
        if self.streak >= LIMIT_EVIDENCE {
            // Up or down: a full batch that shrank (KV-cache pressure, a
            // restarted engine) is as real as one that grew.
            self.value = Some(self.streak_batch);
        }
    }

    pub fn get(&self) -> Option<u32> {
        self.value
    }
}

/// A backend's speed relative to the fastest measured one of its service:
/// `rate / fastest`, within [MIN_SPEED, 1]. Unmeasured backends count as
/// fast as the fastest: slow start, not a guess, keeps a new one light.
pub fn relative_speed(rate: Option<f64>, fastest: Option<f64>) -> f64 {
    match (rate, fastest) {
        (Some(r), Some(f)) if f > 0.0 && r.is_finite() => (r / f).clamp(MIN_SPEED, 1.0),
        _ => 1.0,
    }
}

/// Whether a capacity moved far enough from `prev` to publish: more than
/// `deadband` of the larger of the two, or to or from 0.
pub fn moved(prev: u32, target: u32, deadband: f64) -> bool {
    if prev == 0 || target == 0 {
        return prev != target;
    }
    let (a, b) = (f64::from(prev), f64::from(target));
    (a - b).abs() > deadband * a.max(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(10);

    fn feed(e: &mut SpeedEstimate, secs: u64, in_flight: u64, per_sec: u64) {
        let mut ended = e.last.map_or(0, |(_, m)| m.ended);
        let start = e.last.map_or(0, |(t, _)| t.as_millis() as u64);
        for i in 1..=secs * 2 {
            ended += per_sec / 2;
            let now = Duration::from_millis(start + i * 500);
            e.observe(now, Measured { in_flight, ended }, W);
        }
    }

    #[test]
    fn rate_is_completions_per_flow_second() {
        let mut e = SpeedEstimate::default();
        e.observe(Duration::ZERO, Measured::default(), W);
        // 8 flows in flight, 16 done a second: each takes 0.5 s.
        feed(&mut e, 60, 8, 16);
        let r = e.rate().expect("enough completions");
        assert!((r - 2.0).abs() < 0.05, "rate {r}");
    }

    #[test]
    fn no_rate_before_enough_completions() {
        let mut e = SpeedEstimate::default();
        e.observe(Duration::ZERO, Measured::default(), W);
        feed(&mut e, 2, 4, 4);
        assert_eq!(e.rate(), None);
    }

    #[test]
    fn the_estimate_follows_a_slowdown_within_a_few_windows() {
        let mut e = SpeedEstimate::default();
        e.observe(Duration::ZERO, Measured::default(), W);
        feed(&mut e, 60, 8, 16);
        feed(&mut e, 40, 8, 4);
        let r = e.rate().unwrap();
        assert!(r < 0.7, "rate {r} after the slowdown");
    }

    #[test]
    fn an_estimate_is_kept_when_the_evidence_thins_out() {
        let mut e = SpeedEstimate::default();
        e.observe(Duration::ZERO, Measured::default(), W);
        feed(&mut e, 60, 8, 16);
        let r = e.rate().unwrap();
        // It is given nothing for a minute (the others took the flows).
        feed(&mut e, 60, 0, 0);
        let held = e.rate().expect("held, not reset to unmeasured");
        assert!((held - r).abs() < 0.1 * r, "{held} against {r}");
    }

    #[test]
    fn a_counter_that_goes_back_restarts_the_record() {
        let mut e = SpeedEstimate::default();
        e.observe(
            Duration::ZERO,
            Measured {
                in_flight: 1,
                ended: 1000,
            },
            W,
        );
        e.observe(
            Duration::from_millis(500),
            Measured {
                in_flight: 1,
                ended: 3,
            },
            W,
        );
        assert!(
            e.completions < 1.0,
            "no burst of 'completions' from a reset"
        );
    }

    fn full(running: f64, waiting: f64) -> Reading {
        Reading {
            requests_running: Some(running),
            requests_waiting: Some(waiting),
            ..Reading::default()
        }
    }

    #[test]
    fn the_limit_is_the_batch_seen_with_a_lasting_queue() {
        let mut l = LearnedLimit::default();
        l.observe(&full(5.0, 0.0));
        assert_eq!(l.get(), None, "nothing waits: no evidence of a limit");
        // A request waiting for the next step, now and then: no limit.
        for _ in 0..10 {
            l.observe(&full(3.0, 1.0));
            l.observe(&full(3.0, 0.0));
        }
        assert_eq!(l.get(), None, "transient waits are not a full batch");
        for _ in 0..3 {
            l.observe(&full(8.0, 2.0));
        }
        assert_eq!(l.get(), None, "three readings are not yet enough");
        l.observe(&full(7.0, 3.0));
        assert_eq!(l.get(), Some(8), "the largest batch of the streak");
        l.observe(&full(2.0, 0.0));
        assert_eq!(l.get(), Some(8), "kept while it has room");
        for _ in 0..4 {
            l.observe(&full(6.0, 1.0));
        }
        assert_eq!(
            l.get(),
            Some(6),
            "a lasting queue at a smaller batch lowers it"
        );
    }

    #[test]
    fn speed_is_relative_and_bounded() {
        assert_eq!(relative_speed(Some(1.0), Some(2.0)), 0.5);
        assert_eq!(relative_speed(Some(0.01), Some(2.0)), MIN_SPEED);
        assert_eq!(relative_speed(None, Some(2.0)), 1.0);
        assert_eq!(relative_speed(Some(3.0), Some(2.0)), 1.0);
    }

    #[test]
    fn deadband_is_relative() {
        assert!(!moved(100, 110, 0.15));
        assert!(moved(100, 80, 0.15));
        assert!(moved(0, 5, 0.15));
        assert!(moved(5, 0, 0.15));
        assert!(!moved(40, 40, 0.15));
    }
}
