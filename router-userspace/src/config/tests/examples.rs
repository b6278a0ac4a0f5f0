//! The shipped examples, defaults and the accepted forms of each key.

use super::*;

#[test]
fn example_parses() {
    let cfg = Config::parse(EXAMPLE, "examples/router.toml").expect("example must parse");
    assert_eq!(cfg.daemon.interfaces, ["eth0"]);
    assert_eq!(cfg.services.len(), 1);
    let svc = &cfg.services[0];
    assert_eq!(svc.name, "llama");
    assert_eq!(svc.vip, "198.18.100.1:8000".parse().unwrap());
    assert_eq!(svc.snat, [IpAddr::from(Ipv4Addr::new(198, 18, 0, 1))]);
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
fn two_arm_host(name: &str) -> Option<Vec<IpAddr>> {
    let addrs = match name {
        "eth0" => vec![Ipv4Addr::new(198, 18, 1, 1)],
        "eth1" => vec![
            Ipv4Addr::new(198, 18, 2, 1),
            Ipv4Addr::new(198, 18, 2, 2),
            Ipv4Addr::new(198, 18, 2, 3),
        ],
        _ => return None,
    };
    Some(addrs.into_iter().map(IpAddr::from).collect())
}

#[test]
fn two_arm_example_parses() {
    let cfg = Config::parse(TWO_ARM_EXAMPLE, "examples/two-arm.toml").expect("example must parse");
    assert_eq!(cfg.daemon.interfaces, ["eth0", "eth1"]);
    assert_eq!(cfg.policy, PolicyConfig::default());
    let backend_net = |a: IpAddr| match a {
        IpAddr::V4(a) => a.octets()[..3] == [198, 18, 2],
        IpAddr::V6(_) => false,
    };
    let names: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["llama-70b", "llama-8b"]);
    let big = &cfg.services[0];
    assert_eq!(big.fallback.as_deref(), Some("llama-8b"));
    assert_eq!(
        big.snat,
        [
            IpAddr::from(Ipv4Addr::new(198, 18, 2, 2)),
            Ipv4Addr::new(198, 18, 2, 3).into()
        ]
    );
    let capacities: Vec<f64> = big.backends.iter().map(|b| b.capacity).collect();
    assert_eq!(capacities, [1.0, 1.0, 2.0]);
    for svc in &cfg.services {
        assert!(svc.snat.iter().all(|&a| backend_net(a)), "{}", svc.name);
        for b in &svc.backends {
            // Reached through eth1, weighed by the engine's own metrics.
            let std::net::IpAddr::V4(ip) = b.address.ip() else {
                panic!("{} is not IPv4", b.name)
            };
            assert!(backend_net(ip.into()), "{}", b.name);
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
        two_arm_host(name).map(|a| {
            a.into_iter()
                .filter(|a| *a != IpAddr::from(Ipv4Addr::new(198, 18, 2, 3)))
                .collect()
        })
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
                ca_file: None,
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
            hash_seed: None,
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

#[test]
fn pools_example_parses() {
    let text = include_str!("../../../../examples/pools.toml");
    let cfg = Config::parse(text, "examples/pools.toml").expect("pools example must parse");
    let svc = &cfg.services[0];
    let pools: Vec<(&str, u32, Option<usize>)> = svc
        .pools
        .iter()
        .map(|p| (p.name.as_str(), p.share, p.fallback))
        .collect();
    assert_eq!(
        pools,
        [
            ("stable", 90, Some(2)),
            ("canary", 10, None),
            ("overflow", 0, None)
        ]
    );
    assert!(svc.pools[1].guard.is_some());
    assert_eq!(svc.segments.len(), 1);
    assert_eq!(svc.segments[0].pool, 1);
}
