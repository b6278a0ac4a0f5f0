//! A backend's weight source, telemetry, health, capacity, cost and drain.

use super::*;

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
                ca_file: None,
            },
        ),
        (
            r#"telemetry = { source = "agent", url = "https://198.18.0.11:9400", device = 1, token_file = "/t", ca_file = "/etc/router/agent-ca.pem" }"#,
            TelemetryConfig::Agent {
                url: "https://198.18.0.11:9400".into(),
                device: DeviceSelector::Index(1),
                token_file: "/t".into(),
                ca_file: Some("/etc/router/agent-ca.pem".into()),
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
            "an https:// agent needs `ca_file`",
        ),
        (
            r#"{ source = "agent", url = "http://h:9400", device = 0, token_file = "/t", ca_file = "/ca.pem" }"#,
            "ca_file",
            "applies to https:// agents only",
        ),
        (
            r#"{ source = "agent", url = "https://h:9400", device = 0, token_file = "/t", ca_file = "" }"#,
            "ca_file",
            "must not be empty",
        ),
        (
            r#"{ source = "agent", url = "ftp://h:9400", device = 0, token_file = "/t" }"#,
            "url",
            "scheme ftp:// is not supported, only http:// and https://",
        ),
        (
            r#"{ source = "prometheus", url = "https://h/metrics", format = "vllm" }"#,
            "url",
            "scheme https:// is not supported, only http://",
        ),
        (
            r#"{ source = "prometheus", url = "http://h/metrics", format = "vllm", ca_file = "/ca.pem" }"#,
            "ca_file",
            "does not apply to source \"prometheus\"",
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
