//! The soak's report: every connection classified, the faults that were
//! injected, and the verdict.
//!
//! How a failed connection is judged: it is attributed to a backend by the
//! answer it got or, without one, by the datapath's connection-table entry
//! its SYN created (see `traffic`). A failure on the hard-flapped backend
//! is expected when that backend's process was gone while the connection
//! was open, or, for a connect that failed, within a second of its first
//! SYN (a dead backend's host refuses at once, so a connect that times out
//! later was not refused by the kill): the design keeps sending the backend
//! new connections until its health check notices (two failed probes), and
//! its open connections die with it. Every other failure with a backend is a failure on a healthy
//! backend, the health-flapped replica included (failing `/health` only
//! takes its weight away; it keeps serving). A failure with no backend at
//! all (the SYN was never balanced) is unattributed. The soak passes only
//! with no failure on a healthy backend and none unattributed.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Result;
use router::api::views::BackendView;
use serde::Serialize;

use super::{SoakOptions, Timeline, faults::ChurnStats, traffic::Outcome};

mod build;
mod classify;
mod text;

pub(crate) use build::build;
pub(crate) use classify::outcomes_csv;

use classify::Class;

/// A connect slower than this needed a SYN retransmit (the first one is
/// sent again after 1 s).
const SLOW_CONNECT: Duration = Duration::from_millis(900);
/// A SYN that goes unanswered is sent again after this long.
const SYN_RETRY: Duration = Duration::from_secs(1);
/// After a new daemon answers, how long its first health probes may take
/// to make backends routable again (see `slow_connects_after_restart`).
const AFTER_RESTART: Duration = Duration::from_secs(2);
/// Failures listed one by one in the report, and how many of them may be
/// expected ones.
const MAX_LISTED_FAILURES: usize = 100;
const MAX_LISTED_INJECTED: usize = 10;
const MAX_LISTED_SLOW: usize = 40;

pub(crate) struct Inputs<'a> {
    pub opts: &'a SoakOptions,
    pub t0: Instant,
    pub ended_at: Instant,
    pub outcomes: Vec<Outcome>,
    pub churn: ChurnStats,
    pub timeline: Timeline,
    pub views: Result<Vec<BackendView>>,
    pub reasons: Vec<(String, u64)>,
    pub interrupted: bool,
    pub fatal: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub attempted: u64,
    pub completed: u64,
    pub failed: u64,
    pub failed_on_healthy_backends: u64,
    pub failed_on_injected_faults: u64,
    pub failed_unattributed: u64,
}

impl Totals {
    fn add(&mut self, class: Class) {
        self.attempted += 1;
        match class {
            Class::Completed => self.completed += 1,
            Class::Healthy => self.failed_on_healthy_backends += 1,
            Class::Injected => self.failed_on_injected_faults += 1,
            Class::Unattributed => self.failed_unattributed += 1,
        }
        if class != Class::Completed {
            self.failed += 1;
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct BackendTotals {
    /// What the backend was put through: "hard flap", "health flap" or "".
    pub fault: String,
    pub completed: u64,
    pub failed_on_healthy_backend: u64,
    pub failed_on_injected_fault: u64,
    /// Of the failures, how many were attributed by the connection table
    /// (the rest by the backend's own answer).
    pub attributed_by_conn_table: u64,
    /// New connections the datapath sent it, over the whole run.
    pub datapath_new_conns: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Restarts {
    pub done: u64,
    pub sigterm: u64,
    pub sigkill: u64,
    /// New daemons that logged adopting the pinned datapath.
    pub adopted: u64,
    /// SIGTERMed daemons that did not exit 0.
    pub unclean_exits: u64,
    /// Per restart: old daemon stopped → new one answering.
    pub without_daemon_ms: Vec<u64>,
    /// Per restart, in words: when, how, how the old daemon ended.
    pub each: Vec<String>,
    /// Short connections made entirely while no daemon ran.
    pub completed_while_down: u64,
    /// Streams open across a whole daemon gap that completed.
    pub streams_across_restarts: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Churn {
    pub ticks: u64,
    pub late_ticks: u64,
    pub applied: u64,
    pub set: u64,
    pub auto: u64,
    pub refused_daemon_down: u64,
    pub errors: u64,
    pub first_errors: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Flaps {
    pub health: u64,
    /// Health flaps in which the daemon reported the backend unhealthy.
    pub health_seen_by_daemon: u64,
    pub hard: u64,
    pub hard_seen_by_daemon: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Flow {
    /// Longest stretch without a completed short connection.
    pub max_gap_ms: u64,
    /// When it began, seconds into the run.
    pub max_gap_at_s: f64,
    /// Whether it met a daemon gap or the 2 s after one.
    pub max_gap_near_restart: bool,
    pub connect_p50_ms: f64,
    pub connect_p99_ms: f64,
    pub connect_max_ms: f64,
    /// Connects that took a SYN retransmit (≥ 0.9 s)…
    pub slow_connects: u64,
    /// …of which started in a daemon gap or the 2 s after one.
    pub slow_connects_after_restart: u64,
    /// The first few slow connects: when, what, where to.
    pub slow_connect_list: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    pub at_s: f64,
    pub lasted_s: f64,
    pub kind: &'static str,
    pub backend: Option<String>,
    pub attributed_by: String,
    pub class: &'static str,
    pub error: String,
    /// A known cause, when the run's own records show one.
    pub note: Option<String>,
}

/// Everything a soak run measured. Serialised as report.json.
#[derive(Clone, Debug, Serialize)]
pub struct SoakReport {
    pub seed: u64,
    pub duration_s: f64,
    /// Clients bound their ports first (`SoakOptions::reuse_ports`).
    pub reuse_ports: bool,
    /// Whether the hard flap ran (`SoakOptions::hard_flap`).
    pub hard_flap: bool,
    pub interrupted: bool,
    /// Why the run ended early, if it did.
    pub fatal: Option<String>,
    pub connections: Totals,
    pub by_kind: BTreeMap<&'static str, Totals>,
    pub by_backend: BTreeMap<String, BackendTotals>,
    pub restarts: Restarts,
    pub weight_churn: Churn,
    pub flaps: Flaps,
    pub flow: Flow,
    /// New connections the datapath counted, all backends.
    pub datapath_new_conns: Option<u64>,
    /// Mid-flow TCP packets without an entry that the datapath re-hashed
    /// into a flow (each counted as a new connection), over the whole run.
    #[serde(default)]
    pub datapath_lru_misses: u64,
    /// Packets the datapath dropped or passed to the stack, by reason
    /// (non-zero ones), over the whole run.
    pub datapath_drops_and_passes: BTreeMap<String, u64>,
    pub failures: Vec<Failure>,
    pub problems: Vec<String>,
}

fn ms(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

impl SoakReport {
    fn find_problems(&self, views_error: Option<String>) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(f) = &self.fatal {
            p.push(format!("the soak ended early: {f}"));
        }
        if self.interrupted {
            p.push("interrupted before its time".into());
        }
        let c = &self.connections;
        if c.completed == 0 {
            p.push("no connection completed".into());
        }
        if c.failed_on_healthy_backends > 0 {
            p.push(format!(
                "{} connections failed on healthy backends",
                c.failed_on_healthy_backends
            ));
        }
        if c.failed_unattributed > 0 {
            p.push(format!(
                "{} connections failed without reaching any backend",
                c.failed_unattributed
            ));
        }
        if self.weight_churn.errors > 0 {
            p.push(format!(
                "{} weight changes were refused by a running daemon: {:?}",
                self.weight_churn.errors, self.weight_churn.first_errors
            ));
        }
        if self.restarts.adopted < self.restarts.done {
            p.push(format!(
                "only {} of {} restarted daemons adopted the pinned datapath",
                self.restarts.adopted, self.restarts.done
            ));
        }
        if self.restarts.unclean_exits > 0 {
            p.push(format!(
                "{} daemons did not exit cleanly on SIGTERM",
                self.restarts.unclean_exits
            ));
        }
        if let Some(e) = views_error {
            p.push(format!(
                "could not read the daemon's backends at the end: {e}"
            ));
        }
        p
    }

    /// What went wrong; empty when the soak passed.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)? + "\n")
    }
}
