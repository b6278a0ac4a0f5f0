//! The closed loop, end to end: four mock GPU replicas behind the XDP
//! router, the daemon in automatic mode polling their vLLM metrics (three of
//! them) and a `router agent` reading the fake NVML library (the fourth);
//! and least-loaded placement against replicas of unequal speed.
//! Assertions use the daemon's own status (weights, reasons) and the
//! datapath's counters, under continuous streaming traffic from a client.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use router::api::StatusReply;
use router_testkit::{
    daemon_proc::{ScratchDir, policy_weights, router_binary, start_daemon, status},
    fake_nvml::{self, FakeGpuState},
    netns::{self, Topology},
    replica,
};

const VIP: &str = "198.18.100.1:8000";
const SNAT: std::net::Ipv4Addr = netns::SNAT_ADDR;
const POLL_MS: u64 = 500;

fn new_conns(st: &StatusReply) -> BTreeMap<String, u64> {
    st.datapath.services[0]
        .backends
        .iter()
        .map(|b| (b.name.clone(), b.counters.new_conns))
        .collect()
}

fn reason<'a>(st: &'a StatusReply, backend: &str) -> &'a str {
    &st.policy
        .iter()
        .find(|p| p.backend == backend)
        .unwrap()
        .reason
}

/// Polls status until `pred` holds or `within` passes; returns when it held.
fn wait_until(
    socket: &Path,
    within: Duration,
    pred: impl Fn(&StatusReply) -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if pred(&status(socket).unwrap()) {
            return Some(start.elapsed());
        }
        thread::sleep(Duration::from_millis(50));
    }
    None
}

fn config(socket: &Path, lb_if: &str, token: &Path) -> String {
    let mut s = format!(
        "[daemon]\ninterface = \"{lb_if}\"\ncontrol_socket = \"{}\"\n\n\
         [policy]\npoll_interval = \"{POLL_MS}ms\"\nslow_start = \"6s\"\nstale_after = \"2s\"\nstale_decay = \"3s\"\n\n\
         [[service]]\nname = \"llama\"\nvip = \"{VIP}\"\nsnat = \"{SNAT}\"\n\
         # Weights as shares of a Maglev draw: the policy this test is about.\n\
         selection = \"maglev\"\n",
        socket.display()
    );
    for i in 0..4 {
        let addr = netns::backend_addr(i);
        let telemetry = if i == 3 {
            format!(
                "{{ source = \"agent\", url = \"http://{addr}:9400\", device = 0, token_file = \"{}\" }}",
                token.display()
            )
        } else {
            format!(
                "{{ source = \"prometheus\", url = \"http://{addr}:8000/metrics\", format = \"vllm\" }}"
            )
        };
        s.push_str(&format!(
            "\n[[service.backend]]\nname = \"gpu-{i}\"\naddress = \"{addr}:8000\"\ncapacity = 1.0\n\
             telemetry = {telemetry}\nhealth = {{ tcp = true, http_path = \"/health\", interval = \"500ms\", timeout = \"400ms\", fall = 2, rise = 2 }}\n"
        ));
    }
    s
}

#[test]
fn weights_follow_replica_load() {
    let topo = Topology::one_arm(4).expect("topology");
    topo.add_snat_addr().unwrap();
    let dir = ScratchDir::new("closed-loop").unwrap();

    let replica_args = ["--max-batch", "4", "--step-ms", "15", "--tokens", "12"];
    let mut replicas = Vec::new();
    for i in 0..4 {
        let state = dir.0.join(format!("gpu-{i}.json"));
        FakeGpuState::with_gpus(1).write(&state).unwrap();
        let state_arg = state.display().to_string();
        let mut args: Vec<&str> = replica_args.to_vec();
        args.extend(["--nvml-state", &state_arg]);
        if i == 3 {
            // Cold start: twice as slow for its first 8 seconds.
            args.extend(["--cold-seconds", "8", "--cold-factor", "2"]);
        }
        replicas.push(
            replica::spawn_mock_replica(
                topo.backend_ns(i),
                &format!("gpu-{i}"),
                netns::backend_addr(i),
                8000,
                &args,
            )
            .unwrap(),
        );
    }
    // gpu-3's telemetry comes from its host's NVML through `router agent`.
    let token = dir.0.join("agent.token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let mut agent_cmd = Command::new("ip");
    agent_cmd
        .args(["netns", "exec", topo.backend_ns(3)])
        .arg(router_binary().unwrap())
        .args([
            "agent",
            "--listen",
            &format!("{}:9400", netns::backend_addr(3)),
            "--token-file",
        ])
        .arg(&token)
        .arg("--nvml-library")
        .arg(fake_nvml::library_path().unwrap())
        .env("FAKE_NVML_STATE", dir.0.join("gpu-3.json"));
    let agent = netns::spawn_command(agent_cmd).unwrap();
    netns::wait_for_tcp(
        topo.lb_ns(),
        SocketAddr::new(netns::backend_addr(3).into(), 9400),
        Duration::from_secs(10),
    )
    .unwrap();
    for i in 0..4 {
        netns::wait_for_tcp(
            topo.lb_ns(),
            SocketAddr::new(netns::backend_addr(i).into(), 8000),
            Duration::from_secs(5),
        )
        .unwrap();
    }

    let socket = dir.0.join("router.sock");
    let config_path = dir.0.join("router.toml");
    std::fs::write(&config_path, config(&socket, topo.lb_if(), &token)).unwrap();
    let daemon = start_daemon(topo.lb_ns(), &config_path, &socket).expect("daemon");

    // Continuous traffic: 10 clients, each one streaming completion per connection.
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let vip: SocketAddr = VIP.parse().unwrap();
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let (stop, errors, done, ns) = (
                stop.clone(),
                errors.clone(),
                done.clone(),
                topo.client_ns().to_string(),
            );
            thread::spawn(move || {
                netns::in_netns(&ns, || {
                    while !stop.load(Ordering::Relaxed) {
                        match replica::stream_completion(vip, 12, Duration::from_secs(20)) {
                            Ok(s) if s.done => {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                thread::sleep(Duration::from_millis(50));
                            }
                        }
                    }
                })
                .unwrap();
            })
        })
        .collect();

    // 1. Replicas ramp up gradually from readiness (slow start over 6 s),
    //    not in one jump: sample the first 3 s of every backend's weight.
    let mut ramp: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let ramp_start = Instant::now();
    while ramp_start.elapsed() < Duration::from_secs(3) {
        for (k, w) in policy_weights(&status(&socket).unwrap()) {
            ramp.entry(k).or_default().push(w);
        }
        thread::sleep(Duration::from_millis(100));
    }
    for (name, trace) in &ramp {
        let mut steps = trace.clone();
        steps.dedup();
        assert!(
            steps.len() >= 3,
            "{name} must ramp through several weights: {trace:?}"
        );
        // Starts near the floor and never jumps: each move is at most the
        // step limit (25% of the full weight of 100).
        assert!(trace[0] <= 10, "{name} starts near the floor: {trace:?}");
        assert!(
            steps.windows(2).all(|w| w[1] <= w[0] + 25),
            "{name} ramps in bounded steps: {trace:?}"
        );
    }
    thread::sleep(Duration::from_secs(6));
    let st = status(&socket).unwrap();
    let healthy_weights = policy_weights(&st);
    println!(
        "after warm-up: {healthy_weights:?}, reasons {:?}",
        st.policy.iter().map(|p| &p.reason).collect::<Vec<_>>()
    );
    assert!(healthy_weights.values().all(|w| *w > 0));

    // 2. Degrade gpu-0: a throttled GPU, five times slower.
    let share_of = |window: &BTreeMap<String, u64>, name: &str| {
        window[name] as f64 / window.values().sum::<u64>().max(1) as f64
    };
    let window = |secs: u64| {
        let c0 = new_conns(&status(&socket).unwrap());
        thread::sleep(Duration::from_secs(secs));
        let c1 = new_conns(&status(&socket).unwrap());
        c1.iter()
            .map(|(k, v)| (k.clone(), v - c0[k]))
            .collect::<BTreeMap<_, _>>()
    };
    let healthy_window = window(3);
    let share_before = share_of(&healthy_window, "gpu-0");
    let gpu0: SocketAddr = SocketAddr::new(netns::backend_addr(0).into(), 8000);
    let before = policy_weights(&status(&socket).unwrap())["gpu-0"];
    // Five times slower and one request at a time: its queue builds at once.
    netns::in_netns(topo.client_ns(), || {
        replica::control(gpu0, r#"{"speed": 0.2, "max_batch": 1}"#).unwrap()
    })
    .unwrap();
    // Time from the first poll whose reading shows saturation (a queue of
    // 8 = queue_norm, i.e. load 1.0) to the weight being cut.
    let start = Instant::now();
    let mut seen_saturated: Option<Instant> = None;
    let cut = loop {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "gpu-0 never cut from {before}"
        );
        let st = status(&socket).unwrap();
        let p0 = st.policy.iter().find(|p| p.backend == "gpu-0").unwrap();
        let queue = p0
            .telemetry
            .as_ref()
            .and_then(|r| r.requests_waiting)
            .unwrap_or(0.0);
        if queue >= 8.0 && seen_saturated.is_none() {
            // The reading is up to telemetry_age_ms old already.
            seen_saturated =
                Some(Instant::now() - Duration::from_millis(p0.telemetry_age_ms.unwrap_or(0)));
        }
        if p0.weight * 2 <= before {
            break Instant::now();
        }
        thread::sleep(Duration::from_millis(20));
    };
    let seen = seen_saturated.unwrap_or(cut);
    let reaction = cut.saturating_duration_since(seen);
    println!(
        "gpu-0: weight {before} cut {:?} after the slowdown, {reaction:?} after its telemetry showed saturation",
        cut - start
    );
    assert!(
        reaction <= Duration::from_millis(2 * POLL_MS + 100),
        "reaction {reaction:?} exceeds 2 poll intervals"
    );
    // Its share of new connections falls: it gets what its speed can serve.
    let degraded_window = window(4);
    let share_after = share_of(&degraded_window, "gpu-0");
    println!("new connections, healthy: {healthy_window:?}; gpu-0 degraded: {degraded_window:?}");
    assert!(
        degraded_window.values().sum::<u64>() > 20,
        "traffic kept flowing"
    );
    assert!(
        share_after < 0.6 * share_before,
        "gpu-0's share fell from {share_before:.2} only to {share_after:.2}"
    );

    // 3. Recover it: traffic returns and the weights settle.
    netns::in_netns(topo.client_ns(), || {
        replica::control(gpu0, r#"{"speed": 1.0, "max_batch": 4}"#).unwrap()
    })
    .unwrap();
    let changes_of = |st: &StatusReply| {
        st.policy
            .iter()
            .find(|p| p.backend == "gpu-0")
            .unwrap()
            .weight_changes
    };
    let changes_before = changes_of(&status(&socket).unwrap());
    let mut trace = Vec::new();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        trace.push(policy_weights(&status(&socket).unwrap())["gpu-0"]);
        thread::sleep(Duration::from_millis(250));
    }
    let changes = changes_of(&status(&socket).unwrap()) - changes_before;
    println!("gpu-0 recovering: {trace:?} ({changes} changes in 20 polls)");
    let tail = &trace[trace.len() - 16..];
    let low = *tail.iter().min().unwrap();
    let high = *tail.iter().max().unwrap();
    // Back: far above the floor (2) the whole time, and on average at least
    // half its pre-degradation weight (the load signal is noisy, so single
    // samples are not compared).
    let mean = tail.iter().sum::<u32>() as f64 / tail.len() as f64;
    assert!(low >= 20, "gpu-0 came back and stays back: {trace:?}");
    assert!(
        mean * 2.0 >= f64::from(before),
        "gpu-0's weight returned (before {before}): {trace:?}"
    );
    // No oscillation: over the last 4 s the weight stays in a band, never
    // swinging back to the floor or up to full.
    assert!(high - low <= 35, "weights settle into a band: {tail:?}");
    // Flapping is the weight turning back and forth. Each step of the
    // slow-start ramp is a change too, so changes alone would count the
    // ramp (8 of 20 polls) as unrest: count the turns instead.
    let mut steps = trace.windows(2).filter_map(|w| match w[1].cmp(&w[0]) {
        std::cmp::Ordering::Equal => None,
        o => Some(o),
    });
    let mut turns = 0;
    if let Some(mut last) = steps.next() {
        for o in steps {
            if o != last {
                turns += 1;
                last = o;
            }
        }
    }
    assert!(
        turns <= 4,
        "{turns} turns ({changes} weight changes) in 20 polls: {trace:?}"
    );

    // 4. Health checks fail on gpu-1: taken out (weight 0).
    let gpu1: SocketAddr = SocketAddr::new(netns::backend_addr(1).into(), 8000);
    netns::in_netns(topo.client_ns(), || {
        replica::control(gpu1, r#"{"fail_health": true}"#).unwrap()
    })
    .unwrap();
    wait_until(&socket, Duration::from_secs(5), |st| {
        policy_weights(st)["gpu-1"] == 0
    })
    .unwrap_or_else(|| {
        panic!(
            "gpu-1 not taken out: {:?}",
            policy_weights(&status(&socket).unwrap())
        )
    });
    assert_eq!(reason(&status(&socket).unwrap(), "gpu-1"), "unhealthy");

    // 5. gpu-3's telemetry dies (its agent stops): stale, never read as idle.
    let held = policy_weights(&status(&socket).unwrap())["gpu-3"];
    agent.stop(Duration::from_secs(5)).unwrap();
    wait_until(&socket, Duration::from_secs(10), |st| {
        let p = st.policy.iter().find(|p| p.backend == "gpu-3").unwrap();
        // Stale weights decay towards a quarter of full (25): one held
        // below that already is the conservative share, so only staleness
        // is asserted for it.
        p.stale && (p.weight < held || held <= 25)
    })
    .unwrap_or_else(|| {
        panic!(
            "gpu-3 did not decay from {held}: {:?}",
            status(&socket).unwrap().policy
        )
    });
    let st = status(&socket).unwrap();
    let p3 = st.policy.iter().find(|p| p.backend == "gpu-3").unwrap();
    assert!(
        p3.stats.errors > 0 && p3.stats.last_error.is_some(),
        "{p3:?}"
    );
    assert!(
        policy_weights(&st).values().any(|w| *w > 0),
        "never all zero"
    );

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let (ok, failed) = (done.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
    println!("completions: {ok} ok, {failed} failed");
    assert!(ok > 100, "traffic flowed: {ok}");
    // Only gpu-1's health failure can fail requests (in flight when it
    // starts answering 503 to /health, requests themselves still succeed).
    assert!(failed * 50 <= ok, "{failed} failed of {ok}");
    daemon.stop(Duration::from_secs(10)).unwrap();
    drop(replicas);
}

/// Least-loaded placement in namespaces: three replicas, the last 2.5 times
/// slower. The datapath counts each replica's flows and the policy measures
/// how fast they complete, so the slow one ends up holding fewer flows in
/// proportion to its speed, with nothing told to the router about speeds.
#[test]
fn least_loaded_holds_fewer_flows_on_a_slower_replica() {
    const SPEEDS: [f64; 3] = [1.0, 1.0, 0.4];
    let topo = Topology::one_arm(3).expect("topology");
    topo.add_snat_addr().unwrap();
    let dir = ScratchDir::new("least-loaded").unwrap();
    let mut replicas = Vec::new();
    for (i, speed) in SPEEDS.iter().enumerate() {
        let speed = speed.to_string();
        let args = [
            "--max-batch",
            "8",
            "--step-ms",
            "15",
            "--tokens",
            "12",
            "--speed",
            &speed,
        ];
        replicas.push(
            replica::spawn_mock_replica(
                topo.backend_ns(i),
                &format!("gpu-{i}"),
                netns::backend_addr(i),
                8000,
                &args,
            )
            .unwrap(),
        );
        netns::wait_for_tcp(
            topo.lb_ns(),
            SocketAddr::new(netns::backend_addr(i).into(), 8000),
            Duration::from_secs(5),
        )
        .unwrap();
    }
    let socket = dir.0.join("router.sock");
    let mut cfg = format!(
        "[daemon]\ninterface = \"{}\"\ncontrol_socket = \"{}\"\n\n\
         [policy]\npoll_interval = \"{POLL_MS}ms\"\nslow_start = \"1s\"\nspeed_window = \"4s\"\n\n\
         [[service]]\nname = \"llama\"\nvip = \"{VIP}\"\nsnat = \"{SNAT}\"\n",
        topo.lb_if(),
        socket.display()
    );
    for i in 0..SPEEDS.len() {
        let addr = netns::backend_addr(i);
        cfg.push_str(&format!(
            "\n[[service.backend]]\nname = \"gpu-{i}\"\naddress = \"{addr}:8000\"\n\
             telemetry = {{ source = \"prometheus\", url = \"http://{addr}:8000/metrics\", format = \"vllm\" }}\n"
        ));
    }
    let config_path = dir.0.join("router.toml");
    std::fs::write(&config_path, cfg).unwrap();
    let daemon = start_daemon(topo.lb_ns(), &config_path, &socket).expect("daemon");

    // Twelve clients, one streamed completion per connection, back to back:
    // fewer than the replicas' 24 batch slots, so room never binds and the
    // split is the capacities' alone.
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let vip: SocketAddr = VIP.parse().unwrap();
    let clients: Vec<_> = (0..12)
        .map(|_| {
            let (stop, errors, ns) = (stop.clone(), errors.clone(), topo.client_ns().to_string());
            thread::spawn(move || {
                netns::in_netns(&ns, || {
                    while !stop.load(Ordering::Relaxed) {
                        match replica::stream_completion(vip, 12, Duration::from_secs(20)) {
                            Ok(s) if s.done => {}
                            _ => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                thread::sleep(Duration::from_millis(50));
                            }
                        }
                    }
                })
                .unwrap();
            })
        })
        .collect();

    // The slow replica's capacity settles once enough flows have completed.
    let settled = wait_until(&socket, Duration::from_secs(30), |st| {
        let w = policy_weights(st);
        w["gpu-0"] == 100 && w["gpu-1"] == 100 && (20..=60).contains(&w["gpu-2"])
    });
    let st = status(&socket).unwrap();
    assert!(
        settled.is_some(),
        "capacities never settled: {:?}, reasons {:?}",
        policy_weights(&st),
        st.policy.iter().map(|p| &p.reason).collect::<Vec<_>>()
    );
    assert!(
        reason(&st, "gpu-2").starts_with("capacity: speed 0."),
        "{}",
        reason(&st, "gpu-2")
    );

    // In flight per replica, sampled from the datapath's own counts.
    let mut sum = [0u64; 3];
    let mut samples = 0u64;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        let st = status(&socket).unwrap();
        for b in &st.datapath.services[0].backends {
            let i: usize = b.name.trim_start_matches("gpu-").parse().unwrap();
            sum[i] += b.in_flight;
        }
        samples += 1;
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let mean: Vec<f64> = sum.iter().map(|s| *s as f64 / samples as f64).collect();
    let fast = (mean[0] + mean[1]) / 2.0;
    let ratio = mean[2] / fast;
    println!(
        "mean in flight {mean:?}, slow/fast {ratio:.2}, weights {:?}",
        policy_weights(&status(&socket).unwrap())
    );
    assert!(
        (0.2..=0.7).contains(&ratio),
        "the 0.4-speed replica holds {ratio:.2} of a fast one's flows: {mean:?}"
    );
    assert!(fast > 2.0, "the fast replicas carry the load: {mean:?}");
    assert_eq!(errors.load(Ordering::Relaxed), 0, "no request failed");
    daemon.stop(Duration::from_secs(10)).unwrap();
    drop(replicas);
}
