//! The L4 section's routed-hop half: the router against plain kernel
//! forwarding through the same LB namespace (side by side with its ratio to
//! *direct*), the fixed-rate table with each contender's SYN retransmits,
//! and where the counters place a lost SYN. Reads `l4.json` only; a
//! recording from before the routed hop or the counters shows "—".

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::Result;
use serde_json::Value;

use super::{super::f, super::verdict, contender};

/// `a / b` as "1.23×", or "—" when either is missing.
fn ratio(a: f64, b: f64) -> String {
    let r = a / b;
    if r.is_finite() {
        format!("{r:.2}×")
    } else {
        "—".to_owned()
    }
}

/// A count, or "—" when the recording has none.
fn count(v: &Value) -> String {
    v.as_u64().map_or_else(|| "—".to_owned(), |n| n.to_string())
}

/// A value at `path` under `v`.
fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| &v[*k])
}

/// The sum, over a group's runs, of one place's counters (`client`, `lb`,
/// `backends`, `links`, `router_reasons`).
fn summed(runs: &Value, place: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for run in runs.as_array().into_iter().flatten() {
        for (k, v) in run["counters"][place].as_object().into_iter().flatten() {
            *out.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
        }
    }
    out
}

/// The router's figures beside the routed hop's and direct's, with its ratio
/// to each.
pub(super) fn routed_hop_table(md: &mut String, l4: &Value) -> Result<()> {
    let (Some(router), Some(routed)) = (contender(l4, "router"), contender(l4, "routed")) else {
        writeln!(
            md,
            "No router-against-routed-hop comparison: this recording has no routed hop (or no \
             router).\n"
        )?;
        return Ok(());
    };
    let direct = contender(l4, "direct");
    writeln!(
        md,
        "The router against the routed hop (its floor) and *direct* (the upper reference), \
         same run:\n\n\
         | measure | direct | routed hop | router | router × routed hop | router × direct |\n\
         |---|---|---|---|---|---|"
    )?;
    let rows: [(&str, &[&str], usize); 6] = [
        ("max conn/s (wrk)", &["max_rate", "median_rate"], 0),
        (
            "max conn/s (in-tree)",
            &["max_rate_in_tree", "median_rate"],
            0,
        ),
        ("sustained conn/s (wrk)", &["sustained", "rate"], 0),
        ("fixed rate p50 ms", &["fixed_rate", "median_p50_ms"], 2),
        ("fixed rate p99 ms", &["fixed_rate", "median_p99_ms"], 2),
        ("fixed rate p99.9 ms", &["fixed_rate", "median_p999_ms"], 2),
    ];
    for (name, path, digits) in rows {
        let d = direct.map_or(f64::NAN, |d| f(at(d, path)));
        let h = f(at(routed, path));
        let r = f(at(router, path));
        writeln!(
            md,
            "| {name} | {d:.digits$} | {h:.digits$} | {r:.digits$} | {} | {} |",
            ratio(r, h),
            ratio(r, d)
        )?;
    }
    let fx = &routed["fixed_rate"];
    let forwarded: u64 = ["max_rate", "max_rate_in_tree", "fixed_rate", "sustained"]
        .iter()
        .filter_map(|k| routed[k]["counters"]["lb_forwarded"].as_u64())
        .sum();
    let per_conn = fx["counters"]["lb_forwarded"].as_u64().unwrap_or(0) as f64
        / fx["connections"].as_u64().unwrap_or(0) as f64;
    writeln!(
        md,
        "\nThe hop was taken: the LB namespace forwarded {forwarded} datagrams in the routed \
         hop's runs ({per_conn:.1} per connection in the fixed-rate runs).\n"
    )?;
    Ok(())
}

/// The fixed-rate runs of every contender, with the client's SYN and
/// segment retransmits.
pub(super) fn fixed_rate_table(md: &mut String, l4: &Value, d_fp99: f64) -> Result<()> {
    let h_fp99 = contender(l4, "routed").map_or(f64::NAN, |h| f(&h["fixed_rate"]["median_p99_ms"]));
    writeln!(
        md,
        "Fixed rate ({:.0} new connections/s, open loop, latency from `connect()` to the last \
         byte), with the client namespace's retransmits over the fixed-rate runs (a \
         retransmitted SYN is a connection that waited at least 1 s):\n\n\
         | contender | p50 / p99 / p99.9 ms | p99 × direct | p99 × routed hop | connections | \
         SYN retransmits | retransmitted segments | SYN retransmits, max-rate + sustained runs | \
         errors |\n\
         |---|---|---|---|---|---|---|---|---|",
        contender(l4, "direct").map_or(f64::NAN, |d| f(&d["fixed_rate"]["rate"]))
    )?;
    for c in l4["contenders"].as_array().into_iter().flatten() {
        if c.get("skipped").is_some() {
            continue;
        }
        let fx = &c["fixed_rate"];
        let p99 = f(&fx["median_p99_ms"]);
        let other: Option<u64> = ["max_rate", "max_rate_in_tree", "sustained"]
            .iter()
            .map(|k| c[k]["counters"]["client_syn_retrans"].as_u64())
            .sum();
        writeln!(
            md,
            "| {} | {:.2} / {p99:.2} / {:.2} | {} | {} | {} | {} | {} | {} | {} |",
            c["label"].as_str().unwrap_or("?"),
            f(&fx["median_p50_ms"]),
            f(&fx["median_p999_ms"]),
            ratio(p99, d_fp99),
            ratio(p99, h_fp99),
            count(&fx["connections"]),
            count(&fx["counters"]["client_syn_retrans"]),
            count(&fx["counters"]["client_retrans_segs"]),
            other.map_or_else(|| "—".to_owned(), |n| n.to_string()),
            fx["errors"].as_u64().unwrap_or(0),
        )?;
    }
    md.push('\n');
    syn_loss_places(md, l4)
}

/// For each contender whose client retransmitted a SYN at the fixed rate,
/// the counters that place the loss: the LB link's drops, the router's
/// drop and pass reasons, the LB kernel's and the backends' telling
/// counters.
fn syn_loss_places(md: &mut String, l4: &Value) -> Result<()> {
    let mut lines = Vec::new();
    for c in l4["contenders"].as_array().into_iter().flatten() {
        let fx = &c["fixed_rate"];
        let Some(syn) = fx["counters"]["client_syn_retrans"].as_u64() else {
            continue;
        };
        if syn == 0 {
            continue;
        }
        let show = |place: &str, keep: &dyn Fn(&str) -> bool| -> String {
            let m: Vec<String> = summed(&fx["runs"], place)
                .into_iter()
                .filter(|(k, v)| *v > 0 && keep(k))
                .map(|(k, v)| format!("`{k}` {v}"))
                .collect();
            if m.is_empty() {
                "none".to_owned()
            } else {
                m.join(", ")
            }
        };
        lines.push(format!(
            "- {}: {syn} SYN retransmits. LB link drops: {}. Router: {}. LB kernel: {}. \
             Backends: {}.",
            c["contender"].as_str().unwrap_or("?"),
            show("links", &|k| k.contains("dropped") || k.contains("errors")),
            show("router_reasons", &|k| k != "tx"),
            show("lb", &|k| !k.contains("Forw")),
            show("backends", &|k| !k.contains("Opens")),
        ));
    }
    if !lines.is_empty() {
        writeln!(
            md,
            "Where the fixed-rate runs' retransmitted SYNs could have been lost (sums over the \
             runs of the non-zero counters that tell). A SYN retransmit matched by the \
             backends' `TcpExtPAWSTimewait` and the client's `TcpOutRsts` was not lost on the \
             way: it met a TIME_WAIT socket on the backend's 4-tuple that another client \
             4-tuple had left there (source NAT with a port other than the client's own), and \
             this kernel gives every 4-tuple its own TCP timestamp offset, so the SYN's \
             timestamp looked older than the socket's last one. The backend rejected it \
             (PAWS) and answered for the old connection, the client reset that and sent its \
             SYN again after the 1 s timeout. `lb_peer.tx_dropped` counts frames the LB's \
             veth ring had no room for (the LB's NAPI starved of CPU), `host.softnet_dropped` \
             the host's input backlog drops (host-wide):\n\n{}\n",
            lines.join("\n")
        )?;
    }
    Ok(())
}

/// The headline's routed-hop goals for the router.
pub(super) fn routed_hop_headline(head: &mut String, l4: &Value) -> Result<()> {
    let Some(r) = contender(l4, "router") else {
        return Ok(());
    };
    let h = contender(l4, "routed");
    let of_hop = |path: &[&str]| h.map_or(f64::NAN, |h| f(at(h, path)));
    let rate = f(&r["max_rate"]["median_rate"]) / of_hop(&["max_rate", "median_rate"]);
    writeln!(
        head,
        "| L4: router max connection rate (wrk) | {} routed hop | ≥ 1.0× | {} |",
        ratio(rate, 1.0),
        if rate.is_finite() {
            verdict(rate >= 1.0)
        } else {
            "not measured"
        }
    )?;
    writeln!(
        head,
        "| L4: router in-tree max rate, sustained rate | {}, {} routed hop | — | |",
        ratio(
            f(&r["max_rate_in_tree"]["median_rate"]),
            of_hop(&["max_rate_in_tree", "median_rate"])
        ),
        ratio(f(&r["sustained"]["rate"]), of_hop(&["sustained", "rate"]))
    )?;
    let p99 = f(&r["fixed_rate"]["median_p99_ms"]) / of_hop(&["fixed_rate", "median_p99_ms"]);
    writeln!(
        head,
        "| L4: router p99 latency at the fixed rate | {} routed hop | ≤ 1.1× | {} |",
        ratio(p99, 1.0),
        if p99.is_finite() {
            verdict(p99 <= 1.1)
        } else {
            "not measured"
        }
    )?;
    let fx = &r["fixed_rate"];
    if let Some(syn) = fx["counters"]["client_syn_retrans"].as_u64() {
        writeln!(
            head,
            "| L4: router SYN retransmits at the fixed rate ({:.0}% of direct) | {syn} in {} \
             connections | 0 | {} |",
            f(&l4["settings"]["fixed_fraction_of_direct_max"]) * 100.0,
            count(&fx["connections"]),
            verdict(syn == 0)
        )?;
    }
    Ok(())
}
