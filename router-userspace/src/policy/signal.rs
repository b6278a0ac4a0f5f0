//! Turns one telemetry `Reading` into a single load figure in 0.0–1.0 and
//! smooths it. Owns the signal mix and the EWMA arithmetic; must never look
//! at time, health or weights.

use crate::telemetry::Reading;

/// How a `Reading` becomes one load figure.
///
/// load = max over the enabled signals of `factor × signal`, where the
/// signals are `gpu_util`, `kv_cache_usage` and
/// `min(requests_waiting / queue_norm, 1)`. A factor of 0 disables a
/// signal; a factor of 0.5 means that signal at 100% counts as 50% load.
///
/// The maximum, not a weighted mean, because a replica is as loaded as its
/// tightest resource: a full KV cache stalls new requests even while the
/// SMs idle, and a mean would report it half loaded.
#[derive(Clone, Debug, PartialEq)]
pub struct SignalMix {
    pub gpu_util: f64,
    pub kv_cache: f64,
    pub queue: f64,
    /// Waiting requests that count as a full queue (load 1.0).
    pub queue_norm: f64,
}

impl Default for SignalMix {
    fn default() -> Self {
        SignalMix {
            gpu_util: 1.0,
            kv_cache: 1.0,
            queue: 1.0,
            // vLLM and SGLang queue only once the running batch is full, so
            // a handful of waiting requests already means saturation.
            queue_norm: 8.0,
        }
    }
}

/// The load a reading shows, or `None` when it carries none of the enabled
/// signals (such a reading is no evidence of load and must not count as
/// idle).
pub fn load(reading: &Reading, mix: &SignalMix) -> Option<f64> {
    let queue = reading.requests_waiting.map(|w| {
        if mix.queue_norm > 0.0 {
            (w / mix.queue_norm).min(1.0)
        } else {
            1.0
        }
    });
    // Fixed order and plain max: every node computes the same bits.
    [
        (mix.gpu_util, reading.gpu_util),
        (mix.kv_cache, reading.kv_cache_usage),
        (mix.queue, queue),
    ]
    .into_iter()
    .filter(|(factor, _)| *factor > 0.0)
    .filter_map(|(factor, v)| {
        v.filter(|x| x.is_finite())
            .map(|x| factor * x.clamp(0.0, 1.0))
    })
    .reduce(f64::max)
}

/// Next EWMA value. The first sample seeds the average: starting from 0
/// would report a busy replica as idle for several polls.
pub fn ewma(prev: Option<f64>, sample: f64, alpha: f64) -> f64 {
    match prev {
        None => sample,
        Some(p) => alpha * sample + (1.0 - alpha) * p,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(gpu: Option<f64>, kv: Option<f64>, waiting: Option<f64>) -> Reading {
        Reading {
            gpu_util: gpu,
            kv_cache_usage: kv,
            requests_waiting: waiting,
            ..Reading::default()
        }
    }

    #[test]
    fn max_of_enabled_signals() {
        let mix = SignalMix::default();
        assert_eq!(load(&r(Some(0.3), Some(0.7), Some(2.0)), &mix), Some(0.7));
        assert_eq!(load(&r(Some(0.3), None, Some(4.0)), &mix), Some(0.5));
        assert_eq!(load(&r(None, None, Some(80.0)), &mix), Some(1.0));
        let no_gpu = SignalMix {
            gpu_util: 0.0,
            ..mix.clone()
        };
        assert_eq!(load(&r(Some(1.0), Some(0.2), None), &no_gpu), Some(0.2));
        assert_eq!(load(&r(Some(1.0), None, None), &no_gpu), None);
        let half = SignalMix {
            gpu_util: 0.5,
            ..mix
        };
        assert_eq!(load(&r(Some(1.0), None, None), &half), Some(0.5));
    }

    #[test]
    fn reading_without_signals_is_not_idle() {
        let only_power = Reading {
            power_watts: Some(300.0),
            ..Reading::default()
        };
        assert_eq!(load(&only_power, &SignalMix::default()), None);
    }

    #[test]
    fn ewma_seeds_then_smooths() {
        assert_eq!(ewma(None, 0.9, 0.3), 0.9);
        let next = ewma(Some(0.3), 1.0, 0.3);
        assert!((next - 0.51).abs() < 1e-12);
    }
}
