//! `[policy]` and its signal mix.
use super::{
    super::{
        locate::{KeyPath, Locator},
        raw::*,
    },
    *,
};

pub(in crate::config) fn validate_policy(
    loc: &Locator<'_>,
    raw: RawPolicy,
) -> Result<PolicyConfig, ConfigError> {
    let base = KeyPath::default().key("policy");
    let d = PolicyConfig::default();
    let duration = |name: &str, raw: &Option<String>, default: Duration| match raw {
        None => Ok(default),
        Some(s) => parse_duration(s).map_err(|m| loc.err(&base.key(name), m)),
    };
    // `!(ok)` rather than the negated comparison, so NaN (TOML `nan`) fails.
    let number = |name: &str, raw: Option<f64>, default: f64, ok: fn(f64) -> bool, want: &str| {
        let v = raw.unwrap_or(default);
        if ok(v) {
            Ok(v)
        } else {
            Err(loc.err(&base.key(name), format!("{v} must be {want}")))
        }
    };
    let unit = |x: f64| 0.0 < x && x <= 1.0;

    let poll_interval = duration("poll_interval", &raw.poll_interval, d.poll_interval)?;
    if poll_interval < MIN_POLL_INTERVAL {
        return Err(loc.err(
            &base.key("poll_interval"),
            format!("{poll_interval:?} is below the minimum {MIN_POLL_INTERVAL:?}"),
        ));
    }
    let saturation = number(
        "saturation",
        raw.saturation,
        d.saturation,
        unit,
        "in (0, 1]",
    )?;
    let target_utilization = raw.target_utilization.unwrap_or(d.target_utilization);
    if !(0.0 < target_utilization && target_utilization < saturation) {
        // Name the key that was written; with both written, the target.
        let key = if raw.target_utilization.is_none() {
            "saturation"
        } else {
            "target_utilization"
        };
        return Err(loc.err(
            &base.key(key),
            format!(
                "need 0 < target_utilization ({target_utilization}) < saturation ({saturation}) <= 1"
            ),
        ));
    }
    let hysteresis = raw.hysteresis.unwrap_or(d.hysteresis);
    if !(0.0 <= hysteresis && hysteresis < saturation) {
        return Err(loc.err(
            &base.key("hysteresis"),
            format!("{hysteresis} must be >= 0 and below saturation ({saturation})"),
        ));
    }
    let saturation_confirm = raw.saturation_confirm.unwrap_or(d.saturation_confirm);
    if saturation_confirm == 0 {
        return Err(loc.err(&base.key("saturation_confirm"), "must be at least 1"));
    }
    let ewma_alpha = number(
        "ewma_alpha",
        raw.ewma_alpha,
        d.ewma_alpha,
        unit,
        "in (0, 1]",
    )?;
    let slow_start = duration("slow_start", &raw.slow_start, d.slow_start)?;
    let slow_start_aggression = number(
        "slow_start_aggression",
        raw.slow_start_aggression,
        d.slow_start_aggression,
        |x| x.is_finite() && x > 0.0,
        "a finite number above 0",
    )?;
    let min_weight_fraction = number(
        "min_weight_fraction",
        raw.min_weight_fraction,
        d.min_weight_fraction,
        unit,
        "in (0, 1]",
    )?;
    let max_step_fraction = number(
        "max_step_fraction",
        raw.max_step_fraction,
        d.max_step_fraction,
        unit,
        "in (0, 1]",
    )?;
    let weight_gain = number(
        "weight_gain",
        raw.weight_gain,
        d.weight_gain,
        unit,
        "in (0, 1]",
    )?;
    let weight_deadband = number(
        "weight_deadband",
        raw.weight_deadband,
        d.weight_deadband,
        |x| x.is_finite() && (0.0..1.0).contains(&x),
        "in [0, 1)",
    )?;
    let stale_after = duration("stale_after", &raw.stale_after, d.stale_after)?;
    if stale_after <= poll_interval {
        return Err(loc.err(
            &base.key("stale_after"),
            format!(
                "{stale_after:?} must exceed poll_interval ({poll_interval:?}), or every reading would be stale"
            ),
        ));
    }
    let stale_decay = duration("stale_decay", &raw.stale_decay, d.stale_decay)?;
    let stale_fraction = number(
        "stale_fraction",
        raw.stale_fraction,
        d.stale_fraction,
        unit,
        "in (0, 1]",
    )?;
    let full_weight = raw.full_weight.unwrap_or(d.full_weight);
    if !(1..=MAX_FULL_WEIGHT).contains(&full_weight) {
        return Err(loc.err(
            &base.key("full_weight"),
            format!("{full_weight} must be 1 to {MAX_FULL_WEIGHT}"),
        ));
    }
    let signal = validate_signal(loc, &base.key("signal"), raw.signal.unwrap_or_default())?;
    let speed_window = duration("speed_window", &raw.speed_window, d.speed_window)?;
    if speed_window < poll_interval {
        return Err(loc.err(
            &base.key("speed_window"),
            format!(
                "{speed_window:?} must be at least poll_interval ({poll_interval:?}): a window shorter than one poll measures nothing"
            ),
        ));
    }
    let capacity_deadband = number(
        "capacity_deadband",
        raw.capacity_deadband,
        d.capacity_deadband,
        |x| x.is_finite() && (0.0..1.0).contains(&x),
        "in [0, 1)",
    )?;
    Ok(PolicyConfig {
        poll_interval,
        target_utilization,
        saturation,
        hysteresis,
        saturation_confirm,
        ewma_alpha,
        slow_start,
        slow_start_aggression,
        min_weight_fraction,
        max_step_fraction,
        weight_gain,
        weight_deadband,
        stale_after,
        stale_decay,
        stale_fraction,
        signal,
        full_weight,
        speed_window,
        capacity_deadband,
    })
}

pub(in crate::config) fn validate_signal(
    loc: &Locator<'_>,
    base: &KeyPath,
    raw: RawSignal,
) -> Result<SignalMix, ConfigError> {
    let d = SignalMix::default();
    let factor = |name: &str, v: Option<f64>, default: f64| {
        let v = v.unwrap_or(default);
        if (0.0..=1.0).contains(&v) {
            Ok(v)
        } else {
            Err(loc.err(
                &base.key(name),
                format!("{v} must be in [0, 1] (0 disables the signal)"),
            ))
        }
    };
    let gpu_util = factor("gpu_util", raw.gpu_util, d.gpu_util)?;
    let kv_cache = factor("kv_cache", raw.kv_cache, d.kv_cache)?;
    let queue = factor("queue", raw.queue, d.queue)?;
    let queue_norm = raw.queue_norm.unwrap_or(d.queue_norm);
    if !(queue_norm.is_finite() && queue_norm > 0.0) {
        return Err(loc.err(
            &base.key("queue_norm"),
            format!("{queue_norm} must be a finite number above 0"),
        ));
    }
    if gpu_util == 0.0 && kv_cache == 0.0 && queue == 0.0 {
        return Err(loc.err(
            base,
            "every signal is disabled; the policy would see no load at all",
        ));
    }
    Ok(SignalMix {
        gpu_util,
        kv_cache,
        queue,
        queue_norm,
    })
}
