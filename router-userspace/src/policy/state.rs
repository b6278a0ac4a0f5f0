//! What the policy remembers about one backend between ticks. Owns the
//! load memory (EWMA, saturation with hysteresis) and episode markers
//! (readiness, staleness); must never decide weights.

use std::time::Duration;

use super::{
    PolicyConfig,
    capacity::{LearnedLimit, SpeedEstimate},
    signal,
};

/// A stretch of stale telemetry: when it began and the weight it holds
/// before decaying.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct StaleEpisode {
    pub since: Duration,
    pub hold: u32,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct BackendState {
    /// Smoothed load; `None` until a reading arrives (again, after a
    /// health failure).
    pub ewma: Option<f64>,
    /// Timestamp of the last reading taken in; only later ones are new.
    pub last_when: Option<Duration>,
    /// Whether any reading was ever taken in; separates "never reported"
    /// from "went quiet".
    pub ever_reported: bool,
    /// Consecutive new readings at or above saturation.
    pub over_count: u32,
    pub saturated: bool,
    /// Start of the slow-start window: the first tick healthy with fresh
    /// telemetry.
    pub ready_at: Option<Duration>,
    pub stale: Option<StaleEpisode>,
    /// Weight given last tick; `None` for a backend not seen before.
    pub weight: Option<u32>,
    /// Capacity mode: completions per flow in flight, from the datapath.
    pub speed: SpeedEstimate,
    /// Capacity mode: the batch the engine runs at most, from telemetry.
    pub limit: LearnedLimit,
    /// Capacity mode: the last weight came from the slow-start ramp.
    pub ramped: bool,
}

impl BackendState {
    /// Takes in one new reading's raw load.
    pub fn ingest(&mut self, when: Duration, raw: f64, cfg: &PolicyConfig) {
        let smoothed = signal::ewma(self.ewma, raw, cfg.ewma_alpha);
        self.ewma = Some(smoothed);
        self.last_when = Some(when);
        self.ever_reported = true;
        self.over_count = if raw >= cfg.saturation {
            self.over_count.saturating_add(1)
        } else {
            0
        };
        // Entry looks at the raw readings too: the EWMA alone would take
        // several polls to cross the threshold, and a saturated replica
        // queues every new request meanwhile. Requiring consecutive raw
        // readings keeps a single spike from dumping the backend.
        if !self.saturated
            && (smoothed >= cfg.saturation || self.over_count >= cfg.saturation_confirm)
        {
            self.saturated = true;
        }
        let exit = cfg.saturation - cfg.hysteresis;
        if self.saturated && raw < exit && smoothed < exit {
            self.saturated = false;
        }
    }

    /// Forgets load and episodes: after a health failure the replica may
    /// have restarted, and its old load says nothing about the new one.
    pub fn reset_after_failure(&mut self) {
        *self = BackendState {
            ever_reported: self.ever_reported,
            weight: self.weight,
            ..BackendState::default()
        };
    }
}
