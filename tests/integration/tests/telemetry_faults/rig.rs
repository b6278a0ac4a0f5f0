//! The cases (a backend, its telemetry source and its fault) and the rig
//! that runs them: the hosts, the daemon, and the checks every sample must
//! pass.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use router::api::{BackendPolicyStatus, StatusReply};
use router_testkit::{
    daemon_proc::{
        ScratchDir, datapath_weights, policy_weights, router_binary, start_daemon, status,
    },
    fake_nvml::{self, FakeError, FakeGpu, FakeGpuState, FakeNvml},
    fixtures,
    netns::{self, ChildGuard, Topology},
};

use super::{LOAD, POLL, SAMPLE_EVERY, SNAT, STALE_AFTER, STALE_DECAY, TELEMETRY_PORT, TOKEN, VIP};

/// Where a backend's telemetry comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Source {
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
pub(super) enum Fault {
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
pub(super) enum Counted {
    Errors,
    Invalid,
}

pub(super) struct Case {
    pub(super) name: &'static str,
    pub(super) source: Source,
    /// None: a control backend, whose weight must not move.
    pub(super) fault: Option<Fault>,
    pub(super) counted: Counted,
    /// `last_error` must contain this while the fault lasts.
    pub(super) message: &'static str,
}

pub(super) fn steady(name: &'static str, source: Source) -> Case {
    Case {
        name,
        source,
        fault: None,
        counted: Counted::Errors,
        message: "",
    }
}

pub(super) fn faulty(
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
pub(super) struct Host {
    /// The agent or endpoint process; None for the daemon's own NVML, and
    /// while an agent is down.
    pub(super) process: Option<ChildGuard>,
    /// This host's fake NVML state, for `Source::Agent`.
    pub(super) nvml_state: PathBuf,
    /// `metrics_server.py`'s mode file.
    pub(super) mode_file: PathBuf,
}

/// A running daemon over one backend namespace per case. Fields drop in
/// order: the daemon and processes first, then the scratch files, then the
/// namespaces.
pub(super) struct Rig {
    pub(super) daemon: Option<router_testkit::daemon_proc::Daemon>,
    pub(super) hosts: Vec<Host>,
    pub(super) http_servers: Vec<ChildGuard>,
    pub(super) local_nvml: Option<(FakeNvml, FakeGpuState)>,
    pub(super) socket: PathBuf,
    pub(super) dir: ScratchDir,
    pub(super) topo: Topology,
    pub(super) cases: Vec<Case>,
}

impl Rig {
    /// Builds the namespaces, starts every telemetry source and the daemon.
    /// With `serve_http`, each backend also runs the fixture HTTP server on
    /// its service port and is health-checked, so traffic can flow.
    pub(super) fn start(tag: &str, cases: Vec<Case>, serve_http: bool) -> Rig {
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
            // Health is not under test here: a timeout far past anything a
            // local TCP connect takes, even on a busy machine, and three
            // of them in a row to fail, so no healthy backend fails its
            // probes (the invariants forbid it). The timeout may not
            // exceed the interval.
            if health {
                s.push_str(
                    "health = { tcp = true, interval = \"1s\", timeout = \"1s\", fall = 3, rise = 2 }\n",
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

    pub(super) fn inject(&mut self, i: usize) {
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

    pub(super) fn heal(&mut self, i: usize) {
        match self.cases[i].fault {
            None => {}
            Some(Fault::Nvml(_) | Fault::NvmlHang) => self.set_gpu(i, healthy_gpu),
            Some(Fault::AgentDown) => self.start_agent(i),
            Some(Fault::Endpoint(_)) => std::fs::write(&self.hosts[i].mode_file, "ok").unwrap(),
        }
    }

    /// Threads of the daemon and of every running agent, by name.
    pub(super) fn thread_counts(&self) -> BTreeMap<String, u64> {
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

    pub(super) fn faulted(&self) -> impl Iterator<Item = &Case> {
        self.cases.iter().filter(|c| c.fault.is_some())
    }

    /// The daemon's status; panics if the daemon has exited or stops
    /// answering.
    pub(super) fn status(&mut self) -> StatusReply {
        let daemon = self.daemon.as_mut().expect("daemon running");
        if let Some(exit) = daemon.try_wait().unwrap() {
            panic!("the daemon exited during the faults: {exit}");
        }
        status(&self.socket).unwrap_or_else(|e| panic!("the daemon stopped answering: {e:#}"))
    }

    /// Waits until every backend follows its headroom and no weight has
    /// changed for four policy ticks (the daemon's `last_change_tick`, not
    /// this sampler's pace); returns the weights.
    pub(super) fn settle(&mut self) -> BTreeMap<String, u32> {
        let start = Instant::now();
        let from = self.status().policy_ticks;
        // Slow start (400 ms) and the damped climb to ~76: about 15
        // ticks; 100 (20 s) are room.
        let bound = 100;
        loop {
            let st = self.status();
            let following = st.policy.iter().all(|p| p.reason == "headroom");
            let last_change = st
                .policy
                .iter()
                .filter_map(|p| p.last_change_tick)
                .max()
                .unwrap_or(0);
            if following && st.policy_ticks >= last_change + 4 {
                return policy_weights(&st);
            }
            let what = || {
                st.policy
                    .iter()
                    .map(|p| (&p.backend, p.weight, &p.reason, &p.stats.last_error))
                    .collect::<Vec<_>>()
            };
            assert!(
                st.policy_ticks < from + bound,
                "weights never settled in {bound} ticks: {:?}",
                what()
            );
            assert!(
                start.elapsed() < hang_guard(bound),
                "the daemon ran {} ticks in {:?}: hung? {:?}",
                st.policy_ticks - from,
                start.elapsed(),
                what()
            );
            thread::sleep(SAMPLE_EVERY);
        }
    }

    /// Checks what must hold in every sample, faults or not: the daemon's
    /// datapath carries the policy's weights, no healthy backend is at 0,
    /// and the control backends keep their settled weights.
    pub(super) fn check_invariants(
        &self,
        st: &StatusReply,
        settled: &BTreeMap<String, u32>,
        when: &str,
    ) {
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
pub(super) fn threads(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no thread count for pid {pid}"))
}

/// Policy ticks in `d` at the test's poll interval.
pub(super) fn ticks_in(d: Duration) -> u64 {
    (d.as_millis() / POLL.as_millis()) as u64
}

/// The wall-clock bound of a wait for `ticks` policy ticks: ten times what
/// they take at the poll interval, and at least a minute. It only ends a
/// test whose daemon stopped ticking; every assertion counts ticks.
pub(super) fn hang_guard(ticks: u64) -> Duration {
    POLL.saturating_mul(u32::try_from(ticks).unwrap_or(u32::MAX).saturating_mul(10))
        .max(Duration::from_secs(60))
}

pub(super) fn policy_of<'a>(st: &'a StatusReply, backend: &str) -> &'a BackendPolicyStatus {
    st.policy
        .iter()
        .find(|p| p.backend == backend)
        .unwrap_or_else(|| panic!("{backend} missing from status"))
}
