//! `hash_seed` end to end: two real daemons on two ingress nodes (two
//! topologies) with the same config report the same table fingerprint,
//! even with their backends listed in another order; without a seed each
//! draws its own key; and a daemon whose seed differs from the key of the
//! datapath pinned before it refuses to start, attaching nothing.

use std::{path::Path, process::Command, time::Duration};

use router_testkit::{
    bpffs::BpfFs,
    daemon_proc::{
        ScratchDir, cleanup_pins, one_arm_config, router_binary, start_daemon, start_daemon_pinned,
        status,
    },
    netns::{self, Topology},
};

const VIP: &str = "198.18.100.1:8000";
const SEED: &str = "5f3a9c0e12b4d7e8";

/// The fixture backends' config, the seed (if any) under `[daemon]`, and
/// the backends in reverse order when `reversed`.
fn config(socket: &Path, seed: Option<&str>, reversed: bool) -> String {
    let mut backends = netns::fixture_backends(&[100, 50, 100]);
    if reversed {
        backends.reverse();
    }
    let text = one_arm_config(socket, netns::LB_IF, VIP, netns::LB_ADDR, &backends);
    match seed {
        Some(s) => text.replacen("[daemon]\n", &format!("[daemon]\nhash_seed = \"{s}\"\n"), 1),
        None => text,
    }
}

/// The fingerprint a daemon on a fresh node reports for `text`.
fn fingerprint_of(tag: &str, seed: Option<&str>, reversed: bool) -> String {
    let topo = Topology::one_arm(3).expect("topology");
    let dir = ScratchDir::new(tag).expect("scratch dir");
    let socket = dir.0.join("router.sock");
    let path = dir.0.join("router.toml");
    std::fs::write(&path, config(&socket, seed, reversed)).expect("config");
    let daemon = start_daemon(topo.lb_ns(), &path, &socket).expect("daemon");
    let fp = status(&socket)
        .expect("status")
        .table_fingerprint
        .expect("a fingerprint once the tables are written");
    daemon.stop(Duration::from_secs(10)).expect("stop");
    fp
}

#[test]
fn nodes_with_one_seed_report_one_fingerprint() {
    let a = fingerprint_of("seed-a", Some(SEED), false);
    let b = fingerprint_of("seed-b", Some(SEED), true);
    assert_eq!(a, b, "same seed and backends, listed in another order");
    let c = fingerprint_of("seed-c", Some("00000000000000a1"), false);
    assert_ne!(a, c, "another seed");
    let d = fingerprint_of("seed-d", None, false);
    let e = fingerprint_of("seed-e", None, false);
    assert_ne!(d, e, "without a seed each node draws its own key");
}

#[test]
fn a_seed_other_than_the_pinned_key_refuses_to_start() {
    let topo = Topology::one_arm(3).expect("topology");
    let dir = ScratchDir::new("seed-pinned").expect("scratch dir");
    let fs = BpfFs::mount().expect("bpffs");
    let pins = fs.pin_path();
    let socket = dir.0.join("router.sock");
    let path = dir.0.join("router.toml");
    std::fs::write(&path, config(&socket, Some(SEED), false)).expect("config");
    let first = start_daemon_pinned(topo.lb_ns(), &path, &socket, &pins).expect("daemon");
    let before = status(&socket).expect("status").table_fingerprint;
    first.stop(Duration::from_secs(10)).expect("stop");

    std::fs::write(&path, config(&socket, Some("00000000000000a1"), false)).expect("config");
    // `timeout`: a hang guard, should the daemon start after all.
    let out = Command::new("timeout")
        .args(["30", "ip", "netns", "exec", topo.lb_ns()])
        .arg(router_binary().expect("router binary"))
        .args(["daemon", "--config"])
        .arg(&path)
        .arg("--pin-path")
        .arg(&pins)
        .output()
        .expect("running the daemon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with another seed: {stderr}");
    assert_ne!(
        out.status.code(),
        Some(124),
        "hung instead of refusing: {stderr}"
    );
    assert!(stderr.contains("daemon.hash_seed: "), "{stderr}");

    // The pinned datapath is untouched: the first seed adopts it as it was.
    std::fs::write(&path, config(&socket, Some(SEED), false)).expect("config");
    let again = start_daemon_pinned(topo.lb_ns(), &path, &socket, &pins).expect("daemon");
    assert_eq!(status(&socket).expect("status").table_fingerprint, before);
    again.stop(Duration::from_secs(10)).expect("stop");
    cleanup_pins(&socket, &pins).expect("router daemon --cleanup");
}
