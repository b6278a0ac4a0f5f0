//! `bench routing`: routing quality, the mission's own measure. Four mock
//! GPU replicas (tests/fixtures/mock_replica.py) of true speeds 1.0, 1.0 and
//! 0.4, plus a fourth (speed 1.0) started cold part-way through each run,
//! under open-loop Poisson arrivals of streaming completions (one per
//! connection) at 70% and 90% of the fleet's capacity.
//!
//! Policies: static equal weights and the oracle's static weights
//! (proportional to the true speeds) both through the router's datapath with
//! pinned weights, so only the weights differ from the GPU-aware run;
//! HAProxy `balance leastconn`; the router's GPU-aware policy (telemetry
//! from the replicas' vLLM metrics, no speed given to it). Every policy has
//! the same health checks, so the late replica is taken in when it answers.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{
    bench_peers::{self, HAPROXY},
    bench_report::median,
    daemon_proc::{ScratchDir, cli, start_daemon},
    loadgen::{self, StreamRun},
    netns::{self, ChildGuard, Topology},
    replica,
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const PORT: u16 = 8000;
const SNAT: Ipv4Addr = netns::SNAT_ADDR;
/// True speeds; the last replica starts part-way through each run.
pub const SPEEDS: [f64; 4] = [1.0, 1.0, 0.4, 1.0];
const LATE: usize = 3;
/// Replica engine: continuous batching of up to 8, 20 ms base step, 50%
/// slower at a full batch, 16 tokens a request.
const MAX_BATCH: f64 = 8.0;
const STEP_MS: f64 = 20.0;
const BATCH_SLOWDOWN: f64 = 0.5;
const TOKENS: u32 = 16;
/// The late replica is this much slower for this long after it starts.
const COLD_SECS: f64 = 4.0;
const COLD_FACTOR: f64 = 2.0;
/// Requests per second one replica of speed 1.0 completes at a full batch.
pub fn unit_capacity() -> f64 {
    MAX_BATCH / (f64::from(TOKENS) * STEP_MS / 1e3 * (1.0 + BATCH_SLOWDOWN))
}
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_IN_FLIGHT: usize = 2_000;
/// Health checks, the same for the router and HAProxy.
const HEALTH_INTERVAL_MS: u64 = 500;

pub struct RoutingSettings {
    pub quick: bool,
    pub runs: usize,
    pub secs: f64,
    pub loads: Vec<f64>,
}

impl RoutingSettings {
    pub fn full() -> Self {
        Self {
            quick: false,
            runs: 3,
            secs: 14.0,
            loads: vec![0.7, 0.9],
        }
    }

    pub fn quick() -> Self {
        Self {
            quick: true,
            runs: 1,
            secs: 4.0,
            loads: vec![0.9],
        }
    }

    /// When the late replica starts.
    fn late_start(&self) -> f64 {
        self.secs * 0.25
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    RoundRobin,
    LeastConn,
    GpuAware,
    Oracle,
}

impl Policy {
    pub const ALL: [Policy; 4] = [
        Policy::RoundRobin,
        Policy::LeastConn,
        Policy::GpuAware,
        Policy::Oracle,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::LeastConn => "haproxy_leastconn",
            Policy::GpuAware => "router_gpu_aware",
            Policy::Oracle => "oracle",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Policy::RoundRobin => "static equal weights (router datapath, Maglev)",
            Policy::LeastConn => "HAProxy leastconn (TCP mode)",
            Policy::GpuAware => "router GPU-aware policy",
            Policy::Oracle => "oracle: static weights ∝ true speeds (router datapath)",
        }
    }
}

fn vip() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, PORT))
}

fn replica_addr(i: usize) -> SocketAddr {
    SocketAddr::from((netns::backend_addr(i), PORT))
}

fn health() -> String {
    format!(
        "{{ tcp = true, http_path = \"/health\", interval = \"{HEALTH_INTERVAL_MS}ms\", \
         timeout = \"400ms\", fall = 2, rise = 2 }}"
    )
}

/// How the router's backends get their weights in a run.
#[derive(Clone, Copy)]
enum Weights {
    /// Static, all equal.
    Equal,
    /// Static, proportional to the true speeds (the oracle).
    TrueSpeeds,
    /// The GPU-aware policy, from telemetry.
    Telemetry,
}

impl Policy {
    /// The router's weights for this policy; None where a peer runs it.
    fn router_weights(self) -> Option<Weights> {
        match self {
            Policy::RoundRobin => Some(Weights::Equal),
            Policy::Oracle => Some(Weights::TrueSpeeds),
            Policy::GpuAware => Some(Weights::Telemetry),
            Policy::LeastConn => None,
        }
    }
}

fn router_config(w: Weights, socket: &Path) -> String {
    let mut s = format!(
        "[daemon]\ninterface = \"{}\"\ncontrol_socket = \"{}\"\n\n\
         [policy]\n# Defaults, but slow start matched to the replicas' known warm-up.\n\
         slow_start = \"{}s\"\n\n\
         [[service]]\nname = \"llm\"\nvip = \"{}\"\nprotocol = \"tcp\"\nsnat = \"{SNAT}\"\n",
        netns::LB_IF,
        socket.display(),
        COLD_SECS as u64,
        vip()
    );
    for (i, speed) in SPEEDS.iter().enumerate() {
        let how = match w {
            Weights::Equal => "weight = 100".to_owned(),
            Weights::TrueSpeeds => format!("weight = {}", (speed * 100.0).round() as u32),
            Weights::Telemetry => format!(
                "capacity = 1.0\ntelemetry = {{ source = \"prometheus\", url = \"http://{}/metrics\", format = \"vllm\" }}",
                replica_addr(i)
            ),
        };
        s.push_str(&format!(
            "\n[[service.backend]]\nname = \"gpu-{i}\"\naddress = \"{}\"\n{how}\nhealth = {}\n",
            replica_addr(i),
            health()
        ));
    }
    s
}

/// HAProxy leastconn with the same health checks, and the redispatch and
/// retries its documentation recommends so a connection to a replica that
/// just went away is retried elsewhere.
fn haproxy_config() -> String {
    let mut s = format!(
        "global\n    # maxconn: HAProxy derives it from the file-descriptor limit.\n\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n    \
         option redispatch\n    retries 3\n\n\
         frontend fe\n    bind {}\n    default_backend be\n\n\
         backend be\n    balance leastconn\n    option httpchk GET /health\n",
        vip()
    );
    for i in 0..SPEEDS.len() {
        s.push_str(&format!(
            "    server gpu-{i} {} check inter {HEALTH_INTERVAL_MS} fall 2 rise 2\n",
            replica_addr(i)
        ));
    }
    s
}

fn nvml_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("gpu-{i}.json"))
}

fn start_replica(topo: &Topology, dir: &Path, i: usize) -> Result<ChildGuard> {
    let state = nvml_path(dir, i);
    let _ = std::fs::remove_file(&state);
    let state_arg = state.display().to_string();
    let speed = SPEEDS[i].to_string();
    let (batch, step, slow, tokens) = (
        (MAX_BATCH as u32).to_string(),
        STEP_MS.to_string(),
        BATCH_SLOWDOWN.to_string(),
        TOKENS.to_string(),
    );
    let mut args = vec![
        "--max-batch",
        &batch,
        "--step-ms",
        &step,
        "--batch-slowdown",
        &slow,
        "--tokens",
        &tokens,
        "--speed",
        &speed,
        "--nvml-state",
        &state_arg,
    ];
    let (cold_s, cold_f) = (COLD_SECS.to_string(), COLD_FACTOR.to_string());
    if i == LATE {
        args.extend(["--cold-seconds", &cold_s, "--cold-factor", &cold_f]);
    }
    replica::spawn_mock_replica(
        topo.backend_ns(i),
        &format!("gpu-{i}"),
        netns::backend_addr(i),
        PORT,
        &args,
    )
}

/// The replica's SM activity (busy time × batch occupancy over the last
/// second, 0–100) from its fake NVML state file.
fn sm_util(dir: &Path, i: usize) -> Option<f64> {
    let text = std::fs::read_to_string(nvml_path(dir, i)).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["devices"][0]["sm_util"].as_f64()
}

enum Front {
    Router(crate::daemon_proc::Daemon, PathBuf),
    Haproxy(#[allow(dead_code)] ChildGuard),
}

fn status(socket: &Path) -> Result<router::control::StatusReply> {
    serde_json::from_str(&cli(socket, &["status", "--json"])?).context("parsing router status")
}

/// Waits until the front routes to the three first replicas at the weights
/// it will start the run with (after slow start, for the GPU-aware policy).
fn wait_ready(front: &Front, p: Policy) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    match front {
        Front::Haproxy(_) => {
            // Two check intervals: the running replicas are up, the late
            // one is marked down.
            std::thread::sleep(Duration::from_millis(3 * HEALTH_INTERVAL_MS));
            Ok(())
        }
        Front::Router(_, socket) => loop {
            let st = status(socket)?;
            let ready = st.policy.iter().all(|b| {
                let i: usize = b.backend.trim_start_matches("gpu-").parse().unwrap_or(0);
                if i == LATE {
                    b.weight == 0
                } else if p == Policy::GpuAware {
                    b.weight >= 95
                } else {
                    b.weight > 0
                }
            });
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "router not ready within 30 s: {:?}",
                    st.policy
                        .iter()
                        .map(|b| (&b.backend, b.weight, &b.reason))
                        .collect::<Vec<_>>()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        },
    }
}

struct RunOut {
    stream: StreamRun,
    /// Mean SM activity per replica while it was up.
    util: Vec<f64>,
    all_saturated_ticks: u64,
    fallback_connections: u64,
    offered: f64,
    /// GPU-aware only: (seconds, weight per replica), sampled.
    weights: Vec<(f64, Vec<u32>)>,
}

fn one_run(
    p: Policy,
    load: f64,
    seed: u64,
    s: &RoutingSettings,
    topo: &Topology,
    dir: &Path,
    front: &Front,
) -> Result<RunOut> {
    wait_ready(front, p)?;
    let socket = match front {
        Front::Router(_, s) => Some(s.clone()),
        Front::Haproxy(_) => None,
    };
    let counters = |socket: &Option<PathBuf>| -> Result<(u64, u64)> {
        Ok(match socket {
            Some(sk) => {
                let st = status(sk)?;
                (st.all_saturated_ticks, st.fallback_connections)
            }
            None => (0, 0),
        })
    };
    let c0 = counters(&socket)?;
    let cap = unit_capacity();
    let late_at = s.late_start();
    let early: f64 = SPEEDS.iter().take(LATE).sum();
    let all: f64 = SPEEDS.iter().sum();
    let rate_at = move |t: f64| load * cap * if t < late_at { early } else { all };
    let offered = load * cap * (early * late_at + all * (s.secs - late_at)) / s.secs;
    let client = topo.client_ns().to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let secs = s.secs;
    let mut late_guard = None;
    let mut util_sum = vec![0.0; SPEEDS.len()];
    let mut util_n = vec![0u32; SPEEDS.len()];
    let mut weights = Vec::new();
    let stream = std::thread::scope(|scope| -> Result<StreamRun> {
        let gen_stop = stop.clone();
        let load_thread = scope.spawn(move || {
            loadgen::in_ns(&client, 2, move || {
                let load = loadgen::StreamLoad {
                    target: vip(),
                    duration: Duration::from_secs_f64(secs),
                    max_tokens: TOKENS,
                    timeout: REQUEST_TIMEOUT,
                    seed,
                    max_in_flight: MAX_IN_FLIGHT,
                };
                loadgen::stream_poisson(load, rate_at, gen_stop)
            })
        });
        let start = Instant::now();
        let sampling = (|| -> Result<()> {
            while !load_thread.is_finished() {
                let t = start.elapsed().as_secs_f64();
                if late_guard.is_none() && t >= late_at {
                    late_guard = Some(start_replica(topo, dir, LATE)?);
                }
                if t < secs {
                    for i in 0..SPEEDS.len() {
                        if i == LATE && late_guard.is_none() {
                            continue;
                        }
                        if let Some(u) = sm_util(dir, i) {
                            util_sum[i] += u;
                            util_n[i] += 1;
                        }
                    }
                    if p == Policy::GpuAware
                        && let Some(sk) = &socket
                        && let Ok(st) = status(sk)
                    {
                        let mut w = vec![0; SPEEDS.len()];
                        for b in &st.policy {
                            if let Ok(i) = b.backend.trim_start_matches("gpu-").parse::<usize>()
                                && i < w.len()
                            {
                                w[i] = b.weight;
                            }
                        }
                        weights.push((t, w));
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            Ok(())
        })();
        if sampling.is_err() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let stream = load_thread
            .join()
            .map_err(|_| anyhow::anyhow!("load generator panicked"))??;
        sampling?;
        Ok(stream)
    })?;
    let c1 = counters(&socket)?;
    drop(late_guard);
    let util = util_sum
        .iter()
        .zip(&util_n)
        .map(|(s, n)| if *n > 0 { s / f64::from(*n) } else { f64::NAN })
        .collect();
    Ok(RunOut {
        stream,
        util,
        all_saturated_ticks: c1.0 - c0.0,
        fallback_connections: c1.1 - c0.1,
        offered,
        weights,
    })
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

fn run_json(r: &RunOut, secs: f64) -> Value {
    let ttft: Vec<f64> = r.stream.samples.iter().map(|x| x.ttft_ms).collect();
    let e2e: Vec<f64> = r.stream.samples.iter().map(|x| x.e2e_ms).collect();
    let mut served: BTreeMap<String, u64> = BTreeMap::new();
    for x in &r.stream.samples {
        *served.entry(x.replica.clone()).or_default() += 1;
    }
    let finite: Vec<f64> = r.util.iter().copied().filter(|u| u.is_finite()).collect();
    let spread = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max)
        - finite.iter().copied().fold(f64::INFINITY, f64::min);
    json!({
        "offered_per_s": r.offered,
        "completed": r.stream.samples.len(),
        "throughput_per_s": r.stream.samples.len() as f64 / secs,
        "errors": r.stream.errors,
        "error_samples": r.stream.error_samples,
        "ttft_p50_ms": pct(&ttft, 50.0),
        "ttft_p99_ms": pct(&ttft, 99.0),
        "e2e_p50_ms": pct(&e2e, 50.0),
        "e2e_p99_ms": pct(&e2e, 99.0),
        "utilization_pct": r.util.iter().map(|u| if u.is_finite() { json!(u) } else { Value::Null }).collect::<Vec<_>>(),
        "utilization_spread_pp": spread,
        "served_by": served,
        "all_saturated_ticks": r.all_saturated_ticks,
        "fallback_connections": r.fallback_connections,
        "start_lag_p99_us": r.stream.start_lag_p99_us,
        "weights": r.weights.iter().map(|(t, w)| json!({"t": t, "w": w})).collect::<Vec<_>>(),
    })
}

fn run_policy(p: Policy, s: &RoutingSettings) -> Result<Value> {
    if p == Policy::LeastConn {
        bench_peers::ensure(&[HAPROXY])?;
    }
    let topo = Topology::one_arm(SPEEDS.len())?;
    let dir = ScratchDir::new(&format!("bench-routing-{}", p.key()))?;
    let _replicas: Vec<ChildGuard> = (0..LATE)
        .map(|i| start_replica(&topo, &dir.0, i))
        .collect::<Result<_>>()?;
    let lb = topo.lb_ns();
    let front = if let Some(weights) = p.router_weights() {
        topo.add_snat_addr()?;
        let socket = dir.0.join("router.sock");
        let config = dir.0.join("router.toml");
        std::fs::write(&config, router_config(weights, &socket))?;
        Front::Router(start_daemon(lb, &config, &socket)?, socket)
    } else {
        netns::exec(
            lb,
            &["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"],
        )?;
        Front::Haproxy(bench_peers::start_haproxy(
            lb,
            &haproxy_config(),
            &dir.0,
            vip(),
        )?)
    };
    let mut loads = Vec::new();
    for &load in &s.loads {
        let mut runs = Vec::new();
        for r in 0..s.runs {
            // The same arrival times for every policy: the seed depends on
            // the load and the run only.
            let seed = 1 + (load * 100.0) as u64 * 1000 + r as u64;
            let out = one_run(p, load, seed, s, &topo, &dir.0, &front)?;
            let j = run_json(&out, s.secs);
            eprintln!(
                "  {} at {:.0}% run {}/{}: ttft p99 {:.0} ms, e2e p50 {:.0} ms p99 {:.0} ms, {} errors, util {:?}",
                p.key(),
                load * 100.0,
                r + 1,
                s.runs,
                j["ttft_p99_ms"].as_f64().unwrap_or(f64::NAN),
                j["e2e_p50_ms"].as_f64().unwrap_or(f64::NAN),
                j["e2e_p99_ms"].as_f64().unwrap_or(f64::NAN),
                out.stream.errors,
                out.util.iter().map(|u| u.round()).collect::<Vec<_>>(),
            );
            runs.push(j);
        }
        let med = |k: &str| {
            median(
                &runs
                    .iter()
                    .filter_map(|r| r[k].as_f64())
                    .collect::<Vec<_>>(),
            )
        };
        loads.push(json!({
            "load": load,
            "median": {
                "ttft_p50_ms": med("ttft_p50_ms"),
                "ttft_p99_ms": med("ttft_p99_ms"),
                "e2e_p50_ms": med("e2e_p50_ms"),
                "e2e_p99_ms": med("e2e_p99_ms"),
                "throughput_per_s": med("throughput_per_s"),
                "offered_per_s": med("offered_per_s"),
                "utilization_spread_pp": med("utilization_spread_pp"),
            },
            "errors": runs.iter().filter_map(|r| r["errors"].as_u64()).sum::<u64>(),
            "all_saturated_ticks": runs.iter().filter_map(|r| r["all_saturated_ticks"].as_u64()).sum::<u64>(),
            "fallback_connections": runs.iter().filter_map(|r| r["fallback_connections"].as_u64()).sum::<u64>(),
            "runs": runs,
        }));
    }
    if let Front::Router(daemon, _) = front {
        daemon.stop(Duration::from_secs(10))?;
    }
    Ok(json!({ "policy": p.key(), "label": p.label(), "loads": loads }))
}

/// Runs every policy and writes `routing.json` into `out_dir`.
pub fn run_routing(s: &RoutingSettings, out_dir: &Path, only: Option<&[String]>) -> Result<Value> {
    eprintln!(
        "bench routing: {} run(s) × {} s at loads {:?}, per policy{}",
        s.runs,
        s.secs,
        s.loads,
        if s.quick { " (quick)" } else { "" }
    );
    let mut results = Vec::new();
    for p in Policy::ALL {
        if only.is_some_and(|o| !o.iter().any(|k| k == p.key())) {
            continue;
        }
        eprintln!("bench routing: {}", p.label());
        match run_policy(p, s) {
            Ok(v) => results.push(v),
            Err(e) if p == Policy::LeastConn => {
                eprintln!("bench routing: {} skipped: {e:#}", p.key());
                results.push(
                    json!({"policy": p.key(), "label": p.label(), "skipped": format!("{e:#}")}),
                );
            }
            Err(e) => return Err(e.context(format!("routing policy {}", p.key()))),
        }
    }
    let doc = json!({
        "benchmark": "routing",
        "quick": s.quick,
        "settings": {
            "runs": s.runs,
            "seconds": s.secs,
            "loads": s.loads,
            "speeds": SPEEDS,
            "late_replica": format!("gpu-{LATE}"),
            "late_start_s": s.late_start(),
            "cold_seconds": COLD_SECS,
            "cold_factor": COLD_FACTOR,
            "max_batch": MAX_BATCH,
            "step_ms": STEP_MS,
            "batch_slowdown": BATCH_SLOWDOWN,
            "tokens": TOKENS,
            "unit_capacity_per_s": unit_capacity(),
            "request_timeout_s": REQUEST_TIMEOUT.as_secs(),
        },
        "machine": crate::bench_report::machine_json(),
        "policies": results,
        "configs": {
            "router_gpu_aware": router_config(Weights::Telemetry, Path::new("/run/router-bench.sock")),
            "router_round_robin": router_config(Weights::Equal, Path::new("/run/router-bench.sock")),
            "router_oracle": router_config(Weights::TrueSpeeds, Path::new("/run/router-bench.sock")),
            "haproxy_leastconn": haproxy_config(),
        },
    });
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(
        out_dir.join("routing.json"),
        serde_json::to_string_pretty(&doc)? + "\n",
    )
    .context("writing routing.json")?;
    Ok(doc)
}
