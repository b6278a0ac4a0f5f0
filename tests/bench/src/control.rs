//! Control-plane benchmarks: the cost of turning weights into a Maglev
//! table. Every figure is the median of repeated builds.

use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use router::maglev::{self, MaglevBackend};

pub struct MaglevRow {
    pub backends: usize,
    pub table_size: u32,
    pub runs: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

/// Backends with distinct keys and a spread of weights (1..=1000), so the
/// build exercises the weighted turn-taking, not the equal-weight shortcut.
fn backends(n: usize) -> (Vec<String>, Vec<u32>) {
    let keys = (0..n)
        .map(|i| {
            format!(
                "198.{}.{}.{}:8000",
                18 + (i >> 16),
                (i >> 8) & 0xff,
                i & 0xff
            )
        })
        .collect();
    let weights = (0..n)
        .map(|i| 1 + ((i as u32).wrapping_mul(2_654_435_761) % 1000))
        .collect();
    (keys, weights)
}

pub fn maglev_rebuild(n: usize, size: u32, runs: usize) -> MaglevRow {
    let (keys, weights) = backends(n);
    let input: Vec<MaglevBackend<'_>> = keys
        .iter()
        .zip(&weights)
        .enumerate()
        .map(|(i, (k, w))| MaglevBackend {
            key: k,
            id: i as u32,
            weight: *w,
        })
        .collect();
    let mut ms: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            let table = maglev::build(&input, size);
            let elapsed = t.elapsed().as_secs_f64() * 1e3;
            std::hint::black_box(table);
            elapsed
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    MaglevRow {
        backends: n,
        table_size: size,
        runs,
        median_ms: ms[ms.len() / 2],
        min_ms: ms[0],
        max_ms: ms[ms.len() - 1],
    }
}

pub fn run_control(quick: bool, out_dir: &Path) -> Result<()> {
    let runs = if quick { 3 } else { 15 };
    let mut rows = Vec::new();
    for n in [10, 100, 1_000, 10_000] {
        rows.push(maglev_rebuild(n, 65_537, runs));
    }
    // At 10,000 backends a 65537-slot table is below 100 slots per backend;
    // also measure the size the config check demands.
    rows.push(maglev_rebuild(10_000, 1_000_003, runs));

    let mut md = String::new();
    writeln!(md, "# Control-plane benchmarks\n")?;
    writeln!(
        md,
        "Maglev rebuild: `router::maglev::build` from weights to a full table, single thread, \
         release build; median of {runs} builds (min–max). Weights are spread over 1–1000 so the \
         weighted turn-taking is exercised. Target (GPU-policy issue): 1,000 backends at 65537 \
         slots under 10 ms.\n"
    )?;
    writeln!(
        md,
        "| backends | table size | median ms | min–max ms | target | result |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for r in &rows {
        let (target, result) = if r.backends == 1_000 && r.table_size == 65_537 {
            ("< 10 ms", if r.median_ms < 10.0 { "met" } else { "missed" })
        } else {
            ("—", "—")
        };
        writeln!(
            md,
            "| {} | {} | {:.2} | {:.2}–{:.2} | {target} | {result} |",
            r.backends, r.table_size, r.median_ms, r.min_ms, r.max_ms
        )?;
    }
    let poll = polling_cost(64, 4.0, if quick { 5 } else { 30 })?;
    writeln!(
        md,
        "\nPolling cost: the `router` daemon polling {} Prometheus (vLLM-format) endpoints at {} Hz \
         for {} s, CPU from /proc/<pid>/stat (user + system), after 4 s of warm-up (slow start set to 1 s, so weights have settled and no table is rebuilt). Each source keeps its connection open between polls (HTTP/1.1 keep-alive, as vLLM's server allows). Target: under 2% \
         of one core.\n",
        poll.backends, poll.hz, poll.seconds
    )?;
    writeln!(
        md,
        "| backends | rate | polls done | failed polls | CPU, % of one core | RSS MiB | target | result |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    writeln!(
        md,
        "| {} | {} Hz | {} | {} | {:.2} | {:.1} | < 2% | {} |",
        poll.backends,
        poll.hz,
        poll.polls,
        poll.poll_errors,
        poll.cpu_percent,
        poll.rss_mib,
        if poll.cpu_percent < 2.0 {
            "met"
        } else {
            "missed"
        }
    )?;
    let polls = reaction_polls();
    writeln!(
        md,
        "\nReaction: default policy, two replicas at 30% load; one jumps to a full KV cache and a \
         queue of 16. Polls from the first saturated reading until its weight is at most half: \
         **{polls}** (at the default 500 ms poll interval: {} ms). Target: at most 2 poll intervals \
         ({}). The closed-loop test measures the same end to end through the daemon, the XDP \
         datapath and mock replicas, and asserts it.\n",
        polls * 500,
        if polls <= 2 { "met" } else { "missed" }
    )?;
    print!("{md}");
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    std::fs::write(out_dir.join("control.md"), &md).context("writing control.md")?;
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "backends": r.backends, "table_size": r.table_size, "runs": r.runs,
                "median_ms": r.median_ms, "min_ms": r.min_ms, "max_ms": r.max_ms,
            })
        })
        .collect();
    std::fs::write(
        out_dir.join("control.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "commit": crate::report::source_commit(),
            "maglev_rebuild": json,
            "reaction_polls": polls,
            "polling": {
                "backends": poll.backends, "hz": poll.hz, "seconds": poll.seconds,
                "polls": poll.polls, "poll_errors": poll.poll_errors, "cpu_percent": poll.cpu_percent, "rss_mib": poll.rss_mib,
            },
        }))?,
    )
    .context("writing control.json")?;
    Ok(())
}

/// CPU the daemon spends polling `backends` Prometheus endpoints at `hz`,
/// as a percentage of one core, from /proc/<pid>/stat over `seconds`.
pub struct PollingCost {
    pub backends: usize,
    pub hz: f64,
    pub seconds: u64,
    pub cpu_percent: f64,
    pub rss_mib: f64,
    pub polls: u64,
    pub poll_errors: u64,
}

fn proc_cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which may contain spaces.
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .context("malformed stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).context("no utime")?.parse()?;
    let stime: u64 = f.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

fn proc_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kb / 1024.0)
}

pub fn polling_cost(backends: usize, hz: f64, seconds: u64) -> Result<PollingCost> {
    use router_testkit::{
        daemon_proc::{ScratchDir, start_daemon, status},
        netns::{self, Topology},
    };
    let topo = Topology::one_arm(0)?;
    let script = router_testkit::fixtures::fixture("metrics_server.py");
    let _server = netns::spawn(
        topo.lb_ns(),
        &[
            "python3".as_ref(),
            script.as_os_str(),
            "--bind".as_ref(),
            "127.0.0.1".as_ref(),
            "--port".as_ref(),
            "9300".as_ref(),
        ],
    )?;
    netns::wait_for_tcp(
        topo.lb_ns(),
        "127.0.0.1:9300".parse()?,
        Duration::from_secs(10),
    )?;
    let dir = ScratchDir::new("bench-poll")?;
    let socket = dir.0.join("router.sock");
    let mut cfg = format!(
        "[daemon]\ninterface = \"{}\"\ncontrol_socket = \"{}\"\n\n[policy]\npoll_interval = \"{}ms\"\nslow_start = \"1s\"\n\n\
         [[service]]\nname = \"bench\"\nvip = \"198.18.100.1:8000\"\nsnat = \"198.18.0.1\"\n",
        topo.lb_if(),
        socket.display(),
        (1000.0 / hz).round() as u64
    );
    for i in 0..backends {
        cfg.push_str(&format!(
            "\n[[service.backend]]\nname = \"b{i}\"\naddress = \"198.18.1.{}:8000\"\n\
             telemetry = {{ source = \"prometheus\", url = \"http://127.0.0.1:9300/metrics?b={i}\", format = \"vllm\" }}\n",
            i + 1
        ));
    }
    let config = dir.0.join("router.toml");
    std::fs::write(&config, cfg)?;
    let daemon = start_daemon(topo.lb_ns(), &config, &socket)?;
    let pid = daemon.id();
    // Let slow start (1 s here) and the first table builds pass: the
    // figure is the steady cost of polling, with weights settled.
    std::thread::sleep(Duration::from_secs(4));
    let polls_of = || -> Result<(u64, u64)> {
        let st = status(&socket)?;
        Ok((
            st.policy.iter().map(|p| p.stats.polls).sum(),
            st.policy
                .iter()
                .map(|p| p.stats.errors + p.stats.invalid)
                .sum(),
        ))
    };
    let (t0, (p0, e0), w0) = (proc_cpu_ticks(pid)?, polls_of()?, Instant::now());
    std::thread::sleep(Duration::from_secs(seconds));
    let (t1, (p1, e1), elapsed) = (proc_cpu_ticks(pid)?, polls_of()?, w0.elapsed());
    // SAFETY: sysconf has no memory effects.
    let hz_ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_percent = 100.0 * (t1 - t0) as f64 / hz_ticks / elapsed.as_secs_f64();
    let rss_mib = proc_rss_mib(pid)?;
    daemon.stop(Duration::from_secs(10))?;
    Ok(PollingCost {
        backends,
        hz,
        seconds,
        cpu_percent,
        rss_mib,
        polls: p1 - p0,
        poll_errors: e1 - e0,
    })
}

/// Polls from a replica's first saturated reading until its weight is cut
/// to at most half, with the default policy: two replicas at 30% load until
/// one jumps to a full batch with a long queue. Counted in polls of the
/// policy's own clock, so the figure is exact, not timed.
pub fn reaction_polls() -> u32 {
    use router::{
        policy::{BackendInput, Policy, PolicyConfig},
        telemetry::Reading,
    };
    let cfg = PolicyConfig::default();
    let poll = cfg.poll_interval;
    let mut p = Policy::new(cfg);
    let reading = |kv: f64, waiting: f64| Reading {
        kv_cache_usage: Some(kv),
        requests_waiting: Some(waiting),
        ..Reading::default()
    };
    let calm = reading(0.3, 0.0);
    let hot = reading(1.0, 16.0);
    let mut weight_before = 0;
    for n in 0..200u32 {
        let now = poll * n;
        let saturated_phase = n >= 120;
        let a = if saturated_phase { &hot } else { &calm };
        let inputs = [
            BackendInput {
                name: "a",
                capacity: 1.0,
                pinned_weight: None,
                drained: false,
                healthy: true,
                latest: Some((now, a)),
                measured: None,
                max_in_flight: None,
            },
            BackendInput {
                name: "b",
                capacity: 1.0,
                pinned_weight: None,
                drained: false,
                healthy: true,
                latest: Some((now, &calm)),
                measured: None,
                max_in_flight: None,
            },
        ];
        let w = p.tick(now, &inputs).decisions[0].weight;
        if n == 119 {
            weight_before = w;
        }
        if saturated_phase && w * 2 <= weight_before {
            // Poll n is the (n - 119)th poll that saw the saturated reading.
            return n - 119;
        }
    }
    u32::MAX
}
