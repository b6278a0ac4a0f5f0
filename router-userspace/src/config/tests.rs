use super::*;

/// Minimal valid config; tests edit single lines so line numbers stay known.
const BASE: &str = r#"[daemon]
interface = "eth0"

[[service]]
name = "llama"
vip = "198.18.100.1:8000"
snat = "198.18.0.1"

[[service.backend]]
name = "gpu-0"
address = "198.18.0.11:8000"

[[service.backend]]
name = "gpu-1"
address = "198.18.0.12:8000"
"#;

const EXAMPLE: &str = include_str!("../../../examples/router.toml");
const TWO_ARM_EXAMPLE: &str = include_str!("../../../examples/two-arm.toml");
const AGENTS_EXAMPLE: &str = include_str!("../../../examples/agents.toml");

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "t.toml")
}

/// BASE with 1-based line `n` replaced by `new` (a single line).
fn replace_line(n: usize, new: &str) -> String {
    let mut lines: Vec<&str> = BASE.lines().collect();
    lines[n - 1] = new;
    lines.join("\n") + "\n"
}

/// BASE with `text` inserted after line `n`.
fn insert_after(n: usize, text: &str) -> String {
    let mut lines: Vec<&str> = BASE.lines().collect();
    lines.insert(n, text);
    lines.join("\n") + "\n"
}

#[track_caller]
fn assert_err(text: &str, line: usize, key: &str, fragment: &str) {
    let err = match parse(text) {
        Ok(_) => panic!("expected an error at {key}, config parsed:\n{text}"),
        Err(e) => e,
    };
    let shown = err.to_string();
    assert_eq!(err.line(), Some(line), "wrong line in: {shown}");
    assert_eq!(err.key(), Some(key), "wrong key in: {shown}");
    assert!(
        shown.starts_with(&format!("t.toml:{line}: {key}: ")),
        "bad prefix: {shown}"
    );
    assert!(shown.contains(fragment), "{shown:?} lacks {fragment:?}");
}

#[test]
fn example_parses() {
    let cfg = Config::parse(EXAMPLE, "examples/router.toml").expect("example must parse");
    assert_eq!(cfg.daemon.interfaces, ["eth0"]);
    assert_eq!(cfg.services.len(), 1);
    let svc = &cfg.services[0];
    assert_eq!(svc.name, "llama");
    assert_eq!(svc.vip, "198.18.100.1:8000".parse().unwrap());
    assert_eq!(svc.snat, [Ipv4Addr::new(198, 18, 0, 1)]);
    let weights: Vec<Option<u32>> = svc.backends.iter().map(|b| b.pinned()).collect();
    assert_eq!(weights, [Some(100), Some(200), Some(500)]);
    assert_eq!(cfg.origin(), "examples/router.toml");
    assert_eq!(
        cfg.policy,
        PolicyConfig::default(),
        "the example shows the defaults"
    );
    assert!(svc.backends[0].health.is_some());
    assert_eq!(svc.backends[0].cost_per_hour, Some(4.10));
}

/// The commented telemetry lines in the example must parse when enabled.
#[test]
fn example_telemetry_lines_parse() {
    let lines: Vec<&str> = EXAMPLE
        .lines()
        .filter_map(|l| {
            l.trim_start_matches('#')
                .trim()
                .strip_prefix("telemetry = ")
        })
        .map(|l| l.split("   #").next().unwrap_or(l).trim())
        .collect();
    assert_eq!(lines.len(), 3);
    for value in lines {
        let text = with_backend0(&format!("telemetry = {value}"));
        let cfg = parse(&text).unwrap_or_else(|e| panic!("{value}: {e}"));
        assert!(cfg.services[0].backends[0].telemetry.is_some());
    }
}

#[test]
fn example_loads_from_disk() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/router.toml");
    let cfg = Config::load(&path).expect("example must load");
    assert_eq!(cfg.services[0].backends.len(), 3);
}

/// The host that examples/two-arm.toml's header draws: clients on eth0,
/// backends and the SNAT addresses on eth1.
fn two_arm_host(name: &str) -> Option<Vec<Ipv4Addr>> {
    match name {
        "eth0" => Some(vec![Ipv4Addr::new(198, 18, 1, 1)]),
        "eth1" => Some(vec![
            Ipv4Addr::new(198, 18, 2, 1),
            Ipv4Addr::new(198, 18, 2, 2),
            Ipv4Addr::new(198, 18, 2, 3),
        ]),
        _ => None,
    }
}

#[test]
fn two_arm_example_parses() {
    let cfg = Config::parse(TWO_ARM_EXAMPLE, "examples/two-arm.toml").expect("example must parse");
    assert_eq!(cfg.daemon.interfaces, ["eth0", "eth1"]);
    assert_eq!(cfg.policy, PolicyConfig::default());
    let backend_net = |a: Ipv4Addr| a.octets()[..3] == [198, 18, 2];
    let names: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["llama-70b", "llama-8b"]);
    let big = &cfg.services[0];
    assert_eq!(big.fallback.as_deref(), Some("llama-8b"));
    assert_eq!(
        big.snat,
        [Ipv4Addr::new(198, 18, 2, 2), Ipv4Addr::new(198, 18, 2, 3)]
    );
    let capacities: Vec<f64> = big.backends.iter().map(|b| b.capacity).collect();
    assert_eq!(capacities, [1.0, 1.0, 2.0]);
    for svc in &cfg.services {
        assert!(svc.snat.iter().all(|&a| backend_net(a)), "{}", svc.name);
        for b in &svc.backends {
            // Reached through eth1, weighed by the engine's own metrics.
            assert!(backend_net(*b.address.ip()), "{}", b.name);
            assert_eq!(b.pinned(), None, "{} is policy-driven", b.name);
            assert!(
                matches!(
                    b.telemetry,
                    Some(TelemetryConfig::Prometheus {
                        format: PromFormat::Vllm,
                        ..
                    })
                ),
                "{}",
                b.name
            );
            assert!(
                b.health.is_some() && b.cost_per_hour.is_some(),
                "{}",
                b.name
            );
        }
    }
    // The example is consistent with the topology it draws ...
    cfg.check_host(&two_arm_host).expect("two-arm host check");
    // ... and that check is not vacuous: without the second SNAT address
    // on eth1, or without eth1, the daemon would refuse it.
    let one_snat = |name: &str| {
        two_arm_host(name).map(|a| a.into_iter().filter(|a| a.octets()[3] != 3).collect())
    };
    let err = cfg.check_host(&one_snat).unwrap_err();
    assert_eq!(err.key(), Some("service[0].snat[1]"), "{err}");
    let one_arm = |name: &str| (name == "eth0").then(|| two_arm_host(name)).flatten();
    let err = cfg.check_host(&one_arm).unwrap_err();
    assert_eq!(err.key(), Some("daemon.interface[1]"), "{err}");
}

#[test]
fn agents_example_parses() {
    let cfg = Config::parse(AGENTS_EXAMPLE, "examples/agents.toml").expect("example must parse");
    assert_eq!(cfg.daemon.interfaces, ["eth0"]);
    assert_eq!(cfg.policy, PolicyConfig::default());
    let svc = &cfg.services[0];
    let devices: Vec<DeviceSelector> = svc
        .backends
        .iter()
        .map(|b| match &b.telemetry {
            Some(TelemetryConfig::Agent {
                url,
                device,
                token_file,
            }) => {
                // The port router-agent.service listens on.
                let host = b.address.ip().to_string();
                assert_eq!(*url, format!("http://{host}:9400"), "{}", b.name);
                assert_eq!(token_file, Path::new("/etc/router/agent.token"));
                device.clone()
            }
            other => panic!("{}: expected an agent source, got {other:?}", b.name),
        })
        .collect();
    assert_eq!(
        devices,
        [
            DeviceSelector::Index(0),
            DeviceSelector::Index(1),
            DeviceSelector::Uuid("GPU-5fb3c1d2-8a4e-4b1f-9c2d-0e7a6b5c4d3e".into()),
        ]
    );
    // Policy-driven, sized by capacity.
    assert!(svc.backends.iter().all(|b| b.pinned().is_none()));
    let capacities: Vec<f64> = svc.backends.iter().map(|b| b.capacity).collect();
    assert_eq!(capacities, [1.0, 1.0, 4.0]);
}

#[test]
fn unreadable_file_names_path() {
    let err = Config::load(Path::new("/nonexistent/router.toml")).unwrap_err();
    let shown = err.to_string();
    assert!(shown.starts_with("/nonexistent/router.toml: "), "{shown}");
    assert!(matches!(err, ConfigError::Read { .. }));
    assert_eq!(err.line(), None);
}

#[test]
fn defaults_applied() {
    let cfg = parse(BASE).unwrap();
    let d = &cfg.daemon;
    assert_eq!(
        *d,
        DaemonConfig {
            interfaces: vec!["eth0".into()],
            xdp_mode: XdpMode::Auto,
            pin_path: "/sys/fs/bpf/router".into(),
            control_socket: "/run/router/router.sock".into(),
            metrics_listen: Some("127.0.0.1:9090".parse().unwrap()),
            table_size: 65537,
            conn_table_size: 262_144,
            snat_port_min: 10000,
            snat_port_max: 32767,
            tcp_idle_timeout: Duration::from_secs(600),
            tcp_closing_timeout: Duration::from_secs(10),
            udp_idle_timeout: Duration::from_secs(30),
            datapath_log: false,
        }
    );
    let svc = &cfg.services[0];
    assert_eq!(svc.protocol, Protocol::Tcp);
    assert!(svc.backends.iter().all(|b| b.weight == Some(100)));
    assert_eq!(Protocol::Tcp.number(), 6);
    assert_eq!(Protocol::Udp.number(), 17);
}

#[test]
fn explicit_values_and_forms() {
    let text = insert_after(
        2,
        r#"xdp_mode = "skb"
table_size = 211
conn_table_size = 1000
snat_port_range = "20000-20099"
tcp_idle_timeout = "1h 30m"
datapath_log = true"#,
    );
    let text = text.replace(r#"interface = "eth0""#, r#"interface = ["eth0", "eth1"]"#);
    let text = text.replace(
        r#"snat = "198.18.0.1""#,
        "snat = [\"198.18.0.1\", \"198.18.0.2\"]\nprotocol = \"udp\"\nforwarding = \"nat\"",
    );
    let cfg = parse(&text).unwrap();
    assert_eq!(cfg.daemon.interfaces, ["eth0", "eth1"]);
    assert_eq!(cfg.daemon.xdp_mode, XdpMode::Skb);
    assert_eq!(cfg.daemon.table_size, 211);
    assert_eq!(cfg.daemon.conn_table_size, 1000);
    assert_eq!(
        (cfg.daemon.snat_port_min, cfg.daemon.snat_port_max),
        (20000, 20099)
    );
    assert_eq!(cfg.daemon.tcp_idle_timeout, Duration::from_secs(5400));
    assert!(cfg.daemon.datapath_log);
    assert_eq!(cfg.services[0].protocol, Protocol::Udp);
    assert_eq!(cfg.services[0].snat.len(), 2);
}

#[test]
fn inline_tables_work_too() {
    let text = r#"daemon = { interface = "eth0" }
service = [{ name = "a", vip = "10.0.0.1:80", snat = "10.0.0.2", backend = [
  { name = "b", address = "10.0.0.3:80", weight = 7 },
  { name = "c", address = "10.0.0.300:80" },
] }]
"#;
    let err = parse(text).unwrap_err();
    assert_eq!(err.line(), Some(4));
    assert_eq!(err.key(), Some("service[0].backend[1].address"));
    let fixed = text.replace("10.0.0.300", "10.0.0.4");
    assert_eq!(
        parse(&fixed).unwrap().services[0].backends[0].weight,
        Some(7)
    );
}

#[test]
fn no_services_is_valid() {
    let cfg = parse("[daemon]\ninterface = \"eth0\"\n").unwrap();
    assert!(cfg.services.is_empty());
}

// --- syntax and serde errors ----------------------------------------------

#[test]
fn syntax_error_has_line() {
    let err = parse(&replace_line(6, r#"vip = "198.18.100.1:8000"#)).unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    assert_eq!(err.line(), Some(6), "{err}");
    assert!(!err.to_string().contains('\n'), "{err}");
}

#[test]
fn unknown_key_top_level() {
    assert_err(
        &format!("bogus = 1\n{BASE}"),
        1,
        "bogus",
        "unknown field `bogus`",
    );
}

#[test]
fn unknown_key_in_daemon() {
    assert_err(
        &insert_after(2, "inteface = \"eth1\""),
        3,
        "daemon.inteface",
        "unknown field",
    );
}

#[test]
fn unknown_key_in_service() {
    assert_err(
        &insert_after(7, "sticky = true"),
        8,
        "service[0].sticky",
        "unknown field",
    );
}

#[test]
fn unknown_key_in_backend() {
    assert_err(
        &insert_after(15, "wieght = 5"),
        16,
        "service[0].backend[1].wieght",
        "unknown field `wieght`",
    );
}

#[test]
fn missing_required_keys() {
    assert_err(
        &replace_line(2, ""),
        1,
        "daemon",
        "missing field `interface`",
    );
    assert_err(
        &replace_line(7, ""),
        4,
        "service[0]",
        "missing field `snat`",
    );
    assert_err(
        &replace_line(11, ""),
        9,
        "service[0].backend[0]",
        "missing field `address`",
    );
    let no_daemon: String = BASE.lines().skip(3).map(|l| format!("{l}\n")).collect();
    let err = parse(&no_daemon).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("t.toml:1: missing field `daemon`"),
        "{err}"
    );
}

#[test]
fn wrong_types() {
    assert_err(
        &insert_after(15, "weight = \"heavy\""),
        16,
        "service[0].backend[1].weight",
        "expected u32",
    );
    assert_err(
        &insert_after(15, "weight = -1"),
        16,
        "service[0].backend[1].weight",
        "expected u32",
    );
    assert_err(
        &replace_line(2, "interface = 3"),
        2,
        "daemon.interface",
        "a string or a list",
    );
    assert_err(
        &replace_line(2, "interface = [\"eth0\", 3]"),
        2,
        "daemon.interface[1]",
        "expected a string",
    );
}

#[test]
fn unknown_enum_values() {
    assert_err(
        &insert_after(2, "xdp_mode = \"hw\""),
        3,
        "daemon.xdp_mode",
        "unknown variant `hw`",
    );
    assert_err(
        &insert_after(7, "protocol = \"sctp\""),
        8,
        "service[0].protocol",
        "unknown variant `sctp`",
    );
    assert_err(
        &insert_after(7, "forwarding = \"dsr\""),
        8,
        "service[0].forwarding",
        "unknown variant `dsr`",
    );
    assert_err(
        &insert_after(7, "selection = \"random\""),
        8,
        "service[0].selection",
        "unknown variant `random`, expected `maglev` or `least_loaded`",
    );
}

#[test]
fn selection_defaults_by_how_weights_are_decided() {
    let cfg = parse(BASE).unwrap();
    assert_eq!(
        cfg.services[0].selection,
        Selection::Maglev,
        "static weights"
    );
    let telemetry = insert_after(13, "telemetry = { source = \"nvml\", device = 0 }");
    let cfg = parse(&telemetry).unwrap();
    assert_eq!(
        cfg.services[0].selection,
        Selection::LeastLoaded,
        "any telemetry-driven backend"
    );
    // Static weights may still be placed by load: sed on the static weights.
    let cfg = parse(&insert_after(7, "selection = \"least_loaded\"")).unwrap();
    assert_eq!(cfg.services[0].selection, Selection::LeastLoaded);
    assert_eq!(cfg.services[0].backends[0].pinned(), Some(100));
    let text = insert_after(7, "selection = \"maglev\"");
    let text = text.replacen(
        "address = \"198.18.0.12:8000\"",
        "address = \"198.18.0.12:8000\"\ntelemetry = { source = \"nvml\", device = 0 }",
        1,
    );
    assert_eq!(
        parse(&text).unwrap().services[0].selection,
        Selection::Maglev
    );
}

#[test]
fn max_in_flight_must_leave_room() {
    let cfg = parse(&with_backend0("max_in_flight = 8")).unwrap();
    assert_eq!(cfg.services[0].backends[0].max_in_flight, Some(8));
    assert_err(
        &with_backend0("max_in_flight = 0"),
        12,
        "service[0].backend[0].max_in_flight",
        "no room ever",
    );
    assert_err(
        &with_backend0("max_in_flight = -3"),
        12,
        "service[0].backend[0].max_in_flight",
        "invalid value",
    );
}

// --- semantic validation ---------------------------------------------------

#[test]
fn bad_backend_address() {
    let text = replace_line(15, r#"address = "198.18.0.300:8000""#);
    assert_eq!(
        parse(&text).unwrap_err().to_string(),
        r#"t.toml:15: service[0].backend[1].address: "198.18.0.300:8000" is not an IPv4 address:port"#
    );
    assert_err(
        &replace_line(11, r#"address = "198.18.0.11""#),
        11,
        "service[0].backend[0].address",
        "is not an IPv4 address:port",
    );
    assert_err(
        &replace_line(11, r#"address = "198.18.0.11:0""#),
        11,
        "service[0].backend[0].address",
        "port 0",
    );
}

#[test]
fn bad_vip() {
    assert_err(
        &replace_line(6, r#"vip = "llama:8000""#),
        6,
        "service[0].vip",
        "not an IPv4 address:port",
    );
    assert_err(
        &replace_line(6, r#"vip = "198.18.100.1:0""#),
        6,
        "service[0].vip",
        "port 0",
    );
    assert_err(
        &replace_line(6, r#"vip = "0.0.0.0:80""#),
        6,
        "service[0].vip",
        "not a unicast",
    );
}

#[test]
fn bad_snat() {
    assert_err(
        &replace_line(7, r#"snat = "198.18.0.999""#),
        7,
        "service[0].snat",
        "not an IPv4 address",
    );
    assert_err(
        &replace_line(7, r#"snat = ["198.18.0.1", "nope"]"#),
        7,
        "service[0].snat[1]",
        r#""nope" is not an IPv4 address"#,
    );
    assert_err(
        &replace_line(7, "snat = []"),
        7,
        "service[0].snat",
        "needs 1 to 4 addresses, got 0",
    );
    assert_err(
        &replace_line(
            7,
            r#"snat = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]"#,
        ),
        7,
        "service[0].snat",
        "got 5",
    );
    assert_err(
        &replace_line(7, r#"snat = ["10.0.0.1", "10.0.0.1"]"#),
        7,
        "service[0].snat[1]",
        "listed twice",
    );
    assert_err(
        &replace_line(7, r#"snat = "224.0.0.1""#),
        7,
        "service[0].snat",
        "not a unicast",
    );
}

const SECOND_SERVICE: &str = r#"
[[service]]
name = "mistral"
vip = "198.18.100.2:8000"
snat = "198.18.0.1"

[[service.backend]]
name = "gpu-9"
address = "198.18.0.19:8000"
"#;

#[test]
fn duplicate_service_name() {
    let text = format!("{BASE}{}", SECOND_SERVICE.replace("mistral", "llama"));
    assert_err(
        &text,
        18,
        "service[1].name",
        "duplicate service name \"llama\" (first used at line 5)",
    );
}

#[test]
fn duplicate_vip() {
    let text = format!(
        "{BASE}{}",
        SECOND_SERVICE.replace("198.18.100.2", "198.18.100.1")
    );
    assert_err(
        &text,
        19,
        "service[1].vip",
        "198.18.100.1:8000/tcp is already used by service \"llama\"",
    );
    // Same address and port on the other protocol is a different service.
    let udp = text.replace(
        "name = \"mistral\"",
        "name = \"mistral\"\nprotocol = \"udp\"",
    );
    assert_eq!(parse(&udp).unwrap().services.len(), 2);
}

#[test]
fn duplicate_backend_name_and_address() {
    assert_err(
        &replace_line(14, r#"name = "gpu-0""#),
        14,
        "service[0].backend[1].name",
        "duplicate backend name \"gpu-0\" in service \"llama\" (first used at line 10)",
    );
    assert_err(
        &replace_line(15, r#"address = "198.18.0.11:8000""#),
        15,
        "service[0].backend[1].address",
        "already backend \"gpu-0\"",
    );
    // Backend names are per service.
    let text = format!("{BASE}{}", SECOND_SERVICE.replace("gpu-9", "gpu-0"));
    assert!(parse(&text).is_ok());
}

#[test]
fn service_without_backends() {
    let text: String = BASE.lines().take(7).map(|l| format!("{l}\n")).collect();
    assert_err(
        &text,
        4,
        "service[0].backend",
        "service \"llama\" needs at least one backend",
    );
}

#[test]
fn empty_names() {
    assert_err(
        &replace_line(5, r#"name = """#),
        5,
        "service[0].name",
        "must not be empty",
    );
    assert_err(
        &replace_line(10, r#"name = """#),
        10,
        "service[0].backend[0].name",
        "must not be empty",
    );
}

#[test]
fn table_size_checks() {
    assert_err(
        &insert_after(2, "table_size = 65536"),
        3,
        "daemon.table_size",
        "not prime (Maglev needs a prime table size; try 65537)",
    );
    assert_err(
        &insert_after(2, "table_size = 1"),
        3,
        "daemon.table_size",
        "not prime",
    );
    assert_err(
        &insert_after(2, "table_size = 199"),
        3,
        "daemon.table_size",
        "199 is below 100 x the 2 backends of service \"llama\"; use a prime >= 200, e.g. 211",
    );
    assert_err(
        &insert_after(2, "table_size = 16777259"),
        3,
        "daemon.table_size",
        "above the maximum",
    );
}

#[test]
fn default_table_size_too_small_points_at_daemon() {
    let mut text = BASE.to_owned();
    for i in 2..656 {
        text += &format!(
            "\n[[service.backend]]\nname = \"b{i}\"\naddress = \"10.{}.{}.1:80\"\n",
            i / 256,
            i % 256
        );
    }
    // The key was never written, so the daemon table's header stands in.
    assert_err(
        &text,
        1,
        "daemon.table_size",
        "65537 is below 100 x the 656 backends",
    );
}

#[test]
fn too_many_backends_overall() {
    let mut text = insert_after(2, "table_size = 204901");
    let svc = |n: usize, base: usize| {
        let mut s = format!(
            "\n[[service]]\nname = \"s{n}\"\nvip = \"198.18.200.{n}:80\"\nsnat = \"198.18.0.1\"\n"
        );
        for i in 0..2048 {
            let k = base + i;
            s += &format!(
                "[[service.backend]]\nname = \"b{i}\"\naddress = \"10.{}.{}.1:80\"\n",
                k / 256,
                k % 256
            );
        }
        s
    };
    text += &svc(1, 0);
    text += &svc(2, 2048);
    let err = parse(&text).unwrap_err();
    assert_eq!(err.key(), Some("service[2].backend[2046]"), "{err}");
    assert!(err.to_string().contains("at most 4096 backends"), "{err}");
}

#[test]
fn conn_table_size_zero() {
    assert_err(
        &insert_after(2, "conn_table_size = 0"),
        3,
        "daemon.conn_table_size",
        "greater than 0",
    );
}

#[test]
fn durations() {
    assert_err(
        &insert_after(2, r#"tcp_idle_timeout = "0s""#),
        3,
        "daemon.tcp_idle_timeout",
        "greater than 0",
    );
    assert_err(
        &insert_after(2, r#"tcp_closing_timeout = "0ms""#),
        3,
        "daemon.tcp_closing_timeout",
        "greater than 0",
    );
    assert_err(
        &insert_after(2, r#"udp_idle_timeout = "3 parsecs""#),
        3,
        "daemon.udp_idle_timeout",
        "is not a duration",
    );
    assert_err(
        &insert_after(2, "udp_idle_timeout = 30"),
        3,
        "daemon.udp_idle_timeout",
        "expected a string",
    );
}

#[test]
fn snat_port_range() {
    let key = "daemon.snat_port_range";
    assert_err(
        &insert_after(2, r#"snat_port_range = "10000""#),
        3,
        key,
        "is not a port range",
    );
    assert_err(
        &insert_after(2, r#"snat_port_range = "a-b""#),
        3,
        key,
        "is not a port range",
    );
    assert_err(
        &insert_after(2, r#"snat_port_range = "10000-70000""#),
        3,
        key,
        "is not a port range",
    );
    assert_err(
        &insert_after(2, r#"snat_port_range = "30000-20000""#),
        3,
        key,
        "start 30000 is above end 20000",
    );
    assert_err(
        &insert_after(2, r#"snat_port_range = "80-9000""#),
        3,
        key,
        "below 1024",
    );
    let cfg = parse(&insert_after(2, r#"snat_port_range = "1024-1024""#)).unwrap();
    assert_eq!(
        (cfg.daemon.snat_port_min, cfg.daemon.snat_port_max),
        (1024, 1024)
    );
}

#[test]
fn interfaces() {
    assert_err(
        &replace_line(2, r#"interface = """#),
        2,
        "daemon.interface",
        "must not be empty",
    );
    assert_err(
        &replace_line(2, "interface = []"),
        2,
        "daemon.interface",
        "at least one interface",
    );
    assert_err(
        &replace_line(2, r#"interface = ["eth0", ""]"#),
        2,
        "daemon.interface[1]",
        "must not be empty",
    );
    assert_err(
        &replace_line(2, r#"interface = ["eth0", "eth0"]"#),
        2,
        "daemon.interface[1]",
        "listed twice",
    );
    assert_err(
        &replace_line(2, r#"interface = "a-very-long-interface-name""#),
        2,
        "daemon.interface",
        "not a valid interface name",
    );
}

#[test]
fn paths() {
    assert_err(
        &insert_after(2, r#"pin_path = "bpf/router""#),
        3,
        "daemon.pin_path",
        "absolute path",
    );
    assert_err(
        &insert_after(2, r#"control_socket = """#),
        3,
        "daemon.control_socket",
        "must not be empty",
    );
}

#[test]
fn metrics_listen_is_an_address_or_off() {
    let cfg = parse(&insert_after(2, r#"metrics_listen = "0.0.0.0:9100""#)).unwrap();
    assert_eq!(
        cfg.daemon.metrics_listen,
        Some("0.0.0.0:9100".parse().unwrap())
    );
    let cfg = parse(&insert_after(2, r#"metrics_listen = """#)).unwrap();
    assert_eq!(cfg.daemon.metrics_listen, None);
    assert_err(
        &insert_after(2, r#"metrics_listen = "localhost""#),
        3,
        "daemon.metrics_listen",
        "not an address:port",
    );
}

// --- host checks --------------------------------------------------------------

fn host(name: &str) -> Option<Vec<Ipv4Addr>> {
    match name {
        "eth0" => Some(vec![
            Ipv4Addr::new(198, 18, 0, 1),
            Ipv4Addr::new(198, 18, 0, 2),
        ]),
        "eth1" => Some(vec![Ipv4Addr::new(10, 0, 0, 1)]),
        _ => None,
    }
}

#[test]
fn check_host_ok() {
    parse(BASE).unwrap().check_host(&host).unwrap();
    let two_armed = replace_line(2, r#"interface = ["eth1", "eth0"]"#);
    parse(&two_armed).unwrap().check_host(&host).unwrap();
}

#[test]
fn check_host_missing_interface() {
    let err = parse(&replace_line(2, r#"interface = "eth7""#))
        .unwrap()
        .check_host(&host)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"t.toml:2: daemon.interface: interface "eth7" does not exist on this host"#
    );
    let err = parse(&replace_line(
        2,
        "interface = [\n  \"eth0\",\n  \"eth7\",\n]",
    ))
    .unwrap()
    .check_host(&host)
    .unwrap_err();
    assert_eq!(err.line(), Some(4), "{err}");
    assert_eq!(err.key(), Some("daemon.interface[1]"));
}

#[test]
fn check_host_snat_not_on_interface() {
    let err = parse(&replace_line(7, r#"snat = "198.18.0.9""#))
        .unwrap()
        .check_host(&host)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "t.toml:7: service[0].snat: SNAT address 198.18.0.9 is not configured on eth0"
    );
    let err = parse(&replace_line(7, r#"snat = ["198.18.0.1", "10.0.0.1"]"#))
        .unwrap()
        .check_host(&host)
        .unwrap_err();
    assert_eq!(err.key(), Some("service[0].snat[1]"));
    assert_eq!(err.line(), Some(7));
}

#[test]
fn error_at_for_later_checks() {
    let cfg = parse(BASE).unwrap();
    // Defaulted key: reported at the enclosing table.
    let err = cfg.error_at("daemon.snat_port_range", "overlaps the ephemeral range");
    assert_eq!(
        err.to_string(),
        "t.toml:1: daemon.snat_port_range: overlaps the ephemeral range"
    );
    assert_eq!(
        cfg.error_at("service[0].backend[1].address", "x").line(),
        Some(15)
    );
    assert_eq!(cfg.error_at("service[0].backend[1]", "x").line(), Some(13));
}

#[test]
fn key_path_round_trip() {
    for s in [
        "daemon",
        "daemon.interface[1]",
        "service[0].backend[12].address",
        "a[1][2].b",
    ] {
        assert_eq!(KeyPath::parse(s).to_string(), s);
    }
}

// --- policy ----------------------------------------------------------------

#[test]
fn policy_defaults() {
    assert_eq!(parse(BASE).unwrap().policy, PolicyConfig::default());
}

#[test]
fn policy_explicit_values() {
    let text = insert_after(
        2,
        r#"[policy]
poll_interval = "250ms"
target_utilization = 0.7
saturation = 0.9
hysteresis = 0.1
saturation_confirm = 3
ewma_alpha = 0.5
slow_start = "1m"
slow_start_aggression = 2
min_weight_fraction = 0.05
max_step_fraction = 0.5
stale_after = "2s"
stale_decay = "20s"
stale_fraction = 0.5
full_weight = 1000
signal = { gpu_util = 0.0, kv_cache = 1.0, queue = 0.5, queue_norm = 4 }"#,
    );
    let p = parse(&text).unwrap().policy;
    assert_eq!(
        p,
        PolicyConfig {
            poll_interval: Duration::from_millis(250),
            target_utilization: 0.7,
            saturation: 0.9,
            hysteresis: 0.1,
            saturation_confirm: 3,
            ewma_alpha: 0.5,
            slow_start: Duration::from_secs(60),
            slow_start_aggression: 2.0,
            min_weight_fraction: 0.05,
            max_step_fraction: 0.5,
            weight_gain: 0.3,
            weight_deadband: 0.1,
            stale_after: Duration::from_secs(2),
            stale_decay: Duration::from_secs(20),
            stale_fraction: 0.5,
            speed_window: Duration::from_secs(15),
            capacity_deadband: 0.15,
            signal: SignalMix {
                gpu_util: 0.0,
                kv_cache: 1.0,
                queue: 0.5,
                queue_norm: 4.0,
            },
            full_weight: 1000,
        }
    );
    // A sub-table works as well as an inline one.
    let text = format!("{BASE}\n[policy.signal]\nqueue_norm = 16\n");
    assert_eq!(parse(&text).unwrap().policy.signal.queue_norm, 16.0);
}

#[test]
fn policy_errors() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "poll_interval = \"5ms\"",
            "policy.poll_interval",
            "below the minimum",
        ),
        (
            "poll_interval = \"0s\"",
            "policy.poll_interval",
            "greater than 0",
        ),
        (
            "target_utilization = 0",
            "policy.target_utilization",
            "need 0 < target_utilization",
        ),
        (
            "target_utilization = 0.97",
            "policy.target_utilization",
            "< saturation (0.95)",
        ),
        (
            "target_utilization = nan",
            "policy.target_utilization",
            "need 0 <",
        ),
        ("saturation = 1.5", "policy.saturation", "in (0, 1]"),
        (
            "saturation = 0.5",
            "policy.saturation",
            "target_utilization (0.8)",
        ),
        ("hysteresis = -0.1", "policy.hysteresis", ">= 0"),
        ("hysteresis = 0.95", "policy.hysteresis", "below saturation"),
        (
            "saturation_confirm = 0",
            "policy.saturation_confirm",
            "at least 1",
        ),
        ("ewma_alpha = 0", "policy.ewma_alpha", "in (0, 1]"),
        ("ewma_alpha = 1.01", "policy.ewma_alpha", "in (0, 1]"),
        ("slow_start = \"0s\"", "policy.slow_start", "greater than 0"),
        (
            "slow_start_aggression = 0",
            "policy.slow_start_aggression",
            "above 0",
        ),
        (
            "slow_start_aggression = inf",
            "policy.slow_start_aggression",
            "finite",
        ),
        (
            "min_weight_fraction = 0",
            "policy.min_weight_fraction",
            "in (0, 1]",
        ),
        (
            "max_step_fraction = 2",
            "policy.max_step_fraction",
            "in (0, 1]",
        ),
        (
            "stale_after = \"100ms\"",
            "policy.stale_after",
            "must exceed poll_interval",
        ),
        (
            "stale_after = \"soon\"",
            "policy.stale_after",
            "is not a duration",
        ),
        (
            "stale_decay = \"0s\"",
            "policy.stale_decay",
            "greater than 0",
        ),
        ("stale_fraction = 0", "policy.stale_fraction", "in (0, 1]"),
        ("full_weight = 0", "policy.full_weight", "must be 1 to"),
        (
            "speed_window = \"100ms\"",
            "policy.speed_window",
            "at least poll_interval",
        ),
        (
            "capacity_deadband = 1",
            "policy.capacity_deadband",
            "in [0, 1)",
        ),
        (
            "signal = { gpu_util = 2 }",
            "policy.signal.gpu_util",
            "in [0, 1]",
        ),
        (
            "signal = { queue_norm = 0 }",
            "policy.signal.queue_norm",
            "above 0",
        ),
        (
            "signal = { gpu = 1 }",
            "policy.signal.gpu",
            "unknown field `gpu`",
        ),
        ("ewma = 0.3", "policy.ewma", "unknown field `ewma`"),
        ("ewma_alpha = \"fast\"", "policy.ewma_alpha", "expected f64"),
    ];
    for (line, key, fragment) in cases {
        assert_err(
            &insert_after(2, &format!("[policy]\n{line}")),
            4,
            key,
            fragment,
        );
    }
    assert_err(
        &insert_after(
            2,
            "[policy]\nsignal = { gpu_util = 0, kv_cache = 0, queue = 0 }",
        ),
        4,
        "policy.signal",
        "every signal is disabled",
    );
}

// --- backend telemetry, health, capacity -------------------------------------

/// BASE with `text` added to backend gpu-0 (after its address, line 11).
fn with_backend0(text: &str) -> String {
    insert_after(11, text)
}

#[test]
fn static_and_policy_driven_weights() {
    let cfg = parse(&with_backend0("capacity = 2.5")).unwrap();
    let b = &cfg.services[0].backends[0];
    assert_eq!(
        (b.capacity, b.pinned()),
        (2.5, Some(250)),
        "static, by capacity"
    );
    let cfg = parse(&with_backend0(
        "capacity = 2\ntelemetry = { source = \"nvml\", device = 0 }",
    ))
    .unwrap();
    let b = &cfg.services[0].backends[0];
    assert_eq!((b.capacity, b.pinned()), (2.0, None), "policy-driven");
    assert_eq!(cfg.services[0].selection, Selection::LeastLoaded);
    let (specs, _) = crate::control_loop::Controller::new(&cfg, None).decide(
        std::time::Duration::ZERO,
        &cfg,
        &|_, _| None,
    );
    assert_eq!(
        specs[0].backends[0].weight, 4,
        "least-loaded: a capacity of 200 slow-started from its 2% floor"
    );
    let text = with_backend0("capacity = 2\ntelemetry = { source = \"nvml\", device = 0 }")
        .replacen(
            "[[service.backend]]",
            "selection = \"maglev\"\n\n[[service.backend]]",
            1,
        );
    let cfg = parse(&text).unwrap();
    let (specs, _) = crate::control_loop::Controller::new(&cfg, None).decide(
        std::time::Duration::ZERO,
        &cfg,
        &|_, _| None,
    );
    assert_eq!(
        specs[0].backends[0].weight, 50,
        "maglev: no telemetry yet, the unknown share"
    );
    let cfg = parse(&with_backend0(
        "weight = 7\ntelemetry = { source = \"nvml\", device = 0 }",
    ))
    .unwrap();
    assert_eq!(cfg.services[0].backends[0].pinned(), Some(7));
    let text = insert_after(2, "[policy]\nfull_weight = 1000");
    assert_eq!(
        parse(&text).unwrap().services[0].backends[0].pinned(),
        Some(1000)
    );
}

#[test]
fn telemetry_sources_parse() {
    let cases: Vec<(&str, TelemetryConfig)> = vec![
        (
            r#"telemetry = { source = "nvml", device = 3 }"#,
            TelemetryConfig::Nvml {
                device: DeviceSelector::Index(3),
                library: None,
            },
        ),
        (
            r#"telemetry = { source = "nvml", device = "GPU-5fb3a1c2-0d4e", library = "/opt/libnvidia-ml.so.1" }"#,
            TelemetryConfig::Nvml {
                device: DeviceSelector::Uuid("GPU-5fb3a1c2-0d4e".into()),
                library: Some("/opt/libnvidia-ml.so.1".into()),
            },
        ),
        (
            r#"telemetry = { source = "agent", url = "http://198.18.0.11:9400", device = 1, token_file = "/etc/router/agent.token" }"#,
            TelemetryConfig::Agent {
                url: "http://198.18.0.11:9400".into(),
                device: DeviceSelector::Index(1),
                token_file: "/etc/router/agent.token".into(),
            },
        ),
        (
            r#"telemetry = { source = "prometheus", url = "http://198.18.0.11:8000/metrics", format = "vllm", labels = { model_name = "llama" } }"#,
            TelemetryConfig::Prometheus {
                url: "http://198.18.0.11:8000/metrics".into(),
                format: PromFormat::Vllm,
                labels: [("model_name".to_owned(), "llama".to_owned())].into(),
            },
        ),
        (
            r#"telemetry = { source = "prometheus", url = "http://h:9400/metrics", format = "dcgm" }"#,
            TelemetryConfig::Prometheus {
                url: "http://h:9400/metrics".into(),
                format: PromFormat::Dcgm,
                labels: BTreeMap::new(),
            },
        ),
    ];
    for (line, want) in cases {
        let cfg = parse(&with_backend0(line)).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(cfg.services[0].backends[0].telemetry.as_ref(), Some(&want));
    }
    // A sub-table works too.
    let text = format!(
        "{BASE}[service.backend.telemetry]\nsource = \"prometheus\"\nurl = \"http://h/metrics\"\nformat = \"sglang\"\n"
    );
    let cfg = parse(&text).unwrap();
    assert!(matches!(
        cfg.services[0].backends[1].telemetry,
        Some(TelemetryConfig::Prometheus {
            format: PromFormat::Sglang,
            ..
        })
    ));
}

#[test]
fn telemetry_errors() {
    let t = "service[0].backend[0].telemetry";
    let cases: &[(&str, &str, &str)] = &[
        (
            r#"{ source = "dcgm" }"#,
            "source",
            "unknown telemetry source \"dcgm\"",
        ),
        (
            r#"{ source = "nvml" }"#,
            "",
            "source \"nvml\" needs `device`",
        ),
        (
            r#"{ source = "nvml", device = -1 }"#,
            "device",
            "out of range",
        ),
        (
            r#"{ source = "nvml", device = 1.5 }"#,
            "device",
            "GPU index (integer) or UUID",
        ),
        (
            r#"{ source = "nvml", device = "gpu0" }"#,
            "device",
            "not a GPU index or an NVML UUID",
        ),
        (
            r#"{ source = "nvml", device = 0, url = "http://h" }"#,
            "url",
            "does not apply to source \"nvml\"",
        ),
        (
            r#"{ source = "nvml", device = 0, lib = "x" }"#,
            "lib",
            "unknown field `lib`",
        ),
        (
            r#"{ source = "agent", url = "http://h:9400", device = 0 }"#,
            "",
            "needs `token_file`",
        ),
        (
            r#"{ source = "agent", device = 0, token_file = "/t" }"#,
            "",
            "needs `url`",
        ),
        (
            r#"{ source = "agent", url = "https://h:9400", device = 0, token_file = "/t" }"#,
            "url",
            "only http://",
        ),
        (
            r#"{ source = "agent", url = "h:9400", device = 0, token_file = "/t" }"#,
            "url",
            "needs http://",
        ),
        (
            r#"{ source = "agent", url = "http://bad host", device = 0, token_file = "/t" }"#,
            "url",
            "is not a URL",
        ),
        (
            r#"{ source = "agent", url = "http://h", device = 0, token_file = "/t", format = "vllm" }"#,
            "format",
            "does not apply",
        ),
        (
            r#"{ source = "prometheus", url = "http://h/metrics" }"#,
            "",
            "needs `format`",
        ),
        (
            r#"{ source = "prometheus", url = "http://h/metrics", format = "tgi" }"#,
            "format",
            "unknown format \"tgi\"",
        ),
        (
            r#"{ source = "prometheus", url = "http://h/metrics", format = "vllm", device = 0 }"#,
            "device",
            "does not apply",
        ),
        (
            r#"{ source = "prometheus", url = "http://h/metrics", format = "vllm", labels = { "model-name" = "x" } }"#,
            "labels.model-name",
            "not a Prometheus label name",
        ),
        (
            r#"{ url = "http://h/metrics" }"#,
            "",
            "missing field `source`",
        ),
    ];
    for (value, sub, fragment) in cases {
        let key = if sub.is_empty() {
            t.to_owned()
        } else {
            format!("{t}.{sub}")
        };
        assert_err(
            &with_backend0(&format!("telemetry = {value}")),
            12,
            &key,
            fragment,
        );
    }
}

#[test]
fn health_parses_with_defaults() {
    let cfg = parse(&with_backend0("health = { http_path = \"/health\" }")).unwrap();
    assert_eq!(
        cfg.services[0].backends[0].health,
        Some(HealthConfig {
            tcp: true,
            http_path: Some("/health".into()),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            fall: 3,
            rise: 2,
        })
    );
    let cfg = parse(&with_backend0(
        r#"health = { tcp = false, http_path = "/v1/models", interval = "2s", timeout = "2s", fall = 1, rise = 5 }"#,
    ))
    .unwrap();
    let h = cfg.services[0].backends[0].health.clone().unwrap();
    assert_eq!((h.tcp, h.fall, h.rise), (false, 1, 5));
    assert_eq!(cfg.services[0].backends[1].health, None);
}

#[test]
fn health_errors() {
    let h = "service[0].backend[0].health";
    let cases: &[(&str, &str, &str)] = &[
        ("{ fall = 0 }", "fall", "at least 1"),
        ("{ rise = 0 }", "rise", "at least 1"),
        ("{ interval = \"0s\" }", "interval", "greater than 0"),
        ("{ timeout = \"2s\" }", "timeout", "exceeds interval"),
        ("{ interval = \"100ms\" }", "interval", "exceeds interval"),
        (
            "{ http_path = \"health\" }",
            "http_path",
            "must start with '/'",
        ),
        ("{ tcp = false }", "", "no probe left"),
        ("{ tcp = \"yes\" }", "tcp", "expected a boolean"),
        ("{ retries = 3 }", "retries", "unknown field `retries`"),
    ];
    for (value, sub, fragment) in cases {
        let key = if sub.is_empty() {
            h.to_owned()
        } else {
            format!("{h}.{sub}")
        };
        assert_err(
            &with_backend0(&format!("health = {value}")),
            12,
            &key,
            fragment,
        );
    }
}

#[test]
fn capacity_and_cost_errors() {
    let b = "service[0].backend[0]";
    for (line, key, fragment) in [
        ("capacity = 0", "capacity", "above 0"),
        ("capacity = -1.5", "capacity", "above 0"),
        ("capacity = nan", "capacity", "finite"),
        ("capacity = inf", "capacity", "finite"),
        ("capacity = \"big\"", "capacity", "expected f64"),
        ("cost_per_hour = -0.01", "cost_per_hour", ">= 0"),
        ("cost_per_hour = nan", "cost_per_hour", ">= 0"),
    ] {
        assert_err(&with_backend0(line), 12, &format!("{b}.{key}"), fragment);
    }
    assert_err(
        &with_backend0("weight = 5\ncapacity = 2"),
        13,
        &format!("{b}.capacity"),
        "not both",
    );
    let cfg = parse(&with_backend0("cost_per_hour = 4.10")).unwrap();
    assert_eq!(cfg.services[0].backends[0].cost_per_hour, Some(4.10));
}

#[test]
fn drain_is_parsed_and_defaults_off() {
    let cfg = parse(&with_backend0("drain = true")).unwrap();
    assert!(cfg.services[0].backends[0].drain);
    let cfg = parse(&with_backend0("weight = 5")).unwrap();
    assert!(!cfg.services[0].backends[0].drain);
    let err = parse(&with_backend0("drain = \"yes\""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("service[0].backend[0].drain"), "{err}");
}
