//! IPv6 NAT services (`router_nat6`, which `router_v6` hands them): the
//! client's packet leaves from the SNAT address to the backend and the
//! backend's answer from the VIP to the client, each byte for byte as the
//! RFCs build it (the transport checksum over the new pseudo-header), both
//! directions in `NAT6_CONNS`; ICMPv6 errors about a flow translated to
//! the end that sent the packet they quote.

use std::net::SocketAddrV6;

use aya::maps::HashMap as BpfHashMap;
use router::datapath::ServiceSpec;
use router_common::{
    CONN_CLOSING, reasons,
    v6::{ConnKey6, NatEntry6},
};
use router_testkit::{
    packet::{Mac, TCP_ACK, TCP_PSH, TCP_RST, TCP_SYN},
    packet6::{Packet6, addr6, checksums_valid6, conn_key6, ip6, packet_too_big},
    xdp_fixture::*,
};

const VIP6: &str = "[2001:2:100::1]:8000";
/// The fixture arm's own address, the services' SNAT address.
const SNAT6: &str = "2001:2::1";
const CLIENT6: &str = "[2001:2::2]:40000";
const CLIENT6_B: &str = "[2001:2::3]:40000";

fn nat6(weights: &[u32]) -> ServiceSpec {
    nat_service6("llama6", VIP6, &[SNAT6], weights)
}

fn conns6(f: &mut Fixture) -> BpfHashMap<&mut aya::maps::MapData, ConnKey6, NatEntry6> {
    BpfHashMap::try_from(f.dp.ebpf_mut().map_mut("NAT6_CONNS").unwrap()).unwrap()
}

fn entry(f: &mut Fixture, key: &ConnKey6) -> NatEntry6 {
    conns6(f).get(key, 0).expect("the flow's NAT6_CONNS entry")
}

fn sock(e_addr: &router_common::v6::Addr6, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(e_addr.octets().into(), u16::from_be(port), 0, 0)
}

/// Where the forward entry at `key` sends the client's packets: (SNAT
/// address and port, backend address and port, backend index).
fn translation(f: &mut Fixture, key: &ConnKey6) -> (SocketAddrV6, SocketAddrV6, u8) {
    let e = entry(f, key);
    assert!(!e.is_reply(), "the client's key holds the forward entry");
    let be = sock(&e.new_dst, e.new_dst_port);
    (
        sock(&e.new_src, e.new_src_port),
        be,
        be.ip().octets()[15] - 0x11,
    )
}

/// `p` as the LB sends it on: the new tuple and MACs, one hop fewer, the
/// checksum computed afresh by the kit.
fn sent(
    p: &Packet6,
    (src, dst): (SocketAddrV6, SocketAddrV6),
    (eth_dst, eth_src): (Mac, Mac),
) -> Output {
    let out = Packet6 {
        src,
        dst,
        hop_limit: p.hop_limit - 1,
        ..p.clone()
    }
    .with_macs(eth_dst, eth_src)
    .build();
    assert!(checksums_valid6(&out));
    Output::Bytes(out)
}

fn from_client(client: &str, flags: u8) -> Packet6 {
    Packet6::tcp(addr6(client), addr6(VIP6), flags).with_macs(LB_MAC, CLIENT_MAC)
}

fn from_backend(be: SocketAddrV6, snat: SocketAddrV6, i: u8, flags: u8) -> Packet6 {
    Packet6::tcp(be, snat, flags).with_macs(LB_MAC, backend_mac(i))
}

#[test]
fn a_tcp_flow_is_translated_both_ways_and_stays_on_its_backend() {
    let mut f = Fixture::new(&[nat6(&[1, 1, 1])]);
    let key = conn_key6(CLIENT6, VIP6, 6);
    let syn = from_client(CLIENT6, TCP_SYN);
    let (verdict, out) = f.run(&syn.build());
    assert_eq!(verdict, XDP_TX, "SYN: translated back out the arm");
    let (snat, be, i) = translation(&mut f, &key);
    assert_eq!(
        snat,
        addr6(&format!("[{SNAT6}]:40000")),
        "the client's own port is the SNAT port"
    );
    let Output::Bytes(want) = sent(&syn, (snat, be), (backend_mac(i), LB_MAC)) else {
        unreachable!("`sent` builds bytes")
    };
    assert_eq!(hex(&out), hex(&want), "SYN: SNAT address to the backend");

    let synack = from_backend(be, snat, i, TCP_SYN | TCP_ACK);
    f.case(Case {
        name: "SYN-ACK: from the VIP to the client",
        input: synack.build(),
        verdict: XDP_TX,
        output: sent(&synack, (addr6(VIP6), addr6(CLIENT6)), (CLIENT_MAC, LB_MAC)),
        reasons: &[reasons::TX],
    });
    let reply = entry(&mut f, &conn_key6(&be.to_string(), &snat.to_string(), 6));
    assert!(reply.is_reply());

    let data = from_client(CLIENT6, TCP_ACK | TCP_PSH)
        .with_payload(b"POST /v1/completions HTTP/1.1\r\n\r\n");
    f.case(Case {
        name: "data: the same translation",
        input: data.build(),
        verdict: XDP_TX,
        output: sent(&data, (snat, be), (backend_mac(i), LB_MAC)),
        reasons: &[reasons::TX],
    });
    let mut weights = [0, 0, 0];
    weights[usize::from((i + 1) % 3)] = 1;
    f.dp.apply(&[nat6(&weights)]).unwrap();
    f.case(Case {
        name: "after a weight change the established flow keeps its backend",
        input: data.build(),
        verdict: XDP_TX,
        output: sent(&data, (snat, be), (backend_mac(i), LB_MAC)),
        reasons: &[reasons::TX],
    });
    let other = from_client(CLIENT6_B, TCP_SYN).with_macs(LB_MAC, CLIENT2_MAC);
    assert_eq!(f.run(&other.build()).0, XDP_TX);
    let (_, _, j) = translation(&mut f, &conn_key6(CLIENT6_B, VIP6, 6));
    assert_eq!(j, (i + 1) % 3, "a new flow goes where the weight is");
}

#[test]
fn udp_is_translated_with_its_checksum() {
    let vip = "[2001:2:100::1]:5353";
    let svc = ServiceSpec {
        proto: 17,
        ..nat_service6("udp6", vip, &[SNAT6], &[1, 0, 0])
    };
    let mut f = Fixture::new(&[svc]);
    let q = Packet6::udp(addr6(CLIENT6), addr6(vip), b"what is the meaning of life")
        .with_macs(LB_MAC, CLIENT_MAC);
    let snat = addr6(&format!("[{SNAT6}]:40000"));
    let be = addr6("[2001:2::11]:8000");
    f.case(Case {
        name: "datagram: SNAT address to the backend",
        input: q.build(),
        verdict: XDP_TX,
        output: sent(&q, (snat, be), (backend_mac(0), LB_MAC)),
        reasons: &[reasons::TX],
    });
    let a = Packet6::udp(be, snat, b"42").with_macs(LB_MAC, backend_mac(0));
    f.case(Case {
        name: "answer: VIP to the client",
        input: a.build(),
        verdict: XDP_TX,
        output: sent(&a, (addr6(vip), addr6(CLIENT6)), (CLIENT_MAC, LB_MAC)),
        reasons: &[reasons::TX],
    });
}

#[test]
fn a_held_port_is_probed_and_a_lost_entry_takes_its_pair_back() {
    // One backend, so two clients on the same port meet at one reply key.
    let mut f = Fixture::new(&[nat6(&[1, 0, 0])]);
    assert_eq!(f.run(&from_client(CLIENT6, TCP_SYN).build()).0, XDP_TX);
    let b_syn = from_client(CLIENT6_B, TCP_SYN).with_macs(LB_MAC, CLIENT2_MAC);
    f.case(Case {
        name: "the second client's port is held: a probed port",
        input: b_syn.build(),
        verdict: XDP_TX,
        output: Output::Unchecked,
        reasons: &[reasons::TX, reasons::SNAT_PORT_PROBED],
    });
    let b_key = conn_key6(CLIENT6_B, VIP6, 6);
    let (snat, be, i) = translation(&mut f, &b_key);
    let port = snat.port();
    assert!((10000..=32767).contains(&port), "probed {port}");
    let synack = from_backend(be, snat, i, TCP_SYN | TCP_ACK);
    f.case(Case {
        name: "the probed pair's answer reaches the second client",
        input: synack.build(),
        verdict: XDP_TX,
        output: sent(
            &synack,
            (addr6(VIP6), addr6(CLIENT6_B)),
            (CLIENT2_MAC, LB_MAC),
        ),
        reasons: &[reasons::TX],
    });

    conns6(&mut f).remove(&b_key).unwrap();
    let data = from_client(CLIENT6_B, TCP_ACK | TCP_PSH)
        .with_macs(LB_MAC, CLIENT2_MAC)
        .with_payload(b"more");
    f.case(Case {
        name: "mid-stream without its forward entry: re-hashed, its own pair taken back",
        input: data.build(),
        verdict: XDP_TX,
        output: sent(&data, (snat, be), (backend_mac(i), LB_MAC)),
        reasons: &[reasons::TX, reasons::LRU_MISS],
    });
}

#[test]
fn a_closed_flow_is_started_over_by_a_syn_and_replies_without_entry_stop_here() {
    let mut f = Fixture::new(&[nat6(&[1, 1, 1])]);
    let key = conn_key6(CLIENT6, VIP6, 6);
    assert_eq!(f.run(&from_client(CLIENT6, TCP_SYN).build()).0, XDP_TX);
    let (snat, be, i) = translation(&mut f, &key);
    let rkey = conn_key6(&be.to_string(), &snat.to_string(), 6);
    let rst = from_client(CLIENT6, TCP_RST | TCP_ACK);
    f.case(Case {
        name: "the client's RST is forwarded",
        input: rst.build(),
        verdict: XDP_TX,
        output: sent(&rst, (snat, be), (backend_mac(i), LB_MAC)),
        reasons: &[reasons::TX],
    });
    assert_ne!(entry(&mut f, &key).flags & CONN_CLOSING, 0);
    assert_ne!(
        entry(&mut f, &rkey).flags & CONN_CLOSING,
        0,
        "a RST closes both directions"
    );
    let syn = from_client(CLIENT6, TCP_SYN);
    f.case(Case {
        name: "a SYN on the closed 4-tuple opens a new flow on the same pair",
        input: syn.build(),
        verdict: XDP_TX,
        output: sent(&syn, (snat, be), (backend_mac(i), LB_MAC)),
        reasons: &[reasons::TX],
    });
    assert_eq!(entry(&mut f, &key).flags & CONN_CLOSING, 0);
    assert_eq!(entry(&mut f, &rkey).flags, router_common::CONN_REPLY);

    conns6(&mut f).remove(&rkey).unwrap();
    let stray = from_backend(be, snat, i, TCP_ACK);
    f.case(Case {
        name: "a TCP reply without its entry, no socket of the host's: dropped",
        input: stray.build(),
        verdict: XDP_DROP,
        output: Output::Unchanged,
        reasons: &[reasons::DROP_NO_REPLY_ENTRY],
    });
    let udp =
        Packet6::udp(be, addr6(&format!("[{SNAT6}]:5000")), b"x").with_macs(LB_MAC, backend_mac(i));
    f.case(Case {
        name: "UDP to the SNAT address without an entry: the host's",
        input: udp.build(),
        verdict: XDP_PASS,
        output: Output::Unchanged,
        reasons: &[reasons::PASS_NO_REPLY_ENTRY],
    });
    let last_hop = Packet6 {
        hop_limit: 1,
        ..from_client(CLIENT6, TCP_ACK)
    };
    f.case(Case {
        name: "hop limit 1: not forwarded",
        input: last_hop.build(),
        verdict: XDP_DROP,
        output: Output::Unchanged,
        reasons: &[reasons::DROP_TTL_EXPIRED],
    });
}

/// `error` (a router's "packet too big" frame) as the LB sends it on: one
/// hop fewer.
fn hop_on(mut error: Vec<u8>) -> Output {
    error[14 + 7] -= 1;
    assert!(checksums_valid6(&error));
    Output::Bytes(error)
}

#[test]
fn packet_too_big_about_a_flow_reaches_the_end_that_sent_the_packet() {
    let mut f = Fixture::new(&[nat6(&[1, 1, 1])]);
    assert_eq!(f.run(&from_client(CLIENT6, TCP_SYN).build()).0, XDP_TX);
    let (snat, be, i) = translation(&mut f, &conn_key6(CLIENT6, VIP6, 6));
    let payload = vec![0x5a; 1200];
    let router = ip6("2001:2::99");

    // Past the LB toward the client: about the answer the LB sent from
    // the VIP, to the backend that sent it (from the SNAT address).
    let sent_to_client = Packet6 {
        hop_limit: 63,
        ..Packet6::tcp(addr6(VIP6), addr6(CLIENT6), TCP_ACK | TCP_PSH).with_payload(&payload)
    };
    let as_backend_sent = Packet6 {
        src: be,
        dst: snat,
        ..sent_to_client.clone()
    };
    f.case(Case {
        name: "too big toward the client: to the backend, quoting what it sent",
        input: packet_too_big(
            &sent_to_client.datagram(),
            (router, *addr6(VIP6).ip()),
            (LB_MAC, CLIENT_MAC),
            1400,
            200,
        ),
        verdict: XDP_TX,
        output: hop_on(packet_too_big(
            &as_backend_sent.datagram(),
            (*snat.ip(), *be.ip()),
            (backend_mac(i), LB_MAC),
            1400,
            200,
        )),
        reasons: &[reasons::TX],
    });

    // Past the LB toward the backend: about the client's packet the LB
    // sent from the SNAT address, to the client (from the VIP).
    let sent_to_backend = Packet6 {
        hop_limit: 63,
        ..Packet6::tcp(snat, be, TCP_ACK | TCP_PSH).with_payload(&payload)
    };
    let as_client_sent = Packet6 {
        src: addr6(CLIENT6),
        dst: addr6(VIP6),
        ..sent_to_backend.clone()
    };
    f.case(Case {
        name: "too big toward the backend: to the client, quoting what it sent",
        input: packet_too_big(
            &sent_to_backend.datagram(),
            (router, *snat.ip()),
            (LB_MAC, backend_mac(i)),
            1400,
            100,
        ),
        verdict: XDP_TX,
        output: hop_on(packet_too_big(
            &as_client_sent.datagram(),
            (*addr6(VIP6).ip(), *addr6(CLIENT6).ip()),
            (CLIENT_MAC, LB_MAC),
            1400,
            100,
        )),
        reasons: &[reasons::TX],
    });

    let stranger = Packet6::tcp(addr6(VIP6), addr6("[2001:2::3]:1234"), TCP_ACK);
    f.case(Case {
        name: "an error about no flow here: the host's",
        input: packet_too_big(
            &stranger.datagram(),
            (router, *addr6(VIP6).ip()),
            (LB_MAC, CLIENT_MAC),
            1400,
            60,
        ),
        verdict: XDP_PASS,
        output: Output::Unchanged,
        reasons: &[reasons::PASS_ICMP_UNTRACKED],
    });
}
