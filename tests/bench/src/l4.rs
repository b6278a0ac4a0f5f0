//! `bench l4`: new connections per second and request latency through the
//! router and its L4 peers, on one topology and the same nginx backends.
//!
//! Contenders, each on a fresh copy of the one-arm topology (client, LB,
//! four backend namespaces on a bridge) with four nginx backends (one worker
//! each): the client straight to the backends (the limit); the routed hop
//! (the client still connects to the backends' own addresses, but every
//! packet is forwarded by the LB namespace's kernel: no NAT, no XDP, the
//! floor every balancer in this topology pays); the router (XDP NAT with
//! SNAT); iptables DNAT with `statistic` random and masquerade, as
//! kube-proxy's iptables mode writes it; nftables DNAT with `numgen` and
//! masquerade, as kube-proxy's nftables mode writes it; HAProxy in TCP mode
//! with roundrobin. Every request is a new TCP connection (`Connection:
//! close`), from the in-tree generator in `loadgen`.
//!
//! Per contender: the maximum rate with wrk (Debian's, `-t4 -c16`,
//! `Connection: close`: wrk reconnects after every response, and nginx's
//! accept counter confirms one connection per request); the same with the
//! in-tree generator (`loadgen`), whose latency includes the handshake;
//! open-loop runs at a fixed rate with the in-tree generator (wrk has no
//! fixed-rate mode), a fraction of the direct maximum and the same for
//! everyone; then, on a fresh topology, one long wrk run at the maximum rate
//! with the backends' accept counters read every second, which shows what
//! NAT port space, conntrack and the backends' TIME_WAIT do to a sustained
//! connection rate. Every run is framed by two readings of the client's,
//! the LB's and the backends' TCP/IP counters, the LB link's and the
//! router's ([`probe`]): a SYN the client had to send again is counted and
//! can be placed.

mod contenders;
mod probe;

use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use router_testkit::{
    daemon_proc::{ScratchDir, status},
    netns::{self, ChildGuard, Topology},
};

use crate::{
    loadgen::{self, RunResult},
    peers::{self, NGINX, WRK},
    report::median,
};

pub use contenders::Contender;
use contenders::{
    BACKENDS, Front, PORT, backend_targets, haproxy_config, iptables_rules, nft_rules,
    router_config, setup_front, vip,
};
use probe::{RunCounters, Snapshot, link_drops};
/// Connections in flight at the maximum rate (wrk's `-c`, and the in-tree
/// generator's closed loop).
pub const CONNS: usize = 16;
/// wrk threads: one per backend, so the direct run can give each thread
/// its own backend.
const WRK_THREADS: usize = BACKENDS;
/// In-tree generator threads: the machine has two cores, shared with
/// everything else.
const GEN_THREADS: usize = 2;
/// The fixed rate, as a fraction of the direct maximum measured first: low
/// enough that every contender (and the in-tree generator) has headroom.
const FIXED_FRACTION: f64 = 0.2;
const MAX_IN_FLIGHT: usize = 2_000;

pub struct L4Settings {
    pub quick: bool,
    /// Maximum-rate runs, each with wrk and with the in-tree generator.
    pub max_runs: usize,
    pub max_secs: u64,
    pub fixed_runs: usize,
    pub fixed_secs: u64,
    pub sustained_secs: u64,
}

impl L4Settings {
    pub fn full() -> Self {
        Self {
            quick: false,
            max_runs: 3,
            max_secs: 3,
            fixed_runs: 3,
            fixed_secs: 3,
            sustained_secs: 60,
        }
    }

    pub fn quick() -> Self {
        Self {
            quick: true,
            max_runs: 1,
            max_secs: 1,
            fixed_runs: 1,
            fixed_secs: 1,
            sustained_secs: 1,
        }
    }
}

/// One run's figures, as recorded in the JSON.
fn run_json(r: &RunResult, counters: &RunCounters, with_timeline: bool) -> Value {
    let mut v = json!({
        "seconds": r.elapsed_s,
        "ok": r.ok,
        "errors": r.errors,
        "overflow": r.overflow,
        "rate": r.rate(),
        "p50_ms": r.latency_ms(50.0),
        "p99_ms": r.latency_ms(99.0),
        "p999_ms": r.latency_ms(99.9),
        "start_lag_p99_us": r.start_lag_p99_us,
        "error_samples": r.error_samples,
        "counters": counters.json(),
    });
    if with_timeline {
        v["per_second"] = json!(r.per_second);
    }
    v
}

fn sum_accepts(topo: &Topology) -> Result<u64> {
    let mut n = 0;
    for i in 0..BACKENDS {
        n += peers::nginx_accepts(topo.backend_ns(i), netns::backend_addr(i), PORT)?;
    }
    Ok(n)
}

/// The LB namespace's conntrack figures: entries in the table and the
/// per-CPU event counters that mean a packet was dropped for want of an
/// entry (summed over CPUs). Null where the namespace has no conntrack.
fn conntrack_stats(ns: &str) -> Value {
    let count = netns::exec(ns, &["cat", "/proc/sys/net/netfilter/nf_conntrack_count"])
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let Ok(stat) = netns::exec(ns, &["cat", "/proc/net/stat/nf_conntrack"]) else {
        return Value::Null;
    };
    let mut lines = stat.lines();
    let Some(header) = lines.next() else {
        return Value::Null;
    };
    let names: Vec<&str> = header.split_whitespace().collect();
    let mut sums: BTreeMap<&str, u64> = BTreeMap::new();
    for line in lines {
        for (name, v) in names.iter().zip(line.split_whitespace()) {
            if matches!(*name, "drop" | "early_drop" | "insert_failed" | "clashres") {
                *sums.entry(name).or_default() += u64::from_str_radix(v, 16).unwrap_or(0);
            }
        }
    }
    json!({ "entries": count, "counters": sums })
}

/// wrk's Lua script: report p99.9 too, and where the client connects to
/// the backends (`direct`, `routed`) give each thread its own backend (wrk
/// has one target otherwise).
fn wrk_script(dir: &Path, per_backend: bool) -> Result<std::path::PathBuf> {
    let mut lua = String::new();
    if per_backend {
        let addrs: Vec<String> = (0..BACKENDS)
            .map(|i| format!("\"{}\"", netns::backend_addr(i)))
            .collect();
        lua.push_str(&format!(
            "local addrs = {{ {} }}\nlocal n = 0\n\
             function setup(thread)\n  n = n + 1\n  \
             thread.addr = wrk.lookup(addrs[(n - 1) % #addrs + 1], \"{PORT}\")[1]\nend\n",
            addrs.join(", ")
        ));
    }
    lua.push_str(
        "function done(summary, latency, requests)\n  \
         io.write(string.format(\"p999_us %d\\n\", latency:percentile(99.9)))\nend\n",
    );
    let path = dir.join(if per_backend {
        "backends.lua"
    } else {
        "vip.lua"
    });
    std::fs::write(&path, lua)?;
    Ok(path)
}

fn wrk_json(r: &peers::WrkResult, counters: &RunCounters) -> Value {
    json!({
        "requests": r.requests, "rate": r.rate, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
        "p999_ms": r.p999_ms, "errors": r.errors, "counters": counters.json(),
    })
}

/// A group of runs' counters summed, for the group's JSON: the client's
/// SYN and segment retransmits and the LB's forwarded datagrams.
fn counter_sums(runs: &[RunCounters]) -> Value {
    json!({
        "client_syn_retrans": runs.iter().map(RunCounters::syn_retrans).sum::<u64>(),
        "client_retrans_segs": runs.iter().map(RunCounters::retrans_segs).sum::<u64>(),
        "lb_forwarded": runs.iter().map(RunCounters::forwarded).sum::<u64>(),
    })
}

/// One contender on a fresh topology: backends, front, targets. Dropping
/// it stops everything and deletes the namespaces (with their rules and
/// conntrack state).
struct Stage {
    // Field order is drop order: front, backends, scratch dir, topology.
    front: Front,
    _backends: Vec<ChildGuard>,
    dir: ScratchDir,
    topo: Topology,
    targets: Vec<SocketAddr>,
}

impl Stage {
    fn new(c: Contender, tag: &str) -> Result<Stage> {
        let topo = Topology::one_arm(BACKENDS)?;
        let dir = ScratchDir::new(&format!("bench-l4-{}-{tag}", c.key()))?;
        let backends: Vec<ChildGuard> = (0..BACKENDS)
            .map(|i| peers::start_nginx(topo.backend_ns(i), netns::backend_addr(i), PORT, &dir.0))
            .collect::<Result<_>>()?;
        // The load generator's host, tuned as for any connection-rate
        // benchmark client, alike for every contender: wrk closes a
        // connection itself when it has the whole response before the
        // server's FIN, which leaves the client's port in TIME_WAIT for 60 s;
        // without reuse, the client runs out of ports to the VIP long
        // before any balancer does.
        netns::in_netns(topo.client_ns(), || {
            std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")
        })?
        .context("setting tcp_tw_reuse in the client namespace")?;
        let front = setup_front(c, &topo, &dir.0)?;
        let targets = if c.to_backends() {
            backend_targets()
        } else {
            vec![vip()]
        };
        Ok(Stage {
            front,
            _backends: backends,
            dir,
            topo,
            targets,
        })
    }

    fn closed(&self, secs: u64) -> Result<RunResult> {
        loadgen::in_ns(self.topo.client_ns(), GEN_THREADS, || {
            loadgen::closed_loop(&self.targets, CONNS, Duration::from_secs(secs))
        })
    }

    /// wrk at the maximum rate for `secs` (for `direct` and `routed` the
    /// script points each thread at its own backend).
    fn wrk(&self, c: Contender, secs: u64) -> Result<peers::WrkResult> {
        let script = wrk_script(&self.dir.0, c.to_backends())?;
        let url = format!("http://{}/", self.targets[0]);
        peers::run_wrk(
            self.topo.client_ns(),
            &url,
            WRK_THREADS,
            CONNS,
            secs,
            Some(&script),
        )
    }

    fn open(&self, rate: f64, secs: u64) -> Result<RunResult> {
        loadgen::in_ns(self.topo.client_ns(), GEN_THREADS, || {
            loadgen::open_loop(
                &self.targets,
                rate,
                Duration::from_secs(secs),
                MAX_IN_FLIGHT,
            )
        })
    }

    fn router_socket(&self) -> Option<&Path> {
        match &self.front {
            Front::Router(_, socket) => Some(socket),
            _ => None,
        }
    }

    /// Runs `run` between two readings of every counter (client, LB,
    /// backends, the LB's link, the router's reasons).
    fn measured<T>(&self, run: impl FnOnce() -> Result<T>) -> Result<(T, RunCounters)> {
        let before = Snapshot::take(&self.topo, self.router_socket())?;
        let r = run()?;
        let after = Snapshot::take(&self.topo, self.router_socket())?;
        Ok((r, after.since(&before)))
    }

    fn link_drops(&self) -> Value {
        link_drops(&self.topo)
    }

    /// The router's non-zero reason counters (empty for other fronts); stops
    /// the daemon so it detaches before the namespaces go.
    fn finish(self) -> Result<BTreeMap<String, u64>> {
        let mut counters = BTreeMap::new();
        if let Front::Router(daemon, socket) = self.front {
            let st = status(&socket)?;
            for (name, v) in st.datapath.reasons {
                if v > 0 {
                    counters.insert(name, v);
                }
            }
            daemon.stop(Duration::from_secs(10))?;
        }
        Ok(counters)
    }
}

/// TCP sockets in TIME_WAIT in `ns` (0 when `ss` fails).
fn time_wait(ns: &str) -> usize {
    netns::exec(ns, &["ss", "-tanH", "state", "time-wait"]).map_or(0, |o| o.lines().count())
}

/// Between runs: sockets of the last run finish closing.
fn pause(quick: bool) {
    std::thread::sleep(Duration::from_millis(if quick { 100 } else { 500 }));
}

/// For the routed hop, fails unless the LB namespace forwarded every packet
/// the client sent or received (its `IpOutRequests` + `IpInReceives`; 5%
/// slack for a reading taken while packets are in flight), and at least
/// two datagrams per connection: if the client or a backend went direct
/// (an ICMP redirect, a missing route), one direction or both would skip
/// the LB and the contender would measure *direct* under another name.
fn check_hop(c: Contender, what: &str, counters: &RunCounters, connections: u64) -> Result<()> {
    if c != Contender::Routed {
        return Ok(());
    }
    let client = counters.client_packets();
    anyhow::ensure!(
        counters.forwarded() * 100 >= client * 95 && counters.forwarded() >= 2 * connections,
        "routed {what}: the LB forwarded {} datagrams while the client sent and received {client} \
         packets over {connections} connections (ICMP redirects sent: {}): the hop was bypassed",
        counters.forwarded(),
        counters.lb.get("IcmpOutRedirects"),
    );
    Ok(())
}

/// Runs every measurement of one contender. `fixed_rate` is the open-loop
/// rate; `None` (for `direct`, which keeps no NAT state) measures the
/// maximum first and derives it.
///
/// Order on the first topology: fixed-rate runs, then the maximum-rate runs
/// (direct: maximum rate first). So the latency at a modest fixed rate is
/// measured before NAT state from the maximum-rate runs builds up; that
/// state carries from one maximum-rate run into the next, as on a real node.
/// The sustained run gets a fresh topology, so its rate develops from a
/// clean state. Every run is framed by two readings of the counters
/// ([`probe`]), recorded with it.
fn run_contender(c: Contender, s: &L4Settings, fixed_rate: Option<f64>) -> Result<Value> {
    peers::ensure(&c.peers())?;
    let stage = Stage::new(c, "short")?;
    // Warm-up: neighbours resolved, every process paged in (the quick
    // mode's first run doubles as its warm-up).
    if !s.quick {
        stage.closed(1)?;
    }
    let mut wrk_runs = Vec::new();
    let mut wrk_cpr = Vec::new();
    let mut gen_runs = Vec::new();
    let mut gen_cpr = Vec::new();
    let mut fixed_runs = Vec::new();
    let fixed = |rate: f64, fixed_runs: &mut Vec<(RunResult, RunCounters)>| -> Result<()> {
        for i in 0..s.fixed_runs {
            pause(s.quick);
            let (r, k) = stage.measured(|| stage.open(rate, s.fixed_secs))?;
            check_hop(c, "fixed-rate run", &k, r.ok + r.errors)?;
            eprintln!(
                "  {} fixed-rate run {}/{} at {rate:.0}/s: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, \
                 {} errors, {} SYN retransmits",
                c.key(),
                i + 1,
                s.fixed_runs,
                r.latency_ms(50.0),
                r.latency_ms(99.0),
                r.latency_ms(99.9),
                r.errors,
                k.syn_retrans(),
            );
            fixed_runs.push((r, k));
        }
        Ok(())
    };
    if let Some(rate) = fixed_rate {
        fixed(rate, &mut fixed_runs)?;
    }
    // The stub_status requests themselves are connections too.
    let accepted = |before: u64| -> Result<u64> {
        Ok(sum_accepts(&stage.topo)?.saturating_sub(before + BACKENDS as u64))
    };
    for i in 0..s.max_runs {
        pause(s.quick);
        let before = sum_accepts(&stage.topo)?;
        let (w, wk) = stage.measured(|| stage.wrk(c, s.max_secs))?;
        check_hop(c, "wrk run", &wk, w.requests)?;
        wrk_cpr.push(accepted(before)? as f64 / w.requests.max(1) as f64);
        pause(s.quick);
        let before = sum_accepts(&stage.topo)?;
        let (g, gk) = stage.measured(|| stage.closed(s.max_secs))?;
        anyhow::ensure!(
            g.ok > 0,
            "{}: no request succeeded: {:?}",
            c.key(),
            g.error_samples
        );
        check_hop(c, "in-tree max-rate run", &gk, g.ok + g.errors)?;
        gen_cpr.push(accepted(before)? as f64 / (g.ok + g.errors).max(1) as f64);
        eprintln!(
            "  {} max-rate run {}/{}: wrk {:.0} conn/s (p99 {:.2} ms), in-tree {:.0} conn/s (p99 {:.2} ms), \
             {} errors, {} SYN retransmits",
            c.key(),
            i + 1,
            s.max_runs,
            w.rate,
            w.p99_ms,
            g.rate(),
            g.latency_ms(99.0),
            w.errors + g.errors,
            wk.syn_retrans() + gk.syn_retrans(),
        );
        wrk_runs.push((w, wk));
        gen_runs.push((g, gk));
    }
    let max_rate = median(&wrk_runs.iter().map(|(r, _)| r.rate).collect::<Vec<_>>());
    let fixed_rate = match fixed_rate {
        Some(r) => r,
        None => {
            let r = ((max_rate * FIXED_FRACTION) / 100.0).round().max(1.0) * 100.0;
            fixed(r, &mut fixed_runs)?;
            r
        }
    };
    let short_links = stage.link_drops();
    let mut router_counters = stage.finish()?;

    let stage = Stage::new(c, "sustained")?;
    let ((sustained, per_second), sk) = stage.measured(|| {
        std::thread::scope(|scope| -> Result<_> {
            let run = scope.spawn(|| stage.wrk(c, s.sustained_secs));
            // The backends' accept counters, once a second: the rate as the
            // backends see it, whatever the generator reports.
            let mut per_second = Vec::new();
            let mut last = sum_accepts(&stage.topo)?;
            let start = std::time::Instant::now();
            for sec in 1..=s.sustained_secs {
                let due = start + Duration::from_secs(sec);
                std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
                let now = sum_accepts(&stage.topo)?;
                per_second.push(now.saturating_sub(last + BACKENDS as u64));
                last = now;
            }
            let r = run
                .join()
                .map_err(|_| anyhow::anyhow!("wrk thread panicked"))??;
            Ok((r, per_second))
        })
    })?;
    check_hop(c, "sustained run", &sk, sustained.requests)?;
    eprintln!(
        "  {} sustained {} s: {:.0} conn/s mean, {} errors, {} SYN retransmits",
        c.key(),
        s.sustained_secs,
        sustained.rate,
        sustained.errors,
        sk.syn_retrans(),
    );
    let conntrack = conntrack_stats(stage.topo.lb_ns());
    let sustained_links = stage.link_drops();
    let time_wait = json!({
        "client": time_wait(stage.topo.client_ns()),
        "lb": time_wait(stage.topo.lb_ns()),
        "backends": (0..BACKENDS).map(|i| time_wait(stage.topo.backend_ns(i))).sum::<usize>(),
    });
    for (k, v) in stage.finish()? {
        *router_counters.entry(k).or_default() += v;
    }
    let counters = |runs: &[(RunResult, RunCounters)]| {
        counter_sums(&runs.iter().map(|(_, k)| k.clone()).collect::<Vec<_>>())
    };
    let med = |f: fn(&RunResult) -> f64, runs: &[(RunResult, RunCounters)]| {
        median(&runs.iter().map(|(r, _)| f(r)).collect::<Vec<_>>())
    };
    let wmed = |f: fn(&peers::WrkResult) -> f64| {
        median(&wrk_runs.iter().map(|(r, _)| f(r)).collect::<Vec<_>>())
    };
    let wrk_counters: Vec<RunCounters> = wrk_runs.iter().map(|(_, k)| k.clone()).collect();
    Ok(json!({
        "contender": c.key(),
        "label": c.label(),
        "max_rate": {
            "generator": "wrk",
            "median_rate": max_rate,
            "median_p50_ms": wmed(|r| r.p50_ms),
            "median_p99_ms": wmed(|r| r.p99_ms),
            "median_p999_ms": wmed(|r| r.p999_ms),
            "errors": wrk_runs.iter().map(|(r, _)| r.errors).sum::<u64>(),
            "backend_accepts_per_request": wrk_cpr,
            "counters": counter_sums(&wrk_counters),
            "runs": wrk_runs.iter().map(|(r, k)| wrk_json(r, k)).collect::<Vec<_>>(),
        },
        "max_rate_in_tree": {
            "generator": "in-tree closed loop",
            "median_rate": med(RunResult::rate, &gen_runs),
            "median_p50_ms": med(|r| r.latency_ms(50.0), &gen_runs),
            "median_p99_ms": med(|r| r.latency_ms(99.0), &gen_runs),
            "median_p999_ms": med(|r| r.latency_ms(99.9), &gen_runs),
            "errors": gen_runs.iter().map(|(r, _)| r.errors).sum::<u64>(),
            "backend_accepts_per_request": gen_cpr,
            "counters": counters(&gen_runs),
            "runs": gen_runs.iter().map(|(r, k)| run_json(r, k, false)).collect::<Vec<_>>(),
        },
        "fixed_rate": {
            "generator": "in-tree open loop",
            "rate": fixed_rate,
            "median_p50_ms": med(|r| r.latency_ms(50.0), &fixed_runs),
            "median_p99_ms": med(|r| r.latency_ms(99.0), &fixed_runs),
            "median_p999_ms": med(|r| r.latency_ms(99.9), &fixed_runs),
            "errors": fixed_runs.iter().map(|(r, _)| r.errors).sum::<u64>(),
            "connections": fixed_runs.iter().map(|(r, _)| r.ok + r.errors).sum::<u64>(),
            "counters": counters(&fixed_runs),
            "runs": fixed_runs.iter().map(|(r, k)| run_json(r, k, false)).collect::<Vec<_>>(),
        },
        "sustained": {
            "generator": "wrk",
            "seconds": s.sustained_secs,
            "rate": sustained.rate,
            "requests": sustained.requests,
            "errors": sustained.errors,
            "p50_ms": sustained.p50_ms,
            "p99_ms": sustained.p99_ms,
            "p999_ms": sustained.p999_ms,
            "backend_accepts_per_second": per_second,
            "counters": counter_sums(std::slice::from_ref(&sk)),
            "run_counters": sk.json(),
        },
        "router_reason_counters": router_counters,
        "lb_conntrack_after_sustained": conntrack,
        "time_wait_after_sustained": time_wait,
        "lb_link_counters": { "short_runs": short_links, "sustained": sustained_links },
    }))
}

fn read_trim(path: &str) -> Value {
    std::fs::read_to_string(path).map_or(Value::Null, |s| json!(s.trim()))
}

/// Runs every contender and writes `l4.json` into `out_dir`. A contender
/// whose peers cannot be installed is recorded as skipped, with the reason.
pub fn run_l4(s: &L4Settings, out_dir: &Path, only: Option<&[String]>) -> Result<Value> {
    eprintln!(
        "bench l4: {} × {} s max rate, {} × {} s fixed rate, {} s sustained, per contender{}",
        s.max_runs,
        s.max_secs,
        s.fixed_runs,
        s.fixed_secs,
        s.sustained_secs,
        if s.quick { " (quick)" } else { "" }
    );
    // Every contender needs the backends and the load generator. Without
    // them a quick (CI) run says so and goes on; a full run fails.
    if let Err(e) = peers::ensure(&[NGINX, WRK]) {
        if s.quick {
            eprintln!("bench l4: SKIPPED, peers unavailable: {e:#}");
            let _ = std::fs::remove_file(out_dir.join("l4.json"));
            return Ok(json!({ "benchmark": "l4", "skipped": format!("{e:#}") }));
        }
        return Err(e.context("installing nginx and wrk for the L4 benchmark"));
    }
    let mut results = Vec::new();
    let mut fixed_rate = None;
    for c in Contender::ALL {
        // `direct` and `routed` always run: they are every ratio's
        // references, and the routed hop's ratios mean something only
        // when measured side by side in the same run.
        if !c.is_reference() && only.is_some_and(|o| !o.iter().any(|k| k == c.key())) {
            continue;
        }
        eprintln!("bench l4: {}", c.label());
        match run_contender(c, s, fixed_rate) {
            Ok(v) => {
                if c == Contender::Direct {
                    fixed_rate = v["fixed_rate"]["rate"].as_f64();
                }
                results.push(v);
            }
            Err(e) if !c.is_reference() && c != Contender::Router => {
                eprintln!("bench l4: {} skipped: {e:#}", c.key());
                results.push(json!({
                    "contender": c.key(), "label": c.label(), "skipped": format!("{e:#}"),
                }));
            }
            Err(e) => return Err(e.context(format!("l4 contender {}", c.key()))),
        }
    }
    let doc = json!({
        "benchmark": "l4",
        "quick": s.quick,
        "settings": {
            "backends": BACKENDS,
            "closed_loop_connections": CONNS,
            "generator_threads": GEN_THREADS,
            "wrk_threads": WRK_THREADS,
            "max_runs": s.max_runs, "max_secs": s.max_secs,
            "fixed_runs": s.fixed_runs, "fixed_secs": s.fixed_secs,
            "fixed_fraction_of_direct_max": FIXED_FRACTION,
            "sustained_secs": s.sustained_secs,
        },
        "machine": crate::report::machine_json(),
        "netfilter": {
            "nf_conntrack_max": read_trim("/proc/sys/net/netfilter/nf_conntrack_max"),
            "nf_conntrack_tcp_timeout_time_wait": read_trim("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_time_wait"),
        },
        "peer_versions": crate::report::peer_versions(),
        "contenders": results,
        "configs": {
            "iptables": iptables_rules(),
            "nftables": nft_rules(),
            "haproxy": haproxy_config(),
            "router": router_config(Path::new("/run/router-bench.sock")),
        },
    });
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(
        out_dir.join("l4.json"),
        serde_json::to_string_pretty(&doc)? + "\n",
    )
    .context("writing l4.json")?;
    Ok(doc)
}
