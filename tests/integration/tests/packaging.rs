//! What operators install from `packaging/`: the systemd units must be
//! well-formed (`systemd-analyze verify` where it exists, our own parse
//! always), keep what XDP attach and bpffs pins need, and run command lines
//! the `router` binary accepts; the Grafana dashboard must query only the
//! metric families the daemon exports, with their labels, counters through
//! `rate()`, and carry its datasource input and template variables.
//! File checks only: nothing here touches the kernel or the network.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use router::config::{Config, DEFAULT_CONTROL_SOCKET, DEFAULT_PIN_PATH, TelemetryConfig};
use router_testkit::{
    daemon_proc::{ScratchDir, router_binary},
    fixtures::workspace_root,
};
use serde_json::Value;

fn repo_file(rel: &str) -> PathBuf {
    workspace_root().join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

// ---------------------------------------------------------------------------
// systemd units

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
    let writable = u.words("Service", "ReadWritePaths");
    assert!(writable.contains("/sys/fs/bpf"), "{writable:?}");
    assert!(
        writable.contains(socket_dir.to_str().unwrap()),
        "{writable:?}"
    );
    assert!(
        writable
            .iter()
            .any(|w| Path::new(DEFAULT_PIN_PATH).starts_with(w)),
        "the default pin path {DEFAULT_PIN_PATH} is not writable: {writable:?}"
    );
    // Mounts /sys/fs/bpf read-only, and ReadWritePaths= does not undo it.
    assert!(!u.is_yes("ProtectKernelTunables"));
    // XDP attaches to the host's own interfaces with real capabilities.
    assert!(!u.is_yes("PrivateNetwork") && !u.is_yes("PrivateUsers"));

    assert_eq!(
        u.words("Service", "CapabilityBoundingSet"),
        BTreeSet::from(["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON", "CAP_SYS_ADMIN"])
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
    let servers = router::control::LIMITS.max_connections + router::metrics::LIMITS.max_connections;
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
    let args: Vec<String> = daemon.exec_start()[1..]
        .iter()
        .map(|a| match *a {
            "/etc/router/router.toml" => config.display().to_string(),
            a => a.to_owned(),
        })
        .collect();

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

    for (args, path) in [(args, config), (agent_args, token)] {
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

// ---------------------------------------------------------------------------
// Grafana dashboard

const DASHBOARD: &str = "packaging/grafana/router-dashboard.json";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

const BACKEND: &[&str] = &["service", "backend"];
const SERVICE: &[&str] = &["service"];
const GLOBAL: &[&str] = &[];

/// The families the daemon exports, as router-userspace/src/metrics.rs
/// defines them: prometheus-client (OpenMetrics) names counters `X_total`
/// and gives histograms `X_bucket{le}`, `X_sum` and `X_count` series.
/// Update this list with metrics.rs; `metric_list_matches_metrics_rs`
/// notices a family renamed or removed there.
const FAMILIES: &[(&str, Kind, &[&str])] = &[
    ("router_backend_packets_total", Kind::Counter, BACKEND),
    ("router_backend_bytes_total", Kind::Counter, BACKEND),
    (
        "router_backend_new_connections_total",
        Kind::Counter,
        BACKEND,
    ),
    (
        "router_backend_weight_changes_total",
        Kind::Counter,
        BACKEND,
    ),
    (
        "router_backend_telemetry_errors_total",
        Kind::Counter,
        BACKEND,
    ),
    ("router_service_packets_total", Kind::Counter, SERVICE),
    ("router_service_bytes_total", Kind::Counter, SERVICE),
    (
        "router_service_new_connections_total",
        Kind::Counter,
        SERVICE,
    ),
    (
        "router_service_fallback_connections_total",
        Kind::Counter,
        SERVICE,
    ),
    ("router_datapath_packets_total", Kind::Counter, &["reason"]),
    (
        "router_policy_all_saturated_ticks_total",
        Kind::Counter,
        GLOBAL,
    ),
    ("router_fallback_connections_total", Kind::Counter, GLOBAL),
    (
        "router_health_probe_local_errors_total",
        Kind::Counter,
        GLOBAL,
    ),
    (
        "router_metrics_connections_refused_total",
        Kind::Counter,
        GLOBAL,
    ),
    (
        "router_control_connections_refused_total",
        Kind::Counter,
        GLOBAL,
    ),
    ("router_backend_active_connections", Kind::Gauge, BACKEND),
    ("router_backend_in_flight", Kind::Gauge, BACKEND),
    ("router_backend_max_in_flight", Kind::Gauge, BACKEND),
    ("router_backend_flows_closed_total", Kind::Counter, BACKEND),
    (
        "router_backend_in_flight_leaked_corrections_total",
        Kind::Counter,
        BACKEND,
    ),
    (
        "router_backend_in_flight_overcount_corrections_total",
        Kind::Counter,
        BACKEND,
    ),
    (
        "router_backend_new_connections_per_second",
        Kind::Gauge,
        BACKEND,
    ),
    ("router_backend_weight", Kind::Gauge, BACKEND),
    ("router_backend_share_ratio", Kind::Gauge, BACKEND),
    (
        "router_backend_weight_reason",
        Kind::Gauge,
        &["service", "backend", "mode", "reason"],
    ),
    ("router_backend_draining", Kind::Gauge, BACKEND),
    ("router_backend_gpu_utilization_ratio", Kind::Gauge, BACKEND),
    ("router_backend_gpu_memory_used_bytes", Kind::Gauge, BACKEND),
    (
        "router_backend_gpu_memory_total_bytes",
        Kind::Gauge,
        BACKEND,
    ),
    ("router_backend_gpu_power_watts", Kind::Gauge, BACKEND),
    ("router_backend_gpu_throttled", Kind::Gauge, BACKEND),
    ("router_backend_gpu_throttle_reasons", Kind::Gauge, BACKEND),
    ("router_backend_kv_cache_usage_ratio", Kind::Gauge, BACKEND),
    ("router_backend_requests_running", Kind::Gauge, BACKEND),
    ("router_backend_requests_waiting", Kind::Gauge, BACKEND),
    ("router_backend_load_ratio", Kind::Gauge, BACKEND),
    ("router_backend_saturated", Kind::Gauge, BACKEND),
    ("router_backend_telemetry_stale", Kind::Gauge, BACKEND),
    ("router_backend_telemetry_age_seconds", Kind::Gauge, BACKEND),
    ("router_backend_healthy", Kind::Gauge, BACKEND),
    ("router_backend_cost_per_hour_dollars", Kind::Gauge, BACKEND),
    (
        "router_backend_cost_per_1k_connections_dollars",
        Kind::Gauge,
        BACKEND,
    ),
    ("router_service_active_connections", Kind::Gauge, SERVICE),
    ("router_service_saturated_backends", Kind::Gauge, SERVICE),
    ("router_service_cost_per_hour_dollars", Kind::Gauge, SERVICE),
    (
        "router_service_cost_per_1k_connections_dollars",
        Kind::Gauge,
        SERVICE,
    ),
    ("router_conn_table_entries", Kind::Gauge, GLOBAL),
    ("router_conn_table_capacity", Kind::Gauge, GLOBAL),
    ("router_uptime_seconds", Kind::Gauge, GLOBAL),
    (
        "router_backend_connect_latency_seconds",
        Kind::Histogram,
        BACKEND,
    ),
    (
        "router_backend_first_byte_latency_seconds",
        Kind::Histogram,
        BACKEND,
    ),
];

/// Labels Prometheus attaches to every scraped series.
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// A series name's family, its kind as a series (a histogram's buckets,
/// sum and count behave as counters) and the labels it carries.
fn series(name: &str) -> Option<(&'static str, Kind, Vec<&'static str>)> {
    FAMILIES.iter().find_map(|&(family, kind, labels)| {
        let mut labels: Vec<&str> = labels.iter().chain(TARGET_LABELS).copied().collect();
        match kind {
            Kind::Histogram => {
                let suffix = name.strip_prefix(family)?;
                match suffix {
                    "_bucket" => labels.push("le"),
                    "_sum" | "_count" => {}
                    _ => return None,
                }
                Some((family, Kind::Counter, labels))
            }
            _ => (name == family).then_some((family, kind, labels)),
        }
    })
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Open,
    Close,
    /// `{...}` label matchers: the label names.
    Matchers(Vec<String>),
    /// Anything else: numbers, durations, strings, ranges, operators,
    /// Grafana variables.
    Other,
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_ident(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit()
}

/// Index just past the string literal starting at `i`.
fn skip_string(b: &[u8], i: usize) -> Result<usize, String> {
    let quote = b[i];
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' if quote != b'`' => j += 2,
            c if c == quote => return Ok(j + 1),
            _ => j += 1,
        }
    }
    Err("unterminated string".into())
}

/// Label names of a matcher list such as `a="x", b=~"$b"`.
fn matchers(text: &str) -> Result<Vec<String>, String> {
    let b = text.as_bytes();
    let mut labels = Vec::new();
    let mut i = 0;
    loop {
        while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b',') {
            i += 1;
        }
        if i == b.len() {
            return Ok(labels);
        }
        let start = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        if start == i {
            return Err(format!("no label name at {:?}", &text[start..]));
        }
        labels.push(text[start..i].to_owned());
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let op_start = i;
        while i < b.len() && b"=!~".contains(&b[i]) {
            i += 1;
        }
        if !["=", "!=", "=~", "!~"].contains(&&text[op_start..i]) {
            return Err(format!("bad matcher operator in {text:?}"));
        }
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == b.len() || !b"\"'`".contains(&b[i]) {
            return Err(format!("matcher value is not a string in {text:?}"));
        }
        i = skip_string(b, i)?;
    }
}

/// Enough of PromQL's lexer to find metric names, their matchers and the
/// calls around them.
fn lex(expr: &str) -> Result<Vec<Tok>, String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            c if c.is_ascii_whitespace() => i += 1,
            b'"' | b'\'' | b'`' => {
                i = skip_string(b, i)?;
                out.push(Tok::Other);
            }
            b'(' => {
                out.push(Tok::Open);
                i += 1;
            }
            b')' => {
                out.push(Tok::Close);
                i += 1;
            }
            b'{' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'}' {
                    j = if b"\"'`".contains(&b[j]) {
                        skip_string(b, j)?
                    } else {
                        j + 1
                    };
                }
                if j == b.len() {
                    return Err("unclosed {".into());
                }
                out.push(Tok::Matchers(matchers(&expr[i + 1..j])?));
                i = j + 1;
            }
            b'[' => {
                let end = expr[i..].find(']').ok_or("unclosed [")?;
                out.push(Tok::Other);
                i += end + 1;
            }
            b'$' => {
                i += 1;
                if b.get(i) == Some(&b'{') {
                    i += expr[i..].find('}').ok_or("unclosed ${")? + 1;
                } else {
                    while i < b.len() && is_ident(b[i]) {
                        i += 1;
                    }
                }
                out.push(Tok::Other);
            }
            c if is_ident_start(c) => {
                let start = i;
                while i < b.len() && is_ident(b[i]) {
                    i += 1;
                }
                out.push(Tok::Ident(expr[start..i].to_owned()));
            }
            c if c.is_ascii_digit() || c == b'.' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
                out.push(Tok::Other);
            }
            _ => {
                out.push(Tok::Other);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// Followed by a list of label names in parentheses, never by a call.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "inf", "nan"];
/// May be followed by `by (...)` before their parenthesis.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];
const RATES: &[&str] = &["rate", "irate", "increase"];

/// One metric selector in an expression.
#[derive(Debug)]
struct Use {
    metric: String,
    labels: Vec<String>,
    /// The innermost call or aggregation around it ("" at top level).
    call: String,
}

fn selectors(expr: &str) -> Result<Vec<Use>, String> {
    let toks = lex(expr)?;
    let mut calls: Vec<String> = Vec::new();
    let mut pending: Option<String> = None;
    let mut uses = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let next_is_open = toks.get(i + 1) == Some(&Tok::Open);
        match &toks[i] {
            Tok::Ident(k) if LABEL_LISTS.contains(&k.as_str()) => {
                i += 1;
                if next_is_open {
                    let close = toks[i..]
                        .iter()
                        .position(|t| *t == Tok::Close)
                        .ok_or_else(|| format!("unclosed {k} ("))?;
                    i += close + 1;
                }
            }
            Tok::Ident(k) if KEYWORDS.contains(&k.as_str()) => i += 1,
            Tok::Ident(f) if next_is_open || AGGREGATIONS.contains(&f.as_str()) => {
                pending = Some(f.clone());
                i += 1;
            }
            Tok::Ident(metric) => {
                let labels = match toks.get(i + 1) {
                    Some(Tok::Matchers(l)) => {
                        i += 1;
                        l.clone()
                    }
                    _ => Vec::new(),
                };
                uses.push(Use {
                    metric: metric.clone(),
                    labels,
                    call: calls.last().cloned().unwrap_or_default(),
                });
                i += 1;
            }
            Tok::Matchers(_) => return Err("a selector without a metric name".into()),
            Tok::Open => {
                calls.push(pending.take().unwrap_or_default());
                i += 1;
            }
            Tok::Close => {
                calls.pop().ok_or("unbalanced )")?;
                i += 1;
            }
            Tok::Other => i += 1,
        }
    }
    if !calls.is_empty() {
        return Err("unbalanced (".into());
    }
    Ok(uses)
}

/// Problems with one expression's metrics, or none.
fn check_expr(expr: &str) -> Vec<String> {
    let uses = match selectors(expr) {
        Ok(u) => u,
        Err(e) => return vec![format!("{e}: {expr}")],
    };
    let mut problems = Vec::new();
    if uses.is_empty() {
        problems.push(format!("no metric: {expr}"));
    }
    for u in uses {
        let Some((_, kind, labels)) = series(&u.metric) else {
            problems.push(format!("{} is not exported by the daemon", u.metric));
            continue;
        };
        for l in &u.labels {
            if !labels.contains(&l.as_str()) {
                problems.push(format!("{} has no label {l:?}", u.metric));
            }
        }
        let in_rate = RATES.contains(&u.call.as_str());
        match kind {
            Kind::Counter if !in_rate => {
                problems.push(format!("counter {} outside rate()/increase()", u.metric))
            }
            Kind::Gauge if in_rate => {
                problems.push(format!("gauge {} inside {}()", u.metric, u.call))
            }
            _ => {}
        }
    }
    problems
}

#[test]
fn promql_checker_catches_mistakes() {
    let ok = r#"histogram_quantile(0.99, sum by (service, backend, le) (rate(router_backend_first_byte_latency_seconds_bucket{service=~"$service", backend=~"${backend}"}[$__rate_interval])))"#;
    assert_eq!(check_expr(ok), Vec::<String>::new());
    let ok = r#"sum(rate(router_service_fallback_connections_total{service="a,b}"}[5m])) by (service) / on (service) group_left sum by (service) (rate(router_service_new_connections_total[5m])) > bool 0"#;
    assert_eq!(check_expr(ok), Vec::<String>::new());
    for (bad, why) in [
        ("router_backend_packets_total", "outside rate"),
        ("rate(router_backend_weight[5m])", "inside rate"),
        ("router_backend_weight{reason=\"x\"}", "no label \"reason\""),
        ("router_backend_weights", "not exported"),
        (
            "rate(router_backend_connect_latency_seconds_bukket[5m])",
            "not exported",
        ),
        ("sum(router_backend_weight", "unbalanced ("),
        (
            "{__name__=\"router_backend_weight\"}",
            "without a metric name",
        ),
        ("router_backend_weight{service~\"x\"}", "operator"),
        ("sum by (service) (1)", "no metric"),
    ] {
        let problems = check_expr(bad).join("; ");
        assert!(problems.contains(why), "{bad}: {problems:?}");
    }
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON")
}

/// Every panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

fn variables(d: &Value) -> BTreeMap<&str, &Value> {
    d["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| (v["name"].as_str().expect("variable name"), v))
        .collect()
}

/// A query variable's query: a string, or `{ "query": ... }` in newer
/// Grafana versions.
fn variable_query(v: &Value) -> &str {
    v["query"]
        .as_str()
        .or_else(|| v["query"]["query"].as_str())
        .expect("query variable without a query")
}

/// Every PromQL expression: panel targets, and the selector inside each
/// `label_values(selector, label)` variable query.
fn expressions(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            let expr = t["expr"].as_str().unwrap_or_default();
            out.push((format!("panel {title:?}"), expr.to_owned()));
        }
    }
    for (name, v) in variables(d) {
        if v["type"] == "query" {
            let q = variable_query(v);
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .unwrap_or_else(|| panic!("variable {name}: expected label_values(...), got {q}"));
            let selector = inner.rsplit_once(',').map_or(inner, |(s, _)| s);
            out.push((format!("variable {name}"), selector.to_owned()));
        }
    }
    out
}

#[test]
fn dashboard_has_datasource_input_and_variables() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    let inputs = d["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"
            && i["type"] == "datasource"
            && i["pluginId"] == "prometheus"),
        "{inputs:?}"
    );
    let vars = variables(&d);
    let ds = vars.get("DS_PROMETHEUS").expect("DS_PROMETHEUS variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for (name, label) in [("service", "service"), ("backend", "backend")] {
        let v = vars.get(name).unwrap_or_else(|| panic!("variable {name}"));
        assert_eq!(v["type"], "query", "{name}");
        let q = variable_query(v);
        assert!(
            q.starts_with("label_values(") && q.ends_with(&format!(", {label})")),
            "{name}: {q}"
        );
        assert_eq!(v["datasource"]["uid"], "${DS_PROMETHEUS}", "{name}");
    }

    // Every query goes to the chosen Prometheus.
    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id {}",
            p["id"]
        );
        let pos = &p["gridPos"];
        assert!(
            pos["x"].as_u64().unwrap() + pos["w"].as_u64().unwrap() <= 24,
            "{title}: wider than the grid"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        }
    }
}

#[test]
fn dashboard_queries_only_exported_metrics() {
    let d = dashboard();
    let exprs = expressions(&d);
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (place, expr) in &exprs {
        problems.extend(
            check_expr(expr)
                .into_iter()
                .map(|p| format!("{place}: {p}")),
        );
        for u in selectors(expr).unwrap_or_default() {
            if let Some((family, _, _)) = series(&u.metric) {
                used.insert(family);
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // Every family the daemon exports has a place on the dashboard.
    let unused: Vec<&str> = FAMILIES
        .iter()
        .map(|f| f.0)
        .filter(|f| !used.contains(f))
        .collect();
    assert!(unused.is_empty(), "not on the dashboard: {unused:?}");

    // Tail latency: p50 and p99 of both datapath histograms.
    for hist in [
        "router_backend_first_byte_latency_seconds",
        "router_backend_connect_latency_seconds",
    ] {
        for q in ["0.5", "0.99"] {
            assert!(
                exprs.iter().any(|(_, e)| {
                    e.starts_with(&format!("histogram_quantile({q},"))
                        && e.contains(&format!("{hist}_bucket"))
                }),
                "no p{} of {hist}",
                q.trim_start_matches("0.")
            );
        }
    }
}

/// The hard-coded list above is checked against metrics.rs's literal
/// family names, so a family renamed or dropped there fails here.
#[test]
fn metric_list_matches_metrics_rs() {
    let source = read("router-userspace/src/metrics.rs");
    for &(name, kind, _) in FAMILIES {
        let family = match kind {
            Kind::Counter => name.strip_suffix("_total").expect("counters end in _total"),
            _ => name,
        };
        assert!(
            source.contains(&format!("\"{family}\"")),
            "{family} is not in router-userspace/src/metrics.rs"
        );
    }
}
