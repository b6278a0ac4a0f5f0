//! Publishing a service's pools: each pool's Maglev table and scan list in
//! a table slot of its own, double-buffered and flipped as a service's are
//! but by replacing the pool's `POOLS` value; the share buckets,
//! double-buffered and flipped by the service value (`share_half`); and
//! the segments, each an LPM entry replaced on its own.
//!
//! Order keeps every packet on a consistent view: a pool's entry exists
//! before the service value counts it, a new share half is complete before
//! the service value names it, new segments are in before the service
//! value counts them, and what the new value no longer reaches (pools past
//! its count, segments it dropped) goes only after it is published.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use aya::maps::{
    Array, HashMap as BpfHashMap, MapError,
    lpm_trie::{Key, LpmTrie},
};
use router_common::{
    Member, Pool, PoolKey, SegmentKey, ShareSlots,
    pools::{NO_POOL, POOL_EMPTY, POOL_NO_ROOM, SLOTS_PER_ENTRY, share_slot},
};

use super::{
    BackendSpec, Datapath, DatapathError, ServiceSpec, map_err,
    state::{build_table, scan_list},
};
use crate::pools::share_table;

/// One pool as last published.
#[derive(Debug)]
pub(super) struct PoolState {
    pub name: String,
    /// The table slot (`MAGLEV_TABLES`, `MEMBERS`) the pool owns.
    pub slot: u32,
    pub active: u32,
    pub halves: [Option<Vec<u32>>; 2],
    pub members: [Option<Vec<Member>>; 2],
    /// The `POOLS` value last written; `None` when unknown (adopted).
    pub value: Option<Pool>,
}

impl PoolState {
    pub fn live_table(&self) -> Option<&Vec<u32>> {
        self.halves[self.active as usize & 1].as_ref()
    }
}

/// A service's pools, share buckets and segments as last published.
#[derive(Debug, Default)]
pub(super) struct PooledState {
    pub pools: Vec<PoolState>,
    pub share_half: u32,
    pub shares: [Option<Vec<u8>>; 2],
    /// Segments in `SEGMENTS`: (network, prefix length) → pool index.
    pub segments: BTreeMap<(Ipv4Addr, u8), u32>,
}

impl PooledState {
    pub fn slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.pools.iter().map(|p| p.slot)
    }

    /// The live share table, if known.
    pub fn live_shares(&self) -> Option<&Vec<u8>> {
        self.shares[self.share_half as usize & 1].as_ref()
    }
}

/// The service value's pool fields after a publish.
pub(super) struct Published {
    pub pools: u32,
    pub share_half: u32,
    pub segments: u32,
}

fn segment_key(service_id: u32, addr: Ipv4Addr, prefix_len: u8) -> Key<SegmentKey> {
    Key::new(
        32 + u32::from(prefix_len),
        SegmentKey {
            service_id_be: service_id.to_be(),
            addr: u32::from_ne_bytes(addr.octets()),
        },
    )
}

/// A delete of an entry that is already gone is done.
fn absent_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::SyscallError(aya::sys::SyscallError { io_error, .. }))
            if io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

impl Datapath {
    /// Writes everything of `s`'s pools that the service value will point
    /// at (see the module's order), into `st`; `slots` are the pools' table
    /// slots, in pool order. Returns the service value's pool fields.
    pub(super) fn publish_pools(
        &mut self,
        s: &ServiceSpec,
        sid: u32,
        ids: &BTreeMap<String, u32>,
        slots: &[u32],
        st: &mut PooledState,
    ) -> Result<Published, DatapathError> {
        let mut kept: Vec<PoolState> = Vec::with_capacity(s.pools.len());
        let mut old: Vec<PoolState> = std::mem::take(&mut st.pools);
        for (index, (pool, &slot)) in s.pools.iter().zip(slots).enumerate() {
            let mut ps = match old
                .iter()
                .position(|p| p.name == pool.name && p.slot == slot)
            {
                Some(i) => old.remove(i),
                None => PoolState {
                    name: pool.name.clone(),
                    slot,
                    active: 0,
                    halves: [None, None],
                    members: [None, None],
                    value: None,
                },
            };
            let backends: Vec<&BackendSpec> = s
                .backends
                .iter()
                .filter(|b| pool.backends.contains(&b.name))
                .collect();
            let table = build_table(&backends, ids, self.opts.table_size);
            let members = scan_list(s.selection, &backends, ids, self.scan_limit);
            let live = ps.active as usize & 1;
            if ps.halves[live].as_ref() != Some(&table)
                || ps.members[live].as_ref() != Some(&members)
            {
                let idle = (ps.active ^ 1) & 1;
                self.write_half(slot, idle, &table, ps.halves[idle as usize].as_deref())?;
                self.write_members(slot, idle, &members, ps.members[idle as usize].as_deref())?;
                ps.halves[idle as usize] = Some(table);
                ps.members[idle as usize] = Some(members);
                ps.active = idle;
            }
            let empty = backends.iter().all(|b| b.weight == 0);
            let value = Pool {
                table: slot,
                active_table: ps.active,
                members: ps.members[ps.active as usize & 1]
                    .as_ref()
                    .map_or(0, |m| m.len() as u32),
                fallback: pool.fallback.map_or(NO_POOL, |f| f as u32),
                flags: if empty {
                    POOL_EMPTY | POOL_NO_ROOM
                } else if pool.saturated {
                    POOL_NO_ROOM
                } else {
                    0
                },
                _pad: 0,
            };
            if ps.value != Some(value) {
                let mut map: BpfHashMap<_, PoolKey, Pool> = BpfHashMap::try_from(
                    self.ebpf
                        .map_mut("POOLS")
                        .ok_or(DatapathError::MissingMap("POOLS"))?,
                )
                .map_err(map_err("POOLS"))?;
                let key = PoolKey {
                    service_id: sid,
                    index: index as u32,
                };
                map.insert(key, value, 0).map_err(map_err("POOLS"))?;
                ps.value = Some(value);
            }
            kept.push(ps);
        }
        st.pools = kept;

        let shares: Vec<(&str, u32)> = s.pools.iter().map(|p| (p.name.as_str(), p.share)).collect();
        let table = share_table(&shares);
        if st.live_shares() != Some(&table) {
            let idle = (st.share_half ^ 1) & 1;
            self.write_shares(sid, idle, &table, st.shares[idle as usize].as_deref())?;
            st.shares[idle as usize] = Some(table);
            st.share_half = idle;
        }

        let want: BTreeMap<(Ipv4Addr, u8), u32> = s
            .segments
            .iter()
            .map(|g| ((g.addr, g.prefix_len), g.pool as u32))
            .collect();
        {
            let mut trie: LpmTrie<_, SegmentKey, u32> = LpmTrie::try_from(
                self.ebpf
                    .map_mut("SEGMENTS")
                    .ok_or(DatapathError::MissingMap("SEGMENTS"))?,
            )
            .map_err(map_err("SEGMENTS"))?;
            for (&(addr, len), &pool) in &want {
                if st.segments.get(&(addr, len)) != Some(&pool) {
                    trie.insert(&segment_key(sid, addr, len), pool, 0)
                        .map_err(map_err("SEGMENTS"))?;
                    st.segments.insert((addr, len), pool);
                }
            }
        }
        Ok(Published {
            pools: s.pools.len() as u32,
            share_half: st.share_half,
            segments: want.len() as u32,
        })
    }

    /// Removes what the published service value no longer reaches: `POOLS`
    /// entries from `keep` pools on, and segments `want` does not hold.
    pub(super) fn retire_pools(
        &mut self,
        sid: u32,
        was: usize,
        keep: usize,
        want: &BTreeSet<(Ipv4Addr, u8)>,
        st: &mut PooledState,
    ) -> Result<(), DatapathError> {
        if was > keep {
            let mut map: BpfHashMap<_, PoolKey, Pool> = BpfHashMap::try_from(
                self.ebpf
                    .map_mut("POOLS")
                    .ok_or(DatapathError::MissingMap("POOLS"))?,
            )
            .map_err(map_err("POOLS"))?;
            for index in keep..was {
                let key = PoolKey {
                    service_id: sid,
                    index: index as u32,
                };
                absent_ok(map.remove(&key)).map_err(map_err("POOLS"))?;
            }
        }
        let stale: Vec<(Ipv4Addr, u8)> = st
            .segments
            .keys()
            .filter(|k| !want.contains(k))
            .copied()
            .collect();
        if !stale.is_empty() {
            let mut trie: LpmTrie<_, SegmentKey, u32> = LpmTrie::try_from(
                self.ebpf
                    .map_mut("SEGMENTS")
                    .ok_or(DatapathError::MissingMap("SEGMENTS"))?,
            )
            .map_err(map_err("SEGMENTS"))?;
            for (addr, len) in stale {
                absent_ok(trie.remove(&segment_key(sid, addr, len)))
                    .map_err(map_err("SEGMENTS"))?;
                st.segments.remove(&(addr, len));
            }
        }
        Ok(())
    }

    /// Writes a share table into half `half` of service `sid`'s `SHARES`
    /// entries, skipping entries that already hold the same pools.
    fn write_shares(
        &mut self,
        sid: u32,
        half: u32,
        table: &[u8],
        previous: Option<&[u8]>,
    ) -> Result<(), DatapathError> {
        let mut map: Array<_, ShareSlots> = Array::try_from(
            self.ebpf
                .map_mut("SHARES")
                .ok_or(DatapathError::MissingMap("SHARES"))?,
        )
        .map_err(map_err("SHARES"))?;
        let per = SLOTS_PER_ENTRY as usize;
        for (chunk_no, chunk) in table.chunks(per).enumerate() {
            let bucket = (chunk_no * per) as u32;
            if previous.and_then(|p| p.get(bucket as usize..bucket as usize + per)) == Some(chunk) {
                continue;
            }
            let mut value = ShareSlots::default();
            value.pools[..chunk.len()].copy_from_slice(chunk);
            let (entry, _) = share_slot(sid, half, bucket);
            map.set(entry, value, 0).map_err(map_err("SHARES"))?;
        }
        Ok(())
    }
}
