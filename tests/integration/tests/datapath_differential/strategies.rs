//! Sessions as proptest generates them: map state to seed, flows, and
//! packets well-formed or not.

use proptest::prelude::*;
use router_testkit::model::Table;

use super::world::*;

#[derive(Clone, Copy, Debug)]
pub(crate) enum Age {
    Fresh,
    /// Past the closing timeout, within both idle timeouts.
    Mid,
    /// Past the UDP idle timeout, within TCP's.
    Old,
    /// Past every timeout.
    Ancient,
}

impl Age {
    pub(crate) fn secs(self) -> u64 {
        AGES[self as usize]
    }
}

pub(crate) fn age() -> impl Strategy<Value = Age> {
    prop_oneof![
        6 => Just(Age::Fresh),
        1 => Just(Age::Mid),
        1 => Just(Age::Old),
        1 => Just(Age::Ancient),
    ]
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum HopSeed {
    None,
    /// Cached under the live generation, with whatever MACs and interface.
    Cached {
        mac: u8,
        ifindex: u8,
    },
    /// Cached under an older generation.
    Outdated,
}

pub(crate) fn hop_seed() -> impl Strategy<Value = HopSeed> {
    prop_oneof![
        3 => Just(HopSeed::None),
        2 => (any::<u8>(), 0u8..3).prop_map(|(mac, ifindex)| HopSeed::Cached { mac, ifindex }),
        1 => Just(HopSeed::Outdated),
    ]
}

/// How one seeded entry looks, apart from its key and translation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Placed {
    pub(crate) table: Table,
    pub(crate) age: Age,
    pub(crate) closing: bool,
    /// Subset of the CONN_AWAIT_* bits.
    pub(crate) awaits: u8,
    pub(crate) hop: HopSeed,
    /// CONN_COUNTED (meaningful on a forward entry; a reply entry's is
    /// never read).
    pub(crate) counted: bool,
    /// CONN_HEARD with `seq_next` at this offset from the default sequence
    /// number, or not heard.
    pub(crate) heard: Option<u32>,
}

pub(crate) fn table() -> impl Strategy<Value = Table> {
    prop_oneof![Just(Table::Conns), Just(Table::HalfOpen)]
}

pub(crate) fn placed() -> impl Strategy<Value = Placed> {
    (
        table(),
        age(),
        prop::bool::weighted(0.2),
        0u8..8,
        hop_seed(),
        prop::bool::weighted(0.75),
        prop::option::weighted(0.8, seq_offset()),
    )
        .prop_map(
            |(table, age, closing, awaits, hop, counted, heard)| Placed {
                table,
                age,
                closing,
                awaits,
                hop,
                counted,
                heard,
            },
        )
}

/// Whose reply a seeded reply entry is.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Owner {
    /// The flow's own.
    Own,
    /// Another client's, for the same VIP.
    Client(u8),
    /// Another VIP's.
    Vip(u8),
}

pub(crate) fn owner() -> impl Strategy<Value = Owner> {
    prop_oneof![
        6 => Just(Owner::Own),
        1 => any::<u8>().prop_map(Owner::Client),
        1 => any::<u8>().prop_map(Owner::Vip),
    ]
}

#[derive(Clone, Debug)]
pub(crate) enum Seed {
    /// Both directions of a flow (either may be missing: an eviction), on
    /// its Maglev pick or another backend, on the SNAT pair of a probe.
    Flow {
        flow: u8,
        backend: Option<u8>,
        attempt: u8,
        fwd: Option<Placed>,
        reply: Option<(Placed, Owner)>,
    },
    /// Something at `attempt`'s reply key of a flow's pick: another
    /// client's reply entry, or any entry at all.
    Squatter {
        flow: u8,
        attempt: u8,
        at: Placed,
        owner: Owner,
        reply: bool,
    },
    /// Other clients' reply entries on the first `upto` candidates of a
    /// flow's pick: deep probes and exhaustion.
    Wall { flow: u8, upto: u8, at: Placed },
    /// An entry at a flow's own key with an arbitrary translation.
    Odd {
        flow: u8,
        at: Placed,
        to: (u8, u8),
        reply: bool,
    },
}

pub(crate) fn seed() -> impl Strategy<Value = Seed> {
    prop_oneof![
        4 => (
            any::<u8>(),
            prop::option::weighted(0.2, any::<u8>()),
            prop_oneof![3 => Just(0u8), 1 => 1u8..=8],
            prop::option::weighted(0.85, placed()),
            prop::option::weighted(0.85, (placed(), owner())),
        )
            .prop_map(|(flow, backend, attempt, fwd, reply)| Seed::Flow {
                flow,
                backend,
                attempt,
                fwd,
                reply,
            }),
        2 => (any::<u8>(), 0u8..=8, placed(), owner(), prop::bool::weighted(0.8)).prop_map(
            |(flow, attempt, at, owner, reply)| Seed::Squatter {
                flow,
                attempt,
                at,
                owner,
                reply,
            }
        ),
        1 => (any::<u8>(), 1u8..=9, placed()).prop_map(|(flow, upto, at)| Seed::Wall {
            flow,
            upto,
            at
        }),
        1 => (any::<u8>(), placed(), any::<(u8, u8)>(), any::<bool>()).prop_map(
            |(flow, at, to, reply)| Seed::Odd {
                flow,
                at,
                to,
                reply
            }
        ),
    ]
}

/// A client's flow: (client, client port, destination), as pool indices.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FlowSpec {
    pub(crate) client: u8,
    pub(crate) port: u8,
    pub(crate) dest: u8,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Dir {
    /// Client to destination.
    Fwd,
    /// Backend to SNAT address, on the pair the flow's forward entry has,
    /// or else on the SNAT pair of a probe of its Maglev pick.
    Reply(u8),
    /// Some backend to a SNAT address and port of the pools.
    Stray(u8, u8),
    /// An ICMP message about a packet the LB sent: to the backend (the
    /// reverse of `Reply`'s tuple) or to the client (the reverse of `Fwd`'s).
    Icmp(IcmpSpec),
}

/// An ICMP message about one of a flow's packets, as a router on the way
/// or the endpoint itself sends it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IcmpSpec {
    /// About what the LB sent the backend (on `Reply(attempt)`'s pair),
    /// or else what it sent the client.
    pub(crate) backend_side: bool,
    pub(crate) attempt: u8,
    /// (type, code): mostly errors that are translated.
    pub(crate) kind: (u8, u8),
    /// Bytes of the quoted datagram (all of it if fewer).
    pub(crate) quote: u8,
    /// Sent by the endpoint itself, or by a router on the way.
    pub(crate) from_endpoint: bool,
    pub(crate) oddity: IcmpOddity,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum IcmpOddity {
    None,
    /// Sent to another of our addresses than the quoted packet's source.
    ElsewhereThan(u8),
    /// The quoted header carries this many words of options.
    QuoteOptions(u8),
    /// The quoted packet is a fragment: flags and offset.
    QuoteFrag(u16),
    /// The quoted packet is ICMP (an echo request).
    QuoteIcmp,
    /// The quoted header's first byte.
    QuoteVersionIhl(u8),
    /// Checksums XORed with these: the quoted IPv4 header's, the quoted
    /// transport's, the ICMP message's.
    BadQuotedIpChecksum(u16),
    BadQuotedL4Checksum(u16),
    BadIcmpChecksum(u16),
    /// The quoted UDP datagram has no checksum.
    QuoteUdpNoChecksum,
}

pub(crate) fn icmp_spec() -> impl Strategy<Value = IcmpSpec> {
    let kind = prop_oneof![
        4 => (0u8..16).prop_map(|code| (3u8, code)),
        2 => Just((3u8, 4u8)),
        2 => (0u8..2).prop_map(|code| (11u8, code)),
        1 => prop_oneof![Just((0u8, 0u8)), Just((8, 0)), Just((5, 1)), Just((12, 0)), Just((4, 0))],
        1 => any::<(u8, u8)>(),
    ];
    let quote = prop_oneof![
        4 => Just(255u8),
        2 => Just(28u8),
        1 => Just(37u8),
        1 => Just(38u8),
        2 => 29u8..80,
        2 => 0u8..28,
    ];
    let oddity = prop_oneof![
        24 => Just(IcmpOddity::None),
        2 => any::<u8>().prop_map(IcmpOddity::ElsewhereThan),
        1 => (1u8..=4).prop_map(IcmpOddity::QuoteOptions),
        1 => prop_oneof![Just(0x2000u16), Just(0x0010), Just(0x3fff), any::<u16>()]
            .prop_map(IcmpOddity::QuoteFrag),
        1 => Just(IcmpOddity::QuoteIcmp),
        1 => prop_oneof![Just(0x65u8), Just(0x44), Just(0x46), any::<u8>()]
            .prop_map(IcmpOddity::QuoteVersionIhl),
        1 => (1u16..).prop_map(IcmpOddity::BadQuotedIpChecksum),
        1 => (1u16..).prop_map(IcmpOddity::BadQuotedL4Checksum),
        1 => (1u16..).prop_map(IcmpOddity::BadIcmpChecksum),
        1 => Just(IcmpOddity::QuoteUdpNoChecksum),
    ];
    (
        any::<bool>(),
        prop_oneof![4 => Just(0u8), 1 => 1u8..=8],
        kind,
        quote,
        prop::bool::weighted(0.3),
        oddity,
    )
        .prop_map(
            |(backend_side, attempt, kind, quote, from_endpoint, oddity)| IcmpSpec {
                backend_side,
                attempt,
                kind,
                quote,
                from_endpoint,
                oddity,
            },
        )
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Mutation {
    None,
    /// Cut to 14 + n % (len - 14) bytes.
    Truncate(u8),
    Version(u8),
    Ihl(u8),
    /// Total length changed by this much.
    TotLen(i8),
    Doff(u8),
    /// UDP length changed by this much.
    UdpLen(i8),
    /// Flags and fragment offset.
    Frag(u16),
    /// IP options of this many words (1..=10).
    Options(u8),
    Proto(u8),
    EtherType(u16),
    /// Checksums XORed with these (a wrong checksum is carried, not fixed).
    BadIpChecksum(u16),
    BadL4Checksum(u16),
    /// Ethernet padding after the datagram.
    Padding(u8),
    UdpNoChecksum,
    /// The TCP sequence or acknowledgement number moved from the default
    /// by this much (near it, at the window's edges, or far away).
    Seq(u32),
    Ack(u32),
    Ttl(u8),
}

/// Offsets from the default sequence number: inside the datapath's
/// window, at its edges either side, and far outside.
fn seq_offset() -> impl Strategy<Value = u32> {
    const W: u32 = 1 << 20;
    prop_oneof![
        2 => (0u32..3000).prop_map(|d| d.wrapping_sub(1500)),
        1 => prop_oneof![Just(W), Just(W + 1), Just(W.wrapping_neg()), Just((W + 1).wrapping_neg())],
        2 => any::<u32>(),
    ]
}

pub(crate) fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        40 => Just(Mutation::None),
        2 => any::<u8>().prop_map(Mutation::Truncate),
        1 => any::<u8>().prop_map(Mutation::Version),
        2 => (0u8..16).prop_map(Mutation::Ihl),
        2 => any::<i8>().prop_map(Mutation::TotLen),
        2 => (0u8..16).prop_map(Mutation::Doff),
        2 => any::<i8>().prop_map(Mutation::UdpLen),
        1 => prop_oneof![Just(0x2000u16), Just(0x0010), Just(0x8000), Just(0x3fff), any::<u16>()]
            .prop_map(Mutation::Frag),
        1 => (1u8..=10).prop_map(Mutation::Options),
        1 => prop_oneof![Just(1u8), Just(47), Just(132), any::<u8>()].prop_map(Mutation::Proto),
        1 => prop_oneof![Just(0x86ddu16), Just(0x0806), Just(0x8100), any::<u16>()]
            .prop_map(Mutation::EtherType),
        2 => (1u16..).prop_map(Mutation::BadIpChecksum),
        2 => (1u16..).prop_map(Mutation::BadL4Checksum),
        2 => (1u8..40).prop_map(Mutation::Padding),
        2 => Just(Mutation::UdpNoChecksum),
        3 => seq_offset().prop_map(Mutation::Seq),
        3 => seq_offset().prop_map(Mutation::Ack),
        2 => prop_oneof![Just(0u8), Just(1), Just(2), any::<u8>()].prop_map(Mutation::Ttl),
    ]
}

#[derive(Clone, Debug)]
pub(crate) struct PacketSpec {
    pub(crate) flow: u8,
    pub(crate) dir: Dir,
    pub(crate) flags: u8,
    pub(crate) payload: u8,
    /// Arrives on arm 1 instead of arm 0.
    pub(crate) other_arm: bool,
    /// Applied in order.
    pub(crate) mutations: Vec<Mutation>,
}

pub(crate) const SYN: u8 = 0x02;
pub(crate) const ACK: u8 = 0x10;
pub(crate) const FIN: u8 = 0x01;
pub(crate) const RST: u8 = 0x04;
pub(crate) const PSH: u8 = 0x08;

pub(crate) fn tcp_flags() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => Just(SYN),
        2 => Just(SYN | ACK),
        4 => Just(ACK),
        3 => Just(ACK | PSH),
        2 => Just(FIN | ACK),
        1 => Just(RST),
        1 => Just(RST | ACK),
        1 => any::<u8>(),
    ]
}

/// A few well-formed packets of one flow that go together: how flows
/// start and end, so that every end of a count is met often.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Script {
    /// SYN, SYN-ACK, ACK: a confirmed flow.
    Handshake,
    /// A FIN from each side (and the last one's ACK).
    FinFin { client_first: bool },
    /// A RST from one side.
    Reset { from_client: bool },
    /// The client's FIN, then a SYN on the same port: a new connection.
    FinThenSyn,
}

pub(crate) fn script() -> impl Strategy<Value = Script> {
    prop_oneof![
        2 => Just(Script::Handshake),
        2 => any::<bool>().prop_map(|client_first| Script::FinFin { client_first }),
        1 => any::<bool>().prop_map(|from_client| Script::Reset { from_client }),
        1 => Just(Script::FinThenSyn),
    ]
}

impl Script {
    /// The packets of the script, for flow `flow`.
    pub(crate) fn packets(self, flow: u8) -> Vec<PacketSpec> {
        let p = |dir: Dir, flags: u8| PacketSpec {
            flow,
            dir,
            flags,
            payload: 0,
            other_arm: false,
            mutations: vec![Mutation::None],
        };
        let (fwd, back) = (Dir::Fwd, Dir::Reply(0));
        match self {
            Script::Handshake => vec![p(fwd, SYN), p(back, SYN | ACK), p(fwd, ACK)],
            Script::FinFin { client_first: true } => {
                vec![p(fwd, FIN | ACK), p(back, FIN | ACK), p(fwd, ACK)]
            }
            Script::FinFin {
                client_first: false,
            } => vec![p(back, FIN | ACK), p(fwd, FIN | ACK), p(back, ACK)],
            Script::Reset { from_client: true } => vec![p(fwd, RST)],
            Script::Reset { from_client: false } => vec![p(back, RST | ACK)],
            Script::FinThenSyn => vec![p(fwd, FIN | ACK), p(fwd, SYN)],
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Step {
    Packet(PacketSpec),
    /// Packets of one flow in a row.
    Script {
        flow: u8,
        script: Script,
    },
    /// The LRU drops one entry: the flow's forward entry or the reply
    /// entry it points at, from either table.
    Evict {
        flow: u8,
        reply: bool,
        table: Table,
    },
}

pub(crate) fn step() -> impl Strategy<Value = Step> {
    let packet = (
        any::<u8>(),
        prop_oneof![
            6 => Just(Dir::Fwd),
            3 => prop_oneof![4 => Just(0u8), 1 => 1u8..=8].prop_map(Dir::Reply),
            1 => any::<(u8, u8)>().prop_map(|(a, b)| Dir::Stray(a, b)),
            2 => icmp_spec().prop_map(Dir::Icmp),
        ],
        tcp_flags(),
        prop_oneof![3 => Just(0u8), 1 => 1u8..40],
        prop::bool::weighted(0.15),
        prop_oneof![
            3 => prop::collection::vec(mutation(), 1),
            1 => prop::collection::vec(mutation(), 2),
        ],
    )
        .prop_map(|(flow, dir, flags, payload, other_arm, mutations)| {
            Step::Packet(PacketSpec {
                flow,
                dir,
                flags,
                payload,
                other_arm,
                mutations,
            })
        });
    prop_oneof![
        17 => packet,
        3 => (any::<u8>(), script()).prop_map(|(flow, script)| Step::Script { flow, script }),
        1 => (any::<u8>(), any::<bool>(), table())
            .prop_map(|(flow, reply, table)| Step::Evict { flow, reply, table }),
    ]
}

/// A backend's in-flight counts at the start of a session.
#[derive(Clone, Copy, Debug)]
pub(crate) enum LoadSeed {
    /// `n` in flight, after `churn` flows that came and went.
    Flows { n: u8, churn: u8 },
    /// More ends than starts (an end raced a start): reads as 0.
    Negative { by: u8 },
    /// Past 2^32 − 1 in flight, which is what it compares as.
    Huge { extra: u8 },
}

pub(crate) fn load_seed() -> impl Strategy<Value = LoadSeed> {
    prop_oneof![
        8 => (0u8..6, prop_oneof![3 => Just(0u8), 1 => any::<u8>()])
            .prop_map(|(n, churn)| LoadSeed::Flows { n, churn }),
        2 => (6u8..=255).prop_map(|n| LoadSeed::Flows { n, churn: 0 }),
        1 => (1u8..=255).prop_map(|by| LoadSeed::Negative { by }),
        1 => any::<u8>().prop_map(|extra| LoadSeed::Huge { extra }),
    ]
}

/// Every watched backend's counts at the start: 0 to 3 in flight from a
/// pattern (none: all 0), then some backends' set one by one (an index
/// into the world's backend ids).
#[derive(Clone, Debug)]
pub(crate) struct LoadSeeds {
    pub(crate) pattern: Option<u32>,
    pub(crate) each: Vec<(u8, LoadSeed)>,
}

pub(crate) fn load_seeds() -> impl Strategy<Value = LoadSeeds> {
    (
        prop::option::weighted(0.6, any::<u32>()),
        prop::collection::vec((any::<u8>(), load_seed()), 0..=6),
    )
        .prop_map(|(pattern, each)| LoadSeeds { pattern, each })
}

#[derive(Clone, Debug)]
pub(crate) struct Session {
    /// The weight set of the tables and scan lists.
    pub(crate) weights: usize,
    /// The weight set the `BACKENDS` slots hold when it is another: an
    /// apply caught between writing the slots and flipping the tables.
    pub(crate) slots: Option<usize>,
    pub(crate) loads: LoadSeeds,
    pub(crate) flows: Vec<FlowSpec>,
    pub(crate) seeds: Vec<Seed>,
    pub(crate) steps: Vec<Step>,
}

pub(crate) fn session(dests: usize) -> impl Strategy<Value = Session> {
    let flow = (
        0..CLIENTS.len() as u8,
        0..CLIENT_PORTS.len() as u8,
        prop_oneof![
            3 => 0u8..SERVICES.len() as u8,
            1 => 0..dests as u8,
        ],
    )
        .prop_map(|(client, port, dest)| FlowSpec { client, port, dest });
    (
        prop_oneof![16 => Just(0usize), 1 => Just(1), 1 => Just(2)],
        // Mostly set 1's slots, which put half the large service at
        // weight 0 while set 0's table still holds them: a drain caught
        // mid-apply.
        prop::option::weighted(
            0.3,
            prop_oneof![1 => Just(0usize), 3 => Just(1), 1 => Just(2)],
        ),
        load_seeds(),
        prop::collection::vec(flow, 1..=6),
        prop::collection::vec(seed(), 0..=8),
        prop::collection::vec(step(), 1..=36),
    )
        .prop_map(|(weights, slots, loads, flows, seeds, steps)| Session {
            weights,
            slots: slots.filter(|s| *s != weights),
            loads,
            flows,
            seeds,
            steps,
        })
}
