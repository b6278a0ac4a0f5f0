//! The closed loop, end to end: four mock GPU replicas behind the XDP
//! router, the daemon in automatic mode polling their vLLM metrics (three of
//! them) and a `router agent` reading the fake NVML library (the fourth);
//! and least-loaded placement against replicas of unequal speed.
//! Assertions use the daemon's own status (weights, reasons) and the
//! datapath's counters, under continuous streaming traffic from a client.
//! Time is counted, not measured: waits and reactions are judged in the
//! daemon's policy ticks (`policy_ticks`, `telemetry_tick` and
//! `last_change_tick` in status) and shares over a number of connections,
//! so a loaded machine slows the test down without failing it; the wall
//! clock only bounds a daemon that stopped ticking.

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

use router::api::{BackendPolicyStatus, StatusReply};
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

fn policy_of<'a>(st: &'a StatusReply, backend: &str) -> &'a BackendPolicyStatus {
    st.policy.iter().find(|p| p.backend == backend).unwrap()
}

/// The wall-clock bound of a wait for `ticks` policy ticks: ten times what
/// they take at `POLL_MS`, and at least a minute. Not an assertion about
/// speed: it only ends a test whose daemon stopped ticking (hung), where
/// counting ticks alone would wait forever.
fn hang_guard(ticks: u64) -> Duration {
    Duration::from_millis(ticks * POLL_MS * 10).max(Duration::from_secs(60))
}

/// Polls status until `pred` holds, and returns that status; fails once
/// the daemon has run `ticks` policy ticks since the first look without
/// it holding. Judged by the daemon's tick count, so a busy machine that
/// slows the daemon or this poller down changes nothing.
fn within_ticks(
    socket: &Path,
    ticks: u64,
    what: &str,
    mut pred: impl FnMut(&StatusReply) -> bool,
) -> StatusReply {
    let first = status(socket).unwrap();
    let (from, started) = (first.policy_ticks, Instant::now());
    let mut st = first;
    loop {
        if pred(&st) {
            return st;
        }
        assert!(
            st.policy_ticks < from + ticks,
            "{what}: not within {ticks} policy ticks (ticks {from} to {}): weights {:?}, reasons {:?}",
            st.policy_ticks,
            policy_weights(&st),
            st.policy.iter().map(|p| &p.reason).collect::<Vec<_>>()
        );
        assert!(
            started.elapsed() < hang_guard(ticks),
            "{what}: the daemon ran only {} policy ticks in {:?}: hung?",
            st.policy_ticks - from,
            started.elapsed()
        );
        thread::sleep(Duration::from_millis(50));
        st = status(socket).unwrap();
    }
}

/// New connections per backend while the datapath took `n` more of them
/// (the client has no other clock): a window of `n` connections, whatever
/// time they take.
fn conns_window(socket: &Path, n: u64) -> BTreeMap<String, u64> {
    let c0 = new_conns(&status(socket).unwrap());
    let started = Instant::now();
    loop {
        let c1 = new_conns(&status(socket).unwrap());
        let window: BTreeMap<String, u64> =
            c1.iter().map(|(k, v)| (k.clone(), v - c0[k])).collect();
        if window.values().sum::<u64>() >= n {
            return window;
        }
        // 10 clients make ~50 connections a second; a minute without `n`
        // of them means traffic stopped, which the assertions on the
        // window would not say.
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "traffic stopped: {window:?} in {:?}",
            started.elapsed()
        );
        thread::sleep(Duration::from_millis(100));
    }
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

    // 1. Replicas ramp up gradually from readiness (slow start over 6 s,
    //    12 polls), not in one jump: follow every backend's weight over the
    //    first 6 polls, as (policy tick, weight). A busy machine may slow
    //    this sampler past a tick or two, so each step is bounded by the
    //    ticks between its samples: the step limit (25% of the full weight
    //    of 100) per tick.
    let mut ramp: BTreeMap<String, Vec<(u64, u32)>> = BTreeMap::new();
    let first = status(&socket).unwrap();
    let changes_at = |st: &StatusReply| -> BTreeMap<String, u64> {
        st.policy
            .iter()
            .map(|p| (p.backend.clone(), p.weight_changes))
            .collect()
    };
    let changes_before = changes_at(&first);
    let ramp_end = first.policy_ticks + 6;
    let ramp_started = Instant::now();
    let last = loop {
        let st = status(&socket).unwrap();
        for p in &st.policy {
            let trace = ramp.entry(p.backend.clone()).or_default();
            if trace.last().is_none_or(|(t, _)| *t < st.policy_ticks) {
                trace.push((st.policy_ticks, p.weight));
            }
        }
        if st.policy_ticks >= ramp_end {
            break st;
        }
        assert!(
            ramp_started.elapsed() < hang_guard(6),
            "the daemon stopped ticking: {ramp:?}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    let changes_after = changes_at(&last);
    for (name, trace) in &ramp {
        // Tick 1 is the daemon's first decision, made before any probe:
        // health unknown, weight 0 (see `HealthState`).
        let mut prev = (1u64, 0u32);
        for &(t, w) in trace {
            let ticks = u32::try_from(t - prev.0).unwrap();
            // From 0 a backend enters at the floor (2), or at the unknown
            // share (25) if its first reading is not in yet.
            let from = if prev.1 == 0 { 25 } else { prev.1 };
            assert!(
                w <= from + 25 * ticks.saturating_sub(u32::from(prev.1 == 0)),
                "{name} ramps in bounded steps (tick, weight): {trace:?}"
            );
            prev = (t, w);
        }
        // Through several weights: the daemon counts each change, whether
        // or not this sampler saw it.
        let changes = changes_after[name] - changes_before[name];
        assert!(
            changes >= 2,
            "{name} must ramp through several weights: {changes} changes, {trace:?}"
        );
    }
    // Past the slow start: another 12 polls.
    let st = within_ticks(&socket, 20, "warm-up", |st| {
        st.policy_ticks >= ramp_end + 12
    });
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
    // Shares over a number of connections, not over a time: ~150 healthy
    // ones are about 3 s of this traffic.
    let healthy_window = conns_window(&socket, 150);
    let share_before = share_of(&healthy_window, "gpu-0");
    let gpu0: SocketAddr = SocketAddr::new(netns::backend_addr(0).into(), 8000);
    let before = policy_weights(&status(&socket).unwrap())["gpu-0"];
    // Five times slower and one request at a time: its queue builds at once.
    netns::in_netns(topo.client_ns(), || {
        replica::control(gpu0, r#"{"speed": 0.2, "max_batch": 1}"#).unwrap()
    })
    .unwrap();
    // The reaction, in policy ticks: from the tick that took in the first
    // reading showing saturation (a queue of 8 = queue_norm, i.e. load 1.0)
    // to the tick that cut the weight. The policy confirms saturation on
    // the second such reading and cuts at once ("within two polls"); a
    // poll that fails meanwhile brings no reading and delays it a tick, so
    // failed polls are allowed for. `saturated`: (its tick, gpu-0's failed
    // polls up to and including that tick).
    let failed = |p: &BackendPolicyStatus| p.stats.errors + p.stats.invalid;
    let mut saturated: Option<(u64, u64)> = None;
    // The newest reading seen that showed no saturation, by its tick.
    let mut unsaturated: Option<u64> = None;
    let cut = within_ticks(&socket, 30, "gpu-0 cut", |st| {
        let p0 = policy_of(st, "gpu-0");
        let queue = p0
            .telemetry
            .as_ref()
            .and_then(|r| r.requests_waiting)
            .unwrap_or(0.0);
        if queue < 8.0 {
            unsaturated = unsaturated.max(p0.telemetry_tick);
        }
        if queue >= 8.0
            && saturated.is_none()
            && let Some(t) = p0.telemetry_tick
        {
            // Every tick since `t` brought gpu-0 no new reading: each was
            // a failed poll, counted already.
            let since = st.policy_ticks - t;
            saturated = Some((t, failed(p0).saturating_sub(since)));
        }
        p0.weight * 2 <= before
    });
    let p0 = policy_of(&cut, "gpu-0");
    let cut_tick = p0.last_change_tick.expect("the cut is a change");
    // A sampler slower than a poll can miss the first saturated reading
    // and see a later one: that shortens the reaction it measures, never
    // lengthens it. Seeing none before the cut leaves nothing to measure.
    if let Some((sat_tick, failed_then)) = saturated {
        let failed_polls = failed(p0) - failed_then;
        println!(
            "gpu-0: weight {before} cut to {} at tick {cut_tick}; its telemetry first showed \
             saturation at tick {sat_tick}; {failed_polls} failed polls since",
            p0.weight
        );
        assert!(
            cut_tick <= sat_tick + 2 + failed_polls,
            "the cut at tick {cut_tick} came more than 2 polls after saturation showed \
             (tick {sat_tick}, {failed_polls} failed polls since)"
        );
    } else if unsaturated.is_some_and(|u| u >= cut_tick) {
        // A reading at or after the cut showed no saturation: the load
        // signal most likely cut it before the queue got there.
        println!("gpu-0: cut at tick {cut_tick}, before its telemetry showed saturation");
    } else {
        println!("gpu-0: cut at tick {cut_tick}; this sampler saw no saturated reading before");
    }
    // Its share of new connections falls: it gets what its speed can serve.
    let degraded_window = conns_window(&socket, 150);
    let share_after = share_of(&degraded_window, "gpu-0");
    println!("new connections, healthy: {healthy_window:?}; gpu-0 degraded: {degraded_window:?}");
    // At its floor gpu-0's weight is 2 of ~300: its share should all but
    // vanish. 0.6 leaves room for the Maglev draw of 150 connections and
    // for the weight rising again within the window as its queue drains.
    assert!(
        share_after < 0.6 * share_before,
        "gpu-0's share fell from {share_before:.2} only to {share_after:.2}"
    );

    // 3. Recover it: traffic returns and the weights settle. Followed over
    //    20 polls as (policy tick, weight); the sampler's own pace does not
    //    matter.
    netns::in_netns(topo.client_ns(), || {
        replica::control(gpu0, r#"{"speed": 1.0, "max_batch": 4}"#).unwrap()
    })
    .unwrap();
    let changes_before = policy_of(&status(&socket).unwrap(), "gpu-0").weight_changes;
    let mut trace: Vec<(u64, u32)> = Vec::new();
    let from = status(&socket).unwrap().policy_ticks;
    let last = within_ticks(&socket, 21, "gpu-0's recovery", |st| {
        if trace.last().is_none_or(|(t, _)| *t < st.policy_ticks) {
            trace.push((st.policy_ticks, policy_of(st, "gpu-0").weight));
        }
        st.policy_ticks >= from + 20
    });
    let changes = policy_of(&last, "gpu-0").weight_changes - changes_before;
    let weights: Vec<u32> = trace.iter().map(|(_, w)| *w).collect();
    println!("gpu-0 recovering: {trace:?} ({changes} changes in 20 polls)");
    // The last 8 polls (4 s).
    let tail: Vec<u32> = trace
        .iter()
        .filter(|(t, _)| *t > from + 12)
        .map(|(_, w)| *w)
        .collect();
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
    // No oscillation: over the last 8 polls the weight stays in a band,
    // never swinging back to the floor or up to full.
    assert!(high - low <= 35, "weights settle into a band: {tail:?}");
    // Flapping is the weight turning back and forth. Each step of the
    // slow-start ramp is a change too, so changes alone would count the
    // ramp (8 of 20 polls) as unrest: count the turns instead. A sampler
    // that misses ticks can only miss turns, not add them.
    let mut steps = weights.windows(2).filter_map(|w| match w[1].cmp(&w[0]) {
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
    // Probed every poll, out after `fall` = 2 failures: 10 polls leave room
    // for a probe round that started before the fault.
    let out = within_ticks(&socket, 10, "gpu-1 taken out", |st| {
        policy_weights(st)["gpu-1"] == 0
    });
    assert_eq!(reason(&out, "gpu-1"), "unhealthy");

    // 5. gpu-3's telemetry dies (its agent stops): stale, never read as idle.
    let held = policy_weights(&status(&socket).unwrap())["gpu-3"];
    agent.stop(Duration::from_secs(5)).unwrap();
    // Stale 2 s after its last reading: within 5 polls, since the daemon's
    // ticks are a poll interval apart or more; decaying from the next.
    // 20 polls leave room.
    within_ticks(&socket, 20, "gpu-3 decaying", |st| {
        let p = policy_of(st, "gpu-3");
        // Stale weights decay towards a quarter of full (25): one held
        // below that already is the conservative share, so only staleness
        // is asserted for it.
        p.stale && (p.weight < held || held <= 25)
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

    // The slow replica's capacity settles once enough flows have completed
    // (a speed window of 4 s is 8 polls); 60 polls leave room for a
    // machine that completes fewer flows per poll.
    let st = within_ticks(&socket, 60, "capacities settling", |st| {
        let w = policy_weights(st);
        w["gpu-0"] == 100 && w["gpu-1"] == 100 && (20..=60).contains(&w["gpu-2"])
    });
    assert!(
        reason(&st, "gpu-2").starts_with("capacity: speed 0."),
        "{}",
        reason(&st, "gpu-2")
    );

    // In flight per replica, sampled from the datapath's own counts: a
    // mean over 120 samples, however long this sampler takes for them.
    let mut sum = [0u64; 3];
    let samples = 120u64;
    for _ in 0..samples {
        let st = status(&socket).unwrap();
        for b in &st.datapath.services[0].backends {
            let i: usize = b.name.trim_start_matches("gpu-").parse().unwrap();
            sum[i] += b.in_flight;
        }
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
    // A band around the 0.4 speed: the router is told no speeds, it
    // measures them over a few seconds of a dozen flows.
    assert!(
        (0.2..=0.7).contains(&ratio),
        "the 0.4-speed replica holds {ratio:.2} of a fast one's flows: {mean:?}"
    );
    assert!(fast > 2.0, "the fast replicas carry the load: {mean:?}");
    assert_eq!(errors.load(Ordering::Relaxed), 0, "no request failed");
    daemon.stop(Duration::from_secs(10)).unwrap();
    drop(replicas);
}
