//! The pool of a pooled service that places a new flow: the client's
//! segment, else its share bucket, then the fallback chain while the pool
//! has no room (see `router_common::pools`). Reads maps only, except the
//! per-CPU spill counter.

use aya_ebpf::maps::lpm_trie::Key;
use router_common::{
    Pool, PoolKey, SegmentKey, Service,
    pools::{
        MAX_FALLBACK_DEPTH, MAX_POOLS, NO_POOL, POOL_EMPTY, POOL_NO_ROOM, client_bucket,
        share_slot, spill_index,
    },
};

use crate::{
    maps::{FLOW_HASH_KEY0, FLOW_HASH_KEY1, POOLS, SEGMENTS, SHARES, SPILLS},
    select::Placement,
};

/// Where a new flow of `svc` from `src_addr` (wire order) is placed: the
/// service's own table, or for a pooled service its pool's. `None` when a
/// pooled service's maps hold no pool for the client (it is being
/// reconfigured): the flow then has no backend.
#[inline(always)]
pub fn placement(svc: &Service, src_addr: u32) -> Option<Placement> {
    if svc.pools == 0 {
        return Some(Placement {
            table: svc.id,
            half: svc.active_table,
            members: svc.members,
        });
    }
    let start = first_pool(svc, src_addr)?;
    let first = pool(svc.id, start)?;
    if first.flags & POOL_NO_ROOM == 0 {
        return Some(first.placement());
    }
    // The chain, for a pool with room; failing that, the first pool that
    // can take a connection at all, starting with the client's own.
    let mut fallback_pick: Option<(u32, Pool)> = if first.flags & POOL_EMPTY == 0 {
        Some((start, first))
    } else {
        None
    };
    let mut next = first.fallback;
    for _ in 0..MAX_FALLBACK_DEPTH {
        if next == NO_POOL {
            break;
        }
        let index = next;
        let Some(p) = pool(svc.id, index) else {
            break;
        };
        if p.flags & POOL_NO_ROOM == 0 {
            spilled(svc.id, start, index);
            return Some(p.placement());
        }
        if fallback_pick.is_none() && p.flags & POOL_EMPTY == 0 {
            fallback_pick = Some((index, p));
        }
        next = p.fallback;
    }
    match fallback_pick {
        Some((index, p)) => {
            if index != start {
                spilled(svc.id, start, index);
            }
            Some(p.placement())
        }
        None => Some(first.placement()),
    }
}

/// The client's pool before any fallback: its longest-prefix segment, else
/// its share bucket's pool.
#[inline(always)]
fn first_pool(svc: &Service, src_addr: u32) -> Option<u32> {
    if svc.segments != 0 {
        let key = Key::new(
            32 + 32,
            SegmentKey {
                service_id_be: svc.id.to_be(),
                addr: src_addr,
            },
        );
        if let Some(index) = SEGMENTS.get(&key) {
            return Some(*index);
        }
    }
    let bucket = client_bucket([FLOW_HASH_KEY0.load(), FLOW_HASH_KEY1.load()], src_addr);
    let (entry, byte) = share_slot(svc.id, svc.share_half, bucket);
    let slots = SHARES.get(entry)?;
    // `byte` is below 8 by construction; the mask is for the verifier.
    let index = *slots.pools.get(byte & 7)? as u32;
    if index < MAX_POOLS { Some(index) } else { None }
}

#[inline(always)]
fn pool(service_id: u32, index: u32) -> Option<Pool> {
    // SAFETY: a hash-map value, copied out at once; userspace replaces
    // values whole, so the copy is one version of the pool.
    unsafe { POOLS.get(PoolKey { service_id, index }) }.copied()
}

#[inline(always)]
fn spilled(service_id: u32, from: u32, to: u32) {
    if let Some(c) = SPILLS.get_ptr_mut(spill_index(service_id, from, to)) {
        // SAFETY: this CPU's slot of a per-CPU array: nothing else writes
        // it while this program runs, and any u64 is a valid count.
        unsafe { *c += 1 };
    }
}

trait Placed {
    fn placement(&self) -> Placement;
}

impl Placed for Pool {
    #[inline(always)]
    fn placement(&self) -> Placement {
        Placement {
            table: self.table,
            half: self.active_table,
            members: self.members,
        }
    }
}
