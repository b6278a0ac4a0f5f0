//! Building the report from what the soak's threads recorded.

use std::{collections::BTreeMap, time::Instant};

use super::classify::{Class, classify, reused_after_reset};
use super::{
    AFTER_RESTART, BackendTotals, Churn, Failure, Flaps, Flow, Inputs, MAX_LISTED_FAILURES,
    MAX_LISTED_INJECTED, MAX_LISTED_SLOW, Restarts, SLOW_CONNECT, SoakReport, Totals, ms, quantile,
};
use crate::soak::{
    BACKENDS, HARD_FLAP, HEALTH_FLAP, Window,
    traffic::{Outcome, Via},
};

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
        datapath_lru_misses: reasons
            .iter()
            .find(|(r, _)| r == "lru_miss")
            .map_or(0, |(_, n)| *n),
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
