//! The daemon keeps every backend's next hop resolved with kernel-managed
//! neighbour entries (`ip neigh ... managed`): added at start, re-applied
//! after a link change and on reload, removed when a backend leaves and by
//! `--cleanup`, which never removes an entry the daemon did not add.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use router_testkit::{
    bpffs::BpfFs,
    daemon_proc::{
        ScratchDir, cli, one_arm_config, router_binary, start_daemon,
        start_daemon_pinned_logging_to, status,
    },
    netns::{self, Topology},
};
use serde_json::Value;

const VIP: &str = "198.18.100.1:8000";
/// Inside 198.18.0.0/15 and outside every route of the LB's namespace.
const UNROUTED: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
/// States of an entry that holds a link-layer address.
const RESOLVED: [&str; 4] = ["REACHABLE", "STALE", "DELAY", "PROBE"];

/// The IPv4 entry for `addr` in `ns`, as `ip -j neigh show nud all` gives it.
fn entry(ns: &str, addr: Ipv4Addr) -> Option<Value> {
    let out = netns::exec(ns, &["ip", "-j", "neigh", "show", "nud", "all"]).unwrap();
    let all: Vec<Value> = serde_json::from_str(&out).unwrap();
    all.into_iter()
        .find(|e| e["dst"].as_str() == Some(addr.to_string().as_str()))
}

fn is_managed(e: &Value) -> bool {
    e.get("managed").is_some()
}

fn states(e: &Value) -> Vec<String> {
    e["state"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn managed_and_resolved(ns: &str, addr: Ipv4Addr) -> bool {
    entry(ns, addr).is_some_and(|e| {
        is_managed(&e) && states(&e).iter().any(|s| RESOLVED.contains(&s.as_str()))
    })
}

/// Polls `done` every 50 ms for up to 10 s; panics with `what` after.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn backends(weights: &[u32]) -> Vec<(String, String, u32)> {
    netns::fixture_backends(weights)
}

/// `n` HTTP connections to the VIP, one after another; answers per backend.
fn connections(topo: &Topology, n: usize) -> BTreeMap<String, usize> {
    let vip: SocketAddr = VIP.parse().unwrap();
    let bodies = netns::in_netns(topo.client_ns(), || {
        (0..n)
            .map(|_| {
                netns::http_get(vip, "/", Duration::from_secs(5))
                    .expect("GET / through the VIP")
                    .body
            })
            .collect::<Vec<_>>()
    })
    .unwrap();
    let mut counts = BTreeMap::new();
    for b in bodies {
        *counts.entry(b).or_insert(0) += 1;
    }
    counts
}

fn fib_failed(socket: &std::path::Path) -> u64 {
    status(socket)
        .unwrap()
        .datapath
        .reasons
        .iter()
        .find(|(r, _)| r == "pass_fib_failed")
        .map_or(0, |(_, n)| *n)
}

#[test]
fn every_backends_next_hop_is_kept_resolved_and_cleanup_removes_only_the_daemons_entries() {
    let topo = Topology::one_arm_unprepared(3).expect("topology");
    let _servers = topo.spawn_fixture_backends(8000).expect("backend servers");
    let (lb, dev) = (topo.lb_ns(), topo.lb_if());
    let addr = |i| topo.backend_addr(i);
    // An operator's static entry for b2: the daemon leaves it as it is.
    let mac = netns::mac_address(topo.backend_ns(2), topo.backend_if()).unwrap();
    let mac: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    let b2 = addr(2).to_string();
    netns::exec(
        lb,
        &[
            "ip",
            "neigh",
            "add",
            &b2,
            "lladdr",
            &mac.join(":"),
            "dev",
            dev,
            "nud",
            "permanent",
        ],
    )
    .unwrap();

    let dir = ScratchDir::new("neigh-start").unwrap();
    let socket = dir.0.join("router.sock");
    let config = dir.0.join("router.toml");
    let log = dir.0.join("daemon.log");
    let mut all = backends(&[100, 100, 100]);
    // Never picked (weight 0); its address has no route.
    all.push(("nowhere".into(), format!("{UNROUTED}:8000"), 0));
    std::fs::write(
        &config,
        one_arm_config(&socket, dev, VIP, netns::LB_ADDR, &all),
    )
    .unwrap();
    let router = router_binary().unwrap();
    let router = router.to_str().unwrap();
    let check = netns::exec(lb, &[router, "config", "check", config.to_str().unwrap()]).unwrap();
    for i in 0..2 {
        let line = format!(
            "the daemon adds neighbour {} dev {dev} managed (next hop of backend b{i})",
            addr(i)
        );
        assert!(check.contains(&line), "{line}: {check}");
    }
    assert!(
        !check.contains("backend b2)"),
        "b2's entry is static: {check}"
    );
    assert!(
        check.contains(&format!("backend nowhere ({UNROUTED}): no route")),
        "{check}"
    );

    let pins = BpfFs::mount().unwrap();
    let daemon =
        start_daemon_pinned_logging_to(lb, &config, &socket, &pins.pin_path(), &log).unwrap();
    for i in 0..2 {
        wait_until(&format!("b{i}'s managed entry is resolved"), || {
            managed_and_resolved(lb, addr(i))
        });
    }
    let text = std::fs::read_to_string(&log).unwrap();
    for i in 0..2 {
        let line = format!(
            "neighbour {} dev {dev} managed (next hop of backend b{i})",
            addr(i)
        );
        assert!(text.contains(&line), "{line}: {text}");
    }
    assert!(
        text.contains(&format!("backend nowhere ({UNROUTED}): no route")),
        "one warning names the backend without a route: {text}"
    );
    let static_entry = entry(lb, addr(2)).unwrap();
    assert!(
        !is_managed(&static_entry) && states(&static_entry) == ["PERMANENT"],
        "{static_entry}"
    );

    let counts = connections(&topo, 60);
    assert_eq!(counts.len(), 3, "every backend answers: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 60, "{counts:?}");
    assert_eq!(
        fib_failed(&socket),
        0,
        "every next hop was resolved before the first connection"
    );

    assert!(daemon.stop(Duration::from_secs(10)).unwrap().success());
    let out = netns::exec(
        lb,
        &[
            router,
            "--socket",
            socket.to_str().unwrap(),
            "daemon",
            "--cleanup",
            "--pin-path",
            pins.pin_path().to_str().unwrap(),
        ],
    )
    .unwrap();
    for i in 0..2 {
        let line = format!("removed neighbour {} dev {dev}", addr(i));
        assert!(out.contains(&line), "{line}: {out}");
        assert_eq!(entry(lb, addr(i)), None, "b{i}'s entry is gone");
    }
    assert!(!out.contains(&format!("neighbour {b2}")), "{out}");
    assert_eq!(
        entry(lb, addr(2)),
        Some(static_entry),
        "the operator's entry stays"
    );
}

#[test]
fn a_reload_gives_a_new_backend_its_entry_and_takes_a_leaving_ones_away() {
    let topo = Topology::one_arm(3).expect("topology");
    // Reaching each backend leaves a dynamic entry for it.
    let _servers = topo
        .spawn_ready_fixture_backends(8000)
        .expect("backend servers");
    let (lb, dev) = (topo.lb_ns(), topo.lb_if());
    let addr = |i| topo.backend_addr(i);
    let lladdr = |i| entry(lb, addr(i)).map(|e| e["lladdr"].clone());
    let b2_lladdr = lladdr(2).expect("b2 was reached");

    let dir = ScratchDir::new("neigh-reload").unwrap();
    let socket = dir.0.join("router.sock");
    let config = dir.0.join("router.toml");
    let write = |weights: &[(usize, u32)]| {
        let all: Vec<_> = weights
            .iter()
            .map(|&(i, w)| (format!("b{i}"), format!("{}:8000", addr(i)), w))
            .collect();
        std::fs::write(
            &config,
            one_arm_config(&socket, dev, VIP, netns::LB_ADDR, &all),
        )
        .unwrap();
    };
    write(&[(0, 100), (1, 100)]);
    let daemon = start_daemon(lb, &config, &socket).expect("daemon");
    for i in 0..2 {
        wait_until(&format!("b{i}'s entry is managed"), || {
            managed_and_resolved(lb, addr(i))
        });
    }
    assert!(
        !entry(lb, addr(2)).as_ref().is_some_and(is_managed),
        "b2 is no backend yet"
    );

    write(&[(0, 100), (1, 100), (2, 100)]);
    let reply = cli(&socket, &["reload"]).unwrap();
    assert!(reply.starts_with("applied"), "{reply}");
    wait_until("b2's dynamic entry is made managed", || {
        managed_and_resolved(lb, addr(2))
    });
    assert_eq!(lladdr(2), Some(b2_lladdr), "its link-layer address is kept");

    write(&[(0, 100), (2, 100)]);
    let reply = cli(&socket, &["reload"]).unwrap();
    assert!(reply.starts_with("applied"), "{reply}");
    wait_until("b1's entry is removed with b1", || {
        entry(lb, addr(1)).is_none()
    });
    assert!(managed_and_resolved(lb, addr(0)) && managed_and_resolved(lb, addr(2)));

    // Down, the link loses its routes and every neighbour, static ones
    // too; up again, the daemon gives the next hops their managed entries
    // back.
    netns::exec(lb, &["ip", "link", "set", dev, "down"]).unwrap();
    wait_until("the link's managed entries are gone", || {
        [0, 2]
            .iter()
            .all(|&i| !entry(lb, addr(i)).as_ref().is_some_and(is_managed))
    });
    netns::exec(lb, &["ip", "link", "set", dev, "up"]).unwrap();
    for i in [0, 2] {
        wait_until(
            &format!("b{i}'s entry is back after the link change"),
            || managed_and_resolved(lb, addr(i)),
        );
    }

    let counts = connections(&topo, 20);
    assert_eq!(counts.values().sum::<usize>(), 20, "{counts:?}");
    assert!(!counts.contains_key("b1"), "{counts:?}");
    assert!(daemon.stop(Duration::from_secs(10)).unwrap().success());
}
