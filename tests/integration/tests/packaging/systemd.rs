//! The systemd units: our own parse, what XDP attach and bpffs pins need,
//! command lines the binary accepts, and `systemd-analyze verify`.

use std::{collections::BTreeSet, os::unix::fs::PermissionsExt, path::Path, process::Command};

use router::config::{Config, DEFAULT_CONTROL_SOCKET, DEFAULT_PIN_PATH, TelemetryConfig};
use router_testkit::daemon_proc::{ScratchDir, router_binary};

use super::read;

const DAEMON_UNIT: &str = "packaging/systemd/router.service";
const AGENT_UNIT: &str = "packaging/systemd/router-agent.service";
const INSTALLED_BINARY: &str = "/usr/local/bin/router";

/// A unit file as sections of `Key=Value` lines, in order.
struct Unit {
    name: String,
    sections: Vec<(String, Vec<(String, String)>)>,
}

impl Unit {
    /// Accepts only what the shipped units use: blank lines, `#`/`;`
    /// comments, `[Unit]`/`[Service]`/`[Install]` once each, and
    /// single-line `Key=Value` assignments inside a section.
    fn parse(name: &str, text: &str) -> Result<Unit, String> {
        let mut sections: Vec<(String, Vec<(String, String)>)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let at = format!("{name}:{}", n + 1);
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
                continue;
            }
            if let Some(section) = t.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
                if !["Unit", "Service", "Install"].contains(&section) {
                    return Err(format!("{at}: unexpected section [{section}]"));
                }
                if sections.iter().any(|(s, _)| s == section) {
                    return Err(format!("{at}: section [{section}] repeated"));
                }
                sections.push((section.to_owned(), Vec::new()));
                continue;
            }
            let Some((key, value)) = t.split_once('=') else {
                return Err(format!(
                    "{at}: neither a comment, a [Section] nor Key=Value: {line:?}"
                ));
            };
            let key = key.trim();
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(format!("{at}: {key:?} is not a unit key"));
            }
            if value.ends_with('\\') {
                return Err(format!("{at}: continuation lines are not used here"));
            }
            let Some((_, entries)) = sections.last_mut() else {
                return Err(format!("{at}: {key}= before any [Section]"));
            };
            entries.push((key.to_owned(), value.trim().to_owned()));
        }
        Ok(Unit {
            name: name.to_owned(),
            sections,
        })
    }

    fn load(rel: &str) -> Unit {
        Unit::parse(rel, &read(rel)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Every value assigned to `key` in `section`, in order.
    fn values(&self, section: &str, key: &str) -> Vec<&str> {
        self.sections
            .iter()
            .filter(|(s, _)| s == section)
            .flat_map(|(_, entries)| entries.iter())
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The one value of a key that must be set exactly once.
    #[track_caller]
    fn one(&self, section: &str, key: &str) -> &str {
        match self.values(section, key).as_slice() {
            [v] => v,
            other => panic!(
                "{}: [{section}] {key}= set {} times",
                self.name,
                other.len()
            ),
        }
    }

    /// Whitespace-separated words over every assignment of a list key.
    fn words(&self, section: &str, key: &str) -> BTreeSet<&str> {
        self.values(section, key)
            .into_iter()
            .flat_map(str::split_whitespace)
            .collect()
    }

    fn is_yes(&self, key: &str) -> bool {
        self.values("Service", key)
            .last()
            .is_some_and(|v| ["yes", "true", "1", "on"].contains(v))
    }

    /// `ExecStart=` split into words (the units quote nothing).
    fn exec_start(&self) -> Vec<&str> {
        self.one("Service", "ExecStart")
            .split_whitespace()
            .collect()
    }
}

/// The value following `flag` in a command line.
#[track_caller]
fn flag_value<'a>(argv: &[&'a str], flag: &str) -> &'a str {
    let i = argv
        .iter()
        .position(|a| *a == flag)
        .unwrap_or_else(|| panic!("{flag} missing from {argv:?}"));
    argv.get(i + 1)
        .unwrap_or_else(|| panic!("{flag} has no value in {argv:?}"))
}

/// What every unit needs, daemon or agent.
fn check_common(u: &Unit) {
    assert!(!u.one("Unit", "Description").is_empty(), "{}", u.name);
    assert_eq!(u.one("Service", "Type"), "simple", "{}", u.name);
    assert_eq!(u.one("Service", "Restart"), "on-failure", "{}", u.name);
    assert_eq!(
        u.one("Install", "WantedBy"),
        "multi-user.target",
        "{}",
        u.name
    );
    assert_eq!(u.exec_start()[0], INSTALLED_BINARY, "{}", u.name);
    for key in ["NoNewPrivileges", "ProtectHome", "PrivateTmp"] {
        assert!(u.is_yes(key), "{}: {key}=yes missing", u.name);
    }
    assert_eq!(u.one("Service", "ProtectSystem"), "strict", "{}", u.name);
}

#[test]
fn unit_parser_rejects_what_is_not_a_unit_line() {
    let ok = "# c\n; c\n\n[Unit]\nDescription=x y\n[Service]\nExecStart=/bin/true\n";
    let u = Unit::parse("t", ok).unwrap();
    assert_eq!(u.one("Service", "ExecStart"), "/bin/true");
    for (bad, why) in [
        ("[Unit]\nDescription x\n", "neither a comment"),
        ("Description=x\n", "before any [Section]"),
        ("[Unit]\n[Unit]\n", "repeated"),
        ("[Timer]\n", "unexpected section"),
        ("[Unit]\nDescri ption=x\n", "not a unit key"),
        ("[Service]\nExecStart=/bin/true \\\n  --x\n", "continuation"),
    ] {
        let err = Unit::parse("t", bad).err().unwrap_or_default();
        assert!(err.contains(why), "{bad:?}: {err:?}");
    }
}

#[test]
fn daemon_unit_keeps_what_xdp_and_bpffs_need() {
    let u = Unit::load(DAEMON_UNIT);
    check_common(&u);
    assert_eq!(
        u.exec_start(),
        [
            INSTALLED_BINARY,
            "daemon",
            "--config",
            "/etc/router/router.toml"
        ]
    );
    let reload = u.one("Service", "ExecReload");
    assert!(reload.ends_with("kill -HUP $MAINPID"), "{reload}");

    // The control socket's default directory is the unit's runtime directory.
    let runtime = u.one("Service", "RuntimeDirectory");
    let socket_dir = Path::new(DEFAULT_CONTROL_SOCKET).parent().unwrap();
    assert_eq!(socket_dir, Path::new("/run").join(runtime));

    assert!(u.words("Unit", "RequiresMountsFor").contains("/sys/fs/bpf"));
    // "-": may be missing when the namespace is set up (see below).
    let writable: BTreeSet<&str> = u
        .words("Service", "ReadWritePaths")
        .into_iter()
        .map(|w| w.trim_start_matches('-'))
        .collect();
    assert!(
        writable.contains(socket_dir.to_str().unwrap()),
        "{writable:?}"
    );
    // ProtectKernelTunables= mounts /proc/sys and /sys/fs/bpf read-only, and
    // ReadWritePaths=/sys/fs/bpf does not undo it (systemd_unit.rs shows
    // both): the pin path itself, below /sys/fs/bpf, and the interfaces'
    // settings must be listed.
    assert!(u.is_yes("ProtectKernelTunables"));
    assert!(
        writable
            .iter()
            .any(|w| Path::new(DEFAULT_PIN_PATH).starts_with(w)
                && Path::new(w)
                    .strip_prefix("/sys/fs/bpf")
                    .is_ok_and(|r| !r.as_os_str().is_empty())),
        "the default pin path {DEFAULT_PIN_PATH} is not writable under ProtectKernelTunables=: \
         {writable:?}"
    );
    assert!(
        writable.contains("/proc/sys/net/ipv4/conf"),
        "the interface settings the daemon makes are read-only: {writable:?}"
    );
    // XDP attaches to the host's own interfaces with real capabilities.
    assert!(!u.is_yes("PrivateNetwork") && !u.is_yes("PrivateUsers"));

    // Its own user, given the unit's capabilities at start; the pin path
    // is handed to that user first, as root ("+"), by the binary itself.
    let user = u.one("Service", "User");
    assert_ne!(user, "root");
    assert_eq!(u.one("Service", "Group"), user);
    let sysusers = read("packaging/sysusers.d/router.conf");
    assert!(
        sysusers
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["u", user])),
        "packaging/sysusers.d/router.conf does not create {user}"
    );
    let caps = BTreeSet::from([
        "CAP_BPF",
        "CAP_NET_ADMIN",
        "CAP_PERFMON",
        "CAP_SYS_ADMIN",
        "CAP_DAC_READ_SEARCH",
    ]);
    assert_eq!(u.words("Service", "CapabilityBoundingSet"), caps);
    assert_eq!(u.words("Service", "AmbientCapabilities"), caps);
    let pre = u.one("Service", "ExecStartPre");
    let pre: Vec<&str> = pre
        .strip_prefix('+')
        .expect("ExecStartPre= runs as root: +")
        .split_whitespace()
        .collect();
    let start = u.exec_start();
    assert_eq!(
        pre[..pre.len() - 2],
        start[..],
        "ExecStartPre= prepares another config"
    );
    assert_eq!(pre[pre.len() - 2..], ["--prepare-for", user]);
    // RuntimeDirectory= is kept across stops: drains and the settings
    // record outlive the daemon (systemd_unit.rs restarts it).
    assert!(u.is_yes("RuntimeDirectoryPreserve"));
    // No device but the pseudo ones and NVIDIA's (NVML); not a private /dev,
    // which has no /dev/nvidia*.
    assert_eq!(u.one("Service", "DevicePolicy"), "closed");
    assert!(!u.is_yes("PrivateDevices"));
    assert!(
        u.values("Service", "DeviceAllow")
            .iter()
            .any(|d| d.starts_with("char-nvidia")),
    );
    let families = u.words("Service", "RestrictAddressFamilies");
    for family in ["AF_UNIX", "AF_INET", "AF_NETLINK"] {
        assert!(families.contains(family), "{family} missing: {families:?}");
    }
    // bpf() is in no syscall group but @privileged.
    let filter = u.words("Service", "SystemCallFilter");
    assert!(
        filter.is_empty() || filter.contains("bpf") || filter.contains("@privileged"),
        "SystemCallFilter= blocks bpf(): {filter:?}"
    );

    // Descriptors: the servers' caps and three sockets for each of
    // thousands of backends fit, where systemd's default 1024 would not.
    let servers = router::server::control::LIMITS.max_connections
        + router::server::metrics::LIMITS.max_connections;
    let nofile = nofile_limit(&u);
    assert!(
        nofile >= servers + 3 * 10_000,
        "LimitNOFILE={nofile} leaves too little beside {servers} server connections"
    );
}

/// `LimitNOFILE=`: one number, soft and hard alike.
#[track_caller]
fn nofile_limit(u: &Unit) -> usize {
    let v = u.one("Service", "LimitNOFILE");
    v.parse()
        .unwrap_or_else(|_| panic!("{}: LimitNOFILE={v} is not one number", u.name))
}

/// The `--listen` port of the agent unit, checked against the URLs of
/// examples/agents.toml, and its token against the examples' token_file.
#[test]
fn agent_unit_is_unprivileged_and_matches_the_agents_example() {
    let u = Unit::load(AGENT_UNIT);
    check_common(&u);
    let argv = u.exec_start();
    assert_eq!(argv[1], "agent", "{argv:?}");
    let listen: std::net::SocketAddr = flag_value(&argv, "--listen")
        .parse()
        .expect("--listen is an address:port");
    let token_file = flag_value(&argv, "--token-file");

    // The token reaches the dynamic user as a credential (%d is the
    // credentials directory): LoadCredential=<name>:<root's file>.
    let token_source = match token_file.strip_prefix("%d/") {
        Some(name) => {
            let cred = u.one("Service", "LoadCredential");
            let (id, path) = cred.split_once(':').expect("LoadCredential=ID:PATH");
            assert_eq!(id, name, "the credential ExecStart reads is not loaded");
            path.to_owned()
        }
        None => token_file.to_owned(),
    };
    assert_eq!(token_source, "/etc/router/agent.token");

    assert!(u.is_yes("DynamicUser"), "the agent runs as a dynamic user");
    let nofile = nofile_limit(&u);
    assert!(
        nofile >= router::agent::LIMITS.max_connections + 1024,
        "LimitNOFILE={nofile} is too close to the agent's connection cap"
    );
    assert_eq!(u.values("Service", "CapabilityBoundingSet"), [""]);
    // A private /dev has no /dev/nvidia*: NVML would find no GPU.
    assert!(!u.is_yes("PrivateDevices"));
    let devices = u.values("Service", "DeviceAllow");
    assert!(
        devices.iter().any(|d| d.starts_with("char-nvidia")),
        "{devices:?}"
    );

    let example = read("examples/agents.toml");
    let cfg = Config::parse(&example, "examples/agents.toml").expect("agents example parses");
    let agents: Vec<(&str, &Path)> = cfg
        .services
        .iter()
        .flat_map(|s| &s.backends)
        .filter_map(|b| match &b.telemetry {
            Some(TelemetryConfig::Agent {
                url, token_file, ..
            }) => Some((url.as_str(), token_file.as_path())),
            _ => None,
        })
        .collect();
    assert!(!agents.is_empty());
    for (url, token) in agents {
        assert!(
            url.ends_with(&format!(":{}", listen.port())),
            "{url} does not reach the agent unit's port {}",
            listen.port()
        );
        assert_eq!(token, Path::new(&token_source));
    }
    assert!(
        example.contains(&format!(
            "router agent --listen {listen} --token-file {token_source}"
        )),
        "examples/agents.toml shows another agent command line than the unit runs"
    );
}

/// The units' command lines, with paths made harmless (a config and a
/// token file that do not exist, a loopback listener), get past the CLI
/// parser and fail on the missing file: the flags are the binary's own.
#[test]
fn unit_command_lines_are_accepted_by_the_binary() {
    let bin = router_binary().unwrap();
    let dir = ScratchDir::new("packaging-argv").unwrap();
    let missing = dir.0.join("missing");

    let daemon = Unit::load(DAEMON_UNIT);
    let config = missing.join("router.toml");
    let harmless = |argv: &[&str]| -> Vec<String> {
        argv[1..]
            .iter()
            .map(|a| match *a {
                "/etc/router/router.toml" => config.display().to_string(),
                a => a.to_owned(),
            })
            .collect()
    };
    let args = harmless(&daemon.exec_start());
    let pre = daemon
        .one("Service", "ExecStartPre")
        .trim_start_matches('+');
    let pre_args = harmless(&pre.split_whitespace().collect::<Vec<_>>());

    let agent = Unit::load(AGENT_UNIT);
    let argv = agent.exec_start();
    let listen = flag_value(&argv, "--listen");
    let token_file = flag_value(&argv, "--token-file");
    let token = missing.join("agent.token");
    let agent_args: Vec<String> = argv[1..]
        .iter()
        .map(|a| match *a {
            a if a == listen => "127.0.0.1:0".to_owned(),
            a if a == token_file => token.display().to_string(),
            a => a.to_owned(),
        })
        .collect();

    for (args, path) in [
        (args, config.clone()),
        (pre_args, config),
        (agent_args, token),
    ] {
        let out = Command::new(&bin).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // clap exits 2 on a usage error; a run that got going fails with 1.
        assert_eq!(out.status.code(), Some(1), "router {args:?}: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()),
            "router {args:?} did not fail on {}: {stderr}",
            path.display()
        );
    }
}

/// `systemd-analyze verify` on both units, with the binary path pointed at
/// an executable (verify checks that it exists). Any warning about our
/// units fails the test: verify itself exits 0 on unknown keys.
#[test]
fn units_pass_systemd_analyze_verify() {
    let available = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        // A skip that CI would not see: there, a missing tool is a failure.
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is not installed and CI is set: the units cannot be verified \
             (install systemd)"
        );
        println!(
            "note: systemd-analyze is not installed; the units were checked by the other tests' parser only"
        );
        return;
    }
    let dir = ScratchDir::new("packaging-verify").unwrap();
    let stub = dir.0.join("router");
    std::fs::write(&stub, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut units = Vec::new();
    for rel in [DAEMON_UNIT, AGENT_UNIT] {
        let text = read(rel).replace(INSTALLED_BINARY, &stub.display().to_string());
        let path = dir.0.join(Path::new(rel).file_name().unwrap());
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("router.service") || l.contains("router-agent.service"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
    if !stderr.trim().is_empty() {
        println!("note: systemd-analyze verify, about other units:\n{stderr}");
    }
}
