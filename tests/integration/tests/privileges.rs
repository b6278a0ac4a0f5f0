//! The daemon drops every capability it does not need once its datapath is
//! attached, in every thread, and still writes maps: weight overrides and
//! reloads keep working.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use router_testkit::{
    daemon_proc::{ScratchDir, cli, one_arm_config, start_daemon},
    netns::{self, Topology},
};

const VIP: &str = "198.18.100.1:8000";
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// `Name:` fields of /proc/PID/task/TID/status for every thread.
fn thread_status(pid: u32) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let text = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        out.push(
            text.lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.to_string(), v.trim().to_string()))
                .collect(),
        );
    }
    out
}

fn mask(fields: &BTreeMap<String, String>, key: &str) -> u64 {
    u64::from_str_radix(&fields[key], 16).unwrap()
}

fn backends(weights: &[u32]) -> Vec<(String, String, u32)> {
    netns::fixture_backends(weights)
}

fn answers(topo: &Topology, n: usize) -> BTreeMap<String, usize> {
    netns::answers_per_backend(topo.client_ns(), VIP.parse().unwrap(), n).unwrap()
}

#[test]
fn the_daemon_keeps_no_capability_it_does_not_need_and_still_writes_maps() {
    let topo = Topology::one_arm(2).unwrap();
    let _servers = topo.spawn_fixture_backends(8000).unwrap();
    for i in 0..2 {
        netns::wait_for_tcp(
            topo.lb_ns(),
            SocketAddr::new(netns::backend_addr(i).into(), 8000),
            Duration::from_secs(5),
        )
        .unwrap();
    }
    let dir = ScratchDir::new("caps").unwrap();
    let socket = dir.0.join("router.sock");
    let config = dir.0.join("router.toml");
    let write = |weights: &[u32]| {
        std::fs::write(
            &config,
            one_arm_config(
                &socket,
                topo.lb_if(),
                VIP,
                netns::LB_ADDR,
                &backends(weights),
            ),
        )
        .unwrap()
    };
    write(&[100, 100]);
    let daemon = start_daemon(topo.lb_ns(), &config, &socket).unwrap();

    // At most what map access through an open fd can need on some kernel;
    // on kernels since 6.5 that is nothing. Every thread, every set.
    let allowed = (1u64 << CAP_BPF) | (1u64 << CAP_SYS_ADMIN);
    let threads = thread_status(daemon.id());
    assert!(threads.len() > 1, "the runtime's threads are checked too");
    for t in &threads {
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(
                mask(t, set) & !allowed,
                0,
                "thread {} {set} {}",
                t["Name"],
                t[set]
            );
        }
        assert_eq!(mask(t, "CapInh"), 0, "thread {}", t["Name"]);
        assert_eq!(mask(t, "CapAmb"), 0, "thread {}", t["Name"]);
        assert_eq!(t["NoNewPrivs"], "1", "thread {}", t["Name"]);
        assert_eq!(
            mask(t, "CapEff"),
            mask(&threads[0], "CapEff"),
            "every thread holds the same set"
        );
    }

    // Map writes still work: an override, then a reload with new weights.
    cli(&socket, &["weight", "set", "llama", "b0", "0"]).unwrap();
    assert_eq!(answers(&topo, 20).get("b1"), Some(&20));
    cli(&socket, &["weight", "auto", "llama", "b0"]).unwrap();
    write(&[100, 0]);
    let msg = cli(&socket, &["reload"]).unwrap();
    assert!(msg.contains("1 tables swapped"), "{msg}");
    assert_eq!(answers(&topo, 20).get("b0"), Some(&20));
    assert!(daemon.stop(Duration::from_secs(10)).unwrap().success());
}
