//! Telemetry faults injected into a running daemon. One service's backends
//! each take their telemetry from a different source (a `router agent` on
//! the backend's host over the fake NVML, a stand-in agent or Prometheus
//! endpoint that can misbehave, or the daemon's own NVML), and each faulted
//! backend gets one fault while the daemon's own status is sampled every
//! 150 ms:
//!
//! - the faulted backend holds its weight while its last reading is fresh,
//!   then decays gradually to the quarter share (`stale_fraction` of full)
//!   over `stale_decay`, and is never treated as idle (never above what it
//!   had) nor as dead (never 0: it is healthy);
//! - the other backends keep their weights exactly;
//! - no healthy backend ever has weight 0, and the datapath's weights are
//!   the policy's;
//! - each failure is counted where it belongs (`errors` for a source that
//!   fails, `invalid` for garbage) and named in `last_error`;
//! - once the fault is removed the weight climbs back in bounded steps;
//! - the daemon answers throughout and exits cleanly on SIGTERM.
//!
//! Short policy timings (poll 200 ms, stale after 1 s, decay over 2 s) keep
//! each scenario to a few seconds.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use router::{control::StatusReply, controller::BackendPolicyStatus};
use router_testkit::{
    daemon_proc::{
        ScratchDir, datapath_weights, policy_weights, router_binary, start_daemon, status,
    },
    fake_nvml::{self, FakeError, FakeGpu, FakeGpuState, FakeNvml},
    fixtures,
    netns::{self, ChildGuard, Topology},
};

const VIP: &str = "198.18.100.1:8000";
const SNAT: std::net::Ipv4Addr = netns::SNAT_ADDR;
/// Every telemetry endpoint listens on this port of its backend's host.
const TELEMETRY_PORT: u16 = 9400;
const TOKEN: &str = "fault-injection-token";

const POLL: Duration = Duration::from_millis(200);
const STALE_AFTER: Duration = Duration::from_secs(1);
const STALE_DECAY: Duration = Duration::from_secs(2);
const SAMPLE_EVERY: Duration = Duration::from_millis(150);
/// Healthy load of every source (GPU utilization or KV-cache usage): the
/// weight settles near floor + (full − floor) × (0.8 − 0.2) / 0.8 ≈ 76,
/// far enough above the stale share for the decay to be seen.
const LOAD: f64 = 0.2;
/// `stale_fraction` (0.25) × full weight (100) at capacity 1.0: where an
/// unknown load ends up.
const STALE_SHARE: u32 = 25;
/// `weight_deadband` × full weight: a settled weight is within this of its
/// target, from whichever side it approached.
const DEADBAND: u32 = 10;

/// Where a backend's telemetry comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Source {
    /// `router agent` on the backend's host, reading that host's fake NVML.
    Agent,
    /// `metrics_server.py --format agent`: the agent's API, with faults the
    /// real agent cannot produce on demand.
    FakeAgent,
    /// `metrics_server.py`: a vLLM `/metrics` page.
    Prometheus,
    /// The daemon's own NVML (the fake library), this GPU of its state file.
    LocalNvml(u32),
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Every NVML query on the GPU fails with this error until removed.
    Nvml(FakeError),
    /// Every NVML query on the GPU blocks until removed (a wedged driver).
    NvmlHang,
    /// The agent process is killed; removing the fault starts a new one.
    AgentDown,
    /// The endpoint answers in this `metrics_server.py` mode.
    Endpoint(&'static str),
}

/// Which telemetry counter a fault must move (and the other must not).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Counted {
    Errors,
    Invalid,
}

struct Case {
    name: &'static str,
    source: Source,
    /// None: a control backend, whose weight must not move.
    fault: Option<Fault>,
    counted: Counted,
    /// `last_error` must contain this while the fault lasts.
    message: &'static str,
}

fn steady(name: &'static str, source: Source) -> Case {
    Case {
        name,
        source,
        fault: None,
        counted: Counted::Errors,
        message: "",
    }
}

fn faulty(
    name: &'static str,
    source: Source,
    fault: Fault,
    counted: Counted,
    message: &'static str,
) -> Case {
    Case {
        name,
        source,
        fault: Some(fault),
        counted,
        message,
    }
}

fn healthy_gpu(index: u32) -> FakeGpu {
    FakeGpu {
        sm_util: (LOAD * 100.0) as u32,
        ..FakeGpu::new(index)
    }
}

fn metrics_server_script() -> PathBuf {
    fixtures::fixture("metrics_server.py")
}

/// One backend's host: what serves its telemetry and the knobs that break it.
struct Host {
    /// The agent or endpoint process; None for the daemon's own NVML, and
    /// while an agent is down.
    process: Option<ChildGuard>,
    /// This host's fake NVML state, for `Source::Agent`.
    nvml_state: PathBuf,
    /// `metrics_server.py`'s mode file.
    mode_file: PathBuf,
}

/// A running daemon over one backend namespace per case. Fields drop in
/// order: the daemon and processes first, then the scratch files, then the
/// namespaces.
struct Rig {
    daemon: Option<router_testkit::daemon_proc::Daemon>,
    hosts: Vec<Host>,
    http_servers: Vec<ChildGuard>,
    local_nvml: Option<(FakeNvml, FakeGpuState)>,
    socket: PathBuf,
    dir: ScratchDir,
    topo: Topology,
    cases: Vec<Case>,
}

impl Rig {
    /// Builds the namespaces, starts every telemetry source and the daemon.
    /// With `serve_http`, each backend also runs the fixture HTTP server on
    /// its service port and is health-checked, so traffic can flow.
    fn start(tag: &str, cases: Vec<Case>, serve_http: bool) -> Rig {
        let topo = Topology::one_arm(cases.len()).expect("topology");
        topo.add_snat_addr().expect("adding the SNAT address");
        let dir = ScratchDir::new(&format!("faults-{tag}")).expect("scratch dir");
        std::fs::write(dir.0.join("agent.token"), format!("{TOKEN}\n")).unwrap();

        let local_gpus = cases
            .iter()
            .filter_map(|c| match c.source {
                Source::LocalNvml(n) => Some(n + 1),
                _ => None,
            })
            .max();
        // The daemon inherits FAKE_NVML_STATE from this process.
        let local_nvml = local_gpus.map(|n| {
            let state = FakeGpuState {
                init_error: None,
                devices: (0..n).map(healthy_gpu).collect(),
            };
            (FakeNvml::acquire(&state).expect("fake NVML"), state)
        });

        let mut rig = Rig {
            daemon: None,
            hosts: Vec::new(),
            http_servers: Vec::new(),
            local_nvml,
            socket: dir.0.join("router.sock"),
            dir,
            topo,
            cases,
        };
        for i in 0..rig.cases.len() {
            let host = Host {
                process: None,
                nvml_state: rig.dir.0.join(format!("gpu-{i}.json")),
                mode_file: rig.dir.0.join(format!("mode-{i}")),
            };
            rig.hosts.push(host);
            match rig.cases[i].source {
                Source::Agent => {
                    FakeGpuState {
                        init_error: None,
                        devices: vec![healthy_gpu(0)],
                    }
                    .write(&rig.hosts[i].nvml_state)
                    .unwrap();
                    rig.start_agent(i);
                }
                Source::FakeAgent | Source::Prometheus => {
                    let format = if rig.cases[i].source == Source::FakeAgent {
                        "agent"
                    } else {
                        "vllm"
                    };
                    let script = metrics_server_script();
                    let (bind, port, load) = (
                        netns::backend_addr(i).to_string(),
                        TELEMETRY_PORT.to_string(),
                        LOAD.to_string(),
                    );
                    let process = netns::spawn(
                        rig.topo.backend_ns(i),
                        &[
                            OsStr::new("python3"),
                            script.as_os_str(),
                            OsStr::new("--bind"),
                            OsStr::new(&bind),
                            OsStr::new("--port"),
                            OsStr::new(&port),
                            OsStr::new("--format"),
                            OsStr::new(format),
                            OsStr::new("--load"),
                            OsStr::new(&load),
                            OsStr::new("--mode-file"),
                            rig.hosts[i].mode_file.as_os_str(),
                        ],
                    )
                    .expect("telemetry endpoint");
                    rig.hosts[i].process = Some(process);
                    rig.wait_for_telemetry(i);
                }
                Source::LocalNvml(_) => {}
            }
            if serve_http {
                let server = netns::spawn_http_backend(
                    rig.topo.backend_ns(i),
                    rig.cases[i].name,
                    netns::backend_addr(i),
                    8000,
                )
                .expect("HTTP backend");
                rig.http_servers.push(server);
                netns::wait_for_tcp(
                    rig.topo.lb_ns(),
                    SocketAddr::new(netns::backend_addr(i).into(), 8000),
                    Duration::from_secs(5),
                )
                .unwrap();
            }
        }

        let config = rig.dir.0.join("router.toml");
        std::fs::write(&config, rig.config(serve_http)).unwrap();
        rig.daemon = Some(start_daemon(rig.topo.lb_ns(), &config, &rig.socket).expect("daemon"));
        rig
    }

    fn config(&self, health: bool) -> String {
        let mut s = format!(
            "[daemon]\ninterface = \"{}\"\ncontrol_socket = \"{}\"\nmetrics_listen = \"\"\n\n\
             [policy]\npoll_interval = \"{}ms\"\nslow_start = \"400ms\"\n\
             stale_after = \"{}ms\"\nstale_decay = \"{}ms\"\n\n\
             [[service]]\nname = \"llama\"\nvip = \"{VIP}\"\nsnat = \"{SNAT}\"\n\
             # The share policy reads telemetry for every weight; a least-loaded\n\
             # service's capacities never follow telemetry (policy unit tests).\n\
             selection = \"maglev\"\n",
            self.topo.lb_if(),
            self.socket.display(),
            POLL.as_millis(),
            STALE_AFTER.as_millis(),
            STALE_DECAY.as_millis(),
        );
        let token = self.dir.0.join("agent.token");
        for (i, case) in self.cases.iter().enumerate() {
            let addr = netns::backend_addr(i);
            let telemetry = match case.source {
                Source::Agent | Source::FakeAgent => format!(
                    "{{ source = \"agent\", url = \"http://{addr}:{TELEMETRY_PORT}\", device = 0, token_file = \"{}\" }}",
                    token.display()
                ),
                Source::Prometheus => format!(
                    "{{ source = \"prometheus\", url = \"http://{addr}:{TELEMETRY_PORT}/metrics\", format = \"vllm\" }}"
                ),
                Source::LocalNvml(n) => format!(
                    "{{ source = \"nvml\", device = {n}, library = \"{}\" }}",
                    fake_nvml::library_path().unwrap().display()
                ),
            };
            s.push_str(&format!(
                "\n[[service.backend]]\nname = \"{}\"\naddress = \"{addr}:8000\"\ncapacity = 1.0\ntelemetry = {telemetry}\n",
                case.name
            ));
            if health {
                s.push_str(
                    "health = { tcp = true, interval = \"200ms\", timeout = \"150ms\", fall = 2, rise = 2 }\n",
                );
            }
        }
        s
    }

    fn start_agent(&mut self, i: usize) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.topo.backend_ns(i)])
            .arg(router_binary().unwrap())
            .args([
                "agent",
                "--listen",
                &format!("{}:{TELEMETRY_PORT}", netns::backend_addr(i)),
                "--token-file",
            ])
            .arg(self.dir.0.join("agent.token"))
            .arg("--nvml-library")
            .arg(fake_nvml::library_path().unwrap())
            .env(fake_nvml::STATE_ENV, &self.hosts[i].nvml_state)
            .stdin(std::process::Stdio::null());
        self.hosts[i].process = Some(netns::spawn_command(cmd).expect("router agent"));
        self.wait_for_telemetry(i);
    }

    fn wait_for_telemetry(&self, i: usize) {
        netns::wait_for_tcp(
            self.topo.lb_ns(),
            SocketAddr::new(netns::backend_addr(i).into(), TELEMETRY_PORT),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{}'s telemetry endpoint: {e:#}", self.cases[i].name));
    }

    /// Sets backend `i`'s GPU to `gpu` in whichever fake NVML it reads.
    fn set_gpu(&mut self, i: usize, gpu: impl Fn(u32) -> FakeGpu) {
        match self.cases[i].source {
            Source::Agent => FakeGpuState {
                init_error: None,
                devices: vec![gpu(0)],
            }
            .write(&self.hosts[i].nvml_state)
            .unwrap(),
            Source::LocalNvml(n) => {
                let (fake, state) = self.local_nvml.as_mut().unwrap();
                state.devices[n as usize] = gpu(n);
                fake.set(state).unwrap();
            }
            other => panic!("{}: no NVML behind {other:?}", self.cases[i].name),
        }
    }

    fn inject(&mut self, i: usize) {
        match self.cases[i].fault {
            None => {}
            Some(Fault::Nvml(e)) => self.set_gpu(i, |n| FakeGpu {
                error: Some(e),
                ..healthy_gpu(n)
            }),
            Some(Fault::NvmlHang) => self.set_gpu(i, |n| FakeGpu {
                hang: true,
                ..healthy_gpu(n)
            }),
            // SIGKILL: an agent that dies, not one that shuts down politely.
            Some(Fault::AgentDown) => drop(self.hosts[i].process.take()),
            Some(Fault::Endpoint(mode)) => std::fs::write(&self.hosts[i].mode_file, mode).unwrap(),
        }
    }

    fn heal(&mut self, i: usize) {
        match self.cases[i].fault {
            None => {}
            Some(Fault::Nvml(_) | Fault::NvmlHang) => self.set_gpu(i, healthy_gpu),
            Some(Fault::AgentDown) => self.start_agent(i),
            Some(Fault::Endpoint(_)) => std::fs::write(&self.hosts[i].mode_file, "ok").unwrap(),
        }
    }

    /// Threads of the daemon and of every running agent, by name.
    fn thread_counts(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let daemon = self.daemon.as_ref().expect("daemon running");
        out.insert("daemon".to_string(), threads(daemon.id()));
        for (case, host) in self.cases.iter().zip(&self.hosts) {
            if let (Source::Agent, Some(p)) = (case.source, &host.process) {
                out.insert(format!("{}'s agent", case.name), threads(p.id()));
            }
        }
        out
    }

    fn faulted(&self) -> impl Iterator<Item = &Case> {
        self.cases.iter().filter(|c| c.fault.is_some())
    }

    /// The daemon's status; panics if the daemon has exited or stops
    /// answering.
    fn status(&mut self) -> StatusReply {
        let daemon = self.daemon.as_mut().expect("daemon running");
        if let Some(exit) = daemon.try_wait().unwrap() {
            panic!("the daemon exited during the faults: {exit}");
        }
        status(&self.socket).unwrap_or_else(|e| panic!("the daemon stopped answering: {e:#}"))
    }

    /// Waits until every backend follows its headroom and its weight has
    /// not moved for six samples (over four polls); returns the weights.
    fn settle(&mut self) -> BTreeMap<String, u32> {
        let start = Instant::now();
        let mut last: Option<BTreeMap<String, u32>> = None;
        let mut same = 0;
        loop {
            let st = self.status();
            let now = policy_weights(&st);
            let following = st.policy.iter().all(|p| p.reason == "headroom");
            if following && last.as_ref() == Some(&now) {
                same += 1;
                if same >= 6 {
                    return now;
                }
            } else {
                same = 0;
            }
            last = Some(now);
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "weights never settled: {:?}",
                st.policy
                    .iter()
                    .map(|p| (&p.backend, p.weight, &p.reason, &p.stats.last_error))
                    .collect::<Vec<_>>()
            );
            thread::sleep(SAMPLE_EVERY);
        }
    }

    /// Checks what must hold in every sample, faults or not: the daemon's
    /// datapath carries the policy's weights, no healthy backend is at 0,
    /// and the control backends keep their settled weights.
    fn check_invariants(&self, st: &StatusReply, settled: &BTreeMap<String, u32>, when: &str) {
        let policy = policy_weights(st);
        assert!(
            policy.values().any(|w| *w > 0),
            "{when}: every weight is zero: {policy:?}"
        );
        for p in &st.policy {
            assert!(
                p.healthy != Some(false),
                "{when}: {} failed its health check; this test only breaks telemetry",
                p.backend
            );
            assert!(
                p.weight > 0,
                "{when}: healthy backend {} got weight 0 ({})",
                p.backend,
                p.reason
            );
        }
        let datapath = datapath_weights(st);
        assert_eq!(
            datapath, policy,
            "{when}: the datapath's weights differ from the policy's"
        );
        // A healthy source may still miss a poll's deadline on a busy
        // machine now and then; the policy holds the weight through that,
        // so only the weight and staleness are checked, not last_error.
        for c in self.cases.iter().filter(|c| c.fault.is_none()) {
            let p = policy_of(st, c.name);
            assert!(
                p.weight == settled[c.name] && !p.stale,
                "{when}: control backend {} moved: weight {} (settled at {}), stale {}, last error {:?}",
                c.name,
                p.weight,
                settled[c.name],
                p.stale,
                p.stats.last_error
            );
        }
    }
}

/// A process's thread count (`ip netns exec` execs its program in place, so
/// a guard's pid is the program's own).
fn threads(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no thread count for pid {pid}"))
}

fn policy_of<'a>(st: &'a StatusReply, backend: &str) -> &'a BackendPolicyStatus {
    st.policy
        .iter()
        .find(|p| p.backend == backend)
        .unwrap_or_else(|| panic!("{backend} missing from status"))
}

/// One sample of a faulted backend: (stale, weight, reason).
type Trace = Vec<(bool, u32, String)>;

/// Breaks every faulted backend at once and follows them until each sits
/// at the stale share; checks the decay of each. Returns the last status.
fn break_and_decay(rig: &mut Rig, settled: &BTreeMap<String, u32>) -> StatusReply {
    let before = rig.status();
    let names: Vec<&'static str> = rig.faulted().map(|c| c.name).collect();
    for name in &names {
        assert!(
            settled[*name] >= STALE_SHARE + 15,
            "{name} settled at {}, too close to the stale share {STALE_SHARE} to see a decay",
            settled[*name]
        );
    }
    for i in 0..rig.cases.len() {
        rig.inject(i);
    }
    let start = Instant::now();
    let mut traces: BTreeMap<&str, Trace> = BTreeMap::new();
    // Until every faulted backend has sat at the stale share for a few
    // samples, bounded well beyond stale_after + stale_decay.
    let mut settled_samples = 0;
    let last = loop {
        thread::sleep(SAMPLE_EVERY);
        let st = rig.status();
        rig.check_invariants(
            &st,
            settled,
            &format!("{:?} into the faults", start.elapsed()),
        );
        for name in &names {
            let p = policy_of(&st, name);
            traces
                .entry(name)
                .or_default()
                .push((p.stale, p.weight, p.reason.clone()));
        }
        let all_stale = names
            .iter()
            .all(|n| policy_of(&st, n).reason == "telemetry stale");
        settled_samples = if all_stale { settled_samples + 1 } else { 0 };
        if settled_samples >= 3 {
            break st;
        }
        assert!(
            start.elapsed() < STALE_AFTER + STALE_DECAY + Duration::from_secs(6),
            "not every faulted backend reached the stale share: {traces:?}"
        );
    };

    for case in rig.faulted() {
        let name = case.name;
        let held = settled[name];
        let trace = &traces[name];
        let fault = case.fault.unwrap();
        let what = format!("{name} ({fault:?})");
        assert!(
            trace
                .iter()
                .all(|(_, w, _)| (STALE_SHARE..=held).contains(w)),
            "{what}: the weight left [{STALE_SHARE}, {held}] — read as idle or as dead: {trace:?}"
        );
        assert!(
            trace.windows(2).all(|w| w[1].1 <= w[0].1),
            "{what}: the weight went up with no fresh reading: {trace:?}"
        );
        assert!(
            trace.iter().take_while(|s| !s.0).all(|s| s.1 == held),
            "{what}: the weight moved before the reading went stale: {trace:?}"
        );
        assert!(
            !trace[0].0 && trace[0].1 == held,
            "{what}: the weight was not held while the last reading was fresh: {trace:?}"
        );
        let mut steps: Vec<u32> = trace
            .iter()
            .map(|s| s.1)
            .filter(|w| (STALE_SHARE + 1..held).contains(w))
            .collect();
        steps.dedup();
        assert!(
            steps.len() >= 3,
            "{what}: the weight did not decay gradually from {held} to {STALE_SHARE}: {trace:?}"
        );
        let p = policy_of(&last, name);
        assert!(
            p.stale && p.weight == STALE_SHARE && p.reason == "telemetry stale",
            "{what}: ends at weight {}, stale {}, reason {:?}; want {STALE_SHARE}, stale, \"telemetry stale\"",
            p.weight,
            p.stale,
            p.reason
        );
        let (b, a) = (&policy_of(&before, name).stats, &p.stats);
        let (errors, invalid) = (a.errors - b.errors, a.invalid - b.invalid);
        let timeouts = a.timeouts - b.timeouts;
        let polls = a.polls - b.polls;
        match case.counted {
            // A source that fails never delivers a reading to reject.
            Counted::Errors => assert!(
                errors >= 5 && invalid == 0,
                "{what}: {errors} errors and {invalid} invalid readings in {polls} polls; \
                 want every failure counted as an error; stats {a:?}"
            ),
            // Garbage is rejected, not mistaken for a failing source: every
            // poll that got an answer counted it invalid, and the only
            // errors are polls that missed their deadline (a busy machine).
            Counted::Invalid => assert!(
                invalid >= 5 && errors == timeouts && invalid + errors == polls,
                "{what}: {invalid} invalid readings, {errors} errors ({timeouts} timeouts) in \
                 {polls} polls; want every answered poll counted invalid; stats {a:?}"
            ),
        }
        let mut decay: Vec<u32> = trace.iter().map(|s| s.1).collect();
        decay.dedup();
        println!(
            "{name}: {held} → {decay:?}; {errors} errors, {invalid} invalid in {polls} polls; {:?}",
            a.last_error.as_deref().unwrap_or("")
        );
        assert!(
            a.last_error
                .as_deref()
                .is_some_and(|e| e.contains(case.message)),
            "{what}: last_error {:?} does not say {:?}",
            a.last_error,
            case.message
        );
    }
    last
}

/// Removes every fault and follows the faulted backends until each is back
/// where it settled before the fault, climbing in bounded steps.
fn heal_and_recover(rig: &mut Rig, settled: &BTreeMap<String, u32>) {
    for i in 0..rig.cases.len() {
        rig.heal(i);
    }
    let names: Vec<&'static str> = rig.faulted().map(|c| c.name).collect();
    let start = Instant::now();
    let mut traces: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    let mut steady_samples = 0;
    let last = loop {
        thread::sleep(SAMPLE_EVERY);
        let st = rig.status();
        rig.check_invariants(
            &st,
            settled,
            &format!("{:?} into the recovery", start.elapsed()),
        );
        for name in &names {
            traces
                .entry(name)
                .or_default()
                .push(policy_of(&st, name).weight);
        }
        // Back: fresh, following headroom again, and no longer moving
        // (the damped climb stops within the deadband of its target).
        let back = |n: &&str| {
            let p = policy_of(&st, n);
            let trace = &traces[n];
            !p.stale
                && p.reason == "headroom"
                && p.weight > STALE_SHARE
                && trace.len() >= 2
                && trace[trace.len() - 2] == p.weight
        };
        steady_samples = if names.iter().all(back) {
            steady_samples + 1
        } else {
            0
        };
        if steady_samples >= 4 {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not every backend recovered (settled at {settled:?}): {traces:?}; {:?}",
            st.policy
                .iter()
                .map(|p| (&p.backend, p.weight, &p.reason, &p.stats.last_error))
                .collect::<Vec<_>>()
        );
    };
    for name in &names {
        let trace = &traces[name];
        let mut climb = trace.clone();
        climb.dedup();
        println!("{name} recovering: {climb:?}");
        // Samples are not ticks (a busy machine can put two polls between
        // samples), so the step bound itself is left to the policy's unit
        // tests; what shows here is a climb, never a fall, through
        // intermediate weights rather than one jump.
        assert!(
            trace.windows(2).all(|w| w[1] >= w[0]),
            "{name}: the weight fell while recovering: {trace:?}"
        );
        let last_weight = *trace.last().unwrap();
        assert!(
            trace
                .iter()
                .any(|w| (STALE_SHARE + 1..last_weight).contains(w)),
            "{name}: jumped back instead of climbing: {trace:?}"
        );
        // Before and after, the weight approached the same target from
        // below and stopped within the deadband of it.
        let p = policy_of(&last, name);
        assert!(
            p.weight.abs_diff(settled[*name]) < DEADBAND,
            "{name}: recovered to {}, not back where it settled ({}): {trace:?}",
            p.weight,
            settled[*name]
        );
    }
}

/// Stops the daemon the way an operator would; it must still be running
/// and exit cleanly.
fn stop(mut rig: Rig) {
    let daemon = rig.daemon.take().unwrap();
    let exit = daemon.stop(Duration::from_secs(10)).unwrap();
    assert!(exit.success(), "the daemon exited with {exit} on SIGTERM");
}

#[test]
fn nvml_errors_degrade_only_the_broken_gpu() {
    use FakeError::*;
    let cases = vec![
        steady("steady-agent", Source::Agent),
        steady("steady-local", Source::LocalNvml(0)),
        // A lost GPU stays lost until the fault is removed (a GPU that
        // fell off the bus comes back only after a reset).
        faulty(
            "agent-gpu-lost",
            Source::Agent,
            Fault::Nvml(GpuIsLost),
            Counted::Errors,
            "GPU is lost",
        ),
        faulty(
            "agent-nvml-timeout",
            Source::Agent,
            Fault::Nvml(Timeout),
            Counted::Errors,
            "utilization: timed out",
        ),
        faulty(
            "agent-nvml-unknown",
            Source::Agent,
            Fault::Nvml(Unknown),
            Counted::Errors,
            "unknown error",
        ),
        faulty(
            "agent-nvml-hung",
            Source::Agent,
            Fault::NvmlHang,
            Counted::Errors,
            "has not returned",
        ),
        faulty(
            "local-gpu-lost",
            Source::LocalNvml(1),
            Fault::Nvml(GpuIsLost),
            Counted::Errors,
            "GPU is lost",
        ),
        faulty(
            "local-nvml-timeout",
            Source::LocalNvml(2),
            Fault::Nvml(Timeout),
            Counted::Errors,
            "utilization: timed out",
        ),
        faulty(
            "local-nvml-unknown",
            Source::LocalNvml(3),
            Fault::Nvml(Unknown),
            Counted::Errors,
            "unknown error",
        ),
        faulty(
            "local-nvml-hung",
            Source::LocalNvml(4),
            Fault::NvmlHang,
            Counted::Errors,
            "has not returned",
        ),
    ];
    let mut rig = Rig::start("nvml", cases, false);
    let settled = rig.settle();
    let threads_before = rig.thread_counts();
    break_and_decay(&mut rig, &settled);
    // A hung NVML call cannot be cancelled; a poller that starts another
    // on every poll ends up with a thread per poll stuck in the driver
    // (more than 15 here), and in time with no threads left.
    let threads_during = rig.thread_counts();
    println!("threads before the faults {threads_before:?}, during {threads_during:?}");
    for (who, before) in &threads_before {
        let during = threads_during[who];
        assert!(
            during <= before + 4,
            "{who}: {before} threads before a GPU hung, {during} while it hung: \
             NVML calls pile up on the hung GPU"
        );
    }
    heal_and_recover(&mut rig, &settled);
    stop(rig);
}

#[test]
fn agents_and_prometheus_endpoints_that_fail_degrade_only_their_backend() {
    let cases = vec![
        steady("steady-agent", Source::Agent),
        steady("steady-prometheus", Source::Prometheus),
        faulty(
            "agent-down",
            Source::Agent,
            Fault::AgentDown,
            Counted::Errors,
            "Connection refused",
        ),
        // Answers, but long after the poll's deadline (0.8 × poll_interval).
        faulty(
            "agent-slow",
            Source::FakeAgent,
            Fault::Endpoint("slow 1000"),
            Counted::Errors,
            "timed out after",
        ),
        faulty(
            "agent-garbage",
            Source::FakeAgent,
            Fault::Endpoint("garbage"),
            Counted::Invalid,
            "expected a JSON object",
        ),
        faulty(
            "agent-invalid",
            Source::FakeAgent,
            Fault::Endpoint("invalid"),
            Counted::Invalid,
            "gpu_util is negative",
        ),
        // Accepts and reads the request, never answers.
        faulty(
            "prometheus-hang",
            Source::Prometheus,
            Fault::Endpoint("hang"),
            Counted::Errors,
            "timed out after",
        ),
        faulty(
            "prometheus-garbage",
            Source::Prometheus,
            Fault::Endpoint("garbage"),
            Counted::Invalid,
            "not UTF-8",
        ),
        faulty(
            "prometheus-invalid",
            Source::Prometheus,
            Fault::Endpoint("invalid"),
            Counted::Invalid,
            "above 100%",
        ),
    ];
    let mut rig = Rig::start("endpoints", cases, false);
    let settled = rig.settle();
    break_and_decay(&mut rig, &settled);
    heal_and_recover(&mut rig, &settled);
    stop(rig);
}

/// Every source fails at once: no backend's load is known, yet all are
/// healthy, so all keep the same conservative share and connections through
/// the VIP keep succeeding on every one of them.
#[test]
fn with_every_source_failing_traffic_still_spreads_over_all_backends() {
    let cases = vec![
        faulty(
            "agent-down",
            Source::Agent,
            Fault::AgentDown,
            Counted::Errors,
            "Connection refused",
        ),
        faulty(
            "agent-slow",
            Source::FakeAgent,
            Fault::Endpoint("slow 1000"),
            Counted::Errors,
            "timed out after",
        ),
        faulty(
            "prometheus-hang",
            Source::Prometheus,
            Fault::Endpoint("hang"),
            Counted::Errors,
            "timed out after",
        ),
        faulty(
            "prometheus-garbage",
            Source::Prometheus,
            Fault::Endpoint("garbage"),
            Counted::Invalid,
            "not UTF-8",
        ),
        faulty(
            "local-gpu-lost",
            Source::LocalNvml(0),
            Fault::Nvml(FakeError::GpuIsLost),
            Counted::Errors,
            "GPU is lost",
        ),
    ];
    let mut rig = Rig::start("all", cases, true);
    let settled = rig.settle();
    let st = break_and_decay(&mut rig, &settled);
    assert!(
        st.policy.iter().all(|p| p.weight == STALE_SHARE),
        "every backend should hold the same unknown-load share: {:?}",
        policy_weights(&st)
    );

    // 200 connections through the VIP, all answered, spread over every
    // backend (equal weights: 40 each expected; binomial σ ≈ 5.7).
    let vip: SocketAddr = VIP.parse().unwrap();
    let answers = netns::in_netns(rig.topo.client_ns(), || {
        (0..200)
            .map(|_| {
                netns::http_get(vip, "/", Duration::from_secs(5))
                    .expect("GET / through the VIP while all telemetry is down")
                    .body
            })
            .collect::<Vec<_>>()
    })
    .unwrap();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for body in answers {
        *counts.entry(body).or_default() += 1;
    }
    for case in &rig.cases {
        let n = counts.get(case.name).copied().unwrap_or(0);
        assert!(
            n >= 15,
            "{} answered {n} of 200 connections at an equal weight: {counts:?}",
            case.name
        );
    }
    let st = rig.status();
    rig.check_invariants(&st, &settled, "after the traffic");

    heal_and_recover(&mut rig, &settled);
    stop(rig);
}
