//! The shipped unit, started by systemd: packaging/systemd/router.service
//! and packaging/sysusers.d/router.conf installed as docs/operations.md
//! says, `systemctl start router`, and the daemon checked from outside:
//! its user, capabilities, mounts and devices, traffic, root's CLI,
//! `router daemon --cleanup`. Then each hardening directive the unit
//! narrows or leaves out is changed in a drop-in, to show what breaks.
//!
//! No systemd runs as this machine's init, so each test boots one as PID 1
//! of namespaces of its own (see `container`). The unit is installed
//! unchanged; the test's drop-in only puts it in the test's LB network
//! namespace, sends its output to a file, and leaves out its default
//! dependencies (sysinit.target's units would set up the host).
//!
//! Needs systemd installed: without it the tests say so and pass, except
//! under CI, where that is a failure.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::{Duration, Instant},
};

use router_testkit::{
    daemon_proc::{cli, one_arm_config},
    fixtures::workspace_root,
    netns::{self, Topology},
};

#[path = "systemd_unit/container.rs"]
mod container;

use container::{Container, Install};

const VIP: &str = "198.18.100.1:8000";
const SOCKET: &str = "/run/router/router.sock";
const LOG: &str = "/run/router-test.log";
/// The unit's CapabilityBoundingSet=: CAP_DAC_READ_SEARCH (2),
/// CAP_NET_ADMIN (12), CAP_SYS_ADMIN (21), CAP_PERFMON (38), CAP_BPF (39).
const UNIT_BOUNDING: u64 = 1 << 2 | 1 << 12 | 1 << 21 | 1 << 38 | 1 << 39;
/// What map access may keep on some kernel: CAP_SYS_ADMIN, CAP_BPF.
const MAP_ACCESS: u64 = 1 << 21 | 1 << 39;

/// Whether systemd is here to boot; says why not otherwise.
fn have_systemd() -> bool {
    if container::systemd_binary().is_some() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "systemd is not installed and CI is set: the unit cannot be started (install systemd)"
    );
    println!("note: systemd is not installed; the unit was not started under systemd");
    false
}

/// A one-arm topology nobody prepared (the daemon has interface settings
/// to make), its fixture backends, and systemd with the unit installed.
struct Setup {
    // Dropped first: systemd and everything it runs go before the
    // namespaces they use.
    container: Container,
    _servers: Vec<netns::ChildGuard>,
    topo: Topology,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let topo = Topology::one_arm_unprepared(2).unwrap();
        let servers = topo.spawn_ready_fixture_backends(8000).unwrap();
        let backends = netns::fixture_backends(&[100, 100]);
        let config = one_arm_config(
            Path::new(SOCKET),
            topo.lb_if(),
            VIP,
            netns::LB_ADDR,
            &backends,
        );
        let drop_in = format!(
            "# The test's: its LB namespace, output to a file, no system units.\n\
             [Unit]\nDefaultDependencies=no\n\
             [Service]\nNetworkNamespacePath=/run/netns/{}\n\
             StandardOutput=append:{LOG}\nStandardError=inherit\n",
            topo.lb_ns()
        );
        let root = workspace_root();
        let unit = root.join("packaging/systemd/router.service");
        let sysusers = root.join("packaging/sysusers.d/router.conf");
        let container = Container::boot(
            tag,
            &Install {
                unit: &unit,
                sysusers: &sysusers,
                config: &config,
                drop_in: &drop_in,
            },
        )
        .unwrap();
        Setup {
            container,
            _servers: servers,
            topo,
        }
    }

    /// The daemon's log and the unit's journal, for failure messages.
    fn logs(&self) -> String {
        let log = std::fs::read_to_string(self.container.path(LOG)).unwrap_or_default();
        let journal = self
            .container
            .sh("journalctl --no-pager -q -u router")
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        format!("daemon log:\n{log}\njournal:\n{journal}")
    }

    /// Replaces the variant drop-in (none: `[Service]` lines, or nothing)
    /// and starts the unit. `Ok`: root's CLI got an answer; `Err`: the
    /// daemon failed (systemd is restarting it), with the logs.
    fn start(&self, variant: &[&str]) -> Result<(), String> {
        let dir = self.container.path("/etc/systemd/system/router.service.d");
        let mut text = String::from("[Service]\n");
        for line in variant {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(dir.join("variant.conf"), text).unwrap();
        std::fs::write(self.container.path(LOG), "").unwrap();
        self.container.run("systemctl daemon-reload").unwrap();
        if let Err(e) = self.container.run("systemctl start router") {
            return Err(format!("{e:#}\n{}", self.logs()));
        }
        let socket = self.container.path(SOCKET);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if cli(&socket, &["status", "--json"]).is_ok() {
                return Ok(());
            }
            let state = self
                .container
                .run("systemctl show -p ActiveState -p SubState --value router")
                .unwrap();
            if state.contains("auto-restart") || state.contains("failed") {
                return Err(self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "router.service neither answered nor failed within 30 s ({state}):\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the unit, then, as root, removes what the daemon pinned and
    /// gives back the interface settings (`router daemon --cleanup`).
    fn stop_and_clean_up(&self) -> String {
        self.container.run("systemctl stop router").unwrap();
        // Clears the start limit a failing variant used up; a unit that
        // stopped cleanly is no longer loaded and has nothing to clear.
        self.container.sh("systemctl reset-failed router").unwrap();
        self.container
            .run_in_netns(
                self.topo.lb_ns(),
                &["/usr/local/bin/router", "daemon", "--cleanup"],
            )
            .unwrap()
    }

    /// The daemon's pid on the host.
    fn daemon_pid(&self) -> u32 {
        let inner: u32 = self
            .container
            .run("systemctl show -p MainPID --value router")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_ne!(inner, 0, "router.service has no main process");
        self.container.host_pid(inner).unwrap()
    }

    fn sysctl(&self, key: &str) -> String {
        netns::exec(
            self.topo.lb_ns(),
            &["cat", &format!("/proc/sys/net/ipv4/conf/lb0/{key}")],
        )
        .unwrap()
        .trim()
        .to_owned()
    }

    fn answers(&self, n: usize) -> BTreeMap<String, usize> {
        netns::answers_per_backend(self.topo.client_ns(), VIP.parse().unwrap(), n).unwrap()
    }
}

/// `Key:` fields of /proc/PID/status.
fn proc_status(pid: u32) -> BTreeMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

fn mask(status: &BTreeMap<String, String>, key: &str) -> u64 {
    u64::from_str_radix(&status[key], 16).unwrap()
}

/// Each mount point of process `pid` and whether it is read-only; a path
/// mounted twice counts as its last (top) mount.
fn mount_modes(pid: u32) -> BTreeMap<String, bool> {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[4].to_owned(), f[5].split(',').any(|o| o == "ro"))
        })
        .collect()
}

/// Majors of the character devices whose name matches `prefix*` in
/// /proc/devices (what `DeviceAllow=char-<prefix>*` resolves to).
fn char_majors(prefix: &str) -> Vec<String> {
    let devices = std::fs::read_to_string("/proc/devices").unwrap();
    devices
        .lines()
        .skip_while(|l| !l.starts_with("Character devices"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.trim().split_once(' '))
        .filter(|(_, name)| name.starts_with(prefix))
        .map(|(major, _)| major.to_owned())
        .collect()
}

#[test]
fn the_unit_runs_the_daemon_as_its_own_user_under_systemd() {
    if !have_systemd() {
        return;
    }
    let s = Setup::new("unit");
    s.start(&[])
        .unwrap_or_else(|e| panic!("router.service did not start:\n{e}"));
    let pid = s.daemon_pid();

    // The user packaging/sysusers.d made, not root, with every capability
    // dropped once attached; the bounding set stays the unit's (the daemon
    // has no CAP_SETPCAP to shrink it), no_new_privs and the system-call
    // filter are on.
    let passwd = std::fs::read_to_string(s.container.path("/etc/passwd")).unwrap();
    let uid = passwd
        .lines()
        .find_map(|l| l.strip_prefix("router:x:"))
        .and_then(|rest| rest.split(':').next())
        .expect("systemd-sysusers created the router user")
        .to_owned();
    assert_ne!(uid, "0");
    let st = proc_status(pid);
    for ids in ["Uid", "Gid"] {
        assert!(
            st[ids].split_whitespace().all(|id| id == uid),
            "{ids}: {}",
            st[ids]
        );
    }
    for set in ["CapEff", "CapPrm"] {
        assert_eq!(mask(&st, set) & !MAP_ACCESS, 0, "{set}: {}", st[set]);
    }
    assert_eq!(mask(&st, "CapInh"), 0);
    assert_eq!(mask(&st, "CapAmb"), 0);
    assert_eq!(
        mask(&st, "CapBnd"),
        UNIT_BOUNDING,
        "CapBnd {}",
        st["CapBnd"]
    );
    assert_eq!(st["NoNewPrivs"], "1");
    assert_eq!(st["Seccomp"], "2", "SystemCallFilter= is in force");

    // Its one child, the neighbour helper, keeps CAP_NET_ADMIN and nothing
    // else, as the same user, and has given both backends' next hops
    // managed neighbour entries.
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let helpers: Vec<u32> = children
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(helpers.len(), 1, "children of the daemon: {children:?}");
    let helper = proc_status(helpers[0]);
    assert_eq!(helper["Name"], "router-neigh");
    assert!(helper["Uid"].split_whitespace().all(|id| id == uid));
    const CAP_NET_ADMIN: u64 = 1 << 12;
    for set in ["CapEff", "CapPrm"] {
        assert_eq!(mask(&helper, set), CAP_NET_ADMIN, "{set}: {}", helper[set]);
    }
    assert_eq!(mask(&helper, "CapAmb"), 0);
    assert_eq!(helper["NoNewPrivs"], "1");
    let neigh = netns::exec(s.topo.lb_ns(), &["ip", "neigh", "show", "nud", "all"]).unwrap();
    for i in 0..2 {
        let addr = format!("{} dev {} ", s.topo.backend_addr(i), s.topo.lb_if());
        assert!(
            neigh
                .lines()
                .any(|l| l.starts_with(&addr) && l.contains(" managed ")),
            "{addr}managed: {neigh}\n{}",
            s.logs()
        );
    }

    // ProtectKernelTunables= with the unit's ReadWritePaths=: /proc/sys and
    // /sys (with /sys/fs/bpf) read-only, the interface settings and the
    // pins writable; ProtectControlGroups=: cgroupfs read-only.
    let mounts = mount_modes(pid);
    for (path, read_only) in [
        ("/proc/sys", true),
        ("/proc/sys/net/ipv4/conf", false),
        ("/sys", true),
        ("/sys/fs/bpf", true),
        ("/sys/fs/bpf/router", false),
        ("/sys/fs/cgroup", true),
        ("/run/router", false),
    ] {
        assert_eq!(
            mounts.get(path),
            Some(&read_only),
            "{path} should be {} in the daemon's mount namespace: {mounts:?}",
            if read_only { "read-only" } else { "writable" }
        );
    }

    // DevicePolicy=closed (cgroup v1's device list; cgroup v2 enforces it
    // with a BPF program, which has no such file): the pseudo devices,
    // systemd's inaccessible nodes (0:0), and NVIDIA's and the RTC's majors
    // (DeviceAllow=char-nvidia*, ProtectClock=) when their drivers are here.
    match s
        .container
        .cgroup_file("devices", "router.service", "devices.list")
    {
        Some(list) => {
            let mut allowed: BTreeSet<String> = [
                "c 1:3", "c 1:5", "c 1:7", "c 1:8", "c 1:9", "c 5:0", "c 5:2", "c 136:*", "c 0:0",
                "b 0:0",
            ]
            .map(String::from)
            .into();
            for major in char_majors("nvidia").into_iter().chain(char_majors("rtc")) {
                allowed.insert(format!("c {major}:*"));
            }
            let list = std::fs::read_to_string(list).unwrap();
            for entry in list.lines() {
                let dev = entry.rsplit_once(' ').map_or(entry, |(d, _)| d);
                assert!(
                    allowed.contains(dev),
                    "{entry} is open to the daemon: {list}"
                );
            }
        }
        None => println!("note: no cgroup v1 device list here; DevicePolicy= was not inspected"),
    }

    // It attached and set the interface settings (CAP_NET_ADMIN through
    // the writable /proc/sys/net/ipv4/conf), balances, and answers root's
    // CLI on its user's 0600 socket.
    assert_eq!(s.sysctl("forwarding"), "1", "{}", s.logs());
    assert_eq!(s.sysctl("accept_local"), "1");
    let spread = s.answers(40);
    assert_eq!(spread.len(), 2, "{spread:?}");
    let socket = s.container.path(SOCKET);
    let status = cli(&socket, &["status"]).unwrap();
    assert!(status.contains("service llama"), "{status}");

    // RuntimeDirectoryPreserve=: an operator's drain outlives a restart.
    cli(&socket, &["weight", "set", "llama", "b0", "0"]).unwrap();
    s.container.run("systemctl restart router").unwrap();
    s.start(&[]).unwrap();
    let backends = cli(&socket, &["backends", "llama"]).unwrap();
    assert_eq!(s.answers(20).get("b1"), Some(&20), "{backends}");

    // Stopped, root's --cleanup reads what the daemon's user recorded and
    // gives the interface settings back, and removes the pins.
    let out = s.stop_and_clean_up();
    assert!(out.contains("detached from lb0"), "{out}");
    assert!(
        out.contains("restored net.ipv4.conf.lb0.forwarding to 0"),
        "{out}"
    );
    assert_eq!(s.sysctl("forwarding"), "0");
    assert!(!s.container.path("/sys/fs/bpf/router").exists());
}

/// Each directive the unit narrows, and the ones it leaves out, changed
/// in a drop-in: what the daemon then says, or what it would lose.
#[test]
fn each_narrowed_or_absent_directive_is_needed_as_the_unit_says() {
    if !have_systemd() {
        return;
    }
    let s = Setup::new("variants");
    let unit_caps = "CAP_BPF CAP_NET_ADMIN CAP_PERFMON CAP_SYS_ADMIN";
    let no_search = format!("AmbientCapabilities={unit_caps}");
    for (what, variant, says) in [
        (
            "ReadWritePaths=/sys/fs/bpf under ProtectKernelTunables=",
            vec![
                "ReadWritePaths=",
                "ReadWritePaths=/sys/fs/bpf /run/router /proc/sys/net/ipv4/conf",
            ],
            "is on a read-only mount",
        ),
        (
            "no CAP_DAC_READ_SEARCH",
            vec!["AmbientCapabilities=", no_search.as_str()],
            "is not searchable by it",
        ),
        (
            "no ExecStartPre=+ handing pin_path over",
            vec!["ExecStartPre="],
            "cannot create it in /sys/fs/bpf",
        ),
        (
            "PrivateUsers=yes",
            vec!["PrivateUsers=yes"],
            "Operation not permitted",
        ),
    ] {
        let err = s
            .start(&variant)
            .err()
            .unwrap_or_else(|| panic!("{what}: the daemon started"));
        assert!(err.contains(says), "{what}: {err}");
        let out = s.stop_and_clean_up();
        assert!(out.contains("nothing pinned"), "{what}: {out}");
        assert_eq!(s.sysctl("forwarding"), "0", "{what}: nothing was changed");
    }

    // Without /proc/sys/net/ipv4/conf writable the daemon starts, but cannot
    // make the interface settings NAT needs, and says so.
    s.start(&[
        "ReadWritePaths=",
        "ReadWritePaths=-/sys/fs/bpf/router /run/router",
    ])
    .unwrap();
    let logs = s.logs();
    assert!(
        logs.contains("could not set net.ipv4.conf.lb0.forwarding") && logs.contains("Read-only"),
        "{logs}"
    );
    assert_eq!(s.sysctl("forwarding"), "0");
    s.stop_and_clean_up();

    // PrivateDevices=yes: the daemon's /dev holds only pseudo devices, so a
    // GPU's /dev/nvidia* would be missing for NVML; DevicePolicy=closed
    // closes the rest without hiding those.
    s.start(&["PrivateDevices=yes"]).unwrap();
    let dev: BTreeSet<String> = std::fs::read_dir(format!("/proc/{}/root/dev", s.daemon_pid()))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let pseudo = [
        "char",
        "core",
        "fd",
        "full",
        "hugepages",
        "log",
        "mqueue",
        "null",
        "ptmx",
        "pts",
        "random",
        "shm",
        "stderr",
        "stdin",
        "stdout",
        "tty",
        "urandom",
        "zero",
    ];
    let others: Vec<&String> = dev
        .iter()
        .filter(|d| !pseudo.contains(&d.as_str()))
        .collect();
    assert!(others.is_empty(), "PrivateDevices=yes kept {others:?}");
    assert!(Path::new("/dev/kmsg").exists() && !dev.contains("kmsg"));
    s.stop_and_clean_up();
}
