//! The destination pre-filter (`ADDR_FILTER`, see `router_common::flags`)
//! and the exact SNAT address set behind it: what each bucket should say
//! for a set of services, and the order in which a change is written so
//! that no packet is judged by a bit that is wrong for it.

use std::{collections::BTreeSet, net::IpAddr};

use aya::maps::{Array, HashMap as BpfHashMap};
use router_common::{
    ADDR_FILTER_SIZE, FILTER_DSR, FILTER_DSR_ONLY, FILTER_SNAT, FILTER_VIP, addr_filter_bucket,
};

use super::{
    Datapath, DatapathError, ServiceSpec, map_err,
    state::{ListenKey, service_key},
};

/// Every bucket's bits for `services`, and their SNAT addresses as read
/// off the wire. IPv6 services add none: the filter is read for IPv4
/// destinations only (`router_v6` takes every IPv6 frame).
pub(super) fn bits<'a>(
    services: impl IntoIterator<Item = &'a ServiceSpec>,
) -> (Vec<u32>, BTreeSet<u32>) {
    let mut want = vec![0u32; ADDR_FILTER_SIZE as usize];
    // Buckets that something other than a DSR service's address falls in.
    let mut shared = vec![false; ADDR_FILTER_SIZE as usize];
    let mut snat = BTreeSet::new();
    for s in services {
        let ListenKey::V4(key) = service_key(s) else {
            continue;
        };
        let bucket = addr_filter_bucket(key.addr) as usize;
        if s.forwarding.is_dsr() {
            want[bucket] |= FILTER_VIP | FILTER_DSR;
        } else {
            want[bucket] |= FILTER_VIP;
            shared[bucket] = true;
        }
        for a in &s.snat {
            let IpAddr::V4(a) = a else { continue };
            let addr = u32::from_ne_bytes(a.octets());
            let bucket = addr_filter_bucket(addr) as usize;
            want[bucket] |= FILTER_SNAT;
            shared[bucket] = true;
            snat.insert(addr);
        }
    }
    for (bits, shared) in want.iter_mut().zip(shared) {
        if *bits & FILTER_DSR != 0 && !shared {
            *bits |= FILTER_DSR_ONLY;
        }
    }
    (want, snat)
}

/// The bits that hold while services change from `have`'s to `want`'s:
/// every kind of address either side has (a packet finds its service in
/// whichever version it reads), and `FILTER_DSR_ONLY` only where both
/// sides have it, so no NAT service's packet is handed to the DSR program
/// before or after its service is written.
pub(super) fn transition(have: &[u32], want: &[u32]) -> Vec<u32> {
    have.iter()
        .zip(want)
        .map(|(h, w)| (h | w) & !FILTER_DSR_ONLY | (h & w & FILTER_DSR_ONLY))
        .collect()
}

impl Datapath {
    /// Writes `want` where it differs from what the map holds, with the
    /// exact SNAT set `snat`: added first, removed last, since it only
    /// matters where the pre-filter says "SNAT" (see the map).
    pub(super) fn write_filter(
        &mut self,
        want: &[u32],
        snat: &BTreeSet<u32>,
    ) -> Result<(), DatapathError> {
        let mut addrs: BpfHashMap<_, u32, u32> = BpfHashMap::try_from(
            self.ebpf
                .map_mut("SNAT_ADDRS")
                .ok_or(DatapathError::MissingMap("SNAT_ADDRS"))?,
        )
        .map_err(map_err("SNAT_ADDRS"))?;
        let have: BTreeSet<u32> = addrs.keys().filter_map(Result::ok).collect();
        for a in snat.difference(&have) {
            addrs.insert(a, 1, 0).map_err(map_err("SNAT_ADDRS"))?;
        }
        let stale: Vec<u32> = have.difference(snat).copied().collect();
        let mut filter: Array<_, u32> = Array::try_from(
            self.ebpf
                .map_mut("ADDR_FILTER")
                .ok_or(DatapathError::MissingMap("ADDR_FILTER"))?,
        )
        .map_err(map_err("ADDR_FILTER"))?;
        for (i, (have, want)) in self.filter.iter_mut().zip(want).enumerate() {
            if have != want {
                filter
                    .set(i as u32, *want, 0)
                    .map_err(map_err("ADDR_FILTER"))?;
                *have = *want;
            }
        }
        let mut addrs: BpfHashMap<_, u32, u32> = BpfHashMap::try_from(
            self.ebpf
                .map_mut("SNAT_ADDRS")
                .ok_or(DatapathError::MissingMap("SNAT_ADDRS"))?,
        )
        .map_err(map_err("SNAT_ADDRS"))?;
        for a in stale {
            addrs.remove(&a).map_err(map_err("SNAT_ADDRS"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

    use super::*;
    use crate::datapath::{Forwarding, Selection};

    fn service(vip: [u8; 4], port: u16, forwarding: Forwarding, snat: &[[u8; 4]]) -> ServiceSpec {
        ServiceSpec {
            name: format!("{vip:?}:{port}"),
            vip: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(vip), port)),
            proto: 6,
            snat: snat.iter().map(|a| Ipv4Addr::from(*a).into()).collect(),
            snat_port_min: 1024,
            snat_port_max: 65535,
            selection: Selection::Maglev,
            backends: Vec::new(),
            pools: Vec::new(),
            segments: Vec::new(),
            forwarding,
        }
    }

    fn bucket(a: [u8; 4]) -> usize {
        addr_filter_bucket(u32::from_ne_bytes(a)) as usize
    }

    /// An address whose bucket is not `a`'s.
    fn elsewhere(a: [u8; 4]) -> [u8; 4] {
        (1..=254u8)
            .map(|last| [198, 18, 9, last])
            .find(|b| bucket(*b) != bucket(a))
            .expect("some address lands in another bucket")
    }

    /// An address other than `a` in `a`'s bucket.
    fn neighbour(a: [u8; 4]) -> [u8; 4] {
        (0..=255u8)
            .flat_map(|x| (1..=254u8).map(move |y| [198, 19, x, y]))
            .find(|b| *b != a && bucket(*b) == bucket(a))
            .expect("the buckets are fewer than the addresses")
    }

    const DSR_VIP: [u8; 4] = [198, 18, 0, 10];

    #[test]
    fn a_dsr_address_alone_in_its_bucket_is_exclusive() {
        let nat_vip = elsewhere(DSR_VIP);
        let (want, snat) = bits(&[
            service(DSR_VIP, 80, Forwarding::Ipip, &[]),
            service(DSR_VIP, 443, Forwarding::Gue { port: 6080 }, &[]),
            service(nat_vip, 80, Forwarding::Nat, &[elsewhere(nat_vip)]),
        ]);
        assert_eq!(
            want[bucket(DSR_VIP)],
            FILTER_VIP | FILTER_DSR | FILTER_DSR_ONLY
        );
        assert_eq!(want[bucket(nat_vip)], FILTER_VIP);
        assert_eq!(snat.len(), 1);
    }

    #[test]
    fn a_nat_service_on_the_same_address_or_bucket_makes_it_shared() {
        for nat_vip in [DSR_VIP, neighbour(DSR_VIP)] {
            let (want, _) = bits(&[
                service(DSR_VIP, 80, Forwarding::Ipip, &[]),
                service(nat_vip, 8080, Forwarding::Nat, &[elsewhere(DSR_VIP)]),
            ]);
            assert_eq!(
                want[bucket(DSR_VIP)],
                FILTER_VIP | FILTER_DSR,
                "{nat_vip:?}"
            );
        }
    }

    #[test]
    fn a_snat_address_in_the_bucket_makes_it_shared() {
        let (want, snat) = bits(&[
            service(DSR_VIP, 80, Forwarding::Ipip, &[]),
            service(
                elsewhere(DSR_VIP),
                80,
                Forwarding::Nat,
                &[neighbour(DSR_VIP)],
            ),
        ]);
        assert_eq!(want[bucket(DSR_VIP)], FILTER_VIP | FILTER_DSR | FILTER_SNAT);
        assert!(snat.contains(&u32::from_ne_bytes(neighbour(DSR_VIP))));
    }

    #[test]
    fn an_ipv6_service_sets_no_bit() {
        let v6 = ServiceSpec {
            vip: "[2001:db8::1]:80".parse().unwrap(),
            ..service(DSR_VIP, 80, Forwarding::Ipip, &[])
        };
        let (want, snat) = bits(std::slice::from_ref(&v6));
        assert!(want.iter().all(|b| *b == 0) && snat.is_empty());
        // Beside an IPv4 DSR service, whose bucket stays exclusive.
        let (want, _) = bits(&[v6, service(DSR_VIP, 80, Forwarding::Ipip, &[])]);
        assert_eq!(
            want[bucket(DSR_VIP)],
            FILTER_VIP | FILTER_DSR | FILTER_DSR_ONLY
        );
        assert_eq!(want.iter().filter(|b| **b != 0).count(), 1);
    }

    #[test]
    fn the_transition_keeps_every_kind_and_exclusivity_only_where_both_have_it() {
        let only = FILTER_VIP | FILTER_DSR | FILTER_DSR_ONLY;
        let have = [only, only, FILTER_VIP, 0, only];
        let want = [only, FILTER_VIP | FILTER_DSR, only, only, 0];
        assert_eq!(
            transition(&have, &want),
            [
                only,
                FILTER_VIP | FILTER_DSR,
                FILTER_VIP | FILTER_DSR,
                FILTER_VIP | FILTER_DSR,
                FILTER_VIP | FILTER_DSR,
            ]
        );
    }
}
