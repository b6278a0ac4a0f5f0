//! One contender's world ([`Stage`]) and its runs: what a run is planned to
//! send, the router's counters around it, and what it yields.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use router_testkit::{
    daemon_proc::{ScratchDir, status},
    netns::{self, ChildGuard, Topology},
};
use serde_json::Value;

use super::poller::{PollerStats, poll_least_queue};
use super::results::{num, point_json, run_json};
use super::setup::{
    Front, backend_index, per_backend, set_weight, sm_util, start_front, start_replica, vip,
};
use super::{
    Contender, HEALTH_INTERVAL_MS, LATE, LENGTHS, MAX_IN_FLIGHT, REQUEST_TIMEOUT, RoutingSettings,
    SAMPLE_INTERVAL, SPEEDS, Scenario, Weights, unit_capacity,
};
use crate::loadgen::{self, StreamRun};

/// One contender's world: its front, the replicas, the scratch directory
/// and the topology, dropped in that order (processes before namespaces).
pub(super) struct Stage {
    pub(super) c: Contender,
    pub(super) front: Front,
    pub(super) replicas: Vec<Option<ChildGuard>>,
    pub(super) dir: ScratchDir,
    pub(super) topo: Topology,
}

impl Stage {
    /// The topology, all four replicas warm, and the contender's front.
    pub(super) fn new(c: Contender, s: &RoutingSettings) -> Result<Self> {
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

    pub(super) fn stop_replica(&mut self, i: usize) -> Result<()> {
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
    pub(super) fn point(
        &mut self,
        scenario: Scenario,
        load: f64,
        s: &RoutingSettings,
    ) -> Result<Value> {
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

    pub(super) fn finish(self) -> Result<()> {
        if let Front::Router { daemon, .. } = self.front {
            daemon.stop(Duration::from_secs(10))?;
        }
        Ok(())
    }
}

/// (seconds into the run, weight per replica), sampled.
type WeightSeries = Vec<(f64, Vec<u32>)>;

/// One run's schedule.
pub(super) struct RunPlan {
    pub(super) load: f64,
    pub(super) seed: u64,
    /// Seconds of arrivals.
    pub(super) secs: f64,
    /// Requests sent in [from, to) are measured.
    pub(super) window: (f64, f64),
    /// Cold join: when the late replica starts.
    pub(super) join_s: Option<f64>,
    pub(super) cold_secs: f64,
}

impl RunPlan {
    pub(super) fn new(scenario: Scenario, load: f64, seed: u64, s: &RoutingSettings) -> Self {
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
    pub(super) fn rate(&self) -> impl Fn(f64) -> f64 + Send + 'static {
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

    pub(super) fn in_window(&self, t: f64) -> bool {
        t >= self.window.0 && t < self.window.1
    }

    pub(super) fn window_s(&self) -> f64 {
        self.window.1 - self.window.0
    }

    /// Mean offered rate over the measured window.
    pub(super) fn offered(&self) -> f64 {
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
    pub(super) all_saturated_ticks: u64,
    pub(super) fallback_connections: u64,
    pub(super) weight_changes: Vec<u64>,
}

/// What the router's counters moved by in a run.
pub(super) struct RouterDelta {
    pub(super) all_saturated_ticks: u64,
    pub(super) fallback_connections: u64,
    pub(super) weight_changes_per_min: Vec<f64>,
}

impl RouterCounters {
    pub(super) fn read(socket: Option<&Path>) -> Result<Option<Self>> {
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
    pub(super) stream: StreamRun,
    pub(super) util: Vec<f64>,
    pub(super) weights: WeightSeries,
    pub(super) poller: Option<PollerStats>,
}

pub(super) struct RunOut {
    pub(super) stream: StreamRun,
    /// Mean SM activity per replica over the window, while it was up.
    pub(super) util: Vec<f64>,
    pub(super) weights: WeightSeries,
    pub(super) poller: Option<PollerStats>,
    pub(super) router: Option<RouterDelta>,
}
