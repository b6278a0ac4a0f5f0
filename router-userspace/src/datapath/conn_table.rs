//! The connection tables seen from userspace: counting live flows per
//! backend, correcting the datapath's in-flight counts from what the tables
//! hold (see `load`), and ending a drained backend's flows when its
//! deadline passes. IPv6 NAT flows (`NAT6_CONNS`) are counted and ended
//! alike; nothing counts them in flight (an IPv6 service places by Maglev),
//! so they take no part in the corrections.
//! A `ConnTable` owns its own file descriptors of `CONNS`, `HALF_OPEN` and
//! `NAT6_CONNS`,
//! so a scan of a large table runs on a blocking thread without holding the
//! daemon's lock.

use std::{
    collections::{BTreeMap, HashSet},
    os::fd::AsFd,
    sync::Arc,
};

use aya::maps::{HashMap, IterableMap, Map, MapData, MapError};
use router_common::{
    CONN_CLOSING, CONN_COUNTED, CONN_REPLY, ConnEntry, ConnKey, MAX_BACKENDS, PROTO_TCP,
    v6::{ConnKey6, NatEntry6},
};
use serde::{Deserialize, Serialize};

use super::{Correction, Datapath, DatapathError, LoadCounters, LoadOptions, map_err};

/// Live flows at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnScan {
    /// Backend id → forward entries neither expired nor closing.
    pub active: BTreeMap<u32, u64>,
    /// Entries of either direction, expired ones included (the LRU reclaims
    /// them lazily): how full the table is.
    pub entries: u64,
    /// The same for `NAT6_CONNS` (IPv6 NAT flows), sized as `CONNS`.
    #[serde(default)]
    pub nat6_entries: u64,
    /// Backend id → flows in either table that the datapath counts as in
    /// flight and that have not expired: what the in-flight counts should be.
    pub counted: BTreeMap<u32, u64>,
    /// Backend id → the corrections this scan made to its in-flight count.
    pub corrections: BTreeMap<u32, Correction>,
    /// Backend id → every correction since the scanner started (filled in
    /// by the daemon's scanner thread).
    #[serde(default)]
    pub corrections_total: BTreeMap<u32, Correction>,
}

pub struct ConnTable {
    map: HashMap<MapData, ConnKey, ConnEntry>,
    /// Flows still in their handshake: a drain deadline ends them too.
    half_open: HashMap<MapData, ConnKey, ConnEntry>,
    nat6: HashMap<MapData, ConnKey6, NatEntry6>,
    opts: LoadOptions,
    load: Arc<LoadCounters>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Table {
    Conns,
    HalfOpen,
}

/// Visits every entry of a connection table once, bucket by bucket (see
/// `batch`); on kernels without batch lookups, key by key.
fn each_entry<K: aya::Pod, V: aya::Pod>(
    name: &'static str,
    map: &HashMap<MapData, K, V>,
    visit: &mut impl FnMut(&K, &V),
) -> Result<(), DatapathError> {
    match super::batch::for_each(map.map().fd().as_fd(), &mut *visit) {
        Ok(()) => Ok(()),
        // Before 5.6; this walk starts over when its cursor is deleted.
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
            for item in map.iter() {
                match item {
                    Ok((key, e)) => visit(&key, &e),
                    Err(MapError::KeyNotFound) => continue,
                    Err(e) => return Err(map_err(name)(e)),
                }
            }
            Ok(())
        }
        Err(e) => Err(map_err(name)(MapError::SyscallError(
            aya::sys::SyscallError {
                call: "bpf_map_lookup_batch",
                io_error: e,
            },
        ))),
    }
}

/// `bpf_ktime_get_coarse_ns` is CLOCK_MONOTONIC_COARSE; entries are stamped
/// with it, so ages must be measured on the same clock.
fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

impl ConnTable {
    /// The datapath's own expiry rule (`conn::expired`): half-open flows
    /// and closing ones get the short timeout.
    fn live(&self, table: Table, key: &ConnKey, e: &ConnEntry, now: u64) -> bool {
        self.live_for(
            e.flags & CONN_CLOSING != 0 || table == Table::HalfOpen,
            key.proto,
            e.last_seen_ns,
            now,
        )
    }

    fn live_for(&self, closing: bool, proto: u8, last_seen_ns: u64, now: u64) -> bool {
        let timeout = if closing {
            self.opts.tcp_closing_ns
        } else if proto == PROTO_TCP {
            self.opts.tcp_idle_ns
        } else {
            self.opts.udp_idle_ns
        };
        now.saturating_sub(last_seen_ns) <= timeout
    }

    /// Counts live flows per backend and corrects the in-flight counts
    /// from them, reading each table bucket by bucket (see `batch`), so
    /// churn neither restarts the scan nor shows an entry twice. A flow moving from HALF_OPEN to CONNS while
    /// the scan runs may be met in both: it is counted once.
    pub fn scan(&self) -> Result<ConnScan, DatapathError> {
        let now = coarse_now_ns();
        let mut out = ConnScan::default();
        let before = self.load.snapshot(0..MAX_BACKENDS);
        let mut seen: HashSet<ConnKey> = HashSet::new();
        for (table, name, map) in [
            (Table::Conns, "CONNS", &self.map),
            (Table::HalfOpen, "HALF_OPEN", &self.half_open),
        ] {
            let mut visit = |key: &ConnKey, e: &ConnEntry| {
                if e.flags & CONN_REPLY != 0 || !self.live(table, key, e, now) {
                    if table == Table::Conns {
                        out.entries += 1;
                    }
                    return;
                }
                if table == Table::Conns {
                    out.entries += 1;
                    if e.flags & CONN_CLOSING == 0 {
                        *out.active.entry(e.backend_id).or_default() += 1;
                    }
                }
                if e.flags & CONN_COUNTED != 0 && seen.insert(*key) {
                    *out.counted.entry(e.backend_id).or_default() += 1;
                }
            };
            each_entry(name, map, &mut visit)?;
        }
        each_entry(
            "NAT6_CONNS",
            &self.nat6,
            &mut |key: &ConnKey6, e: &NatEntry6| {
                out.nat6_entries += 1;
                if !e.is_reply()
                    && !e.is_closing()
                    && self.live_for(false, key.proto, e.last_seen_ns, now)
                {
                    *out.active.entry(e.backend_id).or_default() += 1;
                }
            },
        )?;
        let after = self.load.snapshot(0..MAX_BACKENDS);
        out.corrections = self.load.reconcile(&before, &after, &out.counted);
        Ok(out)
    }

    /// Deletes both directions of every flow pinned to `backend_id`, in
    /// either table. The client's next packet then misses the table; Maglev
    /// no longer picks a drained backend, so the packet lands on another
    /// backend, which answers a mid-stream segment with a reset: the flow
    /// ends promptly instead of hanging. A flow still in its handshake is
    /// ended the same way (its ACK is re-hashed), or its retransmitted SYN
    /// starts over on another backend. An IPv6 NAT flow (`NAT6_CONNS`) is
    /// ended alike. Returns the number of connections (forward entries)
    /// ended.
    pub fn end_backend_flows(&mut self, backend_id: u32) -> Result<u64, DatapathError> {
        let mut ended = 0;
        for (name, map) in [("CONNS", &mut self.map), ("HALF_OPEN", &mut self.half_open)] {
            let mut doomed: Vec<(ConnKey, bool)> = Vec::new();
            each_entry(name, map, &mut |k: &ConnKey, e: &ConnEntry| {
                if e.backend_id == backend_id {
                    doomed.push((*k, e.flags & CONN_REPLY == 0));
                }
            })?;
            for (key, forward) in doomed {
                match map.remove(&key) {
                    Ok(()) if forward => ended += 1,
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(name)(e)),
                }
            }
        }
        let mut doomed: Vec<(ConnKey6, bool)> = Vec::new();
        each_entry(
            "NAT6_CONNS",
            &self.nat6,
            &mut |k: &ConnKey6, e: &NatEntry6| {
                if e.backend_id == backend_id {
                    doomed.push((*k, !e.is_reply()));
                }
            },
        )?;
        for (key, forward) in doomed {
            match self.nat6.remove(&key) {
                Ok(()) if forward => ended += 1,
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err("NAT6_CONNS")(e)),
            }
        }
        Ok(ended)
    }
}

impl Datapath {
    /// An independent handle on the connection table: a duplicate of the
    /// map's descriptor (no capability needed, unlike opening it by id, so
    /// it works after the daemon dropped its capabilities).
    pub fn conn_table(&self) -> Result<ConnTable, DatapathError> {
        Ok(ConnTable {
            map: self.dup_table("CONNS")?,
            half_open: self.dup_table("HALF_OPEN")?,
            nat6: self.dup_table("NAT6_CONNS")?,
            opts: self.opts.clone(),
            load: self.load.clone(),
        })
    }

    fn dup_table<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<HashMap<MapData, K, V>, DatapathError> {
        let fd = match self.ebpf.map(name) {
            Some(Map::LruHashMap(data)) => {
                data.fd()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| DatapathError::Map {
                        map: name,
                        source: MapError::SyscallError(aya::sys::SyscallError {
                            call: "dup",
                            io_error: e,
                        }),
                    })?
            }
            _ => return Err(DatapathError::MissingMap(name)),
        };
        let data = MapData::from_fd(fd).map_err(map_err(name))?;
        HashMap::try_from(Map::from_map_data(data).map_err(map_err(name))?).map_err(map_err(name))
    }

    /// The datapath id of a backend, for matching connection-table scans.
    pub fn backend_id(&self, service: &str, backend: &str) -> Option<u32> {
        self.services
            .get(service)
            .and_then(|s| s.backend_ids.get(backend))
            .copied()
    }
}
