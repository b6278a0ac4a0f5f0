//! The Grafana dashboard: its datasource input and variables, and every
//! query checked against the exported families.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::promql::{FAMILIES, Kind, check_expr, selectors, series};
use super::read;

const DASHBOARD: &str = "packaging/grafana/router-dashboard.json";

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON")
}

/// Every panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

fn variables(d: &Value) -> BTreeMap<&str, &Value> {
    d["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| (v["name"].as_str().expect("variable name"), v))
        .collect()
}

/// A query variable's query: a string, or `{ "query": ... }` in newer
/// Grafana versions.
fn variable_query(v: &Value) -> &str {
    v["query"]
        .as_str()
        .or_else(|| v["query"]["query"].as_str())
        .expect("query variable without a query")
}

/// Every PromQL expression: panel targets, and the selector inside each
/// `label_values(selector, label)` variable query.
fn expressions(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            let expr = t["expr"].as_str().unwrap_or_default();
            out.push((format!("panel {title:?}"), expr.to_owned()));
        }
    }
    for (name, v) in variables(d) {
        if v["type"] == "query" {
            let q = variable_query(v);
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .unwrap_or_else(|| panic!("variable {name}: expected label_values(...), got {q}"));
            let selector = inner.rsplit_once(',').map_or(inner, |(s, _)| s);
            out.push((format!("variable {name}"), selector.to_owned()));
        }
    }
    out
}

#[test]
fn dashboard_has_datasource_input_and_variables() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    let inputs = d["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"
            && i["type"] == "datasource"
            && i["pluginId"] == "prometheus"),
        "{inputs:?}"
    );
    let vars = variables(&d);
    let ds = vars.get("DS_PROMETHEUS").expect("DS_PROMETHEUS variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for (name, label) in [("service", "service"), ("backend", "backend")] {
        let v = vars.get(name).unwrap_or_else(|| panic!("variable {name}"));
        assert_eq!(v["type"], "query", "{name}");
        let q = variable_query(v);
        assert!(
            q.starts_with("label_values(") && q.ends_with(&format!(", {label})")),
            "{name}: {q}"
        );
        assert_eq!(v["datasource"]["uid"], "${DS_PROMETHEUS}", "{name}");
    }

    // Every query goes to the chosen Prometheus.
    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id {}",
            p["id"]
        );
        let pos = &p["gridPos"];
        assert!(
            pos["x"].as_u64().unwrap() + pos["w"].as_u64().unwrap() <= 24,
            "{title}: wider than the grid"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        }
    }
}

#[test]
fn dashboard_queries_only_exported_metrics() {
    let d = dashboard();
    let exprs = expressions(&d);
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (place, expr) in &exprs {
        problems.extend(
            check_expr(expr)
                .into_iter()
                .map(|p| format!("{place}: {p}")),
        );
        for u in selectors(expr).unwrap_or_default() {
            if let Some((family, _, _)) = series(&u.metric) {
                used.insert(family);
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // Every family the daemon exports has a place on the dashboard.
    let unused: Vec<&str> = FAMILIES
        .iter()
        .map(|f| f.0)
        .filter(|f| !used.contains(f))
        .collect();
    assert!(unused.is_empty(), "not on the dashboard: {unused:?}");

    // Tail latency: p50 and p99 of both datapath histograms.
    for hist in [
        "router_backend_first_byte_latency_seconds",
        "router_backend_connect_latency_seconds",
    ] {
        for q in ["0.5", "0.99"] {
            assert!(
                exprs.iter().any(|(_, e)| {
                    e.starts_with(&format!("histogram_quantile({q},"))
                        && e.contains(&format!("{hist}_bucket"))
                }),
                "no p{} of {hist}",
                q.trim_start_matches("0.")
            );
        }
    }
}

/// The hard-coded list above is checked against the literal family names
/// of metrics.rs and pool_metrics.rs, so a family renamed or dropped there
/// fails here.
#[test]
fn metric_list_matches_metrics_rs() {
    let source = read("router-userspace/src/server/metrics.rs")
        + &read("router-userspace/src/server/pool_metrics.rs");
    for &(name, kind, _) in FAMILIES {
        let family = match kind {
            Kind::Counter => name.strip_suffix("_total").expect("counters end in _total"),
            _ => name,
        };
        assert!(
            source.contains(&format!("\"{family}\"")),
            "{family} is not in router-userspace/src/server/metrics.rs or pool_metrics.rs"
        );
    }
}
