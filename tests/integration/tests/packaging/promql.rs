//! The metric families the daemon exports, and a checker of PromQL
//! expressions against them: names, labels, counters only through rates.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Counter,
    Gauge,
    Histogram,
}

const BACKEND: &[&str] = &["service", "backend"];
const SERVICE: &[&str] = &["service"];
const GLOBAL: &[&str] = &[];
const POOL: &[&str] = &["service", "pool"];
const POOL_TARGET: &[&str] = &["service", "pool", "target"];

/// The families the daemon exports, as router-userspace/src/server/metrics.rs
/// and pool_metrics.rs define them: prometheus-client (OpenMetrics) names counters `X_total`
/// and gives histograms `X_bucket{le}`, `X_sum` and `X_count` series.
/// Update this list with metrics.rs; `metric_list_matches_metrics_rs`
/// notices a family renamed or removed there.
pub(super) const FAMILIES: &[(&str, Kind, &[&str])] = &[
    ("router_backend_packets_total", Kind::Counter, BACKEND),
    ("router_backend_bytes_total", Kind::Counter, BACKEND),
    (
        "router_backend_new_connections_total",
        Kind::Counter,
        BACKEND,
    ),
    (
        "router_backend_weight_changes_total",
        Kind::Counter,
        BACKEND,
    ),
    (
        "router_backend_telemetry_errors_total",
        Kind::Counter,
        BACKEND,
    ),
    ("router_service_packets_total", Kind::Counter, SERVICE),
    ("router_service_bytes_total", Kind::Counter, SERVICE),
    (
        "router_service_new_connections_total",
        Kind::Counter,
        SERVICE,
    ),
    (
        "router_service_fallback_connections_total",
        Kind::Counter,
        SERVICE,
    ),
    ("router_datapath_packets_total", Kind::Counter, &["reason"]),
    (
        "router_policy_all_saturated_ticks_total",
        Kind::Counter,
        GLOBAL,
    ),
    ("router_fallback_connections_total", Kind::Counter, GLOBAL),
    (
        "router_health_probe_local_errors_total",
        Kind::Counter,
        GLOBAL,
    ),
    (
        "router_metrics_connections_refused_total",
        Kind::Counter,
        GLOBAL,
    ),
    (
        "router_control_connections_refused_total",
        Kind::Counter,
        GLOBAL,
    ),
    ("router_backend_active_connections", Kind::Gauge, BACKEND),
    ("router_backend_in_flight", Kind::Gauge, BACKEND),
    ("router_backend_max_in_flight", Kind::Gauge, BACKEND),
    ("router_backend_flows_closed_total", Kind::Counter, BACKEND),
    (
        "router_backend_in_flight_leaked_corrections_total",
        Kind::Counter,
        BACKEND,
    ),
    (
        "router_backend_in_flight_overcount_corrections_total",
        Kind::Counter,
        BACKEND,
    ),
    (
        "router_backend_new_connections_per_second",
        Kind::Gauge,
        BACKEND,
    ),
    ("router_backend_weight", Kind::Gauge, BACKEND),
    ("router_backend_share_ratio", Kind::Gauge, BACKEND),
    (
        "router_backend_weight_reason",
        Kind::Gauge,
        &["service", "backend", "mode", "reason"],
    ),
    ("router_backend_draining", Kind::Gauge, BACKEND),
    ("router_backend_gpu_utilization_ratio", Kind::Gauge, BACKEND),
    ("router_backend_gpu_memory_used_bytes", Kind::Gauge, BACKEND),
    (
        "router_backend_gpu_memory_total_bytes",
        Kind::Gauge,
        BACKEND,
    ),
    ("router_backend_gpu_power_watts", Kind::Gauge, BACKEND),
    ("router_backend_gpu_throttled", Kind::Gauge, BACKEND),
    ("router_backend_gpu_throttle_reasons", Kind::Gauge, BACKEND),
    ("router_backend_kv_cache_usage_ratio", Kind::Gauge, BACKEND),
    ("router_backend_requests_running", Kind::Gauge, BACKEND),
    ("router_backend_requests_waiting", Kind::Gauge, BACKEND),
    ("router_backend_load_ratio", Kind::Gauge, BACKEND),
    ("router_backend_saturated", Kind::Gauge, BACKEND),
    ("router_backend_telemetry_stale", Kind::Gauge, BACKEND),
    ("router_backend_telemetry_age_seconds", Kind::Gauge, BACKEND),
    ("router_backend_healthy", Kind::Gauge, BACKEND),
    ("router_backend_cost_per_hour_dollars", Kind::Gauge, BACKEND),
    (
        "router_backend_cost_per_1k_connections_dollars",
        Kind::Gauge,
        BACKEND,
    ),
    ("router_service_active_connections", Kind::Gauge, SERVICE),
    ("router_service_saturated_backends", Kind::Gauge, SERVICE),
    ("router_service_cost_per_hour_dollars", Kind::Gauge, SERVICE),
    (
        "router_service_cost_per_1k_connections_dollars",
        Kind::Gauge,
        SERVICE,
    ),
    ("router_conn_table_entries", Kind::Gauge, GLOBAL),
    ("router_nat6_conn_table_entries", Kind::Gauge, GLOBAL),
    ("router_conn_table_capacity", Kind::Gauge, GLOBAL),
    ("router_uptime_seconds", Kind::Gauge, GLOBAL),
    (
        "router_backend_connect_latency_seconds",
        Kind::Histogram,
        BACKEND,
    ),
    (
        "router_backend_first_byte_latency_seconds",
        Kind::Histogram,
        BACKEND,
    ),
    ("router_pool_share_ratio", Kind::Gauge, POOL),
    ("router_pool_no_room", Kind::Gauge, POOL),
    ("router_pool_in_flight", Kind::Gauge, POOL),
    ("router_pool_new_connections_total", Kind::Counter, POOL),
    (
        "router_pool_fallback_connections_total",
        Kind::Counter,
        POOL_TARGET,
    ),
    (
        "router_pool_first_byte_latency_seconds",
        Kind::Histogram,
        POOL,
    ),
    ("router_pool_cost_per_hour_dollars", Kind::Gauge, POOL),
    (
        "router_pool_cost_per_1k_connections_dollars",
        Kind::Gauge,
        POOL,
    ),
    ("router_pool_guard_trips_total", Kind::Counter, POOL),
];

/// Labels Prometheus attaches to every scraped series.
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// A series name's family, its kind as a series (a histogram's buckets,
/// sum and count behave as counters) and the labels it carries.
pub(super) fn series(name: &str) -> Option<(&'static str, Kind, Vec<&'static str>)> {
    FAMILIES.iter().find_map(|&(family, kind, labels)| {
        let mut labels: Vec<&str> = labels.iter().chain(TARGET_LABELS).copied().collect();
        match kind {
            Kind::Histogram => {
                let suffix = name.strip_prefix(family)?;
                match suffix {
                    "_bucket" => labels.push("le"),
                    "_sum" | "_count" => {}
                    _ => return None,
                }
                Some((family, Kind::Counter, labels))
            }
            _ => (name == family).then_some((family, kind, labels)),
        }
    })
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Open,
    Close,
    /// `{...}` label matchers: the label names.
    Matchers(Vec<String>),
    /// Anything else: numbers, durations, strings, ranges, operators,
    /// Grafana variables.
    Other,
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_ident(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit()
}

/// Index just past the string literal starting at `i`.
fn skip_string(b: &[u8], i: usize) -> Result<usize, String> {
    let quote = b[i];
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' if quote != b'`' => j += 2,
            c if c == quote => return Ok(j + 1),
            _ => j += 1,
        }
    }
    Err("unterminated string".into())
}

/// Label names of a matcher list such as `a="x", b=~"$b"`.
fn matchers(text: &str) -> Result<Vec<String>, String> {
    let b = text.as_bytes();
    let mut labels = Vec::new();
    let mut i = 0;
    loop {
        while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b',') {
            i += 1;
        }
        if i == b.len() {
            return Ok(labels);
        }
        let start = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        if start == i {
            return Err(format!("no label name at {:?}", &text[start..]));
        }
        labels.push(text[start..i].to_owned());
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let op_start = i;
        while i < b.len() && b"=!~".contains(&b[i]) {
            i += 1;
        }
        if !["=", "!=", "=~", "!~"].contains(&&text[op_start..i]) {
            return Err(format!("bad matcher operator in {text:?}"));
        }
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == b.len() || !b"\"'`".contains(&b[i]) {
            return Err(format!("matcher value is not a string in {text:?}"));
        }
        i = skip_string(b, i)?;
    }
}

/// Enough of PromQL's lexer to find metric names, their matchers and the
/// calls around them.
fn lex(expr: &str) -> Result<Vec<Tok>, String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            c if c.is_ascii_whitespace() => i += 1,
            b'"' | b'\'' | b'`' => {
                i = skip_string(b, i)?;
                out.push(Tok::Other);
            }
            b'(' => {
                out.push(Tok::Open);
                i += 1;
            }
            b')' => {
                out.push(Tok::Close);
                i += 1;
            }
            b'{' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'}' {
                    j = if b"\"'`".contains(&b[j]) {
                        skip_string(b, j)?
                    } else {
                        j + 1
                    };
                }
                if j == b.len() {
                    return Err("unclosed {".into());
                }
                out.push(Tok::Matchers(matchers(&expr[i + 1..j])?));
                i = j + 1;
            }
            b'[' => {
                let end = expr[i..].find(']').ok_or("unclosed [")?;
                out.push(Tok::Other);
                i += end + 1;
            }
            b'$' => {
                i += 1;
                if b.get(i) == Some(&b'{') {
                    i += expr[i..].find('}').ok_or("unclosed ${")? + 1;
                } else {
                    while i < b.len() && is_ident(b[i]) {
                        i += 1;
                    }
                }
                out.push(Tok::Other);
            }
            c if is_ident_start(c) => {
                let start = i;
                while i < b.len() && is_ident(b[i]) {
                    i += 1;
                }
                out.push(Tok::Ident(expr[start..i].to_owned()));
            }
            c if c.is_ascii_digit() || c == b'.' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
                out.push(Tok::Other);
            }
            _ => {
                out.push(Tok::Other);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// Followed by a list of label names in parentheses, never by a call.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "inf", "nan"];
/// May be followed by `by (...)` before their parenthesis.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];
const RATES: &[&str] = &["rate", "irate", "increase"];

/// One metric selector in an expression.
#[derive(Debug)]
pub(super) struct Use {
    pub(super) metric: String,
    pub(super) labels: Vec<String>,
    /// The innermost call or aggregation around it ("" at top level).
    pub(super) call: String,
}

pub(super) fn selectors(expr: &str) -> Result<Vec<Use>, String> {
    let toks = lex(expr)?;
    let mut calls: Vec<String> = Vec::new();
    let mut pending: Option<String> = None;
    let mut uses = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let next_is_open = toks.get(i + 1) == Some(&Tok::Open);
        match &toks[i] {
            Tok::Ident(k) if LABEL_LISTS.contains(&k.as_str()) => {
                i += 1;
                if next_is_open {
                    let close = toks[i..]
                        .iter()
                        .position(|t| *t == Tok::Close)
                        .ok_or_else(|| format!("unclosed {k} ("))?;
                    i += close + 1;
                }
            }
            Tok::Ident(k) if KEYWORDS.contains(&k.as_str()) => i += 1,
            Tok::Ident(f) if next_is_open || AGGREGATIONS.contains(&f.as_str()) => {
                pending = Some(f.clone());
                i += 1;
            }
            Tok::Ident(metric) => {
                let labels = match toks.get(i + 1) {
                    Some(Tok::Matchers(l)) => {
                        i += 1;
                        l.clone()
                    }
                    _ => Vec::new(),
                };
                uses.push(Use {
                    metric: metric.clone(),
                    labels,
                    call: calls.last().cloned().unwrap_or_default(),
                });
                i += 1;
            }
            Tok::Matchers(_) => return Err("a selector without a metric name".into()),
            Tok::Open => {
                calls.push(pending.take().unwrap_or_default());
                i += 1;
            }
            Tok::Close => {
                calls.pop().ok_or("unbalanced )")?;
                i += 1;
            }
            Tok::Other => i += 1,
        }
    }
    if !calls.is_empty() {
        return Err("unbalanced (".into());
    }
    Ok(uses)
}

/// Problems with one expression's metrics, or none.
pub(super) fn check_expr(expr: &str) -> Vec<String> {
    let uses = match selectors(expr) {
        Ok(u) => u,
        Err(e) => return vec![format!("{e}: {expr}")],
    };
    let mut problems = Vec::new();
    if uses.is_empty() {
        problems.push(format!("no metric: {expr}"));
    }
    for u in uses {
        let Some((_, kind, labels)) = series(&u.metric) else {
            problems.push(format!("{} is not exported by the daemon", u.metric));
            continue;
        };
        for l in &u.labels {
            if !labels.contains(&l.as_str()) {
                problems.push(format!("{} has no label {l:?}", u.metric));
            }
        }
        let in_rate = RATES.contains(&u.call.as_str());
        match kind {
            Kind::Counter if !in_rate => {
                problems.push(format!("counter {} outside rate()/increase()", u.metric))
            }
            Kind::Gauge if in_rate => {
                problems.push(format!("gauge {} inside {}()", u.metric, u.call))
            }
            _ => {}
        }
    }
    problems
}

#[test]
fn promql_checker_catches_mistakes() {
    let ok = r#"histogram_quantile(0.99, sum by (service, backend, le) (rate(router_backend_first_byte_latency_seconds_bucket{service=~"$service", backend=~"${backend}"}[$__rate_interval])))"#;
    assert_eq!(check_expr(ok), Vec::<String>::new());
    let ok = r#"sum(rate(router_service_fallback_connections_total{service="a,b}"}[5m])) by (service) / on (service) group_left sum by (service) (rate(router_service_new_connections_total[5m])) > bool 0"#;
    assert_eq!(check_expr(ok), Vec::<String>::new());
    for (bad, why) in [
        ("router_backend_packets_total", "outside rate"),
        ("rate(router_backend_weight[5m])", "inside rate"),
        ("router_backend_weight{reason=\"x\"}", "no label \"reason\""),
        ("router_backend_weights", "not exported"),
        (
            "rate(router_backend_connect_latency_seconds_bukket[5m])",
            "not exported",
        ),
        ("sum(router_backend_weight", "unbalanced ("),
        (
            "{__name__=\"router_backend_weight\"}",
            "without a metric name",
        ),
        ("router_backend_weight{service~\"x\"}", "operator"),
        ("sum by (service) (1)", "no metric"),
    ] {
        let problems = check_expr(bad).join("; ");
        assert!(problems.contains(why), "{bad}: {problems:?}");
    }
}
