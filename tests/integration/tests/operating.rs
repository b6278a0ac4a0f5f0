//! Operating the router against a real daemon in network namespaces: every
//! read command's JSON, the Prometheus `/metrics` scrape (parsed as a
//! scraper would) after known traffic, drain deadlines that end flows, API
//! requests that must be refused, and a daemon short of file descriptors
//! (idle connections piling up on `metrics_listen`, or none left at all)
//! that keeps serving traffic on its last weights.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use openmetrics_parser::{MetricsExposition, OpenMetricsType, OpenMetricsValue};
use router_testkit::{
    daemon_proc::{
        Daemon, SYSTEMD_DEFAULT_NOFILE, ScratchDir, cli, cli_within, one_arm_config,
        raise_own_nofile, start_daemon, start_daemon_with_nofile,
    },
    netns::{self, ChildGuard, Topology},
};
use serde_json::Value;

const VIP: &str = "198.18.100.1:8000";
const METRICS: &str = "127.0.0.1:9090";
/// Health checks for [`Rig::guarded`]: a TCP connect every 500 ms, two
/// failures in a row take a backend out.
const HEALTH: &str =
    "health = { tcp = true, interval = \"500ms\", timeout = \"400ms\", fall = 2, rise = 2 }\n";

struct Rig {
    topo: Topology,
    dir: ScratchDir,
    socket: std::path::PathBuf,
    config: std::path::PathBuf,
    _backends: Vec<ChildGuard>,
    daemon: Option<Daemon>,
}

impl Rig {
    fn new(tag: &str) -> Rig {
        Rig::start(tag, false)
    }

    /// Health-checked backends, and a daemon with systemd's default soft
    /// limit on open files (1024): what production ran before the unit set
    /// `LimitNOFILE=`.
    fn guarded(tag: &str) -> Rig {
        Rig::start(tag, true)
    }

    fn start(tag: &str, guarded: bool) -> Rig {
        let topo = Topology::one_arm(2).unwrap();
        let dir = ScratchDir::new(tag).unwrap();
        let socket = dir.0.join("router.sock");
        let config = dir.0.join("router.toml");
        let backends = netns::fixture_backends(&[100, 100]);
        let text = one_arm_config(&socket, topo.lb_if(), VIP, netns::LB_ADDR, &backends).replacen(
            "weight = 100\n",
            "weight = 100\ncost_per_hour = 3.6\n",
            1,
        );
        let text = if guarded {
            text.replace("weight = 100\n", &format!("weight = 100\n{HEALTH}"))
        } else {
            text
        };
        std::fs::write(&config, text).unwrap();
        let guards = topo.spawn_fixture_backends(8000).unwrap();
        let daemon = if guarded {
            start_daemon_with_nofile(topo.lb_ns(), &config, &socket, SYSTEMD_DEFAULT_NOFILE)
        } else {
            start_daemon(topo.lb_ns(), &config, &socket)
        }
        .unwrap();
        Rig {
            topo,
            dir,
            socket,
            config,
            _backends: guards,
            daemon: Some(daemon),
        }
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = cli(&self.socket, args).unwrap();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    fn backend(&self, name: &str) -> Value {
        self.json(&["backends", "llama", "--json"])
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .unwrap()
            .clone()
    }

    fn get(&self, n: usize) -> BTreeMap<String, usize> {
        self.try_get(n).unwrap()
    }

    fn try_get(&self, n: usize) -> anyhow::Result<BTreeMap<String, usize>> {
        netns::answers_per_backend(self.topo.client_ns(), VIP.parse().unwrap(), n)
    }

    /// `router backends llama --json`, from a daemon that must answer
    /// within 5 s.
    fn backends_within(&self) -> anyhow::Result<Vec<Value>> {
        let out = cli_within(
            &self.socket,
            &["backends", "llama", "--json"],
            Duration::from_secs(5),
        )?;
        let v: Value = serde_json::from_str(&out)?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Both backends healthy at their configured weight.
    fn all_up(&self) -> anyhow::Result<bool> {
        let backends = self.backends_within()?;
        Ok(backends.len() == 2
            && backends
                .iter()
                .all(|b| b["healthy"] == true && b["weight"] == 100))
    }

    fn wait_all_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.all_up().unwrap() {
            assert!(Instant::now() < deadline, "backends never came up");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn scrape(&self) -> (u16, String) {
        let addr: SocketAddr = METRICS.parse().unwrap();
        let r = netns::in_netns(self.topo.lb_ns(), move || {
            netns::http_get(addr, "/metrics", Duration::from_secs(5))
        })
        .unwrap()
        .unwrap();
        (r.status, r.body)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            let _ = d.stop(Duration::from_secs(10));
        }
    }
}

type Exposition = MetricsExposition<OpenMetricsType, OpenMetricsValue>;

/// Samples of one family whose labels include every `(name, value)` given.
fn samples<'a>(
    m: &'a Exposition,
    family: &str,
    labels: &[(&str, &str)],
) -> Vec<&'a OpenMetricsValue> {
    let Some(f) = m.families.get(family) else {
        panic!(
            "no family {family}; have {:?}",
            m.families.keys().collect::<Vec<_>>()
        )
    };
    f.iter_samples()
        .filter(|s| {
            let set = s.get_labelset().unwrap();
            labels
                .iter()
                .all(|(k, v)| set.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|s| &s.value)
        .collect()
}

fn number(v: &OpenMetricsValue) -> f64 {
    match v {
        OpenMetricsValue::Gauge(n) | OpenMetricsValue::Unknown(n) => n.as_f64(),
        OpenMetricsValue::Counter(c) => c.value.as_f64(),
        other => panic!("not a number: {other:?}"),
    }
}

fn sum(m: &Exposition, family: &str, labels: &[(&str, &str)]) -> f64 {
    samples(m, family, labels).into_iter().map(number).sum()
}

/// Total count over every histogram of `family`, checking each is
/// cumulative and ends in +Inf with the count.
fn histogram_count(m: &Exposition, family: &str) -> u64 {
    samples(m, family, &[])
        .into_iter()
        .map(|v| {
            let OpenMetricsValue::Histogram(h) = v else {
                panic!("{family} is not a histogram: {v:?}")
            };
            let counts: Vec<f64> = h.buckets.iter().map(|b| b.count.as_f64()).collect();
            assert!(
                counts.windows(2).all(|w| w[0] <= w[1]),
                "{family}: buckets not cumulative: {counts:?}"
            );
            let last = h.buckets.last().unwrap();
            assert!(last.upper_bound.is_infinite(), "{family}: no +Inf bucket");
            let count = h.count.unwrap();
            assert_eq!(last.count.as_f64() as u64, count, "{family}: +Inf ≠ count");
            count
        })
        .sum()
}

#[test]
fn metrics_and_every_read_command_after_known_traffic() {
    let rig = Rig::new("metrics");
    // The daemon samples connection counters every 2 s: one sample before
    // the traffic and one after give a rate (and so a cost per connection).
    std::thread::sleep(Duration::from_millis(2500));
    let split = rig.get(40);
    assert_eq!(split.values().sum::<usize>(), 40, "{split:?}");
    std::thread::sleep(Duration::from_millis(2500));

    let (code, text) = rig.scrape();
    assert_eq!(code, 200);

    let m = openmetrics_parser::openmetrics::parse_openmetrics(&text)
        .unwrap_or_else(|e| panic!("unparsable /metrics: {e:?}\n{text}"));
    assert_eq!(sum(&m, "router_backend_new_connections", &[]), 40.0);
    assert_eq!(
        sum(
            &m,
            "router_service_new_connections",
            &[("service", "llama")]
        ),
        40.0
    );
    for b in ["b0", "b1"] {
        let got = sum(&m, "router_backend_new_connections", &[("backend", b)]);
        assert_eq!(
            got as usize, split[b],
            "{b}: metrics agree with what clients saw"
        );
        assert_eq!(sum(&m, "router_backend_weight", &[("backend", b)]), 100.0);
    }
    assert_eq!(
        histogram_count(&m, "router_backend_connect_latency_seconds"),
        40,
        "one connect sample per connection"
    );
    assert_eq!(
        histogram_count(&m, "router_backend_first_byte_latency_seconds"),
        40,
        "one first-byte sample per connection"
    );
    assert_eq!(
        samples(
            &m,
            "router_backend_weight_reason",
            &[("backend", "b0"), ("mode", "pinned")]
        )
        .len(),
        1
    );
    assert!(sum(&m, "router_datapath_packets", &[("reason", "tx")]) >= 40.0 * 4.0);
    assert_eq!(
        sum(
            &m,
            "router_backend_cost_per_hour_dollars",
            &[("backend", "b0")]
        ),
        3.6
    );
    assert_eq!(sum(&m, "router_conn_table_capacity", &[]), 262_144.0);
    assert_eq!(sum(&m, "router_service_fallback_connections", &[]), 0.0);
    assert!(m.families.contains_key("router_backend_active_connections"));

    // /metrics is read-only.
    let lb = rig.topo.lb_ns().to_string();
    let code = netns::in_netns(&lb, || {
        let mut s = TcpStream::connect(METRICS).unwrap();
        s.write_all(b"POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    })
    .unwrap();
    assert!(code.starts_with("HTTP/1.0 405"), "{code}");

    // Every read command, as JSON.
    let services = rig.json(&["services", "--json"]);
    assert_eq!(services[0]["name"], "llama");
    assert_eq!(services[0]["backends"], 2);
    assert_eq!(services[0]["counters"]["new_conns"], 40);
    assert_eq!(
        services[0]["active_connections"], 0,
        "short flows are closed"
    );
    let all = rig.json(&["backends", "--json"]);
    assert_eq!(all.as_array().unwrap().len(), 2);
    assert_eq!(all, rig.json(&["backends", "llama", "--json"]));
    let b0 = rig.backend("b0");
    assert_eq!(b0["weight"], 100);
    assert!((b0["share"].as_f64().unwrap() - 0.5).abs() < 0.01, "{b0}");
    assert_eq!(b0["mode"], "pinned");
    assert_eq!(
        b0["counters"]["new_conns"].as_u64().unwrap() as usize,
        split["b0"]
    );
    assert!(b0["first_byte_p99_ms"].as_f64().unwrap() > 0.0, "{b0}");
    assert!(b0["new_conns_per_sec"].as_f64().unwrap() > 0.0, "{b0}");
    assert!(
        b0["cost_per_1k_connections"].as_f64().unwrap() > 0.0,
        "{b0}"
    );
    let status = rig.json(&["status", "--json"]);
    assert_eq!(status["datapath"]["services"][0]["name"], "llama");
    let reload = rig.json(&["reload", "--json"]);
    assert_eq!(reload["ok"], true, "{reload}");
    let check = netns::exec(
        rig.topo.lb_ns(),
        &[
            router_testkit::daemon_proc::router_binary()
                .unwrap()
                .to_str()
                .unwrap(),
            "config",
            "check",
            "--json",
            rig.config.to_str().unwrap(),
        ],
    )
    .unwrap();
    let check: Value = serde_json::from_str(&check).unwrap();
    assert_eq!(check["ok"], true);
    assert_eq!(check["backends"], 2);

    // Human views and the TTY-less `top`.
    let table = cli(&rig.socket, &["backends"]).unwrap();
    assert!(
        table.contains("b0") && table.contains("b1") && table.contains("TTFB P99"),
        "{table}"
    );
    let top = cli(&rig.socket, &["top", "--count", "2", "--refresh", "100ms"]).unwrap();
    assert_eq!(top.matches("MODE/REASON").count(), 2, "{top}");
    let services = cli(&rig.socket, &["services"]).unwrap();
    assert!(services.contains("llama"), "{services}");
    let completions = cli(&rig.socket, &["completions", "bash"]).unwrap();
    assert!(completions.contains("complete") && completions.contains("undrain"));

    let err = cli(&rig.socket, &["backends", "gemma", "--json"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no service named \"gemma\""), "{err}");
    let _ = &rig.dir;
}

/// Idle connections held open through the drain.
const HELD: u64 = 16;

#[test]
fn drain_deadline_ends_the_backends_remaining_flows() {
    let rig = Rig::new("deadline");
    let vip: SocketAddr = VIP.parse().unwrap();
    // Idle connections: the fixture server waits for a request line forever.
    let held: Vec<TcpStream> = netns::in_netns(rig.topo.client_ns(), move || {
        (0..HELD)
            .map(|_| TcpStream::connect_timeout(&vip, Duration::from_secs(5)).unwrap())
            .collect()
    })
    .unwrap();
    let active = |name: &str| rig.backend(name)["active_connections"].as_u64();
    let deadline = Instant::now() + Duration::from_secs(10);
    while active("b0").unwrap_or(0) + active("b1").unwrap_or(0) != HELD {
        assert!(Instant::now() < deadline, "scanner never saw {HELD} flows");
        std::thread::sleep(Duration::from_millis(200));
    }
    let on_b0 = active("b0").unwrap();
    // All on one backend has odds of 2^-15 with 16 random client ports.
    assert!(
        on_b0 > 0 && on_b0 < HELD,
        "hash put {on_b0} of {HELD} on b0"
    );

    // Bad deadlines change nothing.
    for bad in ["soon", "-5m"] {
        let err = cli(&rig.socket, &["drain", "llama", "b0", "--deadline", bad])
            .unwrap_err()
            .to_string();
        assert!(err.contains("malformed duration"), "{bad}: {err}");
    }
    assert_eq!(rig.backend("b0")["mode"], "pinned");

    let reply = cli(&rig.socket, &["drain", "llama", "b0", "--deadline", "1s"]).unwrap();
    assert!(reply.contains("drain_deadline_unix"), "{reply}");
    let b0 = rig.backend("b0");
    assert_eq!(
        (b0["mode"].as_str(), b0["weight"].as_u64()),
        (Some("drain"), Some(0))
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let ended = loop {
        if let Some(n) = rig.backend("b0")["flows_ended"].as_u64() {
            break n;
        }
        assert!(Instant::now() < deadline, "deadline never enforced");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(ended, on_b0);

    // Flows to b1 carry on; flows that were on b0 are reset when used.
    let mut answered = 0;
    let mut reset = 0;
    for mut s in held {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
        let mut r = String::new();
        match s.read_to_string(&mut r) {
            Ok(_) if r.ends_with("b1") => answered += 1,
            Ok(_) if r.is_empty() => reset += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => reset += 1,
            other => panic!("unexpected outcome {other:?}: {r:?}"),
        }
    }
    assert_eq!((answered, reset), (HELD - on_b0, on_b0));
    // New connections avoid the drained backend.
    assert_eq!(rig.get(10).get("b1"), Some(&10));
    cli(&rig.socket, &["undrain", "llama", "b0"]).unwrap();
    assert_eq!(rig.backend("b0")["flows_ended"], Value::Null);
}

fn raw_request(socket: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The server may answer and close before a huge request is fully sent.
    let _ = s.write_all(bytes);
    // No half-close: hyper may drop a connection whose read side ended
    // before it answered. `Connection: close` ends it after the answer.
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn oversized_and_malformed_api_requests_are_refused() {
    let rig = Rig::new("apibad");
    let before = rig.json(&["backends", "--json"]);
    let cases: [(&[u8], &str); 5] = [
        (
            b"POST /v1/reload HTTP/1.1\r\nHost: r\r\nConnection: close\r\nContent-Length: 10485760\r\n\r\n",
            "HTTP/1.1 413",
        ),
        (
            b"POST /v1/services/llama/backends/b0/drain HTTP/1.1\r\nHost: r\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "HTTP/1.1 413",
        ),
        (b"\x00\x01\x02 nonsense\r\n\r\n", "HTTP/1.1 400"),
        (
            b"POST /v1/services/llama/backends/b0/drain?deadline_secs=soon HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (b"GET /v1/nothing HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n", "HTTP/1.1 404"),
    ];
    for (req, want) in cases {
        let got = raw_request(&rig.socket, req);
        assert!(
            got.starts_with(want),
            "{:?}: want {want}, got {got:?}",
            String::from_utf8_lossy(req)
        );
    }
    // A header block far beyond any real request is refused by the server.
    let mut huge = b"GET /v1/status HTTP/1.1\r\nHost: r\r\nConnection: close\r\nX-Pad: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 1 << 20));
    huge.extend_from_slice(b"\r\n\r\n");
    // hyper answers 431 once the head passes its buffer limit, then closes;
    // on a Unix socket the answer stays readable after the close.
    let got = raw_request(&rig.socket, &huge);
    assert!(
        got.starts_with("HTTP/1.1 431"),
        "oversized headers: {got:?}"
    );
    let after = rig.json(&["backends", "--json"]);
    assert_eq!(before[0]["mode"], after[0]["mode"]);
    assert_eq!(before[0]["weight"], after[0]["weight"]);
    assert_eq!(
        after[0]["mode"], "pinned",
        "the refused drain changed nothing"
    );
}

#[test]
fn every_command_without_a_daemon_prints_one_line() {
    let dir = ScratchDir::new("nodaemon2").unwrap();
    let socket = dir.0.join("absent.sock");
    for args in [
        &["services"][..],
        &["services", "--json"],
        &["backends", "--json"],
        &["backends", "llama"],
        &["top", "--count", "1"],
        &["drain", "llama", "b0", "--deadline", "5m"],
        &["undrain", "llama", "b0"],
        &["weight", "set", "llama", "b0", "5"],
        &["weight", "auto", "llama", "b0"],
    ] {
        let err = cli(&socket, args).unwrap_err().to_string();
        assert!(err.contains("daemon is not running"), "{args:?}: {err}");
        let stderr = err.split_once(": ").unwrap().1;
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {err}");
    }
}

/// Idle connections opened to `metrics_listen`: about twice the daemon's
/// limit of 1024 open files.
const IDLE: usize = 2000;

/// Any local user can connect to `metrics_listen` (127.0.0.1:9090 by
/// default). Before the servers were bounded, a thousand connections that
/// sent nothing used up the daemon's 1024 descriptors: its health probes
/// then failed, every backend went unhealthy and to weight 0, and new flows
/// were dropped; the control socket stopped answering too. Now connections
/// over the cap are closed on accept (and counted), so the probes, the
/// traffic and the API carry on.
#[test]
fn idle_connections_to_metrics_listen_leave_traffic_health_and_the_api_alone() {
    let rig = Rig::guarded("idle");
    rig.wait_all_up();
    raise_own_nofile().unwrap();
    let addr: SocketAddr = METRICS.parse().unwrap();
    // Connect and send nothing. Bounded: 30 s, or ten connects in a row
    // that get no answer (a full accept queue).
    let held: Vec<TcpStream> = netns::in_netns(rig.topo.lb_ns(), move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut held, mut unanswered) = (Vec::with_capacity(IDLE), 0);
        while held.len() < IDLE && unanswered < 10 && Instant::now() < deadline {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(s) => {
                    held.push(s);
                    unanswered = 0;
                }
                Err(_) => unanswered += 1,
            }
        }
        held
    })
    .unwrap();
    let opened = held.len();
    // A daemon that stopped accepting leaves later connects unanswered: the
    // count is checked after what matters.
    eprintln!("holding {opened} idle connections to {METRICS}");

    // Several times `fall` probe intervals while they are held.
    for round in 0..4 {
        match rig.try_get(10) {
            Ok(split) => assert_eq!(split.values().sum::<usize>(), 10, "{split:?}"),
            Err(e) => {
                panic!("round {round}: the VIP failed with {opened} idle connections held: {e:#}")
            }
        }
        if let Err(e) = cli_within(&rig.socket, &["status", "--json"], Duration::from_secs(5)) {
            panic!(
                "round {round}: `router status` failed with {opened} idle connections held: {e:#}"
            );
        }
        let backends = rig.backends_within().unwrap();
        for b in &backends {
            assert_eq!(
                (&b["healthy"], &b["weight"]),
                (&Value::Bool(true), &Value::from(100)),
                "round {round}: {b}"
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    drop(held);
    assert!(opened >= IDLE * 3 / 4, "only {opened} connections opened");

    let (code, text) = rig.scrape();
    assert_eq!(code, 200, "{text}");
    let m = openmetrics_parser::openmetrics::parse_openmetrics(&text)
        .unwrap_or_else(|e| panic!("unparsable /metrics: {e:?}\n{text}"));
    let refused = sum(&m, "router_metrics_connections_refused", &[]);
    assert!(
        refused >= (opened / 2) as f64,
        "{refused} of {opened} idle connections refused"
    );
    assert_eq!(sum(&m, "router_control_connections_refused", &[]), 0.0);
    assert_eq!(
        sum(&m, "router_health_probe_local_errors", &[]),
        0.0,
        "the probes always had descriptors"
    );
    assert_eq!(sum(&m, "router_backend_healthy", &[]), 2.0);
}

/// The fail-open rule, on the real daemon: with no descriptor left to open
/// (its soft limit lowered to the three it has below it), every probe fails
/// on EMFILE. That is the daemon's failure, not the backends': they keep
/// their health and weights, and traffic keeps flowing through the
/// datapath. Before the rule, two failed probes took both backends out.
#[test]
fn probes_failing_for_want_of_descriptors_keep_the_weights() {
    let rig = Rig::guarded("nofds");
    rig.wait_all_up();
    let daemon = rig.daemon.as_ref().unwrap();
    let old = daemon.set_nofile(3).unwrap();
    // Six probes of each backend, three times `fall`.
    std::thread::sleep(Duration::from_secs(3));
    let served = rig.try_get(20);
    // Descriptors back before any assertion, so the rig can stop cleanly.
    daemon.set_nofile(old).unwrap();
    let split = served
        .unwrap_or_else(|e| panic!("the VIP failed while the daemon had no descriptors: {e:#}"));
    assert_eq!(split.values().sum::<usize>(), 20, "{split:?}");
    assert_eq!(split.len(), 2, "both backends kept their weight: {split:?}");

    assert!(rig.all_up().unwrap(), "{:?}", rig.backends_within());
    let status = rig.json(&["status", "--json"]);
    let local = status["health_local_errors"].as_u64().unwrap_or(0);
    assert!(local >= 4, "{local} local probe failures counted: {status}");
    let (code, text) = rig.scrape();
    assert_eq!(code, 200, "{text}");
    let m = openmetrics_parser::openmetrics::parse_openmetrics(&text).unwrap();
    assert!(sum(&m, "router_health_probe_local_errors", &[]) >= local as f64);
}
