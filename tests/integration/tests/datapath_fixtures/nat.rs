//! The NAT itself: flows through the program in both directions, SNAT
//! ports, weights, the FIB's next hop and the latency clocks.

use router_common::reasons;
use router_testkit::{
    packet::{Packet, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, addr, ip},
    xdp_fixture::*,
};

use super::VIP;

#[test]
fn tcp_flow_lifecycle() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let client = addr("198.18.0.2:40000");
    let backend = addr("198.18.0.11:8000");
    let snat = addr("198.18.0.1:40000");
    let vip = addr(VIP);
    let to_backend =
        |p: &Packet| Output::Bytes(p.translated(snat, backend, backend_mac(0), LB_MAC).build());
    let to_client =
        |p: &Packet| Output::Bytes(p.translated(vip, client, CLIENT_MAC, LB_MAC).build());

    let syn = Packet::tcp(client, vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    let syn_ack = Packet::tcp(backend, snat, TCP_SYN | TCP_ACK).with_macs(LB_MAC, backend_mac(0));
    let data = Packet::tcp(client, vip, TCP_ACK | TCP_PSH)
        .with_macs(LB_MAC, CLIENT_MAC)
        .with_payload(b"POST /v1/completions HTTP/1.1\r\n\r\n");
    let fin = Packet::tcp(client, vip, TCP_FIN | TCP_ACK).with_macs(LB_MAC, CLIENT_MAC);
    let rst = Packet::tcp(backend, snat, TCP_RST | TCP_ACK).with_macs(LB_MAC, backend_mac(0));
    let table = [
        Case {
            name: "SYN: DNAT to the backend, SNAT keeps the client's port",
            input: syn.build(),
            verdict: XDP_TX,
            output: to_backend(&syn),
            reasons: &[reasons::TX],
        },
        Case {
            name: "SYN-ACK reply: translated back to VIP → client",
            input: syn_ack.build(),
            verdict: XDP_TX,
            output: to_client(&syn_ack),
            reasons: &[reasons::TX],
        },
        Case {
            name: "established data: connection-table hit",
            input: data.build(),
            verdict: XDP_TX,
            output: to_backend(&data),
            reasons: &[reasons::TX],
        },
        Case {
            name: "FIN: still forwarded, entry now closing",
            input: fin.build(),
            verdict: XDP_TX,
            output: to_backend(&fin),
            reasons: &[reasons::TX],
        },
        // The same 4-tuple reused: a new connection, same backend, same SNAT port.
        Case {
            name: "SYN on a closed 4-tuple: new flow on the same backend 4-tuple",
            input: syn.build(),
            verdict: XDP_TX,
            output: to_backend(&syn),
            reasons: &[reasons::TX],
        },
        Case {
            name: "RST from the backend: translated back",
            input: rst.build(),
            verdict: XDP_TX,
            output: to_client(&rst),
            reasons: &[reasons::TX],
        },
    ];
    for case in table {
        f.case(case);
    }

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
    // Only a confirmed flow holds its port against a newcomer, and only a
    // client's ACK of the backend's SYN-ACK confirms one.
    let syn_ack_a = Packet::tcp(backend, addr("198.18.0.1:45000"), TCP_SYN | TCP_ACK)
        .with_macs(LB_MAC, backend_mac(0));
    assert_eq!(f.run(&syn_ack_a.build()).0, XDP_TX);
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
        reasons: &[reasons::TX, reasons::SNAT_PORT_PROBED],
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
    let mut nock = Packet::udp(client, vip, b"again").with_macs(LB_MAC, CLIENT_MAC);
    nock.udp_no_checksum = true;
    let reply = Packet::udp(backend, snat, b"answer").with_macs(LB_MAC, backend_mac(0));
    let table = [
        Case {
            name: "UDP first packet: NAT with checksum",
            input: q.build(),
            verdict: XDP_TX,
            output: Output::Bytes(q.translated(snat, backend, backend_mac(0), LB_MAC).build()),
            reasons: &[reasons::TX],
        },
        Case {
            name: "UDP without checksum stays without",
            input: nock.build(),
            verdict: XDP_TX,
            output: Output::Bytes(
                nock.translated(snat, backend, backend_mac(0), LB_MAC)
                    .build(),
            ),
            // The backend has not answered yet: the flow stays half-open.
            reasons: &[reasons::TX, reasons::UNCONFIRMED],
        },
        Case {
            name: "UDP reply translated back",
            input: reply.build(),
            verdict: XDP_TX,
            output: Output::Bytes(reply.translated(vip, client, CLIENT_MAC, LB_MAC).build()),
            reasons: &[reasons::TX],
        },
    ];
    for case in table {
        f.case(case);
    }
}

#[test]
fn lru_miss_rehashes_to_the_same_backend() {
    // Both datapaths hash with one secret, as a restarted daemon keeps its
    // pinned one; each load would draw its own.
    let opts = || router::datapath::LoadOptions {
        table_size: 1021,
        flow_hash_key: Some([0x5eed_0001, 0x5eed_0002]),
        ..router::datapath::LoadOptions::default()
    };
    let mut f = Fixture::with_options(&[service("llama", VIP, 6, &[1, 1, 1])], opts());
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
    let mut f2 = Fixture::with_options(&[service("llama", VIP, 6, &[1, 1, 1])], opts());
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
    svc.backends[0].address = addr("198.18.0.44:8000").into();
    let mut f = Fixture::new(&[svc]);
    let client = addr("198.18.0.2:40000");
    let syn = Packet::tcp(client, addr(VIP), TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    // Translated but not a hop on: the stack forwards it, and takes one
    // from the TTL itself.
    let expected = syn
        .translated(
            addr("198.18.0.1:40000"),
            addr("198.18.0.44:8000"),
            LB_MAC,
            CLIENT_MAC,
        )
        .with_ttl(syn.ttl);
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
    svc.backends[0].address = addr("198.18.1.11:8000").into();
    svc.snat = vec![ip("198.18.1.1").into()];
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
