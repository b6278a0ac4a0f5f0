//! IPv6 services (`router_v6`): the client's packet inside IPv6-in-IPv6
//! or GUE over IPv6, the flow pinned in `DSR_FLOWS6`, extension headers
//! walked, a lost entry re-hashed, ICMPv6 "packet too big" for what does
//! not fit the tunnel, Neighbor Discovery and the rest of ICMPv6 passed to
//! the host, and the backends' decap program stripping IPv6 tunnels.

use std::net::Ipv6Addr;

use aya::{Ebpf, maps::HashMap as BpfHashMap, programs::Xdp};
use router::datapath::{DECAP_OBJ, Forwarding, ServiceSpec};
use router_common::{
    reasons,
    v6::{Addr6, ConnKey6, DsrFlow6},
};
use router_testkit::{
    packet::{TCP_ACK, TCP_PSH, TCP_SYN},
    packet6::{Packet6, addr6, conn_key6, encapsulated6, ip6, packet_too_big},
    test_run::run_program,
    xdp_fixture::*,
};

const VIP6: &str = "[2001:2:100::1]:8000";
/// The fixture arm's IPv6 address: the outer source toward the backends.
const LB6: &str = "2001:2::1";
const CLIENT6: &str = "[2001:2::2]:40000";

fn dsr6(forwarding: Forwarding, weights: &[u32]) -> ServiceSpec {
    ServiceSpec {
        forwarding,
        ..service6("llama6", VIP6, weights)
    }
}

fn flows6(f: &mut Fixture) -> BpfHashMap<&mut aya::maps::MapData, ConnKey6, DsrFlow6> {
    BpfHashMap::try_from(f.dp.ebpf_mut().map_mut("DSR_FLOWS6").unwrap()).unwrap()
}

/// The flow's entry, with its backend's address and index.
fn pinned(f: &mut Fixture, key: &ConnKey6) -> (DsrFlow6, Ipv6Addr, u8) {
    let e = flows6(f).get(key, 0).expect("the flow's DSR_FLOWS6 entry");
    let a = Ipv6Addr::from(e.backend_addr.octets());
    (e, a, a.octets()[15] - 0x11)
}

fn syn(client: &str) -> Packet6 {
    Packet6::tcp(addr6(client), addr6(VIP6), TCP_SYN).with_macs(LB_MAC, CLIENT_MAC)
}

/// What the LB sends for `p` on flow `e` to backend `i`.
fn tunnelled(p: &Packet6, e: &DsrFlow6, i: u8) -> Output {
    let gue = (e.gue_dport != 0).then(|| (u16::from_be(e.gue_sport), u16::from_be(e.gue_dport)));
    Output::Bytes(encapsulated6(
        &p.datagram(),
        (ip6(LB6), Ipv6Addr::from(e.backend_addr.octets())),
        (backend_mac(i), LB_MAC),
        gue,
        e.flow_label,
    ))
}

#[test]
fn ipv6_in_ipv6_carries_a_flow_to_its_backend_and_keeps_it_there() {
    let mut f = Fixture::new(&[dsr6(Forwarding::Ipip, &[1, 1, 1])]);
    let key = conn_key6(CLIENT6, VIP6, 6);
    let first = syn(CLIENT6).with_traffic_class(0xb8);
    let (verdict, out) = f.run(&first.build());
    assert_eq!(verdict, XDP_TX, "SYN: encapsulated back out the arm");
    let (e, _, i) = pinned(&mut f, &key);
    assert!(e.flow_label != 0 && e.flow_label <= 0xfffff);
    let Output::Bytes(want) = tunnelled(&first, &e, i) else {
        unreachable!("`tunnelled` builds bytes")
    };
    assert_eq!(
        hex(&out),
        hex(&want),
        "SYN: the client's packet inside IPv6, traffic class copied"
    );
    let data = Packet6::tcp(addr6(CLIENT6), addr6(VIP6), TCP_ACK | TCP_PSH)
        .with_macs(LB_MAC, CLIENT_MAC)
        .with_payload(b"POST /v1/completions HTTP/1.1\r\n\r\n");
    f.case(Case {
        name: "data: the pinned backend, the client's packet as it came",
        input: data.build(),
        verdict: XDP_TX,
        output: tunnelled(&data, &e, i),
        reasons: &[reasons::TX],
    });
    let mut weights = [0, 0, 0];
    weights[usize::from((i + 1) % 3)] = 1;
    f.dp.apply(&[dsr6(Forwarding::Ipip, &weights)]).unwrap();
    f.case(Case {
        name: "after a weight change the established flow keeps its backend",
        input: data.build(),
        verdict: XDP_TX,
        output: tunnelled(&data, &e, i),
        reasons: &[reasons::TX],
    });
    let other = "[2001:2::3]:41000";
    assert_eq!(
        f.run(&syn(other).with_macs(LB_MAC, CLIENT2_MAC).build()).0,
        XDP_TX
    );
    let (_, _, j) = pinned(&mut f, &conn_key6(other, VIP6, 6));
    assert_eq!(j, (i + 1) % 3, "a new flow goes where the weight is");
}

#[test]
fn gue_over_ipv6_has_a_zero_checksum_and_a_source_port_from_the_flow() {
    let mut f = Fixture::new(&[dsr6(Forwarding::Gue { port: 6080 }, &[1])]);
    let mut sports = std::collections::BTreeSet::new();
    for port in 40000u16..40004 {
        let client = format!("[2001:2::2]:{port}");
        let p = syn(&client);
        let (verdict, out) = f.run(&p.build());
        assert_eq!(verdict, XDP_TX);
        let (e, backend, i) = pinned(&mut f, &conn_key6(&client, VIP6, 6));
        assert_eq!(backend, ip6("2001:2::11"));
        assert_eq!(u16::from_be(e.gue_dport), 6080);
        let Output::Bytes(want) = tunnelled(&p, &e, i) else {
            unreachable!()
        };
        assert_eq!(hex(&out), hex(&want), "GUE over IPv6 from {client}");
        assert!(u16::from_be(e.gue_sport) >= 0x8000);
        sports.insert(e.gue_sport);
    }
    assert!(sports.len() > 1, "flows spread over source ports");
}

#[test]
fn extension_headers_are_walked_and_carried_and_fragments_pass() {
    let mut f = Fixture::new(&[dsr6(Forwarding::Ipip, &[1, 1, 1])]);
    let plain = syn(CLIENT6);
    assert_eq!(f.run(&plain.build()).0, XDP_TX);
    let (e, _, i) = pinned(&mut f, &conn_key6(CLIENT6, VIP6, 6));
    // Hop-by-hop (a PadN option) and destination options before TCP.
    let with_ext = Packet6::tcp(addr6(CLIENT6), addr6(VIP6), TCP_ACK)
        .with_macs(LB_MAC, CLIENT_MAC)
        .with_ext(0, &[1, 4, 0, 0, 0, 0])
        .with_ext(60, &[1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    f.case(Case {
        name: "hop-by-hop and destination options: the same flow, headers intact inside",
        input: with_ext.build(),
        verdict: XDP_TX,
        output: tunnelled(&with_ext, &e, i),
        reasons: &[reasons::TX],
    });
    let five = (0..5).fold(
        Packet6::tcp(addr6(CLIENT6), addr6(VIP6), TCP_ACK).with_macs(LB_MAC, CLIENT_MAC),
        |p, _| p.with_ext(60, &[1, 4, 0, 0, 0, 0]),
    );
    f.case(Case {
        name: "more extension headers than the walk takes: the host's",
        input: five.build(),
        verdict: XDP_PASS,
        output: Output::Unchanged,
        reasons: &[reasons::PASS_IP_OPTIONS],
    });
    // A fragment header: offset 0, more fragments, identification 7.
    let frag = Packet6::tcp(addr6(CLIENT6), addr6(VIP6), TCP_ACK)
        .with_macs(LB_MAC, CLIENT_MAC)
        .with_ext(44, &[0, 1, 0, 0, 0, 7]);
    f.case(Case {
        name: "a fragment: passed for the host to reassemble",
        input: frag.build(),
        verdict: XDP_PASS,
        output: Output::Unchanged,
        reasons: &[reasons::PASS_FRAGMENT],
    });
    let mut cut = plain.build();
    cut.truncate(14 + 40 + 10);
    f.case(Case {
        name: "a payload length past the frame: dropped as malformed",
        input: cut,
        verdict: XDP_DROP,
        output: Output::Unchanged,
        reasons: &[reasons::DROP_MALFORMED],
    });
}

#[test]
fn neighbor_discovery_icmpv6_and_other_ports_pass_to_the_host() {
    let mut f = Fixture::new(&[dsr6(Forwarding::Ipip, &[1])]);
    let vip = *addr6(VIP6).ip();
    let client = ip6("2001:2::2");
    for (what, p) in [
        (
            "a neighbour solicitation for the VIP",
            Packet6::neighbor_solicitation(client, vip, CLIENT_MAC),
        ),
        (
            "an echo request to the VIP",
            Packet6::icmp6(client, vip, 128, &[0, 1, 0, 1]).with_macs(LB_MAC, CLIENT_MAC),
        ),
        (
            "another port of the VIP",
            Packet6::tcp(addr6(CLIENT6), addr6("[2001:2:100::1]:22"), TCP_SYN)
                .with_macs(LB_MAC, CLIENT_MAC),
        ),
        (
            "UDP to the service's port (the service is TCP)",
            Packet6::udp(addr6(CLIENT6), addr6(VIP6), b"x").with_macs(LB_MAC, CLIENT_MAC),
        ),
        (
            "the host's own address",
            Packet6::tcp(addr6(CLIENT6), addr6("[2001:2::1]:8000"), TCP_SYN)
                .with_macs(LB_MAC, CLIENT_MAC),
        ),
    ] {
        f.case(Case {
            name: what,
            input: p.build(),
            verdict: XDP_PASS,
            output: Output::Unchanged,
            reasons: &[reasons::PASS_NOT_SERVICE],
        });
    }
}

#[test]
fn an_ipv6_flow_without_its_entry_rehashes_to_the_same_backend() {
    let mut f = Fixture::new(&[dsr6(Forwarding::Ipip, &[1, 1, 1])]);
    for port in 40000u16..40012 {
        let client = format!("[2001:2::2]:{port}");
        let key = conn_key6(&client, VIP6, 6);
        assert_eq!(f.run(&syn(&client).build()).0, XDP_TX);
        let (e, _, i) = pinned(&mut f, &key);
        flows6(&mut f).remove(&key).unwrap();
        let ack = Packet6::tcp(addr6(&client), addr6(VIP6), TCP_ACK).with_macs(LB_MAC, CLIENT_MAC);
        f.case(Case {
            name: "an ACK with no entry: Maglev's pick again, counted lru_miss",
            input: ack.build(),
            verdict: XDP_TX,
            output: tunnelled(&ack, &e, i),
            reasons: &[reasons::TX, reasons::LRU_MISS],
        });
    }
}

#[test]
fn a_packet_that_does_not_fit_the_tunnel_gets_packet_too_big() {
    let mut f = Fixture::new(&[dsr6(Forwarding::Ipip, &[1])]);
    assert_eq!(f.run(&syn(CLIENT6).build()).0, XDP_TX, "the flow's SYN");
    // 1,500 bytes fill the arm's MTU; the outer header's 40 do not fit.
    let full = Packet6::tcp(addr6(CLIENT6), addr6(VIP6), TCP_ACK | TCP_PSH)
        .with_macs(LB_MAC, CLIENT_MAC)
        .with_payload(&[7u8; 1440]);
    let datagram = full.datagram();
    assert_eq!(datagram.len(), 1500);
    f.case(Case {
        name: "ICMPv6 2/0 from the VIP, MTU 1460, quoting 512 bytes",
        input: full.build(),
        verdict: XDP_TX,
        output: Output::Bytes(packet_too_big(
            &datagram,
            (*addr6(VIP6).ip(), *addr6(CLIENT6).ip()),
            (CLIENT_MAC, LB_MAC),
            1460,
            512,
        )),
        reasons: &[reasons::ICMP_TOO_BIG],
    });
    let fits = Packet6::tcp(addr6(CLIENT6), addr6(VIP6), TCP_ACK | TCP_PSH)
        .with_macs(LB_MAC, CLIENT_MAC)
        .with_payload(&[7u8; 1400]);
    f.case(Case {
        name: "1,460 bytes fit with their outer header",
        input: fits.build(),
        verdict: XDP_TX,
        output: Output::Unchecked,
        reasons: &[reasons::TX],
    });
}

#[test]
fn ipv4_services_beside_ipv6_ones_are_balanced_as_before() {
    let v4 = ServiceSpec {
        forwarding: Forwarding::Ipip,
        snat: Vec::new(),
        ..service("llama", super::VIP, 6, &[1])
    };
    let mut f = Fixture::new(&[v4, dsr6(Forwarding::Ipip, &[1])]);
    let client = router_testkit::packet::addr("198.18.0.2:40000");
    let p = router_testkit::packet::Packet::tcp(
        client,
        router_testkit::packet::addr(super::VIP),
        TCP_SYN,
    )
    .with_macs(LB_MAC, CLIENT_MAC);
    f.case(Case {
        name: "IPv4 DSR SYN beside an IPv6 service",
        input: p.build(),
        verdict: XDP_TX,
        output: Output::Unchecked,
        reasons: &[reasons::TX],
    });
    f.case(Case {
        name: "IPv6 SYN beside an IPv4 service",
        input: syn(CLIENT6).build(),
        verdict: XDP_TX,
        output: Output::Unchecked,
        reasons: &[reasons::TX],
    });
}

/// The decap program alone, with IPv6 outer destinations `addrs` and GUE
/// on `gue_port`.
fn decap6(addrs: &[&str], gue_port: u16) -> Ebpf {
    let mut ebpf = Ebpf::load(DECAP_OBJ).expect("load decap");
    {
        let p: &mut Xdp = ebpf.program_mut("decap").unwrap().try_into().unwrap();
        p.load().expect("verify decap");
    }
    let mut m: BpfHashMap<_, Addr6, u32> =
        BpfHashMap::try_from(ebpf.map_mut("DECAP_ADDRS6").unwrap()).unwrap();
    for a in addrs {
        m.insert(
            Addr6::from_octets(ip6(a).octets()),
            u32::from(gue_port.to_be()),
            0,
        )
        .unwrap();
    }
    ebpf
}

#[test]
fn decap_strips_ipv6_tunnels_addressed_here_and_passes_everything_else() {
    let mut ebpf = decap6(&["2001:2::11"], 6080);
    let p: &mut Xdp = ebpf.program_mut("decap").unwrap().try_into().unwrap();
    let bmac = backend_mac(0);
    let inner = syn(CLIENT6).with_macs(bmac, LB_MAC);
    let want = inner.build();
    let here = (ip6(LB6), ip6("2001:2::11"));
    for (what, frame) in [
        (
            "IPv6 in IPv6 to this host",
            encapsulated6(&inner.datagram(), here, (bmac, LB_MAC), None, 5),
        ),
        (
            "GUE over IPv6 to this host's port",
            encapsulated6(
                &inner.datagram(),
                here,
                (bmac, LB_MAC),
                Some((40000, 6080)),
                5,
            ),
        ),
    ] {
        let (verdict, out) = run_program(p, &frame, 1).unwrap();
        assert_eq!(verdict, XDP_PASS, "{what}");
        assert_eq!(hex(&out), hex(&want), "{what}: the client's packet");
    }
    let elsewhere = (ip6(LB6), ip6("2001:2::12"));
    for (what, frame) in [
        (
            "IPv6 in IPv6 to another address",
            encapsulated6(&inner.datagram(), elsewhere, (bmac, LB_MAC), None, 5),
        ),
        (
            "GUE over IPv6 to another port",
            encapsulated6(
                &inner.datagram(),
                here,
                (bmac, LB_MAC),
                Some((40000, 6081)),
                5,
            ),
        ),
        ("a plain IPv6 packet", inner.build()),
    ] {
        let (verdict, out) = run_program(p, &frame, 1).unwrap();
        assert_eq!(verdict, XDP_PASS, "{what}");
        assert_eq!(hex(&out), hex(&frame), "{what}: untouched");
    }
}
