//! The daemon drops every capability it does not need once its datapath is
//! attached, in every thread, and still writes maps: weight overrides and
//! reloads keep working.

use std::{collections::BTreeMap, time::Duration};

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
    let _servers = topo.spawn_ready_fixture_backends(8000).unwrap();
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

// The daemon as the unit runs it: its own user, not root, with the unit's
// capabilities handed over as ambient ones. `setpriv` stands in for
// systemd's User=, AmbientCapabilities=, CapabilityBoundingSet= and
// NoNewPrivileges= (systemd_unit.rs starts the unit itself under systemd).

/// The daemon's user here: an id no account holds, so the test needs no
/// entry in /etc/passwd (the unit's `router` user comes from
/// packaging/sysusers.d/router.conf).
const DAEMON_UID: u32 = 64_123;
/// What the unit grants: AmbientCapabilities= and CapabilityBoundingSet=.
const UNIT_CAPS: &str = "+bpf,+net_admin,+perfmon,+sys_admin,+dac_read_search";
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_NET_ADMIN: u32 = 12;
const CAP_PERFMON: u32 = 38;

fn assert_no_account(uid: u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let taken = passwd
        .lines()
        .any(|l| l.split(':').nth(2) == Some(&uid.to_string()));
    assert!(!taken, "uid {uid} belongs to an account here; pick another");
}

/// `setpriv` arguments that make the program it runs what systemd makes of
/// the unit's ExecStart=: uid and gid `uid`, no supplementary groups, `caps`
/// inheritable, ambient and bounding, no_new_privs.
fn as_unit_user(uid: u32, caps: &str) -> Vec<String> {
    let caps = if caps.is_empty() {
        "-all".to_string()
    } else {
        format!("-all,{caps}")
    };
    vec![
        "setpriv".into(),
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".into(),
        format!("--inh-caps={caps}"),
        format!("--ambient-caps={caps}"),
        format!("--bounding-set={caps}"),
        "--no-new-privs".into(),
    ]
}

/// `router ARGS` as root, as the unit's ExecStartPre=+ and an operator run
/// it; stdout, or an error with stderr.
fn router_as_root(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let bin = router_testkit::daemon_proc::router_binary()?;
    let mut argv = vec![bin.display().to_string()];
    argv.extend(args.iter().map(|a| a.to_string()));
    netns::exec(ns, &argv)
}

/// Starts `router daemon` in `ns` under `wrapper`, and waits until root's
/// CLI gets an answer on `socket`, or the daemon exits: then its stderr.
fn start_wrapped(
    ns: &str,
    wrapper: &[String],
    config: &std::path::Path,
    pin_path: &std::path::Path,
    socket: &std::path::Path,
) -> Result<netns::ChildGuard, String> {
    let bin = router_testkit::daemon_proc::router_binary().unwrap();
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .args(wrapper)
        .arg(&bin)
        .args(["daemon", "--config"])
        .arg(config)
        .arg("--pin-path")
        .arg(pin_path)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = netns::spawn_command(cmd).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().unwrap().is_some() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return Err(err);
        }
        if cli(socket, &["status", "--json"]).is_ok() {
            // Keep the log flowing: a full pipe would block the daemon.
            let mut stderr = child.stderr.take().unwrap();
            std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::stderr()));
            return Ok(child);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "router daemon did not answer on {} within 30 s",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sysctl(ns: &str, key: &str) -> String {
    netns::exec(ns, &["cat", &format!("/proc/sys/net/ipv4/conf/{key}")])
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn the_daemon_runs_as_its_own_user_with_ambient_capabilities() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_no_account(DAEMON_UID);
    // Unprepared: the daemon has interface settings to change, which as a
    // user other than root it may only through CAP_NET_ADMIN.
    let topo = Topology::one_arm_unprepared(2).unwrap();
    let lb = topo.lb_ns();
    let _servers = topo.spawn_ready_fixture_backends(8000).unwrap();
    // bpffs as systemd mounts /sys/fs/bpf: root's, mode 0700.
    let bpffs = router_testkit::bpffs::BpfFs::mount().unwrap();
    let pin_path = bpffs.pin_path();
    let bpffs_root = pin_path.parent().unwrap();
    std::fs::set_permissions(bpffs_root, std::fs::Permissions::from_mode(0o700)).unwrap();
    // The unit's RuntimeDirectory=: the daemon's own, mode 0700.
    let dir = ScratchDir::new("own-user").unwrap();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = dir.0.join("run");
    std::fs::create_dir(&run).unwrap();
    std::os::unix::fs::chown(&run, Some(DAEMON_UID), Some(DAEMON_UID)).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    let socket = run.join("router.sock");
    let config = dir.0.join("router.toml");
    std::fs::write(
        &config,
        one_arm_config(
            &socket,
            topo.lb_if(),
            VIP,
            netns::LB_ADDR,
            &backends(&[100, 100]),
        ),
    )
    .unwrap();
    let pin = pin_path.to_str().unwrap();
    let cfg = config.to_str().unwrap();

    // Before the pin directory is handed over the daemon cannot create it,
    // and says so; with it, but without CAP_DAC_READ_SEARCH, it cannot reach
    // it through the 0700 bpffs root. Neither attaches anything.
    let without = "+bpf,+net_admin,+perfmon,+sys_admin";
    for (caps, prepared, why) in [
        (UNIT_CAPS, false, "cannot create it in"),
        (without, true, "CAP_DAC_READ_SEARCH"),
    ] {
        if prepared {
            router_as_root(
                lb,
                &[
                    "daemon",
                    "--config",
                    cfg,
                    "--pin-path",
                    pin,
                    "--prepare-for",
                    &DAEMON_UID.to_string(),
                ],
            )
            .unwrap();
        }
        let err = start_wrapped(
            lb,
            &as_unit_user(DAEMON_UID, caps),
            &config,
            &pin_path,
            &socket,
        )
        .expect_err("the daemon started without what it needs");
        assert!(
            err.contains(&format!("uid {DAEMON_UID}")) && err.contains(why),
            "{caps}, prepared: {prepared}: {err}"
        );
        assert_eq!(sysctl(lb, "lb0/forwarding"), "0", "nothing was changed");
    }
    std::fs::remove_dir(&pin_path).unwrap();

    // ExecStartPre=+, as root: creates pin_path for the daemon's user.
    let out = router_as_root(
        lb,
        &[
            "daemon",
            "--config",
            cfg,
            "--pin-path",
            pin,
            "--prepare-for",
            &DAEMON_UID.to_string(),
        ],
    )
    .unwrap();
    assert!(out.contains("created"), "{out}");
    let meta = std::fs::metadata(&pin_path).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (DAEMON_UID, DAEMON_UID, 0o700)
    );

    let daemon = start_wrapped(
        lb,
        &as_unit_user(DAEMON_UID, UNIT_CAPS),
        &config,
        &pin_path,
        &socket,
    )
    .unwrap_or_else(|e| panic!("the daemon did not start as uid {DAEMON_UID}: {e}"));

    // Its own user in every thread, every capability it was given dropped
    // but what map access needs, none inheritable or ambient. Without
    // CAP_SETPCAP it cannot shrink its bounding set: that stays the unit's,
    // and with no_new_privs and no setuid root nothing raises it back.
    let unit_bounding = [
        CAP_BPF,
        CAP_SYS_ADMIN,
        CAP_NET_ADMIN,
        CAP_PERFMON,
        CAP_DAC_READ_SEARCH,
    ]
    .iter()
    .fold(0u64, |m, c| m | 1 << c);
    let allowed = (1u64 << CAP_BPF) | (1u64 << CAP_SYS_ADMIN);
    let threads = thread_status(daemon.id());
    assert!(threads.len() > 1, "the runtime's threads are checked too");
    let uid = DAEMON_UID.to_string();
    for t in &threads {
        for ids in ["Uid", "Gid"] {
            assert!(
                t[ids].split_whitespace().all(|id| id == uid),
                "thread {} {ids}: {}",
                t["Name"],
                t[ids]
            );
        }
        assert_eq!(t["Groups"], "", "thread {}", t["Name"]);
        for set in ["CapEff", "CapPrm"] {
            assert_eq!(
                mask(t, set) & !allowed,
                0,
                "thread {} {set} {}",
                t["Name"],
                t[set]
            );
        }
        assert_eq!(
            mask(t, "CapBnd") & !unit_bounding,
            0,
            "thread {}",
            t["Name"]
        );
        assert_eq!(mask(t, "CapInh"), 0, "thread {}", t["Name"]);
        assert_eq!(mask(t, "CapAmb"), 0, "thread {}", t["Name"]);
        assert_eq!(t["NoNewPrivs"], "1", "thread {}", t["Name"]);
    }

    // It attached, set the interface settings through CAP_NET_ADMIN, and
    // balances; root's CLI reaches its 0600 socket, and an override is
    // written to the state file beside it, as its user.
    assert_eq!(sysctl(lb, "lb0/forwarding"), "1");
    assert_eq!(sysctl(lb, "lb0/accept_local"), "1");
    let spread = answers(&topo, 40);
    assert!(
        spread.get("b0").is_some_and(|n| *n > 0) && spread.get("b1").is_some_and(|n| *n > 0),
        "{spread:?}"
    );
    cli(&socket, &["weight", "set", "llama", "b0", "0"]).unwrap();
    assert_eq!(answers(&topo, 20).get("b1"), Some(&20));
    let status = cli(&socket, &["status"]).unwrap();
    assert!(status.contains("llama"), "{status}");
    for entry in std::fs::read_dir(&run).unwrap() {
        let entry = entry.unwrap();
        assert_eq!(
            entry.metadata().unwrap().uid(),
            DAEMON_UID,
            "{:?}",
            entry.path()
        );
    }
    for entry in std::fs::read_dir(pin_path.join("maps")).unwrap() {
        let entry = entry.unwrap();
        assert_eq!(
            entry.metadata().unwrap().uid(),
            DAEMON_UID,
            "{:?}",
            entry.path()
        );
    }

    // Stopped, root's --cleanup reads the record the daemon's user wrote
    // and gives the interface settings back, and removes the pins.
    assert!(daemon.stop(Duration::from_secs(10)).unwrap().success());
    let out = router_as_root(
        lb,
        &[
            "--socket",
            socket.to_str().unwrap(),
            "daemon",
            "--cleanup",
            "--pin-path",
            pin,
        ],
    )
    .unwrap();
    assert!(out.contains("detached from lb0"), "{out}");
    assert!(
        out.contains("restored net.ipv4.conf.lb0.forwarding to 0"),
        "{out}"
    );
    assert_eq!(sysctl(lb, "lb0/forwarding"), "0");
    assert_eq!(sysctl(lb, "lb0/accept_local"), "0");
    assert!(!pin_path.exists());
}

/// Why the daemon has a user of its own: a uid 0 process that holds no
/// capability at all still writes kernel settings, whose checks are by
/// uid; the daemon's user cannot. `kernel.hostname` stands for them all (as
/// `kernel.core_pattern` would, and with it any program run as root) in a
/// UTS namespace of the test's own, so the host's name never changes.
#[test]
fn uid_0_without_capabilities_writes_kernel_settings_and_the_daemons_user_cannot() {
    assert_no_account(DAEMON_UID);
    for (uid, allowed) in [(0, true), (DAEMON_UID, false)] {
        let mut argv = vec!["--uts".to_string()];
        argv.extend(as_unit_user(uid, ""));
        argv.extend(
            ["sh", "-c", "echo router-test > /proc/sys/kernel/hostname && grep -E '^Cap(Eff|Prm)' /proc/self/status"]
                .map(String::from),
        );
        let out = std::process::Command::new("unshare")
            .args(&argv)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), allowed, "uid {uid}: {stdout}{stderr}");
        if allowed {
            for line in stdout.lines() {
                assert!(line.ends_with("0000000000000000"), "uid {uid} held {line}");
            }
        } else {
            assert!(stderr.contains("Permission denied"), "uid {uid}: {stderr}");
        }
    }
}

/// An upgrade: pins a daemon run as root left behind are root's, mode 0600,
/// closed to the daemon's user. `--prepare-for` (the unit's ExecStartPre=+)
/// hands them over, and the daemon running as its own user adopts them. A
/// pin_path holding anything the daemon does not pin changes hands not at all.
#[test]
fn pins_a_root_daemon_left_are_handed_to_the_daemons_user_and_adopted() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_no_account(DAEMON_UID);
    let topo = Topology::one_arm(2).unwrap();
    let lb = topo.lb_ns();
    let _servers = topo.spawn_ready_fixture_backends(8000).unwrap();
    let bpffs = router_testkit::bpffs::BpfFs::mount().unwrap();
    let pin_path = bpffs.pin_path();
    std::fs::set_permissions(
        pin_path.parent().unwrap(),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let dir = ScratchDir::new("handover").unwrap();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = dir.0.join("run");
    std::fs::create_dir(&run).unwrap();
    let socket = run.join("router.sock");
    let config = dir.0.join("router.toml");
    std::fs::write(
        &config,
        one_arm_config(
            &socket,
            topo.lb_if(),
            VIP,
            netns::LB_ADDR,
            &backends(&[100, 100]),
        ),
    )
    .unwrap();
    let (cfg, pin) = (config.to_str().unwrap(), pin_path.to_str().unwrap());

    let root_daemon =
        router_testkit::daemon_proc::start_daemon_pinned(lb, &config, &socket, &pin_path).unwrap();
    assert!(root_daemon.stop(Duration::from_secs(10)).unwrap().success());
    let owners = |path: &std::path::Path| -> Vec<u32> {
        let mut out = vec![std::fs::symlink_metadata(path).unwrap().uid()];
        for sub in ["maps", "links"] {
            for e in std::fs::read_dir(path.join(sub)).unwrap() {
                out.push(e.unwrap().metadata().unwrap().uid());
            }
        }
        out
    };
    assert!(owners(&pin_path).iter().all(|u| *u == 0));

    // systemd's RuntimeDirectory= gives the directory and what is in it to
    // the unit's user.
    for entry in std::fs::read_dir(&run).unwrap() {
        std::os::unix::fs::lchown(entry.unwrap().path(), Some(DAEMON_UID), Some(DAEMON_UID))
            .unwrap();
    }
    std::os::unix::fs::chown(&run, Some(DAEMON_UID), Some(DAEMON_UID)).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();

    let prepare = || {
        router_as_root(
            lb,
            &[
                "daemon",
                "--config",
                cfg,
                "--pin-path",
                pin,
                "--prepare-for",
                &DAEMON_UID.to_string(),
            ],
        )
    };
    // A pin_path that is a link is not followed: what it points at keeps
    // its owner.
    let elsewhere = pin_path.with_file_name("elsewhere");
    let linked = pin_path.with_file_name("linked");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &linked).unwrap();
    let err = format!(
        "{:#}",
        router_as_root(
            lb,
            &[
                "daemon",
                "--config",
                cfg,
                "--pin-path",
                linked.to_str().unwrap(),
                "--prepare-for",
                &DAEMON_UID.to_string(),
            ],
        )
        .unwrap_err()
    );
    assert!(err.contains("is not a directory"), "{err}");
    assert_eq!(std::fs::metadata(&elsewhere).unwrap().uid(), 0);
    std::fs::remove_file(&linked).unwrap();
    std::fs::remove_dir(&elsewhere).unwrap();

    let foreign = pin_path.join("other-tool");
    std::fs::create_dir(&foreign).unwrap();
    let err = format!("{:#}", prepare().unwrap_err());
    assert!(
        err.contains("other-tool") && err.contains("nothing was removed or changed"),
        "{err}"
    );
    assert!(
        owners(&pin_path).iter().all(|u| *u == 0),
        "nothing changed hands"
    );
    std::fs::remove_dir(&foreign).unwrap();

    let out = prepare().unwrap();
    assert!(out.contains("pinned objects"), "{out}");
    let handed = owners(&pin_path);
    assert!(
        handed.len() > 3 && handed.iter().all(|u| *u == DAEMON_UID),
        "{handed:?}"
    );

    let daemon = start_wrapped(
        lb,
        &as_unit_user(DAEMON_UID, UNIT_CAPS),
        &config,
        &pin_path,
        &socket,
    )
    .unwrap_or_else(|e| panic!("the daemon did not adopt the handed-over pins: {e}"));
    let st = router_testkit::daemon_proc::status(&socket).unwrap();
    assert!(st.datapath.services.len() == 1, "{st:?}");
    let spread = answers(&topo, 40);
    assert!(spread.len() == 2, "{spread:?}");
    assert!(daemon.stop(Duration::from_secs(10)).unwrap().success());
    let out = router_testkit::daemon_proc::cleanup_pins(&socket, &pin_path).unwrap();
    assert!(out.contains("detached from lb0"), "{out}");
}
