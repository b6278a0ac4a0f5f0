//! Adopting a pinned datapath: re-deriving the daemon's view of the maps
//! from what an earlier daemon left in them (which table half each service
//! serves, which backend owns which id, the address filter), so the first
//! apply writes only idle halves and flips, as any later one does. Reading
//! only: nothing here writes a map, and `CONNS` is never touched.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use aya::maps::{Array, HashMap as BpfHashMap, lpm_trie::LpmTrie};
use router_common::{
    ADDR_FILTER_SIZE, Backend, MAX_BACKENDS, PROTO_TCP, Pool, PoolKey, SegmentKey, Service,
    ServiceKey,
    v6::{Addr6, ServiceKey6, Snat6},
};

use super::{
    BackendSpec, Datapath, DatapathError, Forwarding, ServiceSpec, map_err,
    pools::{PoolState, PooledState},
    snat6,
    state::{ListenKey, ServiceState},
};
use crate::datapath::state::service_key;

/// The maps' contents that the daemon's state is derived from.
pub(super) struct PinnedState {
    /// IPv4 services (`SERVICES`), then IPv6 ones (`SERVICES6`).
    services: Vec<(ListenKey, Service)>,
    /// Backend slots in use, by id, with their addresses (an IPv6
    /// service's backends' from `BACKEND_ADDRS6`).
    backends: Vec<(u32, Backend, SocketAddr)>,
    /// Each service's live table half, by service id.
    live_tables: BTreeMap<u32, Vec<u32>>,
    /// Pools by service id: (index, value), in index order.
    pools: BTreeMap<u32, Vec<(u32, Pool)>>,
    /// Segments by service id: (network, prefix length) → pool index.
    segments: BTreeMap<u32, BTreeMap<(std::net::Ipv4Addr, u8), u32>>,
    filter: Vec<u32>,
    /// IPv6 NAT services' SNAT addresses (`SNAT6`), by service id.
    snat6: BTreeMap<u32, Snat6>,
}

/// A backend that an adopted service was routing new connections to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AdoptedRoute {
    pub vip: SocketAddr,
    pub proto: u8,
    pub backend: SocketAddr,
}

impl Datapath {
    /// Every entry of the services map `name`, keyed by `key`.
    fn pinned_services<K: aya::Pod>(
        &self,
        name: &'static str,
        key: impl Fn(K) -> ListenKey,
    ) -> Result<Vec<(ListenKey, Service)>, DatapathError> {
        let map: BpfHashMap<_, K, Service> =
            BpfHashMap::try_from(self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))?)
                .map_err(map_err(name))?;
        map.iter()
            .map(|e| e.map(|(k, v)| (key(k), v)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(name))
    }

    pub(super) fn read_pinned_state(&self) -> Result<PinnedState, DatapathError> {
        let mut services = self.pinned_services::<ServiceKey>("SERVICES", ListenKey::V4)?;
        services.extend(self.pinned_services::<ServiceKey6>("SERVICES6", ListenKey::V6)?);
        let v6_ids: BTreeSet<u32> = services
            .iter()
            .filter(|(k, _)| matches!(k, ListenKey::V6(_)))
            .map(|(_, svc)| svc.id)
            .collect();

        let backend_map: Array<_, Backend> = Array::try_from(
            self.ebpf
                .map("BACKENDS")
                .ok_or(DatapathError::MissingMap("BACKENDS"))?,
        )
        .map_err(map_err("BACKENDS"))?;
        let addrs6: Array<_, Addr6> = Array::try_from(
            self.ebpf
                .map("BACKEND_ADDRS6")
                .ok_or(DatapathError::MissingMap("BACKEND_ADDRS6"))?,
        )
        .map_err(map_err("BACKEND_ADDRS6"))?;
        let mut backends = Vec::new();
        for id in 0..MAX_BACKENDS {
            let b = backend_map.get(&id, 0).map_err(map_err("BACKENDS"))?;
            if b.in_use == 0 {
                continue;
            }
            let ip = if v6_ids.contains(&b.service_id) {
                IpAddr::from(
                    addrs6
                        .get(&id, 0)
                        .map_err(map_err("BACKEND_ADDRS6"))?
                        .octets(),
                )
            } else {
                IpAddr::from(b.addr.to_ne_bytes())
            };
            backends.push((id, b, SocketAddr::new(ip, u16::from_be(b.port))));
        }

        let tables: Array<_, u32> = Array::try_from(
            self.ebpf
                .map("MAGLEV_TABLES")
                .ok_or(DatapathError::MissingMap("MAGLEV_TABLES"))?,
        )
        .map_err(map_err("MAGLEV_TABLES"))?;
        let size = self.opts.table_size;
        let mut live_tables = BTreeMap::new();
        for (_, svc) in &services {
            let base = (svc.id * 2 + (svc.active_table & 1)) * size;
            let table = (base..base + size)
                .map(|i| tables.get(&i, 0))
                .collect::<Result<Vec<u32>, _>>()
                .map_err(map_err("MAGLEV_TABLES"))?;
            live_tables.insert(svc.id, table);
        }

        let pool_map: BpfHashMap<_, PoolKey, Pool> = BpfHashMap::try_from(
            self.ebpf
                .map("POOLS")
                .ok_or(DatapathError::MissingMap("POOLS"))?,
        )
        .map_err(map_err("POOLS"))?;
        let mut pools: BTreeMap<u32, Vec<(u32, Pool)>> = BTreeMap::new();
        for entry in pool_map.iter() {
            let (key, value) = entry.map_err(map_err("POOLS"))?;
            pools
                .entry(key.service_id)
                .or_default()
                .push((key.index, value));
        }
        for list in pools.values_mut() {
            list.sort_by_key(|(i, _)| *i);
        }
        let trie: LpmTrie<_, SegmentKey, u32> = LpmTrie::try_from(
            self.ebpf
                .map("SEGMENTS")
                .ok_or(DatapathError::MissingMap("SEGMENTS"))?,
        )
        .map_err(map_err("SEGMENTS"))?;
        let mut segments: BTreeMap<u32, BTreeMap<(std::net::Ipv4Addr, u8), u32>> = BTreeMap::new();
        for entry in trie.iter() {
            let (key, pool) = entry.map_err(map_err("SEGMENTS"))?;
            let data = key.data();
            let len = key.prefix_len().saturating_sub(32).min(32) as u8;
            segments
                .entry(u32::from_be(data.service_id_be))
                .or_default()
                .insert((data.addr.to_ne_bytes().into(), len), pool);
        }

        let filter_map: Array<_, u32> = Array::try_from(
            self.ebpf
                .map("ADDR_FILTER")
                .ok_or(DatapathError::MissingMap("ADDR_FILTER"))?,
        )
        .map_err(map_err("ADDR_FILTER"))?;
        let filter = (0..ADDR_FILTER_SIZE)
            .map(|i| filter_map.get(&i, 0))
            .collect::<Result<Vec<u32>, _>>()
            .map_err(map_err("ADDR_FILTER"))?;

        let snat6_map: BpfHashMap<_, u32, Snat6> = BpfHashMap::try_from(
            self.ebpf
                .map("SNAT6")
                .ok_or(DatapathError::MissingMap("SNAT6"))?,
        )
        .map_err(map_err("SNAT6"))?;
        let snat6 = snat6_map
            .iter()
            .collect::<Result<BTreeMap<u32, Snat6>, _>>()
            .map_err(map_err("SNAT6"))?;

        Ok(PinnedState {
            services,
            backends,
            live_tables,
            pools,
            segments,
            filter,
            snat6,
        })
    }

    /// The backends each adopted service's live table routes to: its VIP,
    /// protocol and the backends' addresses, before the first apply
    /// rewrites anything. Empty for a freshly loaded datapath.
    pub fn adopted_routes(&self) -> Vec<AdoptedRoute> {
        let Some(pinned) = &self.adopted else {
            return Vec::new();
        };
        let mut routes = Vec::new();
        for (key, svc) in &pinned.services {
            let Some(table) = pinned.live_tables.get(&svc.id) else {
                continue;
            };
            let ids: BTreeSet<u32> = table.iter().copied().collect();
            for (id, b, addr) in &pinned.backends {
                if b.service_id == svc.id && ids.contains(id) {
                    routes.push(AdoptedRoute {
                        vip: key.vip(),
                        proto: key.proto(),
                        backend: *addr,
                    });
                }
            }
        }
        routes
    }

    /// Names the pinned services and backends after `specs`: a service by
    /// where it listens (VIP, port, protocol), a backend within it by
    /// address. Pinned ones the specs do not name keep placeholder names,
    /// so the apply that follows retires them like any removed service or
    /// backend (their slots stay valid one more round).
    pub(super) fn adopt(&mut self, pinned: PinnedState, specs: &[ServiceSpec]) {
        let PinnedState {
            services,
            backends,
            mut live_tables,
            mut pools,
            mut segments,
            filter,
            snat6,
        } = pinned;
        self.filter = filter;
        let mut claimed = BTreeSet::new();
        for (key, svc) in services {
            let spec = specs.iter().find(|s| service_key(s) == key);
            let mut free: Vec<(u32, SocketAddr)> = backends
                .iter()
                .filter(|(_, b, _)| b.service_id == svc.id)
                .map(|(id, _, addr)| (*id, *addr))
                .collect();
            claimed.extend(free.iter().map(|(id, _)| *id));
            let mut backend_ids = BTreeMap::new();
            let mut backend_specs = Vec::new();
            for b in spec.map(|s| s.backends.as_slice()).unwrap_or_default() {
                if let Some(pos) = free.iter().position(|(_, addr)| *addr == b.address) {
                    let (id, _) = free.remove(pos);
                    backend_ids.insert(b.name.clone(), id);
                    backend_specs.push(BackendSpec {
                        weight: 0,
                        max_in_flight: 0,
                        ..b.clone()
                    });
                }
            }
            for (id, address) in free {
                let name = format!("#{id}");
                backend_ids.insert(name.clone(), id);
                backend_specs.push(BackendSpec {
                    name,
                    role: super::BackendRole::Primary,
                    address,
                    weight: 0,
                    max_in_flight: 0,
                });
            }
            let vip = key.vip();
            let name = spec.map_or_else(
                || {
                    let proto = if key.proto() == PROTO_TCP {
                        "tcp"
                    } else {
                        "udp"
                    };
                    format!("(pinned) {vip}/{proto}")
                },
                |s| s.name.clone(),
            );
            let count = (svc.snat_count as usize).min(svc.snat_addrs.len());
            let active = svc.active_table & 1;
            let mut halves = [None, None];
            halves[active as usize] = live_tables.remove(&svc.id);
            // A pinned pool is known by its index; it keeps its slot when
            // the spec has a pool at that index (named after it), so the
            // first apply writes only its idle half.
            let pooled = PooledState {
                pools: pools
                    .remove(&svc.id)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(index, p)| PoolState {
                        name: spec
                            .and_then(|s| s.pools.get(index as usize))
                            .map_or_else(|| format!("#{index}"), |p| p.name.clone()),
                        slot: p.table,
                        active: p.active_table & 1,
                        halves: [None, None],
                        members: [None, None],
                        value: None,
                    })
                    .collect(),
                share_half: svc.share_half & 1,
                shares: [None, None],
                segments: segments.remove(&svc.id).unwrap_or_default(),
            };
            self.services.insert(
                name.clone(),
                ServiceState {
                    id: svc.id,
                    spec: ServiceSpec {
                        forwarding: Forwarding::of_service(svc.forwarding, svc.gue_port),
                        name,
                        vip,
                        proto: key.proto(),
                        // An IPv6 service's are in `SNAT6` (none for DSR).
                        snat: match key {
                            ListenKey::V4(_) => svc.snat_addrs[..count]
                                .iter()
                                .map(|a| a.to_ne_bytes().into())
                                .collect(),
                            ListenKey::V6(_) => {
                                snat6.get(&svc.id).map(snat6::addrs_of).unwrap_or_default()
                            }
                        },
                        snat_port_min: svc.snat_port_min,
                        snat_port_max: svc.snat_port_max,
                        selection: if svc.selection == router_common::selection::SELECT_LEAST_LOADED
                        {
                            super::Selection::LeastLoaded
                        } else {
                            super::Selection::Maglev
                        },
                        backends: backend_specs,
                        pools: Vec::new(),
                        segments: Vec::new(),
                    },
                    key,
                    active,
                    halves,
                    members: [None, None],
                    backend_ids,
                    pooled,
                },
            );
        }
        // Slots no pinned service owns were retired by the last apply
        // before the restart; they are released after one more.
        self.retired_backends = backends
            .iter()
            .map(|(id, _, _)| *id)
            .filter(|id| !claimed.contains(id))
            .collect();
    }
}
