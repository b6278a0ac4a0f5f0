//! The userspace side of IPv6 services against the real maps: what
//! `Datapath::apply` writes for an IPv6 DSR service (`SERVICES6`, its
//! backends in `BACKENDS` with address 0 and in `BACKEND_ADDRS6`), that
//! `router_v6` balances a flow from what was written, what a removal
//! clears, and a restart that adopts the pinned IPv6 service without a
//! table write that moves a flow.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use aya::maps::{Array, HashMap as BpfHashMap};
use router::datapath::{Datapath, LoadOptions, PinDir};
use router_common::{
    Backend, Service,
    v6::{Addr6, ServiceKey6},
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
