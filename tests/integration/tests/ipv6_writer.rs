//! The userspace side of IPv6 services against the real maps: what
//! `Datapath::apply` writes for an IPv6 DSR service (`SERVICES6`, its
//! backends in `BACKENDS` with address 0 and in `BACKEND_ADDRS6`), that
//! `router_v6` balances a flow from what was written, what a removal
//! clears, and a restart that adopts the pinned IPv6 service without a
//! table write that moves a flow. For an IPv6 NAT service, also its SNAT
//! addresses (`SNAT6` by service id, the set of all in `SNAT_ADDRS6`):
//! written, shared, cleared, moved between DSR and NAT, and adopted.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use aya::maps::{Array, HashMap as BpfHashMap};
use router::datapath::{Datapath, LoadOptions, PinDir};
use router_common::{
    Backend, Service,
    v6::{Addr6, ServiceKey6, Snat6},
};
use router_testkit::{
    bpffs::BpfFs,
    packet::TCP_SYN,
    packet6::{Packet6, addr6, ip6},
    xdp_fixture::*,
};

const VIP6: &str = "[2001:db8:100::1]:8000";
/// The backends `service6` puts on the fixture's arm (static neighbours).
const BACKENDS6: [&str; 3] = ["2001:2::11", "2001:2::12", "2001:2::13"];

fn key6() -> ServiceKey6 {
    let vip: SocketAddr = VIP6.parse().unwrap();
    let IpAddr::V6(a) = vip.ip() else {
        unreachable!()
    };
    ServiceKey6 {
        addr: Addr6::from_octets(a.octets()),
        port: vip.port().to_be(),
        proto: 6,
        _pad: 0,
    }
}

fn service_value(dp: &mut Datapath) -> Option<Service> {
    let map: BpfHashMap<_, ServiceKey6, Service> =
        BpfHashMap::try_from(dp.ebpf_mut().map_mut("SERVICES6").unwrap()).unwrap();
    map.get(&key6(), 0).ok()
}

fn backend(dp: &mut Datapath, id: u32) -> (Backend, Ipv6Addr) {
    let b: Array<_, Backend> = Array::try_from(dp.ebpf_mut().map("BACKENDS").unwrap()).unwrap();
    let b = b.get(&id, 0).unwrap();
    let a: Array<_, Addr6> = Array::try_from(dp.ebpf_mut().map("BACKEND_ADDRS6").unwrap()).unwrap();
    (b, Ipv6Addr::from(a.get(&id, 0).unwrap().octets()))
}

/// `SNAT6[id]`'s addresses; None without an entry.
fn snat6(dp: &mut Datapath, id: u32) -> Option<Vec<Ipv6Addr>> {
    let map: BpfHashMap<_, u32, Snat6> =
        BpfHashMap::try_from(dp.ebpf_mut().map_mut("SNAT6").unwrap()).unwrap();
    let v = map.get(&id, 0).ok()?;
    Some(
        v.addrs[..v.count as usize]
            .iter()
            .map(|a| Ipv6Addr::from(a.octets()))
            .collect(),
    )
}

fn snat6_entries(dp: &mut Datapath) -> usize {
    let map: BpfHashMap<_, u32, Snat6> =
        BpfHashMap::try_from(dp.ebpf_mut().map_mut("SNAT6").unwrap()).unwrap();
    map.keys().count()
}

/// `SNAT_ADDRS6`'s keys.
fn snat_addrs6(dp: &mut Datapath) -> BTreeSet<Ipv6Addr> {
    let map: BpfHashMap<_, Addr6, u32> =
        BpfHashMap::try_from(dp.ebpf_mut().map_mut("SNAT_ADDRS6").unwrap()).unwrap();
    map.iter()
        .map(|e| {
            let (k, v) = e.unwrap();
            assert_eq!(v, 1);
            Ipv6Addr::from(k.octets())
        })
        .collect()
}

fn set(addrs: &[&str]) -> BTreeSet<Ipv6Addr> {
    addrs.iter().map(|a| ip6(a)).collect()
}

fn services4(dp: &mut Datapath) -> usize {
    let map: BpfHashMap<_, router_common::ServiceKey, Service> =
        BpfHashMap::try_from(dp.ebpf_mut().map_mut("SERVICES").unwrap()).unwrap();
    map.keys().count()
}

#[test]
fn an_ipv6_service_is_written_to_its_own_maps_and_balanced_from_them() {
    let mut f = Fixture::new(&[service6("v6", VIP6, &[1, 1, 1])]);
    let svc = service_value(&mut f.dp).expect("the service in SERVICES6");
    assert_eq!(svc.forwarding, router_common::dsr::FORWARD_IPIP);
    assert_eq!((svc.pools, svc.segments, svc.snat_count), (0, 0, 0));
    assert_eq!(services4(&mut f.dp), 0, "nothing in SERVICES");
    for (i, a) in BACKENDS6.iter().enumerate() {
        let id = f.dp.backend_id("v6", &format!("b{i}")).expect("an id");
        let (b, addr) = backend(&mut f.dp, id);
        assert_eq!((b.addr, b.port, b.in_use), (0, 8000u16.to_be(), 1));
        assert_eq!(b.service_id, svc.id);
        assert_eq!(addr, ip6(a));
    }
    // The status lists IPv6 addresses as socket addresses.
    let status = f.dp.status().unwrap();
    assert_eq!(status.services[0].vip, "[2001:db8:100::1]:8000");
    assert_eq!(status.services[0].backends[0].address, "[2001:2::11]:8000");

    // router_v6 finds the service and its backend through what was written.
    let syn = Packet6::tcp(addr6("[2001:2::2]:40000"), addr6(VIP6), TCP_SYN)
        .with_macs(LB_MAC, CLIENT_MAC);
    let (verdict, out) = f.run(&syn.build());
    assert_eq!(verdict, XDP_TX, "encapsulated back out the arm");
    assert_eq!(u16::from_be_bytes([out[12], out[13]]), 0x86dd);
    assert_eq!(out[14 + 6], 41, "IPv6-in-IPv6");
    let outer_dst: [u8; 16] = out[14 + 24..14 + 40].try_into().unwrap();
    assert!(
        BACKENDS6.iter().any(|a| ip6(a).octets() == outer_dst),
        "to a backend: {}",
        Ipv6Addr::from(outer_dst)
    );
    assert_eq!(
        &out[14 + 40..],
        &syn.datagram()[..],
        "the client's datagram inside"
    );
}

#[test]
fn removing_an_ipv6_service_clears_its_entries_and_backend_addresses() {
    let mut f = Fixture::new(&[service6("v6", VIP6, &[1, 1, 1])]);
    let ids: Vec<u32> = (0..3)
        .map(|i| f.dp.backend_id("v6", &format!("b{i}")).unwrap())
        .collect();
    let report = f.dp.apply(&[]).expect("remove");
    assert_eq!(report.removed, ["v6"]);
    assert!(service_value(&mut f.dp).is_none(), "gone from SERVICES6");
    // Released one round later, for a packet still reading the old table.
    f.dp.apply(&[]).expect("release");
    for id in ids {
        let (b, addr) = backend(&mut f.dp, id);
        assert_eq!((b.in_use, addr), (0, Ipv6Addr::UNSPECIFIED), "id {id}");
    }
}

#[test]
fn a_restart_adopts_the_pinned_ipv6_service_with_its_ids_and_table() {
    let fs = BpfFs::mount().expect("bpffs");
    let pins = PinDir::new(fs.pin_path());
    let opts = LoadOptions {
        table_size: 1021,
        ..LoadOptions::default()
    };
    let specs = [service6("v6", VIP6, &[1, 2, 3])];
    let (svc, ids, fp) = {
        let (mut dp, adopted) = Datapath::open_pinned(opts.clone(), &pins).expect("pin");
        assert!(!adopted);
        dp.apply(&specs).expect("apply");
        let ids: Vec<Option<u32>> = (0..3)
            .map(|i| dp.backend_id("v6", &format!("b{i}")))
            .collect();
        (
            service_value(&mut dp).unwrap(),
            ids,
            dp.table_fingerprint().unwrap(),
        )
    };

    let (mut dp, adopted) = Datapath::open_pinned(opts, &pins).expect("adopt");
    assert!(adopted);
    let mut routes = dp.adopted_routes();
    routes.sort();
    assert_eq!(routes.len(), 3, "{routes:?}");
    assert!(
        routes
            .iter()
            .all(|r| r.vip == VIP6.parse::<SocketAddr>().unwrap())
    );
    assert_eq!(
        routes[0].backend,
        "[2001:2::11]:8000".parse::<SocketAddr>().unwrap()
    );
    let report = dp.apply(&specs).expect("apply after the restart");
    assert!(
        report.added.is_empty() && report.removed.is_empty(),
        "{report:?}"
    );
    assert!(
        report.swapped.iter().all(|(_, moved)| *moved == 0),
        "no slot changes owner: {report:?}"
    );
    let again = service_value(&mut dp).unwrap();
    assert_eq!(again.id, svc.id, "the service keeps its id");
    let ids_again: Vec<Option<u32>> = (0..3)
        .map(|i| dp.backend_id("v6", &format!("b{i}")))
        .collect();
    assert_eq!(ids_again, ids, "the backends keep theirs");
    assert_eq!(dp.table_fingerprint().unwrap(), fp);
    drop(dp);
    router::datapath::pinning::remove_all(&pins).expect("remove the pins");
}

const VIP6_B: &str = "[2001:db8:100::2]:8000";

fn key6_b() -> ServiceKey6 {
    ServiceKey6 {
        addr: Addr6::from_octets(ip6("2001:db8:100::2").octets()),
        ..key6()
    }
}

#[test]
fn an_ipv6_nat_service_is_written_with_its_snat_addresses_and_cleared_on_release() {
    let a = nat_service6("a", VIP6, &["2001:2::1", "2001:2::5"], &[1, 1, 1]);
    let b = nat_service6("b", VIP6_B, &["2001:2::5"], &[1]);
    let mut f = Fixture::new(&[a.clone(), b.clone()]);
    let svc = service_value(&mut f.dp).expect("the service in SERVICES6");
    assert_eq!(svc.forwarding, router_common::dsr::FORWARD_NAT);
    assert_eq!(svc.selection, router_common::selection::SELECT_MAGLEV);
    // The IPv4 SNAT fields are left alone: router_nat6 reads SNAT6.
    assert_eq!((svc.snat_count, svc.snat_addrs), (0, [0; 4]));
    assert_eq!((svc.snat_port_min, svc.snat_port_max), (10000, 32767));
    assert_eq!(
        snat6(&mut f.dp, svc.id),
        Some(vec![ip6("2001:2::1"), ip6("2001:2::5")])
    );
    let svc_b = {
        let map: BpfHashMap<_, ServiceKey6, Service> =
            BpfHashMap::try_from(f.dp.ebpf_mut().map_mut("SERVICES6").unwrap()).unwrap();
        map.get(&key6_b(), 0).expect("b in SERVICES6")
    };
    assert_eq!(snat6(&mut f.dp, svc_b.id), Some(vec![ip6("2001:2::5")]));
    assert_eq!(snat_addrs6(&mut f.dp), set(&["2001:2::1", "2001:2::5"]));
    // Nothing in the IPv4 maps.
    assert_eq!(services4(&mut f.dp), 0);
    let snat4: BpfHashMap<_, u32, u32> =
        BpfHashMap::try_from(f.dp.ebpf_mut().map_mut("SNAT_ADDRS").unwrap()).unwrap();
    assert_eq!(snat4.keys().count(), 0, "no IPv6 address in SNAT_ADDRS");
    let filter: Array<_, u32> =
        Array::try_from(f.dp.ebpf_mut().map("ADDR_FILTER").unwrap()).unwrap();
    assert!(
        filter.iter().all(|b| b.unwrap() == 0),
        "ADDR_FILTER untouched"
    );
    let status = f.dp.status().unwrap();
    assert_eq!(status.services[0].snat, ["2001:2::1", "2001:2::5"]);

    // An address the other service still holds stays.
    f.dp.apply(std::slice::from_ref(&b)).expect("remove a");
    assert_eq!(snat6(&mut f.dp, svc.id), None, "a's SNAT6 entry cleared");
    assert_eq!(snat_addrs6(&mut f.dp), set(&["2001:2::5"]));
    f.dp.apply(&[]).expect("remove b");
    assert_eq!(snat6_entries(&mut f.dp), 0);
    assert!(snat_addrs6(&mut f.dp).is_empty());
}

#[test]
fn an_ipv6_service_moves_between_dsr_and_nat() {
    let dsr = service6("v6", VIP6, &[1, 1, 1]);
    let nat = nat_service6("v6", VIP6, &["2001:2::1"], &[1, 1, 1]);
    let mut f = Fixture::new(std::slice::from_ref(&dsr));
    let id = service_value(&mut f.dp).unwrap().id;
    assert_eq!(snat6_entries(&mut f.dp), 0);

    let report = f.dp.apply(std::slice::from_ref(&nat)).expect("to NAT");
    assert!(report.added.is_empty() && report.removed.is_empty());
    let svc = service_value(&mut f.dp).unwrap();
    assert_eq!(
        (svc.id, svc.forwarding),
        (id, router_common::dsr::FORWARD_NAT)
    );
    assert_eq!(snat6(&mut f.dp, id), Some(vec![ip6("2001:2::1")]));
    assert_eq!(snat_addrs6(&mut f.dp), set(&["2001:2::1"]));

    f.dp.apply(std::slice::from_ref(&dsr)).expect("back to DSR");
    let svc = service_value(&mut f.dp).unwrap();
    assert_eq!(
        (svc.id, svc.forwarding),
        (id, router_common::dsr::FORWARD_IPIP)
    );
    assert_eq!(snat6_entries(&mut f.dp), 0);
    assert!(snat_addrs6(&mut f.dp).is_empty());
}

#[test]
fn a_restart_adopts_an_ipv6_nat_services_snat_addresses() {
    let fs = BpfFs::mount().expect("bpffs");
    let pins = PinDir::new(fs.pin_path());
    let opts = LoadOptions {
        table_size: 1021,
        ..LoadOptions::default()
    };
    let specs = [nat_service6(
        "v6",
        VIP6,
        &["2001:2::1", "2001:2::5"],
        &[1, 2, 3],
    )];
    let (svc, fp) = {
        let (mut dp, adopted) = Datapath::open_pinned(opts.clone(), &pins).expect("pin");
        assert!(!adopted);
        dp.apply(&specs).expect("apply");
        (
            service_value(&mut dp).unwrap(),
            dp.table_fingerprint().unwrap(),
        )
    };

    let (mut dp, adopted) = Datapath::open_pinned(opts, &pins).expect("adopt");
    assert!(adopted);
    let report = dp.apply(&specs).expect("apply after the restart");
    assert!(
        report.added.is_empty() && report.removed.is_empty(),
        "{report:?}"
    );
    assert!(
        report.swapped.iter().all(|(_, moved)| *moved == 0),
        "{report:?}"
    );
    let again = service_value(&mut dp).unwrap();
    assert_eq!((again.id, again.forwarding), (svc.id, svc.forwarding));
    assert_eq!(dp.table_fingerprint().unwrap(), fp);
    assert_eq!(
        snat6(&mut dp, svc.id),
        Some(vec![ip6("2001:2::1"), ip6("2001:2::5")])
    );
    assert_eq!(dp.status().unwrap().services[0].snat.len(), 2);

    // The adopted service is known as a NAT one: dropping an address, then
    // the service, clears what the earlier daemon wrote.
    let fewer = [nat_service6("v6", VIP6, &["2001:2::5"], &[1, 2, 3])];
    dp.apply(&fewer).expect("one address fewer");
    assert_eq!(snat6(&mut dp, svc.id), Some(vec![ip6("2001:2::5")]));
    assert_eq!(snat_addrs6(&mut dp), set(&["2001:2::5"]));
    dp.apply(&[]).expect("remove");
    assert_eq!(snat6_entries(&mut dp), 0);
    assert!(snat_addrs6(&mut dp).is_empty());
    drop(dp);
    router::datapath::pinning::remove_all(&pins).expect("remove the pins");
}
