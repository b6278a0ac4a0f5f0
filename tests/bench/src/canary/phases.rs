//! A canary run's figures: client-side time to first token and end-to-end
//! time, by phase (when a request was sent) and by the pool whose replica
//! served it.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use super::{CANARY, rig::backend_name};
use crate::{
    loadgen::{StreamRun, StreamSample},
    report::percentile,
};

/// Requests sent in [from, to), seconds into the run.
pub struct Phase {
    pub name: &'static str,
    pub from: f64,
    pub to: f64,
}

impl Phase {
    pub fn new(name: &'static str, from: f64, to: f64) -> Self {
        Self { name, from, to }
    }

    fn holds(&self, t: f64) -> bool {
        t >= self.from && t < self.to
    }
}

fn pool_of(s: &StreamSample) -> &'static str {
    if s.replica == backend_name(CANARY) {
        "canary"
    } else {
        "stable"
    }
}

fn stats<'a>(samples: impl Iterator<Item = &'a StreamSample>) -> Value {
    let (ttft, e2e): (Vec<f64>, Vec<f64>) = samples.map(|s| (s.ttft_ms, s.e2e_ms)).unzip();
    let q = |v: &[f64], p: f64| {
        let x = percentile(v, p);
        if x.is_nan() { Value::Null } else { json!(x) }
    };
    json!({
        "requests": ttft.len(),
        "ttft_p50_ms": q(&ttft, 0.5),
        "ttft_p99_ms": q(&ttft, 0.99),
        "e2e_p50_ms": q(&e2e, 0.5),
        "e2e_p99_ms": q(&e2e, 0.99),
    })
}

/// One phase: its span, errors, and the figures of all its requests and of
/// each pool's. Requests sent before `warmup_s` are never counted.
pub fn phase_json(p: &Phase, run: &StreamRun, warmup_s: f64) -> Value {
    let from = p.from.max(warmup_s);
    let span = Phase::new(p.name, from, p.to.max(from));
    let mine: Vec<&StreamSample> = run
        .samples
        .iter()
        .filter(|s| span.holds(s.sent_s))
        .collect();
    let errors = run.error_sent_s.iter().filter(|&&t| span.holds(t)).count();
    json!({
        "phase": p.name,
        "from_s": span.from,
        "to_s": span.to,
        "errors": errors,
        "all": stats(mine.iter().copied()),
        "stable": stats(mine.iter().copied().filter(|s| pool_of(s) == "stable")),
        "canary": stats(mine.iter().copied().filter(|s| pool_of(s) == "canary")),
    })
}

/// Client addresses served by both pools among the requests sent before
/// `before_s`: the share split is sticky per address, so 0 while the
/// shares are unchanged.
pub fn clients_in_two_pools(samples: &[StreamSample], before_s: f64) -> usize {
    let mut pools: BTreeMap<_, BTreeSet<&str>> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.sent_s < before_s) {
        if let Some(src) = s.source {
            pools.entry(src).or_default().insert(pool_of(s));
        }
    }
    pools.values().filter(|p| p.len() > 1).count()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn sample(sent_s: f64, ttft_ms: f64, replica: usize, source: u8) -> StreamSample {
        StreamSample {
            sent_s,
            max_tokens: 16,
            ttft_ms,
            e2e_ms: ttft_ms * 10.0,
            replica: backend_name(replica),
            source: Some(Ipv4Addr::new(198, 19, 1, source)),
        }
    }

    #[test]
    fn phases_split_by_sent_time_and_pool() {
        let run = StreamRun {
            samples: vec![
                sample(1.0, 999.0, 0, 1), // warm-up: never counted
                sample(6.0, 20.0, 0, 1),
                sample(7.0, 30.0, CANARY, 2),
                sample(31.0, 400.0, CANARY, 2),
                sample(32.0, 25.0, 1, 3),
            ],
            error_sent_s: vec![2.0, 33.0],
            ..StreamRun::default()
        };
        let healthy = phase_json(&Phase::new("healthy", 0.0, 30.0), &run, 5.0);
        assert_eq!(healthy["from_s"], 5.0);
        assert_eq!(healthy["all"]["requests"], 2);
        assert_eq!(healthy["stable"]["ttft_p99_ms"], 20.0);
        assert_eq!(healthy["canary"]["ttft_p99_ms"], 30.0);
        assert_eq!(healthy["errors"], 0);
        let slowed = phase_json(&Phase::new("slowed", 30.0, 90.0), &run, 5.0);
        assert_eq!(slowed["canary"]["ttft_p50_ms"], 400.0);
        assert_eq!(slowed["stable"]["e2e_p99_ms"], 250.0);
        assert_eq!(slowed["errors"], 1);
        // No trip: the phase after it is empty, its figures null.
        let none = phase_json(&Phase::new("after_trip", 90.0, 90.0), &run, 5.0);
        assert_eq!(none["all"]["requests"], 0);
        assert!(none["all"]["ttft_p99_ms"].is_null());
    }

    #[test]
    fn a_client_in_two_pools_is_counted_before_the_trip_only() {
        let samples = vec![
            sample(6.0, 20.0, 0, 1),
            sample(7.0, 20.0, CANARY, 2),
            sample(40.0, 20.0, 0, 2), // after the trip: moved, as it must
        ];
        assert_eq!(clients_in_two_pools(&samples, 35.0), 0);
        assert_eq!(clients_in_two_pools(&samples, f64::INFINITY), 1);
    }
}
