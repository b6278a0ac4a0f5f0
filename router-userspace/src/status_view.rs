//! The human rendering of `router status`.

use std::fmt::Write;

use crate::control::StatusReply;

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
