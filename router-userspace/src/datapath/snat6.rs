//! IPv6 NAT services' SNAT addresses: each service's own (`SNAT6`, by
//! service id, what `router_nat6` translates a new flow's source to) and
//! the set of all of them (`SNAT_ADDRS6`, where `router_v6` recognises a
//! backend's reply). The IPv4 twins live in the `Service` value and in
//! `SNAT_ADDRS` (see `filter`). Writes are ordered so that a packet never
//! finds a service whose addresses are missing: set entries are added
//! before any service is written and removed after every service is.

use std::{collections::BTreeSet, net::IpAddr};

use aya::maps::{HashMap as BpfHashMap, MapError};
use router_common::{
    MAX_SNAT_ADDRS,
    v6::{Addr6, Snat6},
};

use super::{Datapath, DatapathError, ServiceSpec, map_err};

/// Whether `s` is `router_nat6`'s: an IPv6 VIP forwarded by NAT.
pub(super) fn is_nat6(s: &ServiceSpec) -> bool {
    s.vip.is_ipv6() && !s.forwarding.is_dsr()
}

/// The IPv6 SNAT addresses of `s`, as the datapath reads them off the wire.
fn addrs6(s: &ServiceSpec) -> impl Iterator<Item = Addr6> + '_ {
    s.snat.iter().filter_map(|a| match a {
        IpAddr::V6(a) => Some(Addr6::from_octets(a.octets())),
        IpAddr::V4(_) => None,
    })
}

/// `SNAT6`'s value for `s`; None unless it is an IPv6 NAT service.
pub(super) fn value(s: &ServiceSpec) -> Option<Snat6> {
    if !is_nat6(s) {
        return None;
    }
    let mut v = Snat6::default();
    for (slot, a) in v.addrs.iter_mut().zip(addrs6(s)) {
        *slot = a;
    }
    // `check` refused more than the array holds.
    v.count = addrs6(s).count().min(MAX_SNAT_ADDRS) as u32;
    Some(v)
}

/// Every IPv6 SNAT address of `specs`: what `SNAT_ADDRS6` should hold.
pub(super) fn all<'a>(specs: impl IntoIterator<Item = &'a ServiceSpec>) -> BTreeSet<Addr6> {
    specs
        .into_iter()
        .filter(|s| is_nat6(s))
        .flat_map(addrs6)
        .collect()
}

/// The SNAT addresses of a pinned `SNAT6` value, for an adopted spec.
pub(super) fn addrs_of(v: &Snat6) -> Vec<IpAddr> {
    let count = (v.count as usize).min(v.addrs.len());
    v.addrs[..count]
        .iter()
        .map(|a| IpAddr::from(a.octets()))
        .collect()
}

impl Datapath {
    fn snat6_map(
        &mut self,
    ) -> Result<BpfHashMap<&mut aya::maps::MapData, u32, Snat6>, DatapathError> {
        BpfHashMap::try_from(
            self.ebpf
                .map_mut("SNAT6")
                .ok_or(DatapathError::MissingMap("SNAT6"))?,
        )
        .map_err(map_err("SNAT6"))
    }

    fn snat_addrs6_map(
        &mut self,
    ) -> Result<BpfHashMap<&mut aya::maps::MapData, Addr6, u32>, DatapathError> {
        BpfHashMap::try_from(
            self.ebpf
                .map_mut("SNAT_ADDRS6")
                .ok_or(DatapathError::MissingMap("SNAT_ADDRS6"))?,
        )
        .map_err(map_err("SNAT_ADDRS6"))
    }

    /// Makes `SNAT6[sid]` hold `value`, or nothing for None; writes only
    /// when it differs (most applies move weights only).
    pub(super) fn write_snat6(
        &mut self,
        sid: u32,
        value: Option<Snat6>,
    ) -> Result<(), DatapathError> {
        let mut map = self.snat6_map()?;
        let have = match map.get(&sid, 0) {
            Ok(v) => Some(v),
            Err(MapError::KeyNotFound) => None,
            Err(e) => return Err(map_err("SNAT6")(e)),
        };
        match value {
            Some(v) if have != Some(v) => map.insert(sid, v, 0).map_err(map_err("SNAT6")),
            None if have.is_some() => match map.remove(&sid) {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(map_err("SNAT6")(e)),
            },
            _ => Ok(()),
        }
    }

    /// Adds the addresses of `want` that `SNAT_ADDRS6` lacks; the first
    /// half of a change, before any service is written.
    pub(super) fn add_snat_addrs6(&mut self, want: &BTreeSet<Addr6>) -> Result<(), DatapathError> {
        let mut map = self.snat_addrs6_map()?;
        let have: BTreeSet<Addr6> = map.keys().filter_map(Result::ok).collect();
        for a in want.difference(&have) {
            map.insert(a, 1, 0).map_err(map_err("SNAT_ADDRS6"))?;
        }
        Ok(())
    }

    /// Removes the addresses that are not in `want` (no service holds them
    /// any more); the second half, after every service is written. An
    /// address two services share stays while either has it.
    pub(super) fn retire_snat_addrs6(
        &mut self,
        want: &BTreeSet<Addr6>,
    ) -> Result<(), DatapathError> {
        let mut map = self.snat_addrs6_map()?;
        let stale: Vec<Addr6> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|a| !want.contains(a))
            .collect();
        for a in stale {
            match map.remove(&a) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err("SNAT_ADDRS6")(e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{Forwarding, Selection};

    fn spec(vip: &str, forwarding: Forwarding, snat: &[&str]) -> ServiceSpec {
        ServiceSpec {
            name: vip.into(),
            vip: vip.parse().unwrap(),
            proto: router_common::PROTO_TCP,
            snat: snat.iter().map(|a| a.parse().unwrap()).collect(),
            snat_port_min: 1024,
            snat_port_max: 65535,
            selection: Selection::Maglev,
            backends: Vec::new(),
            pools: Vec::new(),
            segments: Vec::new(),
            forwarding,
        }
    }

    #[test]
    fn only_ipv6_nat_services_have_a_snat6_value() {
        let nat6 = spec(
            "[2001:db8::1]:80",
            Forwarding::Nat,
            &["2001:db8::a", "2001:db8::b"],
        );
        let v = value(&nat6).unwrap();
        assert_eq!(v.count, 2);
        assert_eq!(addrs_of(&v), nat6.snat);
        assert_eq!(v.addrs[2], Addr6::default());
        assert!(value(&spec("[2001:db8::1]:80", Forwarding::Ipip, &[])).is_none());
        assert!(value(&spec("198.18.0.1:80", Forwarding::Nat, &["198.18.0.2"])).is_none());
    }

    #[test]
    fn the_address_set_is_every_ipv6_nat_services_once() {
        let a = spec("[2001:db8::1]:80", Forwarding::Nat, &["2001:db8::a"]);
        let b = spec(
            "[2001:db8::2]:80",
            Forwarding::Nat,
            &["2001:db8::a", "2001:db8::b"],
        );
        let v4 = spec("198.18.0.1:80", Forwarding::Nat, &["198.18.0.2"]);
        let set = all([&a, &b, &v4]);
        assert_eq!(set.len(), 2);
        assert!(
            set.contains(&Addr6::from_octets(
                "2001:db8::b"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets()
            ))
        );
        assert!(all([&v4]).is_empty());
    }
}
