//! DSR: packets encapsulated to the backend (IPIP and GUE), the flow
//! pinned in `DSR_FLOWS`, a lost entry re-hashed to the same backend, ICMP
//! "fragmentation needed" for what does not fit the tunnel, and the
//! backends' decap program.

use std::net::Ipv4Addr;

use aya::{Ebpf, maps::HashMap as BpfHashMap, programs::Xdp};
use router::datapath::{DECAP_OBJ, Forwarding, ServiceSpec};
use router_common::{ConnKey, dsr::DsrFlow, reasons};
use router_testkit::{
    packet::{Packet, TCP_ACK, TCP_PSH, TCP_SYN, addr, encapsulated, ip},
    test_run::run_program,
    xdp_fixture::*,
};

use super::VIP;

/// The LB's own address on the fixture's arm: the FIB's preferred source
/// toward the backends, so the outer source.
const LB_ADDR: &str = "198.18.0.1";

fn dsr(forwarding: Forwarding, weights: &[u32]) -> ServiceSpec {
    ServiceSpec {
        forwarding,
        snat: Vec::new(),
        ..service("llama", VIP, 6, weights)
    }
}

fn flows(f: &mut Fixture) -> BpfHashMap<&mut aya::maps::MapData, ConnKey, DsrFlow> {
    BpfHashMap::try_from(f.dp.ebpf_mut().map_mut("DSR_FLOWS").unwrap()).unwrap()
}

/// The backend (address, index) a DSR flow is pinned to.
fn pinned_backend(f: &mut Fixture, key: &ConnKey) -> (Ipv4Addr, u8) {
    let e = flows(f).get(key, 0).expect("the flow's DSR entry");
    let a = Ipv4Addr::from(e.backend_addr.to_ne_bytes());
    (a, a.octets()[3] - 11)
}

#[test]
fn ipip_sends_every_packet_of_a_flow_to_its_backend_untouched_inside() {
    let mut f = Fixture::new(&[dsr(Forwarding::Ipip, &[1, 1, 1])]);
    let client = addr("198.18.0.2:40000");
    let vip = addr(VIP);
    let key = conn_key(client, vip, 6);
    let syn = Packet::tcp(client, vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    let (verdict, out) = f.run(&syn.build());
    assert_eq!(verdict, XDP_TX, "SYN: encapsulated back out the arm");
    let (backend, i) = pinned_backend(&mut f, &key);
    let to = |p: &Packet| {
        Output::Bytes(encapsulated(
            &p.datagram(),
            (ip(LB_ADDR), backend),
            (backend_mac(i), LB_MAC),
            None,
        ))
    };
    let Output::Bytes(want) = to(&syn) else {
        unreachable!("`to` builds bytes")
    };
    assert_eq!(
        hex(&out),
        hex(&want),
        "SYN: the client's packet inside IPIP"
    );
    let data = Packet::tcp(client, vip, TCP_ACK | TCP_PSH)
        .with_macs(LB_MAC, CLIENT_MAC)
        .with_payload(b"POST /v1/completions HTTP/1.1\r\n\r\n");
    f.case(Case {
        name: "data: the pinned backend, the client's packet as it came (TTL too)",
        input: data.build(),
        verdict: XDP_TX,
        output: to(&data),
        reasons: &[reasons::TX],
    });
    // Every other backend to weight 0: new flows move, this one stays.
    let mut weights = [0, 0, 0];
    weights[usize::from((i + 1) % 3)] = 1;
    f.dp.apply(&[dsr(Forwarding::Ipip, &weights)]).unwrap();
    f.case(Case {
        name: "after a weight change the established flow keeps its backend",
        input: data.build(),
        verdict: XDP_TX,
        output: to(&data),
        reasons: &[reasons::TX],
    });
    let other = addr("198.18.0.3:41000");
    let syn2 = Packet::tcp(other, vip, TCP_SYN).with_macs(LB_MAC, CLIENT2_MAC);
    assert_eq!(f.run(&syn2.build()).0, XDP_TX);
    let (_, j) = pinned_backend(&mut f, &conn_key(other, vip, 6));
    assert_eq!(j, (i + 1) % 3, "a new flow goes where the weight is");
    assert!(
        f.dp.reason_counts()
            .unwrap()
            .iter()
            .all(|(n, v)| *n != "lru_miss" || *v == 0),
        "no flow was lost"
    );
}

#[test]
fn gue_adds_a_udp_header_whose_source_port_follows_the_flow() {
    let mut f = Fixture::new(&[dsr(Forwarding::Gue { port: 6080 }, &[1])]);
    let vip = addr(VIP);
    let backend = ip("198.18.0.11");
    let mut sports = std::collections::BTreeSet::new();
    for port in [40000u16, 40001, 40002, 40003] {
        let client = addr(&format!("198.18.0.2:{port}"));
        let syn = Packet::tcp(client, vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
        let e = {
            let (verdict, out) = f.run(&syn.build());
            assert_eq!(verdict, XDP_TX);
            let e = flows(&mut f).get(&conn_key(client, vip, 6), 0).unwrap();
            let sport = u16::from_be(e.gue_sport);
            assert!(sport >= 0x8000, "source port {sport} in the upper half");
            assert_eq!(
                hex(&out),
                hex(&encapsulated(
                    &syn.datagram(),
                    (ip(LB_ADDR), backend),
                    (backend_mac(0), LB_MAC),
                    Some((sport, 6080))
                )),
                "GUE frame of {client}"
            );
            e
        };
        // The flow's next packet carries the same port.
        let ack = Packet::tcp(client, vip, TCP_ACK).with_macs(LB_MAC, CLIENT_MAC);
        let (_, out) = f.run(&ack.build());
        assert_eq!(
            u16::from_be_bytes([out[34], out[35]]),
            u16::from_be(e.gue_sport)
        );
        sports.insert(e.gue_sport);
    }
    assert!(
        sports.len() > 1,
        "flows spread over source ports: {sports:?}"
    );
}

#[test]
fn a_flow_without_its_entry_rehashes_to_the_same_backend_and_counts_the_miss() {
    // Three backends: the fixture's neighbour table knows three.
    let mut f = Fixture::new(&[dsr(Forwarding::Ipip, &[1, 1, 1])]);
    let vip = addr(VIP);
    for port in 40000u16..40016 {
        let client = addr(&format!("198.18.0.2:{port}"));
        let key = conn_key(client, vip, 6);
        let syn = Packet::tcp(client, vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
        assert_eq!(f.run(&syn.build()).0, XDP_TX);
        let (backend, i) = pinned_backend(&mut f, &key);
        // Another node's flow, or an evicted one.
        flows(&mut f).remove(&key).unwrap();
        let ack = Packet::tcp(client, vip, TCP_ACK).with_macs(LB_MAC, CLIENT_MAC);
        f.case(Case {
            name: "an ACK with no entry: Maglev's pick again, counted lru_miss",
            input: ack.build(),
            verdict: XDP_TX,
            output: Output::Bytes(encapsulated(
                &ack.datagram(),
                (ip(LB_ADDR), backend),
                (backend_mac(i), LB_MAC),
                None,
            )),
            reasons: &[reasons::TX, reasons::LRU_MISS],
        });
    }
}

#[test]
fn a_packet_that_does_not_fit_the_tunnel_gets_fragmentation_needed() {
    let mut f = Fixture::new(&[dsr(Forwarding::Ipip, &[1])]);
    let client = addr("198.18.0.2:40000");
    let vip = addr(VIP);
    // 1,500 bytes of IP fill the arm's MTU; 20 more do not.
    let full = Packet::tcp(client, vip, TCP_ACK | TCP_PSH)
        .with_macs(LB_MAC, CLIENT_MAC)
        .with_payload(&[7u8; 1460]);
    let datagram = full.datagram();
    assert_eq!(datagram.len(), 1500);
    let syn = Packet::tcp(client, vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    assert_eq!(f.run(&syn.build()).0, XDP_TX, "the flow's SYN");
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&1480u16.to_be_bytes());
    icmp.extend_from_slice(&datagram[..28]);
    let c = router_common::csum::checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_ne_bytes());
    let mut hdr = vec![0x45, 0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0];
    hdr.extend_from_slice(&vip.ip().octets());
    hdr.extend_from_slice(&client.ip().octets());
    let c = router_common::csum::checksum(&hdr, 0);
    hdr[10..12].copy_from_slice(&c.to_ne_bytes());
    let mut want = Vec::new();
    want.extend_from_slice(&CLIENT_MAC);
    want.extend_from_slice(&LB_MAC);
    want.extend_from_slice(&[0x08, 0x00]);
    want.extend_from_slice(&hdr);
    want.extend_from_slice(&icmp);
    f.case(Case {
        name: "DF set: ICMP 3/4 from the VIP, MTU 1480, quoting the header and 8 bytes",
        input: full.build(),
        verdict: XDP_TX,
        output: Output::Bytes(want),
        reasons: &[reasons::ICMP_TOO_BIG],
    });
    let fits = Packet::tcp(client, vip, TCP_ACK | TCP_PSH)
        .with_macs(LB_MAC, CLIENT_MAC)
        .with_payload(&[7u8; 1440]);
    f.case(Case {
        name: "1,480 bytes fit with their outer header",
        input: fits.build(),
        verdict: XDP_TX,
        output: Output::Unchecked,
        reasons: &[reasons::TX],
    });
    let mut no_df = full.clone();
    no_df.frag = 0;
    f.case(Case {
        name: "DF clear: dropped, the program cannot fragment",
        input: no_df.build(),
        verdict: XDP_DROP,
        output: Output::Unchanged,
        reasons: &[reasons::DROP_TOO_BIG],
    });
}

/// A NAT service on `vip` with one backend, 198.18.0.12:8000.
fn nat(vip: &str) -> ServiceSpec {
    let mut nat = service("nat", vip, 6, &[1]);
    nat.backends[0].address = addr("198.18.0.12:8000").into();
    nat
}

/// The NAT service's SYN from the fixture's client is translated to its
/// backend, not encapsulated.
fn nat_syn_is_translated(f: &mut Fixture, vip: &str) {
    let syn =
        Packet::tcp(addr("198.18.0.2:40000"), addr(vip), TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    f.case(Case {
        name: "a NAT service's SYN is translated, not encapsulated",
        input: syn.build(),
        verdict: XDP_TX,
        output: Output::Bytes(
            syn.translated(
                addr("198.18.0.1:40000"),
                addr("198.18.0.12:8000"),
                backend_mac(1),
                LB_MAC,
            )
            .build(),
        ),
        reasons: &[reasons::TX],
    });
}

#[test]
fn nat_services_beside_dsr_ones_are_translated_as_before() {
    let mut f = Fixture::new(&[dsr(Forwarding::Ipip, &[1]), nat("198.18.100.2:8000")]);
    nat_syn_is_translated(&mut f, "198.18.100.2:8000");
}

/// The decap program alone, loaded as `router decap attach` loads it, with
/// `addrs` as its outer destinations and GUE on `gue_port`.
fn decap(addrs: &[&str], gue_port: u16) -> Ebpf {
    let mut ebpf = Ebpf::load(DECAP_OBJ).expect("load decap");
    {
        let p: &mut Xdp = ebpf.program_mut("decap").unwrap().try_into().unwrap();
        p.load().expect("verify decap");
    }
    let mut m: BpfHashMap<_, u32, u32> =
        BpfHashMap::try_from(ebpf.map_mut("DECAP_ADDRS").unwrap()).unwrap();
    for a in addrs {
        m.insert(
            u32::from_ne_bytes(ip(a).octets()),
            u32::from(gue_port.to_be()),
            0,
        )
        .unwrap();
    }
    ebpf
}

#[test]
fn decap_strips_ipip_and_gue_addressed_here_and_passes_everything_else() {
    let mut ebpf = decap(&["198.18.0.11"], 6080);
    let p: &mut Xdp = ebpf.program_mut("decap").unwrap().try_into().unwrap();
    let client = addr("198.18.0.2:40000");
    let inner = Packet::tcp(client, addr(VIP), TCP_SYN).with_macs([2, 0, 0, 0, 0x0b, 0], LB_MAC);
    let mut want = Vec::new();
    want.extend_from_slice(&[2, 0, 0, 0, 0x0b, 0]);
    want.extend_from_slice(&LB_MAC);
    want.extend_from_slice(&[0x08, 0x00]);
    want.extend_from_slice(&inner.datagram());
    let here = (ip(LB_ADDR), ip("198.18.0.11"));
    let macs = ([2, 0, 0, 0, 0x0b, 0], LB_MAC);
    for (what, frame, expect) in [
        (
            "IPIP to this host",
            encapsulated(&inner.datagram(), here, macs, None),
            want.clone(),
        ),
        (
            "GUE to this host's port",
            encapsulated(&inner.datagram(), here, macs, Some((40000, 6080))),
            want.clone(),
        ),
    ] {
        let (verdict, out) = run_program(p, &frame, 1).unwrap();
        assert_eq!(verdict, XDP_PASS, "{what}");
        assert_eq!(
            hex(&out),
            hex(&expect),
            "{what}: the client's packet, as the router got it"
        );
    }
    let elsewhere = (ip(LB_ADDR), ip("198.18.0.12"));
    for (what, frame) in [
        (
            "IPIP to another address",
            encapsulated(&inner.datagram(), elsewhere, macs, None),
        ),
        (
            "GUE to another port",
            encapsulated(&inner.datagram(), here, macs, Some((40000, 6081))),
        ),
        ("a plain packet", inner.build()),
    ] {
        let (verdict, out) = run_program(p, &frame, 1).unwrap();
        assert_eq!(verdict, XDP_PASS, "{what}");
        assert_eq!(hex(&out), hex(&frame), "{what}: untouched");
    }
}

/// The `ADDR_FILTER` bits of `vip`'s bucket.
fn filter_bits(f: &mut Fixture, vip: &str) -> u32 {
    let filter: aya::maps::Array<_, u32> =
        aya::maps::Array::try_from(f.dp.ebpf_mut().map("ADDR_FILTER").unwrap()).unwrap();
    let a = *addr(vip).ip();
    filter
        .get(
            &router_common::addr_filter_bucket(u32::from_ne_bytes(a.octets())),
            0,
        )
        .unwrap()
}

#[test]
fn a_dsr_only_address_hands_every_packet_over_and_passes_other_ports() {
    use router_common::{FILTER_DSR, FILTER_DSR_ONLY, FILTER_VIP};
    let mut f = Fixture::new(&[dsr(Forwarding::Ipip, &[1, 1, 1])]);
    assert_eq!(
        filter_bits(&mut f, VIP),
        FILTER_VIP | FILTER_DSR | FILTER_DSR_ONLY
    );
    let client = addr("198.18.0.2:40000");
    let mut other_port = addr(VIP);
    other_port.set_port(22);
    f.case(Case {
        name: "a port of the DSR address that no service has is the host's",
        input: Packet::tcp(client, other_port, TCP_SYN)
            .with_macs(LB_MAC, CLIENT_MAC)
            .build(),
        verdict: XDP_PASS,
        output: Output::Unchanged,
        reasons: &[reasons::PASS_NOT_SERVICE],
    });
    let syn = Packet::tcp(client, addr(VIP), TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    let (verdict, _) = f.run(&syn.build());
    assert_eq!(verdict, XDP_TX, "the service's SYN is encapsulated");
}

#[test]
fn a_nat_service_on_the_dsr_address_shares_it_and_each_takes_its_own_path() {
    use router_common::{FILTER_DSR, FILTER_DSR_ONLY, FILTER_VIP};
    let mut f = Fixture::new(&[dsr(Forwarding::Ipip, &[1]), nat("198.18.100.1:9000")]);
    let bits = filter_bits(&mut f, VIP);
    assert_eq!(
        bits & (FILTER_VIP | FILTER_DSR | FILTER_DSR_ONLY),
        FILTER_VIP | FILTER_DSR,
        "a NAT service on the address: the DSR program is asked for after a look at the service"
    );
    nat_syn_is_translated(&mut f, "198.18.100.1:9000");
    let client = addr("198.18.0.2:40000");
    let dsr_syn = Packet::tcp(client, addr(VIP), TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    let (verdict, out) = f.run(&dsr_syn.build());
    assert_eq!(verdict, XDP_TX, "the DSR port's SYN is encapsulated");
    let key = conn_key(client, addr(VIP), 6);
    let (backend, i) = pinned_backend(&mut f, &key);
    assert_eq!(
        out,
        encapsulated(
            &dsr_syn.datagram(),
            (ip(LB_ADDR), backend),
            (backend_mac(i), LB_MAC),
            None,
        )
    );
    // Dropping the NAT service makes the address DSR's alone again.
    f.dp.apply(&[dsr(Forwarding::Ipip, &[1])]).unwrap();
    assert_eq!(
        filter_bits(&mut f, VIP),
        FILTER_VIP | FILTER_DSR | FILTER_DSR_ONLY
    );
}
