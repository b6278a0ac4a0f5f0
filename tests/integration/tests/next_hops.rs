//! The daemon tells the datapath whether flows to one backend may share its
//! next hop: they may while the LB's namespace routes by destination alone,
//! and each flow looks its own up while a policy rule or a multipath route
//! exists. Rules and routes added and removed under a running daemon switch
//! it both ways, and connections succeed in either mode.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use router_testkit::daemon_proc::{ScratchDir, one_arm_config, start_daemon_logging_to};
use router_testkit::netns::{self, Topology};

const VIP: &str = "198.18.100.1:8000";
const SHARED: &str = "next hops shared per backend";
const PER_FLOW: &str = "next hops looked up per flow";

/// Waits (bounded) until the daemon's log holds `line` `times` times.
fn wait_for_line(log: &Path, line: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(line).count() >= times {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {times}× `{line}` in the daemon's log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn connections_succeed(topo: &Topology, n: usize) {
    let vip: SocketAddr = VIP.parse().unwrap();
    netns::in_netns(topo.client_ns(), || {
        for _ in 0..n {
            netns::http_get(vip, "/", Duration::from_secs(5)).expect("GET / through the VIP");
        }
    })
    .unwrap();
}

fn lb_ip(topo: &Topology, args: &[&str]) {
    let mut cmd = vec!["ip"];
    cmd.extend_from_slice(args);
    netns::exec(topo.lb_ns(), &cmd).unwrap();
}

#[test]
fn policy_rules_and_multipath_routes_switch_next_hops_to_per_flow_and_back() {
    let topo = Topology::one_arm(2).expect("topology");
    let _servers = topo.spawn_ready_fixture_backends(8000).expect("backends");
    let dir = ScratchDir::new("next-hops").unwrap();
    let (socket, config, log) = (
        dir.0.join("router.sock"),
        dir.0.join("router.toml"),
        dir.0.join("daemon.log"),
    );
    std::fs::write(
        &config,
        one_arm_config(
            &socket,
            topo.lb_if(),
            VIP,
            netns::LB_ADDR,
            &netns::fixture_backends(&[100, 100]),
        ),
    )
    .unwrap();
    let daemon = start_daemon_logging_to(topo.lb_ns(), &config, &socket, &log).expect("daemon");
    wait_for_line(&log, SHARED, 1);
    connections_succeed(&topo, 20);

    lb_ip(
        &topo,
        &[
            "rule",
            "add",
            "from",
            "198.18.77.0/24",
            "table",
            "10",
            "pref",
            "100",
        ],
    );
    wait_for_line(
        &log,
        &format!("{PER_FLOW}: policy routing rule 100 (table 10)"),
        1,
    );
    connections_succeed(&topo, 20);
    lb_ip(&topo, &["rule", "del", "pref", "100"]);
    wait_for_line(&log, SHARED, 2);

    let (b0, b1) = (
        topo.backend_addr(0).to_string(),
        topo.backend_addr(1).to_string(),
    );
    lb_ip(
        &topo,
        &[
            "route",
            "add",
            "198.18.78.0/24",
            "nexthop",
            "via",
            &b0,
            "nexthop",
            "via",
            &b1,
        ],
    );
    wait_for_line(
        &log,
        &format!("{PER_FLOW}: multipath route 198.18.78.0/24"),
        1,
    );
    connections_succeed(&topo, 20);
    lb_ip(&topo, &["route", "del", "198.18.78.0/24"]);
    wait_for_line(&log, SHARED, 3);
    connections_succeed(&topo, 20);

    assert!(daemon.stop(Duration::from_secs(10)).unwrap().success());
}
