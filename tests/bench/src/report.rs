//! `bench report`: one page, `RESULTS.md`, from the suites' raw JSON
//! (datapath, control, l4, routing) in the output directory, with SVG plots
//! beside it. Also the machine description every suite records.
//!
//! The page only reads what the suites wrote, so it can be rebuilt without
//! measuring again (`bench report`). A suite that did not run, or a
//! contender that was skipped, is said so on the page.

use std::{collections::BTreeMap, fmt::Write as _, path::Path, process::Command};

use anyhow::{Context as _, Result};
use plotters::prelude::*;
use serde_json::{Value, json};

/// Median of the samples that are numbers (NaN ones, a run that measured
/// nothing, are left out); NaN when none is. The one median of every suite.
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => s[n / 2],
        _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn first_line(cmd: &[&str]) -> String {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "not installed".into())
}

/// The machine: kernel, CPU, cores, memory, distribution, virtualisation.
pub fn machine_json() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let vm = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0 / 1024.0);
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    // SAFETY: sysconf has no memory effects.
    let nproc = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    json!({
        "commit": source_commit(),
        "kernel": first_line(&["uname", "-r"]),
        "cpu_model": cpu,
        "cpus_online": nproc,
        "memory_gib": mem_gib,
        "virtual_machine": vm,
        "os": os,
    })
}

/// The commit the benchmark binary's tree is at, with `-dirty` when the
/// work tree has changes: which code a recorded figure belongs to. Read
/// once, at the first call (the bench binary makes it at its start, right
/// after `cargo run` built it from that tree): an edit made while an hour
/// of benchmarks runs does not change what they measured.
pub fn source_commit() -> String {
    static COMMIT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    COMMIT.get_or_init(read_source_commit).clone()
}

fn read_source_commit() -> String {
    let root = router_testkit::fixtures::workspace_root();
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(head) => {
            // Recorded results in bench/ are outputs, not the code they measure.
            let dirty = git(&[
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":!bench",
            ])
            .is_some_and(|s| !s.is_empty());
            if dirty { format!("{head}-dirty") } else { head }
        }
        None => "unknown".into(),
    }
}

/// Versions of the peers, as the binaries report them.
pub fn peer_versions() -> Value {
    json!({
        "nginx": first_line(&["nginx", "-v"]),
        "haproxy": first_line(&["haproxy", "-v"]),
        "iptables": first_line(&["iptables", "--version"]),
        "nft": first_line(&["nft", "--version"]),
        "wrk": first_line(&["wrk", "-v"]),
    })
}

fn read_json(dir: &Path, name: &str) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join(name)).ok()?;
    serde_json::from_str(&text).ok()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

/// Writes `RESULTS.md` and the plots into `dir` from the JSON there.
pub fn write_report(dir: &Path, quick: bool) -> Result<()> {
    let dp = read_json(dir, "datapath.json");
    let ctl = read_json(dir, "control.json");
    let l4 = read_json(dir, "l4.json");
    let rt = read_json(dir, "routing.json");
    let mut md = String::new();
    let mut headline = String::new();
    writeln!(md, "# Benchmark results\n")?;
    writeln!(
        md,
        "Page built by `cargo xtask bench{}` on {} (UTC) from the suites' JSON in this \
         directory; a suite run on its own (`cargo xtask bench l4`) replaces only its own file, \
         so sections may come from different runs, but within a section every figure and its \
         reference come from one run. Every figure is the median of \
         repeated runs and is given as a ratio to its reference measured in the same run. \
         The raw numbers are in the JSON files beside this page; the plots are SVG files \
         beside it too.{}\n",
        if quick { " --quick" } else { "" },
        first_line(&["date", "-u", "+%Y-%m-%d %H:%M"]),
        if quick {
            " **Quick mode: runs far too short for the figures to mean anything; it only \
             shows that every benchmark still runs.**"
        } else {
            ""
        }
    )?;
    let m = machine_json();
    writeln!(md, "## Machine\n")?;
    // Which code each suite's figures belong to.
    let commits: Vec<String> = [
        ("datapath", dp.as_ref().map(|d| &d["commit"])),
        ("L4", l4.as_ref().map(|d| &d["machine"]["commit"])),
        ("routing", rt.as_ref().map(|d| &d["machine"]["commit"])),
    ]
    .into_iter()
    .map(|(suite, c)| {
        format!(
            "{suite} `{}`",
            c.and_then(Value::as_str).unwrap_or("not recorded")
        )
    })
    .collect();
    writeln!(md, "- Recorded at commits: {}.", commits.join(", "))?;
    writeln!(
        md,
        "- {} · {} CPUs online{} · {:.0} GiB memory · kernel `{}` · {}",
        m["cpu_model"].as_str().unwrap_or("?"),
        m["cpus_online"],
        if m["virtual_machine"].as_bool() == Some(true) {
            " (virtual machine)"
        } else {
            ""
        },
        f(&m["memory_gib"]),
        m["kernel"].as_str().unwrap_or("?"),
        m["os"].as_str().unwrap_or("?"),
    )?;
    let pv = peer_versions();
    writeln!(
        md,
        "- Peers (Debian packages): {}; {}; {}; {}; {}.",
        pv["nginx"].as_str().unwrap_or("?"),
        pv["haproxy"].as_str().unwrap_or("?"),
        pv["iptables"].as_str().unwrap_or("?"),
        pv["nft"].as_str().unwrap_or("?"),
        pv["wrk"].as_str().unwrap_or("?"),
    )?;
    writeln!(
        md,
        "- Everything (load generator, balancer, backends, replicas) shares these cores, \
         as on a single test host; absolute figures are this machine's, the ratios are what \
         carries over.\n"
    )?;

    let mut body = String::new();
    datapath_section(&mut body, &mut headline, dp.as_ref())?;
    placement_cost_section(&mut body, &mut headline, dir)?;
    l4_section(&mut body, &mut headline, l4.as_ref(), dir)?;
    routing_section(&mut body, &mut headline, rt.as_ref(), dir)?;
    control_section(&mut body, &mut headline, ctl.as_ref())?;
    writeln!(md, "## Headline\n")?;
    writeln!(md, "| measure | result | target | |\n|---|---|---|---|")?;
    md.push_str(&headline);
    md.push('\n');
    md.push_str(&body);
    std::fs::write(dir.join("RESULTS.md"), md).context("writing RESULTS.md")?;
    eprintln!("wrote {}", dir.join("RESULTS.md").display());
    Ok(())
}

fn datapath_section(md: &mut String, head: &mut String, dp: Option<&Value>) -> Result<()> {
    writeln!(md, "## 1. Datapath\n")?;
    let Some(dp) = dp else {
        writeln!(md, "Not run (no `datapath.json`).\n")?;
        return Ok(());
    };
    writeln!(
        md,
        "ns per packet through BPF_PROG_TEST_RUN, as a ratio to a trivial XDP_PASS program \
         measured in the same run ([datapath.md](datapath.md) has the method and min–max).\n"
    )?;
    writeln!(
        md,
        "| path | mode | ns/packet | ratio to XDP_PASS | target | result |\n|---|---|---|---|---|---|"
    )?;
    for r in dp["summary"].as_array().into_iter().flatten() {
        let target = r["target_ratio"]
            .as_f64()
            .map(|t| format!("≤ {t}×"))
            .unwrap_or_else(|| "—".into());
        writeln!(
            md,
            "| {} | {} | {:.1} | {:.2}× | {target} | {} |",
            r["path"].as_str().unwrap_or("?"),
            r["mode"].as_str().unwrap_or("?"),
            f(&r["ns_median"]),
            f(&r["ratio_median"]),
            r["result"].as_str().unwrap_or("—"),
        )?;
        if r["mode"] == "single"
            && let Some(t) = r["target_ratio"].as_f64()
        {
            writeln!(
                head,
                "| datapath: {} | {:.2}× XDP_PASS | ≤ {t}× | {} |",
                r["path"].as_str().unwrap_or("?"),
                f(&r["ratio_median"]),
                verdict(f(&r["ratio_median"]) <= t)
            )?;
        }
    }
    md.push('\n');
    Ok(())
}

/// The SYN path against the program before in-flight counting and
/// least-loaded selection: alternating invocations of the datapath
/// benchmark at this commit and at the commit before (`datapath_ab/`,
/// `new-N.json` and `old-N.json`), each path as its ratio to XDP_PASS in
/// its own invocation, and per pair the ratio of the two. Invocations
/// drift by several percent on this VM, so one pair proves little; the
/// median over the pairs is the figure.
fn placement_cost_section(md: &mut String, head: &mut String, dir: &Path) -> Result<()> {
    let ab = dir.join("datapath_ab");
    let mut pairs = Vec::new();
    for i in 1.. {
        match (
            read_json(&ab, &format!("new-{i}.json")),
            read_json(&ab, &format!("old-{i}.json")),
        ) {
            (Some(n), Some(o)) => pairs.push((n, o)),
            _ => break,
        }
    }
    if pairs.is_empty() {
        return Ok(());
    }
    let ratio = |doc: &Value, path: &str| {
        doc["summary"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["path"] == path && r["mode"] == "single")
            .and_then(|r| r["ratio_median"].as_f64())
    };
    writeln!(
        md,
        "### The SYN path before and after placement\n\n\
         {} alternating invocations of `bench datapath` at this commit (`{}`) and at the \
         commit before in-flight counting and least-loaded selection ({}), in \
         `datapath_ab/`. Each path is a ratio to XDP_PASS measured in its own \
         invocation; the table gives, per pair, that ratio over the old SYN path's, \
         median and min–max over the pairs. Goal: the new SYN path at most 1.10× the \
         old.\n",
        pairs.len(),
        pairs[0].0["commit"].as_str().unwrap_or("?"),
        pairs[0].1["commit"].as_str().unwrap_or("?"),
    )?;
    writeln!(md, "| path | × before, median (min–max) |\n|---|---|")?;
    let paths: Vec<String> = pairs[0].0["summary"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["mode"] == "single")
        .filter_map(|r| r["path"].as_str())
        .filter(|p| p.starts_with("SYN") || *p == "established TCP forward")
        .map(str::to_owned)
        .collect();
    let mut medians = BTreeMap::new();
    for path in &paths {
        // The established path is compared with the old established path.
        let old_path = if path.starts_with("SYN") {
            "SYN new flow"
        } else {
            path.as_str()
        };
        let per_pair: Vec<f64> = pairs
            .iter()
            .filter_map(|(n, o)| Some(ratio(n, path)? / ratio(o, old_path)?))
            .collect();
        if per_pair.is_empty() {
            continue;
        }
        let m = median(&per_pair);
        let (lo, hi) = per_pair
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
                (a.min(*x), b.max(*x))
            });
        writeln!(md, "| {path} | {m:.2}× ({lo:.2}–{hi:.2}) |")?;
        medians.insert(path.clone(), m);
    }
    md.push('\n');
    for (path, label) in [
        (
            "SYN new flow (Maglev, 3 backends)",
            "SYN, Maglev (with counting)",
        ),
        (
            "SYN, least-loaded scan, 4 backends",
            "SYN, least-loaded, 4 backends",
        ),
        (
            "SYN, least-loaded scan, 8 backends",
            "SYN, least-loaded, 8 backends (largest scan)",
        ),
        (
            "SYN, least-loaded two choices, 16 backends",
            "SYN, least-loaded two choices, 16 backends",
        ),
    ] {
        if let Some(m) = medians.get(path) {
            writeln!(
                head,
                "| datapath: {label} vs before placement | {m:.2}× | ≤ 1.10× | {} |",
                verdict(*m <= 1.10)
            )?;
        }
    }
    Ok(())
}

fn contender<'a>(l4: &'a Value, key: &str) -> Option<&'a Value> {
    l4["contenders"]
        .as_array()?
        .iter()
        .find(|c| c["contender"] == key && c.get("skipped").is_none())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn l4_section(md: &mut String, head: &mut String, l4: Option<&Value>, dir: &Path) -> Result<()> {
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
         else. On this CPU-bound single host that extra hop is part of every balancer's cost, \
         so the ratios to *direct* are upper bounds on the balancers' own overhead; the ratios \
         between balancers compare like with like.\n"
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
         in-tree max conn/s | × direct | p99 ms incl. handshake | p99 × direct | \
         fixed rate p50 / p99 / p99.9 ms | p99 × direct | errors | conn/req |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    let mut bars = Vec::new();
    for c in l4["contenders"].as_array().into_iter().flatten() {
        let label = c["label"].as_str().unwrap_or("?");
        if let Some(why) = c["skipped"].as_str() {
            writeln!(md, "| {label} | skipped: {why} | | | | | | | | | | | |")?;
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
            "| {label} | {rate:.0} | {:.2}× | {:.2} / {:.2} / {:.2} | {:.2}× | {:.0} | {:.2}× | {:.2} | {:.2}× | {:.2} / {:.2} / {:.2} | {:.2}× | {} | {:.3} |",
            rate / d_rate,
            f(&mx["median_p50_ms"]),
            f(&mx["median_p99_ms"]),
            f(&mx["median_p999_ms"]),
            f(&mx["median_p99_ms"]) / d_p99,
            f(&g["median_rate"]),
            f(&g["median_rate"]) / d_grate,
            f(&g["median_p99_ms"]),
            f(&g["median_p99_ms"]) / d_gp99,
            f(&fx["median_p50_ms"]),
            f(&fx["median_p99_ms"]),
            f(&fx["median_p999_ms"]),
            f(&fx["median_p99_ms"]) / d_fp99,
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

fn routing_section(
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

fn control_section(md: &mut String, head: &mut String, ctl: Option<&Value>) -> Result<()> {
    writeln!(md, "## 4. Control plane\n")?;
    let Some(ctl) = ctl else {
        writeln!(md, "Not run (no `control.json`).\n")?;
        return Ok(());
    };
    writeln!(
        md,
        "From [control.md](control.md), which has the method. Maglev rebuild, median of \
         repeated builds, and its ratio to the 10-backend build in the same run:\n"
    )?;
    writeln!(
        md,
        "| backends | slots | ms | × 10 backends |\n|---|---|---|---|"
    )?;
    let rows: Vec<&Value> = ctl["maglev_rebuild"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let base = rows
        .iter()
        .find(|r| r["backends"] == 10)
        .map_or(f64::NAN, |r| f(&r["median_ms"]));
    for r in &rows {
        writeln!(
            md,
            "| {} | {} | {:.2} | {:.2}× |",
            r["backends"],
            r["table_size"],
            f(&r["median_ms"]),
            f(&r["median_ms"]) / base
        )?;
        if r["backends"] == 1000 && r["table_size"] == 65537 {
            writeln!(
                head,
                "| control: Maglev rebuild, 1,000 backends | {:.2} ms | < 10 ms | {} |",
                f(&r["median_ms"]),
                verdict(f(&r["median_ms"]) < 10.0)
            )?;
        }
    }
    let p = &ctl["polling"];
    writeln!(
        md,
        "\nDaemon polling {} endpoints at {} Hz: {:.2}% of one core, {:.1} MiB RSS, {} failed polls \
         of {}.\n\nReaction from the first saturated reading to the weight halved: {} polls.\n",
        p["backends"],
        p["hz"],
        f(&p["cpu_percent"]),
        f(&p["rss_mib"]),
        p["poll_errors"],
        p["polls"],
        ctl["reaction_polls"],
    )?;
    writeln!(
        head,
        "| control: daemon CPU, 64 backends at 4 Hz | {:.2}% of a core, {:.1} MiB | < 2% | {} |",
        f(&p["cpu_percent"]),
        f(&p["rss_mib"]),
        verdict(f(&p["cpu_percent"]) < 2.0)
    )?;
    writeln!(
        head,
        "| control: reaction, saturation → weight halved | {} polls | ≤ 2 | {} |",
        ctl["reaction_polls"],
        verdict(ctl["reaction_polls"].as_u64().is_some_and(|n| n <= 2))
    )?;
    Ok(())
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn nice_max(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 {
        v * 1.15
    } else {
        1.0
    }
}

/// A horizontal-axis-categories bar chart.
fn plot_bars(path: &Path, title: &str, bars: &[(String, f64)]) -> Result<()> {
    plot_groups(path, title, &[(String::new(), bars.to_vec())])
}

/// Grouped bars: one group per entry, one bar per (name, value).
fn plot_groups(path: &Path, title: &str, groups: &[(String, Vec<(String, f64)>)]) -> Result<()> {
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let per = groups.iter().map(|g| g.1.len()).max().unwrap_or(1).max(1);
    let ymax = nice_max(
        groups
            .iter()
            .flat_map(|g| g.1.iter().map(|b| b.1))
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max),
    );
    let width = (groups.len() * (per + 1)) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..width, 0.0..ymax)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(plot_err)?;
    let names: Vec<String> = groups
        .first()
        .map(|g| g.1.iter().map(|b| b.0.clone()).collect())
        .unwrap_or_default();
    for (gi, (gname, bars)) in groups.iter().enumerate() {
        let x0 = (gi * (per + 1)) as f64 + 0.5;
        for (bi, (_, v)) in bars.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let x = x0 + bi as f64;
            let color = COLORS[bi % COLORS.len()];
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x, 0.0), (x + 0.8, *v)],
                    color.filled(),
                )))
                .map_err(plot_err)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{v:.0}"),
                    (x + 0.1, *v + ymax * 0.01),
                    ("sans-serif", 12),
                )))
                .map_err(plot_err)?;
        }
        if !gname.is_empty() {
            chart
                .draw_series(std::iter::once(Text::new(
                    gname.clone(),
                    (x0, -ymax * 0.0),
                    ("sans-serif", 14),
                )))
                .map_err(plot_err)?;
        }
    }
    for (bi, name) in names.iter().enumerate() {
        let color = COLORS[bi % COLORS.len()];
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, 0.0), (0.0, 0.0)],
                color.filled(),
            )))
            .map_err(plot_err)?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// One line per series of per-second values.
fn plot_lines(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[(String, Vec<f64>)],
) -> Result<()> {
    let xy: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.iter()
                    .enumerate()
                    .map(|(i, y)| (i as f64 + 0.5, *y))
                    .collect(),
            )
        })
        .collect();
    plot_xy(path, title, xlabel, ylabel, &xy)
}

fn plot_xy(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let pts = || {
        series
            .iter()
            .flat_map(|s| s.1.iter())
            .filter(|p| p.0.is_finite() && p.1.is_finite())
    };
    let xmax = pts().map(|p| p.0).fold(0.0, f64::max).ceil();
    let ymax = nice_max(pts().map(|p| p.1).fold(0.0, f64::max));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..xmax.max(1.0), 0.0..ymax)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc(xlabel)
        .y_desc(ylabel)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(plot_err)?;
    for (i, (name, s)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                s.iter()
                    .copied()
                    .filter(|p| p.0.is_finite() && p.1.is_finite()),
                color.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a plot: {e:?}")
}

#[cfg(test)]
mod tests {
    use super::{RatioCi, median, routing_section};
    use serde_json::json;

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

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
    }
}
