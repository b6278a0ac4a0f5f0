//! The report as text: the summary for a terminal and `bench/soak.md`.

use super::classify::Class;
use super::{Failure, SoakReport};

impl SoakReport {
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
                "  datapath: {n} new connections balanced (clients attempted {}); {} mid-flow packets re-hashed (lru_miss)\n",
                c.attempted, self.datapath_lru_misses
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
