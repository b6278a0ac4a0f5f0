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
use router::views::BackendView;
use serde::Serialize;

use super::{
    BACKENDS, HARD_FLAP, HEALTH_FLAP, SoakOptions, Timeline, Window,
    faults::ChurnStats,
    traffic::{Outcome, Via},
};

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
    /// Packets the datapath dropped or passed to the stack, by reason
    /// (non-zero ones), over the whole run.
    pub datapath_drops_and_passes: BTreeMap<String, u64>,
    pub failures: Vec<Failure>,
    pub problems: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Completed,
    Healthy,
    Injected,
    Unattributed,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::Completed => "completed",
            Class::Healthy => "failed on a healthy backend",
            Class::Injected => "failed on an injected fault",
            Class::Unattributed => "failed, unattributed",
        }
    }
}

fn classify(o: &Outcome, tl: &Timeline) -> Class {
    if o.error.is_none() {
        return Class::Completed;
    }
    // When the fault must have struck for it to explain this failure. A
    // connect is decided by its first SYN (or the retransmit a second
    // later): a dead backend's host answers it with a reset at once, so a
    // connect that only timed out seconds later was not refused by a kill
    // that came after its SYNs. An open connection can be cut at any time.
    let until = if o.connect.is_none() {
        o.end.min(o.start + SYN_RETRY)
    } else {
        o.end
    };
    match &o.backend {
        None => Class::Unattributed,
        Some(b)
            if b == BACKENDS[HARD_FLAP].name
                && tl.hard_down.iter().any(|w| w.overlaps(o.start, until)) =>
        {
            Class::Injected
        }
        Some(_) => Class::Healthy,
    }
}

/// `o` reused the 4-tuple of `previous`, which a backend had refused or
/// reset: the datapath may still hold that flow's entries.
fn reused_after_reset(previous: &Outcome, o: &Outcome, at: &dyn Fn(Instant) -> f64) -> String {
    format!(
        "reused the 4-tuple of a connection that {} refused or reset {:.1} s earlier (t={:.1}s): \
         a SYN on that 4-tuple meets the old flow's connection-table entries",
        previous.backend.as_deref().unwrap_or("a backend"),
        o.start
            .saturating_duration_since(previous.end)
            .as_secs_f64(),
        at(previous.start)
    )
}

/// One line per connection, in start order, for a look at what happened
/// when: start and end (seconds into the run), kind, backend, how it was
/// attributed, connect time, class and error.
pub(crate) fn outcomes_csv(t0: Instant, outcomes: &[Outcome], tl: &Timeline) -> String {
    let at = |t: Instant| t.saturating_duration_since(t0).as_secs_f64();
    let mut sorted: Vec<&Outcome> = outcomes.iter().collect();
    sorted.sort_by_key(|o| o.start);
    let mut s = String::from("start_s,end_s,kind,port,backend,via,connect_ms,class,error\n");
    for o in sorted {
        let via = match &o.via {
            Via::Answer => "answer".to_owned(),
            Via::ConnTable(reply) => format!("conn_table: {reply}"),
            Via::Nothing => "nothing".to_owned(),
            Via::LookupFailed(_) => "lookup_failed".to_owned(),
        };
        s.push_str(&format!(
            "{:.3},{:.3},{},{},{},\"{}\",{},{},\"{}\"\n",
            at(o.start),
            at(o.end),
            o.kind.name(),
            o.port.map_or(String::new(), |p| p.to_string()),
            o.backend.as_deref().unwrap_or(""),
            via.replace('"', "'"),
            o.connect.map_or(String::new(), |c| format!(
                "{:.1}",
                c.as_secs_f64() * 1000.0
            )),
            classify(o, tl).name(),
            o.error.as_deref().unwrap_or("").replace('"', "'")
        ));
    }
    s
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

pub(crate) fn build(i: Inputs<'_>) -> SoakReport {
    let Inputs {
        opts,
        t0,
        ended_at,
        mut outcomes,
        churn,
        timeline: tl,
        views,
        reasons,
        interrupted,
        fatal,
    } = i;
    outcomes.sort_by_key(|o| o.start);
    let at = |t: Instant| t.saturating_duration_since(t0).as_secs_f64();

    let mut connections = Totals::default();
    let mut by_kind: BTreeMap<&'static str, Totals> = BTreeMap::new();
    let mut by_backend: BTreeMap<String, BackendTotals> = BACKENDS
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let fault = match i {
                HARD_FLAP if opts.hard_flap => "hard flap",
                HEALTH_FLAP => "health flap",
                _ => "",
            };
            (
                b.name.to_owned(),
                BackendTotals {
                    fault: fault.to_owned(),
                    ..BackendTotals::default()
                },
            )
        })
        .collect();
    let mut failures = Vec::new();
    let mut injected_listed = 0;
    // The last connection on each 4-tuple (service, client port) that a
    // backend refused or reset.
    let mut last_reset: BTreeMap<(bool, u16), &Outcome> = BTreeMap::new();
    for o in &outcomes {
        let key = o.port.map(|p| (o.kind.is_web(), p));
        let previous = key.and_then(|k| last_reset.get(&k).copied());
        if let Some(k) = key
            && o.error
                .as_deref()
                .is_some_and(|e| e.contains("refused") || e.contains("reset"))
        {
            last_reset.insert(k, o);
        }
        let class = classify(o, &tl);
        connections.add(class);
        by_kind.entry(o.kind.name()).or_default().add(class);
        if let Some(b) = &o.backend {
            let bt = by_backend.entry(b.clone()).or_default();
            match class {
                Class::Completed => bt.completed += 1,
                Class::Healthy => bt.failed_on_healthy_backend += 1,
                Class::Injected => bt.failed_on_injected_fault += 1,
                Class::Unattributed => {}
            }
            if class != Class::Completed && matches!(o.via, Via::ConnTable(_)) {
                bt.attributed_by_conn_table += 1;
            }
        }
        // Every unexpected failure (up to a bound), a few expected ones.
        let listed = match class {
            Class::Completed => false,
            Class::Injected => {
                injected_listed += 1;
                injected_listed <= MAX_LISTED_INJECTED
            }
            Class::Healthy | Class::Unattributed => failures.len() < MAX_LISTED_FAILURES,
        };
        if listed {
            failures.push(Failure {
                at_s: at(o.start),
                lasted_s: o.end.saturating_duration_since(o.start).as_secs_f64(),
                kind: o.kind.name(),
                backend: o.backend.clone(),
                attributed_by: match &o.via {
                    Via::Answer => "answer".into(),
                    Via::ConnTable(reply) => format!("connection table ({reply})"),
                    Via::Nothing => "nothing".into(),
                    Via::LookupFailed(e) => format!("lookup failed: {e}"),
                },
                class: class.name(),
                error: o.error.clone().unwrap_or_default(),
                note: previous.map(|p| reused_after_reset(p, o, &at)),
            });
        }
    }

    let mut datapath_new_conns = None;
    if let Ok(views) = &views {
        let mut total = 0;
        for v in views {
            total += v.counters.new_conns;
            if let Some(bt) = by_backend.get_mut(&v.name) {
                bt.datapath_new_conns = Some(v.counters.new_conns);
            }
        }
        datapath_new_conns = Some(total);
    }

    let daemon_gaps: Vec<Window> = tl.restarts.iter().map(|r| r.down).collect();
    let near_restart = |start: Instant, end: Instant| {
        daemon_gaps.iter().any(|w| {
            let extended = Window {
                from: w.from,
                to: w.to.map(|t| t + AFTER_RESTART),
            };
            extended.overlaps(start, end)
        })
    };
    let inside_gap = |start: Instant, end: Instant| {
        daemon_gaps
            .iter()
            .any(|w| w.from <= start && w.to.is_some_and(|to| end <= to))
    };
    let across_gap = |start: Instant, end: Instant| {
        daemon_gaps
            .iter()
            .any(|w| start <= w.from && w.to.is_some_and(|to| to <= end))
    };
    let restarts = Restarts {
        done: tl.restarts.len() as u64,
        sigterm: tl.restarts.iter().filter(|r| r.signal == "SIGTERM").count() as u64,
        sigkill: tl.restarts.iter().filter(|r| r.signal == "SIGKILL").count() as u64,
        adopted: tl.restarts.iter().filter(|r| r.adopted).count() as u64,
        unclean_exits: tl.restarts.iter().filter(|r| !r.clean_exit).count() as u64,
        without_daemon_ms: tl
            .restarts
            .iter()
            .map(|r| r.down.to.map_or(0, |to| ms(to - r.down.from)))
            .collect(),
        each: tl
            .restarts
            .iter()
            .map(|r| {
                format!(
                    "t={:.1}s {}: old daemon {}; new one {} the pinned datapath",
                    at(r.down.from),
                    r.signal,
                    r.exit,
                    if r.adopted {
                        "adopted"
                    } else {
                        "did NOT adopt"
                    }
                )
            })
            .collect(),
        completed_while_down: outcomes
            .iter()
            .filter(|o| o.error.is_none() && !o.kind.is_stream() && inside_gap(o.start, o.end))
            .count() as u64,
        streams_across_restarts: outcomes
            .iter()
            .filter(|o| o.error.is_none() && o.kind.is_stream() && across_gap(o.start, o.end))
            .count() as u64,
    };

    // Progress of new connections: the completions of short ones, in time.
    let mut ends: Vec<Instant> = outcomes
        .iter()
        .filter(|o| o.error.is_none() && !o.kind.is_stream())
        .map(|o| o.end)
        .collect();
    ends.sort();
    let mut flow = Flow::default();
    if let Some(&first) = ends.first() {
        let mut prev = first;
        for &t in ends.iter().skip(1).chain(std::iter::once(&ended_at)) {
            let gap = t.saturating_duration_since(prev);
            if ms(gap) > flow.max_gap_ms {
                flow.max_gap_ms = ms(gap);
                flow.max_gap_at_s = at(prev);
                flow.max_gap_near_restart = near_restart(prev, t);
            }
            prev = prev.max(t);
        }
    }
    let mut connects: Vec<f64> = outcomes
        .iter()
        .filter_map(|o| o.connect.map(|c| c.as_secs_f64() * 1000.0))
        .collect();
    connects.sort_by(f64::total_cmp);
    flow.connect_p50_ms = quantile(&connects, 0.5);
    flow.connect_p99_ms = quantile(&connects, 0.99);
    flow.connect_max_ms = connects.last().copied().unwrap_or(0.0);
    for o in &outcomes {
        if o.connect.is_some_and(|c| c >= SLOW_CONNECT) {
            flow.slow_connects += 1;
            let after_restart = near_restart(o.start, o.start);
            if after_restart {
                flow.slow_connects_after_restart += 1;
            }
            if flow.slow_connect_list.len() < MAX_LISTED_SLOW {
                flow.slow_connect_list.push(format!(
                    "t={:.2}s {} to {} in {:.0} ms{}",
                    at(o.start),
                    o.kind.name(),
                    o.backend.as_deref().unwrap_or("-"),
                    o.connect.unwrap_or_default().as_secs_f64() * 1000.0,
                    if after_restart {
                        " (after a restart)"
                    } else {
                        ""
                    }
                ));
            }
        }
    }

    let weight_churn = Churn {
        ticks: churn.ticks,
        late_ticks: churn.late_ticks,
        applied: churn.set + churn.auto,
        set: churn.set,
        auto: churn.auto,
        refused_daemon_down: churn.daemon_down,
        errors: churn.errors,
        first_errors: churn.first_errors,
    };
    let flaps = Flaps {
        health: tl.health_failing.len() as u64,
        health_seen_by_daemon: tl.health_flaps_seen,
        hard: tl.hard_down.len() as u64,
        hard_seen_by_daemon: tl.hard_flaps_seen,
    };

    let mut report = SoakReport {
        seed: opts.seed,
        reuse_ports: opts.reuse_ports,
        hard_flap: opts.hard_flap,
        duration_s: ended_at.saturating_duration_since(t0).as_secs_f64(),
        interrupted,
        fatal,
        connections,
        by_kind,
        by_backend,
        restarts,
        weight_churn,
        flaps,
        flow,
        datapath_new_conns,
        datapath_drops_and_passes: reasons
            .into_iter()
            .filter(|(r, n)| *n > 0 && (r.starts_with("drop") || r.starts_with("pass")))
            .collect(),
        failures,
        problems: Vec::new(),
    };
    report.problems = report.find_problems(views.err().map(|e| format!("{e:#}")));
    report
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

    /// The figures, for a terminal.
    pub fn summary(&self) -> String {
        let c = &self.connections;
        let r = &self.restarts;
        let w = &self.weight_churn;
        let f = &self.flaps;
        let fl = &self.flow;
        let mut s = String::new();
        s.push_str(&format!(
            "soak: {:.0} s, seed {}{}\n",
            self.duration_s,
            self.seed,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            }
        ));
        s.push_str(&format!(
            "  connections: {} attempted, {} completed, {} failed: {} on healthy backends, \
             {} on injected faults, {} unattributed\n",
            c.attempted,
            c.completed,
            c.failed,
            c.failed_on_healthy_backends,
            c.failed_on_injected_faults,
            c.failed_unattributed
        ));
        for (kind, t) in &self.by_kind {
            s.push_str(&format!(
                "    {kind:<18} {:>6} attempted {:>6} completed {:>4} failed ({} healthy, {} injected, {} unattributed)\n",
                t.attempted,
                t.completed,
                t.failed,
                t.failed_on_healthy_backends,
                t.failed_on_injected_faults,
                t.failed_unattributed
            ));
        }
        for (name, b) in &self.by_backend {
            s.push_str(&format!(
                "    {name:<8} {:<12} {:>6} completed, {} failed healthy, {} failed injected; datapath new conns {}\n",
                b.fault,
                b.completed,
                b.failed_on_healthy_backend,
                b.failed_on_injected_fault,
                b.datapath_new_conns.map_or("?".into(), |n| n.to_string())
            ));
        }
        s.push_str(&format!(
            "  restarts: {} ({} SIGTERM, {} kill -9), {} adopted; without a daemon {:?} ms; \
             {} short connections completed while no daemon ran, {} streams open across a gap\n",
            r.done,
            r.sigterm,
            r.sigkill,
            r.adopted,
            r.without_daemon_ms,
            r.completed_while_down,
            r.streams_across_restarts
        ));
        s.push_str(&format!(
            "  weight churn: {} applied ({} set, {} auto) of {} ticks, {} refused while the daemon \
             restarted, {} errors, {} late ticks\n",
            w.applied, w.set, w.auto, w.ticks, w.refused_daemon_down, w.errors, w.late_ticks
        ));
        s.push_str(&format!(
            "  flaps: health {} (daemon saw {}), hard {} (daemon saw {})\n",
            f.health, f.health_seen_by_daemon, f.hard, f.hard_seen_by_daemon
        ));
        s.push_str(&format!(
            "  flow: longest stretch without a completed short connection {} ms at t={:.1}s{}; \
             connect p50 {:.1} ms, p99 {:.1} ms, max {:.0} ms; {} connects needed a SYN \
             retransmit ({} right after a restart)\n",
            fl.max_gap_ms,
            fl.max_gap_at_s,
            if fl.max_gap_near_restart {
                " (at a restart)"
            } else {
                ""
            },
            fl.connect_p50_ms,
            fl.connect_p99_ms,
            fl.connect_max_ms,
            fl.slow_connects,
            fl.slow_connects_after_restart
        ));
        if let Some(n) = self.datapath_new_conns {
            s.push_str(&format!(
                "  datapath: {n} new connections balanced (clients attempted {})\n",
                c.attempted
            ));
        }
        let mut listed: Vec<&Failure> = self.failures.iter().collect();
        listed.sort_by_key(|f| f.class == Class::Injected.name());
        if !self.datapath_drops_and_passes.is_empty() {
            s.push_str(&format!(
                "  datapath drops and passes: {:?}\n",
                self.datapath_drops_and_passes
            ));
        }
        for fail in listed.into_iter().take(12) {
            s.push_str(&format!(
                "  failure t={:.1}s {} on {} (by {}): {} — {}\n",
                fail.at_s,
                fail.kind,
                fail.backend.as_deref().unwrap_or("-"),
                fail.attributed_by,
                fail.class,
                fail.error
            ));
            if let Some(n) = &fail.note {
                s.push_str(&format!("      note: {n}\n"));
            }
        }
        if self.problems.is_empty() {
            s.push_str("soak: PASSED (no failure on a healthy backend, none unattributed)\n");
        } else {
            for p in &self.problems {
                s.push_str(&format!("soak: FAILED: {p}\n"));
            }
        }
        s
    }

    /// bench/soak.md: the method and the figures of this run.
    pub fn markdown(&self, command: &str, date: &str, machine: &str) -> String {
        let c = &self.connections;
        let r = &self.restarts;
        let w = &self.weight_churn;
        let f = &self.flaps;
        let fl = &self.flow;
        let mut s = String::new();
        s.push_str("# Soak\n\n");
        s.push_str(&format!(
            "`{command}`, {date}, commit `{}`, seed {}. {machine}\n\n",
            crate::report::source_commit(),
            self.seed
        ));
        let hard = if self.hard_flap {
            "`web-1` is killed (SIGKILL) every 20 s and started again 3 s later;"
        } else {
            "`web-1` is never killed (`--no-hard-flap`);"
        };
        let ports = if self.reuse_ports {
            "bind their port before connecting (`--reuse-ports`), so 4-tuples recur \
             within seconds"
        } else {
            "let the kernel pick their ports, as any client does (it cycles through \
             its range per destination)"
        };
        s.push_str(&format!(
            "What runs at once, in network namespaces against the real daemon \
             (`tests/bench/src/soak/`):\n\n\
             - two services: `web` (2 fixture HTTP backends, static weights, TCP health \
             checks) and `llama` (2 mock GPU replicas, weights from their vLLM metrics, \
             HTTP health checks), every probe each 500 ms, fall 2, rise 2;\n\
             - steady traffic from the client namespace: short connections (`GET /` and \
             2-token completions) and long streams (2–6 s `GET /stream`, 60–120-token \
             streamed completions);\n\
             - a random `weight set` (1–200) or `weight auto` every 100 ms through the \
             control API;\n\
             - `gpu-1`'s health check fails and recovers every 3 s (it keeps serving);\n\
             - {hard}\n\
             - the daemon is restarted every 15 s, SIGTERM and `kill -9` in turn, with \
             the datapath pinned and running alone in between.\n\n\
             Clients {ports}. A failure is attributed to the backend that answered or, without an answer, \
             to the one the datapath's connection table sent the flow to. It counts as \
             expected only on `web-1` while its process was gone (for a failed connect: \
             within a second of its first SYN); anywhere else it is a failure on a \
             healthy backend. The criterion is 0 of those and 0 failures \
             that reached no backend.\n\n"
        ));
        s.push_str("| measure | result |\n|---|---|\n");
        let rows = [
            ("duration", format!("{:.0} s", self.duration_s)),
            ("connections attempted", c.attempted.to_string()),
            ("completed", c.completed.to_string()),
            (
                "failed on healthy backends (criterion: 0)",
                c.failed_on_healthy_backends.to_string(),
            ),
            (
                "failed on injected faults (web-1 killed)",
                c.failed_on_injected_faults.to_string(),
            ),
            (
                "failed without reaching a backend (criterion: 0)",
                c.failed_unattributed.to_string(),
            ),
            (
                "daemon restarts",
                format!(
                    "{} ({} SIGTERM, {} kill -9), {} adopted the pinned datapath",
                    r.done, r.sigterm, r.sigkill, r.adopted
                ),
            ),
            (
                "time without a daemon per restart",
                format!(
                    "{} ms",
                    r.without_daemon_ms
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            (
                "short connections completed while no daemon ran",
                r.completed_while_down.to_string(),
            ),
            (
                "streams open across a daemon gap, completed",
                r.streams_across_restarts.to_string(),
            ),
            (
                "weight changes applied",
                format!(
                    "{} ({} set, {} auto); {} refused while the daemon restarted",
                    w.applied, w.set, w.auto, w.refused_daemon_down
                ),
            ),
            (
                "health flaps (seen by the daemon)",
                format!("{} ({})", f.health, f.health_seen_by_daemon),
            ),
            (
                "hard flaps (seen by the daemon)",
                format!("{} ({})", f.hard, f.hard_seen_by_daemon),
            ),
            (
                "longest stretch without a completed short connection",
                format!(
                    "{} ms{}",
                    fl.max_gap_ms,
                    if fl.max_gap_near_restart {
                        ", at a restart"
                    } else {
                        ""
                    }
                ),
            ),
            (
                "connect p50 / p99 / max",
                format!(
                    "{:.1} / {:.1} / {:.0} ms",
                    fl.connect_p50_ms, fl.connect_p99_ms, fl.connect_max_ms
                ),
            ),
            (
                "connects that needed a SYN retransmit",
                format!(
                    "{} ({} right after a restart)",
                    fl.slow_connects, fl.slow_connects_after_restart
                ),
            ),
            (
                "datapath drops and passes, by reason",
                if self.datapath_drops_and_passes.is_empty() {
                    "none".to_owned()
                } else {
                    self.datapath_drops_and_passes
                        .iter()
                        .map(|(r, n)| format!("{r} {n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            ),
            (
                "verdict",
                if self.passed() {
                    "passed".to_owned()
                } else {
                    format!("FAILED: {}", self.problems.join("; "))
                },
            ),
        ];
        for (k, v) in rows {
            s.push_str(&format!("| {k} | {v} |\n"));
        }
        s.push_str("\nPer kind:\n\n| kind | attempted | completed | failed: healthy | injected | unattributed |\n|---|---|---|---|---|---|\n");
        for (kind, t) in &self.by_kind {
            s.push_str(&format!(
                "| {kind} | {} | {} | {} | {} | {} |\n",
                t.attempted,
                t.completed,
                t.failed_on_healthy_backends,
                t.failed_on_injected_faults,
                t.failed_unattributed
            ));
        }
        s.push_str("\nPer backend:\n\n| backend | fault | completed | failed: healthy | injected | datapath new connections |\n|---|---|---|---|---|---|\n");
        for (name, b) in &self.by_backend {
            s.push_str(&format!(
                "| {name} | {} | {} | {} | {} | {} |\n",
                if b.fault.is_empty() { "—" } else { &b.fault },
                b.completed,
                b.failed_on_healthy_backend,
                b.failed_on_injected_fault,
                b.datapath_new_conns.map_or("?".into(), |n| n.to_string())
            ));
        }
        let unexpected: Vec<&Failure> = self
            .failures
            .iter()
            .filter(|f| f.class != Class::Injected.name())
            .collect();
        if !unexpected.is_empty() {
            s.push_str("\nUnexpected failures (the first 10):\n\n");
            for f in unexpected.iter().take(10) {
                s.push_str(&format!(
                    "- t={:.1} s, {} on {} (attributed by the {}): {}{}\n",
                    f.at_s,
                    f.kind,
                    f.backend.as_deref().unwrap_or("no backend"),
                    f.attributed_by,
                    f.error,
                    f.note.as_ref().map_or(String::new(), |n| format!("; {n}"))
                ));
            }
        }
        s.push_str("\nThe raw report is `bench/soak.json`.\n");
        s
    }
}
