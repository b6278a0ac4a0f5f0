//! One canary run's world: four mock replicas, 200 client addresses, the
//! router with a stable and a canary pool, and what the run saw of the
//! guard (from the status API) and of the clients (from the load).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use router_testkit::{
    daemon_proc::{Daemon, ScratchDir, start_daemon, status},
    netns::{self, ChildGuard, Topology},
    replica,
};

use super::{CANARY, CanarySettings, REPLICAS, client_addr};
use crate::{
    loadgen::{self, StreamLoad, StreamRun},
    routing::LENGTHS,
};

/// Client addresses: users, each sticky to one pool by the share split.
pub const CLIENTS: usize = 200;
const CLIENT_NET: &str = "198.19.0.0/16";
const VIP: &str = "198.18.100.1:8000";
const PORT: u16 = 8000;
const SERVICE: &str = "llm";
/// The routing suite's replica engine: continuous batching of up to 8,
/// 20 ms base step, 50% slower at a full batch (see `routing`).
const MAX_BATCH: f64 = 8.0;
const STEP_MS: f64 = 20.0;
const BATCH_SLOWDOWN: f64 = 0.5;
/// Longer than the slowest completion (512 tokens at a quarter speed and a
/// full batch, about 61 s) would take only under a queue the run never
/// builds; a request past it is an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);
const MAX_IN_FLIGHT: usize = 2_000;
const SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arm {
    Guarded,
    Unguarded,
}

impl Arm {
    pub const ALL: [Arm; 2] = [Arm::Guarded, Arm::Unguarded];

    pub fn key(self) -> &'static str {
        match self {
            Arm::Guarded => "guarded",
            Arm::Unguarded => "unguarded",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Arm::Guarded => "canary pool with a rollback guard",
            Arm::Unguarded => "canary pool without a guard",
        }
    }
}

/// Requests per second one replica of speed 1.0 completes at a full batch
/// (the routing suite's formula, on this engine).
pub fn unit_capacity() -> f64 {
    MAX_BATCH / (LENGTHS.mean() * STEP_MS / 1e3 * (1.0 + BATCH_SLOWDOWN))
}

pub fn backend_name(i: usize) -> String {
    format!("gpu-{i}")
}

fn replica_addr(i: usize) -> SocketAddr {
    SocketAddr::from((netns::backend_addr(i), PORT))
}

/// Static equal weights and least-loaded selection with the engines' batch
/// size as room: the guard, not the weights, is what this suite measures.
pub fn router_config(arm: Arm, s: &CanarySettings, socket: &Path) -> String {
    let mut c = format!(
        "[daemon]\ninterface = \"{}\"\ncontrol_socket = \"{}\"\n\n\
         [[service]]\nname = \"{SERVICE}\"\nvip = \"{VIP}\"\nprotocol = \"tcp\"\nsnat = \"{}\"\n\
         selection = \"least_loaded\"\n",
        netns::LB_IF,
        socket.display(),
        netns::SNAT_ADDR,
    );
    for i in 0..REPLICAS {
        c.push_str(&format!(
            "\n[[service.backend]]\nname = \"{}\"\naddress = \"{}\"\nweight = 100\n\
             max_in_flight = {}\nhealth = {{ tcp = true, http_path = \"/health\", \
             interval = \"500ms\", timeout = \"400ms\", fall = 2, rise = 2 }}\n",
            backend_name(i),
            replica_addr(i),
            MAX_BATCH as u32,
        ));
    }
    let stable: Vec<String> = (0..REPLICAS)
        .filter(|&i| i != CANARY)
        .map(|i| format!("\"{}\"", backend_name(i)))
        .collect();
    c.push_str(&format!(
        "\n[[service.pool]]\nname = \"stable\"\nbackends = [{}]\nshare = {}\n\n\
         [[service.pool]]\nname = \"canary\"\nbackends = [\"{}\"]\nshare = {}\n",
        stable.join(", "),
        100 - s.canary_share,
        backend_name(CANARY),
        s.canary_share,
    ));
    if arm == Arm::Guarded {
        c.push_str(&format!(
            "guard = {{ ttft_p99_ratio = {:?}, min_connections = {} }}\n",
            s.guard_ratio, s.guard_min_connections
        ));
    }
    c
}

/// The guard's trip, as the status API reported it.
pub struct Trip {
    /// Seconds into the run when the sampler first saw it.
    pub at_s: f64,
    pub p99_ms: Option<f64>,
    pub others_p99_ms: Option<f64>,
    pub connections: u64,
}

pub struct RunOut {
    pub stream: StreamRun,
    pub trip: Option<Trip>,
    /// Trips seen before the slowdown: false alarms.
    pub false_trips: u64,
    pub canary_share_at_end: Option<u32>,
}

/// One run's world, dropped in field order: the daemon and the replicas
/// before the scratch directory and the namespaces.
pub struct Rig {
    daemon: Daemon,
    _replicas: Vec<ChildGuard>,
    socket: PathBuf,
    _dir: ScratchDir,
    topo: Topology,
}

impl Rig {
    pub fn new(arm: Arm, s: &CanarySettings) -> Result<Self> {
        let topo = Topology::one_arm(REPLICAS)?;
        let dir = ScratchDir::new(&format!("bench-canary-{}", arm.key()))?;
        let replicas = (0..REPLICAS)
            .map(|i| start_replica(&topo, i))
            .collect::<Result<Vec<_>>>()?;
        let clients: Vec<Ipv4Addr> = (0..CLIENTS).map(client_addr).collect();
        topo.add_client_addresses(&clients, CLIENT_NET)?;
        topo.add_snat_addr()?;
        let socket = dir.0.join("router.sock");
        let config = dir.0.join("router.toml");
        std::fs::write(&config, router_config(arm, s, &socket))
            .context("writing the router config")?;
        let daemon = start_daemon(topo.lb_ns(), &config, &socket)?;
        let rig = Self {
            daemon,
            _replicas: replicas,
            socket,
            _dir: dir,
            topo,
        };
        rig.wait_ready()?;
        Ok(rig)
    }

    /// Until every replica passes its health checks (weight above 0).
    fn wait_ready(&self) -> Result<()> {
        // A hang guard: rise 2 at 500 ms takes about a second.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = status(&self.socket)?;
            if st.policy.len() == REPLICAS && st.policy.iter().all(|b| b.weight > 0) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "replicas not all up within 30 s: {:?}",
                    st.policy
                        .iter()
                        .map(|b| (&b.backend, b.weight, &b.reason))
                        .collect::<Vec<_>>()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The load, and beside it the slowdown and the guard's course; then
    /// the daemon is stopped and the world torn down.
    pub fn run(self, s: &CanarySettings, seed: u64) -> Result<RunOut> {
        let stop = Arc::new(AtomicBool::new(false));
        let rate = s.rate();
        let client = self.topo.client_ns().to_owned();
        let sources: Vec<Ipv4Addr> = (0..CLIENTS).map(client_addr).collect();
        let out = std::thread::scope(|scope| -> Result<RunOut> {
            let gen_stop = stop.clone();
            let load = StreamLoad {
                target: VIP.parse().context("the VIP")?,
                duration: Duration::from_secs_f64(s.secs),
                lengths: LENGTHS,
                timeout: REQUEST_TIMEOUT,
                seed,
                max_in_flight: MAX_IN_FLIGHT,
            };
            let load_thread = scope.spawn(move || {
                loadgen::in_ns(&client, 2, move || async move {
                    loadgen::stream_poisson_from(load, move |_| rate, gen_stop, &sources).await
                })
            });
            let watched = self.watch(s, Instant::now(), || load_thread.is_finished());
            if watched.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            let stream = load_thread
                .join()
                .map_err(|_| anyhow::anyhow!("load generator panicked"))??;
            let (trip, false_trips, canary_share_at_end) = watched?;
            Ok(RunOut {
                stream,
                trip,
                false_trips,
                canary_share_at_end,
            })
        })?;
        self.daemon
            .stop(Duration::from_secs(10))
            .context("stopping the daemon")?;
        Ok(out)
    }

    /// Every SAMPLE_INTERVAL until `finished`: slows the canary at its time
    /// and reads the canary pool's guard.
    fn watch(
        &self,
        s: &CanarySettings,
        start: Instant,
        finished: impl Fn() -> bool,
    ) -> Result<(Option<Trip>, u64, Option<u32>)> {
        let mut slowed = false;
        let mut trip = None;
        let mut false_trips = 0;
        let mut share = None;
        while !finished() {
            let t = start.elapsed().as_secs_f64();
            if !slowed && t >= s.slow_at_s {
                let addr = replica_addr(CANARY);
                let change = format!(r#"{{"speed": {}}}"#, s.slow_speed);
                netns::in_netns(self.topo.backend_ns(CANARY), move || {
                    replica::control(addr, &change)
                })?
                .context("slowing the canary's replica")?;
                slowed = true;
            }
            let st = status(&self.socket)?;
            let canary = st
                .pools
                .iter()
                .find(|p| p.name == "canary")
                .context("no canary pool in the status")?;
            share = Some(canary.share);
            let trips = canary.guard.as_ref().map_or(0, |g| g.trips);
            if !slowed {
                false_trips = trips;
            } else if trip.is_none()
                && trips > false_trips
                && let Some(g) = &canary.guard
            {
                trip = Some(Trip {
                    at_s: t,
                    p99_ms: g.last_p99_ms,
                    others_p99_ms: g.last_others_p99_ms,
                    connections: g.last_connections,
                });
            }
            std::thread::sleep(SAMPLE_INTERVAL);
        }
        Ok((trip, false_trips, share))
    }
}

fn start_replica(topo: &Topology, i: usize) -> Result<ChildGuard> {
    let args = [
        ("--max-batch", (MAX_BATCH as u32).to_string()),
        ("--step-ms", STEP_MS.to_string()),
        ("--batch-slowdown", BATCH_SLOWDOWN.to_string()),
    ];
    let mut argv: Vec<&str> = args.iter().flat_map(|(k, v)| [*k, v.as_str()]).collect();
    // Headers with the first token: the datapath's first byte, which the
    // guard judges, is then the time to first token.
    argv.push("--headers-with-first-token");
    replica::spawn_mock_replica(
        topo.backend_ns(i),
        &backend_name(i),
        netns::backend_addr(i),
        PORT,
        &argv,
    )
    .with_context(|| format!("starting replica {}", backend_name(i)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_is_the_routing_suites() {
        assert!((unit_capacity() - crate::routing::unit_capacity()).abs() < 1e-12);
    }

    #[test]
    fn only_the_guarded_arm_has_a_guard() {
        let s = CanarySettings::full();
        let sock = Path::new("/run/x.sock");
        let g = router_config(Arm::Guarded, &s, sock);
        let u = router_config(Arm::Unguarded, &s, sock);
        assert!(g.contains("guard = { ttft_p99_ratio = 1.5, min_connections = 50 }"));
        assert!(!u.contains("guard"));
        for c in [&g, &u] {
            assert!(c.contains("share = 90") && c.contains("share = 10"));
            assert!(c.contains("backends = [\"gpu-0\", \"gpu-1\", \"gpu-2\"]"));
        }
    }
}
