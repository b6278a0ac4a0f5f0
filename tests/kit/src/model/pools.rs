//! The pool a new flow of a pooled service is placed from: the client's
//! longest-prefix segment, else its share bucket, then down the fallback
//! chain while the pool has no room (at most `MAX_FALLBACK_DEPTH` steps),
//! else the first pool of the chain that can take a flow at all, else the
//! client's own. Written from the rule in `router_common::pools`, not from
//! the program.

use router_common::pools::{MAX_FALLBACK_DEPTH, client_bucket};

use super::{Model, Service};

/// A pool as the datapath holds it.
#[derive(Clone, Debug)]
pub struct Pool {
    /// The pool's live Maglev table: slot → backend id.
    pub table: Vec<u32>,
    /// Its live scan list (empty: two choices for least-loaded services).
    pub members: Vec<super::Member>,
    pub fallback: Option<u32>,
    /// Every backend saturated, unhealthy or drained, or none with weight.
    pub no_room: bool,
    /// No backend with weight above 0.
    pub empty: bool,
}

/// A client network routed to a pool.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    /// Network address, host order.
    pub addr: u32,
    pub prefix_len: u8,
    pub pool: u32,
}

impl Segment {
    fn contains(&self, client_host_order: u32) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        client_host_order & mask == self.addr
    }
}

impl Model {
    /// The service a flow from `src_addr` (wire order) is placed by: `svc`
    /// itself, or a copy with its pool's table and scan list. `None`: the
    /// maps name no pool for the client (a share bucket past the pools).
    pub(super) fn placed(&mut self, svc: &Service, src_addr: u32) -> Option<Service> {
        if svc.pools.is_empty() {
            return Some(svc.clone());
        }
        let client = u32::from_be(src_addr);
        let start = match svc
            .segments
            .iter()
            .filter(|g| g.contains(client))
            .max_by_key(|g| g.prefix_len)
        {
            Some(g) => {
                self.trail.push("pool: the client's longest segment");
                g.pool
            }
            None => {
                self.trail.push("pool: the client's share bucket");
                let bucket = client_bucket(self.cfg.flow_hash_key, src_addr);
                u32::from(*svc.shares.get(bucket as usize)?)
            }
        };
        let first = svc.pools.get(start as usize)?;
        let chosen = if !first.no_room {
            start
        } else {
            let mut fallback_pick = (!first.empty).then_some(start);
            let mut next = first.fallback;
            let mut found = None;
            for _ in 0..MAX_FALLBACK_DEPTH {
                let Some(index) = next else { break };
                let Some(p) = svc.pools.get(index as usize) else {
                    break;
                };
                if !p.no_room {
                    found = Some(index);
                    break;
                }
                if fallback_pick.is_none() && !p.empty {
                    fallback_pick = Some(index);
                }
                next = p.fallback;
            }
            match (found, fallback_pick) {
                (Some(i), _) => {
                    self.trail.push("pool: no room, a fallback with room");
                    i
                }
                (None, Some(i)) => {
                    self.trail
                        .push("pool: no room in the chain, the first that can take it");
                    i
                }
                (None, None) => {
                    self.trail.push("pool: nothing in the chain can take it");
                    start
                }
            }
        };
        if chosen != start {
            *self.spills.entry((svc.id, start, chosen)).or_insert(0) += 1;
        }
        let p = &svc.pools[chosen as usize];
        Some(Service {
            table: p.table.clone(),
            members: p.members.clone(),
            pools: Vec::new(),
            shares: Vec::new(),
            segments: Vec::new(),
            ..svc.clone()
        })
    }
}
