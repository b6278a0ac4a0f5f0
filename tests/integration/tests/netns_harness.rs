//! The namespace harness itself: topology reachability, the fixture backend
//! and cleanup (also on panic). Needs root; run with --test-threads=1.

use std::{
    net::SocketAddr,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::Mutex,
    time::Duration,
};

use router_testkit::netns::{self, Topology};

const PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(5);

fn listed_namespaces() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(out.status.success(), "ip netns list failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn assert_gone(names: &[String]) {
    let listed = listed_namespaces();
    for ns in names {
        assert!(
            !listed.contains(ns),
            "namespace {ns} still exists: {listed:?}"
        );
    }
}

#[test]
fn client_reaches_every_backend_directly() {
    let names;
    {
        let topo = Topology::one_arm(3).expect("build topology");
        names = topo.namespaces().to_vec();
        assert_eq!(names.len(), 6, "switch, client, lb and 3 backends");
        let listed = listed_namespaces();
        for ns in &names {
            assert!(listed.contains(ns), "{ns} missing from {listed:?}");
        }

        let _backends: Vec<_> = (0..topo.backend_count())
            .map(|i| {
                netns::spawn_http_backend(
                    topo.backend_ns(i),
                    &format!("backend-{i}"),
                    topo.backend_addr(i),
                    PORT,
                )
                .expect("start backend")
            })
            .collect();

        for i in 0..topo.backend_count() {
            let addr = SocketAddr::from((topo.backend_addr(i), PORT));
            let resp = netns::in_netns(topo.client_ns(), || netns::http_get(addr, "/", TIMEOUT))
                .expect("enter client namespace")
                .expect("GET /");
            assert_eq!(resp.status, 200);
            assert_eq!(resp.body, format!("backend-{i}"));

            let health = netns::in_netns(topo.client_ns(), || {
                netns::http_get(addr, "/health", TIMEOUT)
            })
            .expect("enter client namespace")
            .expect("GET /health");
            assert_eq!((health.status, health.body.as_str()), (200, "ok"));
        }

        // The client reaches the LB's own address: a listener bound inside
        // the LB namespace (it outlives the in_netns thread) accepts.
        let lb_addr = SocketAddr::from((topo.lb_addr(), PORT));
        let _listener = netns::in_netns(topo.lb_ns(), || std::net::TcpListener::bind(lb_addr))
            .expect("enter LB namespace")
            .expect("bind in LB namespace");
        netns::wait_for_tcp(topo.client_ns(), lb_addr, TIMEOUT).expect("client reaches the LB");
        let route = netns::exec(topo.client_ns(), &["ip", "route", "get", "198.18.100.10"])
            .expect("route lookup");
        assert!(route.contains("via 198.18.0.1"), "{route}");
        assert!(
            netns::gro_enabled(topo.switch_ns(), topo.lb_peer()).expect("read GRO"),
            "GRO must be on for the LB's peer"
        );
        let lb_fwd = netns::exec(topo.lb_ns(), &["cat", "/proc/sys/net/ipv4/ip_forward"])
            .expect("read ip_forward");
        assert_eq!(lb_fwd.trim(), "1");
        let mac = netns::mac_address(topo.lb_ns(), topo.lb_if()).expect("LB MAC");
        assert_ne!(mac, [0; 6]);
        // Backends drop before the topology (reverse declaration order).
    }
    assert_gone(&names);
}

#[test]
fn stream_endpoint_sends_lines() {
    let topo = Topology::one_arm(1).expect("build topology");
    let _backend =
        netns::spawn_http_backend(topo.backend_ns(0), "streamer", topo.backend_addr(0), PORT)
            .expect("start backend");
    let addr = SocketAddr::from((topo.backend_addr(0), PORT));
    let resp = netns::in_netns(topo.client_ns(), || {
        netns::http_get(addr, "/stream?seconds=0.5&interval_ms=100", TIMEOUT)
    })
    .expect("enter client namespace")
    .expect("GET /stream");
    assert_eq!(resp.status, 200);
    let lines: Vec<&str> = resp.body.lines().collect();
    assert!(lines.len() >= 3, "too few lines: {lines:?}");
    assert!(lines.iter().all(|l| *l == "streamer"), "{lines:?}");
}

#[test]
fn panic_inside_closure_still_cleans_up() {
    let names = Mutex::new(Vec::new());
    let backend_pid = Mutex::new(None);
    let result = catch_unwind(AssertUnwindSafe(|| {
        let topo = Topology::one_arm(2).expect("build topology");
        *names.lock().expect("lock") = topo.namespaces().to_vec();
        let backend =
            netns::spawn_http_backend(topo.backend_ns(0), "doomed", topo.backend_addr(0), PORT)
                .expect("start backend");
        *backend_pid.lock().expect("lock") = Some(backend.id());
        // A panic inside in_netns propagates to the caller's thread.
        netns::in_netns(topo.client_ns(), || panic!("deliberate test panic"))
            .expect("enter client namespace");
    }));
    // The panic that unwound is the one raised inside the namespace, not a
    // setup step failing on the way (which would leave less to clean up).
    let payload = result.expect_err("the closure must have panicked");
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned());
    assert_eq!(message.as_deref(), Some("deliberate test panic"));
    // The backend process went with its guard: killed and reaped.
    let pid = backend_pid
        .into_inner()
        .expect("lock")
        .expect("backend started");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "backend {pid} outlived the panic"
    );
    let names = names.into_inner().expect("lock");
    assert_eq!(names.len(), 5, "switch, client, lb and 2 backends");
    assert_gone(&names);
}

#[test]
fn in_netns_sockets_live_in_the_namespace() {
    let topo = Topology::one_arm(0).expect("build topology");
    // The LB address exists only inside the LB namespace, so binding to it
    // succeeds there and fails in the test's own namespace.
    let lb = SocketAddr::from((topo.lb_addr(), 0));
    let listener = netns::in_netns(topo.lb_ns(), || std::net::TcpListener::bind(lb))
        .expect("enter LB namespace");
    assert!(listener.is_ok(), "bind inside the namespace: {listener:?}");
    assert!(std::net::TcpListener::bind(lb).is_err());
}
