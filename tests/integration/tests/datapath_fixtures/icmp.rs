//! ICMP errors about tracked flows: translated in both directions from
//! their quoted header, as Linux IPVS does in NAT mode. The expected
//! frames are built from scratch (`Packet::icmp_error` about the packet
//! the other end sent or received), so every checksum, the outer and quoted
//! IPv4 headers', the quoted TCP or UDP one and the ICMP one, is checked
//! against a full computation, not the datapath's incremental one.
//! Errors change no connection state, and are forwarded one router hop on
//! (TTL checked and taken one from) like the flow's packets; anything that
//! is not an error about a flow that owns it passes, with its own counter.

use std::net::Ipv4Addr;

use router_common::{ConnEntry, reasons};
use router_testkit::{
    packet::{Packet, TCP_ACK, TCP_PSH, TCP_SYN, addr, ip},
    xdp_fixture::*,
};

use super::VIP;

const DEST_UNREACH: u8 = 3;
const TIME_EXCEEDED: u8 = 11;
const FRAG_NEEDED: (u8, u8) = (DEST_UNREACH, 4);
/// The next-hop MTU a "fragmentation needed" carries.
const MTU_1280: [u8; 4] = [0, 0, 0x05, 0x00];
/// What Linux quotes at most: 576 bytes of error, less its two headers.
const LINUX_QUOTE: usize = 548;

/// A router between the LB and the backends, and one on the clients' side.
fn backend_side_router() -> Ipv4Addr {
    ip("198.18.0.250")
}
fn client_side_router() -> Ipv4Addr {
    ip("198.18.0.3")
}

/// Both connection tables, in a stable order; with `hops` false, the
/// cached next hop is left out (an error resolves the hop of an entry that
/// had none cached, like any packet; that is no connection state).
fn tables(f: &mut Fixture, hops: bool) -> Vec<(&'static str, String, ConnEntry)> {
    let mut out = Vec::new();
    for name in ["CONNS", "HALF_OPEN"] {
        for kv in table(f, name).iter() {
            let (k, e) = kv.unwrap();
            let e = if hops {
                e
            } else {
                ConnEntry {
                    dmac: [0; 6],
                    smac: [0; 6],
                    ifindex: 0,
                    fib_gen: 0,
                    ..e
                }
            };
            out.push((name, format!("{k:?}"), e));
        }
    }
    out.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    out
}

/// Runs `c`, a translated error, and checks that no connection state moved.
fn translated(f: &mut Fixture, c: Case<'_>) {
    let name = c.name.to_string();
    let before = tables(f, false);
    f.case(c);
    assert_eq!(tables(f, false), before, "{name}: connection state changed");
}

/// Runs `c`, a packet that passes or drops, and checks that nothing in the
/// tables moved, not even a cached next hop.
fn untouched(f: &mut Fixture, c: Case<'_>) {
    let name = c.name.to_string();
    let before = tables(f, true);
    f.case(c);
    assert_eq!(tables(f, true), before, "{name}: the tables changed");
}

/// The error as the LB sends it on: one router hop on.
fn hop_on(mut p: Packet) -> Packet {
    p.ttl -= 1;
    p
}

/// Packet `original` as an error's quote shows it once translated back:
/// its own addresses and ports, with the TTL of the copy that was quoted
/// (`copy`, the packet as the LB sent it on), which the LB leaves alone.
fn quoted_as(original: &Packet, copy: &Packet) -> Packet {
    Packet {
        ttl: copy.ttl,
        ..original.clone()
    }
}

fn pass(name: &'static str, input: Packet, reasons: &'static [u32]) -> Case<'static> {
    Case {
        name,
        input: input.build(),
        verdict: XDP_PASS,
        output: Output::Unchanged,
        reasons,
    }
}

fn dropped(name: &'static str, input: Packet) -> Case<'static> {
    Case {
        name,
        input: input.build(),
        verdict: XDP_DROP,
        output: Output::Unchanged,
        reasons: &[reasons::DROP_MALFORMED],
    }
}

#[test]
fn tcp_fragmentation_needed_reaches_either_end_translated() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let client = addr("198.18.0.2:40000");
    let backend = addr("198.18.0.11:8000");
    let snat = addr("198.18.0.1:40000");
    let vip = addr(VIP);
    let request = Packet::tcp(client, vip, TCP_ACK | TCP_PSH)
        .with_macs(LB_MAC, CLIENT_MAC)
        .with_payload(&[b'q'; 1200]);
    let response = Packet::tcp(backend, snat, TCP_ACK | TCP_PSH)
        .with_macs(LB_MAC, backend_mac(0))
        .with_payload(&[b'r'; 1200]);
    let syn = Packet::tcp(client, vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    let syn_ack = Packet::tcp(backend, snat, TCP_SYN | TCP_ACK).with_macs(LB_MAC, backend_mac(0));
    let ack = Packet::tcp(client, vip, TCP_ACK).with_macs(LB_MAC, CLIENT_MAC);
    let to_backend = |p: &Packet| p.translated(snat, backend, backend_mac(0), LB_MAC);
    let to_client = |p: &Packet| p.translated(vip, client, CLIENT_MAC, LB_MAC);
    for (name, p, out) in [
        ("SYN", &syn, to_backend(&syn)),
        ("SYN-ACK", &syn_ack, to_client(&syn_ack)),
        ("ACK: the flow is confirmed", &ack, to_backend(&ack)),
        ("a large request", &request, to_backend(&request)),
        ("a large response", &response, to_client(&response)),
    ] {
        f.case(Case {
            name,
            input: p.build(),
            verdict: XDP_TX,
            output: Output::Bytes(out.build()),
            reasons: &[reasons::TX],
        });
    }

    // The backend's path has a smaller MTU: a router there answers the
    // request the LB sent (SNAT → backend) with "fragmentation needed",
    // quoting 548 bytes of it, whole TCP header and checksum included.
    let sent = to_backend(&request);
    translated(
        &mut f,
        Case {
            name: "fragmentation needed from the backend's side: to the client, about what it sent",
            input: Packet::icmp_error(
                backend_side_router(),
                &sent,
                FRAG_NEEDED,
                MTU_1280,
                LINUX_QUOTE,
            )
            .with_macs(LB_MAC, backend_mac(0))
            .build(),
            verdict: XDP_TX,
            output: Output::Bytes(
                hop_on(Packet::icmp_error(
                    *vip.ip(),
                    &quoted_as(&request, &sent),
                    FRAG_NEEDED,
                    MTU_1280,
                    LINUX_QUOTE,
                ))
                .with_macs(CLIENT_MAC, LB_MAC)
                .build(),
            ),
            reasons: &[reasons::TX],
        },
    );

    // A tunnel on the client's side: its gateway answers the response the
    // LB sent (VIP → client).
    let delivered = to_client(&response);
    translated(
        &mut f,
        Case {
            name: "fragmentation needed from the client's side: to the backend, about what it sent",
            input: Packet::icmp_error(
                client_side_router(),
                &delivered,
                FRAG_NEEDED,
                MTU_1280,
                LINUX_QUOTE,
            )
            .with_macs(LB_MAC, CLIENT2_MAC)
            .build(),
            verdict: XDP_TX,
            output: Output::Bytes(
                hop_on(Packet::icmp_error(
                    *snat.ip(),
                    &quoted_as(&response, &delivered),
                    FRAG_NEEDED,
                    MTU_1280,
                    LINUX_QUOTE,
                ))
                .with_macs(backend_mac(0), LB_MAC)
                .build(),
            ),
            reasons: &[reasons::TX],
        },
    );

    // The flow goes on as before.
    f.case(Case {
        name: "the next request",
        input: request.build(),
        verdict: XDP_TX,
        output: Output::Bytes(to_backend(&request).build()),
        reasons: &[reasons::TX],
    });
    let st = f.dp.status().unwrap();
    assert_eq!(st.services[0].counters.new_conns, 1, "one connection");
    assert_eq!(
        st.services[0].counters.reply_packets, 3,
        "the SYN-ACK, the response and the error from the backend's side"
    );
}

#[test]
fn udp_port_unreachable_reaches_the_client() {
    let vip = addr("198.18.100.2:5353");
    let mut f = Fixture::new(&[service("dns", "198.18.100.2:5353", 17, &[1])]);
    let backend = addr("198.18.0.11:8000");
    // One client with a UDP checksum, one without; each flow is half-open
    // (one datagram), so its reply entry is in HALF_OPEN.
    let with_sum =
        Packet::udp(addr("198.18.0.2:33333"), vip, b"query").with_macs(LB_MAC, CLIENT_MAC);
    let mut without =
        Packet::udp(addr("198.18.0.3:33334"), vip, b"query?").with_macs(LB_MAC, CLIENT2_MAC);
    without.udp_no_checksum = true;
    for (query, snat, mac) in [
        (&with_sum, addr("198.18.0.1:33333"), CLIENT_MAC),
        (&without, addr("198.18.0.1:33334"), CLIENT2_MAC),
    ] {
        let sent = query.translated(snat, backend, backend_mac(0), LB_MAC);
        f.case(Case {
            name: "query",
            input: query.build(),
            verdict: XDP_TX,
            output: Output::Bytes(sent.build()),
            reasons: &[reasons::TX],
        });
        // Nothing listens on the backend: its stack quotes the whole datagram.
        translated(
            &mut f,
            Case {
                name: if query.udp_no_checksum {
                    "port unreachable, no UDP checksum: quoted 0 stays 0"
                } else {
                    "port unreachable from the backend: to the client, about its query"
                },
                input: Packet::icmp_error(
                    *backend.ip(),
                    &sent,
                    (DEST_UNREACH, 3),
                    [0; 4],
                    LINUX_QUOTE,
                )
                .with_macs(LB_MAC, backend_mac(0))
                .build(),
                verdict: XDP_TX,
                output: Output::Bytes(
                    hop_on(Packet::icmp_error(
                        *vip.ip(),
                        &quoted_as(query, &sent),
                        (DEST_UNREACH, 3),
                        [0; 4],
                        LINUX_QUOTE,
                    ))
                    .with_macs(mac, LB_MAC)
                    .build(),
                ),
                reasons: &[reasons::TX],
            },
        );
    }
}

#[test]
fn time_exceeded_for_a_half_open_flow_reaches_the_backend() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let client = addr("198.18.0.2:40100");
    let backend = addr("198.18.0.11:8000");
    let snat = addr("198.18.0.1:40100");
    let vip = addr(VIP);
    let syn = Packet::tcp(client, vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    let mut syn_ack =
        Packet::tcp(backend, snat, TCP_SYN | TCP_ACK).with_macs(LB_MAC, backend_mac(0));
    // The LB takes one from its TTL: it leaves with 1, which the next
    // router cannot forward.
    syn_ack.ttl = 2;
    let delivered = syn_ack.translated(vip, client, CLIENT_MAC, LB_MAC);
    for (name, p, out) in [
        (
            "SYN",
            &syn,
            syn.translated(snat, backend, backend_mac(0), LB_MAC),
        ),
        ("SYN-ACK, TTL 2", &syn_ack, delivered.clone()),
    ] {
        f.case(Case {
            name,
            input: p.build(),
            verdict: XDP_TX,
            output: Output::Bytes(out.build()),
            reasons: &[reasons::TX],
        });
    }
    // A router on the client's side drops the SYN-ACK and quotes its IP
    // header and 8 bytes: the ports, but not the TCP checksum.
    translated(
        &mut f,
        Case {
            name: "time exceeded, 8 quoted bytes, half-open flow: to the backend",
            input: Packet::icmp_error(
                client_side_router(),
                &delivered,
                (TIME_EXCEEDED, 0),
                [0; 4],
                28,
            )
            .with_macs(LB_MAC, CLIENT2_MAC)
            .build(),
            verdict: XDP_TX,
            output: Output::Bytes(
                hop_on(Packet::icmp_error(
                    *snat.ip(),
                    &quoted_as(&syn_ack, &delivered),
                    (TIME_EXCEEDED, 0),
                    [0; 4],
                    28,
                ))
                .with_macs(backend_mac(0), LB_MAC)
                .build(),
            ),
            reasons: &[reasons::TX],
        },
    );
    // Still half-open: an error confirms nothing.
    assert!(
        table(&mut f, "CONNS").keys().next().is_none(),
        "an error moved the flow to CONNS"
    );
}

#[test]
fn errors_no_flow_owns_other_icmp_and_cut_quotes_are_not_translated() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let client = addr("198.18.0.2:40200");
    let backend = addr("198.18.0.11:8000");
    let snat = addr("198.18.0.1:40200");
    let vip = addr(VIP);
    let syn = Packet::tcp(client, vip, TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    let syn_ack = Packet::tcp(backend, snat, TCP_SYN | TCP_ACK).with_macs(LB_MAC, backend_mac(0));
    let ack = Packet::tcp(client, vip, TCP_ACK).with_macs(LB_MAC, CLIENT_MAC);
    for p in [&syn, &syn_ack, &ack] {
        f.run(&p.build());
    }
    let sent = ack.translated(snat, backend, backend_mac(0), LB_MAC);
    let delivered = syn_ack.translated(vip, client, CLIENT_MAC, LB_MAC);
    let router = backend_side_router();
    let unreachable = (DEST_UNREACH, 1);
    let from_backend_side = |about: &Packet, quote: usize| {
        Packet::icmp_error(router, about, unreachable, [0; 4], quote)
            .with_macs(LB_MAC, backend_mac(0))
    };
    let about_nobody = Packet::tcp(addr("198.18.0.1:50000"), backend, TCP_SYN);
    let mut with_options = sent.clone();
    with_options.ip_options = vec![0x01, 0x01, 0x01, 0x00];
    let mut later_fragment = sent.clone();
    later_fragment.frag = 0x0010;
    let ping_from_snat = Packet::icmp(*snat.ip(), *backend.ip(), (8, 0), [0, 1, 0, 1], b"ping");
    let mut version_6 = sent.datagram();
    version_6[0] = 0x65;
    let mut icmp_cut = Packet::tcp(addr("198.18.0.2:0"), addr("198.18.0.1:0"), 0);
    icmp_cut.proto = 1;
    icmp_cut.payload = vec![DEST_UNREACH, 1, 0, 0];

    let untracked: &[u32] = &[reasons::PASS_ICMP_UNTRACKED];
    let other: &[u32] = &[reasons::PASS_ICMP_OTHER];
    let cases = [
        pass(
            "an error about a flow nobody has",
            from_backend_side(&about_nobody, LINUX_QUOTE),
            untracked,
        ),
        pass(
            "an error about the flow, addressed to the VIP instead of the quote's source",
            Packet::icmp(router, *vip.ip(), unreachable, [0; 4], &sent.datagram())
                .with_macs(LB_MAC, backend_mac(0)),
            untracked,
        ),
        pass(
            "a quote with IP options",
            from_backend_side(&with_options, LINUX_QUOTE),
            untracked,
        ),
        pass(
            "a quoted later fragment",
            from_backend_side(&later_fragment, LINUX_QUOTE),
            untracked,
        ),
        pass(
            "an error about ICMP",
            from_backend_side(&ping_from_snat, LINUX_QUOTE),
            untracked,
        ),
        pass(
            "echo request to the VIP",
            Packet::icmp(*client.ip(), *vip.ip(), (8, 0), [0, 7, 0, 1], b"ping")
                .with_macs(LB_MAC, CLIENT_MAC),
            other,
        ),
        pass(
            "echo reply to the SNAT address",
            Packet::icmp(*backend.ip(), *snat.ip(), (0, 0), [0, 7, 0, 1], b"pong")
                .with_macs(LB_MAC, backend_mac(0)),
            other,
        ),
        pass(
            "a redirect about the flow",
            Packet::icmp_error(router, &sent, (5, 1), [198, 18, 0, 12], LINUX_QUOTE)
                .with_macs(LB_MAC, backend_mac(0)),
            other,
        ),
        dropped("an ICMP header cut short", icmp_cut),
        dropped(
            "an error quoting the IPv4 header and 4 bytes",
            from_backend_side(&sent, 24),
        ),
        dropped(
            "an error quoting half an IPv4 header",
            from_backend_side(&sent, 10),
        ),
        dropped(
            "an error quoting version 6",
            Packet::icmp(router, *snat.ip(), unreachable, [0; 4], &version_6)
                .with_macs(LB_MAC, backend_mac(0)),
        ),
    ];
    for case in cases {
        untouched(&mut f, case);
    }

    // A forward entry whose reply entry is gone: its backend 4-tuple may be
    // another flow's by now, so the client's error goes nowhere.
    let client_error =
        Packet::icmp_error(client_side_router(), &delivered, unreachable, [0; 4], 28)
            .with_macs(LB_MAC, CLIENT2_MAC);
    translated(
        &mut f,
        Case {
            name: "the client's side, the flow whole: translated",
            input: client_error.build(),
            verdict: XDP_TX,
            output: Output::Bytes(
                hop_on(Packet::icmp_error(
                    *snat.ip(),
                    &quoted_as(&syn_ack, &delivered),
                    unreachable,
                    [0; 4],
                    28,
                ))
                .with_macs(backend_mac(0), LB_MAC)
                .build(),
            ),
            reasons: &[reasons::TX],
        },
    );
    let mut last_hop = client_error.clone();
    last_hop.ttl = 1;
    untouched(
        &mut f,
        Case {
            name: "the client's side, TTL 1: not forwarded, as the flow's own packets",
            input: last_hop.build(),
            verdict: XDP_DROP,
            output: Output::Unchanged,
            reasons: &[reasons::DROP_TTL_EXPIRED],
        },
    );
    table(&mut f, "CONNS")
        .remove(&conn_key(backend, snat, 6))
        .expect("the flow's reply entry");
    untouched(
        &mut f,
        pass(
            "the client's side, the flow's reply entry gone",
            client_error,
            untracked,
        ),
    );
    let st = f.dp.status().unwrap();
    assert_eq!(st.services[0].counters.new_conns, 1, "no error made a flow");
}
