//! `bench routing`: routing quality, the mission's own measure. Four mock
//! GPU replicas (tests/fixtures/mock_replica.py) of true speeds 1.0, 1.0,
//! 0.4 and 1.0 serve streaming completions (one per connection) whose
//! lengths are heavy-tailed, under open-loop Poisson arrivals.
//!
//! Two scenarios:
//! - *steady*: all four replicas up and warm from the start, at 70% and 90%
//!   of the fleet's capacity; the first seconds of each run (queues filling
//!   from empty) are not measured;
//! - *cold join*: three replicas up; the fourth starts part-way through the
//!   run and is several times slower for its first seconds (a replica just
//!   scaled out: caches empty, kernels not yet tuned); the offered load steps
//!   up when it joins, as an autoscaler adds capacity for new load. Measured:
//!   the requests sent in the minute after the join.
//!
//! Contenders, each with the same health checks: static equal weights, the
//! oracle's static weights (∝ true speeds), the router's telemetry weights
//! with the Maglev draw and with least-loaded selection, a poller that
//! pins all traffic on the least-queued replica (llm-d's older scorers),
//! all on the router's own datapath so only the decision differs; and
//! HAProxy `balance leastconn`.
//!
//! Every point runs several seeds; a seed fixes the arrival times and the
//! lengths, so every contender sees the same requests and the report can
//! pair them seed by seed.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use router_testkit::{
    daemon_proc::{Daemon, ScratchDir, cli, router_binary, start_daemon, status},
    netns::{self, ChildGuard, Topology},
    replica,
};

use crate::{
    loadgen::{self, Lengths, StreamRun},
    peers::{self, HAPROXY},
    report::median,
};

/// Whether the router's config parser accepts the per-service `selection`
/// key (`"maglev"` or `"least_loaded"`). Until it does, every router
/// contender runs without the key (the datapath's Maglev draw, today's only
/// mode) and `router_least_loaded` is skipped, saying why.
pub const SELECTION_KEY_SUPPORTED: bool = true;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const PORT: u16 = 8000;
const SNAT: Ipv4Addr = netns::SNAT_ADDR;
const SERVICE: &str = "llm";
/// True speeds. The last replica is the one that joins cold.
pub const SPEEDS: [f64; 4] = [1.0, 1.0, 0.4, 1.0];
const LATE: usize = 3;
/// The replica of speed 0.4: its share shows how a contender treats a slow
/// replica.
pub const SLOW: usize = 2;
/// Replica engine: continuous batching of up to 8, 20 ms base step, 50%
/// slower at a full batch.
const MAX_BATCH: f64 = 8.0;
const STEP_MS: f64 = 20.0;
const BATCH_SLOWDOWN: f64 = 0.5;
/// Output lengths (`max_tokens`): log-normal with median 16 and σ 0.8, so
/// mean ≈ 22 and p99 ≈ 103, clamped to [1, 512]. Completion lengths are
/// heavy-tailed like this: most answers are short, a few are long, and the
/// long ones are what hold a batch slot (and a leastconn count) for long.
pub const LENGTHS: Lengths = Lengths::LogNormal {
    median: 16.0,
    sigma: 0.8,
    min: 1,
    max: 512,
};
/// The mock replica's `--tokens`: besides the default `max_tokens` (unused
/// here, every request names its own) it sizes the KV cache the replica
/// reports, as `max_batch` sequences of this many tokens plus the prompt.
/// 48 is about the 91st percentile of the lengths: a full batch of typical
/// requests reads about half full, a batch of long ones full, as a cache
/// provisioned for the workload would; sized for the median, every full
/// batch would read as a full cache and saturate the telemetry policy.
const KV_TOKENS: u32 = 48;
/// A request not done within this is an error. The longest completion
/// (512 tokens on the 0.4 replica at a full batch) takes 38 s by itself, so
/// a shorter limit would count it as a failure whatever the routing.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_IN_FLIGHT: usize = 2_000;
/// Health checks, the same for the router and HAProxy.
const HEALTH_INTERVAL_MS: u64 = 500;
/// How often `polled_least_queue` reads the replicas' queues.
const SCRAPE_INTERVAL: Duration = Duration::from_millis(500);
/// How often utilization and weights are sampled during a run.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

/// The expected output length, tokens (the log-normal's mean).
pub fn mean_tokens() -> f64 {
    LENGTHS.mean()
}

/// Requests per second one replica of speed 1.0 completes at a full batch:
///
///   max_batch / (mean_tokens × step × (1 + batch_slowdown))
///
/// A full-batch step gives each of `max_batch` requests one token and takes
/// `step × (1 + batch_slowdown)`; a request needs `mean_tokens` steps on
/// average. A replica of speed s completes s times as many; the fleet's
/// capacity is the sum over the replicas that are up.
pub fn unit_capacity() -> f64 {
    MAX_BATCH / (mean_tokens() * STEP_MS / 1e3 * (1.0 + BATCH_SLOWDOWN))
}

const CAPACITY_FORMULA: &str = "sum over the replicas up of max_batch / (mean_tokens × step × (1 + batch_slowdown)) × speed, \
     mean_tokens = median × e^(σ²/2) of the length distribution";

pub struct RoutingSettings {
    pub quick: bool,
    /// Runs per point, each with its own seed (the same for every contender).
    pub seeds: usize,
    /// Steady scenario: seconds of arrivals per run, of which the first
    /// `warmup_s` are not measured.
    pub steady_secs: f64,
    pub warmup_s: f64,
    pub steady_loads: Vec<f64>,
    /// Cold join: when the late replica starts, and how long after that
    /// arrivals go on and are measured.
    pub join_s: f64,
    pub window_s: f64,
    pub cold_loads: Vec<f64>,
    /// The joining replica is `cold_factor` times slower for its first
    /// `cold_secs`.
    pub cold_secs: f64,
    pub cold_factor: f64,
}

impl RoutingSettings {
    /// About 57 minutes for the six contenders on a 2-core machine: per
    /// contender 5 × (2 × 16 s + 66 s) of arrivals, and the tails.
    pub fn full() -> Self {
        Self {
            quick: false,
            seeds: 5,
            steady_secs: 16.0,
            warmup_s: 3.0,
            steady_loads: vec![0.7, 0.9],
            // Long enough for the three replicas' queues to settle at the
            // pre-join load; the window after the join is what counts.
            join_s: 6.0,
            window_s: 60.0,
            // 70%: a contender that keeps the cold replica's share small
            // can carry the stepped-up load through the cold period (the
            // fleet then has 2.65 of 2.38 units needed); at 90% the fleet is
            // overloaded during it whatever the routing.
            cold_loads: vec![0.7],
            // Four times slower for 15 s: the order of a real replica's
            // first requests (CUDA graphs captured lazily, allocator and
            // prefix cache cold) after it starts answering health checks.
            cold_secs: 15.0,
            cold_factor: 4.0,
        }
    }

    /// Every contender and both scenarios, one short seed each.
    pub fn quick() -> Self {
        Self {
            quick: true,
            seeds: 1,
            steady_secs: 5.0,
            warmup_s: 1.0,
            steady_loads: vec![0.9],
            join_s: 3.0,
            window_s: 5.0,
            cold_loads: vec![0.7],
            cold_secs: 3.0,
            cold_factor: 4.0,
        }
    }

    fn cold_run_secs(&self) -> f64 {
        self.join_s + self.window_s
    }

    /// A rough forecast of the suite's wall time: arrivals plus, per run,
    /// the tail and the wait for readiness (longer with a replica to stop
    /// and start), plus each contender's start (slow start included).
    fn estimate_s(&self, contenders: usize) -> f64 {
        let steady = self.steady_loads.len() as f64 * (self.steady_secs + 3.0);
        let cold = self.cold_loads.len() as f64 * (self.cold_run_secs() + 5.0);
        contenders as f64 * (self.seeds as f64 * (steady + cold) + self.cold_secs + 5.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    RoundRobin,
    LeastConn,
    Oracle,
    WeightsOnly,
    LeastLoaded,
    PolledLeastQueue,
}

/// How the router's backends get their weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Weights {
    /// Static, all equal.
    Equal,
    /// Static, proportional to the true speeds (the oracle).
    TrueSpeeds,
    /// The telemetry policy, from the replicas' vLLM metrics.
    Telemetry,
}

/// How the router's datapath picks a backend for a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Selection {
    /// A weighted consistent-hash draw.
    Maglev,
    /// The backend with the least (in flight + 1) / weight.
    LeastLoaded,
}

impl Selection {
    fn key(self) -> &'static str {
        match self {
            Selection::Maglev => "maglev",
            Selection::LeastLoaded => "least_loaded",
        }
    }
}

/// A contender run on the router's datapath.
#[derive(Clone, Copy, Debug)]
struct RouterSetup {
    weights: Weights,
    selection: Selection,
    /// The bench pins the weights from scraped queues (`polled_least_queue`).
    polled: bool,
}

impl Contender {
    pub const ALL: [Contender; 6] = [
        Contender::RoundRobin,
        Contender::LeastConn,
        Contender::Oracle,
        Contender::WeightsOnly,
        Contender::LeastLoaded,
        Contender::PolledLeastQueue,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Contender::RoundRobin => "round_robin",
            Contender::LeastConn => "haproxy_leastconn",
            Contender::Oracle => "oracle",
            Contender::WeightsOnly => "router_weights_only",
            Contender::LeastLoaded => "router_least_loaded",
            Contender::PolledLeastQueue => "polled_least_queue",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Contender::RoundRobin => "static equal weights (router datapath, Maglev)",
            Contender::LeastConn => "HAProxy leastconn (TCP mode)",
            Contender::Oracle => "oracle: static weights ∝ true speeds (router datapath, Maglev)",
            Contender::WeightsOnly => "router telemetry weights, Maglev draw",
            Contender::LeastLoaded => "router telemetry weights, least-loaded selection",
            Contender::PolledLeastQueue => {
                "polled least queue, scraped every 500 ms (router datapath, Maglev)"
            }
        }
    }

    /// The router setup; None where HAProxy runs it.
    fn router(self) -> Option<RouterSetup> {
        let (weights, selection, polled) = match self {
            Contender::LeastConn => return None,
            Contender::RoundRobin => (Weights::Equal, Selection::Maglev, false),
            Contender::Oracle => (Weights::TrueSpeeds, Selection::Maglev, false),
            Contender::WeightsOnly => (Weights::Telemetry, Selection::Maglev, false),
            Contender::LeastLoaded => (Weights::Telemetry, Selection::LeastLoaded, false),
            Contender::PolledLeastQueue => (Weights::Equal, Selection::Maglev, true),
        };
        Some(RouterSetup {
            weights,
            selection,
            polled,
        })
    }

    /// Whether its weights move during a run, so they are sampled.
    fn dynamic_weights(self) -> bool {
        self.router()
            .is_some_and(|r| r.polled || r.weights == Weights::Telemetry)
    }

    /// Refuses what this build cannot run, before anything is set up.
    fn check_runnable(self) -> Result<()> {
        match self.router() {
            None => peers::ensure(&[HAPROXY]),
            Some(r) if r.selection == Selection::LeastLoaded && !SELECTION_KEY_SUPPORTED => bail!(
                "needs the service key `selection = \"least_loaded\"`, which this build's \
                 config parser does not accept yet (SELECTION_KEY_SUPPORTED is false in \
                 tests/bench/src/routing.rs)"
            ),
            Some(_) => Ok(()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Steady,
    ColdJoin,
}

impl Scenario {
    fn key(self) -> &'static str {
        match self {
            Scenario::Steady => "steady",
            Scenario::ColdJoin => "cold_join",
        }
    }

    /// Seed of run `i` at `load`: the same for every contender.
    fn seed(self, load: f64, i: usize) -> u64 {
        let scenario = match self {
            Scenario::Steady => 0,
            Scenario::ColdJoin => 1,
        };
        1 + scenario * 100_000 + (load * 100.0).round() as u64 * 1_000 + i as u64
    }
}

fn vip() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, PORT))
}

fn replica_addr(i: usize) -> SocketAddr {
    SocketAddr::from((netns::backend_addr(i), PORT))
}

fn backend_name(i: usize) -> String {
    format!("gpu-{i}")
}

fn backend_index(name: &str) -> Option<usize> {
    name.strip_prefix("gpu-")?
        .parse()
        .ok()
        .filter(|i| *i < SPEEDS.len())
}

fn health() -> String {
    format!(
        "{{ tcp = true, http_path = \"/health\", interval = \"{HEALTH_INTERVAL_MS}ms\", \
         timeout = \"400ms\", fall = 2, rise = 2 }}"
    )
}

fn router_config(r: RouterSetup, socket: &Path, slow_start: Duration) -> String {
    let selection = if SELECTION_KEY_SUPPORTED {
        format!("selection = \"{}\"\n", r.selection.key())
    } else {
        String::new()
    };
    let mut s = format!(
        "[daemon]\ninterface = \"{}\"\ncontrol_socket = \"{}\"\n\n\
         [policy]\n# Defaults, but slow start matched to the replicas' known warm-up.\n\
         slow_start = \"{}ms\"\n\n\
         [[service]]\nname = \"{SERVICE}\"\nvip = \"{}\"\nprotocol = \"tcp\"\nsnat = \"{SNAT}\"\n{selection}",
        netns::LB_IF,
        socket.display(),
        slow_start.as_millis(),
        vip()
    );
    for (i, speed) in SPEEDS.iter().enumerate() {
        let mut how = match r.weights {
            Weights::Equal => "weight = 100".to_owned(),
            Weights::TrueSpeeds => format!("weight = {}", (speed * 100.0).round() as u32),
            Weights::Telemetry => format!(
                "capacity = 1.0\ntelemetry = {{ source = \"prometheus\", url = \"http://{}/metrics\", format = \"vllm\" }}",
                replica_addr(i)
            ),
        };
        if r.selection == Selection::LeastLoaded && !r.polled {
            // Room: the engines' batch size, as an operator sets it from
            // the engine's own setting (vLLM --max-num-seqs). Told, not
            // learned: learning needs a queue that lasts, which a run at
            // 70% may never show.
            how.push_str(&format!("\nmax_in_flight = {}", MAX_BATCH as u32));
        }
        s.push_str(&format!(
            "\n[[service.backend]]\nname = \"{}\"\naddress = \"{}\"\n{how}\nhealth = {}\n",
            backend_name(i),
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
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 90s\n    timeout server 90s\n    \
         option redispatch\n    retries 3\n\n\
         frontend fe\n    bind {}\n    default_backend be\n\n\
         backend be\n    balance leastconn\n    option httpchk GET /health\n",
        vip()
    );
    for i in 0..SPEEDS.len() {
        s.push_str(&format!(
            "    server {} {} check inter {HEALTH_INTERVAL_MS} fall 2 rise 2\n",
            backend_name(i),
            replica_addr(i)
        ));
    }
    s
}

fn nvml_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("gpu-{i}.json"))
}

/// Starts replica `i`; `cold` = (seconds, factor) makes it that much slower
/// for its first seconds.
fn start_replica(
    topo: &Topology,
    dir: &Path,
    i: usize,
    cold: Option<(f64, f64)>,
) -> Result<ChildGuard> {
    let state = nvml_path(dir, i);
    let _ = std::fs::remove_file(&state);
    let owned = [
        ("--max-batch", (MAX_BATCH as u32).to_string()),
        ("--step-ms", STEP_MS.to_string()),
        ("--batch-slowdown", BATCH_SLOWDOWN.to_string()),
        ("--tokens", KV_TOKENS.to_string()),
        ("--speed", SPEEDS[i].to_string()),
        ("--nvml-state", state.display().to_string()),
    ];
    let cold = cold.map(|(secs, factor)| {
        [
            ("--cold-seconds", secs.to_string()),
            ("--cold-factor", factor.to_string()),
        ]
    });
    let args: Vec<&str> = owned
        .iter()
        .chain(cold.iter().flatten())
        .flat_map(|(k, v)| [*k, v.as_str()])
        .collect();
    replica::spawn_mock_replica(
        topo.backend_ns(i),
        &backend_name(i),
        netns::backend_addr(i),
        PORT,
        &args,
    )
    .with_context(|| format!("starting replica gpu-{i}"))
}

/// The replica's SM activity (busy time × batch occupancy over the last
/// second, 0–100) from its fake NVML state file.
fn sm_util(dir: &Path, i: usize) -> Option<f64> {
    let text = std::fs::read_to_string(nvml_path(dir, i)).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["devices"][0]["sm_util"].as_f64()
}

/// Per replica, from a status reply: `pick` of its policy entry.
fn per_backend<T: Default + Clone>(
    st: &router::control::StatusReply,
    pick: impl Fn(&router::controller::BackendPolicyStatus) -> T,
) -> Vec<T> {
    let mut out = vec![T::default(); SPEEDS.len()];
    for b in &st.policy {
        if let Some(i) = backend_index(&b.backend) {
            out[i] = pick(b);
        }
    }
    out
}

fn set_weight(socket: &Path, i: usize, weight: u32) -> Result<()> {
    cli(
        socket,
        &[
            "weight",
            "set",
            SERVICE,
            &backend_name(i),
            &weight.to_string(),
        ],
    )
    .map(drop)
}

enum Front {
    Router {
        daemon: Daemon,
        socket: PathBuf,
        setup: RouterSetup,
    },
    Haproxy(#[allow(dead_code)] ChildGuard),
}

impl Front {
    fn socket(&self) -> Option<&Path> {
        match self {
            Front::Router { socket, .. } => Some(socket),
            Front::Haproxy(_) => None,
        }
    }
}

/// One contender's world: its front, the replicas, the scratch directory
/// and the topology, dropped in that order (processes before namespaces).
struct Stage {
    c: Contender,
    front: Front,
    replicas: Vec<Option<ChildGuard>>,
    dir: ScratchDir,
    topo: Topology,
}

impl Stage {
    /// The topology, all four replicas warm, and the contender's front.
    fn new(c: Contender, s: &RoutingSettings) -> Result<Self> {
        let topo = Topology::one_arm(SPEEDS.len())?;
        let dir = ScratchDir::new(&format!("bench-routing-{}", c.key()))?;
        let replicas = (0..SPEEDS.len())
            .map(|i| start_replica(&topo, &dir.0, i, None).map(Some))
            .collect::<Result<_>>()?;
        let front = start_front(c, s, &topo, &dir.0)?;
        Ok(Self {
            c,
            front,
            replicas,
            dir,
            topo,
        })
    }

    fn stop_replica(&mut self, i: usize) -> Result<()> {
        if let Some(r) = self.replicas[i].take() {
            r.stop(Duration::from_secs(5))
                .with_context(|| format!("stopping gpu-{i}"))?;
        }
        Ok(())
    }

    /// Waits until the front routes to every replica that is up (at full
    /// weight after slow start, for the telemetry policy) and no longer to
    /// the late one when it is down.
    fn wait_ready(&self, late_up: bool) -> Result<()> {
        let Front::Router { socket, setup, .. } = &self.front else {
            // Three check intervals: the running replicas are up, a stopped
            // one is marked down (fall 2).
            std::thread::sleep(Duration::from_millis(3 * HEALTH_INTERVAL_MS));
            return Ok(());
        };
        // Telemetry-driven weights are ready once slow start is over and
        // every replica has reported: a capacity is the measured speed, so
        // a fixed threshold would wait forever on the slow replica.
        let telemetry = setup.weights == Weights::Telemetry;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st = status(socket)?;
            let ready = st.policy.iter().all(|b| match backend_index(&b.backend) {
                Some(LATE) if !late_up => b.weight == 0,
                Some(_) if telemetry => {
                    b.weight > 0
                        && !b.reason.starts_with("slow start")
                        && !b.reason.starts_with("no telemetry")
                }
                Some(_) => b.weight > 0,
                None => true,
            });
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "router not ready within 60 s: {:?}",
                    st.policy
                        .iter()
                        .map(|b| (&b.backend, b.weight, &b.reason))
                        .collect::<Vec<_>>()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every seed of one point, and their medians.
    fn point(&mut self, scenario: Scenario, load: f64, s: &RoutingSettings) -> Result<Value> {
        let mut runs = Vec::new();
        for i in 0..s.seeds {
            let plan = RunPlan::new(scenario, load, scenario.seed(load, i), s);
            let out = self.one_run(&plan, s)?;
            let j = run_json(&plan, &out);
            eprintln!(
                "  {} {} {:.0}% seed {}/{}: ttft p99 {:.0} ms, e2e p50 {:.0} ms p99 {:.0} ms, {} errors, util {:?}",
                self.c.key(),
                scenario.key(),
                load * 100.0,
                i + 1,
                s.seeds,
                num(&j["ttft_p99_ms"]),
                num(&j["e2e_p50_ms"]),
                num(&j["e2e_p99_ms"]),
                out.stream.errors,
                out.util.iter().map(|u| u.round()).collect::<Vec<_>>(),
            );
            runs.push(j);
        }
        let window = RunPlan::new(scenario, load, 0, s).window;
        Ok(point_json(scenario, load, window, runs))
    }

    fn one_run(&mut self, plan: &RunPlan, s: &RoutingSettings) -> Result<RunOut> {
        let late_up = plan.join_s.is_none();
        if let Front::Router { socket, setup, .. } = &self.front
            && setup.polled
        {
            // Pins left by the last run's poller would keep backends at 0.
            for i in 0..SPEEDS.len() {
                set_weight(socket, i, 100)?;
            }
        }
        self.wait_ready(late_up)?;
        let before = RouterCounters::read(self.front.socket())?;
        let t0 = Instant::now();
        let mut late = None;
        let during = self.drive(plan, s, &mut late)?;
        let minutes = t0.elapsed().as_secs_f64() / 60.0;
        let after = RouterCounters::read(self.front.socket())?;
        if let Some(g) = late {
            g.stop(Duration::from_secs(5))
                .context("stopping the late replica")?;
        }
        Ok(RunOut {
            stream: during.stream,
            util: during.util,
            weights: during.weights,
            poller: during.poller,
            router: before.zip(after).map(|(b, a)| a.since(&b, minutes)),
        })
    }

    /// Runs the load, and beside it the sampling (and the poller for
    /// `polled_least_queue`); starts the late replica at the join.
    fn drive(
        &self,
        plan: &RunPlan,
        s: &RoutingSettings,
        late: &mut Option<ChildGuard>,
    ) -> Result<During> {
        let client = self.topo.client_ns().to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let poller_done = AtomicBool::new(false);
        let polled = match &self.front {
            Front::Router { socket, setup, .. } if setup.polled => Some(socket.clone()),
            _ => None,
        };
        let rate = plan.rate();
        std::thread::scope(|scope| -> Result<During> {
            let gen_stop = stop.clone();
            let load = loadgen::StreamLoad {
                target: vip(),
                duration: Duration::from_secs_f64(plan.secs),
                lengths: LENGTHS,
                timeout: REQUEST_TIMEOUT,
                seed: plan.seed,
                max_in_flight: MAX_IN_FLIGHT,
            };
            let load_thread = scope.spawn(move || {
                loadgen::in_ns(&client, 2, move || {
                    loadgen::stream_poisson(load, rate, gen_stop)
                })
            });
            let start = Instant::now();
            let lb = self.topo.lb_ns();
            let poller = polled.map(|socket| {
                let (done, stop) = (&poller_done, &stop);
                scope.spawn(move || {
                    let r = netns::in_netns(lb, || poll_least_queue(&socket, done)).and_then(|r| r);
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    r
                })
            });
            let sampled = self.sample(plan, s, start, late, || load_thread.is_finished());
            if sampled.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            let stream = load_thread.join();
            // Before anything can return: the scope waits for the poller.
            poller_done.store(true, Ordering::Relaxed);
            let stream = stream.map_err(|_| anyhow::anyhow!("load generator panicked"))??;
            let poller = poller
                .map(|p| {
                    p.join()
                        .map_err(|_| anyhow::anyhow!("queue poller panicked"))?
                        .context("polled_least_queue's poller")
                })
                .transpose()?;
            let (util, weights) = sampled?;
            Ok(During {
                stream,
                util,
                weights,
                poller,
            })
        })
    }

    /// Every SAMPLE_INTERVAL until `finished`: starts the late replica at
    /// the join, samples utilization in the measured window and the
    /// weights of contenders whose weights move. Returns the mean
    /// utilization per replica (NaN for one never sampled) and the weights.
    fn sample(
        &self,
        plan: &RunPlan,
        s: &RoutingSettings,
        start: Instant,
        late: &mut Option<ChildGuard>,
        finished: impl Fn() -> bool,
    ) -> Result<(Vec<f64>, WeightSeries)> {
        let mut util_sum = [0.0; SPEEDS.len()];
        let mut util_n = [0u32; SPEEDS.len()];
        let mut weights = Vec::new();
        let socket = self.front.socket().filter(|_| self.c.dynamic_weights());
        while !finished() {
            let t = start.elapsed().as_secs_f64();
            if let Some(join) = plan.join_s
                && late.is_none()
                && t >= join
            {
                let cold = Some((s.cold_secs, s.cold_factor));
                *late = Some(start_replica(&self.topo, &self.dir.0, LATE, cold)?);
            }
            let up = |i: usize| i != LATE || plan.join_s.is_none() || late.is_some();
            if plan.in_window(t) {
                for i in (0..SPEEDS.len()).filter(|&i| up(i)) {
                    if let Some(u) = sm_util(&self.dir.0, i) {
                        util_sum[i] += u;
                        util_n[i] += 1;
                    }
                }
            }
            if t < plan.secs
                && let Some(sk) = socket
                && let Ok(st) = status(sk)
            {
                weights.push((t, per_backend(&st, |b| b.weight)));
            }
            std::thread::sleep(SAMPLE_INTERVAL);
        }
        let util = util_sum
            .iter()
            .zip(&util_n)
            .map(|(s, n)| if *n > 0 { s / f64::from(*n) } else { f64::NAN })
            .collect();
        Ok((util, weights))
    }

    fn finish(self) -> Result<()> {
        if let Front::Router { daemon, .. } = self.front {
            daemon.stop(Duration::from_secs(10))?;
        }
        Ok(())
    }
}

fn start_front(c: Contender, s: &RoutingSettings, topo: &Topology, dir: &Path) -> Result<Front> {
    let lb = topo.lb_ns();
    match c.router() {
        Some(setup) => {
            topo.add_snat_addr()?;
            let socket = dir.join("router.sock");
            let config = dir.join("router.toml");
            let slow_start = Duration::from_secs_f64(s.cold_secs);
            std::fs::write(&config, router_config(setup, &socket, slow_start))
                .context("writing the router config")?;
            check_config(lb, &config)?;
            let daemon = start_daemon(lb, &config, &socket)?;
            Ok(Front::Router {
                daemon,
                socket,
                setup,
            })
        }
        None => {
            netns::exec(
                lb,
                &["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"],
            )?;
            Ok(Front::Haproxy(peers::start_haproxy(
                lb,
                &haproxy_config(),
                dir,
                vip(),
            )?))
        }
    }
}

/// `router config check` in `ns`. The daemon prints why it refuses a
/// config to its own stderr, which the result would not carry; checking
/// first puts the reason (an unknown key, say) into the skip.
fn check_config(ns: &str, config: &Path) -> Result<()> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(router_binary()?)
        .args(["config", "check"])
        .arg(config)
        .output()
        .context("running router config check")?;
    if !out.status.success() {
        bail!(
            "router config check refused the config: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// (seconds into the run, weight per replica), sampled.
type WeightSeries = Vec<(f64, Vec<u32>)>;

/// One run's schedule.
struct RunPlan {
    load: f64,
    seed: u64,
    /// Seconds of arrivals.
    secs: f64,
    /// Requests sent in [from, to) are measured.
    window: (f64, f64),
    /// Cold join: when the late replica starts.
    join_s: Option<f64>,
    cold_secs: f64,
}

impl RunPlan {
    fn new(scenario: Scenario, load: f64, seed: u64, s: &RoutingSettings) -> Self {
        let (secs, window, join_s) = match scenario {
            Scenario::Steady => (s.steady_secs, (s.warmup_s, s.steady_secs), None),
            Scenario::ColdJoin => (
                s.cold_run_secs(),
                (s.join_s, s.cold_run_secs()),
                Some(s.join_s),
            ),
        };
        Self {
            load,
            seed,
            secs,
            window,
            join_s,
            cold_secs: s.cold_secs,
        }
    }

    /// Offered requests/s at `t` seconds: the stated fraction of the
    /// capacity of the replicas up (the late one counted at full speed
    /// from its start).
    fn rate(&self) -> impl Fn(f64) -> f64 + Send + 'static {
        let cap = self.load * unit_capacity();
        let all: f64 = SPEEDS.iter().sum();
        let early = all - SPEEDS[LATE];
        let join = self.join_s;
        move |t| {
            cap * if join.is_some_and(|j| t < j) {
                early
            } else {
                all
            }
        }
    }

    fn in_window(&self, t: f64) -> bool {
        t >= self.window.0 && t < self.window.1
    }

    fn window_s(&self) -> f64 {
        self.window.1 - self.window.0
    }

    /// Mean offered rate over the measured window.
    fn offered(&self) -> f64 {
        let rate = self.rate();
        let n = 1000;
        (0..n)
            .map(|k| rate(self.window.0 + self.window_s() * (f64::from(k) + 0.5) / f64::from(n)))
            .sum::<f64>()
            / f64::from(n)
    }
}

/// The router's counters that a run reports as differences.
struct RouterCounters {
    all_saturated_ticks: u64,
    fallback_connections: u64,
    weight_changes: Vec<u64>,
}

/// What the router's counters moved by in a run.
struct RouterDelta {
    all_saturated_ticks: u64,
    fallback_connections: u64,
    weight_changes_per_min: Vec<f64>,
}

impl RouterCounters {
    fn read(socket: Option<&Path>) -> Result<Option<Self>> {
        let Some(socket) = socket else {
            return Ok(None);
        };
        let st = status(socket)?;
        Ok(Some(Self {
            all_saturated_ticks: st.all_saturated_ticks,
            fallback_connections: st.fallback_connections,
            weight_changes: per_backend(&st, |b| b.weight_changes),
        }))
    }

    fn since(&self, before: &Self, minutes: f64) -> RouterDelta {
        RouterDelta {
            all_saturated_ticks: self
                .all_saturated_ticks
                .saturating_sub(before.all_saturated_ticks),
            fallback_connections: self
                .fallback_connections
                .saturating_sub(before.fallback_connections),
            weight_changes_per_min: self
                .weight_changes
                .iter()
                .zip(&before.weight_changes)
                .map(|(a, b)| a.saturating_sub(*b) as f64 / minutes.max(1e-9))
                .collect(),
        }
    }
}

/// What the threads beside the load saw.
struct During {
    stream: StreamRun,
    util: Vec<f64>,
    weights: WeightSeries,
    poller: Option<PollerStats>,
}

struct RunOut {
    stream: StreamRun,
    /// Mean SM activity per replica over the window, while it was up.
    util: Vec<f64>,
    weights: WeightSeries,
    poller: Option<PollerStats>,
    router: Option<RouterDelta>,
}

/// What `polled_least_queue`'s poller did in a run.
#[derive(Default)]
struct PollerStats {
    rounds: u64,
    /// Replica scrapes that failed (a replica not up yet counts here).
    scrape_failures: u64,
    /// `router weight set` calls made.
    pins: u64,
}

/// `polled_least_queue`'s decision loop, run in the LB namespace (where the
/// router's own scrapes come from) until `done`: every SCRAPE_INTERVAL it
/// reads each replica's queue (running + waiting requests) from its
/// /metrics and pins weight 100 on the routable replica(s) with the least
/// queue, 0 on the others, through the router's CLI. The datapath is the
/// router's Maglev draw, so only this decision differs from the others.
fn poll_least_queue(socket: &Path, done: &AtomicBool) -> Result<PollerStats> {
    let mut stats = PollerStats::default();
    // What the last run left was reset to 100 before this one.
    let mut pinned = [100u32; SPEEDS.len()];
    let start = Instant::now();
    while !done.load(Ordering::Relaxed) {
        let st = status(socket)?;
        // Only backends the router would route to are candidates, as a
        // scheduler scores only ready endpoints; pinning all traffic on one
        // that is not healthy yet would leave no backend at all.
        let routable = per_backend(&st, |b| b.healthy.unwrap_or(true) && b.mode != "drain");
        let queues: Vec<Option<f64>> = (0..SPEEDS.len()).map(scrape_queue).collect();
        stats.rounds += 1;
        stats.scrape_failures += queues.iter().filter(|q| q.is_none()).count() as u64;
        if let Some(want) = least_queue_weights(&queues, &routable) {
            stats.pins += apply_pins(socket, &mut pinned, &want)?;
        }
        let next = SCRAPE_INTERVAL.mul_f64(stats.rounds as f64);
        if let Some(wait) = next.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    Ok(stats)
}

/// Running + waiting requests from replica `i`'s /metrics; None when it
/// does not answer (not up) or the figures are missing.
fn scrape_queue(i: usize) -> Option<f64> {
    let r = netns::http_get(replica_addr(i), "/metrics", Duration::from_millis(300)).ok()?;
    (r.status == 200).then_some(())?;
    queue_from_metrics(&r.body)
}

fn queue_from_metrics(text: &str) -> Option<f64> {
    let gauge = |name: &str| {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    Some(gauge("vllm:num_requests_running")? + gauge("vllm:num_requests_waiting")?)
}

/// Weight 100 for the routable replicas whose queue is the least (ties
/// share), 0 for the rest; None when no routable replica answered (the
/// weights then stay as they are).
fn least_queue_weights(queues: &[Option<f64>], routable: &[bool]) -> Option<Vec<u32>> {
    let candidate = |i: usize| queues[i].filter(|_| routable[i]);
    let least = (0..queues.len())
        .filter_map(candidate)
        .min_by(f64::total_cmp)?;
    Some(
        (0..queues.len())
            .map(|i| if candidate(i) == Some(least) { 100 } else { 0 })
            .collect(),
    )
}

/// Pins `want`, raising weights before lowering any, so the service never
/// passes through a moment with every weight at 0. Returns the calls made.
fn apply_pins(socket: &Path, pinned: &mut [u32], want: &[u32]) -> Result<u64> {
    let mut calls = 0;
    let raise = (0..want.len()).filter(|&i| want[i] > pinned[i]);
    let lower = (0..want.len()).filter(|&i| want[i] < pinned[i]);
    let order: Vec<usize> = raise.chain(lower).collect();
    for i in order {
        set_weight(socket, i, want[i])?;
        pinned[i] = want[i];
        calls += 1;
    }
    Ok(calls)
}

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

fn num(v: &Value) -> f64 {
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
fn run_json(plan: &RunPlan, r: &RunOut) -> Value {
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
fn point_json(scenario: Scenario, load: f64, window: (f64, f64), runs: Vec<Value>) -> Value {
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

/// Runs one contender's points into `points`; on an error the points done
/// so far stay there.
fn run_contender(c: Contender, s: &RoutingSettings, points: &mut Vec<Value>) -> Result<()> {
    c.check_runnable()?;
    let mut stage = Stage::new(c, s)?;
    for &load in &s.steady_loads {
        points.push(stage.point(Scenario::Steady, load, s)?);
    }
    if !s.cold_loads.is_empty() {
        // From here on the fourth replica joins in each run, cold.
        stage.stop_replica(LATE)?;
    }
    for &load in &s.cold_loads {
        points.push(stage.point(Scenario::ColdJoin, load, s)?);
    }
    stage.finish()
}

fn settings_json(s: &RoutingSettings) -> Value {
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

/// Runs every contender (or those in `only`) and writes `routing.json` into
/// `out_dir`. A contender that cannot run or fails is recorded with the
/// reason, in its entry and in the document's `skipped` list.
pub fn run_routing(s: &RoutingSettings, out_dir: &Path, only: Option<&[String]>) -> Result<Value> {
    let chosen: Vec<Contender> = Contender::ALL
        .into_iter()
        .filter(|c| only.is_none_or(|o| o.iter().any(|k| k == c.key())))
        .collect();
    eprintln!(
        "bench routing: {} seed(s) per point; steady {} s at loads {:?}; cold join at {} s + {} s at loads {:?}; \
         about {:.0} min for {} contender(s){}",
        s.seeds,
        s.steady_secs,
        s.steady_loads,
        s.join_s,
        s.window_s,
        s.cold_loads,
        s.estimate_s(chosen.len()) / 60.0,
        chosen.len(),
        if s.quick { " (quick)" } else { "" }
    );
    let mut results = Vec::new();
    let mut skipped = Vec::new();
    for c in chosen {
        eprintln!("bench routing: {}", c.label());
        let mut points = Vec::new();
        let mut entry = json!({ "contender": c.key(), "label": c.label() });
        if let Err(e) = run_contender(c, s, &mut points) {
            let why = format!("{e:#}");
            eprintln!("bench routing: {} skipped: {why}", c.key());
            entry["skipped"] = json!(why);
            skipped.push(json!({ "contender": c.key(), "reason": why }));
        }
        entry["points"] = json!(points);
        results.push(entry);
    }
    let sock = Path::new("/run/router-bench.sock");
    let slow_start = Duration::from_secs_f64(s.cold_secs);
    let configs: serde_json::Map<String, Value> = Contender::ALL
        .into_iter()
        .map(|c| {
            let text = match c.router() {
                Some(r) => router_config(r, sock, slow_start),
                None => haproxy_config(),
            };
            (c.key().to_owned(), json!(text))
        })
        .collect();
    let doc = json!({
        "benchmark": "routing",
        "format": 2,
        "quick": s.quick,
        "settings": settings_json(s),
        "machine": crate::report::machine_json(),
        "contenders": results,
        "skipped": skipped,
        "configs": configs,
    });
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(
        out_dir.join("routing.json"),
        serde_json::to_string_pretty(&doc)? + "\n",
    )
    .context("writing routing.json")?;
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_uses_the_mean_length() {
        // 8 / (22.03 × 0.02 × 1.5) ≈ 12.1 requests/s.
        assert!(
            (unit_capacity() - 12.10).abs() < 0.05,
            "{}",
            unit_capacity()
        );
    }

    #[test]
    fn least_queue_pins_the_least_routable_and_ties_share() {
        let q = [Some(3.0), Some(1.0), Some(1.0), Some(0.0)];
        assert_eq!(
            least_queue_weights(&q, &[true, true, true, true]),
            Some(vec![0, 0, 0, 100])
        );
        // The emptiest is not routable (not healthy yet): the next ones share.
        assert_eq!(
            least_queue_weights(&q, &[true, true, true, false]),
            Some(vec![0, 100, 100, 0])
        );
        // A replica that did not answer is no candidate.
        let q = [Some(2.0), None, Some(5.0), None];
        assert_eq!(
            least_queue_weights(&q, &[true; 4]),
            Some(vec![100, 0, 0, 0])
        );
        assert_eq!(least_queue_weights(&[None, None], &[true, true]), None);
    }

    #[test]
    fn queue_is_running_plus_waiting() {
        let text = "# HELP vllm:num_requests_running x\n\
                    vllm:num_requests_running{model_name=\"m\"} 8.0\n\
                    vllm:num_requests_running_total{model_name=\"m\"} 99.0\n\
                    vllm:num_requests_waiting{model_name=\"m\"} 3.0\n";
        assert_eq!(queue_from_metrics(text), Some(11.0));
        assert_eq!(
            queue_from_metrics("vllm:num_requests_running 1\n"),
            None,
            "waiting missing"
        );
    }

    #[test]
    fn seeds_are_shared_by_contenders_and_distinct_by_point() {
        let a = Scenario::Steady.seed(0.7, 0);
        assert_eq!(a, Scenario::Steady.seed(0.7, 0));
        assert_ne!(a, Scenario::Steady.seed(0.9, 0));
        assert_ne!(a, Scenario::Steady.seed(0.7, 1));
        assert_ne!(a, Scenario::ColdJoin.seed(0.7, 0));
    }

    #[test]
    fn cold_join_steps_the_load_up_at_the_join() {
        let s = RoutingSettings::full();
        let plan = RunPlan::new(Scenario::ColdJoin, 0.7, 1, &s);
        let rate = plan.rate();
        let cap = 0.7 * unit_capacity();
        assert!((rate(1.0) - cap * 2.4).abs() < 1e-9);
        assert!((rate(s.join_s) - cap * 3.4).abs() < 1e-9);
        assert!((plan.offered() - cap * 3.4).abs() < 1e-6);
        assert_eq!(plan.window, (s.join_s, s.join_s + 60.0));
        assert!(plan.secs >= s.join_s + 60.0);
    }

    #[test]
    fn configs_name_the_selection_mode() {
        let sock = Path::new("/run/x.sock");
        let ll = Contender::LeastLoaded
            .router()
            .map(|r| router_config(r, sock, Duration::from_secs(15)));
        let rr = Contender::RoundRobin
            .router()
            .map(|r| router_config(r, sock, Duration::from_secs(15)));
        let (ll, rr) = (ll.unwrap_or_default(), rr.unwrap_or_default());
        assert!(ll.contains("slow_start = \"15000ms\""));
        if SELECTION_KEY_SUPPORTED {
            assert!(ll.contains("selection = \"least_loaded\""));
            assert!(rr.contains("selection = \"maglev\""));
        } else {
            assert!(!ll.contains("selection"));
        }
        assert!(Contender::LeastConn.router().is_none());
        assert!(Contender::PolledLeastQueue.dynamic_weights());
        assert!(!Contender::Oracle.dynamic_weights());
    }
}
