//! Automatic rollback: a pool with a `guard` whose time to first byte, as
//! the datapath measures it, falls behind the other pools' is taken out of
//! the share split (share 0, the others scaled up), and the daemon logs why.
//!
//! A window opens when a guarded pool takes unmatched clients and is
//! judged once the pool has `min_connections` first-byte samples in it and
//! the other pools have as many: the pool's p99 against the others' p99
//! over the same window. A verdict either way opens the next window, so a
//! guard judges fresh connections only, never a stale tail.

use std::collections::BTreeMap;

use tracing::warn;

use super::Controller;
use crate::{
    api::{GuardStatus, PoolStatus},
    config::{Config, GuardConfig},
    datapath::Histogram,
};

/// A guard's open window and what it last judged.
#[derive(Clone, Debug, Default)]
pub(super) struct GuardState {
    /// Cumulative histograms (the pool's, the others') when the window opened.
    start: Option<(Histogram, Histogram)>,
    trips: u64,
    last: Option<Verdict>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Verdict {
    p99_ms: f64,
    others_p99_ms: f64,
    connections: u64,
}

/// A guard that tripped: the pool whose share the caller sets to 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Trip {
    pub service: String,
    pub pool: String,
    pub p99_ms: f64,
    pub others_p99_ms: f64,
    pub connections: u64,
}

/// Judges one window: `pool` and `others` are the first-byte histograms
/// gained in it. None while either side has fewer than `min_connections`.
fn judge(g: &GuardConfig, pool: &Histogram, others: &Histogram) -> Option<(Verdict, bool)> {
    let n = pool.count();
    if n < g.min_connections || others.count() < g.min_connections {
        return None;
    }
    let p99 = pool.quantile(0.99)? * 1e3;
    let others_p99 = others.quantile(0.99)? * 1e3;
    let verdict = Verdict {
        p99_ms: p99,
        others_p99_ms: others_p99,
        connections: n,
    };
    Some((verdict, p99 > g.ttft_p99_ratio * others_p99))
}

impl Controller {
    /// Runs every guard against the cumulative first-byte histograms of
    /// each pool (`first_byte(service, pool)`); returns the guards that
    /// tripped. Their shares are not changed here: the caller sets them to
    /// 0 the way an operator would, so the datapath and the saved shares
    /// follow the one path.
    pub fn check_guards(
        &mut self,
        cfg: &Config,
        first_byte: &dyn Fn(&str, &str) -> Histogram,
    ) -> Vec<Trip> {
        let mut trips = Vec::new();
        for s in &cfg.services {
            let Ok(states) = self.pool_states(cfg, &s.name) else {
                continue;
            };
            for (p, state) in s.pools.iter().zip(&states) {
                let Some(g) = &p.guard else { continue };
                let key = (s.name.clone(), p.name.clone());
                if state.share == 0 {
                    // Nothing to judge until it takes clients again.
                    if let Some(gs) = self.guards.get_mut(&key) {
                        gs.start = None;
                    }
                    continue;
                }
                let mine = first_byte(&s.name, &p.name);
                let mut others = Histogram::default();
                for q in s.pools.iter().filter(|q| q.name != p.name) {
                    others.add(&first_byte(&s.name, &q.name));
                }
                let gs = self.guards.entry(key).or_default();
                let Some((start_mine, start_others)) = &gs.start else {
                    gs.start = Some((mine, others));
                    continue;
                };
                let Some((verdict, tripped)) =
                    judge(g, &mine.since(start_mine), &others.since(start_others))
                else {
                    continue;
                };
                gs.last = Some(verdict);
                gs.start = Some((mine, others));
                if tripped {
                    gs.trips += 1;
                    warn!(
                        service = %s.name, pool = %p.name,
                        "guard: first-byte p99 {:.1} ms is above {} × the other pools' {:.1} ms \
                         over {} connections; rolling the pool back to share 0",
                        verdict.p99_ms, g.ttft_p99_ratio, verdict.others_p99_ms, verdict.connections
                    );
                    trips.push(Trip {
                        service: s.name.clone(),
                        pool: p.name.clone(),
                        p99_ms: verdict.p99_ms,
                        others_p99_ms: verdict.others_p99_ms,
                        connections: verdict.connections,
                    });
                }
            }
        }
        trips
    }

    /// Every pool of every pooled service, for the status API.
    pub fn pools_status(&self, cfg: &Config) -> Vec<PoolStatus> {
        let mut out = Vec::new();
        for s in &cfg.services {
            let Ok(states) = self.pool_states(cfg, &s.name) else {
                continue;
            };
            for (i, (p, state)) in s.pools.iter().zip(states).enumerate() {
                let gs = self.guards.get(&(s.name.clone(), p.name.clone()));
                out.push(PoolStatus {
                    service: s.name.clone(),
                    name: p.name.clone(),
                    share: state.share,
                    configured_share: state.configured_share,
                    backends: p.backends.clone(),
                    fallback: p
                        .fallback
                        .and_then(|f| s.pools.get(f))
                        .map(|f| f.name.clone()),
                    segments: s
                        .segments
                        .iter()
                        .filter(|g| g.pool == i)
                        .map(|g| format!("{}/{}", g.addr, g.prefix_len))
                        .collect(),
                    no_room: state.no_room,
                    guard: p.guard.map(|g| GuardStatus {
                        ttft_p99_ratio: g.ttft_p99_ratio,
                        min_connections: g.min_connections,
                        trips: gs.map_or(0, |x| x.trips),
                        last_p99_ms: gs.and_then(|x| x.last).map(|v| v.p99_ms),
                        last_others_p99_ms: gs.and_then(|x| x.last).map(|v| v.others_p99_ms),
                        last_connections: gs.and_then(|x| x.last).map_or(0, |v| v.connections),
                    }),
                });
            }
        }
        out
    }
}

/// Guard state by (service, pool).
pub(super) type Guards = BTreeMap<(String, String), GuardState>;

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(at_us: &[(u32, u64)]) -> Histogram {
        let mut h = Histogram {
            buckets: vec![0; router_common::LATENCY_BUCKETS],
            sum_us: 0,
        };
        for &(us, n) in at_us {
            h.buckets[router_common::latency_bucket(us)] += n;
            h.sum_us += u64::from(us) * n;
        }
        h
    }

    const G: GuardConfig = GuardConfig {
        ttft_p99_ratio: 1.5,
        min_connections: 200,
    };

    #[test]
    fn a_slow_pool_trips_and_a_healthy_one_does_not() {
        // The others answer in about 20 ms; a pool at about 80 ms trips, one
        // at about 20 ms does not.
        let others = hist(&[(20_000, 1000)]);
        let (v, tripped) = judge(&G, &hist(&[(80_000, 250)]), &others).unwrap();
        assert!(tripped, "{v:?}");
        assert!(v.p99_ms > 1.5 * v.others_p99_ms);
        let (v, tripped) = judge(&G, &hist(&[(20_000, 250)]), &others).unwrap();
        assert!(!tripped, "{v:?}");
    }

    #[test]
    fn too_few_connections_on_either_side_is_no_verdict() {
        let slow = hist(&[(80_000, 199)]);
        assert_eq!(judge(&G, &slow, &hist(&[(20_000, 1000)])), None);
        assert_eq!(
            judge(&G, &hist(&[(80_000, 500)]), &hist(&[(20_000, 10)])),
            None
        );
    }
}
