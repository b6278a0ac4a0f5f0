//! BPF_PROG_TEST_RUN fixtures for the `router` XDP program, table-driven in
//! Katran's style: a crafted input packet, the expected verdict, the expected
//! output bytes, and the counter that must account for it.
//!
//! Each test runs in its own network namespace holding a veth with static
//! neighbours, so `bpf_fib_lookup` resolves deterministic next hops.

use router::datapath::LoadOptions;
use router_common::reasons;
use router_testkit::{
    packet::{Packet, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, addr, ip},
    xdp_fixture::*,
};

const VIP: &str = "198.18.100.1:8000";

#[test]
fn tcp_flow_lifecycle() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let client = addr("198.18.0.2:40000");
    let backend = addr("198.18.0.11:8000");
    let snat = addr("198.18.0.1:40000");
    let vip = addr(VIP);

    let syn = Packet::tcp(client, vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    f.case(Case {
        name: "SYN: DNAT to the backend, SNAT keeps the client's port",
        input: syn.build(),
        verdict: XDP_TX,
        output: Output::Bytes(
            syn.translated(snat, backend, backend_mac(0), LB_MAC)
                .build(),
        ),
        reasons: &[reasons::TX],
    });

    let syn_ack = Packet::tcp(backend, snat, TCP_SYN | TCP_ACK).with_macs(LB_MAC, backend_mac(0));
    f.case(Case {
        name: "SYN-ACK reply: translated back to VIP → client",
        input: syn_ack.build(),
        verdict: XDP_TX,
        output: Output::Bytes(syn_ack.translated(vip, client, CLIENT_MAC, LB_MAC).build()),
        reasons: &[reasons::TX],
    });

    let data = Packet::tcp(client, vip, TCP_ACK | TCP_PSH)
        .with_macs(LB_MAC, CLIENT_MAC)
        .with_payload(b"POST /v1/completions HTTP/1.1\r\n\r\n");
    f.case(Case {
        name: "established data: connection-table hit",
        input: data.build(),
        verdict: XDP_TX,
        output: Output::Bytes(
            data.translated(snat, backend, backend_mac(0), LB_MAC)
                .build(),
        ),
        reasons: &[reasons::TX],
    });

    let fin = Packet::tcp(client, vip, TCP_FIN | TCP_ACK).with_macs(LB_MAC, CLIENT_MAC);
    f.case(Case {
        name: "FIN: still forwarded, entry now closing",
        input: fin.build(),
        verdict: XDP_TX,
        output: Output::Bytes(
            fin.translated(snat, backend, backend_mac(0), LB_MAC)
                .build(),
        ),
        reasons: &[reasons::TX],
    });

    // The same 4-tuple reused: a new connection, same backend, same SNAT port.
    f.case(Case {
        name: "SYN on a closed 4-tuple: new flow on the same backend 4-tuple",
        input: syn.build(),
        verdict: XDP_TX,
        output: Output::Bytes(
            syn.translated(snat, backend, backend_mac(0), LB_MAC)
                .build(),
        ),
        reasons: &[reasons::TX],
    });

    let rst = Packet::tcp(backend, snat, TCP_RST | TCP_ACK).with_macs(LB_MAC, backend_mac(0));
    f.case(Case {
        name: "RST from the backend: translated back",
        input: rst.build(),
        verdict: XDP_TX,
        output: Output::Bytes(rst.translated(vip, client, CLIENT_MAC, LB_MAC).build()),
        reasons: &[reasons::TX],
    });

    let st = f.dp.status().unwrap();
    let svc = &st.services[0];
    assert_eq!(svc.counters.new_conns, 2, "two connections were opened");
    assert_eq!(svc.counters.packets, 6);
    assert_eq!(svc.counters.reply_packets, 2);
    assert_eq!(svc.backends[0].counters.new_conns, 2);
}

#[test]
fn snat_port_collision_probes_the_configured_range() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let vip = addr(VIP);
    let backend = addr("198.18.0.11:8000");
    let a = Packet::tcp(addr("198.18.0.2:45000"), vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    let b = Packet::tcp(addr("198.18.0.3:45000"), vip, TCP_SYN).with_macs(LB_MAC, CLIENT2_MAC);
    let out_a = f.case(Case {
        name: "first client keeps its port",
        input: a.build(),
        verdict: XDP_TX,
        output: Output::Bytes(
            a.translated(addr("198.18.0.1:45000"), backend, backend_mac(0), LB_MAC)
                .build(),
        ),
        reasons: &[reasons::TX],
    });
    assert_eq!(&out_a[34..36], &45000u16.to_be_bytes());
    // Only a confirmed flow holds its port against a newcomer.
    let ack_a = Packet::tcp(addr("198.18.0.2:45000"), vip, TCP_ACK).with_macs(LB_MAC, CLIENT_MAC);
    f.case(Case {
        name: "first client's ACK confirms its flow",
        input: ack_a.build(),
        verdict: XDP_TX,
        output: Output::Bytes(
            ack_a
                .translated(addr("198.18.0.1:45000"), backend, backend_mac(0), LB_MAC)
                .build(),
        ),
        reasons: &[reasons::TX],
    });
    let c = Case {
        name: "second client, same port: probed",
        input: b.build(),
        verdict: XDP_TX,
        output: Output::Unchecked,
        reasons: &[reasons::TX],
    };
    let out_b = f.case(c);
    let port_b = u16::from_be_bytes([out_b[34], out_b[35]]);
    assert!(
        (10000..=32767).contains(&port_b),
        "probed port {port_b} in range"
    );
    assert_eq!(&out_b[26..30], &[198, 18, 0, 1], "SNAT source");
    assert_eq!(&out_b[30..34], &[198, 18, 0, 11], "backend destination");

    // Replies to each SNAT port reach the right client.
    let snat_b = std::net::SocketAddrV4::new(ip("198.18.0.1"), port_b);
    let reply_b = Packet::tcp(backend, snat_b, TCP_SYN | TCP_ACK).with_macs(LB_MAC, backend_mac(0));
    f.case(Case {
        name: "reply to the probed port goes to the second client",
        input: reply_b.build(),
        verdict: XDP_TX,
        output: Output::Bytes(
            reply_b
                .translated(vip, addr("198.18.0.3:45000"), CLIENT2_MAC, LB_MAC)
                .build(),
        ),
        reasons: &[reasons::TX],
    });
}

#[test]
fn udp_first_packet_creates_a_flow() {
    let mut f = Fixture::new(&[service("dns-ish", "198.18.100.2:5353", 17, &[1])]);
    let vip = addr("198.18.100.2:5353");
    let client = addr("198.18.0.2:33333");
    let backend = addr("198.18.0.11:8000");
    let snat = addr("198.18.0.1:33333");
    let q = Packet::udp(client, vip, b"query").with_macs(LB_MAC, CLIENT_MAC);
    f.case(Case {
        name: "UDP first packet: NAT with checksum",
        input: q.build(),
        verdict: XDP_TX,
        output: Output::Bytes(q.translated(snat, backend, backend_mac(0), LB_MAC).build()),
        reasons: &[reasons::TX],
    });
    let mut nock = Packet::udp(client, vip, b"again").with_macs(LB_MAC, CLIENT_MAC);
    nock.udp_no_checksum = true;
    f.case(Case {
        name: "UDP without checksum stays without",
        input: nock.build(),
        verdict: XDP_TX,
        output: Output::Bytes(
            nock.translated(snat, backend, backend_mac(0), LB_MAC)
                .build(),
        ),
        reasons: &[reasons::TX],
    });
    let reply = Packet::udp(backend, snat, b"answer").with_macs(LB_MAC, backend_mac(0));
    f.case(Case {
        name: "UDP reply translated back",
        input: reply.build(),
        verdict: XDP_TX,
        output: Output::Bytes(reply.translated(vip, client, CLIENT_MAC, LB_MAC).build()),
        reasons: &[reasons::TX],
    });
}

#[test]
fn lru_miss_rehashes_to_the_same_backend() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1, 1, 1])]);
    let vip = addr(VIP);
    let client = addr("198.18.0.2:41000");
    let syn = Packet::tcp(client, vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    let c = Case {
        name: "SYN",
        input: syn.build(),
        verdict: XDP_TX,
        output: Output::Unchecked,
        reasons: &[reasons::TX],
    };
    let first = f.case(c);
    // Forget the flow, as after an eviction or a restart with empty tables.
    let mut f2 = Fixture::new(&[service("llama", VIP, 6, &[1, 1, 1])]);
    let ack = Packet::tcp(client, vip, TCP_ACK).with_macs(LB_MAC, CLIENT_MAC);
    let c = Case {
        name: "ACK without entry",
        input: ack.build(),
        verdict: XDP_TX,
        output: Output::Unchecked,
        reasons: &[reasons::TX, reasons::LRU_MISS],
    };
    let second = f2.case(c);
    assert_eq!(
        &first[26..38],
        &second[26..38],
        "same SNAT address, backend and ports"
    );
    drop(f);
}

#[test]
fn weight_zero_everywhere_drops_new_flows() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[0, 0])]);
    let syn =
        Packet::tcp(addr("198.18.0.2:40000"), addr(VIP), TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    f.case(Case {
        name: "no backend",
        input: syn.build(),
        verdict: XDP_DROP,
        output: Output::Unchanged,
        reasons: &[reasons::DROP_NO_BACKEND],
    });
}

#[test]
fn unresolved_neighbour_passes_the_translated_packet() {
    let mut svc = service("llama", VIP, 6, &[1]);
    svc.backends[0].address = addr("198.18.0.44:8000");
    let mut f = Fixture::new(&[svc]);
    let client = addr("198.18.0.2:40000");
    let syn = Packet::tcp(client, addr(VIP), TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    let expected = syn.translated(
        addr("198.18.0.1:40000"),
        addr("198.18.0.44:8000"),
        LB_MAC,
        CLIENT_MAC,
    );
    f.case(Case {
        name: "no neighbour: stack resolves it",
        input: syn.build(),
        verdict: XDP_PASS,
        output: Output::Bytes(expected.build()),
        reasons: &[reasons::PASS_FIB_FAILED],
    });
    // The stack forwards it, so it is this backend's new connection.
    let st = f.dp.status().unwrap();
    assert_eq!(st.services[0].counters.new_conns, 1);
    assert_eq!(st.services[0].backends[0].counters.new_conns, 1);
    assert_eq!(st.services[0].backends[0].counters.packets, 1);
}

#[test]
fn traffic_that_is_not_for_a_service_passes_untouched() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let other = Packet::tcp(addr("198.18.0.2:40000"), addr("198.18.0.99:8000"), TCP_SYN);
    f.case(Case {
        name: "other destination",
        input: other.build(),
        verdict: XDP_PASS,
        output: Output::Unchanged,
        reasons: &[reasons::PASS_NOT_SERVICE],
    });
    let other_port = Packet::tcp(addr("198.18.0.2:40000"), addr("198.18.100.1:9999"), TCP_SYN);
    f.case(Case {
        name: "VIP, other port",
        input: other_port.build(),
        verdict: XDP_PASS,
        output: Output::Unchanged,
        reasons: &[reasons::PASS_NOT_SERVICE],
    });
    let udp_on_tcp_vip = Packet::udp(addr("198.18.0.2:40000"), addr(VIP), b"x");
    f.case(Case {
        name: "VIP port, other protocol",
        input: udp_on_tcp_vip.build(),
        verdict: XDP_PASS,
        output: Output::Unchanged,
        reasons: &[reasons::PASS_NOT_SERVICE],
    });
    let to_snat = Packet::tcp(addr("198.18.0.11:8000"), addr("198.18.0.1:50000"), TCP_ACK);
    f.case(Case {
        name: "SNAT address, no entry, no host socket: a lost flow's reply, dropped",
        input: to_snat.build(),
        verdict: XDP_DROP,
        output: Output::Unchanged,
        reasons: &[reasons::DROP_NO_REPLY_ENTRY],
    });
    // The host's own connection through the SNAT address (this thread is in
    // the fixture's namespace, so the listener is the LB host's).
    let _host = std::net::TcpListener::bind("198.18.0.1:50001").unwrap();
    let to_host = Packet::tcp(addr("198.18.0.11:8000"), addr("198.18.0.1:50001"), TCP_SYN);
    f.case(Case {
        name: "SNAT address, no entry, a host socket: the host's traffic, passed",
        input: to_host.build(),
        verdict: XDP_PASS,
        output: Output::Unchanged,
        reasons: &[reasons::PASS_NO_REPLY_ENTRY],
    });
    let udp_to_snat = Packet::udp(addr("198.18.0.11:8000"), addr("198.18.0.1:50000"), b"x");
    f.case(Case {
        name: "SNAT address, no entry, UDP: passed",
        input: udp_to_snat.build(),
        verdict: XDP_PASS,
        output: Output::Unchanged,
        reasons: &[reasons::PASS_NO_REPLY_ENTRY],
    });
    // An address sharing the SNAT address's pre-filter bucket is not dropped:
    // the exact SNAT set says it is not one.
    let bucket =
        |a: std::net::Ipv4Addr| router_common::addr_filter_bucket(u32::from_ne_bytes(a.octets()));
    let neighbour = (1..=u32::from(u16::MAX))
        .map(|n| std::net::Ipv4Addr::from(u32::from(ip("198.18.0.1")) + n))
        .find(|a| bucket(*a) == bucket(ip("198.18.0.1")))
        .unwrap();
    let near_snat = Packet::tcp(
        addr("198.18.0.11:8000"),
        std::net::SocketAddrV4::new(neighbour, 50000),
        TCP_ACK,
    );
    f.case(Case {
        name: "the SNAT address's bucket neighbour, no host socket: passed untouched",
        input: near_snat.build(),
        verdict: XDP_PASS,
        output: Output::Unchanged,
        reasons: &[reasons::PASS_NO_REPLY_ENTRY],
    });
    let mut ipv6 = vec![0u8; 74];
    ipv6[12] = 0x86;
    ipv6[13] = 0xdd;
    ipv6[14] = 0x60;
    f.case(Case {
        name: "IPv6 passes",
        input: ipv6,
        verdict: XDP_PASS,
        output: Output::Unchanged,
        reasons: &[reasons::PASS_NOT_SERVICE],
    });
    let mut arp = vec![0u8; 42];
    arp[12] = 0x08;
    arp[13] = 0x06;
    f.case(Case {
        name: "ARP passes",
        input: arp,
        verdict: XDP_PASS,
        output: Output::Unchanged,
        reasons: &[reasons::PASS_NOT_SERVICE],
    });
}

#[test]
fn malformed_and_edge_input_is_never_forwarded() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let good = Packet::tcp(addr("198.18.0.2:40000"), addr(VIP), TCP_SYN).build();

    // Frames shorter than an Ethernet header never reach XDP (BPF_PROG_TEST_RUN
    // refuses them too); the shortest truncation to test is an IPv4 header cut short.
    f.case(Case {
        name: "IPv4 ethertype, no IPv4 header",
        input: good[..14].to_vec(),
        verdict: XDP_DROP,
        output: Output::Unchanged,
        reasons: &[reasons::DROP_MALFORMED],
    });
    f.case(Case {
        name: "truncated IPv4 header",
        input: good[..30].to_vec(),
        verdict: XDP_DROP,
        output: Output::Unchanged,
        reasons: &[reasons::DROP_MALFORMED],
    });

    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x44;
    f.case(Case {
        name: "IHL 4",
        input: bad_ihl,
        verdict: XDP_DROP,
        output: Output::Unchanged,
        reasons: &[reasons::DROP_MALFORMED],
    });

    let mut bad_version = good.clone();
    bad_version[14] = 0x65;
    f.case(Case {
        name: "version 6 in an IPv4 frame",
        input: bad_version,
        verdict: XDP_DROP,
        output: Output::Unchanged,
        reasons: &[reasons::DROP_MALFORMED],
    });

    let mut too_long = good.clone();
    too_long[16..18].copy_from_slice(&200u16.to_be_bytes());
    f.case(Case {
        name: "total length beyond the frame",
        input: too_long,
        verdict: XDP_DROP,
        output: Output::Unchanged,
        reasons: &[reasons::DROP_MALFORMED],
    });

    let mut too_short = good.clone();
    too_short[16..18].copy_from_slice(&12u16.to_be_bytes());
    f.case(Case {
        name: "total length below the header",
        input: too_short,
        verdict: XDP_DROP,
        output: Output::Unchanged,
        reasons: &[reasons::DROP_MALFORMED],
    });

    f.case(Case {
        name: "truncated TCP header",
        input: good[..44].to_vec(),
        verdict: XDP_DROP,
        output: Output::Unchanged,
        reasons: &[reasons::DROP_MALFORMED],
    });

    let mut short_doff = good.clone();
    short_doff[46] = 0x40;
    f.case(Case {
        name: "TCP data offset 4",
        input: short_doff,
        verdict: XDP_DROP,
        output: Output::Unchanged,
        reasons: &[reasons::DROP_MALFORMED],
    });

    let mut frag = Packet::tcp(addr("198.18.0.2:40000"), addr(VIP), TCP_SYN);
    frag.frag = 0x2000; // MF
    f.case(Case {
        name: "first fragment",
        input: frag.build(),
        verdict: XDP_PASS,
        output: Output::Unchanged,
        reasons: &[reasons::PASS_FRAGMENT],
    });
    frag.frag = 0x0010; // offset 128
    f.case(Case {
        name: "later fragment",
        input: frag.build(),
        verdict: XDP_PASS,
        output: Output::Unchanged,
        reasons: &[reasons::PASS_FRAGMENT],
    });

    let mut opts = Packet::tcp(addr("198.18.0.2:40000"), addr(VIP), TCP_SYN);
    opts.ip_options = vec![0x01, 0x01, 0x01, 0x00]; // NOP NOP NOP EOL
    f.case(Case {
        name: "IP options",
        input: opts.build(),
        verdict: XDP_PASS,
        output: Output::Unchanged,
        reasons: &[reasons::PASS_IP_OPTIONS],
    });

    let mut icmp = Packet::tcp(addr("198.18.0.2:0"), addr("198.18.100.1:0"), 0);
    icmp.proto = 1;
    icmp.payload = vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0];
    f.case(Case {
        name: "ICMP to the VIP",
        input: icmp.build(),
        verdict: XDP_PASS,
        output: Output::Unchanged,
        reasons: &[reasons::PASS_UNKNOWN_PROTO],
    });

    let mut udp_short =
        Packet::udp(addr("198.18.0.2:40000"), addr("198.18.100.1:8000"), b"abc").build();
    udp_short[38..40].copy_from_slice(&4u16.to_be_bytes());
    f.case(Case {
        name: "UDP length below 8",
        input: udp_short,
        verdict: XDP_DROP,
        output: Output::Unchanged,
        reasons: &[reasons::DROP_MALFORMED],
    });

    // Nothing above created a connection.
    let st = f.dp.status().unwrap();
    assert_eq!(st.services[0].counters.new_conns, 0);
}

#[test]
fn weight_change_moves_new_flows_and_keeps_established_ones() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1, 0])]);
    let vip = addr(VIP);
    let mut pinned = Vec::new();
    for port in 20000..20032u16 {
        let syn = Packet::tcp(
            std::net::SocketAddrV4::new(ip("198.18.0.2"), port),
            vip,
            TCP_SYN,
        )
        .with_macs(LB_MAC, CLIENT_MAC);
        let (v, out) = f.run(&syn.build());
        assert_eq!(v, XDP_TX);
        assert_eq!(&out[30..34], &[198, 18, 0, 11], "only b0 has weight");
        pinned.push(port);
    }
    // Flip all weight to b1 — one atomic table swap.
    f.dp.apply(&[service("llama", VIP, 6, &[0, 1])]).unwrap();
    for port in &pinned {
        let ack = Packet::tcp(
            std::net::SocketAddrV4::new(ip("198.18.0.2"), *port),
            vip,
            TCP_ACK,
        )
        .with_macs(LB_MAC, CLIENT_MAC);
        let (v, out) = f.run(&ack.build());
        assert_eq!(v, XDP_TX);
        assert_eq!(
            &out[30..34],
            &[198, 18, 0, 11],
            "established flow stays on b0"
        );
    }
    for port in 30000..30032u16 {
        let syn = Packet::tcp(
            std::net::SocketAddrV4::new(ip("198.18.0.2"), port),
            vip,
            TCP_SYN,
        )
        .with_macs(LB_MAC, CLIENT_MAC);
        let (v, out) = f.run(&syn.build());
        assert_eq!(v, XDP_TX);
        assert_eq!(&out[30..34], &[198, 18, 0, 12], "new flows go to b1");
    }
}

#[test]
fn backend_behind_another_interface_is_redirected_both_ways() {
    let mut svc = service("llama", VIP, 6, &[1]);
    svc.backends[0].address = addr("198.18.1.11:8000");
    svc.snat = vec![ip("198.18.1.1")];
    let mut f = Fixture::new(&[svc]);
    let (client, vip) = (addr("198.18.0.2:40000"), addr(VIP));
    let (backend, snat) = (addr("198.18.1.11:8000"), addr("198.18.1.1:40000"));
    let syn = Packet::tcp(client, vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    f.case(Case {
        name: "client arm to backend arm: XDP_REDIRECT with the other interface's MAC",
        input: syn.build(),
        verdict: XDP_REDIRECT,
        output: Output::Bytes(
            syn.translated(snat, backend, [0x02, 0, 0, 0, 0x1b, 0], ARM2_MAC)
                .build(),
        ),
        reasons: &[reasons::REDIRECT],
    });
    // The reply arrives on the backend arm and goes back out the client arm.
    let client_arm = f.ifindex;
    f.ifindex = f.ns.ifindex("fx2").unwrap();
    let syn_ack =
        Packet::tcp(backend, snat, TCP_SYN | TCP_ACK).with_macs(ARM2_MAC, [0x02, 0, 0, 0, 0x1b, 0]);
    f.case(Case {
        name: "backend arm to client arm",
        input: syn_ack.build(),
        verdict: XDP_REDIRECT,
        output: Output::Bytes(syn_ack.translated(vip, client, CLIENT_MAC, LB_MAC).build()),
        reasons: &[reasons::REDIRECT],
    });
    f.ifindex = client_arm;
}

#[test]
fn connect_and_first_byte_latency_are_recorded_once_per_connection() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let client = addr("198.18.0.2:40100");
    let backend = addr("198.18.0.11:8000");
    let snat = addr("198.18.0.1:40100");
    let vip = addr(VIP);
    let latency = |f: &Fixture| {
        let st = f.dp.status().unwrap();
        st.services[0].backends[0].latency.clone()
    };
    let fwd = |flags: u8, payload: &[u8]| {
        Packet::tcp(client, vip, flags)
            .with_macs(LB_MAC, CLIENT_MAC)
            .with_payload(payload)
            .build()
    };
    let back = |flags: u8, payload: &[u8]| {
        Packet::tcp(backend, snat, flags)
            .with_macs(LB_MAC, backend_mac(0))
            .with_payload(payload)
            .build()
    };
    let pause = std::time::Duration::from_millis(3);

    assert_eq!(f.run(&fwd(TCP_SYN, b"")).0, XDP_TX);
    // A retransmitted SYN must not restart the clock.
    assert_eq!(f.run(&fwd(TCP_SYN, b"")).0, XDP_TX);
    std::thread::sleep(pause);
    assert_eq!(f.run(&back(TCP_SYN | TCP_ACK, b"")).0, XDP_TX);
    let l = latency(&f);
    assert_eq!(l.connect.count(), 1, "one connect sample after the SYN-ACK");
    assert!(l.connect.sum_us >= 3_000, "connect {} µs", l.connect.sum_us);
    assert_eq!(l.first_byte.count(), 0);

    // Bare ACKs carry no payload: neither clock moves.
    assert_eq!(f.run(&fwd(TCP_ACK, b"")).0, XDP_TX);
    assert_eq!(f.run(&back(TCP_ACK, b"")).0, XDP_TX);
    assert_eq!(latency(&f).first_byte.count(), 0);

    assert_eq!(
        f.run(&fwd(TCP_ACK | TCP_PSH, b"POST /v1/completions")).0,
        XDP_TX
    );
    assert_eq!(f.run(&back(TCP_ACK, b"")).0, XDP_TX);
    std::thread::sleep(pause);
    assert_eq!(
        f.run(&back(TCP_ACK | TCP_PSH, b"data: {\"token\"")).0,
        XDP_TX
    );
    let l = latency(&f);
    assert_eq!(l.first_byte.count(), 1, "one first-byte sample");
    assert!(
        l.first_byte.sum_us >= 3_000,
        "first byte {} µs",
        l.first_byte.sum_us
    );

    // Later payload in either direction records nothing more.
    assert_eq!(f.run(&fwd(TCP_ACK | TCP_PSH, b"more")).0, XDP_TX);
    assert_eq!(f.run(&back(TCP_ACK | TCP_PSH, b"more tokens")).0, XDP_TX);
    let l = latency(&f);
    assert_eq!((l.connect.count(), l.first_byte.count()), (1, 1));
    let p50 = l.first_byte.quantile(0.5).unwrap();
    assert!((0.002..10.0).contains(&p50), "first-byte p50 {p50} s");

    // UDP flows are never measured.
    let udp = Packet::udp(addr("198.18.0.2:5000"), addr("198.18.100.1:8000"), b"x")
        .with_macs(LB_MAC, CLIENT_MAC)
        .build();
    f.run(&udp);
    let l = latency(&f);
    assert_eq!((l.connect.count(), l.first_byte.count()), (1, 1));
}

/// Pins the calling thread to the CPU it runs on: BPF_PROG_TEST_RUN runs the
/// program there, and the LRU tables keep one list per CPU, so evictions are
/// only predictable when every packet goes through the same list.
fn pin_to_current_cpu() {
    // SAFETY: sched_getcpu and sched_setaffinity on this thread with a
    // cpu_set_t that lives for the call.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(rc, 0, "sched_setaffinity");
    }
}

fn conn_key(src: std::net::SocketAddrV4, dst: std::net::SocketAddrV4) -> router_common::ConnKey {
    router_common::ConnKey {
        src_addr: u32::from_ne_bytes(src.ip().octets()),
        dst_addr: u32::from_ne_bytes(dst.ip().octets()),
        src_port: src.port().to_be(),
        dst_port: dst.port().to_be(),
        proto: 6,
        _pad: [0; 3],
    }
}

/// `n` packets from spoofed sources in 198.19.0.0/16 (starting at the
/// `from`th), each its own flow.
fn spoofed(f: &mut Fixture, from: u32, n: u32, packet: impl Fn(std::net::SocketAddrV4) -> Packet) {
    for i in from..from + n {
        let src = std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8),
            1024 + (i % 50_000) as u16,
        );
        let p = packet(src).with_macs(LB_MAC, CLIENT_MAC);
        assert_eq!(f.run(&p.build()).0, XDP_TX, "spoofed packet {i}");
    }
}

fn spoofed_syns(f: &mut Fixture, n: u32) {
    spoofed(f, 0, n, |src| Packet::tcp(src, addr(VIP), TCP_SYN));
}

#[test]
fn syn_and_ack_floods_churn_half_open_flows_and_never_evict_established_ones() {
    pin_to_current_cpu();
    // A connection table of 64 entries: before half-open flows had a table
    // of their own, 2,000 SYNs evicted everything in it many times over.
    let mut f = Fixture::with_options(
        &[service("llama", VIP, 6, &[1])],
        LoadOptions {
            table_size: 1021,
            conn_table_size: 64,
            ..LoadOptions::default()
        },
    );
    let client = addr("198.18.0.2:40200");
    let backend = addr("198.18.0.11:8000");
    let snat = addr("198.18.0.1:40200");
    let vip = addr(VIP);
    let fwd = |flags: u8, payload: &[u8]| {
        Packet::tcp(client, vip, flags)
            .with_macs(LB_MAC, CLIENT_MAC)
            .with_payload(payload)
    };
    let back = |flags: u8, payload: &[u8]| {
        Packet::tcp(backend, snat, flags)
            .with_macs(LB_MAC, backend_mac(0))
            .with_payload(payload)
    };
    let to_backend = |p: Packet| p.translated(snat, backend, backend_mac(0), LB_MAC).build();
    let to_client = |p: Packet| p.translated(vip, client, CLIENT_MAC, LB_MAC).build();
    let entries = |f: &Fixture| f.dp.conn_table().unwrap().scan().unwrap();

    let syn = fwd(TCP_SYN, b"");
    f.case(Case {
        name: "SYN: a half-open flow",
        input: syn.build(),
        verdict: XDP_TX,
        output: Output::Bytes(to_backend(syn.clone())),
        reasons: &[reasons::TX],
    });
    assert_eq!(entries(&f).entries, 0, "a half-open flow is not in CONNS");
    let syn_ack = back(TCP_SYN | TCP_ACK, b"");
    f.case(Case {
        name: "SYN-ACK: translated from the half-open reply entry",
        input: syn_ack.build(),
        verdict: XDP_TX,
        output: Output::Bytes(to_client(syn_ack.clone())),
        reasons: &[reasons::TX],
    });
    assert_eq!(
        entries(&f).entries,
        0,
        "the backend's answer confirms nothing"
    );
    let ack = fwd(TCP_ACK, b"");
    f.case(Case {
        name: "the client's ACK confirms the flow",
        input: ack.build(),
        verdict: XDP_TX,
        output: Output::Bytes(to_backend(ack.clone())),
        reasons: &[reasons::TX],
    });
    let scan = entries(&f);
    assert_eq!(scan.entries, 2, "both directions moved to CONNS");
    assert_eq!(scan.active.values().sum::<u64>(), 1);

    spoofed_syns(&mut f, 2_000);
    assert_eq!(entries(&f).entries, 2, "no spoofed SYN reached CONNS");
    // From other sources: one that sends a SYN and then an ACK confirms
    // its flow, spoofed or not (nothing here checks sequence numbers).
    spoofed(&mut f, 10_000, 2_000, |src| {
        Packet::tcp(src, addr(VIP), TCP_ACK | TCP_PSH).with_payload(b"GET /")
    });
    assert_eq!(entries(&f).entries, 2, "no spoofed ACK reached CONNS");

    let data = fwd(TCP_ACK | TCP_PSH, b"POST /v1/completions");
    f.case(Case {
        name: "after the flood: the client's data is still a table hit",
        input: data.build(),
        verdict: XDP_TX,
        output: Output::Bytes(to_backend(data.clone())),
        reasons: &[reasons::TX],
    });
    let tokens = back(TCP_ACK | TCP_PSH, b"data: {\"token\"");
    f.case(Case {
        name: "after the flood: the backend's reply still finds its entry",
        input: tokens.build(),
        verdict: XDP_TX,
        output: Output::Bytes(to_client(tokens.clone())),
        reasons: &[reasons::TX],
    });
}

#[test]
fn a_retransmitted_syn_starts_over_when_the_lru_dropped_its_reply_entry() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let client = addr("198.18.0.2:40300");
    let backend = addr("198.18.0.11:8000");
    let snat = addr("198.18.0.1:40300");
    let vip = addr(VIP);
    let syn = Packet::tcp(client, vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    let to_backend = syn
        .translated(snat, backend, backend_mac(0), LB_MAC)
        .build();
    f.case(Case {
        name: "SYN",
        input: syn.build(),
        verdict: XDP_TX,
        output: Output::Bytes(to_backend.clone()),
        reasons: &[reasons::TX],
    });
    // The LRU evicts the two directions independently; drop the reply.
    {
        let mut half_open: aya::maps::HashMap<_, router_common::ConnKey, router_common::ConnEntry> =
            aya::maps::HashMap::try_from(f.dp.ebpf_mut().map_mut("HALF_OPEN").unwrap()).unwrap();
        half_open.remove(&conn_key(backend, snat)).unwrap();
    }
    let syn_ack = Packet::tcp(backend, snat, TCP_SYN | TCP_ACK).with_macs(LB_MAC, backend_mac(0));
    f.case(Case {
        name: "SYN-ACK without its entry: dropped, not reset by the host",
        input: syn_ack.build(),
        verdict: XDP_DROP,
        output: Output::Unchanged,
        reasons: &[reasons::DROP_NO_REPLY_ENTRY],
    });
    f.case(Case {
        name: "the client's retransmitted SYN starts the flow over, on its own port",
        input: syn.build(),
        verdict: XDP_TX,
        output: Output::Bytes(to_backend),
        reasons: &[reasons::TX],
    });
    f.case(Case {
        name: "the backend's SYN-ACK finds the new reply entry",
        input: syn_ack.build(),
        verdict: XDP_TX,
        output: Output::Bytes(syn_ack.translated(vip, client, CLIENT_MAC, LB_MAC).build()),
        reasons: &[reasons::TX],
    });
    let st = f.dp.status().unwrap();
    assert_eq!(
        st.services[0].counters.new_conns, 2,
        "the SYN and its restart"
    );
}

#[test]
fn a_confirmed_flow_takes_its_port_back_from_a_half_open_one() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let vip = addr(VIP);
    let backend = addr("198.18.0.11:8000");
    let snat = addr("198.18.0.1:40400");
    // A spoofed SYN from another source with the same port holds the SNAT
    // port (the backend 4-tuple) that the client's flow had before the LRU
    // dropped both of its entries.
    let spoof = Packet::tcp(addr("198.19.0.9:40400"), vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    f.case(Case {
        name: "spoofed SYN takes port 40400",
        input: spoof.build(),
        verdict: XDP_TX,
        output: Output::Bytes(
            spoof
                .translated(snat, backend, backend_mac(0), LB_MAC)
                .build(),
        ),
        reasons: &[reasons::TX],
    });
    let data = Packet::tcp(addr("198.18.0.2:40400"), vip, TCP_ACK | TCP_PSH)
        .with_macs(LB_MAC, CLIENT_MAC)
        .with_payload(b"more of the request");
    f.case(Case {
        name: "the client's mid-stream packet gets its backend 4-tuple back",
        input: data.build(),
        verdict: XDP_TX,
        output: Output::Bytes(
            data.translated(snat, backend, backend_mac(0), LB_MAC)
                .build(),
        ),
        reasons: &[reasons::TX, reasons::LRU_MISS],
    });
    let reply = Packet::tcp(backend, snat, TCP_ACK).with_macs(LB_MAC, backend_mac(0));
    f.case(Case {
        name: "the backend's reply goes to the client, not the spoofed source",
        input: reply.build(),
        verdict: XDP_TX,
        output: Output::Bytes(
            reply
                .translated(vip, addr("198.18.0.2:40400"), CLIENT_MAC, LB_MAC)
                .build(),
        ),
        reasons: &[reasons::TX],
    });
}

#[test]
fn a_half_open_flow_expires_after_the_closing_timeout() {
    let mut f = Fixture::with_options(
        &[service("llama", VIP, 6, &[1])],
        LoadOptions {
            table_size: 1021,
            tcp_closing_ns: 20_000_000,
            ..LoadOptions::default()
        },
    );
    let (client, vip) = (addr("198.18.0.2:40500"), addr(VIP));
    let (backend, snat) = (addr("198.18.0.11:8000"), addr("198.18.0.1:40500"));
    let syn = Packet::tcp(client, vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    assert_eq!(f.run(&syn.build()).0, XDP_TX);
    // 20 ms, not the 1 h idle timeout; the clock ticks per jiffy, so wait
    // well past it.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let ack = Packet::tcp(client, vip, TCP_ACK).with_macs(LB_MAC, CLIENT_MAC);
    f.case(Case {
        name: "a late ACK finds the half-open flow expired: picked up mid-stream",
        input: ack.build(),
        verdict: XDP_TX,
        output: Output::Bytes(
            ack.translated(snat, backend, backend_mac(0), LB_MAC)
                .build(),
        ),
        reasons: &[reasons::TX, reasons::LRU_MISS],
    });
    let entries = |f: &Fixture| f.dp.conn_table().unwrap().scan().unwrap().entries;
    assert_eq!(entries(&f), 0, "picked up, but not confirmed by one packet");
    let data = Packet::tcp(client, vip, TCP_ACK | TCP_PSH)
        .with_macs(LB_MAC, CLIENT_MAC)
        .with_payload(b"prompt");
    f.case(Case {
        name: "the client's next packet confirms it",
        input: data.build(),
        verdict: XDP_TX,
        output: Output::Bytes(
            data.translated(snat, backend, backend_mac(0), LB_MAC)
                .build(),
        ),
        reasons: &[reasons::TX],
    });
    assert_eq!(entries(&f), 2, "the flow is confirmed now");
}

#[test]
fn an_expired_flow_frees_its_port_for_a_new_client() {
    let mut f = Fixture::with_options(
        &[service("llama", VIP, 6, &[1])],
        LoadOptions {
            table_size: 1021,
            tcp_idle_ns: 20_000_000,
            ..LoadOptions::default()
        },
    );
    let vip = addr(VIP);
    let backend = addr("198.18.0.11:8000");
    let snat = addr("198.18.0.1:40600");
    let first = addr("198.18.0.2:40600");
    for flags in [TCP_SYN, TCP_ACK] {
        let p = Packet::tcp(first, vip, flags).with_macs(LB_MAC, CLIENT_MAC);
        assert_eq!(f.run(&p.build()).0, XDP_TX);
    }
    assert_eq!(f.dp.conn_table().unwrap().scan().unwrap().entries, 2);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let syn = Packet::tcp(addr("198.18.0.3:40600"), vip, TCP_SYN).with_macs(LB_MAC, CLIENT2_MAC);
    f.case(Case {
        name: "another client with the same port gets it: the confirmed flow expired",
        input: syn.build(),
        verdict: XDP_TX,
        output: Output::Bytes(
            syn.translated(snat, backend, backend_mac(0), LB_MAC)
                .build(),
        ),
        reasons: &[reasons::TX],
    });
}

#[test]
fn a_syn_takes_its_own_port_from_an_older_half_open_flow() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let vip = addr(VIP);
    let backend = addr("198.18.0.11:8000");
    let snat = addr("198.18.0.1:40700");
    let client = addr("198.18.0.2:40700");
    let spoof = Packet::tcp(addr("198.19.0.9:40700"), vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    assert_eq!(f.run(&spoof.build()).0, XDP_TX);
    // Had the client been pushed to a probed port, that port could not be
    // found again once the LRU evicted both of its entries: a flow picked
    // up mid-stream always tries the client's own port first.
    let syn = Packet::tcp(client, vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    f.case(Case {
        name: "a SYN whose port an unconfirmed flow holds keeps its own port",
        input: syn.build(),
        verdict: XDP_TX,
        output: Output::Bytes(
            syn.translated(snat, backend, backend_mac(0), LB_MAC)
                .build(),
        ),
        reasons: &[reasons::TX],
    });
    let syn_ack = Packet::tcp(backend, snat, TCP_SYN | TCP_ACK).with_macs(LB_MAC, backend_mac(0));
    f.case(Case {
        name: "the backend's SYN-ACK goes to the newest SYN's client",
        input: syn_ack.build(),
        verdict: XDP_TX,
        output: Output::Bytes(syn_ack.translated(vip, client, CLIENT_MAC, LB_MAC).build()),
        reasons: &[reasons::TX],
    });
}

/// A table of the program's by name, for reading or editing entries.
#[test]
fn a_syn_after_the_backend_reset_the_flow_is_a_new_connection() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1, 0])]);
    let vip = addr(VIP);
    let client = addr("198.18.0.2:40800");
    let (b0, b1) = (addr("198.18.0.11:8000"), addr("198.18.0.12:8000"));
    let snat = addr("198.18.0.1:40800");
    let syn = Packet::tcp(client, vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    let ack = Packet::tcp(client, vip, TCP_ACK).with_macs(LB_MAC, CLIENT_MAC);
    for p in [&syn, &ack] {
        assert_eq!(
            f.run(&p.build()),
            (
                XDP_TX,
                p.translated(snat, b0, backend_mac(0), LB_MAC).build()
            )
        );
    }
    // The backend's process goes away: its kernel resets the connection.
    // The client, reset, sends nothing more on it, so the forward entry
    // stays live while the reply entry is closing.
    let rst = Packet::tcp(b0, snat, TCP_RST | TCP_ACK).with_macs(LB_MAC, backend_mac(0));
    assert_eq!(f.run(&rst.build()).0, XDP_TX);
    // Meanwhile the operator moved the service to the other backend.
    f.dp.apply(&[service("llama", VIP, 6, &[0, 1])]).unwrap();
    f.case(Case {
        name: "the client reuses its port: a new connection, picked afresh",
        input: syn.build(),
        verdict: XDP_TX,
        output: Output::Bytes(syn.translated(snat, b1, backend_mac(1), LB_MAC).build()),
        reasons: &[reasons::TX],
    });
    let syn_ack = Packet::tcp(b1, snat, TCP_SYN | TCP_ACK).with_macs(LB_MAC, backend_mac(1));
    f.case(Case {
        name: "the new backend's SYN-ACK reaches the client",
        input: syn_ack.build(),
        verdict: XDP_TX,
        output: Output::Bytes(syn_ack.translated(vip, client, CLIENT_MAC, LB_MAC).build()),
        reasons: &[reasons::TX],
    });
    assert_eq!(
        table(&mut f, "CONNS").get(&conn_key(b0, snat), 0).ok(),
        None,
        "the old flow's reply entry is gone"
    );
    // A retransmit of the new SYN, with both directions live, rides its flow.
    f.case(Case {
        name: "a retransmitted SYN stays on its flow",
        input: syn.build(),
        verdict: XDP_TX,
        output: Output::Bytes(syn.translated(snat, b1, backend_mac(1), LB_MAC).build()),
        reasons: &[reasons::TX],
    });
    let st = f.dp.status().unwrap();
    assert_eq!(st.services[0].counters.new_conns, 2, "two connections");
}

#[test]
fn a_connection_refused_once_starts_clean_on_the_same_port() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let vip = addr(VIP);
    let client = addr("198.18.0.2:40900");
    let backend = addr("198.18.0.11:8000");
    let snat = addr("198.18.0.1:40900");
    let syn = Packet::tcp(client, vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    assert_eq!(f.run(&syn.build()).0, XDP_TX);
    let refused = Packet::tcp(backend, snat, TCP_RST | TCP_ACK).with_macs(LB_MAC, backend_mac(0));
    assert_eq!(
        f.run(&refused.build()).0,
        XDP_TX,
        "the refusal reaches the client"
    );
    // The client tries again from the same port; this time the backend answers.
    let syn_ack = Packet::tcp(backend, snat, TCP_SYN | TCP_ACK).with_macs(LB_MAC, backend_mac(0));
    let ack = Packet::tcp(client, vip, TCP_ACK).with_macs(LB_MAC, CLIENT_MAC);
    for p in [&syn, &syn_ack, &ack] {
        assert_eq!(f.run(&p.build()).0, XDP_TX);
    }
    let reply = table(&mut f, "CONNS")
        .get(&conn_key(backend, snat), 0)
        .expect("the confirmed flow's reply entry");
    assert_eq!(
        reply.flags & router_common::CONN_CLOSING,
        0,
        "the refused attempt's reset must not make the new connection closing \
         (it would expire after the closing timeout of silence)"
    );
    let st = f.dp.status().unwrap();
    assert_eq!(
        st.services[0].counters.new_conns, 2,
        "refused, then connected"
    );
}

#[test]
fn lru_miss_after_the_forward_entry_was_evicted_keeps_the_snat_pair() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let vip = addr(VIP);
    let backend = addr("198.18.0.11:8000");
    let (a, b) = (addr("198.18.0.2:41100"), addr("198.18.0.3:41100"));
    let handshake = |f: &mut Fixture, client, mac| -> Vec<u8> {
        let syn = Packet::tcp(client, vip, TCP_SYN).with_macs(LB_MAC, mac);
        let (v, out) = f.run(&syn.build());
        assert_eq!(v, XDP_TX);
        let ack = Packet::tcp(client, vip, TCP_ACK).with_macs(LB_MAC, mac);
        assert_eq!(f.run(&ack.build()).0, XDP_TX);
        out
    };
    handshake(&mut f, a, CLIENT_MAC);
    // b's own port is held by a's confirmed flow: b is probed elsewhere.
    let out = handshake(&mut f, b, CLIENT2_MAC);
    let probed = u16::from_be_bytes([out[34], out[35]]);
    assert_ne!(probed, 41100);
    let snat_b = std::net::SocketAddrV4::new(ip("198.18.0.1"), probed);
    // a's flow ends and is reclaimed; the LRU evicts only b's forward entry.
    {
        let mut conns = table(&mut f, "CONNS");
        conns.remove(&conn_key(a, vip)).unwrap();
        conns
            .remove(&conn_key(backend, addr("198.18.0.1:41100")))
            .unwrap();
        conns.remove(&conn_key(b, vip)).unwrap();
    }
    let data = Packet::tcp(b, vip, TCP_ACK | TCP_PSH)
        .with_macs(LB_MAC, CLIENT2_MAC)
        .with_payload(b"rest of the prompt");
    f.case(Case {
        name: "b's next packet is re-hashed onto the pair its reply entry holds, \
         not onto its own port, now free",
        input: data.build(),
        verdict: XDP_TX,
        output: Output::Bytes(
            data.translated(snat_b, backend, backend_mac(0), LB_MAC)
                .build(),
        ),
        reasons: &[reasons::TX, reasons::LRU_MISS],
    });
    let reply = Packet::tcp(backend, snat_b, TCP_ACK).with_macs(LB_MAC, backend_mac(0));
    f.case(Case {
        name: "the backend's reply still reaches b",
        input: reply.build(),
        verdict: XDP_TX,
        output: Output::Bytes(reply.translated(vip, b, CLIENT2_MAC, LB_MAC).build()),
        reasons: &[reasons::TX],
    });
}

#[test]
fn a_half_open_flow_never_stamps_another_flows_reply_entry() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let vip = addr(VIP);
    let backend = addr("198.18.0.11:8000");
    let snat = addr("198.18.0.1:45200");
    let (a, b) = (addr("198.18.0.2:45200"), addr("198.18.0.3:45200"));
    let syn_a = Packet::tcp(a, vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    assert_eq!(
        f.run(&syn_a.build()).0,
        XDP_TX,
        "a's SYN: half-open on port 45200"
    );
    // b's flow, picked up mid-stream, takes the pair from a's half-open
    // flow (the newest takes it), and b's next packet confirms it.
    let ack_b = Packet::tcp(b, vip, TCP_ACK).with_macs(LB_MAC, CLIENT2_MAC);
    for _ in 0..2 {
        let (v, out) = f.run(&ack_b.build());
        assert_eq!(v, XDP_TX);
        assert_eq!(&out[34..36], &45200u16.to_be_bytes(), "b holds port 45200");
    }
    // a's request: CONNS refuses a's promotion (b holds the pair), so a
    // rides its half-open entry; its request must not start a
    // first-byte clock on b's reply entry.
    let request = Packet::tcp(a, vip, TCP_ACK | TCP_PSH)
        .with_macs(LB_MAC, CLIENT_MAC)
        .with_payload(b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(f.run(&request.build()).0, XDP_TX);
    let data = Packet::tcp(backend, snat, TCP_ACK | TCP_PSH)
        .with_macs(LB_MAC, backend_mac(0))
        .with_payload(b"b's stream goes on");
    f.case(Case {
        name: "the backend's data on b's connection",
        input: data.build(),
        verdict: XDP_TX,
        output: Output::Bytes(data.translated(vip, b, CLIENT2_MAC, LB_MAC).build()),
        reasons: &[reasons::TX],
    });
    let st = f.dp.status().unwrap();
    assert_eq!(
        st.services[0].backends[0].latency.first_byte.count(),
        0,
        "b never had a request measured: no first-byte sample"
    );
}

#[test]
fn ending_a_drained_backends_flows_ends_its_handshakes_too() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let vip = addr(VIP);
    let backend = addr("198.18.0.11:8000");
    let (confirmed, handshaking) = (addr("198.18.0.2:41200"), addr("198.18.0.2:41201"));
    for (client, flags) in [
        (confirmed, TCP_SYN),
        (confirmed, TCP_ACK),
        (handshaking, TCP_SYN),
    ] {
        let p = Packet::tcp(client, vip, flags).with_macs(LB_MAC, CLIENT_MAC);
        assert_eq!(f.run(&p.build()).0, XDP_TX);
    }
    let id = f.dp.backend_id("llama", "b0").unwrap();
    let ended = f.dp.conn_table().unwrap().end_backend_flows(id).unwrap();
    assert_eq!(ended, 2, "the confirmed flow and the one in its handshake");
    for name in ["CONNS", "HALF_OPEN"] {
        assert_eq!(table(&mut f, name).keys().count(), 0, "{name} emptied");
    }
    // The handshake's SYN-ACK no longer finds a way to the client.
    let snat = addr("198.18.0.1:41201");
    let syn_ack = Packet::tcp(backend, snat, TCP_SYN | TCP_ACK).with_macs(LB_MAC, backend_mac(0));
    f.case(Case {
        name: "a SYN-ACK of the ended handshake is dropped",
        input: syn_ack.build(),
        verdict: XDP_DROP,
        output: Output::Unchanged,
        reasons: &[reasons::DROP_NO_REPLY_ENTRY],
    });
}

#[test]
fn a_spoofed_udp_flood_never_evicts_confirmed_udp_flows() {
    pin_to_current_cpu();
    let vip = addr("198.18.100.2:5353");
    let mut f = Fixture::with_options(
        &[service("dns-ish", "198.18.100.2:5353", 17, &[1])],
        LoadOptions {
            table_size: 1021,
            conn_table_size: 64,
            ..LoadOptions::default()
        },
    );
    let client = addr("198.18.0.2:33400");
    let (backend, snat) = (addr("198.18.0.11:8000"), addr("198.18.0.1:33400"));
    let entries = |f: &Fixture| f.dp.conn_table().unwrap().scan().unwrap().entries;
    let q = Packet::udp(client, vip, b"query").with_macs(LB_MAC, CLIENT_MAC);
    for _ in 0..2 {
        assert_eq!(f.run(&q.build()).0, XDP_TX);
    }
    assert_eq!(entries(&f), 2, "the client's second datagram confirmed it");
    for i in 0..2_000u32 {
        let src = std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8),
            1024 + i as u16,
        );
        let p = Packet::udp(src, vip, b"junk").with_macs(LB_MAC, CLIENT_MAC);
        assert_eq!(f.run(&p.build()).0, XDP_TX, "spoofed datagram {i}");
    }
    assert_eq!(entries(&f), 2, "no spoofed datagram reached CONNS");
    let reply = Packet::udp(backend, snat, b"answer").with_macs(LB_MAC, backend_mac(0));
    f.case(Case {
        name: "the confirmed flow's reply still finds its entry",
        input: reply.build(),
        verdict: XDP_TX,
        output: Output::Bytes(reply.translated(vip, client, CLIENT_MAC, LB_MAC).build()),
        reasons: &[reasons::TX],
    });
}
