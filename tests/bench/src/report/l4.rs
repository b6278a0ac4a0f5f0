//! Section 2 of the page: L4 forwarding, from `l4.json`.

mod hop;

use std::{fmt::Write as _, path::Path};

use anyhow::Result;
use serde_json::Value;

use hop::{fixed_rate_table, routed_hop_headline, routed_hop_table};

use super::{
    f, median,
    plot::{plot_bars, plot_lines},
    verdict,
};

fn contender<'a>(l4: &'a Value, key: &str) -> Option<&'a Value> {
    l4["contenders"]
        .as_array()?
        .iter()
        .find(|c| c["contender"] == key && c.get("skipped").is_none())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

pub(super) fn l4_section(
    md: &mut String,
    head: &mut String,
    l4: Option<&Value>,
    dir: &Path,
) -> Result<()> {
    writeln!(md, "## 2. L4 forwarding\n")?;
    let Some(l4) = l4 else {
        writeln!(md, "Not run (no `l4.json`).\n")?;
        return Ok(());
    };
    let st = &l4["settings"];
    let direct = contender(l4, "direct");
    writeln!(
        md,
        "One topology for every contender (client, LB and {b} backend network namespaces on one \
         bridge, built afresh for each contender), the same {b} nginx backends (one worker each, \
         a 3-byte 200, access log off), the same load and durations. Every request is a new TCP \
         connection (`Connection: close`); nginx's accept counter confirms one connection per \
         request (column \"conn/req\").\n\n\
         - **Maximum rate**: wrk (Debian's) `-t{wt} -c{c} -H \"Connection: close\"`, {mr} runs of \
         {ms} s, median of the runs; wrk reconnects after every response. For *direct* a Lua \
         `setup()` gives each wrk thread its own backend. wrk's latency starts once the \
         connection is up, so it leaves out the handshake. Each wrk run is followed by a run of \
         the in-tree generator (`tests/bench/src/loadgen.rs`, tokio, {t} threads, closed loop, {c} \
         connections) whose latency runs from `connect()` to the last byte: the SYN path \
         included. It is slower than wrk on this machine (it costs more CPU per connection), so \
         its rates are a second opinion, not the figure.\n\
         - **Fixed rate**: the in-tree generator in open loop (wrk has no fixed-rate mode) at \
         {fr:.0} new connections/s, {pct:.0}% of the direct maximum measured first in the same \
         run; {fr_runs} runs of {fs} s; latency from `connect()` to the last byte, from each \
         request's actual start (how late starts were against the schedule, p99, is in the JSON).\n\
         - **Sustained**: one wrk run of {ss} s at the maximum rate on a fresh topology, with the \
         backends' accept counters read every second: the rate as the backends see it, showing \
         what NAT port space, conntrack and the backends' TIME_WAIT do over time \
         (`l4_sustained.svg`).\n\n\
         Order per contender: fixed-rate runs, then the maximum-rate runs, on one topology (for \
         *direct*, which keeps no NAT state, the maximum first, to set the fixed rate), with \
         0.5 s between runs; NAT state from one maximum-rate run carries into the next, as it \
         would on a real node. Then the sustained run on a new topology.\n",
        b = st["backends"],
        wt = st["wrk_threads"],
        t = st["generator_threads"],
        c = st["closed_loop_connections"],
        mr = st["max_runs"],
        ms = st["max_secs"],
        fr = direct.map_or(f64::NAN, |d| f(&d["fixed_rate"]["rate"])),
        pct = f(&st["fixed_fraction_of_direct_max"]) * 100.0,
        fr_runs = st["fixed_runs"],
        fs = st["fixed_secs"],
        ss = st["sustained_secs"],
    )?;
    writeln!(
        md,
        "What *direct* leaves out: every other contender's packets cross the bridge twice and \
         the LB's veth pair once more in each direction, on the same two cores as everything \
         else. The *routed hop* measures exactly that: the client still connects to the \
         backends' own addresses, but a /32 route on each side sends every packet through the \
         LB namespace, whose kernel forwards it (no NAT, no XDP, no rules; `send_redirects = 0` \
         so the kernel does not tell the client to go direct, and the LB's `IpForwDatagrams` \
         is checked after every run: at least two forwarded datagrams per connection, or the \
         benchmark fails). It is the floor every balancer in this topology pays, so the \
         router's ratios to the routed hop are its own cost; the ratios to *direct* are upper \
         bounds on it.\n\n\
         Every run is framed by two readings of counters: the client namespace's \
         `TcpExtTCPSynRetrans` and `TcpRetransSegs` (a SYN sent again waited its 1 s \
         timeout), the LB namespace's and the backends' TCP/IP counters, the LB interface's \
         and its bridge peer's drops, and the router's per-reason counters; every run's \
         non-zero ones are in the JSON.\n"
    )?;
    let of_direct =
        |path: &[&str]| direct.map_or(f64::NAN, |d| f(path.iter().fold(d, |v, k| &v[*k])));
    let d_rate = of_direct(&["max_rate", "median_rate"]);
    let d_p99 = of_direct(&["max_rate", "median_p99_ms"]);
    let d_grate = of_direct(&["max_rate_in_tree", "median_rate"]);
    let d_gp99 = of_direct(&["max_rate_in_tree", "median_p99_ms"]);
    let d_fp99 = of_direct(&["fixed_rate", "median_p99_ms"]);
    writeln!(
        md,
        "| contender | max conn/s (wrk) | × direct | p50 / p99 / p99.9 ms (wrk) | p99 × direct | \
         in-tree max conn/s | × direct | p99 ms incl. handshake | p99 × direct | errors | \
         conn/req |\n\
         |---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    let mut bars = Vec::new();
    for c in l4["contenders"].as_array().into_iter().flatten() {
        let label = c["label"].as_str().unwrap_or("?");
        if let Some(why) = c["skipped"].as_str() {
            writeln!(md, "| {label} | skipped: {why} | | | | | | | | | |")?;
            continue;
        }
        let mx = &c["max_rate"];
        let g = &c["max_rate_in_tree"];
        let fx = &c["fixed_rate"];
        let rate = f(&mx["median_rate"]);
        let cpr: Vec<f64> = mx["backend_accepts_per_request"]
            .as_array()
            .into_iter()
            .chain(g["backend_accepts_per_request"].as_array())
            .flatten()
            .map(f)
            .collect();
        bars.push((c["contender"].as_str().unwrap_or("?").to_owned(), rate));
        writeln!(
            md,
            "| {label} | {rate:.0} | {:.2}× | {:.2} / {:.2} / {:.2} | {:.2}× | {:.0} | {:.2}× | {:.2} | {:.2}× | {} | {:.3} |",
            rate / d_rate,
            f(&mx["median_p50_ms"]),
            f(&mx["median_p99_ms"]),
            f(&mx["median_p999_ms"]),
            f(&mx["median_p99_ms"]) / d_p99,
            f(&g["median_rate"]),
            f(&g["median_rate"]) / d_grate,
            f(&g["median_p99_ms"]),
            f(&g["median_p99_ms"]) / d_gp99,
            mx["errors"].as_u64().unwrap_or(0)
                + g["errors"].as_u64().unwrap_or(0)
                + fx["errors"].as_u64().unwrap_or(0),
            median(&cpr),
        )?;
    }
    writeln!(
        md,
        "\nDirect over each contender, maximum rate (wrk): {}.\n",
        bars.iter()
            .filter(|(k, _)| k != "direct")
            .map(|(k, r)| format!("{k} {:.2}×", d_rate / r))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    routed_hop_table(md, l4)?;
    fixed_rate_table(md, l4, d_fp99)?;
    writeln!(
        md,
        "Sustained run ({} s at the maximum rate, wrk), new connections per second as the \
         backends accepted them:\n",
        st["sustained_secs"]
    )?;
    writeln!(
        md,
        "| contender | mean (wrk) | × direct | first 10 s | last 10 s | last / first | slowest second | p99 ms (wrk) | errors |\n\
         |---|---|---|---|---|---|---|---|---|"
    )?;
    let d_sus = of_direct(&["sustained", "rate"]);
    let mut series = Vec::new();
    for c in l4["contenders"].as_array().into_iter().flatten() {
        if c.get("skipped").is_some() {
            continue;
        }
        let s = &c["sustained"];
        let ps: Vec<f64> = s["backend_accepts_per_second"]
            .as_array()
            .into_iter()
            .flatten()
            .map(f)
            .collect();
        if ps.is_empty() {
            continue;
        }
        let w = ps.len().min(10);
        let first = mean(&ps[..w]);
        let last = mean(&ps[ps.len() - w..]);
        let slowest = ps.iter().copied().fold(f64::INFINITY, f64::min);
        writeln!(
            md,
            "| {} | {:.0} | {:.2}× | {first:.0} | {last:.0} | {:.2} | {slowest:.0} | {:.2} | {} |",
            c["label"].as_str().unwrap_or("?"),
            f(&s["rate"]),
            f(&s["rate"]) / d_sus,
            last / first,
            f(&s["p99_ms"]),
            s["errors"]
        )?;
        series.push((c["contender"].as_str().unwrap_or("?").to_owned(), ps));
    }
    md.push('\n');
    let ct: Vec<String> = l4["contenders"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["lb_conntrack_after_sustained"]["counters"].is_object())
        .map(|c| {
            let x = &c["lb_conntrack_after_sustained"];
            format!(
                "{} {} entries, drop {}, early_drop {}, insert_failed {}",
                c["contender"].as_str().unwrap_or("?"),
                x["entries"],
                x["counters"]["drop"],
                x["counters"]["early_drop"],
                x["counters"]["insert_failed"]
            )
        })
        .collect();
    if !ct.is_empty() {
        writeln!(
            md,
            "The LB's conntrack after the sustained run (`nf_conntrack_max` {}, TIME_WAIT entries \
             kept {} s; with masquerade each backend offers one LB address's ~64k source ports, \
             and an entry holds its port until it expires): {}.\n",
            l4["netfilter"]["nf_conntrack_max"].as_str().unwrap_or("?"),
            l4["netfilter"]["nf_conntrack_tcp_timeout_time_wait"]
                .as_str()
                .unwrap_or("?"),
            ct.join("; ")
        )?;
    }
    let links: Vec<String> = l4["contenders"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["lb_link_counters"].is_object())
        .map(|c| {
            let sum = |side: &str, k: &str| -> u64 {
                ["short_runs", "sustained"]
                    .iter()
                    .filter_map(|stage| c["lb_link_counters"][stage][side][k].as_u64())
                    .sum()
            };
            format!(
                "{} {} / {} / {} / {}",
                c["contender"].as_str().unwrap_or("?"),
                sum("lb", "rx_dropped"),
                sum("lb", "tx_dropped"),
                sum("lb_peer", "rx_dropped"),
                sum("lb_peer", "tx_dropped"),
            )
        })
        .collect();
    if !links.is_empty() {
        writeln!(
            md,
            "Frames dropped on the way through the LB, over both topologies (LB interface rx / \
             tx, its bridge-side peer rx / tx; a veth counts here the frames it could not hand \
             to its peer, such as XDP_TX into a full ring): {}.\n",
            links.join("; ")
        )?;
    }
    routed_hop_headline(head, l4)?;
    if let Some(r) = contender(l4, "router") {
        let rate = f(&r["max_rate"]["median_rate"]);
        let p99 = f(&r["max_rate"]["median_p99_ms"]);
        let gp99 = f(&r["max_rate_in_tree"]["median_p99_ms"]);
        let fp99 = f(&r["fixed_rate"]["median_p99_ms"]);
        let sus = f(&r["sustained"]["rate"]);
        writeln!(
            head,
            "| L4: router max connection rate (wrk) | {:.2}× direct | ≥ 0.9× | {} |",
            rate / d_rate,
            verdict(rate / d_rate >= 0.9)
        )?;
        writeln!(
            head,
            "| L4: router p99 latency over direct, max rate (wrk) | {:+.0}% | ≤ 10% | {} |",
            (p99 / d_p99 - 1.0) * 100.0,
            verdict(p99 / d_p99 <= 1.10)
        )?;
        writeln!(
            head,
            "| L4: router p99 latency over direct, max rate, handshake included | {:+.0}% | ≤ 10% | {} |",
            (gp99 / d_gp99 - 1.0) * 100.0,
            verdict(gp99 / d_gp99 <= 1.10)
        )?;
        writeln!(
            head,
            "| L4: router p99 latency over direct, fixed rate | {:+.0}% | ≤ 10% | {} |",
            (fp99 / d_fp99 - 1.0) * 100.0,
            verdict(fp99 / d_fp99 <= 1.10)
        )?;
        writeln!(
            head,
            "| L4: router sustained {} s rate | {:.2}× direct | — | |",
            st["sustained_secs"],
            sus / d_sus
        )?;
        for k in ["nftables", "iptables", "haproxy"] {
            if let Some(c) = contender(l4, k) {
                writeln!(
                    head,
                    "| L4: router / {k}: max rate, sustained rate | {:.2}×, {:.2}× | — | |",
                    rate / f(&c["max_rate"]["median_rate"]),
                    sus / f(&c["sustained"]["rate"])
                )?;
            }
        }
        if let Some(counters) = r["router_reason_counters"].as_object() {
            let odd: Vec<String> = counters
                .iter()
                .filter(|(k, _)| k.starts_with("drop") || k.contains("miss") || k.contains("fail"))
                .map(|(k, v)| format!("`{k}` {v}"))
                .collect();
            writeln!(
                md,
                "Router counters over both of its topologies (every reason counter is in the JSON): {}.\n",
                if odd.is_empty() {
                    "no drops, LRU misses or FIB failures".to_owned()
                } else {
                    odd.join(", ")
                }
            )?;
        }
    }
    writeln!(
        md,
        "![max rate](l4_max_rate.svg)\n\n![sustained](l4_sustained.svg)\n\n\
         How each peer is configured (full configs in `l4.json`): iptables and nftables are \
         kube-proxy's own rule shapes (KUBE-SVC chain with `statistic --mode random` \
         probabilities, or a `numgen random mod 4` verdict map to endpoint chains; \
         KUBE-MARK-MASQ and `masquerade --random-fully`), with the kernel's default conntrack \
         settings. HAProxy uses its documented TCP-mode defaults (`mode tcp`, `balance \
         roundrobin`, connect/client/server timeouts, threads = CPUs, maxconn from the file \
         limit), and its host (the LB namespace) the sysctls HAProxy's tuning notes recommend \
         for high connection rates: `tcp_tw_reuse = 1`, `ip_local_port_range = 1024 65023`, \
         `tcp_max_syn_backlog = 60000`. The client namespace, as any connection-rate benchmark \
         client, has `tcp_tw_reuse = 1` for every contender: wrk closes a connection itself when \
         it has read the whole response before the server's FIN, and without reuse its own \
         TIME_WAIT ports, not the balancer, capped the sustained rate (seen in development: \
         every contender but *direct* fell to under 1,000 connections/s after about 10 s). \
         Could be tuned further: a shorter `nf_conntrack_tcp_timeout_time_wait` or more \
         masquerade addresses for the netfilter contenders (kube-proxy sets neither), HAProxy \
         `tune.*` and CPU pinning, and nginx `reuseport` or more workers for every contender \
         alike. The router runs its documented configuration with a dedicated SNAT address and \
         a connection table sized per `docs/operations.md`.\n"
    )?;
    plot_bars(
        &dir.join("l4_max_rate.svg"),
        "Maximum new connections per second (wrk, median)",
        &bars,
    )?;
    plot_lines(
        &dir.join("l4_sustained.svg"),
        "Sustained maximum rate: connections the backends accepted per second",
        "second of the run",
        "connections / s",
        &series,
    )?;
    Ok(())
}
