use super::*;

const CFG: &str = r#"
[daemon]
interface = "lb0"

[policy]
slow_start = "1ms"

[[service]]
name = "llama"
vip = "198.18.100.1:8000"
snat = "198.18.0.1"
fallback = "spare"
selection = "maglev"

[[service.backend]]
name = "gpu-0"
address = "198.18.0.11:8000"
telemetry = { source = "prometheus", url = "http://198.18.0.11:8000/metrics", format = "vllm" }

[[service.backend]]
name = "gpu-1"
address = "198.18.0.12:8000"
telemetry = { source = "prometheus", url = "http://198.18.0.12:8000/metrics", format = "vllm" }

[[service]]
name = "spare"
vip = "198.18.100.2:8000"
snat = "198.18.0.1"

[[service.backend]]
name = "cpu-pool"
address = "198.18.0.21:8000"
weight = 100
"#;

fn load(kv: f64) -> Result<Reading, TelemetryError> {
    Ok(Reading {
        kv_cache_usage: Some(kv),
        requests_running: Some(1.0),
        requests_waiting: Some(0.0),
        ..Reading::default()
    })
}

fn round(ctl: &mut Controller, cfg: &Config, t: u64, kv: f64) -> (Vec<ServiceSpec>, bool) {
    let now = Duration::from_millis(t * 500);
    for b in 0..2 {
        ctl.record_reading(0, b, now, load(kv));
    }
    ctl.decide(now, cfg, &|_, _| None)
}

fn weight(specs: &[ServiceSpec], name: &str) -> u32 {
    specs[0]
        .backends
        .iter()
        .find(|b| b.name == name)
        .unwrap()
        .weight
}

#[test]
fn overflow_goes_to_the_fallback_only_while_everything_is_saturated() {
    let cfg = Config::parse(CFG, "t.toml").unwrap();
    let mut ctl = Controller::new(&cfg, None);
    let mut specs = Vec::new();
    for t in 0..4 {
        specs = round(&mut ctl, &cfg, t, 0.3).0;
    }
    assert_eq!(weight(&specs, "fallback/cpu-pool"), 0, "present, unused");
    assert!(weight(&specs, "gpu-0") > 2);
    let mut t = 4;
    for _ in 0..3 {
        specs = round(&mut ctl, &cfg, t, 1.0).0;
        t += 1;
    }
    assert_eq!(
        ctl.all_saturated_ticks, 2,
        "saturated after two raw readings"
    );
    assert_eq!(
        weight(&specs, "fallback/cpu-pool"),
        100,
        "overflow at the fallback's weight"
    );
    assert!(weight(&specs, "gpu-0") <= 2, "primaries at their floors");
    for _ in 0..4 {
        specs = round(&mut ctl, &cfg, t, 0.3).0;
        t += 1;
    }
    assert_eq!(
        weight(&specs, "fallback/cpu-pool"),
        0,
        "overflow ends with saturation"
    );
}

#[test]
fn fallback_must_name_another_service_of_the_same_protocol() {
    for (bad, msg) in [
        ("fallback = \"nope\"", "no service named"),
        ("fallback = \"llama\"", "its own fallback"),
    ] {
        let text = CFG.replace("fallback = \"spare\"", bad);
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains("service[0].fallback") && err.contains(msg),
            "{err}"
        );
    }
}

const HEALTH_CFG: &str = r#"
[daemon]
interface = "lb0"

[[service]]
name = "llama"
vip = "198.18.100.1:8000"
snat = "198.18.0.1"

[[service.backend]]
name = "gpu-0"
address = "198.18.0.11:8000"
weight = 100
health = { tcp = true, interval = "1s", timeout = "500ms", fall = 2, rise = 2 }

[[service.backend]]
name = "gpu-1"
address = "198.18.0.12:8000"
weight = 100
health = { tcp = true, interval = "1s", timeout = "500ms", fall = 2, rise = 2 }
"#;

/// One probe round with `result(backend)` for each backend, then the
/// policy; returns both weights.
fn probe_round(
    ctl: &mut Controller,
    cfg: &Config,
    result: impl Fn(usize) -> Result<(), ProbeFailure>,
) -> [u32; 2] {
    for b in 0..2 {
        ctl.record_probe(0, b, result(b));
    }
    let (specs, _) = ctl.decide(Duration::ZERO, cfg, &|_, _| None);
    [weight(&specs, "gpu-0"), weight(&specs, "gpu-1")]
}

fn emfile(_: usize) -> Result<(), ProbeFailure> {
    Err(ProbeFailure::local(
        "TCP connect to 198.18.0.11:8000: Too many open files (os error 24)",
    ))
}

#[test]
fn probes_failing_on_local_errors_keep_the_last_weights() {
    let cfg = Config::parse(HEALTH_CFG, "t.toml").unwrap();
    let mut ctl = Controller::new(&cfg, None);
    assert_eq!(probe_round(&mut ctl, &cfg, |_| Ok(())), [100, 100]);

    // The daemon is out of file descriptors: every probe of the service
    // fails locally, far more than `fall` times. Nothing changes.
    for _ in 0..10 {
        assert_eq!(probe_round(&mut ctl, &cfg, emfile), [100, 100]);
    }
    assert_eq!(ctl.health_local_errors, 20);
    assert_eq!(ctl.health_local_episodes, 1, "one episode, logged once");
    assert!(
        ctl.status(Duration::ZERO)
            .iter()
            .all(|b| b.healthy == Some(true))
    );

    // Probes run again: a backend that is really down now goes, after
    // `fall` failures of its own (the local ones did not count).
    let refused = |b: usize| {
        if b == 0 {
            Err(ProbeFailure::backend("TCP connect: Connection refused"))
        } else {
            Ok(())
        }
    };
    assert_eq!(probe_round(&mut ctl, &cfg, refused), [100, 100]);
    assert_eq!(probe_round(&mut ctl, &cfg, refused), [0, 100]);

    // A new episode is a new log line; an unhealthy backend stays so.
    assert_eq!(probe_round(&mut ctl, &cfg, emfile), [0, 100]);
    assert_eq!(ctl.health_local_episodes, 2);
    assert_eq!(ctl.health_local_errors, 22);
    // Every probe counts as done, whatever it found: 14 rounds of 2.
    assert_eq!(ctl.health_probes_done, 28);
}

#[test]
fn the_same_failures_from_the_backends_take_them_out() {
    let cfg = Config::parse(HEALTH_CFG, "t.toml").unwrap();
    let mut ctl = Controller::new(&cfg, None);
    assert_eq!(probe_round(&mut ctl, &cfg, |_| Ok(())), [100, 100]);
    let down = |_| Err(ProbeFailure::backend("TCP connect: Connection refused"));
    assert_eq!(probe_round(&mut ctl, &cfg, down), [100, 100]);
    assert_eq!(probe_round(&mut ctl, &cfg, down), [0, 0]);
    assert_eq!(ctl.health_local_errors, 0);
}

#[test]
fn counts_of_local_failures_survive_a_reload() {
    let cfg = Config::parse(HEALTH_CFG, "t.toml").unwrap();
    let mut ctl = Controller::new(&cfg, None);
    probe_round(&mut ctl, &cfg, emfile);
    let ctl = Controller::new(&cfg, Some(ctl));
    assert_eq!((ctl.health_local_errors, ctl.health_local_episodes), (2, 1));
    assert_eq!(ctl.health_probes_done, 2);
}

#[test]
fn ticks_date_readings_and_weight_changes_and_survive_a_reload() {
    let cfg = Config::parse(CFG, "t.toml").unwrap();
    let mut ctl = Controller::new(&cfg, None);
    let gpu0 = |ctl: &Controller| {
        ctl.status(Duration::ZERO)
            .into_iter()
            .find(|b| b.backend == "gpu-0")
            .unwrap()
    };
    assert_eq!(gpu0(&ctl).telemetry_tick, None, "no reading yet");
    for t in 0..4 {
        round(&mut ctl, &cfg, t, 0.3);
    }
    assert_eq!(ctl.policy_ticks, 4);
    assert_eq!(
        gpu0(&ctl).telemetry_tick,
        Some(4),
        "the tick that took it in"
    );

    // Saturation cuts the weight on the tick of the second saturated
    // reading (`saturation_confirm`), and that is the tick recorded.
    round(&mut ctl, &cfg, 4, 1.0);
    let before = gpu0(&ctl).weight;
    round(&mut ctl, &cfg, 5, 1.0);
    let p = gpu0(&ctl);
    assert!(p.weight < before, "{before} → {}", p.weight);
    assert_eq!((p.telemetry_tick, p.last_change_tick), (Some(6), Some(6)));

    // A failed poll leaves the reading, and so its tick, as it was; the
    // policy still ticks.
    ctl.record_reading(
        0,
        0,
        Duration::from_secs(3),
        Err(TelemetryError::Timeout(Duration::from_millis(400))),
    );
    ctl.decide(Duration::from_secs(3), &cfg, &|_, _| None);
    assert_eq!((ctl.policy_ticks, gpu0(&ctl).telemetry_tick), (7, Some(6)));

    let ctl = Controller::new(&cfg, Some(ctl));
    assert_eq!(ctl.policy_ticks, 7, "the tick clock runs on across reloads");
    assert_eq!(gpu0(&ctl).last_change_tick, Some(6));
}
