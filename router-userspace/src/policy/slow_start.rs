//! The slow-start ramp (Envoy's formula). Owns only the arithmetic of the
//! factor; when a window starts is the policy's business.

use std::time::Duration;

/// Weight multiplier `elapsed` into a `window`:
/// `max(min_factor, (elapsed / window)^(1 / aggression))`, 1.0 once the
/// window is over. Aggression 1 is linear; above 1 ramps faster early.
pub fn factor(elapsed: Duration, window: Duration, aggression: f64, min_factor: f64) -> f64 {
    if window.is_zero() || elapsed >= window {
        return 1.0;
    }
    let progress = progress(elapsed, window);
    // powf can differ in the last bit across libms; the linear default
    // skips it so every ingress node computes identical weights.
    let ramp = if aggression == 1.0 {
        progress
    } else {
        progress.powf(1.0 / aggression)
    };
    ramp.max(min_factor).min(1.0)
}

/// Fraction of the window elapsed, 0.0–1.0.
pub fn progress(elapsed: Duration, window: Duration) -> f64 {
    if window.is_zero() {
        return 1.0;
    }
    (elapsed.as_secs_f64() / window.as_secs_f64()).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(30);

    #[test]
    fn linear_ramp_with_floor() {
        assert_eq!(factor(Duration::ZERO, W, 1.0, 0.02), 0.02);
        assert!((factor(Duration::from_secs(15), W, 1.0, 0.02) - 0.5).abs() < 1e-12);
        assert_eq!(factor(W, W, 1.0, 0.02), 1.0);
        assert_eq!(factor(Duration::from_secs(99), W, 1.0, 0.02), 1.0);
    }

    #[test]
    fn aggression_ramps_faster_early() {
        let early = Duration::from_secs(3);
        let linear = factor(early, W, 1.0, 0.0);
        let aggressive = factor(early, W, 2.0, 0.0);
        assert!(aggressive > linear, "{aggressive} <= {linear}");
        assert!((aggressive - 0.1f64.sqrt()).abs() < 1e-12);
    }
}
