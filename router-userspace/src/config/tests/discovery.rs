//! `discovery = { kubernetes = { … } }` on a service.

use super::*;

/// BASE's service without backends, with `discovery` on line 8.
fn discovered(discovery: &str) -> String {
    let head: Vec<&str> = BASE.lines().take(7).collect();
    format!("{}\n{discovery}\n", head.join("\n"))
}

#[test]
fn a_discovered_service_parses_with_no_backends() {
    let cfg = parse(&discovered(
        "discovery = { kubernetes = { namespace = \"inference\", service = \"llama\" } }",
    ))
    .unwrap();
    let svc = &cfg.services[0];
    assert!(svc.backends.is_empty());
    assert_eq!(svc.selection, Selection::Maglev);
    assert_eq!(
        svc.discovery,
        Some(KubernetesDiscovery {
            namespace: "inference".into(),
            service: "llama".into(),
            port: None,
            kubeconfig: None,
            capacity: 1.0,
            weight: Some(DEFAULT_WEIGHT),
            telemetry: None,
        })
    );
    let cfg = parse(&discovered(
        "discovery.kubernetes = { namespace = \"a\", service = \"b\", port = \"http\", \
         kubeconfig = \"/etc/router/kubeconfig\", capacity = 2.5 }",
    ))
    .unwrap();
    let d = cfg.services[0].discovery.clone().unwrap();
    assert_eq!(d.port, Some(EndpointPort::Name("http".into())));
    assert_eq!(d.kubeconfig, Some(PathBuf::from("/etc/router/kubeconfig")));
    assert_eq!((d.capacity, d.weight), (2.5, Some(250)));
    let cfg = parse(&discovered(
        "discovery.kubernetes = { namespace = \"a\", service = \"b\", port = 8000 }",
    ))
    .unwrap();
    assert_eq!(
        cfg.services[0].discovery.as_ref().unwrap().port,
        Some(EndpointPort::Number(8000))
    );
    // A static service has none.
    assert_eq!(parse(BASE).unwrap().services[0].discovery, None);
}

#[test]
fn a_discovered_service_with_backends_is_refused() {
    assert_err(
        &insert_after(
            7,
            "discovery = { kubernetes = { namespace = \"a\", service = \"b\" } }",
        ),
        8,
        "service[0].discovery",
        "remove its [[service.backend]] tables",
    );
}

#[test]
fn a_discovered_service_with_pools_is_refused() {
    let text = discovered(
        "discovery = { kubernetes = { namespace = \"a\", service = \"b\" } }\n\n\
         [[service.pool]]\nname = \"p\"\nbackends = [\"gpu-0\"]",
    );
    assert_err(&text, 10, "service[0].pool", "cannot have pools");
}

#[test]
fn discovery_bad_input_names_the_key() {
    let k = "discovery.kubernetes";
    assert_err(
        &discovered("discovery = {}"),
        8,
        "service[0].discovery",
        "needs kubernetes",
    );
    assert_err(
        &discovered(&format!("{k} = {{ namespace = \"\", service = \"b\" }}")),
        8,
        "service[0].discovery.kubernetes.namespace",
        "is not a Kubernetes name",
    );
    assert_err(
        &discovered(&format!(
            "{k} = {{ namespace = \"a\", service = \"Llama\" }}"
        )),
        8,
        "service[0].discovery.kubernetes.service",
        "\"Llama\" is not a Kubernetes name",
    );
    assert_err(
        &discovered(&format!("{k} = {{ namespace = \"a-\", service = \"b\" }}")),
        8,
        "service[0].discovery.kubernetes.namespace",
        "is not a Kubernetes name",
    );
    assert_err(
        &discovered(&format!(
            "{k} = {{ namespace = \"a\", service = \"b\", port = 0 }}"
        )),
        8,
        "service[0].discovery.kubernetes.port",
        "0 is not a port",
    );
    assert_err(
        &discovered(&format!(
            "{k} = {{ namespace = \"a\", service = \"b\", port = 70000 }}"
        )),
        8,
        "service[0].discovery.kubernetes.port",
        "70000 is not a port",
    );
    assert_err(
        &discovered(&format!(
            "{k} = {{ namespace = \"a\", service = \"b\", port = \"\" }}"
        )),
        8,
        "service[0].discovery.kubernetes.port",
        "an empty port name",
    );
    assert_err(
        &discovered(&format!(
            "{k} = {{ namespace = \"a\", service = \"b\", port = 1.5 }}"
        )),
        8,
        "service[0].discovery.kubernetes.port",
        "a port name (string) or number (integer)",
    );
    assert_err(
        &discovered(&format!(
            "{k} = {{ namespace = \"a\", service = \"b\", kubeconfig = \"\" }}"
        )),
        8,
        "service[0].discovery.kubernetes.kubeconfig",
        "an empty path",
    );
    assert_err(
        &discovered(&format!(
            "{k} = {{ namespace = \"a\", service = \"b\", capacity = 0 }}"
        )),
        8,
        "service[0].discovery.kubernetes.capacity",
        "must be a finite number above 0",
    );
    assert_err(
        &discovered(&format!("{k} = {{ namespace = \"a\" }}")),
        8,
        "service[0].discovery.kubernetes",
        "missing field `service`",
    );
    assert_err(
        &discovered(&format!(
            "{k} = {{ namespace = \"a\", service = \"b\", token = \"x\" }}"
        )),
        8,
        "service[0].discovery.kubernetes.token",
        "unknown field `token`",
    );
    assert_err(
        &discovered("discovery = { consul = {} }"),
        8,
        "service[0].discovery.consul",
        "unknown field `consul`",
    );
}

#[test]
fn with_backends_rechecks_the_limits() {
    let cfg = parse(&discovered(
        "discovery = { kubernetes = { namespace = \"a\", service = \"b\" } }",
    ))
    .unwrap();
    let backend = |i: usize| BackendConfig {
        name: format!("pod-{i}"),
        address: SocketAddrV4::new(
            Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250) as u8 + 1),
            8000,
        )
        .into(),
        weight: Some(100),
        capacity: 1.0,
        telemetry: None,
        health: None,
        cost_per_hour: None,
        drain: false,
        max_in_flight: None,
    };
    let two = cfg.with_backends(0, vec![backend(0), backend(1)]).unwrap();
    assert_eq!(two.services[0].backends.len(), 2);
    assert!(
        cfg.services[0].backends.is_empty(),
        "the original is untouched"
    );
    let too_many: Vec<BackendConfig> = (0..=MAX_BACKENDS as usize).map(backend).collect();
    let err = cfg.with_backends(0, too_many).unwrap_err();
    assert!(matches!(err, BackendsError::TooMany(_)), "{err}");
    assert!(err.to_string().contains("at most"), "{err}");
    assert!(cfg.with_backends(1, vec![]).is_err(), "no service 1");
}

#[test]
fn the_daemonset_sample_config_parses() {
    let yaml = include_str!("../../../../deploy/kubernetes/daemonset.yaml");
    let start = yaml
        .find("router.toml: |\n")
        .expect("the ConfigMap's router.toml")
        + 15;
    let toml: String = yaml[start..]
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    let cfg = Config::parse(&toml, "daemonset.yaml").unwrap();
    let d = cfg.services[0].discovery.as_ref().unwrap();
    assert_eq!(
        (d.namespace.as_str(), d.service.as_str()),
        ("inference", "llama")
    );
    assert_eq!(d.port, Some(EndpointPort::Name("http".into())));
    assert!(d.telemetry.is_some());
    assert_eq!(cfg.services[0].selection, Selection::LeastLoaded);
}

#[test]
fn discovered_telemetry_names_each_pod_by_ip() {
    let cfg = parse(&discovered(
        "discovery.kubernetes = { namespace = \"a\", service = \"b\", telemetry = { source = \
         \"prometheus\", url = \"http://{ip}:8000/metrics\", format = \"vllm\" } }",
    ))
    .unwrap();
    let svc = &cfg.services[0];
    let d = svc.discovery.as_ref().unwrap();
    assert_eq!(d.weight, None, "policy-driven");
    assert_eq!(
        svc.selection,
        Selection::LeastLoaded,
        "as for telemetry backends"
    );
    match d.telemetry_for(Ipv4Addr::new(198, 18, 0, 7)) {
        Some(TelemetryConfig::Prometheus { url, format, .. }) => {
            assert_eq!(url, "http://198.18.0.7:8000/metrics");
            assert_eq!(format, PromFormat::Vllm);
        }
        other => panic!("{other:?}"),
    }
    let k = "discovery.kubernetes = { namespace = \"a\", service = \"b\", telemetry";
    assert_err(
        &discovered(&format!(
            "{k} = {{ source = \"prometheus\", url = \"http://198.18.0.7:8000/metrics\" }} }}"
        )),
        8,
        "service[0].discovery.kubernetes.telemetry.url",
        "names no pod: write {ip}",
    );
    assert_err(
        &discovered(&format!("{k} = {{ source = \"nvml\", device = 0 }} }}")),
        8,
        "service[0].discovery.kubernetes.telemetry.source",
        "discovered pods run elsewhere",
    );
    assert_err(
        &discovered(&format!("{k} = {{ source = \"prometheus\" }} }}")),
        8,
        "service[0].discovery.kubernetes.telemetry",
        "needs `url`",
    );
    assert_err(
        &discovered(&format!(
            "{k} = {{ source = \"prometheus\", url = \"ftp://{{ip}}/metrics\" }} }}"
        )),
        8,
        "service[0].discovery.kubernetes.telemetry.url",
        "ftp",
    );
}
