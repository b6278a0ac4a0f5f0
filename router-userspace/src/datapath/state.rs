//! Applying a desired state to the maps: id allocation, backend slots, the
//! double-buffered Maglev flip, and the destination pre-filter.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{Array, HashMap as BpfHashMap};
use router_common::{
    Backend, MAX_BACKENDS, MAX_SERVICES, MAX_SNAT_ADDRS, Member, Service, ServiceKey,
    selection::{MAX_SCAN_MEMBERS, member_index},
    v6::{Addr6, ServiceKey6},
};

pub(super) use super::keys::{ListenKey, service_key};
use super::{
    BackendSpec, Datapath, DatapathError, Selection, ServiceSpec, filter,
    keys::{addr6_of, backend_value},
    map_err,
    pools::{PooledState, Published},
    snat6,
};
use crate::maglev::{self, MaglevBackend};
use router_common::pools::MAX_POOLS;

pub(super) struct ServiceState {
    pub id: u32,
    pub spec: ServiceSpec,
    pub key: ListenKey,
    pub active: u32,
    /// What each table half holds, so a change writes only differing slots.
    pub halves: [Option<Vec<u32>>; 2],
    /// What each half's scan list in `MEMBERS` holds (`None`: unknown, as
    /// after adopting a pinned datapath).
    pub members: [Option<Vec<Member>>; 2],
    pub backend_ids: BTreeMap<String, u32>,
    /// Pools, share buckets and segments (empty for an unpooled service).
    pub pooled: PooledState,
}

impl ServiceState {
    pub fn live_table(&self) -> Option<&Vec<u32>> {
        self.halves[self.active as usize & 1].as_ref()
    }

    fn live_members(&self) -> Option<&Vec<Member>> {
        self.members[self.active as usize & 1].as_ref()
    }
}

/// Largest least-loaded service that is scanned in full on every new
/// flow; larger ones compare two choices drawn from the Maglev table. Set
/// from the datapath benchmark's SYN cost by member count
/// (bench/datapath.md): a scan costs about 17 ns per member, two choices
/// about 65 ns in all, so past eight members two choices is cheaper; up to
/// eight the scan's exact minimum costs no more than the SYN path's noise.
pub const SCAN_LIMIT: usize = 8;
const _: () = assert!(SCAN_LIMIT <= MAX_SCAN_MEMBERS as usize);

/// The scan list of a service or pool over `backends`: those that take
/// new flows, with their weights, in spec order; empty unless it is
/// least-loaded and small enough to scan.
pub(super) fn scan_list(
    selection: Selection,
    backends: &[&BackendSpec],
    ids: &BTreeMap<String, u32>,
    limit: usize,
) -> Vec<Member> {
    if selection != Selection::LeastLoaded {
        return Vec::new();
    }
    let list: Vec<Member> = backends
        .iter()
        .filter(|b| b.weight > 0)
        .map(|b| Member {
            backend_id: ids[&b.name],
            weight: b.weight,
            max_in_flight: b.max_in_flight,
            _pad: 0,
        })
        .collect();
    if list.len() > limit { Vec::new() } else { list }
}

/// The weighted Maglev table of `backends`, keyed by address (see
/// `maglev::build`).
pub(super) fn build_table(
    backends: &[&BackendSpec],
    ids: &BTreeMap<String, u32>,
    size: u32,
) -> Vec<u32> {
    let keys: Vec<String> = backends.iter().map(|b| b.address.to_string()).collect();
    let input: Vec<MaglevBackend<'_>> = backends
        .iter()
        .zip(&keys)
        .map(|(b, key)| MaglevBackend {
            key,
            id: ids[&b.name],
            weight: b.weight,
        })
        .collect();
    maglev::build(&input, size)
}

/// What one apply changed, for logs and reasons.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Services whose live table was swapped, with the number of slots that changed owner.
    pub swapped: Vec<(String, usize)>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

fn check(specs: &[ServiceSpec]) -> Result<(), DatapathError> {
    if specs.len() > MAX_SERVICES as usize {
        return Err(DatapathError::TooManyServices(specs.len()));
    }
    let backends: usize = specs.iter().map(|s| s.backends.len()).sum();
    if backends > MAX_BACKENDS as usize {
        return Err(DatapathError::TooManyBackends(backends));
    }
    let mut names = BTreeSet::new();
    let mut keys = BTreeSet::new();
    for s in specs {
        let bad = |reason: &str| DatapathError::Spec {
            service: s.name.clone(),
            reason: reason.to_string(),
        };
        if !names.insert(&s.name) {
            return Err(bad("duplicate service name"));
        }
        if !keys.insert((s.vip, s.proto)) {
            return Err(bad(
                "another service already listens on this VIP, port and protocol",
            ));
        }
        if let Some(b) = s
            .backends
            .iter()
            .find(|b| b.address.is_ipv6() != s.vip.is_ipv6())
        {
            return Err(bad(&format!(
                "backend {} is not of the VIP's address family",
                b.name
            )));
        }
        if s.vip.is_ipv6() {
            // `router_v6` and `router_nat6` place every flow from the
            // service's own Maglev table; neither counts flows in flight.
            if !s.pools.is_empty() || !s.segments.is_empty() {
                return Err(bad("an IPv6 service has no pools or segments"));
            }
            if s.selection == Selection::LeastLoaded {
                return Err(bad("an IPv6 service places by Maglev, not by load"));
            }
        }
        if let Some(a) = s.snat.iter().find(|a| a.is_ipv6() != s.vip.is_ipv6()) {
            return Err(bad(&format!(
                "SNAT address {a} is not of the VIP's address family"
            )));
        }
        if s.forwarding.is_dsr() {
            if !s.snat.is_empty() {
                return Err(bad("a DSR service takes no SNAT addresses"));
            }
            if s.selection == Selection::LeastLoaded {
                return Err(bad("a DSR service places by Maglev, not by load"));
            }
        } else if s.snat.is_empty() || s.snat.len() > MAX_SNAT_ADDRS {
            return Err(bad("needs 1 to 4 SNAT addresses"));
        }
        if s.snat_port_min > s.snat_port_max {
            return Err(bad("SNAT port range is empty"));
        }
        let mut bnames = BTreeSet::new();
        for b in &s.backends {
            if !bnames.insert(&b.name) {
                return Err(bad(&format!("duplicate backend name {}", b.name)));
            }
        }
        if s.pools.len() > MAX_POOLS as usize {
            return Err(bad(&format!("at most {MAX_POOLS} pools")));
        }
        let mut pooled = BTreeSet::new();
        for p in &s.pools {
            for b in &p.backends {
                if !bnames.contains(b) {
                    return Err(bad(&format!("pool {} names unknown backend {b}", p.name)));
                }
                if !pooled.insert(b) {
                    return Err(bad(&format!("backend {b} is in two pools")));
                }
            }
            if p.fallback.is_some_and(|f| f >= s.pools.len()) {
                return Err(bad(&format!("pool {} falls back to no pool", p.name)));
            }
        }
        if !s.pools.is_empty() && s.pools.iter().map(|p| p.share).sum::<u32>() != 100 {
            return Err(bad("pool shares do not add up to 100"));
        }
        if s.segments.iter().any(|g| g.pool >= s.pools.len()) {
            return Err(bad("a segment names no pool"));
        }
    }
    let slots: usize = specs.iter().map(|s| 1 + s.pools.len()).sum();
    if slots > MAX_SERVICES as usize {
        return Err(DatapathError::TooManyServices(slots));
    }
    Ok(())
}

impl Datapath {
    /// Makes the maps serve exactly `specs`. Validation happens before any
    /// write, so a rejected state leaves the datapath as it was.
    pub fn apply(&mut self, specs: &[ServiceSpec]) -> Result<ApplyReport, DatapathError> {
        check(specs)?;
        if let Some(pinned) = self.adopted.take() {
            self.adopt(pinned, specs);
        }
        let mut report = ApplyReport::default();

        // Plan ids first: nothing is written unless every service fits.
        // Every pool slot in use now stays taken this round, whether its
        // pool stays or not: a packet may still be reading its live half.
        let mut used_sids: BTreeSet<u32> = self
            .services
            .values()
            .flat_map(|st| st.pooled.slots())
            .collect();
        let mut used_bids: BTreeSet<u32> = self.retired_backends.iter().copied().collect();
        for s in specs {
            if let Some(st) = self.services.get(&s.name) {
                used_sids.insert(st.id);
                for b in &s.backends {
                    if let Some(id) = st.backend_ids.get(&b.name) {
                        used_bids.insert(*id);
                    }
                }
            }
        }
        let mut free_sids = (0..MAX_SERVICES).filter(|i| !used_sids.contains(i));
        let mut free_bids = (0..MAX_BACKENDS).filter(|i| !used_bids.contains(i));
        let mut plan: Vec<(u32, BTreeMap<String, u32>, Vec<u32>)> = Vec::with_capacity(specs.len());
        for s in specs {
            let existing = self.services.get(&s.name);
            let sid = match existing {
                Some(st) => st.id,
                None => free_sids
                    .next()
                    .ok_or(DatapathError::TooManyServices(specs.len()))?,
            };
            let mut ids = BTreeMap::new();
            for b in &s.backends {
                let id = match existing.and_then(|st| st.backend_ids.get(&b.name)) {
                    Some(id) => *id,
                    None => free_bids
                        .next()
                        .ok_or(DatapathError::TooManyBackends(used_bids.len() + 1))?,
                };
                ids.insert(b.name.clone(), id);
            }
            let mut slots = Vec::with_capacity(s.pools.len());
            for p in &s.pools {
                let kept = existing.and_then(|st| {
                    st.pooled
                        .pools
                        .iter()
                        .find(|ps| ps.name == p.name)
                        .map(|ps| ps.slot)
                });
                let slot = match kept {
                    Some(slot) => slot,
                    None => free_sids
                        .next()
                        .ok_or(DatapathError::TooManyServices(MAX_SERVICES as usize + 1))?,
                };
                slots.push(slot);
            }
            plan.push((sid, ids, slots));
        }

        // Every kind of address either side has, before any service moves
        // (see `filter::transition`); the new bits once all have.
        // Most applies only move weights: the filter stays as it is, and
        // the transition would write nothing the final write does not.
        let (want, snat) = filter::bits(specs);
        let (_, snat_now) = filter::bits(self.services.values().map(|st| &st.spec));
        if want != self.filter || snat != snat_now {
            let during = filter::transition(&self.filter, &want);
            self.write_filter(&during, &snat_now.union(&snat).copied().collect())?;
        }

        // An IPv6 NAT service's replies are recognised by these before it
        // is written (as `write_filter` does for IPv4 above).
        let snat6 = snat6::all(specs);
        self.add_snat_addrs6(&snat6)?;

        // Slots retired last round are now unreachable from any live table.
        let retired_before = std::mem::take(&mut self.retired_backends);
        let wanted: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();

        for (s, (sid, ids, slots)) in specs.iter().zip(plan) {
            self.write_backends(s, sid, &ids)?;
            let is_new = !self.services.contains_key(&s.name);
            let swapped = self.publish_service(s, sid, ids, &slots)?;
            if is_new {
                report.added.push(s.name.clone());
            }
            if let Some(changed) = swapped {
                report.swapped.push((s.name.clone(), changed));
            }
        }

        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|n| !wanted.contains(n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(mut st) = self.services.remove(&name) {
                self.remove_service(&st.key)?;
                if st.spec.vip.is_ipv6() && !st.spec.snat.is_empty() {
                    self.write_snat6(st.id, None)?;
                }
                let was = st.pooled.pools.len();
                self.retire_pools(st.id, was, 0, &BTreeSet::new(), &mut st.pooled)?;
                self.retired_backends
                    .extend(st.backend_ids.values().copied());
                report.removed.push(name);
            }
        }

        self.write_filter(&want, &snat)?;
        self.retire_snat_addrs6(&snat6)?;
        self.release_backends(&retired_before)?;
        Ok(report)
    }

    fn write_backends(
        &mut self,
        s: &ServiceSpec,
        sid: u32,
        ids: &BTreeMap<String, u32>,
    ) -> Result<(), DatapathError> {
        let mut backends: Array<_, Backend> = Array::try_from(
            self.ebpf
                .map_mut("BACKENDS")
                .ok_or(DatapathError::MissingMap("BACKENDS"))?,
        )
        .map_err(map_err("BACKENDS"))?;
        for b in &s.backends {
            let id = ids[&b.name];
            let value = backend_value(b, sid);
            if backends.get(&id, 0).map_err(map_err("BACKENDS"))? != value {
                backends.set(id, value, 0).map_err(map_err("BACKENDS"))?;
            }
        }
        if !s.vip.is_ipv6() {
            return Ok(());
        }
        let mut addrs: Array<_, Addr6> = Array::try_from(
            self.ebpf
                .map_mut("BACKEND_ADDRS6")
                .ok_or(DatapathError::MissingMap("BACKEND_ADDRS6"))?,
        )
        .map_err(map_err("BACKEND_ADDRS6"))?;
        for b in &s.backends {
            let (id, Some(addr)) = (ids[&b.name], addr6_of(b)) else {
                continue;
            };
            if addrs.get(&id, 0).map_err(map_err("BACKEND_ADDRS6"))? != addr {
                addrs.set(id, addr, 0).map_err(map_err("BACKEND_ADDRS6"))?;
            }
        }
        Ok(())
    }

    /// Writes a service's value under `key`, in its family's map.
    fn insert_service(&mut self, key: ListenKey, value: Service) -> Result<(), DatapathError> {
        match key {
            ListenKey::V4(k) => self
                .services_map::<ServiceKey>("SERVICES")?
                .insert(k, value, 0),
            ListenKey::V6(k) => self
                .services_map::<ServiceKey6>("SERVICES6")?
                .insert(k, value, 0),
        }
        .map_err(map_err(key.map_name()))
    }

    fn remove_service(&mut self, key: &ListenKey) -> Result<(), DatapathError> {
        match key {
            ListenKey::V4(k) => self.services_map::<ServiceKey>("SERVICES")?.remove(k),
            ListenKey::V6(k) => self.services_map::<ServiceKey6>("SERVICES6")?.remove(k),
        }
        .map_err(map_err(key.map_name()))
    }

    fn services_map<K: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<BpfHashMap<&mut aya::maps::MapData, K, Service>, DatapathError> {
        BpfHashMap::try_from(
            self.ebpf
                .map_mut(name)
                .ok_or(DatapathError::MissingMap(name))?,
        )
        .map_err(map_err(name))
    }

    /// Builds the service's table; if it differs from the live half, writes
    /// the idle half and flips. Returns the number of slots that changed
    /// owner when a swap happened.
    fn publish_service(
        &mut self,
        s: &ServiceSpec,
        sid: u32,
        ids: BTreeMap<String, u32>,
        slots: &[u32],
    ) -> Result<Option<usize>, DatapathError> {
        let all: Vec<&BackendSpec> = s.backends.iter().collect();
        let table = build_table(&all, &ids, self.opts.table_size);
        let members = scan_list(s.selection, &all, &ids, self.scan_limit);

        let existed = self.services.contains_key(&s.name);
        let mut st = match self.services.remove(&s.name) {
            Some(st) => st,
            None => ServiceState {
                id: sid,
                spec: s.clone(),
                key: service_key(s),
                active: 0,
                halves: [None, None],
                members: [None, None],
                backend_ids: BTreeMap::new(),
                pooled: PooledState::default(),
            },
        };
        // Backends dropped from this service stay addressable for one more round.
        for (name, id) in &st.backend_ids {
            if !ids.contains_key(name) {
                self.retired_backends.push(*id);
            }
        }
        let old_key = st.key;
        let new_key = service_key(s);

        let mut swapped = None;
        let mut active = st.active;
        if st.live_table() != Some(&table) || st.live_members() != Some(&members) {
            let idle = (st.active ^ 1) & 1;
            let changed = match st.live_table() {
                Some(live) => live.iter().zip(&table).filter(|(a, b)| a != b).count(),
                None => table.len(),
            };
            self.write_half(sid, idle, &table, st.halves[idle as usize].as_deref())?;
            self.write_members(sid, idle, &members, st.members[idle as usize].as_deref())?;
            st.halves[idle as usize] = Some(table);
            st.members[idle as usize] = Some(members);
            active = idle;
            swapped = Some(changed);
        }
        let member_count = st.members[active as usize & 1]
            .as_ref()
            .map_or(0, |m| m.len() as u32);

        let pools_before = st.pooled.pools.len();
        // Spill counts are by pool index: new pools, or pools renamed or
        // reordered, start from zero.
        let renamed = !st
            .pooled
            .pools
            .iter()
            .map(|p| &p.name)
            .eq(s.pools.iter().map(|p| &p.name));
        if !s.pools.is_empty() && renamed {
            self.reset_spills(sid)?;
        }
        let published = if s.pools.is_empty() {
            Published {
                pools: 0,
                share_half: st.pooled.share_half,
                segments: 0,
            }
        } else {
            self.publish_pools(s, sid, &ids, slots, &mut st.pooled)?
        };

        // An IPv6 service's SNAT addresses are in `SNAT6`, not here.
        let v4: Vec<u32> = s
            .snat
            .iter()
            .filter_map(|a| match a {
                std::net::IpAddr::V4(a) => Some(u32::from_ne_bytes(a.octets())),
                std::net::IpAddr::V6(_) => None,
            })
            .collect();
        let mut snat_addrs = [0u32; MAX_SNAT_ADDRS];
        for (slot, a) in snat_addrs.iter_mut().zip(&v4) {
            *slot = *a;
        }
        let value = Service {
            id: sid,
            active_table: active,
            snat_addrs,
            snat_count: v4.len() as u32,
            snat_port_min: s.snat_port_min,
            snat_port_max: s.snat_port_max,
            selection: s.selection.code(),
            members: member_count,
            pools: published.pools,
            share_half: published.share_half,
            segments: published.segments,
            forwarding: s.forwarding.code(),
            gue_port: s.forwarding.gue_port_be(),
            _pad: 0,
        };
        // An IPv6 NAT service's addresses are in place before the value
        // that sends its packets to `router_nat6`.
        let snat6 = snat6::value(s);
        if snat6.is_some() {
            self.write_snat6(sid, snat6)?;
        }
        // One value replace: the new half and any new SNAT settings become
        // visible to packets together.
        self.insert_service(new_key, value)?;
        if existed && old_key != new_key {
            self.remove_service(&old_key)?;
        }
        // No longer an IPv6 NAT service (now DSR, or IPv4): its addresses
        // go once no packet can find the service as one. (An adopted spec
        // has them whenever `SNAT6` held an entry for its id.)
        if snat6.is_none() && existed && st.spec.vip.is_ipv6() && !st.spec.snat.is_empty() {
            self.write_snat6(sid, None)?;
        }
        let want: BTreeSet<_> = s.segments.iter().map(|g| (g.addr, g.prefix_len)).collect();
        self.retire_pools(sid, pools_before, s.pools.len(), &want, &mut st.pooled)?;
        if s.pools.is_empty() {
            st.pooled = PooledState::default();
        }
        st.active = active;
        st.key = new_key;
        st.spec = s.clone();
        st.backend_ids = ids;
        st.id = sid;
        self.services.insert(s.name.clone(), st);
        Ok(swapped)
    }

    pub(super) fn write_half(
        &mut self,
        sid: u32,
        half: u32,
        table: &[u32],
        previous: Option<&[u32]>,
    ) -> Result<(), DatapathError> {
        let size = self.opts.table_size;
        let base = (sid * 2 + half) * size;
        let mut tables: Array<_, u32> = Array::try_from(
            self.ebpf
                .map_mut("MAGLEV_TABLES")
                .ok_or(DatapathError::MissingMap("MAGLEV_TABLES"))?,
        )
        .map_err(map_err("MAGLEV_TABLES"))?;
        for (slot, id) in table.iter().enumerate() {
            if previous.is_some_and(|p| p.get(slot) == Some(id)) {
                continue;
            }
            tables
                .set(base + slot as u32, *id, 0)
                .map_err(map_err("MAGLEV_TABLES"))?;
        }
        Ok(())
    }

    /// Writes a scan list into the idle half of `MEMBERS`, skipping entries
    /// that already hold the same member. Entries past the list's end are
    /// not read (the service value carries the count).
    pub(super) fn write_members(
        &mut self,
        sid: u32,
        half: u32,
        list: &[Member],
        previous: Option<&[Member]>,
    ) -> Result<(), DatapathError> {
        let mut members: Array<_, Member> = Array::try_from(
            self.ebpf
                .map_mut("MEMBERS")
                .ok_or(DatapathError::MissingMap("MEMBERS"))?,
        )
        .map_err(map_err("MEMBERS"))?;
        for (i, m) in list.iter().enumerate() {
            if previous.is_some_and(|p| p.get(i) == Some(m)) {
                continue;
            }
            members
                .set(member_index(sid, half, i as u32), *m, 0)
                .map_err(map_err("MEMBERS"))?;
        }
        Ok(())
    }

    fn release_backends(&mut self, ids: &[u32]) -> Result<(), DatapathError> {
        let live: BTreeSet<u32> = self
            .services
            .values()
            .flat_map(|s| s.backend_ids.values().copied())
            .collect();
        let mut backends: Array<_, Backend> = Array::try_from(
            self.ebpf
                .map_mut("BACKENDS")
                .ok_or(DatapathError::MissingMap("BACKENDS"))?,
        )
        .map_err(map_err("BACKENDS"))?;
        let freed: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| !live.contains(id))
            .collect();
        for id in &freed {
            backends
                .set(*id, Backend::default(), 0)
                .map_err(map_err("BACKENDS"))?;
        }
        // A later IPv4 backend in the slot must not carry a stale address
        // into anything that reads the array by id.
        let mut addrs: Array<_, Addr6> = Array::try_from(
            self.ebpf
                .map_mut("BACKEND_ADDRS6")
                .ok_or(DatapathError::MissingMap("BACKEND_ADDRS6"))?,
        )
        .map_err(map_err("BACKEND_ADDRS6"))?;
        for id in &freed {
            addrs
                .set(*id, Addr6::default(), 0)
                .map_err(map_err("BACKEND_ADDRS6"))?;
        }
        for id in freed {
            self.reset_backend_stats(id)?;
            self.load.clear(id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{BackendRole, Forwarding};

    fn spec(name: &str, vip: &str, backends: &[&str], forwarding: Forwarding) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            vip: vip.parse().unwrap(),
            proto: router_common::PROTO_TCP,
            snat: Vec::new(),
            snat_port_min: 1024,
            snat_port_max: 65535,
            selection: Selection::Maglev,
            backends: backends
                .iter()
                .enumerate()
                .map(|(i, a)| BackendSpec {
                    name: format!("b{i}"),
                    role: BackendRole::Primary,
                    address: a.parse().unwrap(),
                    weight: 100,
                    max_in_flight: 0,
                })
                .collect(),
            pools: Vec::new(),
            segments: Vec::new(),
            forwarding,
        }
    }

    fn refusal(specs: &[ServiceSpec]) -> String {
        check(specs).unwrap_err().to_string()
    }

    #[test]
    fn an_ipv6_service_is_keyed_for_services6_in_wire_order() {
        let s = spec("v6", "[2001:db8::1]:443", &[], Forwarding::Ipip);
        let ListenKey::V6(k) = service_key(&s) else {
            panic!("an IPv6 VIP keys SERVICES6");
        };
        assert_eq!(k.addr.octets()[..4], [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(k.port, 443u16.to_be());
        assert_eq!(service_key(&s).vip(), s.vip);
        let v4 = spec("v4", "198.18.0.1:443", &[], Forwarding::Ipip);
        assert!(matches!(service_key(&v4), ListenKey::V4(_)));
        assert_eq!(service_key(&v4).vip(), v4.vip);
    }

    #[test]
    fn an_ipv6_backend_keeps_its_address_out_of_backends() {
        let s = spec(
            "v6",
            "[2001:db8::1]:80",
            &["[2001:db8::11]:8000"],
            Forwarding::Ipip,
        );
        let b = &s.backends[0];
        let value = backend_value(b, 3);
        assert_eq!(
            (value.addr, value.port, value.in_use),
            (0, 8000u16.to_be(), 1)
        );
        assert_eq!(
            addr6_of(b).map(|a| a.octets()),
            Some(
                "2001:db8::11"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets()
            )
        );
        let v4 = spec(
            "v4",
            "198.18.0.1:80",
            &["198.18.0.11:8000"],
            Forwarding::Ipip,
        );
        assert_eq!(addr6_of(&v4.backends[0]), None);
        assert_eq!(
            backend_value(&v4.backends[0], 3).addr,
            u32::from_ne_bytes([198, 18, 0, 11])
        );
    }

    #[test]
    fn the_same_vip_text_in_each_family_is_two_listeners_but_one_per_family() {
        let v6 = spec(
            "a",
            "[2001:db8::1]:80",
            &["[2001:db8::11]:80"],
            Forwarding::Ipip,
        );
        let v4 = spec("b", "198.18.0.1:80", &["198.18.0.11:80"], Forwarding::Ipip);
        assert!(check(&[v6.clone(), v4]).is_ok());
        let again = ServiceSpec {
            name: "c".into(),
            ..v6.clone()
        };
        assert!(refusal(&[v6, again]).contains("already listens"));
    }

    #[test]
    fn ipv6_services_are_of_one_family_without_pools_and_place_by_maglev() {
        let nat = ServiceSpec {
            snat: vec!["2001:db8::a".parse().unwrap()],
            ..spec(
                "n",
                "[2001:db8::1]:80",
                &["[2001:db8::11]:80"],
                Forwarding::Nat,
            )
        };
        assert!(check(std::slice::from_ref(&nat)).is_ok());
        let snat4 = ServiceSpec {
            snat: vec![std::net::Ipv4Addr::new(198, 18, 0, 1).into()],
            ..nat.clone()
        };
        assert!(
            refusal(&[snat4])
                .contains("SNAT address 198.18.0.1 is not of the VIP's address family")
        );
        let snat6_on_v4 = ServiceSpec {
            snat: vec!["2001:db8::a".parse().unwrap()],
            ..spec("v4", "198.18.0.1:80", &["198.18.0.11:80"], Forwarding::Nat)
        };
        assert!(refusal(&[snat6_on_v4]).contains("not of the VIP's address family"));
        let by_load = ServiceSpec {
            selection: Selection::LeastLoaded,
            ..nat.clone()
        };
        assert!(refusal(&[by_load]).contains("places by Maglev, not by load"));
        let bare = ServiceSpec {
            snat: Vec::new(),
            ..nat
        };
        assert!(refusal(&[bare]).contains("needs 1 to 4 SNAT addresses"));
        let mixed = spec(
            "m",
            "[2001:db8::1]:80",
            &["198.18.0.11:80"],
            Forwarding::Ipip,
        );
        assert!(refusal(&[mixed]).contains("backend b0 is not of the VIP's address family"));
        let mixed4 = spec(
            "m",
            "198.18.0.1:80",
            &["[2001:db8::11]:80"],
            Forwarding::Ipip,
        );
        assert!(refusal(&[mixed4]).contains("address family"));
        let pooled = ServiceSpec {
            pools: vec![crate::datapath::PoolSpec {
                name: "p".into(),
                backends: vec!["b0".into()],
                share: 100,
                fallback: None,
                saturated: false,
            }],
            ..spec(
                "p",
                "[2001:db8::1]:80",
                &["[2001:db8::11]:80"],
                Forwarding::Gue { port: 6080 },
            )
        };
        assert!(refusal(&[pooled]).contains("no pools or segments"));
    }
}
