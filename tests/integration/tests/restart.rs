//! Hitless restarts: the datapath is pinned, so a daemon that is killed
//! (`kill -9`) or stopped (SIGTERM) leaves it forwarding on the last
//! weights, and the next daemon adopts it without resetting a connection.
//! `router daemon --cleanup` is the only way to take it down. A restart that
//! would have to re-create a map (a new size) is refused and changes nothing.

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use router_testkit::{
    bpffs::pinned_objects,
    daemon_proc::{cli, datapath_weights, log_output_to, router_binary},
    netns,
};

#[path = "restart/setup.rs"]
mod setup;

use setup::{Setup, Stream, new_conns, vip_unreachable};

const VIP: &str = "198.18.100.1:8000";
const BACKENDS: usize = 3;

#[test]
fn fifty_streams_survive_kill_9_and_a_restart_and_new_connections_flow_in_the_gap() {
    let s = Setup::new("restart-kill");
    s.write_config(&[100, 100, 100], "");
    let daemon = s.start();
    let streams = s.open_streams(50, 15);
    let owners: std::collections::BTreeSet<&str> =
        streams.iter().map(|st| st.owner.as_str()).collect();
    assert_eq!(owners.len(), BACKENDS, "streams spread over every backend");
    let before = new_conns(&s.status());
    assert_eq!(before, 50);

    // kill -9: ChildGuard's drop sends SIGKILL and reaps.
    drop(daemon);
    assert!(s.xdp_attached(), "the pinned link keeps XDP attached");
    let gap = s.short_connections(60);
    assert_eq!(
        gap.keys().cloned().collect::<Vec<_>>(),
        ["b0", "b1", "b2"],
        "new connections in the gap are balanced on the last weights: {gap:?}"
    );

    let daemon = s.start();
    let st = s.status();
    assert_eq!(
        new_conns(&st),
        before + 60,
        "counters carry on, and the gap's connections went through the datapath"
    );
    assert_eq!(
        st.last_reload, None,
        "no reload happened; the start adopted the state"
    );
    let after = s.short_connections(30);
    assert_eq!(after.values().sum::<usize>(), 30);

    for stream in streams {
        stream.finish();
    }
    let reasons: BTreeMap<_, _> = s.status().datapath.reasons.into_iter().collect();
    assert_eq!(
        reasons["lru_miss"], 0,
        "no established flow lost its connection-table entry"
    );
    drop(daemon);
    let (ok, out) = s.cleanup();
    assert!(ok, "{out}");
}

#[test]
fn sigterm_leaves_traffic_flowing_on_the_last_weights() {
    let s = Setup::new("restart-term");
    s.write_config(&[100, 100, 100], "");
    let daemon = s.start();
    // The last weights are the applied ones, overrides included.
    cli(&s.socket(), &["weight", "set", "llama", "b0", "0"]).unwrap();
    cli(&s.socket(), &["weight", "set", "llama", "b1", "0"]).unwrap();
    let streams = s.open_streams(6, 5);

    let status = daemon.stop(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "daemon exit status {status}");
    assert!(!s.socket().exists(), "the control socket is removed");
    assert!(s.xdp_attached(), "SIGTERM leaves XDP attached");
    let gap = s.short_connections(40);
    assert_eq!(gap.get("b2"), Some(&40), "{gap:?}");
    for stream in streams {
        assert_eq!(stream.owner, "b2");
        stream.finish();
    }

    // The next daemon takes over and keeps the operator's overrides (saved
    // beside the control socket): a drained or pinned replica stays so.
    let daemon = s.start();
    assert_eq!(
        datapath_weights(&s.status()),
        BTreeMap::from([("b0".into(), 0), ("b1".into(), 0), ("b2".into(), 100)])
    );
    let gap = s.short_connections(20);
    assert_eq!(gap.get("b2"), Some(&20), "overrides kept: {gap:?}");
    cli(&s.socket(), &["weight", "auto", "llama", "b0"]).unwrap();
    cli(&s.socket(), &["weight", "auto", "llama", "b1"]).unwrap();
    assert_eq!(
        datapath_weights(&s.status()),
        BTreeMap::from([("b0".into(), 100), ("b1".into(), 100), ("b2".into(), 100)])
    );
    let counts = s.short_connections(60);
    assert_eq!(counts.len(), BACKENDS, "{counts:?}");
    assert!(daemon.stop(Duration::from_secs(10)).unwrap().success());
    let (ok, out) = s.cleanup();
    assert!(ok, "{out}");
}

#[test]
fn cleanup_detaches_and_removes_every_pin() {
    let s = Setup::new("restart-clean");
    s.write_config(&[100, 100, 100], "");
    let daemon = s.start();
    let pinned = pinned_objects(&s.pins.pin_path()).unwrap();
    for want in [
        "prog",
        "links/lb0",
        "maps/CONNS",
        "maps/SERVICES",
        "maps/BACKENDS",
        "maps/MAGLEV_TABLES",
        "maps/ADDR_FILTER",
        "maps/FIB_GEN",
        "maps/SERVICE_STATS",
        "maps/BACKEND_STATS",
        "maps/REASONS",
    ] {
        assert!(pinned.iter().any(|p| p == want), "{want} in {pinned:?}");
    }
    assert!(
        !pinned
            .iter()
            .any(|p| p.contains("rodata") || p.contains("AYA")),
        "load-time globals and the log ring are not pinned: {pinned:?}"
    );

    let (ok, out) = s.cleanup();
    assert!(!ok, "cleanup must refuse while a daemon runs");
    assert!(out.contains("answers on"), "{out}");
    assert!(s.xdp_attached());

    assert!(daemon.stop(Duration::from_secs(10)).unwrap().success());
    assert!(s.xdp_attached());
    // Something this daemon does not pin (another program's directory, or a
    // mistyped pin_path): refused before anything is detached or removed.
    let before = pinned_objects(&s.pins.pin_path()).unwrap();
    let foreign = s.pins.pin_path().join("other-tool");
    std::fs::create_dir(&foreign).unwrap();
    let (ok, out) = s.cleanup();
    assert!(!ok, "{out}");
    assert!(
        out.contains("other-tool") && out.contains("nothing was removed"),
        "{out}"
    );
    assert!(s.xdp_attached(), "nothing detached");
    assert_eq!(pinned_objects(&s.pins.pin_path()).unwrap(), before);
    std::fs::remove_dir(&foreign).unwrap();
    let (ok, out) = s.cleanup();
    assert!(ok, "{out}");
    assert!(out.contains("detached from lb0"), "{out}");
    assert!(!s.pins.pin_path().exists(), "pin directory removed");
    assert!(!s.xdp_attached(), "cleanup detaches at once");
    assert!(
        vip_unreachable(&s),
        "new connections are no longer balanced"
    );

    let (ok, out) = s.cleanup();
    assert!(ok && out.contains("nothing pinned"), "{out}");
}

#[test]
fn a_restart_with_new_weights_applies_them_and_keeps_established_flows() {
    let s = Setup::new("restart-weights");
    s.write_config(&[100, 100, 100], "");
    let daemon = s.start();
    let streams = s.open_streams(30, 8);
    assert!(streams.iter().any(|st| st.owner != "b2"));
    drop(daemon);

    // New weights, and a new idle timeout: a restart loads a new program
    // (its own load-time globals) over the same maps.
    s.write_config(&[0, 0, 100], "tcp_idle_timeout = \"20m\"\n");
    let daemon = s.start();
    assert_eq!(
        datapath_weights(&s.status()),
        BTreeMap::from([("b0".into(), 0), ("b1".into(), 0), ("b2".into(), 100)])
    );
    let counts = s.short_connections(60);
    assert_eq!(counts.get("b2"), Some(&60), "{counts:?}");
    for stream in streams {
        stream.finish();
    }
    drop(daemon);
    let (ok, out) = s.cleanup();
    assert!(ok, "{out}");
}

#[test]
fn a_restart_that_would_recreate_a_map_is_refused_and_changes_nothing() {
    let s = Setup::new("restart-size");
    s.write_config(&[100, 0, 0], "");
    let daemon = s.start();
    assert!(daemon.stop(Duration::from_secs(10)).unwrap().success());
    let pinned = pinned_objects(&s.pins.pin_path()).unwrap();

    for (extra, map, key) in [
        (
            "conn_table_size = 524288\n",
            "CONNS",
            "daemon.conn_table_size",
        ),
        ("", "MAGLEV_TABLES", "daemon.table_size"),
    ] {
        let weights = [100, 0, 0];
        s.write_config(&weights, extra);
        if extra.is_empty() {
            let text = std::fs::read_to_string(s.config_path())
                .unwrap()
                .replace("table_size = 65537", "table_size = 65521");
            std::fs::write(s.config_path(), text).unwrap();
        }
        let (ok, stderr) = s.run_daemon_once();
        assert!(!ok, "{map}: a layout change must stop the daemon");
        let error: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(error.len(), 1, "one error line: {stderr}");
        for want in [map, "max_entries", key, "router daemon --cleanup"] {
            assert!(
                error[0].contains(want),
                "{map}: lacks {want:?}: {}",
                error[0]
            );
        }
        assert_eq!(
            pinned_objects(&s.pins.pin_path()).unwrap(),
            pinned,
            "nothing pinned changed"
        );
        assert!(s.xdp_attached());
        let counts = s.short_connections(10);
        assert_eq!(counts.get("b0"), Some(&10), "still forwarding: {counts:?}");
        assert!(!s.socket().exists(), "no control socket left behind");
    }

    // The original sizes adopt the pins again.
    s.write_config(&[100, 0, 0], "");
    let daemon = s.start();
    assert!(new_conns(&s.status()) >= 20);
    drop(daemon);
    let (ok, out) = s.cleanup();
    assert!(ok, "{out}");
}

#[test]
fn a_pin_path_off_bpffs_is_refused_before_anything_is_attached() {
    let s = Setup::new("restart-nobpffs");
    s.write_config(&[100, 100, 100], "");
    let bad = s.dir.0.join("pins");
    let out = Command::new("ip")
        .args(["netns", "exec", s.topo.lb_ns()])
        .arg(router_binary().unwrap())
        .args(["daemon", "--config"])
        .arg(s.config_path())
        .arg("--pin-path")
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("not on a BPF filesystem") && stderr.contains(&*bad.to_string_lossy()),
        "{stderr}"
    );
    assert!(!s.xdp_attached());
    assert!(!Path::new(&bad).exists());
}

/// A host without a BPF filesystem where `pin_path` wants one (here: an
/// empty directory standing in for an unmounted `/sys/fs/bpf`): the daemon
/// mounts one at `pin_path`'s parent, says so, and serves. Under `ip netns
/// exec` the mount is the command's own, so the daemon also warns that the
/// datapath goes with it, and it does: after the daemon exits nothing is
/// attached, and the test's own view of the directory never changed.
#[test]
fn a_missing_bpf_filesystem_is_mounted_at_an_empty_parent() {
    let s = Setup::new("restart-mountbpf");
    s.write_config(&[100, 100, 100], "");
    let parent = s.dir.0.join("bpf");
    std::fs::create_dir(&parent).unwrap();
    let log = s.dir.0.join("daemon.log");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", s.topo.lb_ns()])
        .arg(router_binary().unwrap())
        .args(["daemon", "--config"])
        .arg(s.config_path())
        .arg("--pin-path")
        .arg(parent.join("router"))
        .stdin(std::process::Stdio::null());
    log_output_to(&mut cmd, &log).unwrap();
    let daemon = netns::spawn_command(cmd).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while cli(&s.socket(), &["status", "--json"]).is_err() {
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            Instant::now() < deadline,
            "the daemon never answered: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(s.xdp_attached());
    assert_eq!(s.short_connections(12).values().sum::<usize>(), 12);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("mounted one at {}", parent.display())),
        "{text}"
    );
    assert!(text.contains("restarts are not hitless"), "{text}");
    assert!(daemon.stop(Duration::from_secs(10)).unwrap().success());
    let gone = Instant::now() + Duration::from_secs(10);
    while s.xdp_attached() {
        assert!(
            Instant::now() < gone,
            "the datapath outlived its namespace's bpffs"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(std::fs::read_dir(&parent).unwrap().count(), 0);
}

#[test]
fn a_datapath_pinned_in_another_layout_is_refused_with_one_line() {
    use aya::maps::{Array, MapData};

    let s = Setup::new("restart-layout");
    s.write_config(&[100, 0, 0], "");
    let daemon = s.start();
    assert!(daemon.stop(Duration::from_secs(10)).unwrap().success());
    let layout = s.pins.pin_path().join("maps").join("LAYOUT");
    let secret = || {
        let m = Array::<MapData, u32>::try_from(aya::maps::Map::Array(
            MapData::from_pin(s.pins.pin_path().join("maps").join("FLOW_HASH_KEY")).unwrap(),
        ))
        .unwrap();
        [m.get(&0, 0).unwrap(), m.get(&1, 0).unwrap()]
    };
    let first_secret = secret();
    assert_ne!(first_secret, [0, 0], "a flow-hash secret was drawn");
    let stamp = |v: u32| {
        let _ = std::fs::remove_file(&layout);
        let mut m = Array::<MapData, u32>::create(1, 0).unwrap();
        m.set(0, v, 0).unwrap();
        m.pin(&layout).unwrap();
    };
    // Every map still fits by size: only the stamp tells the layouts apart.
    let older = router_common::LAYOUT_VERSION - 1;
    for (what, want) in [
        (Some(older), format!("map layout is {older}, this one's is")),
        (None, "older than layout stamps".to_string()),
    ] {
        match what {
            Some(v) => stamp(v),
            None => std::fs::remove_file(&layout).unwrap(),
        }
        let pinned = pinned_objects(&s.pins.pin_path()).unwrap();
        let (ok, stderr) = s.run_daemon_once();
        assert!(!ok, "{what:?}: a foreign layout must stop the daemon");
        let error: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(error.len(), 1, "one error line: {stderr}");
        for w in [want.as_str(), "router daemon --cleanup"] {
            assert!(error[0].contains(w), "lacks {w:?}: {}", error[0]);
        }
        assert_eq!(
            pinned_objects(&s.pins.pin_path()).unwrap(),
            pinned,
            "nothing pinned changed"
        );
        assert_eq!(
            s.short_connections(10).get("b0"),
            Some(&10),
            "still forwarding"
        );
    }
    // This version's stamp adopts the pins again, and with them the
    // secret: every flow hashes as before the restart.
    stamp(router_common::LAYOUT_VERSION);
    let daemon = s.start();
    assert!(new_conns(&s.status()) >= 20);
    assert_eq!(
        secret(),
        first_secret,
        "the restart kept the flow-hash secret"
    );
    drop(daemon);
    let (ok, out) = s.cleanup();
    assert!(ok, "{out}");
}

#[test]
fn an_upgrade_that_adds_drops_or_changes_maps() {
    use aya::maps::{Array, MapData};

    let s = Setup::new("restart-upgrade");
    s.write_config(&[100, 0, 0], "");
    let daemon = s.start();
    let streams = s.open_streams(5, 8);
    assert!(daemon.stop(Duration::from_secs(10)).unwrap().success());
    let maps = s.pins.pin_path().join("maps");

    // A map whose layout the new program does not expect: refused, and the
    // running datapath is left alone.
    std::fs::remove_file(maps.join("FIB_GEN")).unwrap();
    Array::<MapData, u64>::create(1, 0)
        .unwrap()
        .pin(maps.join("FIB_GEN"))
        .unwrap();
    let (ok, stderr) = s.run_daemon_once();
    assert!(!ok);
    for want in [
        "FIB_GEN",
        "value_size 8 pinned, 4 wanted",
        "map layout changed",
    ] {
        assert!(stderr.contains(want), "lacks {want:?}: {stderr}");
    }
    assert_eq!(s.short_connections(10).get("b0"), Some(&10));

    // A map the old version did not have is created; one the new version
    // no longer declares is removed.
    std::fs::remove_file(maps.join("FIB_GEN")).unwrap();
    std::fs::remove_file(maps.join("REASONS")).unwrap();
    Array::<MapData, u32>::create(1, 0)
        .unwrap()
        .pin(maps.join("RETIRED"))
        .unwrap();
    let daemon = s.start();
    let pinned = pinned_objects(&s.pins.pin_path()).unwrap();
    assert!(pinned.contains(&"maps/REASONS".to_string()), "{pinned:?}");
    assert!(pinned.contains(&"maps/FIB_GEN".to_string()), "{pinned:?}");
    assert!(!pinned.contains(&"maps/RETIRED".to_string()), "{pinned:?}");
    assert_eq!(s.short_connections(10).get("b0"), Some(&10));
    for stream in streams {
        stream.finish();
    }
    drop(daemon);
    let (ok, out) = s.cleanup();
    assert!(ok, "{out}");
}

#[test]
fn a_restart_detaches_interfaces_dropped_from_the_config() {
    let s = Setup::new("restart-ifaces");
    // A dotted name, as VLAN interfaces have: bpffs allows no dot in a pin.
    let extra = "d0.5";
    netns::exec(
        s.topo.lb_ns(),
        &[
            "ip", "link", "add", extra, "type", "veth", "peer", "name", "d0p",
        ],
    )
    .unwrap();
    let xdp_on = |iface: &str| {
        netns::exec(s.topo.lb_ns(), &["ip", "link", "show", iface])
            .unwrap()
            .contains("xdp")
    };
    s.write_config(&[100, 100, 100], "");
    let two = std::fs::read_to_string(s.config_path()).unwrap().replace(
        &format!("interface = \"{}\"", s.topo.lb_if()),
        &format!("interface = [\"{}\", \"{extra}\"]", s.topo.lb_if()),
    );
    std::fs::write(s.config_path(), two).unwrap();
    let daemon = s.start();
    assert!(xdp_on(extra) && s.xdp_attached());
    let pinned = pinned_objects(&s.pins.pin_path()).unwrap();
    assert!(pinned.contains(&"links/d0%2E5".to_string()), "{pinned:?}");
    drop(daemon);

    s.write_config(&[100, 100, 100], "");
    let daemon = s.start();
    assert!(!xdp_on(extra), "dropped from the config: detached");
    assert!(s.xdp_attached());
    let pinned = pinned_objects(&s.pins.pin_path()).unwrap();
    assert!(
        !pinned.iter().any(|p| p.starts_with("links/d0")),
        "{pinned:?}"
    );
    assert_eq!(s.status().datapath.interfaces, [s.topo.lb_if()]);
    drop(daemon);
    let (ok, out) = s.cleanup();
    assert!(ok, "{out}");
}

#[test]
fn a_drain_survives_kill_9_and_a_corrupt_override_file_is_refused() {
    let s = Setup::new("restart-drain");
    s.write_config(&[100, 100, 100], "");
    let daemon = s.start();
    cli(&s.socket(), &["drain", "llama", "b1"]).unwrap();
    drop(daemon); // kill -9
    let daemon = s.start();
    let st = s.status();
    let b1 = st.policy.iter().find(|p| p.backend == "b1").unwrap();
    assert_eq!((b1.mode.as_str(), b1.weight), ("drain", 0));
    let counts = s.short_connections(30);
    assert!(
        !counts.contains_key("b1"),
        "a drained replica stays drained: {counts:?}"
    );
    drop(daemon);

    // A corrupt file is not silently forgotten: that would undrain b1.
    let saved = s.socket().with_file_name("router.sock.overrides.json");
    std::fs::write(&saved, b"{ truncated").unwrap();
    let (ok, out) = s.run_daemon_once();
    assert!(!ok, "the daemon must refuse to start");
    assert!(out.contains("overrides are corrupt"), "{out}");
    assert!(
        !s.short_connections(20).contains_key("b1"),
        "the datapath still forwards on the last weights"
    );
    std::fs::remove_file(&saved).unwrap();
    let (ok, out) = s.cleanup();
    assert!(ok, "{out}");
}

#[test]
fn health_checked_backends_stay_routable_across_a_restart_until_their_first_probe() {
    let s = Setup::new("restart-health");
    s.write_config(&[100, 100, 100], "");
    // Every probe takes 8 s (a streamed answer read to its end), so the new
    // daemon's first probe round is still running while it is checked;
    // the daemon's count of finished probes shows that it was.
    let health = "health = { http_path = \"/stream?seconds=8&interval_ms=1000\", \
                  interval = \"20s\", timeout = \"12s\" }\n";
    let text = std::fs::read_to_string(s.config_path())
        .unwrap()
        .replace("weight = 100\n", &format!("weight = 100\n{health}"));
    std::fs::write(s.config_path(), text).unwrap();
    let daemon = s.start();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while datapath_weights(&s.status()).values().any(|w| *w == 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "backends never became healthy: {:?}",
            datapath_weights(&s.status())
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    drop(daemon);
    let daemon = s.start();
    let st = s.status();
    assert!(
        datapath_weights(&st).values().all(|w| *w > 0),
        "before its first probe, the new daemon keeps the adopted routes: {:?}",
        datapath_weights(&st)
    );
    let answers = s.short_connections(30);
    assert_eq!(answers.values().sum::<usize>(), 30);
    let reasons: BTreeMap<_, _> = s.status().datapath.reasons.into_iter().collect();
    assert_eq!(
        reasons["drop_no_backend"], 0,
        "no SYN found the service without a backend"
    );
    assert_eq!(
        s.status().health_probes_done,
        0,
        "the new daemon's first probes finished before the checks above, \
         which then showed nothing about routes kept until them"
    );
    drop(daemon);
    let (ok, out) = s.cleanup();
    assert!(ok, "{out}");
}

/// `router backends --json`, decoded.
fn backend_views(s: &Setup) -> Vec<router::api::views::BackendView> {
    serde_json::from_str(&cli(&s.socket(), &["backends", "--json"]).unwrap()).unwrap()
}

/// The in-flight counts live in pinned maps: a daemon killed with -9
/// leaves them counting, the datapath keeps counting while no daemon runs,
/// and the next daemon's table scan brings them to exactly what the tables
/// hold (here: uncounting spoofed handshakes that expired in the gap).
#[test]
fn in_flight_counts_survive_kill_9_and_equal_the_table_scan_after_the_restart() {
    let s = Setup::new("restart-in-flight");
    s.write_config(&[100, 100, 100], "tcp_closing_timeout = \"5s\"\n");
    let text = std::fs::read_to_string(s.config_path()).unwrap();
    std::fs::write(
        s.config_path(),
        text.replace(
            "protocol = \"tcp\"\n",
            "protocol = \"tcp\"\nselection = \"least_loaded\"\n",
        ),
    )
    .unwrap();
    let daemon = s.start();
    let streams = s.open_streams(30, 20);
    let per_owner = |streams: &[Stream]| {
        let mut m: BTreeMap<String, u64> = BTreeMap::new();
        for st in streams {
            *m.entry(st.owner.clone()).or_default() += 1;
        }
        m
    };
    let owners = per_owner(&streams);
    assert_eq!(
        owners.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "least-loaded spreads 30 streams evenly over equal weights: {owners:?}"
    );
    let in_flight = |s: &Setup| -> BTreeMap<String, u64> {
        backend_views(s)
            .into_iter()
            .map(|b| (b.name, b.in_flight))
            .collect()
    };
    assert_eq!(in_flight(&s), owners);

    drop(daemon); // kill -9
    // In the gap: short connections start and end, and spoofed handshakes
    // start and never finish (their SYN-ACKs go nowhere).
    let gap = s.short_connections(20);
    assert_eq!(gap.values().sum::<usize>(), 20);
    let lb_mac = netns::mac_address(s.topo.lb_ns(), s.topo.lb_if()).unwrap();
    let client_mac = netns::mac_address(s.topo.client_ns(), s.topo.client_if()).unwrap();
    let sender =
        router_testkit::raw_sender::RawSender::open(s.topo.client_ns(), s.topo.client_if())
            .unwrap();
    let template = router_testkit::packet::Packet::tcp(
        "198.19.0.1:1024".parse().unwrap(),
        VIP.parse().unwrap(),
        router_testkit::packet::TCP_SYN,
    )
    .with_macs(lb_mac, client_mac)
    .build();
    let mut buf = vec![0u8; template.len()];
    for i in 0..60u64 {
        let n = router_testkit::packet::spoofed_syn(&template, i, &mut buf);
        sender.send(&buf[..n]).unwrap();
    }

    let daemon = s.start();
    let counted: u64 = in_flight(&s).values().sum();
    assert_eq!(
        counted,
        90,
        "the counts carried on without a daemon: 30 streams and 60 open handshakes; reasons {:?}",
        s.status().datapath.reasons
    );
    // The handshakes expire after the closing timeout; the next scans
    // uncount them.
    let deadline = std::time::Instant::now() + Duration::from_secs(14);
    let views = loop {
        let views = backend_views(&s);
        let settled = views
            .iter()
            .all(|b| b.active_connections == Some(b.in_flight) && b.in_flight == 10);
        if settled || std::time::Instant::now() > deadline {
            break views;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for b in &views {
        assert_eq!(
            (b.in_flight, b.active_connections),
            (10, Some(10)),
            "{}: in flight against the table scan",
            b.name
        );
    }
    let leaked: u64 = views.iter().map(|b| b.in_flight_corrections.leaked).sum();
    assert_eq!(leaked, 60, "exactly the expired handshakes were uncounted");
    for stream in streams {
        stream.finish();
    }
    drop(daemon);
    let (ok, out) = s.cleanup();
    assert!(ok, "{out}");
}
