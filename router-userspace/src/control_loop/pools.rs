//! Pools at run time: their shares (as configured, or as an operator or a
//! guard set them), whether each has room, and the pool specs the datapath
//! serves them from.

use std::collections::BTreeMap;

use tracing::{info, warn};

use super::{Controller, ServiceCtl};
use crate::{
    config::{Config, ServiceConfig},
    datapath::{PoolSpec, SegmentSpec},
    pools::{PoolError, set_share},
};

/// Shares set at run time: service → pool → percent. Persisted beside the
/// control socket like the other overrides.
pub type PoolShares = BTreeMap<String, BTreeMap<String, u32>>;

/// A pool's share as it stands, and whether it has room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolState {
    pub name: String,
    pub share: u32,
    pub configured_share: u32,
    /// Every backend saturated, unhealthy or drained at the last tick.
    pub no_room: bool,
}

fn lookup<'a>(cfg: &'a Config, service: &str) -> Result<&'a ServiceConfig, PoolError> {
    let s = cfg
        .services
        .iter()
        .find(|s| s.name == service)
        .ok_or_else(|| PoolError::NoService(service.to_string()))?;
    if s.pools.is_empty() {
        return Err(PoolError::NoPools(service.to_string()));
    }
    Ok(s)
}

/// The pools' shares of `s`, in config order: the run-time ones where set.
fn shares_of(saved: &PoolShares, s: &ServiceConfig) -> Vec<u32> {
    let set = saved.get(&s.name);
    s.pools
        .iter()
        .map(|p| set.and_then(|m| m.get(&p.name)).copied().unwrap_or(p.share))
        .collect()
}

/// Whether the run-time shares `set` still fit `s`: the same pools by name.
fn fits(set: &BTreeMap<String, u32>, s: &ServiceConfig) -> bool {
    set.len() == s.pools.len()
        && s.pools.iter().all(|p| set.contains_key(&p.name))
        && set.values().sum::<u32>() == 100
}

impl Controller {
    /// Sets pool `pool` of `service` to `share` percent; the other pools
    /// that take unmatched clients keep their proportions (see
    /// `pools::set_share`). Returns every pool's share after the change.
    pub fn set_pool_share(
        &mut self,
        cfg: &Config,
        service: &str,
        pool: &str,
        share: u32,
    ) -> Result<Vec<(String, u32)>, PoolError> {
        let s = lookup(cfg, service)?;
        let Some(index) = s.pools.iter().position(|p| p.name == pool) else {
            return Err(PoolError::NoPool {
                service: service.to_string(),
                pool: pool.to_string(),
                known: s
                    .pools
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let current = shares_of(&self.pool_shares, s);
        let configured: Vec<u32> = s.pools.iter().map(|p| p.share).collect();
        let names: Vec<&str> = s.pools.iter().map(|p| p.name.as_str()).collect();
        let next = set_share(&current, &configured, &names, index, share)?;
        let pairs: Vec<(String, u32)> = names
            .iter()
            .map(|n| n.to_string())
            .zip(next.iter().copied())
            .collect();
        if next == configured {
            self.pool_shares.remove(service);
        } else {
            self.pool_shares
                .insert(service.to_string(), pairs.iter().cloned().collect());
        }
        Ok(pairs)
    }

    /// Every run-time share, for persisting across restarts.
    pub fn pool_shares(&self) -> &PoolShares {
        &self.pool_shares
    }

    /// Puts back run-time shares saved by an earlier daemon (or held before
    /// a change that could not be applied). Entries that no longer fit the
    /// config (a service gone, its pools renamed) are dropped and named.
    pub fn restore_pool_shares(&mut self, cfg: &Config, saved: PoolShares) -> Vec<String> {
        let mut dropped = Vec::new();
        self.pool_shares.clear();
        for (svc, set) in saved {
            match cfg.services.iter().find(|s| s.name == svc) {
                Some(s) if fits(&set, s) => {
                    self.pool_shares.insert(svc, set);
                }
                _ => dropped.push(svc),
            }
        }
        dropped
    }

    /// Keeps the run-time shares that still fit `cfg` (after a reload).
    pub(super) fn retain_pool_shares(shares: &mut PoolShares, cfg: &Config) {
        shares.retain(|svc, set| {
            let keep = cfg
                .services
                .iter()
                .find(|s| &s.name == svc)
                .is_some_and(|s| fits(set, s));
            if !keep {
                warn!(service = %svc, "pools changed in the config; their run-time shares are dropped");
            }
            keep
        });
    }

    /// Each pool of service `index` with its share and room, config order.
    pub fn pool_states(&self, cfg: &Config, service: &str) -> Result<Vec<PoolState>, PoolError> {
        let s = lookup(cfg, service)?;
        let ctl = self.services.iter().find(|c| c.name == service);
        let shares = shares_of(&self.pool_shares, s);
        Ok(s.pools
            .iter()
            .zip(shares)
            .enumerate()
            .map(|(i, (p, share))| PoolState {
                name: p.name.clone(),
                share,
                configured_share: p.share,
                no_room: ctl.is_some_and(|c| c.pools_no_room.get(i).copied().unwrap_or(false)),
            })
            .collect())
    }
}

impl ServiceCtl {
    /// Whether every backend named in `backends` has weight 0 or was read
    /// as saturated at this tick: the pool has no room.
    fn no_room(&self, backends: &[String]) -> bool {
        backends.iter().all(|name| {
            self.backends
                .iter()
                .find(|b| &b.cfg.name == name)
                .is_none_or(|b| b.weight == 0 || b.decision.as_ref().is_some_and(|d| d.saturated))
        })
    }

    /// The datapath's pools and segments for this service (config `s`),
    /// at `shares`; notes which pools lost or regained room. Returns
    /// whether any pool's room changed.
    pub(super) fn pool_specs(
        &mut self,
        s: &ServiceConfig,
        saved: &PoolShares,
    ) -> (Vec<PoolSpec>, Vec<SegmentSpec>, bool) {
        let shares = shares_of(saved, s);
        let no_room: Vec<bool> = s.pools.iter().map(|p| self.no_room(&p.backends)).collect();
        let mut changed = false;
        for (i, (p, now)) in s.pools.iter().zip(&no_room).enumerate() {
            let before = self.pools_no_room.get(i).copied().unwrap_or(false);
            if *now != before {
                changed = true;
                if *now {
                    warn!(service = %s.name, pool = %p.name, "pool has no room; new connections go to its fallback");
                } else {
                    info!(service = %s.name, pool = %p.name, "pool has room again");
                }
            }
        }
        let pools = s
            .pools
            .iter()
            .zip(&shares)
            .zip(&no_room)
            .map(|((p, share), no_room)| PoolSpec {
                name: p.name.clone(),
                backends: p.backends.clone(),
                share: *share,
                fallback: p.fallback,
                saturated: *no_room,
            })
            .collect();
        self.pools_no_room = no_room;
        let segments = s
            .segments
            .iter()
            .map(|g| SegmentSpec {
                addr: g.addr,
                prefix_len: g.prefix_len,
                pool: g.pool,
            })
            .collect();
        (pools, segments, changed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        pools::ShareError,
        telemetry::{Reading, TelemetryError},
    };

    fn config(canary_name: &str) -> Config {
        let text = format!(
            r#"
[daemon]
interface = "lb0"

[policy]
slow_start = "1ms"

[[service]]
name = "llama"
vip = "198.18.100.1:8000"
snat = "198.18.0.1"
selection = "maglev"

[[service.backend]]
name = "gpu-0"
address = "198.18.0.11:8000"
telemetry = {{ source = "prometheus", url = "http://198.18.0.11:8000/metrics", format = "vllm" }}

[[service.backend]]
name = "gpu-1"
address = "198.18.0.12:8000"
weight = 100

[[service.backend]]
name = "spot-0"
address = "198.18.0.13:8000"
weight = 100

[[service.pool]]
name = "stable"
backends = ["gpu-0"]
share = 80
fallback = "overflow"

[[service.pool]]
name = "{canary_name}"
backends = ["gpu-1"]
share = 20

[[service.pool]]
name = "overflow"
backends = ["spot-0"]
"#
        );
        Config::parse(&text, "t.toml").expect("config")
    }

    fn kv(v: f64) -> Result<Reading, TelemetryError> {
        Ok(Reading {
            kv_cache_usage: Some(v),
            requests_running: Some(1.0),
            requests_waiting: Some(0.0),
            ..Reading::default()
        })
    }

    #[test]
    fn a_saturated_pool_has_no_room_and_regains_it() {
        let cfg = config("canary");
        let mut ctl = Controller::new(&cfg, None);
        let round = |ctl: &mut Controller, t: u64, load: f64| {
            let now = Duration::from_millis(t * 500);
            ctl.record_reading(0, 0, now, kv(load));
            ctl.decide(now, &cfg, &|_, _| None)
        };
        let (specs, _) = round(&mut ctl, 1, 0.1);
        assert!(!specs[0].pools[0].saturated, "{:?}", specs[0].pools);
        // Saturation needs confirming readings; within a few rounds the
        // pool is full, and says so once.
        let mut flips = 0;
        let mut full = false;
        for t in 2..10 {
            let (specs, changed) = round(&mut ctl, t, 0.99);
            if specs[0].pools[0].saturated && !full {
                assert!(changed, "the room change must rewrite the datapath");
                flips += 1;
                full = true;
            }
        }
        assert_eq!((flips, full), (1, true));
        let states = ctl.pool_states(&cfg, "llama").unwrap();
        assert!(states[0].no_room && !states[1].no_room && !states[2].no_room);
        for t in 10..30 {
            round(&mut ctl, t, 0.05);
        }
        assert!(!ctl.pool_states(&cfg, "llama").unwrap()[0].no_room);
    }

    #[test]
    fn pool_set_keeps_the_others_in_proportion_and_survives_a_reload_only_unchanged() {
        let cfg = config("canary");
        let mut ctl = Controller::new(&cfg, None);
        assert_eq!(
            ctl.set_pool_share(&cfg, "llama", "canary", 50),
            Ok(vec![
                ("stable".into(), 50),
                ("canary".into(), 50),
                ("overflow".into(), 0)
            ])
        );
        let (specs, _) = ctl.decide(Duration::ZERO, &cfg, &|_, _| None);
        let shares: Vec<u32> = specs[0].pools.iter().map(|p| p.share).collect();
        assert_eq!(shares, [50, 50, 0]);
        // A reload of the same pools keeps the run-time shares...
        let ctl = Controller::new(&cfg, Some(ctl));
        assert_eq!(ctl.pool_states(&cfg, "llama").unwrap()[1].share, 50);
        // ...one that renames a pool drops them.
        let renamed = config("blue");
        let ctl = Controller::new(&renamed, Some(ctl));
        assert_eq!(ctl.pool_states(&renamed, "llama").unwrap()[1].share, 20);
        assert!(ctl.pool_shares().is_empty());
    }

    #[test]
    fn refused_changes_name_the_problem_and_change_nothing() {
        let cfg = config("canary");
        let mut ctl = Controller::new(&cfg, None);
        assert_eq!(
            ctl.set_pool_share(&cfg, "llama", "canary", 101),
            Err(PoolError::Share(ShareError::AboveHundred(101)))
        );
        assert_eq!(
            ctl.set_pool_share(&cfg, "nope", "canary", 5),
            Err(PoolError::NoService("nope".into()))
        );
        assert_eq!(
            ctl.set_pool_share(&cfg, "llama", "blue", 5),
            Err(PoolError::NoPool {
                service: "llama".into(),
                pool: "blue".into(),
                known: "stable, canary, overflow".into()
            })
        );
        assert!(ctl.pool_shares().is_empty());
        // Setting the configured shares again stores nothing.
        ctl.set_pool_share(&cfg, "llama", "canary", 20).unwrap();
        assert!(ctl.pool_shares().is_empty());
        // A saved file that no longer fits is dropped and named.
        let saved: PoolShares = [(
            "llama".to_string(),
            [("stable".to_string(), 70), ("green".to_string(), 30)].into(),
        )]
        .into();
        assert_eq!(
            ctl.restore_pool_shares(&cfg, saved),
            vec!["llama".to_string()]
        );
    }
}
