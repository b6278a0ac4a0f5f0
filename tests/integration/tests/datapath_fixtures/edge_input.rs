//! Input the program must not balance: other traffic passes untouched,
//! malformed frames are dropped or passed, never forwarded.

use router_common::reasons;
use router_testkit::{
    packet::{Packet, TCP_ACK, TCP_SYN, addr, ip},
    xdp_fixture::*,
};

use super::VIP;

#[test]
fn traffic_that_is_not_for_a_service_passes_untouched() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let table = [
        Case {
            name: "other destination",
            input: Packet::tcp(addr("198.18.0.2:40000"), addr("198.18.0.99:8000"), TCP_SYN).build(),
            verdict: XDP_PASS,
            output: Output::Unchanged,
            reasons: &[reasons::PASS_NOT_SERVICE],
        },
        Case {
            name: "VIP, other port",
            input: Packet::tcp(addr("198.18.0.2:40000"), addr("198.18.100.1:9999"), TCP_SYN)
                .build(),
            verdict: XDP_PASS,
            output: Output::Unchanged,
            reasons: &[reasons::PASS_NOT_SERVICE],
        },
        Case {
            name: "VIP port, other protocol",
            input: Packet::udp(addr("198.18.0.2:40000"), addr(VIP), b"x").build(),
            verdict: XDP_PASS,
            output: Output::Unchanged,
            reasons: &[reasons::PASS_NOT_SERVICE],
        },
        Case {
            name: "SNAT address, no entry, no host socket: a lost flow's reply, dropped",
            input: Packet::tcp(addr("198.18.0.11:8000"), addr("198.18.0.1:50000"), TCP_ACK).build(),
            verdict: XDP_DROP,
            output: Output::Unchanged,
            reasons: &[reasons::DROP_NO_REPLY_ENTRY],
        },
    ];
    for case in table {
        f.case(case);
    }

    // The host's own connection through the SNAT address (this thread is in
    // the fixture's namespace, so the listener is the LB host's).
    let _host = std::net::TcpListener::bind("198.18.0.1:50001").unwrap();
    // An address sharing the SNAT address's pre-filter bucket is not dropped:
    // the exact SNAT set says it is not one.
    let bucket =
        |a: std::net::Ipv4Addr| router_common::addr_filter_bucket(u32::from_ne_bytes(a.octets()));
    let neighbour = (1..=u32::from(u16::MAX))
        .map(|n| std::net::Ipv4Addr::from(u32::from(ip("198.18.0.1")) + n))
        .find(|a| bucket(*a) == bucket(ip("198.18.0.1")))
        .unwrap();
    // To an address no IPv6 service has: `router_v6` passes it.
    let ipv6 = router_testkit::packet6::Packet6::tcp(
        router_testkit::packet6::addr6("[2001:2::2]:40000"),
        router_testkit::packet6::addr6("[2001:2::99]:8000"),
        TCP_SYN,
    )
    .build();
    let mut arp = vec![0u8; 42];
    arp[12] = 0x08;
    arp[13] = 0x06;
    let table = [
        Case {
            name: "SNAT address, no entry, a host socket: the host's traffic, passed",
            input: Packet::tcp(addr("198.18.0.11:8000"), addr("198.18.0.1:50001"), TCP_SYN).build(),
            verdict: XDP_PASS,
            output: Output::Unchanged,
            reasons: &[reasons::PASS_NO_REPLY_ENTRY],
        },
        Case {
            name: "SNAT address, no entry, UDP: passed",
            input: Packet::udp(addr("198.18.0.11:8000"), addr("198.18.0.1:50000"), b"x").build(),
            verdict: XDP_PASS,
            output: Output::Unchanged,
            reasons: &[reasons::PASS_NO_REPLY_ENTRY],
        },
        Case {
            name: "the SNAT address's bucket neighbour, no host socket: passed untouched",
            input: Packet::tcp(
                addr("198.18.0.11:8000"),
                std::net::SocketAddrV4::new(neighbour, 50000),
                TCP_ACK,
            )
            .build(),
            verdict: XDP_PASS,
            output: Output::Unchanged,
            reasons: &[reasons::PASS_NO_REPLY_ENTRY],
        },
        Case {
            name: "IPv6 to no service passes",
            input: ipv6,
            verdict: XDP_PASS,
            output: Output::Unchanged,
            reasons: &[reasons::PASS_NOT_SERVICE],
        },
        Case {
            name: "ARP passes",
            input: arp,
            verdict: XDP_PASS,
            output: Output::Unchanged,
            reasons: &[reasons::PASS_NOT_SERVICE],
        },
    ];
    for case in table {
        f.case(case);
    }
}

#[test]
fn malformed_and_edge_input_is_never_forwarded() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let good = Packet::tcp(addr("198.18.0.2:40000"), addr(VIP), TCP_SYN).build();
    // `good` with one change.
    let patched = |change: &dyn Fn(&mut Vec<u8>)| {
        let mut frame = good.clone();
        change(&mut frame);
        frame
    };
    let syn = || Packet::tcp(addr("198.18.0.2:40000"), addr(VIP), TCP_SYN);
    let mut first_fragment = syn();
    first_fragment.frag = 0x2000; // MF
    let mut later_fragment = syn();
    later_fragment.frag = 0x0010; // offset 128
    let mut opts = syn();
    opts.ip_options = vec![0x01, 0x01, 0x01, 0x00]; // NOP NOP NOP EOL
    let mut icmp = Packet::tcp(addr("198.18.0.2:0"), addr("198.18.100.1:0"), 0);
    icmp.proto = 1;
    icmp.payload = vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0];
    let mut gre = icmp.clone();
    gre.proto = 47;
    let mut udp_short =
        Packet::udp(addr("198.18.0.2:40000"), addr("198.18.100.1:8000"), b"abc").build();
    udp_short[38..40].copy_from_slice(&4u16.to_be_bytes());

    let table = [
        // Frames shorter than an Ethernet header never reach XDP (BPF_PROG_TEST_RUN
        // refuses them too); the shortest truncation to test is an IPv4 header cut short.
        Case {
            name: "IPv4 ethertype, no IPv4 header",
            input: good[..14].to_vec(),
            verdict: XDP_DROP,
            output: Output::Unchanged,
            reasons: &[reasons::DROP_MALFORMED],
        },
        Case {
            name: "truncated IPv4 header",
            input: good[..30].to_vec(),
            verdict: XDP_DROP,
            output: Output::Unchanged,
            reasons: &[reasons::DROP_MALFORMED],
        },
        Case {
            name: "IHL 4",
            input: patched(&|b| b[14] = 0x44),
            verdict: XDP_DROP,
            output: Output::Unchanged,
            reasons: &[reasons::DROP_MALFORMED],
        },
        Case {
            name: "version 6 in an IPv4 frame",
            input: patched(&|b| b[14] = 0x65),
            verdict: XDP_DROP,
            output: Output::Unchanged,
            reasons: &[reasons::DROP_MALFORMED],
        },
        Case {
            name: "total length beyond the frame",
            input: patched(&|b| b[16..18].copy_from_slice(&200u16.to_be_bytes())),
            verdict: XDP_DROP,
            output: Output::Unchanged,
            reasons: &[reasons::DROP_MALFORMED],
        },
        Case {
            name: "total length below the header",
            input: patched(&|b| b[16..18].copy_from_slice(&12u16.to_be_bytes())),
            verdict: XDP_DROP,
            output: Output::Unchanged,
            reasons: &[reasons::DROP_MALFORMED],
        },
        Case {
            name: "truncated TCP header",
            input: good[..44].to_vec(),
            verdict: XDP_DROP,
            output: Output::Unchanged,
            reasons: &[reasons::DROP_MALFORMED],
        },
        Case {
            name: "TCP data offset 4",
            input: patched(&|b| b[46] = 0x40),
            verdict: XDP_DROP,
            output: Output::Unchanged,
            reasons: &[reasons::DROP_MALFORMED],
        },
        Case {
            name: "first fragment",
            input: first_fragment.build(),
            verdict: XDP_PASS,
            output: Output::Unchanged,
            reasons: &[reasons::PASS_FRAGMENT],
        },
        Case {
            name: "later fragment",
            input: later_fragment.build(),
            verdict: XDP_PASS,
            output: Output::Unchanged,
            reasons: &[reasons::PASS_FRAGMENT],
        },
        Case {
            name: "IP options",
            input: opts.build(),
            verdict: XDP_PASS,
            output: Output::Unchanged,
            reasons: &[reasons::PASS_IP_OPTIONS],
        },
        Case {
            name: "ICMP echo to the VIP (errors: datapath_fixtures/icmp.rs)",
            input: icmp.build(),
            verdict: XDP_PASS,
            output: Output::Unchanged,
            reasons: &[reasons::PASS_ICMP_OTHER],
        },
        Case {
            name: "GRE to the VIP",
            input: gre.build(),
            verdict: XDP_PASS,
            output: Output::Unchanged,
            reasons: &[reasons::PASS_UNKNOWN_PROTO],
        },
        Case {
            name: "UDP length below 8",
            input: udp_short,
            verdict: XDP_DROP,
            output: Output::Unchanged,
            reasons: &[reasons::DROP_MALFORMED],
        },
    ];
    for case in table {
        f.case(case);
    }

    // Nothing above created a connection.
    let st = f.dp.status().unwrap();
    assert_eq!(st.services[0].counters.new_conns, 0);
}
