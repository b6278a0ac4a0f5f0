//! The soak (`cargo xtask soak`, `tests/integration/tests/soak.rs`): what
//! goes wrong in production, all at once and for minutes, against the real
//! daemon in network namespaces, under steady client traffic:
//!
//! - weight churn: a random `weight set` or `weight auto` through the control
//!   API every 100 ms;
//! - a backend whose health check fails and recovers every few seconds (the
//!   mock replica's `fail_health` switch: it keeps serving, its weight goes
//!   to 0 and back);
//! - a backend that is killed (SIGKILL) and started again (a hard flap);
//! - the daemon restarted every ~15 s, by SIGTERM and `kill -9` in turn,
//!   with the datapath left pinned in between.
//!
//! Every connection's outcome is counted and attributed to the backend that
//! served it (see `traffic`). This module owns the soak's topology and
//! schedule and returns a [`SoakReport`]; it asserts nothing itself, the
//! caller judges the report ([`SoakReport::problems`]). Everything it
//! creates is removed when it returns, on error and on Ctrl-C (the caller's
//! stop flag) included: the daemon and backends run in their own process
//! groups, so a terminal's Ctrl-C reaches only the soak, which winds down
//! and tears down in order.

mod faults;
mod lab;
mod report;
mod traffic;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use router::api::views::BackendView;
use router_testkit::netns;

pub use report::{BackendTotals, Churn, Failure, Flaps, Flow, Restarts, SoakReport, Totals};

use lab::Lab;

/// The two services, on their own VIPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Service {
    /// Plain HTTP: the fixture backend (tests/fixtures/backend.py).
    Web,
    /// Completions: the mock GPU replica (tests/fixtures/mock_replica.py).
    Llama,
}

impl Service {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Service::Web => "web",
            Service::Llama => "llama",
        }
    }

    pub(crate) fn vip(self) -> SocketAddrV4 {
        match self {
            Service::Web => SocketAddrV4::new(netns::vip(1), 80),
            Service::Llama => SocketAddrV4::new(netns::vip(2), 8000),
        }
    }
}

/// Backend `i` of this list lives in the topology's backend namespace `i`.
pub(crate) struct BackendDef {
    pub name: &'static str,
    pub service: Service,
}

pub(crate) const BACKENDS: [BackendDef; 4] = [
    BackendDef {
        name: "web-0",
        service: Service::Web,
    },
    BackendDef {
        name: "web-1",
        service: Service::Web,
    },
    BackendDef {
        name: "gpu-0",
        service: Service::Llama,
    },
    BackendDef {
        name: "gpu-1",
        service: Service::Llama,
    },
];

/// The backend that is killed and started again.
pub(crate) const HARD_FLAP: usize = 1;
/// The backend whose health check fails and recovers.
pub(crate) const HEALTH_FLAP: usize = 3;
/// Backends listen on this port; the VIPs' ports differ.
const BACKEND_PORT: u16 = 8000;
/// Translated flows leave from here, apart from the LB's own address that
/// the daemon's probes and polls use, so the two never share a port.
const SNAT: Ipv4Addr = netns::SNAT_ADDR;
/// Longest wait for a (re)started daemon to answer on its socket.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(30);

/// What the soak does and for how long.
#[derive(Clone, Debug)]
pub struct SoakOptions {
    pub duration: Duration,
    /// Daemon restarts, SIGTERM and kill -9 in turn, from this far in.
    pub restart_every: Duration,
    /// How long the datapath runs without a daemon at each restart, at
    /// least (the new daemon's own start adds to it).
    pub restart_down: Duration,
    /// One `weight set` or `weight auto` per tick.
    pub churn_every: Duration,
    /// The flapping backend's health fails for this long, then passes for
    /// this long.
    pub health_flap_every: Duration,
    /// Whether the hard flap runs at all.
    pub hard_flap: bool,
    /// The hard-flapped backend is killed this often…
    pub hard_flap_every: Duration,
    /// …and started again after this long.
    pub hard_flap_down: Duration,
    /// Threads making short connections, at `short_rate` per second in all.
    pub short_clients: usize,
    pub short_rate: f64,
    /// Threads each holding one long stream open after another.
    pub stream_clients: usize,
    pub seed: u64,
    /// Clients bind their port before connecting, so ports (4-tuples) are
    /// reused within seconds rather than after the kernel has cycled
    /// through its range: a stress of the connection table's handling of a
    /// reused 4-tuple.
    pub reuse_ports: bool,
    /// report.json, outcomes.csv and the daemons' and backends' logs go here.
    pub out_dir: PathBuf,
    /// A progress line every 10 s.
    pub progress: bool,
}

impl SoakOptions {
    pub fn new(duration: Duration, out_dir: PathBuf) -> Self {
        Self {
            duration,
            restart_every: Duration::from_secs(15),
            restart_down: Duration::from_millis(500),
            churn_every: Duration::from_millis(100),
            health_flap_every: Duration::from_secs(3),
            hard_flap: true,
            hard_flap_every: Duration::from_secs(20),
            hard_flap_down: Duration::from_secs(3),
            short_clients: 6,
            short_rate: 60.0,
            stream_clients: 4,
            seed: seed_from_clock(),
            reuse_ports: false,
            out_dir,
            progress: false,
        }
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            self.duration >= Duration::from_secs(10)
                && self.duration <= Duration::from_secs(12 * 3600),
            "soak duration {:?} is outside 10 s ..= 12 h",
            self.duration
        );
        ensure!(
            (1..=64).contains(&self.short_clients) && (1..=64).contains(&self.stream_clients),
            "1 to 64 short and stream clients"
        );
        ensure!(
            self.short_rate > 0.0 && self.short_rate <= 1000.0,
            "short_rate {} is outside (0, 1000] per second",
            self.short_rate
        );
        for (name, d) in [
            ("restart_every", self.restart_every),
            ("churn_every", self.churn_every),
            ("health_flap_every", self.health_flap_every),
            ("hard_flap_every", self.hard_flap_every),
            ("hard_flap_down", self.hard_flap_down),
        ] {
            ensure!(
                d >= Duration::from_millis(10),
                "{name} {d:?} is too short (10 ms at least)"
            );
        }
        ensure!(
            self.hard_flap_down < self.hard_flap_every,
            "hard_flap_down must be shorter than hard_flap_every"
        );
        Ok(())
    }
}

fn seed_from_clock() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// xorshift64*: the soak's choices, reproducible from a seed.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        // Zero is xorshift's fixed point; mix the seed so nearby seeds differ.
        Self((seed ^ 0x9e37_79b9_7f4a_7c15).max(1))
    }

    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n ≥ 1), near enough for a test schedule.
    pub(crate) fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n.max(1))) as u32
    }
}

/// A poisoned lock only means another soak thread panicked; the data
/// (guards, records) is still what it was.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The control API client (`router::api::client::request`) on a runtime of
/// its own, for the soak's plain threads.
pub(crate) struct Api {
    rt: tokio::runtime::Runtime,
    socket: PathBuf,
}

impl Api {
    pub(crate) fn new(socket: &Path) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime for the control API client")?;
        Ok(Self {
            rt,
            socket: socket.to_path_buf(),
        })
    }

    /// One request; the JSON body of a 2xx answer.
    pub(crate) fn call(
        &self,
        method: &str,
        path: &str,
    ) -> Result<Vec<u8>, router::api::client::ClientError> {
        self.rt
            .block_on(router::api::client::request(&self.socket, method, path))
            .map(|b| b.to_vec())
    }

    pub(crate) fn status(&self) -> Result<router::api::StatusReply> {
        let body = self.call("GET", "/v1/status")?;
        serde_json::from_slice(&body).context("decoding /v1/status")
    }

    pub(crate) fn backends(&self) -> Result<Vec<BackendView>> {
        let body = self.call("GET", "/v1/backends")?;
        serde_json::from_slice(&body).context("decoding /v1/backends")
    }
}

/// A stretch of time; `to` is `None` while it lasts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Window {
    pub from: Instant,
    pub to: Option<Instant>,
}

impl Window {
    pub(crate) fn open(from: Instant) -> Self {
        Self { from, to: None }
    }

    /// Whether `[start, end]` meets this window.
    pub(crate) fn overlaps(&self, start: Instant, end: Instant) -> bool {
        self.from <= end && self.to.is_none_or(|to| to >= start)
    }
}

/// One daemon restart.
#[derive(Clone, Debug)]
pub(crate) struct Restart {
    pub signal: &'static str,
    pub down: Window,
    /// How the old daemon ended.
    pub exit: String,
    pub clean_exit: bool,
    /// The new daemon logged that it adopted the pinned datapath.
    pub adopted: bool,
}

/// What the fault injectors did, and when.
#[derive(Default)]
pub(crate) struct Timeline {
    /// The hard-flapped backend's process was gone (kill → accepting again).
    pub hard_down: Vec<Window>,
    /// The health-flapped backend's `/health` answered 503.
    pub health_failing: Vec<Window>,
    pub restarts: Vec<Restart>,
    /// Health-flap windows in which the daemon reported the backend
    /// unhealthy; hard flaps likewise.
    pub health_flaps_seen: u64,
    pub hard_flaps_seen: u64,
}

/// Live totals for the progress line.
#[derive(Default)]
pub(crate) struct Live {
    pub attempted: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub weight_changes: AtomicU64,
}

/// What the soak's threads share.
pub(crate) struct Ctx<'a> {
    lab: &'a Lab,
    pub t0: Instant,
    ending: AtomicBool,
    ended_at: Mutex<Option<Instant>>,
    /// Set by the restart thread from stopping a daemon until its
    /// successor answers.
    pub restarting: AtomicBool,
    pub live: Live,
    pub timeline: Mutex<Timeline>,
    fatal: Mutex<Option<String>>,
    /// See [`SoakOptions::reuse_ports`].
    pub reuse_ports: bool,
}

impl<'a> Ctx<'a> {
    fn new(lab: &'a Lab, reuse_ports: bool) -> Self {
        Self {
            lab,
            reuse_ports,
            t0: Instant::now(),
            ending: AtomicBool::new(false),
            ended_at: Mutex::new(None),
            restarting: AtomicBool::new(false),
            live: Live::default(),
            timeline: Mutex::new(Timeline::default()),
            fatal: Mutex::new(None),
        }
    }

    pub(crate) fn lab(&self) -> &Lab {
        self.lab
    }

    pub(crate) fn pin_path(&self) -> PathBuf {
        self.lab.pin_path()
    }

    /// No new connection, fault or restart starts after this.
    pub(crate) fn ending(&self) -> bool {
        self.ending.load(Ordering::SeqCst)
    }

    fn end(&self) {
        lock(&self.ended_at).get_or_insert_with(Instant::now);
        self.ending.store(true, Ordering::SeqCst);
    }

    /// Ends the soak early with `msg` as the reason.
    pub(crate) fn fail(&self, msg: String) {
        eprintln!("soak: {msg}");
        lock(&self.fatal).get_or_insert(msg);
        self.end();
    }

    /// Sleeps until `deadline`, or until the soak is ending.
    pub(crate) fn sleep_until(&self, deadline: Instant) {
        loop {
            let now = Instant::now();
            if now >= deadline || self.ending() {
                return;
            }
            thread::sleep((deadline - now).min(Duration::from_millis(50)));
        }
    }

    /// Seconds since the soak's start.
    pub(crate) fn at(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.t0).as_secs_f64()
    }
}

/// Runs the soak for `opts.duration`, or until `stop` is set (Ctrl-C), and
/// returns its report, also written to `opts.out_dir/report.json`.
pub fn run(opts: &SoakOptions, stop: &AtomicBool) -> Result<SoakReport> {
    opts.validate()?;
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("creating {}", opts.out_dir.display()))?;
    remove_old_logs(&opts.out_dir);
    println!(
        "soak: building the topology (client, LB, {} backends) and starting the daemon; seed {}",
        BACKENDS.len(),
        opts.seed
    );
    let lab = Lab::build(&opts.out_dir)?;
    let ctx = Ctx::new(&lab, opts.reuse_ports);
    let hard = if opts.hard_flap {
        format!(
            "{} killed every {:?} for {:?}",
            BACKENDS[HARD_FLAP].name, opts.hard_flap_every, opts.hard_flap_down
        )
    } else {
        format!("{} never killed", BACKENDS[HARD_FLAP].name)
    };
    println!(
        "soak: running for {:?}: {} short-connection clients ({}/s), {} stream clients{}, \
         weight churn every {:?}, {} health flapping every {:?}, {hard}, \
         daemon restarts every {:?}",
        opts.duration,
        opts.short_clients,
        opts.short_rate,
        opts.stream_clients,
        if opts.reuse_ports {
            " (ports bound first)"
        } else {
            ""
        },
        opts.churn_every,
        BACKENDS[HEALTH_FLAP].name,
        opts.health_flap_every,
        opts.restart_every,
    );
    let pace = Duration::from_secs_f64(opts.short_clients as f64 / opts.short_rate);
    let client_ns = lab.client_ns().to_owned();
    let (outcomes, churn, interrupted) = thread::scope(|s| {
        let ctx = &ctx;
        let ns = client_ns.as_str();
        let mut workers = Vec::new();
        for i in 0..opts.short_clients {
            let seed = opts.seed.wrapping_add(i as u64);
            workers.push(
                s.spawn(move || netns::in_netns(ns, || traffic::short_worker(ctx, seed, pace))),
            );
        }
        for i in 0..opts.stream_clients {
            let seed = opts.seed.wrapping_add(1000 + i as u64);
            workers
                .push(s.spawn(move || netns::in_netns(ns, || traffic::stream_worker(ctx, seed))));
        }
        let churn = s.spawn(move || faults::churn(ctx, opts.churn_every, opts.seed));
        let restarts = s.spawn(move || faults::restarts(ctx, opts));
        let flaps = s.spawn(move || faults::flaps(ctx, opts));

        let mut interrupted = false;
        let mut next_progress = ctx.t0 + Duration::from_secs(10);
        loop {
            if stop.load(Ordering::SeqCst) {
                interrupted = true;
                println!("soak: interrupted; winding down");
                break;
            }
            if ctx.ending() || ctx.t0.elapsed() >= opts.duration {
                break;
            }
            if opts.progress && Instant::now() >= next_progress {
                next_progress += Duration::from_secs(10);
                progress(ctx);
            }
            thread::sleep(Duration::from_millis(50));
        }
        ctx.end();
        let mut outcomes = Vec::new();
        for w in workers {
            match w.join() {
                Ok(Ok(o)) => outcomes.extend(o),
                Ok(Err(e)) => ctx.fail(format!("a client could not enter its namespace: {e:#}")),
                Err(_) => ctx.fail("a client thread panicked".into()),
            }
        }
        let churn = churn.join().unwrap_or_else(|_| {
            ctx.fail("the churn thread panicked".into());
            faults::ChurnStats::default()
        });
        for (what, h) in [("restart", restarts), ("flap", flaps)] {
            if h.join().is_err() {
                ctx.fail(format!("the {what} thread panicked"));
            }
        }
        (outcomes, churn, interrupted)
    });
    if opts.progress {
        progress(&ctx);
    }
    // The datapath's own count of new connections, per backend, across
    // every daemon of the run (its counters are pinned too).
    let api = Api::new(&lab.socket());
    let views = api
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(Api::backends);
    // Every packet the datapath passed or dropped, by reason, over the run.
    let reasons = api
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(Api::status)
        .map(|st| st.datapath.reasons)
        .unwrap_or_default();
    let fatal = lock(&ctx.fatal).clone();
    let ended_at = lock(&ctx.ended_at).unwrap_or_else(Instant::now);
    let timeline = std::mem::take(&mut *lock(&ctx.timeline));
    let csv = opts.out_dir.join("outcomes.csv");
    std::fs::write(&csv, report::outcomes_csv(ctx.t0, &outcomes, &timeline))
        .with_context(|| format!("writing {}", csv.display()))?;
    let report = report::build(report::Inputs {
        opts,
        t0: ctx.t0,
        ended_at,
        outcomes,
        churn,
        timeline,
        views,
        reasons,
        interrupted,
        fatal,
    });
    let path = opts.out_dir.join("report.json");
    std::fs::write(&path, report.to_json()?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("soak: report written to {}", path.display());
    // The lab drops here: daemon, pins, backends, namespaces.
    drop(ctx);
    drop(lab);
    Ok(report)
}

/// Logs of an earlier run in the same out dir (only names the soak writes).
fn remove_old_logs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name.strip_suffix(".log").is_some_and(|stem| {
            BACKENDS.iter().any(|b| b.name == stem)
                || stem
                    .strip_prefix("daemon-")
                    .is_some_and(|n| n.parse::<u32>().is_ok())
        });
        if ours {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn progress(ctx: &Ctx<'_>) {
    let tl = lock(&ctx.timeline);
    println!(
        "soak: t={:>5.0}s  attempted {}  completed {}  failed {}  restarts {}  weight changes {}  \
         flaps: health {} hard {}",
        ctx.t0.elapsed().as_secs_f64(),
        ctx.live.attempted.load(Ordering::Relaxed),
        ctx.live.completed.load(Ordering::Relaxed),
        ctx.live.failed.load(Ordering::Relaxed),
        tl.restarts.len(),
        ctx.live.weight_changes.load(Ordering::Relaxed),
        tl.health_failing.len(),
        tl.hard_down.len(),
    );
}
