//! Packets from off the path: someone who knows (or guesses) a flow's
//! 4-tuple but never sees its packets, so cannot know its sequence
//! numbers; packets with no TTL left; clients whose port the host's own
//! stack holds on the SNAT address.

use router_common::{CONN_CLOSING, reasons};
use router_testkit::{
    packet::{Packet, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, addr, ip},
    xdp_fixture::*,
};

use super::VIP;

/// The client's and the backend's initial sequence numbers.
const CLIENT_ISN: u32 = 1_000;
const BACKEND_ISN: u32 = 7_000_000;
/// Far outside any window around either.
const FAR: u32 = 0x4000_0000;

struct Flow {
    client: std::net::SocketAddrV4,
    vip: std::net::SocketAddrV4,
    backend: std::net::SocketAddrV4,
    snat: std::net::SocketAddrV4,
}

impl Flow {
    fn new(port: u16) -> Self {
        Self {
            client: std::net::SocketAddrV4::new(ip("198.18.0.2"), port),
            vip: addr(VIP),
            backend: addr("198.18.0.11:8000"),
            snat: std::net::SocketAddrV4::new(ip("198.18.0.1"), port),
        }
    }

    fn client_sends(&self, flags: u8, seq: u32, ack: u32) -> Packet {
        Packet::tcp(self.client, self.vip, flags)
            .with_seq(seq, ack)
            .with_macs(LB_MAC, CLIENT_MAC)
    }

    fn backend_sends(&self, flags: u8, seq: u32, ack: u32) -> Packet {
        Packet::tcp(self.backend, self.snat, flags)
            .with_seq(seq, ack)
            .with_macs(LB_MAC, backend_mac(0))
    }

    fn to_backend(&self, p: &Packet) -> Output {
        Output::Bytes(
            p.translated(self.snat, self.backend, backend_mac(0), LB_MAC)
                .build(),
        )
    }

    fn to_client(&self, p: &Packet) -> Output {
        Output::Bytes(
            p.translated(self.vip, self.client, CLIENT_MAC, LB_MAC)
                .build(),
        )
    }
}

fn conns(f: &Fixture) -> u64 {
    f.dp.conn_table().unwrap().scan().unwrap().entries
}

fn conn_flags(f: &mut Fixture, src: std::net::SocketAddrV4, dst: std::net::SocketAddrV4) -> u32 {
    table(f, "CONNS")
        .get(&conn_key(src, dst, 6), 0)
        .expect("entry")
        .flags
}

/// SYN, SYN-ACK, ACK with the ISNs above: a confirmed flow.
fn handshake(f: &mut Fixture, flow: &Flow) {
    let steps = [
        flow.client_sends(TCP_SYN, CLIENT_ISN, 0),
        flow.backend_sends(TCP_SYN | TCP_ACK, BACKEND_ISN, CLIENT_ISN + 1),
        flow.client_sends(TCP_ACK, CLIENT_ISN + 1, BACKEND_ISN + 1),
    ];
    for p in steps {
        assert_eq!(f.run(&p.build()).0, XDP_TX);
    }
    assert_eq!(conns(f), 2, "the handshake confirmed the flow");
}

#[test]
fn a_forged_rst_or_fin_out_of_window_changes_nothing_and_the_real_one_ends_the_flow() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let flow = Flow::new(42_000);
    handshake(&mut f, &flow);
    let request = flow
        .client_sends(TCP_ACK | TCP_PSH, CLIENT_ISN + 1, BACKEND_ISN + 1)
        .with_payload(&[b'p'; 100]);
    assert_eq!(f.run(&request.build()).0, XDP_TX);
    let response = flow
        .backend_sends(TCP_ACK | TCP_PSH, BACKEND_ISN + 1, CLIENT_ISN + 101)
        .with_payload(&[b't'; 50]);
    assert_eq!(f.run(&response.build()).0, XDP_TX);

    // Forged from both ends, far from what each side has sent. They are
    // forwarded (the endpoint's stack judges them too) and change nothing.
    let forged = [
        (
            "a RST as from the client",
            flow.client_sends(TCP_RST, CLIENT_ISN + 101 + FAR, 0),
            true,
        ),
        (
            "a FIN as from the client",
            flow.client_sends(
                TCP_FIN | TCP_ACK,
                (CLIENT_ISN + 101).wrapping_sub(FAR),
                BACKEND_ISN + 51,
            ),
            true,
        ),
        (
            "a RST as from the backend, to the SNAT address",
            flow.backend_sends(TCP_RST | TCP_ACK, BACKEND_ISN + 51 + FAR, CLIENT_ISN + 101),
            false,
        ),
    ];
    for (name, p, client_side) in &forged {
        let output = if *client_side {
            flow.to_backend(p)
        } else {
            flow.to_client(p)
        };
        f.case(Case {
            name,
            input: p.build(),
            verdict: XDP_TX,
            output,
            reasons: &[reasons::TX, reasons::TCP_OUT_OF_WINDOW],
        });
    }
    assert_eq!(
        conn_flags(&mut f, flow.client, flow.vip) & CONN_CLOSING,
        0,
        "the client's direction is not closing"
    );
    assert_eq!(
        conn_flags(&mut f, flow.backend, flow.snat) & CONN_CLOSING,
        0,
        "the backend's direction is not closing"
    );
    assert_eq!(f.in_flight("llama", "b0"), 1, "the flow is still counted");

    // The stream goes on both ways.
    let more = flow
        .backend_sends(TCP_ACK | TCP_PSH, BACKEND_ISN + 51, CLIENT_ISN + 101)
        .with_payload(&[b't'; 50]);
    f.case(Case {
        name: "the backend's next segment still reaches the client",
        input: more.build(),
        verdict: XDP_TX,
        output: flow.to_client(&more),
        reasons: &[reasons::TX],
    });

    // The client's own RST carries its next sequence number.
    let rst = flow.client_sends(TCP_RST, CLIENT_ISN + 101, 0);
    f.case(Case {
        name: "the client's real RST",
        input: rst.build(),
        verdict: XDP_TX,
        output: flow.to_backend(&rst),
        reasons: &[reasons::TX],
    });
    assert_ne!(
        conn_flags(&mut f, flow.client, flow.vip) & CONN_CLOSING,
        0,
        "the real RST marks the flow closing"
    );
    assert_eq!(f.in_flight("llama", "b0"), 0, "the real RST ends the flow");
}

#[test]
fn blind_acks_confirm_no_half_open_flow_and_the_real_one_does() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let flow = Flow::new(42_100);
    let syn = flow.client_sends(TCP_SYN, CLIENT_ISN, 0);
    assert_eq!(f.run(&syn.build()).0, XDP_TX);
    // Before the backend answers, even the ACK that will be right later
    // proves nothing: there is nothing to acknowledge yet.
    let early = flow.client_sends(TCP_ACK, CLIENT_ISN + 1, BACKEND_ISN + 1);
    f.case(Case {
        name: "an ACK before the SYN-ACK",
        input: early.build(),
        verdict: XDP_TX,
        output: flow.to_backend(&early),
        reasons: &[reasons::TX, reasons::UNCONFIRMED],
    });
    let syn_ack = flow.backend_sends(TCP_SYN | TCP_ACK, BACKEND_ISN, CLIENT_ISN + 1);
    assert_eq!(f.run(&syn_ack.build()).0, XDP_TX);

    // A blind attacker's guesses: spread over the sequence space, and one
    // past what the backend has sent.
    let mut guesses: Vec<u32> = (0..500u32)
        .map(|i| i.wrapping_mul(0x9e37_79b9) ^ 0x5555_0000)
        .filter(|a| BACKEND_ISN.wrapping_add(1).wrapping_sub(*a) > 1 << 20)
        .collect();
    guesses.push(BACKEND_ISN + 2);
    for ack in &guesses {
        let p = flow.client_sends(TCP_ACK, CLIENT_ISN + 1, *ack);
        let before = f.reasons();
        assert_eq!(f.run(&p.build()).0, XDP_TX, "ack {ack:#x} is forwarded");
        let after = f.reasons();
        assert_eq!(
            after[reasons::UNCONFIRMED as usize] - before[reasons::UNCONFIRMED as usize],
            1,
            "ack {ack:#x} is counted unconfirmed"
        );
    }
    assert_eq!(conns(&f), 0, "no blind ACK confirmed the flow");
    let real = flow.client_sends(TCP_ACK, CLIENT_ISN + 1, BACKEND_ISN + 1);
    f.case(Case {
        name: "the client's real ACK",
        input: real.build(),
        verdict: XDP_TX,
        output: flow.to_backend(&real),
        reasons: &[reasons::TX],
    });
    assert_eq!(conns(&f), 2, "the real ACK confirmed it");
}

#[test]
fn a_packet_with_no_ttl_to_spare_is_not_forwarded() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let flow = Flow::new(42_200);
    for ttl in [0, 1] {
        let syn = flow.client_sends(TCP_SYN, CLIENT_ISN, 0).with_ttl(ttl);
        f.case(Case {
            name: "a SYN with TTL 0 or 1",
            input: syn.build(),
            verdict: XDP_DROP,
            output: Output::Unchanged,
            reasons: &[reasons::DROP_TTL_EXPIRED],
        });
    }
    assert_eq!(f.in_flight("llama", "b0"), 0, "no flow was opened");
    let syn = flow.client_sends(TCP_SYN, CLIENT_ISN, 0).with_ttl(2);
    f.case(Case {
        name: "TTL 2: forwarded with 1",
        input: syn.build(),
        verdict: XDP_TX,
        output: flow.to_backend(&syn),
        reasons: &[reasons::TX],
    });
    let late = flow
        .backend_sends(TCP_SYN | TCP_ACK, BACKEND_ISN, CLIENT_ISN + 1)
        .with_ttl(1);
    f.case(Case {
        name: "a tracked flow's packet with TTL 1",
        input: late.build(),
        verdict: XDP_DROP,
        output: Output::Unchanged,
        reasons: &[reasons::DROP_TTL_EXPIRED],
    });
}

#[test]
fn a_client_port_the_host_holds_on_the_snat_address_is_not_taken() {
    let mut f = Fixture::new(&[
        service("llama", VIP, 6, &[1]),
        service("dns-ish", "198.18.100.2:5353", 17, &[1]),
    ]);
    // The host's own sockets on the SNAT address (a health probe, say):
    // the backend's answers on those 4-tuples are the host's.
    let _tcp = std::net::TcpListener::bind("198.18.0.1:42300").unwrap();
    let _udp = std::net::UdpSocket::bind("198.18.0.1:42301").unwrap();
    let tcp =
        Packet::tcp(addr("198.18.0.2:42300"), addr(VIP), TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    let udp = Packet::udp(addr("198.18.0.2:42301"), addr("198.18.100.2:5353"), b"q")
        .with_macs(LB_MAC, CLIENT_MAC);
    for (name, p) in [("TCP", &tcp), ("UDP", &udp)] {
        let out = f.case(Case {
            name,
            input: p.build(),
            verdict: XDP_TX,
            output: Output::Unchecked,
            reasons: &[reasons::TX, reasons::SNAT_PORT_PROBED],
        });
        let port = u16::from_be_bytes([out[34], out[35]]);
        assert!(
            (10_000..=32_767).contains(&port),
            "{name}: the client's port, held by a host socket, was probed past: got {port}"
        );
    }
    // A port no host socket holds is kept.
    let free =
        Packet::tcp(addr("198.18.0.2:42302"), addr(VIP), TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    let out = f.case(Case {
        name: "a port no host socket holds",
        input: free.build(),
        verdict: XDP_TX,
        output: Output::Unchecked,
        reasons: &[reasons::TX],
    });
    assert_eq!(u16::from_be_bytes([out[34], out[35]]), 42_302);
}
