//! A run's and a point's figures, and the settings, as `routing.json`
//! records them.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::setup::backend_name;
use super::stage::{RunOut, RunPlan};
use super::{
    BATCH_SLOWDOWN, CAPACITY_FORMULA, HEALTH_INTERVAL_MS, KV_TOKENS, LATE, LENGTHS, MAX_BATCH,
    REQUEST_TIMEOUT, RoutingSettings, SCRAPE_INTERVAL, SELECTION_KEY_SUPPORTED, SLOW, SPEEDS,
    STEP_MS, Scenario, mean_tokens, unit_capacity,
};
use crate::{
    loadgen::{self, Lengths},
    report::median,
};

/// Nearest-rank percentile; NaN without samples.
fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

pub(super) fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// A float for the JSON: null where it is not finite.
fn finite(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

/// Share (%) of the completed requests sent in [from, to) that `replica`
/// served; NaN when none completed.
fn share_pct(samples: &[&loadgen::StreamSample], replica: usize, from: f64, to: f64) -> f64 {
    let sent: Vec<_> = samples
        .iter()
        .filter(|x| x.sent_s >= from && x.sent_s < to)
        .collect();
    let mine = sent
        .iter()
        .filter(|x| x.replica == backend_name(replica))
        .count();
    if sent.is_empty() {
        f64::NAN
    } else {
        mine as f64 / sent.len() as f64 * 100.0
    }
}

/// One run's figures, over the requests sent in the measured window.
pub(super) fn run_json(plan: &RunPlan, r: &RunOut) -> Value {
    let window: Vec<&loadgen::StreamSample> = r
        .stream
        .samples
        .iter()
        .filter(|x| plan.in_window(x.sent_s))
        .collect();
    let ttft: Vec<f64> = window.iter().map(|x| x.ttft_ms).collect();
    let e2e: Vec<f64> = window.iter().map(|x| x.e2e_ms).collect();
    let mut served: BTreeMap<String, u64> = BTreeMap::new();
    for x in &window {
        *served.entry(x.replica.clone()).or_default() += 1;
    }
    let up: Vec<f64> = r.util.iter().copied().filter(|u| u.is_finite()).collect();
    let spread = up.iter().copied().fold(f64::NEG_INFINITY, f64::max)
        - up.iter().copied().fold(f64::INFINITY, f64::min);
    // The joining replica's share of what was sent in its cold period.
    let late_cold_share = plan
        .join_s
        .map(|j| share_pct(&window, LATE, j, j + plan.cold_secs));
    let errors_in_window = r
        .stream
        .error_sent_s
        .iter()
        .filter(|t| plan.in_window(**t))
        .count();
    json!({
        "seed": plan.seed,
        "window_s": [plan.window.0, plan.window.1],
        "offered_per_s": plan.offered(),
        "completed": window.len(),
        "throughput_per_s": window.len() as f64 / plan.window_s(),
        "errors": r.stream.errors,
        "errors_in_window": errors_in_window,
        "error_samples": r.stream.error_samples,
        "arrivals": r.stream.arrivals,
        "mean_tokens_asked": r.stream.tokens_asked as f64 / r.stream.arrivals.max(1) as f64,
        "ttft_p50_ms": finite(pct(&ttft, 50.0)),
        "ttft_p99_ms": finite(pct(&ttft, 99.0)),
        "e2e_p50_ms": finite(pct(&e2e, 50.0)),
        "e2e_p99_ms": finite(pct(&e2e, 99.0)),
        "utilization_pct": r.util.iter().map(|u| finite(*u)).collect::<Vec<_>>(),
        "utilization_spread_pp": finite(spread),
        "served_by": served,
        "slow_share_pct": finite(share_pct(&window, SLOW, plan.window.0, plan.window.1)),
        "late_cold_share_pct": late_cold_share.map(finite),
        "all_saturated_ticks": r.router.as_ref().map(|d| d.all_saturated_ticks),
        "fallback_connections": r.router.as_ref().map(|d| d.fallback_connections),
        "weight_changes_per_min": r.router.as_ref().map(|d| &d.weight_changes_per_min),
        "poller": r.poller.as_ref().map(|p| json!({
            "rounds": p.rounds, "scrape_failures": p.scrape_failures, "pins": p.pins,
        })),
        "start_lag_p99_us": r.stream.start_lag_p99_us,
        "weights": r.weights.iter().map(|(t, w)| json!({"t": t, "w": w})).collect::<Vec<_>>(),
    })
}

/// A point: its runs and the median over them of each figure.
pub(super) fn point_json(
    scenario: Scenario,
    load: f64,
    window: (f64, f64),
    runs: Vec<Value>,
) -> Value {
    let med = |k: &str| finite(median(&runs.iter().map(|r| num(&r[k])).collect::<Vec<_>>()));
    let sum = |k: &str| runs.iter().filter_map(|r| r[k].as_u64()).sum::<u64>();
    let changes: Vec<Value> = (0..SPEEDS.len())
        .map(|i| {
            finite(median(
                &runs
                    .iter()
                    .filter_map(|r| r["weight_changes_per_min"][i].as_f64())
                    .collect::<Vec<_>>(),
            ))
        })
        .collect();
    json!({
        "scenario": scenario.key(),
        "load": load,
        "window_s": [window.0, window.1],
        "median": {
            "ttft_p50_ms": med("ttft_p50_ms"),
            "ttft_p99_ms": med("ttft_p99_ms"),
            "e2e_p50_ms": med("e2e_p50_ms"),
            "e2e_p99_ms": med("e2e_p99_ms"),
            "throughput_per_s": med("throughput_per_s"),
            "offered_per_s": med("offered_per_s"),
            "utilization_spread_pp": med("utilization_spread_pp"),
            "slow_share_pct": med("slow_share_pct"),
            "late_cold_share_pct": med("late_cold_share_pct"),
            "weight_changes_per_min": changes,
        },
        "errors": sum("errors"),
        "errors_in_window": sum("errors_in_window"),
        "all_saturated_ticks": sum("all_saturated_ticks"),
        "fallback_connections": sum("fallback_connections"),
        "runs": runs,
    })
}

pub(super) fn settings_json(s: &RoutingSettings) -> Value {
    let Lengths::LogNormal {
        median,
        sigma,
        min,
        max,
    } = LENGTHS
    else {
        return Value::Null;
    };
    json!({
        "seeds": s.seeds,
        "steady_seconds": s.steady_secs,
        "warmup_s": s.warmup_s,
        "steady_loads": s.steady_loads,
        "join_s": s.join_s,
        "window_s": s.window_s,
        "cold_loads": s.cold_loads,
        "cold_seconds": s.cold_secs,
        "cold_factor": s.cold_factor,
        "speeds": SPEEDS,
        "late_replica": backend_name(LATE),
        "slow_replica": backend_name(SLOW),
        "max_batch": MAX_BATCH,
        "step_ms": STEP_MS,
        "batch_slowdown": BATCH_SLOWDOWN,
        "lengths": {
            "distribution": "log-normal, rounded to whole tokens and clamped",
            "median": median, "sigma": sigma, "min": min, "max": max,
            "mean": mean_tokens(),
        },
        "kv_tokens_per_sequence": KV_TOKENS,
        "unit_capacity_per_s": unit_capacity(),
        "capacity_formula": CAPACITY_FORMULA,
        "request_timeout_s": REQUEST_TIMEOUT.as_secs(),
        "health_interval_ms": HEALTH_INTERVAL_MS,
        "scrape_interval_ms": SCRAPE_INTERVAL.as_millis() as u64,
        "selection_key_emitted": SELECTION_KEY_SUPPORTED,
        "seed_rule": "1 + 100000 × scenario (steady 0, cold join 1) + 1000 × load% + run index",
    })
}
