//! The control API's wire types and the views built from them: what the
//! daemon serves, the CLI and `router top` read, and `/metrics` exports.
//! Nothing here does I/O except the client; the servers live in `server`.

pub mod client;
pub mod views;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{datapath::DatapathStatus, telemetry::Reading};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatusReply {
    pub config: String,
    pub uptime_secs: u64,
    pub last_reload: Option<ReloadReply>,
    pub datapath: DatapathStatus,
    /// Per backend: weight, reason, telemetry and health as the policy sees them.
    pub policy: Vec<BackendPolicyStatus>,
    /// Policy ticks on which every healthy backend of a service was saturated.
    pub all_saturated_ticks: u64,
    /// New connections sent to fallback services' backends, in total.
    pub fallback_connections: u64,
    /// Health probes that failed on a local error (the daemon out of
    /// sockets) and so changed no backend's verdict.
    #[serde(default)]
    pub health_local_errors: u64,
    /// Health probes finished since the daemon started, whatever their
    /// result.
    #[serde(default)]
    pub health_probes_done: u64,
    /// Times the policy has run (one per telemetry poll round, and one per
    /// operator override or reload): the clock `telemetry_tick` and
    /// `last_change_tick` count in, so a test can say "within two ticks"
    /// instead of timing the daemon.
    #[serde(default)]
    pub policy_ticks: u64,
    /// Telemetry poll rounds finished (every source read once, the results
    /// handed to the policy) since the daemon started.
    #[serde(default)]
    pub telemetry_polls_done: u64,
    /// Pools of every pooled service, as the control loop holds them.
    #[serde(default)]
    pub pools: Vec<PoolStatus>,
    /// The flow hash's key and every live table, hashed (see
    /// `datapath::Datapath::table_fingerprint`): equal on ingress nodes that
    /// place new Maglev flows alike. Only `GET /v1/status` computes it.
    #[serde(default)]
    pub table_fingerprint: Option<String>,
    /// The BGP speaker's sessions and announced VIPs; `None` without `[bgp]`.
    #[serde(default)]
    pub bgp: Option<crate::bgp::BgpStatus>,
}

/// A pool as the control loop holds it: share, room, fallback, guard.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PoolStatus {
    pub service: String,
    pub name: String,
    /// Percent of new connections from clients no segment matches.
    pub share: u32,
    /// The share the config gives it (`share` differs after `pool set`,
    /// `canary promote|rollback` or a guard's rollback).
    pub configured_share: u32,
    pub backends: Vec<String>,
    pub fallback: Option<String>,
    /// Client networks routed to this pool.
    pub segments: Vec<String>,
    /// Every backend saturated, unhealthy or drained at the last tick: new
    /// connections go to the fallback.
    pub no_room: bool,
    pub guard: Option<GuardStatus>,
}

/// A pool's rollback guard: its setting, and what it last judged.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GuardStatus {
    pub ttft_p99_ratio: f64,
    pub min_connections: u64,
    /// Times the guard set the pool's share to 0.
    pub trips: u64,
    /// The last window judged: the pool's first-byte p99 against the
    /// other pools', in ms, over this many of the pool's connections.
    pub last_p99_ms: Option<f64>,
    pub last_others_p99_ms: Option<f64>,
    pub last_connections: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReloadReply {
    pub ok: bool,
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainQuery {
    /// Seconds from now after which the backend's remaining flows are ended.
    pub deadline_secs: Option<u64>,
}

/// Per-backend telemetry bookkeeping, exported in status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TelemetryStats {
    pub polls: u64,
    /// Source errors: unreachable, timeout, HTTP status, NVML error.
    pub errors: u64,
    /// Of `errors`, polls that missed their deadline: on a busy machine a
    /// healthy endpoint can too, so they are told apart from the others.
    #[serde(default)]
    pub timeouts: u64,
    /// Readings rejected by validation (garbage never becomes a weight).
    pub invalid: u64,
    pub last_error: Option<String>,
}

/// What one backend looks like to an operator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendPolicyStatus {
    pub service: String,
    pub backend: String,
    pub weight: u32,
    pub mode: BackendMode,
    pub reason: String,
    /// `reason` without its figures (`Reason::label`), for metric labels.
    #[serde(default)]
    pub reason_label: String,
    pub load: Option<f64>,
    pub saturated: bool,
    pub stale: bool,
    pub healthy: Option<bool>,
    pub telemetry_source: Option<String>,
    pub telemetry: Option<Reading>,
    pub telemetry_age_ms: Option<u64>,
    pub stats: TelemetryStats,
    pub weight_changes: u64,
    pub last_change: Option<String>,
    /// The policy tick (`StatusReply::policy_ticks`) on which the weight
    /// last changed.
    #[serde(default)]
    pub last_change_tick: Option<u64>,
    /// The policy tick that took in `telemetry` (the reading's age in
    /// ticks, as `telemetry_age_ms` is its age in time).
    #[serde(default)]
    pub telemetry_tick: Option<u64>,
    /// From the config, for per-route cost.
    pub cost_per_hour: Option<f64>,
    pub drain_deadline_unix: Option<u64>,
    pub flows_ended: Option<u64>,
}

/// An operator's runtime override of one backend (control API), kept
/// across reloads while the backend exists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Override {
    /// Pinned weight, instead of the config's or the policy's.
    pub weight: Option<u32>,
    /// Weight 0 for new connections; established ones finish.
    pub drain: bool,
    /// When set (Unix seconds), the drained backend's remaining flows are
    /// ended at this time, so the replica can be taken down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_deadline_unix: Option<u64>,
    /// Connections ended when the deadline passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows_ended: Option<u64>,
}

/// Where a backend's weight comes from, as operators see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendMode {
    /// The policy sets it from telemetry and the datapath's measurements.
    Auto,
    /// The config fixes it (`weight = N`).
    Pinned,
    /// An operator's override fixes it.
    Manual,
    /// Draining: weight 0 for new connections; established ones finish.
    Drain,
    /// No policy entry (a fallback service's backend): the datapath's weight.
    Static,
}

impl BackendMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendMode::Auto => "auto",
            BackendMode::Pinned => "pinned",
            BackendMode::Manual => "manual",
            BackendMode::Drain => "drain",
            BackendMode::Static => "static",
        }
    }
}

impl fmt::Display for BackendMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// What an operator asks of one backend through the control API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverrideChange {
    /// Pin the weight.
    Weight(u32),
    /// Back to the config's or the policy's weight.
    AutoWeight,
    /// Weight 0 for new flows; those left are ended `deadline_secs` from
    /// now, if given.
    Drain {
        deadline_secs: Option<u64>,
    },
    Undrain,
}

impl OverrideChange {
    /// Applies the change at `now_unix` (drain deadlines are wall-clock).
    pub fn apply(self, o: &mut Override, now_unix: u64) -> Result<(), OverrideError> {
        match self {
            OverrideChange::Weight(w) => o.weight = Some(w),
            OverrideChange::AutoWeight => o.weight = None,
            OverrideChange::Drain { deadline_secs } => {
                let deadline = match deadline_secs {
                    Some(d) => Some(
                        now_unix
                            .checked_add(d)
                            .ok_or(OverrideError::DeadlineTooLarge(d))?,
                    ),
                    None => None,
                };
                o.drain = true;
                o.drain_deadline_unix = deadline;
                o.flows_ended = None;
            }
            OverrideChange::Undrain => {
                o.drain = false;
                o.drain_deadline_unix = None;
                o.flows_ended = None;
            }
        }
        Ok(())
    }
}

/// Why an override was refused; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum OverrideError {
    #[error("no service named {0:?}")]
    NoService(String),
    #[error("service {service:?} has no backend named {backend:?}")]
    NoBackend { service: String, backend: String },
    #[error("deadline_secs {0} is too large")]
    DeadlineTooLarge(u64),
    #[error("the controller is not running")]
    NotRunning,
    #[error("writing weights to the datapath: {0}")]
    Datapath(#[source] crate::datapath::DatapathError),
    #[error(transparent)]
    Pool(#[from] crate::pools::PoolError),
}

/// Percent-encodes a name for one path segment of the control API.
pub fn path_segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
