//! The mock inference replica behaves like an engine under continuous
//! batching: tokens stream as they are generated, `/metrics` parses as vLLM
//! and shows the batch and the queue, `/control` changes the step time, and
//! the fake NVML state file shows the busy percentage. Each test runs the
//! replica in its own loopback-only namespace. Needs root.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use router::telemetry::{
    Reading,
    prometheus::{self, PromFormat},
};
use router_testkit::{
    daemon_proc::ScratchDir,
    netns::{self, ChildGuard},
    replica::{self, LoopbackNs},
};

const PORT: u16 = 8000;
const ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), PORT);
const TIMEOUT: Duration = Duration::from_secs(20);

fn start(args: &[&str]) -> (LoopbackNs, ChildGuard) {
    let ns = LoopbackNs::new().expect("namespace");
    let guard = replica::spawn_mock_replica(ns.name(), "r0", Ipv4Addr::LOCALHOST, PORT, args)
        .expect("start mock replica");
    (ns, guard)
}

fn metrics(ns: &LoopbackNs) -> Reading {
    let labels = BTreeMap::from([("model_name".to_owned(), "mock-model".to_owned())]);
    let body = netns::in_netns(ns.name(), || netns::http_get(ADDR, "/metrics", TIMEOUT))
        .unwrap()
        .expect("GET /metrics");
    assert_eq!(body.status, 200);
    prometheus::parse(PromFormat::Vllm, &labels, &body.body).expect("vLLM metrics")
}

/// Seconds a non-streamed completion of `tokens` takes.
fn completion_seconds(ns: &LoopbackNs, tokens: u32) -> f64 {
    let body = format!(r#"{{"prompt":"x","max_tokens":{tokens}}}"#);
    let started = Instant::now();
    let r = netns::in_netns(ns.name(), || {
        replica::post_json(ADDR, "/v1/completions", &body, TIMEOUT)
    })
    .unwrap()
    .expect("completion");
    assert_eq!(r.status, 200, "{}", r.body);
    let json: serde_json::Value = serde_json::from_str(&r.body).expect("JSON completion");
    assert_eq!(json["usage"]["completion_tokens"], tokens);
    started.elapsed().as_secs_f64()
}

#[test]
fn tokens_stream_as_they_are_generated() {
    let (ns, _replica) = start(&["--step-ms", "40", "--batch-slowdown", "0"]);
    let sent = Instant::now();
    let s = netns::in_netns(ns.name(), || replica::stream_completion(ADDR, 8, TIMEOUT))
        .unwrap()
        .expect("streamed completion");
    assert_eq!(s.replica, "r0");
    assert!(s.done, "no [DONE]");
    let texts: Vec<&str> = s.tokens.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        texts,
        [
            " tok1", " tok2", " tok3", " tok4", " tok5", " tok6", " tok7", " tok8"
        ]
    );
    // 8 steps of 40 ms: the first token must arrive long before the last,
    // not all at once at the end. Only a lower bound, and an inherent one:
    // the replica sleeps a step between tokens, so 7 steps (280 ms) pass
    // between the first and the last however fast the machine; a replica
    // that buffered the stream would deliver them together. How soon the
    // first arrives measures the machine, so it is printed, not asserted.
    let first = s.tokens[0].0 - sent;
    let spread = s.tokens[7].0 - s.tokens[0].0;
    println!("first token after {first:?}, last {spread:?} later");
    assert!(
        spread >= Duration::from_millis(200),
        "first after {first:?}, spread {spread:?}"
    );

    let r = netns::in_netns(ns.name(), || {
        replica::post_json(ADDR, "/v1/completions", r#"{"max_tokens":3}"#, TIMEOUT)
    })
    .unwrap()
    .expect("plain completion");
    let json: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(json["choices"][0]["text"], " tok1 tok2 tok3");
}

#[test]
fn metrics_show_the_batch_and_the_queue() {
    let (ns, _replica) = start(&["--max-batch", "2", "--step-ms", "20"]);
    let idle = metrics(&ns);
    assert_eq!(idle.requests_running, Some(0.0));
    assert_eq!(idle.requests_waiting, Some(0.0));

    // Five requests of ~1.5 s each on a batch of two.
    let name = ns.name().to_owned();
    let clients: Vec<_> = (0..5)
        .map(|_| {
            let name = name.clone();
            thread::spawn(move || {
                netns::in_netns(&name, || replica::stream_completion(ADDR, 50, TIMEOUT))
                    .unwrap()
                    .expect("streamed completion")
            })
        })
        .collect();
    // A hang guard: five clients fill the batch at once.
    let deadline = Instant::now() + Duration::from_secs(15);
    let busy = loop {
        let m = metrics(&ns);
        if m.requests_running == Some(2.0) && m.requests_waiting >= Some(1.0) {
            break m;
        }
        assert!(Instant::now() < deadline, "never saw a full batch: {m:?}");
        thread::sleep(Duration::from_millis(20));
    };
    // KV usage counts the tokens the running requests hold, so a full batch
    // of young requests is partly used, and it grows as they generate.
    assert!(
        busy.kv_cache_usage.is_some_and(|k| k > 0.0 && k <= 1.0),
        "{busy:?}"
    );
    for c in clients {
        let s = c.join().expect("client thread");
        assert_eq!(s.tokens.len(), 50);
        assert!(s.done);
    }
    let after = metrics(&ns);
    assert_eq!(after.requests_running, Some(0.0));
    assert_eq!(after.requests_waiting, Some(0.0));
}

#[test]
fn control_changes_the_step_time_and_health() {
    let (ns, _replica) = start(&["--step-ms", "20", "--batch-slowdown", "0"]);
    let at = |json: &str| {
        netns::in_netns(ns.name(), || replica::control(ADDR, json))
            .unwrap()
            .unwrap_or_else(|e| panic!("{e:#}"));
    };
    let params = || -> serde_json::Value {
        let r = netns::in_netns(ns.name(), || netns::http_get(ADDR, "/control", TIMEOUT))
            .unwrap()
            .expect("GET /control");
        serde_json::from_str(&r.body).expect("JSON parameters")
    };
    let base = completion_seconds(&ns, 10);
    at(r#"{"speed": 0.25}"#);
    assert_eq!(params()["speed"], 0.25);
    let throttled = completion_seconds(&ns, 10);
    at(r#"{"speed": 1.0}"#);
    assert_eq!(params()["speed"], 1.0);
    let recovered = completion_seconds(&ns, 10);
    println!("base {base:.3}s, throttled {throttled:.3}s, recovered {recovered:.3}s");
    // The replica sleeps 10 steps of 20 ms / 0.25: a throttled completion
    // cannot take less than 0.8 s, however fast the machine. Only that
    // lower bound is asserted; comparing the three times would compare
    // how busy the machine was at each.
    assert!(
        throttled >= 0.8,
        "throttled {throttled:.3}s, under its 10 steps of 80 ms"
    );

    // Bad values change nothing.
    let bad = netns::in_netns(ns.name(), || {
        replica::post_json(ADDR, "/control", r#"{"speed": 0}"#, TIMEOUT)
    })
    .unwrap()
    .unwrap();
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert_eq!(params()["speed"], 1.0);

    let health = || {
        netns::in_netns(ns.name(), || netns::http_get(ADDR, "/health", TIMEOUT))
            .unwrap()
            .unwrap()
            .status
    };
    assert_eq!(health(), 200);
    at(r#"{"fail_health": true}"#);
    assert_eq!(health(), 503);
    at(r#"{"fail_health": false}"#);
    assert_eq!(health(), 200);
}

#[test]
fn nvml_state_shows_the_busy_percent_and_keeps_other_fields() {
    let dir = ScratchDir::new("mock-replica-nvml").expect("scratch dir");
    let path = dir.0.join("nvml.json");
    let initial = serde_json::json!({
        "init_error": null,
        "devices": [
            {"uuid": "GPU-a", "name": "Fake H100", "sm_util": 0, "mem_util": 20,
             "mem_used": 1000000000u64, "mem_total": 80000000000u64, "power_mw": 350000,
             "temperature_c": 61, "throttle_reasons": 4, "error": null},
            {"uuid": "GPU-b", "name": "Fake H100", "sm_util": 13, "mem_util": 0,
             "mem_used": 0, "mem_total": 80000000000u64, "power_mw": 60000,
             "temperature_c": 35, "throttle_reasons": 0, "error": null}
        ]
    });
    std::fs::write(&path, initial.to_string()).unwrap();
    let path_arg = path.to_str().expect("UTF-8 temp path");
    // One request fills a batch of one: SM activity near 100%.
    let (ns, _replica) = start(&[
        "--step-ms",
        "20",
        "--max-batch",
        "1",
        "--nvml-state",
        path_arg,
    ]);
    let read = || -> serde_json::Value {
        // Written by rename, so never seen half-written.
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    };

    let name = ns.name().to_owned();
    let client = thread::spawn(move || {
        netns::in_netns(&name, || replica::stream_completion(ADDR, 60, TIMEOUT))
            .unwrap()
            .expect("streamed completion")
    });
    // Hang guards, not speed limits: the replica rewrites the state every
    // ~100 ms from the busy share of the last second.
    let deadline = Instant::now() + Duration::from_secs(15);
    let loaded = loop {
        let state = read();
        if state["devices"][0]["sm_util"].as_u64().unwrap() > 50 {
            break state;
        }
        assert!(Instant::now() < deadline, "sm_util stayed low: {state}");
        thread::sleep(Duration::from_millis(50));
    };
    let mut expected = initial.clone();
    expected["devices"][0]["sm_util"] = loaded["devices"][0]["sm_util"].clone();
    assert_eq!(loaded, expected, "only device 0's sm_util may change");
    client.join().expect("client thread");

    // Idle again: the busy share of the last second drops to zero.
    let deadline = Instant::now() + Duration::from_secs(15);
    while read()["devices"][0]["sm_util"] != 0 {
        assert!(Instant::now() < deadline, "sm_util stayed up: {}", read());
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn nvml_state_file_is_created_when_missing() {
    let dir = ScratchDir::new("mock-replica-nvml-new").expect("scratch dir");
    let path = dir.0.join("nvml.json");
    let (_ns, _replica) = start(&["--nvml-state", path.to_str().unwrap()]);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(state["init_error"], serde_json::Value::Null);
    let dev = &state["devices"][0];
    for key in [
        "uuid",
        "name",
        "sm_util",
        "mem_util",
        "mem_used",
        "mem_total",
        "power_mw",
        "temperature_c",
        "throttle_reasons",
        "error",
    ] {
        assert!(dev.get(key).is_some(), "device 0 lacks {key}: {state}");
    }
    assert_eq!(dev["sm_util"], 0);
}
