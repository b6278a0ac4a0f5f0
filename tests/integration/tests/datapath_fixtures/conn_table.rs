//! The connection table's edge cases: entries the LRU dropped, expired or
//! half-open flows, ports taken back and reused, drained backends.

use router::datapath::LoadOptions;
use router_common::reasons;
use router_testkit::{
    packet::{Packet, TCP_ACK, TCP_PSH, TCP_RST, TCP_SYN, addr, ip},
    xdp_fixture::*,
};

use super::VIP;

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
        half_open.remove(&conn_key(backend, snat, 6)).unwrap();
    }
    let syn_ack = Packet::tcp(backend, snat, TCP_SYN | TCP_ACK).with_macs(LB_MAC, backend_mac(0));
    let table = [
        Case {
            name: "SYN-ACK without its entry: dropped, not reset by the host",
            input: syn_ack.build(),
            verdict: XDP_DROP,
            output: Output::Unchanged,
            reasons: &[reasons::DROP_NO_REPLY_ENTRY],
        },
        Case {
            name: "the client's retransmitted SYN starts the flow over, on its own port",
            input: syn.build(),
            verdict: XDP_TX,
            output: Output::Bytes(to_backend),
            reasons: &[reasons::TX],
        },
        Case {
            name: "the backend's SYN-ACK finds the new reply entry",
            input: syn_ack.build(),
            verdict: XDP_TX,
            output: Output::Bytes(syn_ack.translated(vip, client, CLIENT_MAC, LB_MAC).build()),
            reasons: &[reasons::TX],
        },
    ];
    for case in table {
        f.case(case);
    }
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
    let client = addr("198.18.0.2:40400");
    // A spoofed SYN from another source with the same port holds the SNAT
    // port (the backend 4-tuple) that the client's flow had before the LRU
    // dropped both of its entries.
    let spoof = Packet::tcp(addr("198.19.0.9:40400"), vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    let data = Packet::tcp(client, vip, TCP_ACK | TCP_PSH)
        .with_macs(LB_MAC, CLIENT_MAC)
        .with_payload(b"more of the request");
    let reply = Packet::tcp(backend, snat, TCP_ACK).with_macs(LB_MAC, backend_mac(0));
    let table = [
        Case {
            name: "spoofed SYN takes port 40400",
            input: spoof.build(),
            verdict: XDP_TX,
            output: Output::Bytes(
                spoof
                    .translated(snat, backend, backend_mac(0), LB_MAC)
                    .build(),
            ),
            reasons: &[reasons::TX],
        },
        Case {
            name: "the client's mid-stream packet gets its backend 4-tuple back",
            input: data.build(),
            verdict: XDP_TX,
            output: Output::Bytes(
                data.translated(snat, backend, backend_mac(0), LB_MAC)
                    .build(),
            ),
            reasons: &[reasons::TX, reasons::LRU_MISS],
        },
        Case {
            name: "the backend's reply goes to the client, not the spoofed source",
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
    // The backend, which still has the connection, answers; only a client
    // packet that acknowledges the answer proves the flow.
    let answer = Packet::tcp(backend, snat, TCP_ACK | TCP_PSH)
        .with_macs(LB_MAC, backend_mac(0))
        .with_payload(b"tokens");
    f.case(Case {
        name: "the backend's answer goes through the half-open flow",
        input: answer.build(),
        verdict: XDP_TX,
        output: Output::Bytes(answer.translated(vip, client, CLIENT_MAC, LB_MAC).build()),
        reasons: &[reasons::TX],
    });
    assert_eq!(entries(&f), 0, "the backend's answer confirms nothing");
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
    let syn_ack = Packet::tcp(backend, snat, TCP_SYN | TCP_ACK).with_macs(LB_MAC, backend_mac(0));
    for p in [
        Packet::tcp(first, vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC),
        syn_ack,
        Packet::tcp(first, vip, TCP_ACK).with_macs(LB_MAC, CLIENT_MAC),
    ] {
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
        table(&mut f, "CONNS").get(&conn_key(b0, snat, 6), 0).ok(),
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
        .get(&conn_key(backend, snat, 6), 0)
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
        // The SYN-ACK comes back to whichever SNAT port the SYN got.
        let port = u16::from_be_bytes([out[34], out[35]]);
        let snat = std::net::SocketAddrV4::new(ip("198.18.0.1"), port);
        let syn_ack =
            Packet::tcp(backend, snat, TCP_SYN | TCP_ACK).with_macs(LB_MAC, backend_mac(0));
        assert_eq!(f.run(&syn_ack.build()).0, XDP_TX);
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
        conns.remove(&conn_key(a, vip, 6)).unwrap();
        conns
            .remove(&conn_key(backend, addr("198.18.0.1:41100"), 6))
            .unwrap();
        conns.remove(&conn_key(b, vip, 6)).unwrap();
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
