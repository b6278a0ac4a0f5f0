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

use std::{net::Ipv4Addr, path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};
use router_testkit::netns;
use serde_json::{Value, json};

use crate::{
    loadgen::Lengths,
    peers::{self, HAPROXY},
};

mod poller;
mod results;
mod setup;
mod stage;

use results::settings_json;
use setup::{haproxy_config, router_config};
use stage::Stage;

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
    use super::{
        poller::{least_queue_weights, queue_from_metrics},
        stage::RunPlan,
        *,
    };

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
