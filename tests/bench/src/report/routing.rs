//! Section 3 of the page: routing quality with mock GPU replicas, from
//! `routing.json`: the method, each contender's figures, paired ratios with
//! confidence intervals, and the plots.

use std::{fmt::Write as _, path::Path};

use anyhow::Result;
use serde_json::Value;

use super::{
    f,
    plot::{plot_groups, plot_xy},
    verdict,
};

/// The `routing.json` format this page reads; the routing suite writes it.
const ROUTING_FORMAT: u64 = 2;

/// The contenders the routing ratios are taken against.
const LEASTCONN: &str = "haproxy_leastconn";
const ORACLE: &str = "oracle";
/// The headline contender: telemetry weights with least-loaded selection.
const LEAST_LOADED: &str = "router_least_loaded";
/// Shown in the weights plot when the headline contender did not run.
const WEIGHTS_ONLY: &str = "router_weights_only";

fn routing_contenders(rt: &Value) -> impl Iterator<Item = &Value> {
    rt["contenders"].as_array().into_iter().flatten()
}

fn routing_contender<'a>(rt: &'a Value, key: &str) -> Option<&'a Value> {
    routing_contenders(rt).find(|c| c["contender"] == key)
}

/// A contender's point (scenario and load), if it was measured.
fn routing_point<'a>(c: &'a Value, scenario: &str, load: f64) -> Option<&'a Value> {
    c["points"]
        .as_array()?
        .iter()
        .find(|p| p["scenario"] == scenario && (f(&p["load"]) - load).abs() < 1e-6)
}

/// Why a contender has no figures at a point.
fn missing_reason(c: &Value) -> String {
    match c["skipped"].as_str() {
        Some(why) => format!("skipped: {why}"),
        None => "not measured".into(),
    }
}

/// Two-sided 95% quantile of Student's t with `df` degrees of freedom.
fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        d if d <= T.len() => T[d - 1],
        _ => 1.96,
    }
}

/// A paired ratio: the geometric mean of per-seed ratios and its 95%
/// confidence interval (NaN bounds with fewer than two pairs).
#[derive(Clone, Copy, Debug, PartialEq)]
struct RatioCi {
    gm: f64,
    lo: f64,
    hi: f64,
    n: usize,
}

impl RatioCi {
    /// From per-seed ratios: a t-interval on their logarithms, exponentiated.
    fn from_ratios(ratios: &[f64]) -> Option<Self> {
        let logs: Vec<f64> = ratios
            .iter()
            .filter(|r| r.is_finite() && **r > 0.0)
            .map(|r| r.ln())
            .collect();
        let n = logs.len();
        if n == 0 {
            return None;
        }
        let mean = logs.iter().sum::<f64>() / n as f64;
        let half = if n < 2 {
            f64::NAN
        } else {
            let var = logs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            t975(n - 1) * (var / n as f64).sqrt()
        };
        Some(Self {
            gm: mean.exp(),
            lo: (mean - half).exp(),
            hi: (mean + half).exp(),
            n,
        })
    }

    /// `metric` of point `a` over point `b`, paired by seed.
    fn paired(a: &Value, b: &Value, metric: &str) -> Option<Self> {
        let by_seed = |p: &Value| -> Vec<(u64, f64)> {
            p["runs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| Some((r["seed"].as_u64()?, f(&r[metric]))))
                .collect()
        };
        let theirs = by_seed(b);
        let ratios: Vec<f64> = by_seed(a)
            .into_iter()
            .filter_map(|(seed, x)| {
                let (_, y) = theirs.iter().find(|(s, _)| *s == seed)?;
                Some(x / y)
            })
            .collect();
        Self::from_ratios(&ratios)
    }

    fn has_interval(&self) -> bool {
        self.lo.is_finite() && self.hi.is_finite()
    }

    /// Whether the interval straddles `target` (false without one).
    fn crosses(&self, target: f64) -> bool {
        self.has_interval() && self.lo <= target && target < self.hi
    }
}

impl std::fmt::Display for RatioCi {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.has_interval() {
            write!(out, "{:.2}× [{:.2}–{:.2}]", self.gm, self.lo, self.hi)
        } else {
            write!(out, "{:.2}× (n={}, no CI)", self.gm, self.n)
        }
    }
}

fn ratio_text(r: Option<RatioCi>) -> String {
    r.map_or_else(|| "—".into(), |r| r.to_string())
}

/// The points recorded: (scenario key, title, load), steady first.
fn routing_points(s: &Value) -> Vec<(&'static str, &'static str, f64)> {
    let loads = |k: &str| -> Vec<f64> { s[k].as_array().into_iter().flatten().map(f).collect() };
    let steady = loads("steady_loads")
        .into_iter()
        .map(|l| ("steady", "Steady", l));
    let cold = loads("cold_loads")
        .into_iter()
        .map(|l| ("cold_join", "Cold join", l));
    steady.chain(cold).collect()
}

pub(super) fn routing_section(
    md: &mut String,
    head: &mut String,
    rt: Option<&Value>,
    dir: &Path,
) -> Result<()> {
    writeln!(md, "## 3. Routing quality\n")?;
    let Some(rt) = rt else {
        writeln!(md, "Not run (no `routing.json`).\n")?;
        return Ok(());
    };
    if rt["format"].as_u64() != Some(ROUTING_FORMAT) {
        writeln!(
            md,
            "Not recorded with this version of the benchmark: the `routing.json` here is from an \
             older one (other scenarios and contenders). Run `cargo xtask bench routing` to \
             record it.\n"
        )?;
        writeln!(
            head,
            "| routing | not recorded with this version of the benchmark | — | — |"
        )?;
        return Ok(());
    }
    routing_method(md, rt)?;
    let s = &rt["settings"];
    for (scenario, title, load) in routing_points(s) {
        writeln!(md, "### {title}, {:.0}% load\n", load * 100.0)?;
        routing_figures(md, rt, scenario, load)?;
        routing_ratios(md, rt, scenario, load)?;
    }
    routing_policy_table(md, rt)?;
    routing_headline(head, rt)?;
    writeln!(
        md,
        "![routing e2e p99](routing_p99.svg)\n\n![routing TTFT p99](routing_ttft_p99.svg)\n\n\
         ![least-loaded weights](routing_weights.svg)\n\n\
         The weights plot is the router's weight per replica over the first cold-join run (the \
         least-loaded contender's, or the Maglev-draw telemetry contender's where that did not \
         run; the title says which). HAProxy could be tuned further (`slowstart` on the servers, \
         an `agent-check` fed with replica load, or `maxconn` per server with queueing); the \
         router's policy knobs (`target_utilization`, `poll_interval`) are at their defaults.\n"
    )?;
    routing_plots(rt, dir)
}

fn routing_method(md: &mut String, rt: &Value) -> Result<()> {
    let s = &rt["settings"];
    let len = &s["lengths"];
    let cf = f(&s["cold_factor"]);
    writeln!(
        md,
        "Four mock GPU replicas (`tests/fixtures/mock_replica.py`: continuous batching of up to \
         {mb:.0}, {step:.0} ms base step, {slow:.0}% slower at a full batch, SSE streaming, vLLM \
         metrics, KV cache sized for {kv}-token sequences) with true speeds {speeds}. Each \
         request's output length (`max_tokens`) is drawn from a log-normal with median {med} \
         tokens and σ {sigma} (mean {mean:.1}), rounded and clamped to [{min}, {max}]. Capacity \
         accounts for the mean length: one replica of speed 1.0 completes max_batch / \
         (mean_tokens × step × (1 + slowdown)) = {cap:.1} requests/s at a full batch, and the \
         fleet's capacity is that times the sum of the speeds of the replicas up. Arrivals are \
         open-loop Poisson at the stated fraction of that capacity; one streaming completion \
         per connection; {to} s client timeout.\n\n\
         - *Steady*: all four replicas up and warm; {ss} s of arrivals per run; requests sent in \
         the first {warm} s (queues filling from empty) are not measured.\n\
         - *Cold join*: three replicas up; {late} (speed 1.0) starts {join} s into the run and is \
         {cf}× slower for its first {cold} s; the offered load steps up from the stated fraction \
         of the three replicas' capacity to that of all four when it starts. Measured: the \
         requests sent in the {window} s after the join (arrivals stop then).\n\n\
         {seeds} seed(s) per point; a seed fixes the arrival times and the lengths, and every \
         contender runs the same seeds. Every absolute figure is the median over the seeds of \
         that seed's figure (its p99 over the measured requests, and so on); errors are summed \
         over every request of every run. Ratios to a reference contender are paired: per seed, \
         the contender's figure over the reference's on the same requests; the tables give their \
         geometric mean and a 95% confidence interval from a t-interval on the log-ratios (mean \
         ± t(0.975, n−1)·sd/√n, exponentiated). With one seed there is no interval.\n\n\
         Contenders, all with the same health checks (TCP + `GET /health`, {hi} ms interval, \
         fall 2, rise 2):\n\n\
         - *static equal weights* and the *oracle* (static weights ∝ true speeds, blind to the \
         cold start) on the router's datapath with its Maglev draw;\n\
         - *HAProxy leastconn* in TCP mode with `option redispatch` and `retries 3`;\n\
         - *router telemetry weights* with the *Maglev draw* (the GPU-aware policy as it was) and \
         with *least-loaded selection* (the new mode: the backend with the least (in flight + \
         1) / weight): the router's policy at its defaults except `slow_start` = the replicas' \
         warm-up ({cold} s), reading each replica's vLLM metrics, told nothing about speeds \
         (`capacity` 1.0 each);\n\
         - *polled least queue*, as llm-d's older scorers chose: the bench scrapes every \
         replica's `/metrics` every {scrape} ms (running + waiting requests) and pins weight 100 \
         on the healthy replica(s) with the least queue and 0 on the others with `router weight \
         set`, on the router's datapath with the Maglev draw, so only the decision differs.\n\n\
         TTFT is the time from `connect()` to the first SSE data chunk; end-to-end to `data: \
         [DONE]`. Utilization is each replica's SM activity (busy time × batch occupancy, from \
         its fake NVML state), sampled every 250 ms over the measured window while it is up; \
         *spread* is the largest minus the smallest replica's mean, in percentage points. The \
         *slow replica's share* is the share of the measured completions served by gpu-2 (speed \
         0.4; 0.4/3.4 = 11.8% of the fleet's capacity). The *joining replica's share* is the \
         share of the requests sent in its cold period that it served (warm, it would have \
         1/3.4 = 29% of the capacity; cold, about 1/{cf} of that).{selection}\n",
        mb = f(&s["max_batch"]),
        step = f(&s["step_ms"]),
        slow = f(&s["batch_slowdown"]) * 100.0,
        kv = s["kv_tokens_per_sequence"],
        speeds = s["speeds"],
        med = f(&len["median"]),
        sigma = f(&len["sigma"]),
        mean = f(&len["mean"]),
        min = len["min"],
        max = len["max"],
        cap = f(&s["unit_capacity_per_s"]),
        to = f(&s["request_timeout_s"]),
        ss = f(&s["steady_seconds"]),
        warm = f(&s["warmup_s"]),
        late = s["late_replica"].as_str().unwrap_or("?"),
        join = f(&s["join_s"]),
        cold = f(&s["cold_seconds"]),
        window = f(&s["window_s"]),
        seeds = s["seeds"],
        hi = s["health_interval_ms"],
        scrape = s["scrape_interval_ms"],
        selection = if s["selection_key_emitted"].as_bool() == Some(false) {
            " **Recorded without the `selection` key in the router's configs (its parser did \
             not accept it yet): every router contender used the Maglev draw.**"
        } else {
            ""
        },
    )?;
    Ok(())
}

/// The absolute figures of every contender at one point.
fn routing_figures(md: &mut String, rt: &Value, scenario: &str, load: f64) -> Result<()> {
    let cold = scenario == "cold_join";
    let cold_secs = f(&rt["settings"]["cold_seconds"]);
    writeln!(
        md,
        "| contender | TTFT p50 / p99 ms | e2e p50 / p99 ms | completed /s (offered) | errors | \
         util. spread pp | slow replica's share | {} |\n|---|---|---|---|---|---|---|---|",
        if cold {
            format!("joining replica's share, first {cold_secs:.0} s")
        } else {
            "weight changes /backend/min".into()
        }
    )?;
    for c in routing_contenders(rt) {
        let label = c["label"].as_str().unwrap_or("?");
        let Some(p) = routing_point(c, scenario, load) else {
            writeln!(md, "| {label} | {} | | | | | | |", missing_reason(c))?;
            continue;
        };
        let m = &p["median"];
        let last = if cold {
            format!("{:.1}%", f(&m["late_cold_share_pct"]))
        } else {
            weight_changes_text(c, m)
        };
        writeln!(
            md,
            "| {label} | {:.0} / {:.0} | {:.0} / {:.0} | {:.1} ({:.1}) | {} | {:.0} | {:.1}% | {last} |",
            f(&m["ttft_p50_ms"]),
            f(&m["ttft_p99_ms"]),
            f(&m["e2e_p50_ms"]),
            f(&m["e2e_p99_ms"]),
            f(&m["throughput_per_s"]),
            f(&m["offered_per_s"]),
            p["errors"],
            f(&m["utilization_spread_pp"]),
            f(&m["slow_share_pct"]),
        )?;
    }
    md.push('\n');
    Ok(())
}

/// Per backend, "a / b / c / d"; a dash for HAProxy, whose weights are not
/// the router's.
fn weight_changes_text(c: &Value, m: &Value) -> String {
    if c["contender"] == LEASTCONN {
        return "—".into();
    }
    m["weight_changes_per_min"]
        .as_array()
        .map(|v| {
            v.iter()
                .map(|x| format!("{:.1}", f(x)))
                .collect::<Vec<_>>()
                .join(" / ")
        })
        .unwrap_or_else(|| "—".into())
}

/// Paired ratios to HAProxy leastconn and to the oracle at one point.
fn routing_ratios(md: &mut String, rt: &Value, scenario: &str, load: f64) -> Result<()> {
    let reference =
        |key: &str| routing_contender(rt, key).and_then(|c| routing_point(c, scenario, load));
    let (lc, or) = (reference(LEASTCONN), reference(ORACLE));
    writeln!(
        md,
        "Paired ratios (geometric mean over seeds [95% CI]):\n\n\
         | contender | TTFT p99 × leastconn | e2e p99 × leastconn | TTFT p99 × oracle | e2e p99 × oracle |\n\
         |---|---|---|---|---|"
    )?;
    for c in routing_contenders(rt) {
        let Some(p) = routing_point(c, scenario, load) else {
            continue;
        };
        let ratio =
            |r: Option<&Value>, k: &str| ratio_text(r.and_then(|r| RatioCi::paired(p, r, k)));
        writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            c["label"].as_str().unwrap_or("?"),
            ratio(lc, "ttft_p99_ms"),
            ratio(lc, "e2e_p99_ms"),
            ratio(or, "ttft_p99_ms"),
            ratio(or, "e2e_p99_ms"),
        )?;
    }
    md.push('\n');
    Ok(())
}

/// The router's own counters per contender and steady point.
fn routing_policy_table(md: &mut String, rt: &Value) -> Result<()> {
    writeln!(
        md,
        "### Weight stability and policy counters\n\n\
         Weight changes per backend per minute (`weight_changes` in `router status`, read at the \
         start and end of each steady run; median over seeds), summed *saturated ticks* (policy \
         ticks on which every healthy replica was saturated, so traffic spread at floor \
         weights) and *fallback connections* (sent to a fallback service; none is configured, \
         so 0). Static weights change only with health; the poller's changes are its pins.\n\n\
         | contender | load | gpu-0 / gpu-1 / gpu-2 / gpu-3 changes/min | saturated ticks | fallback conns |\n\
         |---|---|---|---|---|"
    )?;
    for c in routing_contenders(rt).filter(|c| c["contender"] != LEASTCONN) {
        for p in c["points"].as_array().into_iter().flatten() {
            if p["scenario"] != "steady" {
                continue;
            }
            writeln!(
                md,
                "| {} | {:.0}% | {} | {} | {} |",
                c["label"].as_str().unwrap_or("?"),
                f(&p["load"]) * 100.0,
                weight_changes_text(c, &p["median"]),
                p["all_saturated_ticks"],
                p["fallback_connections"],
            )?;
        }
    }
    md.push('\n');
    Ok(())
}

/// One headline ratio row: `what` of the least-loaded contender against the
/// references and targets given.
fn headline_ratio_row(
    head: &mut String,
    name: &str,
    ll: &Value,
    refs: &[(&str, Option<&Value>, f64)],
    metric: &str,
) -> Result<()> {
    let mut results = Vec::new();
    let mut targets = Vec::new();
    let (mut ok, mut crosses, mut no_ci) = (true, false, false);
    for (what, r, target) in refs {
        targets.push(format!("≤ {target:.1}× {what}"));
        match r.and_then(|r| RatioCi::paired(ll, r, metric)) {
            Some(ci) => {
                // The verdict is the point estimate's; the note says when
                // the interval does not back it.
                ok &= ci.gm <= *target;
                crosses |= ci.crosses(*target);
                no_ci |= !ci.has_interval();
                results.push(format!("{ci} {what}"));
            }
            None => {
                ok = false;
                results.push(format!("no {what} figures"));
            }
        }
    }
    let note = if no_ci {
        " (one seed: no CI)"
    } else if crosses {
        " (95% CI crosses the target)"
    } else {
        ""
    };
    writeln!(
        head,
        "| {name} | {} | {} | {}{note} |",
        results.join(", "),
        targets.join(", "),
        verdict(ok)
    )?;
    Ok(())
}

/// Weight changes per backend per minute at steady load that still count as
/// stable: one per speed window.
const MAX_CHANGES_PER_MIN: f64 = 4.0;

/// Headline rows for the least-loaded contender's goals.
fn routing_headline(head: &mut String, rt: &Value) -> Result<()> {
    let ll = routing_contender(rt, LEAST_LOADED);
    for (scenario, title, load) in routing_points(&rt["settings"]) {
        let at =
            |key: &str| routing_contender(rt, key).and_then(|c| routing_point(c, scenario, load));
        let name = format!(
            "routing, {}, {:.0}%: least-loaded",
            title.to_lowercase(),
            load * 100.0
        );
        let Some(p) = ll.and_then(|c| routing_point(c, scenario, load)) else {
            let why = ll.map_or_else(|| "not run".into(), missing_reason);
            writeln!(head, "| {name} | {why} | see §3 | not measured |")?;
            continue;
        };
        if scenario == "steady" {
            let refs = [
                ("leastconn", at(LEASTCONN), 1.0),
                ("oracle", at(ORACLE), 1.1),
            ];
            headline_ratio_row(head, &format!("{name} e2e p99"), p, &refs, "e2e_p99_ms")?;
            headline_ratio_row(head, &format!("{name} TTFT p99"), p, &refs, "ttft_p99_ms")?;
            writeln!(
                head,
                "| {name} errors | {} | 0 | {} |",
                p["errors"],
                verdict(p["errors"].as_u64() == Some(0))
            )?;
            // The stability criterion: at steady load a backend's capacity
            // changes at most once per speed window (15 s), 4 a minute,
            // where the weights-only policy moved most weights every poll.
            let worst = p["median"]["weight_changes_per_min"]
                .as_array()
                .map(|v| v.iter().map(f).fold(f64::NAN, f64::max));
            if let Some(worst) = worst {
                writeln!(
                    head,
                    "| {name} weight changes per backend per minute (most changing backend) | \
                     {worst:.1} | ≤ {MAX_CHANGES_PER_MIN:.0} | {} |",
                    verdict(worst <= MAX_CHANGES_PER_MIN)
                )?;
            }
        } else {
            let window = f(&rt["settings"]["window_s"]);
            let refs = [("leastconn", at(LEASTCONN), 0.8)];
            headline_ratio_row(
                head,
                &format!("{name} TTFT p99, {window:.0} s after the join"),
                p,
                &refs,
                "ttft_p99_ms",
            )?;
            let e2e = at(LEASTCONN).and_then(|r| RatioCi::paired(p, r, "e2e_p99_ms"));
            writeln!(
                head,
                "| {name} e2e p99, {window:.0} s after the join | {} leastconn | — | |",
                ratio_text(e2e)
            )?;
        }
    }
    Ok(())
}

fn routing_plots(rt: &Value, dir: &Path) -> Result<()> {
    let points = routing_points(&rt["settings"]);
    let groups = |metric: &str| -> Vec<(String, Vec<(String, f64)>)> {
        points
            .iter()
            .map(|&(scenario, title, load)| {
                let bars = routing_contenders(rt)
                    .map(|c| {
                        let v = routing_point(c, scenario, load)
                            .map_or(f64::NAN, |p| f(&p["median"][metric]));
                        (c["contender"].as_str().unwrap_or("?").to_owned(), v)
                    })
                    .collect();
                (format!("{title} {:.0}%", load * 100.0), bars)
            })
            .collect()
    };
    plot_groups(
        &dir.join("routing_p99.svg"),
        "End-to-end p99 latency (ms, median over seeds)",
        &groups("e2e_p99_ms"),
    )?;
    plot_groups(
        &dir.join("routing_ttft_p99.svg"),
        "Time-to-first-token p99 (ms, median over seeds)",
        &groups("ttft_p99_ms"),
    )?;
    // The weights over the first cold-join run: the join and slow start.
    let shown = [LEAST_LOADED, WEIGHTS_ONLY].into_iter().find_map(|key| {
        let c = routing_contender(rt, key)?;
        let p = c["points"]
            .as_array()?
            .iter()
            .find(|p| p["scenario"] == "cold_join")?;
        Some((c, p["runs"][0]["weights"].as_array()?.clone()))
    });
    let mut series = Vec::new();
    let mut title = "Router weights: no telemetry contender recorded".to_owned();
    if let Some((c, w)) = shown {
        title = format!(
            "{}: weight per replica, first cold-join run",
            c["label"].as_str().unwrap_or("?")
        );
        let n = w
            .first()
            .and_then(|x| x["w"].as_array())
            .map_or(0, Vec::len);
        for i in 0..n {
            let pts: Vec<(f64, f64)> = w.iter().map(|x| (f(&x["t"]), f(&x["w"][i]))).collect();
            series.push((format!("gpu-{i}"), pts));
        }
    }
    plot_xy(
        &dir.join("routing_weights.svg"),
        &title,
        "seconds into the run",
        "weight",
        &series,
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{RatioCi, routing_section};

    #[test]
    fn paired_ratios_are_geometric_means_with_t_intervals() {
        let same = RatioCi::from_ratios(&[2.0, 2.0, 2.0]).map(|r| (r.gm, r.lo, r.hi, r.n));
        assert_eq!(same, Some((2.0, 2.0, 2.0, 3)));
        // logs 0 and ln 4: mean ln 2, sd ln 4/√2, se ln 2, t(1) = 12.706.
        let two = RatioCi::from_ratios(&[1.0, 4.0]).map(|r| (r.gm, r.lo.ln(), r.hi.ln()));
        let Some((gm, lo, hi)) = two else {
            panic!("no ratio");
        };
        assert!((gm - 2.0).abs() < 1e-12);
        let ln2 = 2f64.ln();
        assert!((lo - (ln2 - 12.706 * ln2)).abs() < 1e-9);
        assert!((hi - (ln2 + 12.706 * ln2)).abs() < 1e-9);
        assert!(RatioCi::from_ratios(&[1.5]).is_some_and(|r| !r.has_interval()));
        assert!(RatioCi::from_ratios(&[f64::NAN]).is_none());
    }

    #[test]
    fn ratios_pair_runs_by_seed() {
        let point = |runs: &[(u64, f64)]| json!({ "runs": runs.iter().map(|(s, v)| json!({"seed": s, "x": v})).collect::<Vec<_>>() });
        let a = point(&[(1, 10.0), (2, 30.0), (3, 7.0)]);
        let b = point(&[(2, 15.0), (1, 5.0)]);
        let r = RatioCi::paired(&a, &b, "x");
        assert_eq!(
            r.map(|r| (r.n, (r.gm - 2.0).abs() < 1e-12)),
            Some((2, true))
        );
    }

    #[test]
    fn an_older_routing_json_is_said_so() {
        let old = json!({ "benchmark": "routing", "policies": [], "settings": {} });
        let (mut md, mut head) = (String::new(), String::new());
        let dir = std::env::temp_dir();
        assert!(routing_section(&mut md, &mut head, Some(&old), &dir).is_ok());
        assert!(md.contains("Not recorded with this version"), "{md}");
    }
}
