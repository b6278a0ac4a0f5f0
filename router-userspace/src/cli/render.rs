//! The human rendering of `router status`.

use std::fmt::Write;

use crate::api::StatusReply;

pub fn render(s: &StatusReply) -> String {
    let mut out = String::new();
    let dp = &s.datapath;
    let _ = writeln!(
        out,
        "router: config {}, up {}s, attached to {}",
        s.config,
        s.uptime_secs,
        if dp.interfaces.is_empty() {
            "nothing".to_string()
        } else {
            dp.interfaces.join(", ")
        }
    );
    if let Some(f) = &s.table_fingerprint {
        let _ = writeln!(
            out,
            "table fingerprint: {f} (flow hash key and live tables; equal on nodes that place alike)"
        );
    }
    if let Some(b) = &s.bgp {
        let sessions: Vec<String> = b
            .sessions
            .iter()
            .map(|p| format!("{} (AS {}) {}", p.peer, p.peer_as, p.state))
            .collect();
        let _ = writeln!(
            out,
            "bgp: AS {}, router id {}; sessions: {}; announced: {}",
            b.local_as,
            b.router_id,
            if sessions.is_empty() {
                "none".into()
            } else {
                sessions.join(", ")
            },
            if b.announced.is_empty() {
                "nothing".into()
            } else {
                b.announced.join(", ")
            }
        );
    }
    if let Some(r) = &s.last_reload {
        let _ = writeln!(
            out,
            "last reload: {} ({})",
            if r.ok { "ok" } else { "refused" },
            r.message
        );
    }
    for svc in &dp.services {
        let _ = writeln!(
            out,
            "\nservice {}  {}/{}  snat {}  table {}  new conns {}  packets {}  bytes {}",
            svc.name,
            svc.vip,
            svc.protocol,
            svc.snat.join(","),
            svc.table_size,
            svc.counters.new_conns,
            svc.counters.packets,
            svc.counters.bytes
        );
        let total_w: u64 = svc.backends.iter().map(|b| u64::from(b.weight)).sum();
        let _ = writeln!(
            out,
            "  {:<14} {:<22} {:>7} {:>7} {:>7} {:>10} {:>10} {:>12}",
            "BACKEND", "ADDRESS", "WEIGHT", "SHARE", "SLOTS", "NEW CONNS", "PACKETS", "BYTES"
        );
        for b in &svc.backends {
            let share = if total_w == 0 {
                0.0
            } else {
                100.0 * f64::from(b.weight) / total_w as f64
            };
            let _ = writeln!(
                out,
                "  {:<14} {:<22} {:>7} {:>6.1}% {:>7} {:>10} {:>10} {:>12}",
                b.name,
                b.address,
                b.weight,
                share,
                b.slots,
                b.counters.new_conns,
                b.counters.packets,
                b.counters.bytes
            );
        }
    }
    if !s.policy.is_empty() {
        let _ = writeln!(
            out,
            "\npolicy ({} all-saturated ticks, {} fallback connections)\n  {:<10} {:<14} {:<6} {:>6} {:>6} {:<8} {:<26} TELEMETRY",
            s.all_saturated_ticks,
            s.fallback_connections,
            "SERVICE",
            "BACKEND",
            "MODE",
            "WEIGHT",
            "LOAD",
            "HEALTH",
            "REASON",
        );
        for p in &s.policy {
            let load = p
                .load
                .map_or("-".to_string(), |l| format!("{:.0}%", l * 100.0));
            let health = match p.healthy {
                None => "-",
                Some(true) => "up",
                Some(false) => "down",
            };
            let telemetry = match (&p.telemetry_source, &p.stats.last_error, p.telemetry_age_ms) {
                (None, _, _) => "none".to_string(),
                (Some(src), Some(err), _) => format!("{src}: {err}"),
                (Some(src), None, Some(age)) => format!("{src} ({age} ms ago)"),
                (Some(src), None, None) => format!("{src} (no reading yet)"),
            };
            let _ = writeln!(
                out,
                "  {:<10} {:<14} {:<6} {:>6} {:>6} {:<8} {:<26} {}",
                p.service, p.backend, p.mode, p.weight, load, health, p.reason, telemetry
            );
        }
    }
    if s.health_local_errors > 0 {
        let _ = writeln!(
            out,
            "\nhealth: {} probes failed on local errors (the daemon out of sockets?); \
             they changed no verdict",
            s.health_local_errors
        );
    }
    let nonzero: Vec<String> = dp
        .reasons
        .iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let _ = writeln!(
        out,
        "\ncounters: {}",
        if nonzero.is_empty() {
            "all zero".to_string()
        } else {
            nonzero.join(" ")
        }
    );
    out
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"))
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.0}%", v * 100.0))
}

fn health(h: Option<bool>) -> &'static str {
    match h {
        Some(true) => "up",
        Some(false) => "DOWN",
        None => "-",
    }
}

/// `router services`: one line per service.
pub fn render_services(services: &[crate::api::views::ServiceView]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:<22} {:>8} {:>8} {:>9} {:>8} {:>10} {:>9} {:>8} {:>9}",
        "SERVICE",
        "VIP",
        "BACKENDS",
        "HEALTHY",
        "SATURATED",
        "ACTIVE",
        "NEW CONNS",
        "CONN/S",
        "$/HOUR",
        "$/1K CONN"
    );
    for s in services {
        let _ = writeln!(
            out,
            "{:<14} {:<22} {:>8} {:>8} {:>9} {:>8} {:>10} {:>9} {:>8} {:>9}",
            s.name,
            format!("{}/{}", s.vip, s.protocol),
            s.backends,
            s.healthy_backends,
            s.saturated_backends,
            s.active_connections
                .map_or_else(|| "-".into(), |n| n.to_string()),
            s.counters.new_conns,
            opt(s.new_conns_per_sec, 1),
            opt(s.cost_per_hour, 2),
            opt(s.cost_per_1k_connections, 4),
        );
    }
    out
}

/// `router pools`: one line per pool, then its fallback connections and
/// guard, if any.
pub fn render_pools(pools: &[crate::api::views::PoolView]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<10} {:>6} {:>4} {:>9} {:>10} {:>8} {:>9} {:>8} {:>9} {:>9} {:>9}  BACKENDS",
        "SERVICE",
        "POOL",
        "SHARE",
        "ROOM",
        "IN FLIGHT",
        "NEW CONNS",
        "CONN/S",
        "FALLBACK",
        "$/HOUR",
        "$/1K CONN",
        "TTFT P50",
        "TTFT P99",
    );
    for p in pools {
        let share = if p.share == p.configured_share {
            format!("{}%", p.share)
        } else {
            format!("{}%*", p.share)
        };
        let _ = writeln!(
            out,
            "{:<12} {:<10} {:>6} {:>4} {:>9} {:>10} {:>8} {:>9} {:>8} {:>9} {:>9} {:>9}  {}",
            p.service,
            p.name,
            share,
            if p.no_room { "no" } else { "yes" },
            p.in_flight,
            p.new_connections,
            opt(p.new_conns_per_sec, 1),
            p.fallback_rate
                .map_or_else(|| "-".into(), |r| format!("{:.1}%", r * 100.0)),
            opt(p.cost_per_hour, 2),
            opt(p.cost_per_1k_connections, 4),
            p.first_byte_p50_ms
                .map_or_else(|| "-".into(), |v| format!("{v:.1}ms")),
            p.first_byte_p99_ms
                .map_or_else(|| "-".into(), |v| format!("{v:.1}ms")),
            p.backends.join(","),
        );
        if let Some(fb) = &p.fallback {
            let spilled: Vec<String> = p
                .fallback_connections
                .iter()
                .map(|(to, n)| format!("{n} to {to}"))
                .collect();
            let _ = writeln!(
                out,
                "{:<24}falls back to {fb}; spilled {}",
                "",
                if spilled.is_empty() {
                    "none".to_string()
                } else {
                    spilled.join(", ")
                }
            );
        }
        if !p.segments.is_empty() {
            let _ = writeln!(out, "{:<24}segments {}", "", p.segments.join(", "));
        }
        if let Some(g) = &p.guard {
            let last = match (g.last_p99_ms, g.last_others_p99_ms) {
                (Some(a), Some(b)) => format!(
                    "; last window {a:.1} ms against {b:.1} ms over {} connections",
                    g.last_connections
                ),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "{:<24}guard: p99 above {}× the others after {} connections; tripped {} times{last}",
                "", g.ttft_p99_ratio, g.min_connections, g.trips
            );
        }
    }
    if pools.iter().any(|p| p.share != p.configured_share) {
        let _ = writeln!(out, "* set at run time; the config says otherwise");
    }
    out
}

/// `router backends` (and `router top` without a terminal): one line per backend.
pub fn render_backends(backends: &[crate::api::views::BackendView]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:<12} {:>6} {:>6} {:>5} {:>5} {:>4} {:>9} {:>5} {:>7} {:>6} {:>9} {:>9} {:<6} MODE/REASON",
        "SERVICE",
        "BACKEND",
        "WEIGHT",
        "SHARE",
        "GPU",
        "KV",
        "SAT",
        "IN FLIGHT",
        "ROOM",
        "ACTIVE",
        "CONN/S",
        "TTFB P50",
        "TTFB P99",
        "HEALTH",
    );
    for b in backends {
        let _ = writeln!(
            out,
            "{:<10} {:<12} {:>6} {:>5.1}% {:>5} {:>5} {:>4} {:>9} {:>5} {:>7} {:>6} {:>9} {:>9} {:<6} {}/{}",
            b.service,
            b.name,
            b.weight,
            b.share * 100.0,
            pct(b.gpu_util),
            pct(b.kv_cache_usage),
            if b.saturated { "yes" } else { "no" },
            b.in_flight,
            if b.max_in_flight == 0 {
                "-".to_string()
            } else {
                b.max_in_flight.to_string()
            },
            b.active_connections
                .map_or_else(|| "-".into(), |n| n.to_string()),
            opt(b.new_conns_per_sec, 1),
            b.first_byte_p50_ms
                .map_or_else(|| "-".into(), |v| format!("{v:.1}ms")),
            b.first_byte_p99_ms
                .map_or_else(|| "-".into(), |v| format!("{v:.1}ms")),
            health(b.healthy),
            b.mode,
            b.reason,
        );
    }
    out
}
