//! `bench canary`: a canary rollout on a routing run, and its rollback
//! guard. Four mock GPU replicas (the routing suite's engine): `stable`
//! holds three, `canary` one and 10% of the clients, by share. Streaming
//! completions arrive open-loop from 200 client addresses (the share split
//! is sticky per address). Part-way through each run the canary's replica
//! becomes four times slower, as a bad model build would be.
//!
//! Two arms on the same arrivals, lengths and client addresses (one seed
//! per run, the same for both):
//! - *guarded*: the canary pool has `guard = { ttft_p99_ratio = 1.5,
//!   min_connections = N }`; the guard should trip and send the canary's
//!   clients back to stable;
//! - *unguarded*: no guard; the canary's clients stay on the slow replica.
//!
//! Measured per run: whether and when the guard tripped (after the
//! slowdown; any trip before it is a false alarm), and client-side time to
//! first token and end-to-end time per phase and pool, so the report can
//! show both what the guard saves the canary's clients and what taking
//! them on costs the stable pool.

use std::{net::Ipv4Addr, path::Path};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

mod phases;
mod rig;

use phases::{Phase, phase_json};
use rig::{Arm, Rig};

/// The canary pool's replica (the last one); the others are stable's.
pub const CANARY: usize = 3;
pub const REPLICAS: usize = 4;

pub struct CanarySettings {
    pub quick: bool,
    /// Runs per arm, each with its own seed (the same for both arms).
    pub seeds: usize,
    /// Seconds of arrivals per run; requests sent in the first `warmup_s`
    /// are not measured.
    pub secs: f64,
    pub warmup_s: f64,
    /// When the canary's replica slows down.
    pub slow_at_s: f64,
    /// Its speed from then on (1.0 before).
    pub slow_speed: f64,
    /// Offered load, as a fraction of the four replicas' capacity.
    pub load: f64,
    /// The canary pool's share, percent.
    pub canary_share: u32,
    pub guard_ratio: f64,
    pub guard_min_connections: u64,
}

impl CanarySettings {
    /// About 12 minutes on a 2-core machine: 2 arms × 3 seeds × (90 s of
    /// arrivals + the tail and the setup).
    pub fn full() -> Self {
        Self {
            quick: false,
            seeds: 3,
            secs: 90.0,
            warmup_s: 5.0,
            // Long enough for a healthy verdict or two first: at 60% load
            // the canary's 10% is about 2.9 requests/s, so a window of 50
            // of its connections takes about 17 s.
            slow_at_s: 30.0,
            slow_speed: 0.25,
            // 60% of the fleet: stable's three replicas run at 72% of their
            // capacity, and at 80% once they take the canary's clients too,
            // so what they give up for it stays visible rather than queued.
            load: 0.6,
            canary_share: 10,
            // The example ratio; 50 connections a window rather
            // than 200, so a 10% canary is judged every 17 s, not 70 s.
            guard_ratio: 1.5,
            guard_min_connections: 50,
        }
    }

    /// One short seed per arm: shows the suite still runs.
    pub fn quick() -> Self {
        Self {
            quick: true,
            seeds: 1,
            secs: 24.0,
            warmup_s: 2.0,
            slow_at_s: 8.0,
            guard_min_connections: 10,
            ..Self::full()
        }
    }

    /// Offered requests per second (constant over the run).
    pub fn rate(&self) -> f64 {
        self.load * rig::unit_capacity() * REPLICAS as f64
    }

    fn seed(i: usize) -> u64 {
        7_000 + i as u64
    }

    fn json(&self) -> Value {
        json!({
            "seeds": self.seeds,
            "secs": self.secs,
            "warmup_s": self.warmup_s,
            "slow_at_s": self.slow_at_s,
            "slow_speed": self.slow_speed,
            "load": self.load,
            "offered_rps": self.rate(),
            "canary_share": self.canary_share,
            "guard_ratio": self.guard_ratio,
            "guard_min_connections": self.guard_min_connections,
            "clients": rig::CLIENTS,
            "replicas": REPLICAS,
            "canary_replica": rig::backend_name(CANARY),
        })
    }
}

/// One run's JSON: the guard's course and every phase's figures.
fn run_json(arm: Arm, seed: u64, s: &CanarySettings, out: &rig::RunOut) -> Value {
    let trip_s = out.trip.as_ref().map(|t| t.at_s);
    // Phases by when a request was sent: healthy before the slowdown;
    // after it, until the trip (or the end) and from the trip.
    let slowed_end = trip_s.unwrap_or(s.secs).max(s.slow_at_s);
    let phases = [
        Phase::new("healthy", s.warmup_s, s.slow_at_s),
        Phase::new("slowed", s.slow_at_s, slowed_end),
        Phase::new("after_trip", slowed_end, s.secs),
        Phase::new("after_slowdown", s.slow_at_s, s.secs),
    ];
    json!({
        "arm": arm.key(),
        "seed": seed,
        "arrivals": out.stream.arrivals,
        "errors": out.stream.errors,
        "error_samples": out.stream.error_samples,
        "false_trips": out.false_trips,
        "trip": out.trip.as_ref().map(|t| json!({
            "at_s": t.at_s,
            "after_slowdown_s": t.at_s - s.slow_at_s,
            "p99_ms": t.p99_ms,
            "others_p99_ms": t.others_p99_ms,
            "connections": t.connections,
        })),
        "canary_share_at_end": out.canary_share_at_end,
        // Before the slowdown, when the shares certainly stood: the trip
        // is seen up to a sampling interval late, and a canary client's
        // request placed in that gap would count.
        "clients_in_two_pools_before_slowdown": phases::clients_in_two_pools(
            &out.stream.samples,
            s.slow_at_s,
        ),
        "phases": phases
            .iter()
            .map(|p| phase_json(p, &out.stream, s.warmup_s))
            .collect::<Vec<_>>(),
    })
}

/// Runs both arms and writes `canary.json` into `out_dir`.
pub fn run_canary(s: &CanarySettings, out_dir: &Path) -> Result<Value> {
    eprintln!(
        "bench canary: {} seed(s) per arm, {} s runs, canary slowed to {}× at {} s, \
         {:.1} requests/s{}",
        s.seeds,
        s.secs,
        s.slow_speed,
        s.slow_at_s,
        s.rate(),
        if s.quick { " (quick)" } else { "" }
    );
    let mut arms = Vec::new();
    for arm in Arm::ALL {
        let mut runs = Vec::new();
        for i in 0..s.seeds {
            let seed = CanarySettings::seed(i);
            let rig = Rig::new(arm, s).with_context(|| format!("setting up {}", arm.key()))?;
            let out = rig.run(s, seed)?;
            let j = run_json(arm, seed, s, &out);
            eprintln!(
                "  {} seed {}/{}: trip {}, false trips {}, errors {}",
                arm.key(),
                i + 1,
                s.seeds,
                j["trip"]["after_slowdown_s"]
                    .as_f64()
                    .map_or("none".to_owned(), |t| format!(
                        "{t:.1} s after the slowdown"
                    )),
                out.false_trips,
                out.stream.errors,
            );
            runs.push(j);
        }
        arms.push(json!({
            "arm": arm.key(),
            "label": arm.label(),
            "config": rig::router_config(arm, s, Path::new("/run/router-bench.sock")),
            "runs": runs,
        }));
    }
    let doc = json!({
        "benchmark": "canary",
        "format": 1,
        "quick": s.quick,
        "settings": s.json(),
        "machine": crate::report::machine_json(),
        "arms": arms,
    });
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(
        out_dir.join("canary.json"),
        serde_json::to_string_pretty(&doc)? + "\n",
    )
    .context("writing canary.json")?;
    Ok(doc)
}

/// Client `i` (0-based) of [`rig::CLIENTS`].
pub fn client_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 1 + (i / 250) as u8, 1 + (i % 250) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_distinct_addresses_in_the_client_network() {
        let all: std::collections::BTreeSet<Ipv4Addr> =
            (0..rig::CLIENTS).map(client_addr).collect();
        assert_eq!(all.len(), rig::CLIENTS);
        assert!(
            all.iter()
                .all(|a| a.octets()[..2] == [198, 19] && a.octets()[3] != 0)
        );
    }

    #[test]
    fn the_canary_is_judged_before_the_slowdown() {
        // At least one full window of the canary's connections fits in the
        // measured healthy phase, so a false alarm would show.
        for s in [CanarySettings::full(), CanarySettings::quick()] {
            let canary_rps = s.rate() * f64::from(s.canary_share) / 100.0;
            let window_s = s.guard_min_connections as f64 / canary_rps;
            assert!(
                window_s < s.slow_at_s - s.warmup_s,
                "a window takes {window_s:.1} s"
            );
            assert!(s.slow_at_s < s.secs && s.warmup_s < s.slow_at_s);
        }
    }
}
