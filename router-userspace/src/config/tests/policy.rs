//! `[policy]`: defaults, explicit values and every refusal.

use super::*;

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
