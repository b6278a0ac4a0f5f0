//! RESULTS.md's canary section: the rollback guard on a routing run.

use std::fmt::Write as _;

use anyhow::Result;
use serde_json::Value;

use super::{f, median, verdict};

const CANARY_FORMAT: u64 = 1;
/// The stable pool's p99 after the slowdown may be at most this multiple
/// of its p99 before it (the "unaffected", given that it takes the
/// canary's clients on after a trip).
pub(super) const STABLE_P99_TARGET: f64 = 1.2;

fn runs<'a>(doc: &'a Value, arm: &str) -> Vec<&'a Value> {
    doc["arms"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["arm"] == arm)
        .flat_map(|a| a["runs"].as_array().into_iter().flatten())
        .collect()
}

fn phase<'a>(run: &'a Value, name: &str) -> &'a Value {
    run["phases"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["phase"] == name))
        .unwrap_or(&Value::Null)
}

/// "median [min–max]" of the numbers among `v`, or "—".
fn spread(v: &[f64], digits: usize) -> String {
    let nums: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if nums.is_empty() {
        return "—".into();
    }
    let (lo, hi) = nums
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| {
            (l.min(x), h.max(x))
        });
    if nums.len() == 1 {
        format!("{:.digits$}", nums[0])
    } else {
        format!("{:.digits$} [{lo:.digits$}–{hi:.digits$}]", median(&nums))
    }
}

fn per_run(runs: &[&Value], pick: impl Fn(&Value) -> f64) -> Vec<f64> {
    runs.iter().map(|r| pick(r)).collect()
}

/// Stable's p99 `key` after the slowdown over its p99 in the healthy phase.
fn stable_ratio(run: &Value, key: &str) -> f64 {
    f(&phase(run, "after_slowdown")["stable"][key]) / f(&phase(run, "healthy")["stable"][key])
}

pub(super) fn canary_section(
    md: &mut String,
    head: &mut String,
    doc: Option<&Value>,
) -> Result<()> {
    writeln!(md, "## 3b. Canary rollback\n")?;
    let Some(doc) = doc else {
        writeln!(md, "Not run (no `canary.json`).\n")?;
        return Ok(());
    };
    if doc["format"].as_u64() != Some(CANARY_FORMAT) {
        writeln!(
            md,
            "Not recorded with this version of the benchmark; run `cargo xtask bench canary`.\n"
        )?;
        return Ok(());
    }
    let s = &doc["settings"];
    writeln!(
        md,
        "Four mock replicas of the routing suite's engine; pool `stable` holds three, `canary` \
         one ({}) and {}% of the clients by share. {:.1} streaming completions a second ({:.0}% \
         of the four replicas' capacity, the routing suite's lengths) from {} client addresses; \
         static equal weights, least-loaded selection. At {} s the canary's replica becomes \
         {}× as fast. Arm *guarded*: `guard = {{ ttft_p99_ratio = {}, min_connections = {} }}`; \
         arm *unguarded*: none. {} runs of {} s per arm, the same seeds for both; requests sent \
         in the first {} s are not counted. Figures are the median over runs, [min–max]; latency \
         is the client's, from `connect()`.\n",
        s["canary_replica"].as_str().unwrap_or("?"),
        s["canary_share"],
        f(&s["offered_rps"]),
        f(&s["load"]) * 100.0,
        s["clients"],
        s["slow_at_s"],
        s["slow_speed"],
        s["guard_ratio"],
        s["guard_min_connections"],
        s["seeds"],
        s["secs"],
        s["warmup_s"],
    )?;
    let (g, u) = (runs(doc, "guarded"), runs(doc, "unguarded"));
    let tripped = g.iter().filter(|r| r["trip"].is_object()).count();
    let row = |md: &mut String, name: &str, gv: String, uv: String| {
        writeln!(md, "| {name} | {gv} | {uv} |")
    };
    writeln!(md, "| measure | guarded | unguarded |\n|---|---|---|")?;
    row(
        md,
        "runs in which the guard tripped",
        format!("{tripped} of {}", g.len()),
        "—".into(),
    )?;
    row(
        md,
        "trip, seconds after the slowdown",
        spread(&per_run(&g, |r| f(&r["trip"]["after_slowdown_s"])), 1),
        "—".into(),
    )?;
    row(
        md,
        "the tripping verdict: canary's first-byte p99 / the others', ms (datapath)",
        format!(
            "{} / {}",
            spread(&per_run(&g, |r| f(&r["trip"]["p99_ms"])), 0),
            spread(&per_run(&g, |r| f(&r["trip"]["others_p99_ms"])), 0)
        ),
        "—".into(),
    )?;
    let sum =
        |rs: &[&Value], key: &str| rs.iter().map(|r| r[key].as_u64().unwrap_or(0)).sum::<u64>();
    row(
        md,
        "false trips before the slowdown (all runs)",
        sum(&g, "false_trips").to_string(),
        "—".into(),
    )?;
    row(
        md,
        "clients served by both pools before the slowdown (all runs)",
        sum(&g, "clients_in_two_pools_before_slowdown").to_string(),
        sum(&u, "clients_in_two_pools_before_slowdown").to_string(),
    )?;
    for (name, ph, pool, key) in [
        (
            "requests the canary served after the slowdown",
            "after_slowdown",
            "canary",
            "requests",
        ),
        (
            "all clients' TTFT p99 after the slowdown, ms",
            "after_slowdown",
            "all",
            "ttft_p99_ms",
        ),
        (
            "all clients' e2e p99 after the slowdown, ms",
            "after_slowdown",
            "all",
            "e2e_p99_ms",
        ),
        (
            "canary's TTFT p99 healthy, ms",
            "healthy",
            "canary",
            "ttft_p99_ms",
        ),
        (
            "canary's TTFT p99 after the slowdown, ms",
            "after_slowdown",
            "canary",
            "ttft_p99_ms",
        ),
        (
            "stable's TTFT p99 healthy, ms",
            "healthy",
            "stable",
            "ttft_p99_ms",
        ),
        (
            "stable's TTFT p99 after the slowdown, ms",
            "after_slowdown",
            "stable",
            "ttft_p99_ms",
        ),
        (
            "stable's e2e p99 healthy, ms",
            "healthy",
            "stable",
            "e2e_p99_ms",
        ),
        (
            "stable's e2e p99 after the slowdown, ms",
            "after_slowdown",
            "stable",
            "e2e_p99_ms",
        ),
    ] {
        let pick = |r: &Value| f(&phase(r, ph)[pool][key]);
        row(
            md,
            name,
            spread(&per_run(&g, pick), 0),
            spread(&per_run(&u, pick), 0),
        )?;
    }
    row(
        md,
        "failed requests (all runs)",
        sum(&g, "errors").to_string(),
        sum(&u, "errors").to_string(),
    )?;
    writeln!(
        md,
        "\nAfter a trip the stable pool takes the canary's clients too (72% → 80% of its \
         capacity at this load), which is what its p99 after the slowdown includes; the \
         unguarded arm shows the same pool without them. The raw runs, with every phase's \
         figures per pool, are in `canary.json`.\n"
    )?;
    writeln!(
        head,
        "| canary: guard trips on the slowed canary | {tripped} of {} runs, {} s after the slowdown | every run, no false trip | {} |",
        g.len(),
        spread(&per_run(&g, |r| f(&r["trip"]["after_slowdown_s"])), 1),
        verdict(!g.is_empty() && tripped == g.len() && sum(&g, "false_trips") == 0)
    )?;
    for (key, what) in [("ttft_p99_ms", "TTFT"), ("e2e_p99_ms", "e2e")] {
        let ratios = per_run(&g, |r| stable_ratio(r, key));
        let m = median(&ratios);
        writeln!(
            head,
            "| canary: stable pool's {what} p99 after the slowdown / before (guarded) | {}× | ≤ {STABLE_P99_TARGET}× | {} |",
            spread(&ratios, 2),
            verdict(m <= STABLE_P99_TARGET)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn spread_is_median_and_range() {
        assert_eq!(spread(&[3.0, 1.0, 2.0], 1), "2.0 [1.0–3.0]");
        assert_eq!(spread(&[5.0], 0), "5");
        assert_eq!(spread(&[f64::NAN], 0), "—");
    }

    #[test]
    fn the_section_counts_trips_and_judges_the_stable_pool() {
        let phase = |name: &str, stable_p99: f64| {
            json!({ "phase": name, "stable": { "ttft_p99_ms": stable_p99, "e2e_p99_ms": stable_p99 },
                    "canary": { "requests": 3 }, "all": {} })
        };
        let run = |trip: Value, after: f64| {
            json!({ "trip": trip, "false_trips": 0, "clients_in_two_pools_before_slowdown": 0, "errors": 0,
                    "phases": [phase("healthy", 100.0), phase("after_slowdown", after)] })
        };
        let doc = json!({
            "format": 1,
            "settings": { "canary_share": 10 },
            "arms": [
                { "arm": "guarded", "runs": [
                    run(json!({ "after_slowdown_s": 4.0 }), 100.0),
                    run(json!({ "after_slowdown_s": 6.0 }), 120.0),
                ]},
                { "arm": "unguarded", "runs": [run(Value::Null, 100.0)] },
            ],
        });
        let (mut md, mut head) = (String::new(), String::new());
        canary_section(&mut md, &mut head, Some(&doc)).unwrap();
        assert!(
            md.contains("| runs in which the guard tripped | 2 of 2 | — |"),
            "{md}"
        );
        assert!(
            head.contains("2 of 2 runs, 5.0 [4.0–6.0] s after the slowdown"),
            "{head}"
        );
        assert!(
            head.contains("| 1.10 [1.00–1.20]× | ≤ 1.2× | met |"),
            "{head}"
        );
        let (mut md, mut head) = (String::new(), String::new());
        canary_section(&mut md, &mut head, None).unwrap();
        assert!(md.contains("Not run") && head.is_empty());
    }
}
