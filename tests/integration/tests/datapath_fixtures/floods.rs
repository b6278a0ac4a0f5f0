//! Floods from spoofed sources against a small connection table: half-open
//! flows churn, established ones are never evicted.

use router::datapath::LoadOptions;
use router_common::reasons;
use router_testkit::{
    packet::{Packet, TCP_ACK, TCP_PSH, TCP_SYN, addr},
    xdp_fixture::*,
};

use super::VIP;

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
    let answer = Packet::udp(backend, snat, b"answer").with_macs(LB_MAC, backend_mac(0));
    for _ in 0..2 {
        assert_eq!(f.run(&q.build()).0, XDP_TX);
    }
    assert_eq!(
        entries(&f),
        0,
        "a second datagram before the backend answered proves nothing"
    );
    assert_eq!(f.run(&answer.build()).0, XDP_TX);
    assert_eq!(f.run(&q.build()).0, XDP_TX);
    assert_eq!(
        entries(&f),
        2,
        "the client's datagram after the backend's answer confirmed it"
    );
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
