//! Resolving a session's seeds against the world: each flow's key, its
//! backend and hops, the seeded table entries, the frames (and their
//! byte-level mutations) and the weight sets, applied to both sides.

use std::net::SocketAddrV4;

use router_common::{
    CONN_AWAIT_REQUEST, CONN_AWAIT_RESPONSE, CONN_AWAIT_SYNACK, CONN_CLOSING, CONN_COUNTED,
    CONN_HEARD, CONN_REPLY, ConnKey, ServiceKey,
};
use router_testkit::{
    model::{self, Config, Entry, Hop, Model, Table, Tuple},
    packet::{DEFAULT_SEQ, Packet},
};

use super::{strategies::*, world::*};

/// A flow's key and, if it goes to a service, that service's index.
pub(crate) fn flow_key(w: &World, f: &FlowSpec) -> (ConnKey, Option<usize>) {
    let d = w.dests[usize::from(f.dest) % w.dests.len()];
    let key = ConnKey {
        src_addr: wire(CLIENTS[usize::from(f.client) % CLIENTS.len()]),
        dst_addr: d.addr,
        src_port: CLIENT_PORTS[usize::from(f.port) % CLIENT_PORTS.len()].to_be(),
        dst_port: d.port.to_be(),
        proto: if d.proto == 1 { 6 } else { d.proto },
        _pad: [0; 3],
    };
    (key, d.service)
}

pub(crate) fn pick<T: Copy>(pool: &[T], i: u8) -> T {
    pool[usize::from(i) % pool.len()]
}

impl World {
    pub(crate) fn cfg(&self) -> &Config {
        &self.configs[self.live_set][self.slot_set]
    }

    pub(crate) fn service_of(&self, s: usize) -> &model::Service {
        let def = &SERVICES[s];
        let vip: SocketAddrV4 = def.vip.parse().expect("vip");
        &self.cfg().services[&(
            u32::from_ne_bytes(vip.ip().octets()),
            vip.port().to_be(),
            def.proto,
        )]
    }

    /// Backend (id, address, wire port) for a flow: its Maglev pick, or a
    /// chosen one of its service (any service's for a non-service flow).
    pub(crate) fn backend_for(
        &self,
        key: &ConnKey,
        svc: usize,
        choice: Option<u8>,
    ) -> Option<(u32, u32, u16)> {
        let s = self.service_of(svc);
        let id = match choice {
            Some(c) => pick(&self.ids[svc].1, c),
            None => {
                let id = Model::pick(self.cfg(), key, s);
                if id == router_common::NO_BACKEND {
                    pick(&self.ids[svc].1, 0)
                } else {
                    id
                }
            }
        };
        self.cfg().backends.get(&id).map(|b| (id, b.addr, b.port))
    }

    /// The reply key of `key`'s `attempt`-th SNAT candidate on `backend`.
    pub(crate) fn candidate(&self, key: &ConnKey, svc: usize, attempt: u8) -> (u32, u16) {
        // A DSR service has no SNAT address: NAT state seeded at its
        // flows' keys (which their packets must never meet) borrows the
        // first service's.
        let s = self.service_of(svc);
        let s = if s.snat.is_empty() {
            self.service_of(0)
        } else {
            s
        };
        let c = Model::snat_candidates(self.cfg(), key, s);
        c[usize::from(attempt) % c.len()]
    }

    pub(crate) fn hop_of(&self, h: HopSeed) -> Hop {
        let gen_now = self.cfg().fib_gen;
        match h {
            HopSeed::None => Hop::default(),
            HopSeed::Cached { mac, ifindex } => Hop {
                dmac: [0x02, 0, 0, 0, 0x5e, mac],
                smac: [0x02, 0, 0, 0, 0x5f, mac],
                ifindex: [self.fx.arm0, self.fx.arm1, 77][usize::from(ifindex) % 3],
                fib_gen: gen_now,
            },
            HopSeed::Outdated => Hop {
                dmac: [0x02, 0, 0, 0, 0x6e, 1],
                smac: [0x02, 0, 0, 0, 0x6f, 1],
                ifindex: self.fx.arm0,
                fib_gen: gen_now.wrapping_add(1),
            },
        }
    }

    pub(crate) fn entry(&self, to: Tuple, ids: (u32, u32), reply: bool, p: &Placed) -> Entry {
        let awaits = [CONN_AWAIT_SYNACK, CONN_AWAIT_REQUEST, CONN_AWAIT_RESPONSE]
            .iter()
            .enumerate()
            .filter(|(i, _)| p.awaits & (1 << i) != 0)
            .fold(0, |a, (_, b)| a | b);
        Entry {
            to,
            backend_id: ids.1,
            service_id: ids.0,
            flags: awaits
                | if reply { CONN_REPLY } else { 0 }
                | if p.closing { CONN_CLOSING } else { 0 }
                | if p.counted { CONN_COUNTED } else { 0 }
                | if p.heard.is_some() { CONN_HEARD } else { 0 },
            hop: self.hop_of(p.hop),
            age: p.age.secs(),
            seq_next: p.heard.map_or(0, |d| DEFAULT_SEQ.wrapping_add(d)),
        }
    }

    /// `DSR_FLOWS` entries seeded for the session's flows to DSR services:
    /// one per `Seed::Flow` with a forward entry, of that entry's age,
    /// closing bit and next hop, on the backend it names.
    pub(crate) fn seed_dsr(&self, s: &Session) -> Vec<(ConnKey, model::dsr::DsrEntry)> {
        let mut out = Vec::new();
        for seed in &s.seeds {
            let Seed::Flow {
                flow,
                backend,
                fwd: Some(p),
                ..
            } = seed
            else {
                continue;
            };
            let (key, Some(svc)) = flow_key(self, &pick(&s.flows, *flow)) else {
                continue;
            };
            let def = &SERVICES[svc];
            if !def.forwarding.is_dsr() {
                continue;
            }
            let Some((bid, baddr, _)) = self.backend_for(&key, svc, *backend) else {
                continue;
            };
            let hash = Model::hash(self.cfg(), &key);
            let gue = self.service_of(svc).gue_port;
            out.push((
                key,
                model::dsr::DsrEntry {
                    backend_addr: baddr,
                    outer_src: self.cfg().route_src(baddr),
                    backend_id: bid,
                    service_id: self.ids[svc].0,
                    hop: self.hop_of(p.hop),
                    gue_sport: if gue != 0 {
                        router_common::dsr::gue_source_port(hash).to_be()
                    } else {
                        0
                    },
                    gue_dport: gue,
                    closing: p.closing,
                    age: p.age.secs(),
                },
            ));
        }
        out
    }

    /// Resolves seeds into entries, in order (a later one at the same key
    /// replaces an earlier one).
    pub(crate) fn seed_entries(&self, s: &Session) -> Vec<(Table, ConnKey, Entry)> {
        let mut out = Vec::new();
        for seed in &s.seeds {
            match seed {
                Seed::Flow {
                    flow,
                    backend,
                    attempt,
                    fwd,
                    reply,
                } => {
                    let (key, svc) = flow_key(self, &pick(&s.flows, *flow));
                    let svc = svc.unwrap_or(0);
                    let Some((bid, baddr, bport)) = self.backend_for(&key, svc, *backend) else {
                        continue;
                    };
                    let (snat, sport) = self.candidate(&key, svc, *attempt);
                    let sid = self.ids[svc].0;
                    let to = Tuple {
                        src_addr: snat,
                        dst_addr: baddr,
                        src_port: sport,
                        dst_port: bport,
                    };
                    if let Some(p) = fwd {
                        out.push((p.table, key, self.entry(to, (sid, bid), false, p)));
                    }
                    if let Some((p, owner)) = reply {
                        let rkey = model::tables::reply_key_of(to, key.proto);
                        let back = self.owner_tuple(&key, *owner);
                        out.push((p.table, rkey, self.entry(back, (sid, bid), true, p)));
                    }
                }
                Seed::Squatter {
                    flow,
                    attempt,
                    at,
                    owner,
                    reply,
                } => {
                    let (key, svc) = flow_key(self, &pick(&s.flows, *flow));
                    let svc = svc.unwrap_or(0);
                    let Some((bid, baddr, bport)) = self.backend_for(&key, svc, None) else {
                        continue;
                    };
                    let (snat, sport) = self.candidate(&key, svc, *attempt);
                    let rkey = model::tables::reply_key_of(
                        Tuple {
                            src_addr: snat,
                            dst_addr: baddr,
                            src_port: sport,
                            dst_port: bport,
                        },
                        key.proto,
                    );
                    let owner = match owner {
                        Owner::Own => Owner::Client(1),
                        o => *o,
                    };
                    let back = self.owner_tuple(&key, owner);
                    out.push((
                        at.table,
                        rkey,
                        self.entry(back, (self.ids[svc].0, bid), *reply, at),
                    ));
                }
                Seed::Wall { flow, upto, at } => {
                    let (key, svc) = flow_key(self, &pick(&s.flows, *flow));
                    let svc = svc.unwrap_or(0);
                    let Some((bid, baddr, bport)) = self.backend_for(&key, svc, None) else {
                        continue;
                    };
                    let back = self.owner_tuple(&key, Owner::Client(1));
                    for attempt in 0..*upto {
                        let (snat, sport) = self.candidate(&key, svc, attempt);
                        let rkey = model::tables::reply_key_of(
                            Tuple {
                                src_addr: snat,
                                dst_addr: baddr,
                                src_port: sport,
                                dst_port: bport,
                            },
                            key.proto,
                        );
                        out.push((
                            at.table,
                            rkey,
                            self.entry(back, (self.ids[svc].0, bid), true, at),
                        ));
                    }
                }
                Seed::Odd {
                    flow,
                    at,
                    to,
                    reply,
                } => {
                    let (key, _) = flow_key(self, &pick(&s.flows, *flow));
                    let (baddr, bport) = pick(&self.backends, to.0);
                    let t = Tuple {
                        src_addr: wire(pick(SERVICES[0].snat, to.1)),
                        dst_addr: baddr,
                        src_port: pick(&CLIENT_PORTS, to.1 / 3).to_be(),
                        dst_port: bport.to_be(),
                    };
                    let sid = pick(&self.service_ids, to.1);
                    let bid = pick(&self.backend_ids, to.0);
                    out.push((at.table, key, self.entry(t, (sid, bid), *reply, at)));
                }
            }
        }
        out
    }

    /// What a reply entry translates back to: the flow's client and VIP,
    /// or someone else's.
    pub(crate) fn owner_tuple(&self, key: &ConnKey, owner: Owner) -> Tuple {
        let own = Tuple {
            src_addr: key.dst_addr,
            dst_addr: key.src_addr,
            src_port: key.dst_port,
            dst_port: key.src_port,
        };
        match owner {
            Owner::Own => own,
            Owner::Client(c) => {
                let mut client = wire(pick(&CLIENTS, c));
                if client == key.src_addr {
                    client = wire(pick(&CLIENTS, c.wrapping_add(1)));
                }
                Tuple {
                    dst_addr: client,
                    ..own
                }
            }
            Owner::Vip(v) => {
                let d = pick(&self.dests, v);
                let port = if d.port.to_be() == key.dst_port {
                    d.port.wrapping_add(1)
                } else {
                    d.port
                };
                Tuple {
                    src_addr: d.addr,
                    src_port: port.to_be(),
                    ..own
                }
            }
        }
    }

    /// The frame for packet `p`, built against the model's current tables.
    pub(crate) fn frame(&self, m: &Model, s: &Session, p: &PacketSpec) -> Vec<u8> {
        let (key, svc) = flow_key(self, &pick(&s.flows, p.flow));
        // An ICMP message is about the packet the LB sent on a flow's
        // tuple: its far end sends on the tuple `Fwd` or `Reply` builds.
        let dir = match p.dir {
            Dir::Icmp(i) if i.backend_side => Dir::Reply(i.attempt),
            Dir::Icmp(_) => Dir::Fwd,
            d => d,
        };
        let (src, dst, proto) = match dir {
            Dir::Icmp(_) => unreachable!("an ICMP message takes its flow's tuple"),
            Dir::Fwd => (
                (key.src_addr, key.src_port),
                (key.dst_addr, key.dst_port),
                key.proto,
            ),
            Dir::Reply(attempt) => {
                let fwd = m
                    .tables
                    .conns
                    .get(&key)
                    .or_else(|| m.tables.half_open.get(&key))
                    .filter(|e| !e.is_reply());
                match (fwd, svc) {
                    (Some(e), _) => (
                        (e.to.dst_addr, e.to.dst_port),
                        (e.to.src_addr, e.to.src_port),
                        key.proto,
                    ),
                    (None, Some(svc)) => match self.backend_for(&key, svc, None) {
                        Some((_, baddr, bport)) => {
                            let (snat, sport) = self.candidate(&key, svc, attempt);
                            ((baddr, bport), (snat, sport), key.proto)
                        }
                        None => (
                            (key.dst_addr, key.dst_port),
                            (key.src_addr, key.src_port),
                            key.proto,
                        ),
                    },
                    (None, None) => (
                        (key.dst_addr, key.dst_port),
                        (key.src_addr, key.src_port),
                        key.proto,
                    ),
                }
            }
            Dir::Stray(b, a) => {
                let (baddr, bport) = pick(&self.backends, b);
                let snat = wire(pick(
                    &[
                        "198.18.0.1",
                        "198.18.0.5",
                        "198.18.0.7",
                        "198.18.0.8",
                        "198.18.0.9",
                    ],
                    a,
                ));
                let sport = pick(&[40000u16, 40001, 10000, 20000, 50000, 1024], a / 5);
                ((baddr, bport.to_be()), (snat, sport.to_be()), key.proto)
            }
        };
        let sock = |(a, port): (u32, u16)| SocketAddrV4::new(ip_of(a), u16::from_be(port));
        let payload: Vec<u8> = (0..p.payload)
            .map(|i| i.wrapping_mul(37) ^ p.flags)
            .collect();
        let mut pkt = if proto == 17 {
            Packet::udp(sock(src), sock(dst), &payload)
        } else {
            Packet::tcp(sock(src), sock(dst), p.flags).with_payload(&payload)
        };
        pkt = pkt.with_macs([0x02, 0, 0, 0, 0, 0x01], [0x02, 0, 0, 0, 0x0c, p.flow]);
        let dest = self.dests[usize::from(pick(&s.flows, p.flow).dest) % self.dests.len()];
        if dest.proto != 6 && dest.proto != 17 && matches!(p.dir, Dir::Fwd) {
            pkt.proto = dest.proto;
            pkt.payload = vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0];
        }
        if let Dir::Icmp(i) = p.dir {
            pkt = icmp_about(&pkt, i);
        }
        for m in &p.mutations {
            match *m {
                Mutation::Options(n) => {
                    pkt.ip_options = (0..usize::from(n) * 4)
                        .map(|i| [1u8, 1, 1, 0][i % 4])
                        .collect()
                }
                Mutation::Proto(x) if x != 6 && x != 17 => pkt.proto = x,
                Mutation::UdpNoChecksum => pkt.udp_no_checksum = true,
                Mutation::Seq(d) => pkt.seq = DEFAULT_SEQ.wrapping_add(d),
                Mutation::Ack(d) => pkt.ack = DEFAULT_SEQ.wrapping_add(d),
                Mutation::Ttl(t) => pkt.ttl = t,
                Mutation::Frag(f) => pkt.frag = f,
                _ => {}
            }
        }
        let mut f = pkt.build();
        let l4 = 14 + usize::from(f[14] & 0x0f) * 4;
        let proto = f[23];
        for m in &p.mutations {
            mutate(&mut f, *m, l4, proto);
        }
        f
    }

    /// Applies the session's weight sets to both sides: `set` for the
    /// tables and scan lists, `slots` for the `BACKENDS` weights.
    pub(crate) fn use_weights(&mut self, set: usize, slots: usize) {
        if set != self.live_set {
            self.fx.dp.apply(&specs(set)).expect("apply weights");
            self.live_set = set;
            self.slot_set = set;
        }
        if slots != self.slot_set {
            let cfg = &self.configs[set][slots];
            let mut writes = Vec::new();
            for (def, (sid, bids)) in SERVICES.iter().zip(&self.ids) {
                for (i, id) in bids.iter().enumerate() {
                    if def.weights[slots][i] == def.weights[self.slot_set][i]
                        && def.rooms[slots][i] == def.rooms[self.slot_set][i]
                    {
                        continue;
                    }
                    let b = cfg.backends[id];
                    writes.push((
                        *id,
                        router_common::Backend {
                            addr: b.addr,
                            port: b.port,
                            _pad: 0,
                            service_id: *sid,
                            in_use: 1,
                            weight: b.weight,
                            max_in_flight: b.max_in_flight,
                        },
                    ));
                }
            }
            for (id, slot) in writes {
                self.fx.set_backend_weight(id, slot);
            }
            self.slot_set = slots;
        }
        if self.checked_sets.insert(set) {
            let services: Vec<((u32, u16, u8), model::Service)> = self
                .cfg()
                .services
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            for (key, svc) in services {
                let live = self.fx.live_table(ServiceKey {
                    addr: key.0,
                    port: key.1,
                    proto: key.2,
                    _pad: 0,
                });
                assert!(
                    live == svc.table,
                    "the kernel's live Maglev table of service {} differs from the builder's",
                    svc.id
                );
                let (selection, members) = self.fx.live_members(ServiceKey {
                    addr: key.0,
                    port: key.1,
                    proto: key.2,
                    _pad: 0,
                });
                assert_eq!(
                    (selection, &members),
                    (svc.selection, &svc.members),
                    "the kernel's selection and scan list of service {} (weight set {set})",
                    svc.id
                );
            }
        }
    }
}

/// The ICMP message `i` about the packet the LB sent on `flow`'s tuple
/// reversed (`flow` is what the message's far end sends: `Fwd` or `Reply`).
fn icmp_about(flow: &Packet, i: IcmpSpec) -> Packet {
    let mut quoted = flow.translated(flow.dst, flow.src, flow.eth_src, flow.eth_dst);
    let ours = [
        "198.18.100.1",
        "198.18.0.1",
        "198.18.0.5",
        "198.18.0.7",
        "198.18.100.2",
    ];
    let mut to = *quoted.src.ip();
    match i.oddity {
        IcmpOddity::ElsewhereThan(n) => {
            to = ip_of(wire(pick(&ours, n)));
            if to == *quoted.src.ip() {
                to = ip_of(wire(pick(&ours, n.wrapping_add(1))));
            }
        }
        IcmpOddity::QuoteOptions(n) => {
            quoted.ip_options = (0..usize::from(n) * 4)
                .map(|i| [1u8, 1, 1, 0][i % 4])
                .collect()
        }
        IcmpOddity::QuoteFrag(f) => quoted.frag = f,
        IcmpOddity::QuoteIcmp => {
            quoted.proto = 1;
            quoted.payload = vec![8, 0, 0xf7, 0xfe, 0, 1, 0, 0];
        }
        IcmpOddity::QuoteUdpNoChecksum => quoted.udp_no_checksum = true,
        _ => {}
    }
    let mut d = quoted.datagram();
    let l4 = usize::from(d[0] & 0x0f) * 4;
    match i.oddity {
        IcmpOddity::QuoteVersionIhl(b) => d[0] = b,
        IcmpOddity::BadQuotedIpChecksum(x) => {
            let c = u16::from_be_bytes([d[10], d[11]]) ^ x;
            d[10..12].copy_from_slice(&c.to_be_bytes());
        }
        IcmpOddity::BadQuotedL4Checksum(x) if d[9] == 6 || d[9] == 17 => {
            let at = l4 + if d[9] == 6 { 16 } else { 6 };
            let c = u16::from_be_bytes([d[at], d[at + 1]]) ^ x;
            d[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        _ => {}
    }
    d.truncate(usize::from(i.quote));
    let from = if i.from_endpoint {
        *flow.src.ip()
    } else {
        ip_of(wire("198.18.0.250"))
    };
    let rest = if i.kind == (3, 4) {
        [0, 0, 0x05, 0x00]
    } else {
        [0; 4]
    };
    let mut m = Packet::icmp(from, to, i.kind, rest, &d).with_macs(flow.eth_dst, flow.eth_src);
    if let IcmpOddity::BadIcmpChecksum(x) = i.oddity {
        let c = u16::from_be_bytes([m.payload[2], m.payload[3]]) ^ x;
        m.payload[2..4].copy_from_slice(&c.to_be_bytes());
    }
    m
}

/// A byte-level mutation of a built frame (`l4`: where the transport
/// header starts, `proto`: the IP protocol byte as built). Each one
/// leaves alone a frame too short for it (after an earlier cut).
fn mutate(f: &mut Vec<u8>, m: Mutation, l4: usize, proto: u8) {
    let len = f.len();
    match m {
        Mutation::Truncate(n) if len > 14 => f.truncate(14 + usize::from(n) % (len - 14)),
        Mutation::Version(v) if len > 14 => f[14] = (v << 4) | (f[14] & 0x0f),
        Mutation::Ihl(i) if len > 14 => f[14] = (f[14] & 0xf0) | i,
        Mutation::TotLen(d) if len >= 18 => {
            let t = i32::from(u16::from_be_bytes([f[16], f[17]])) + i32::from(d);
            f[16..18].copy_from_slice(&(t.clamp(0, 0xffff) as u16).to_be_bytes());
        }
        Mutation::Doff(d) if proto == 6 && len > l4 + 12 => {
            f[l4 + 12] = (d << 4) | (f[l4 + 12] & 0x0f)
        }
        Mutation::UdpLen(d) if proto == 17 && len >= l4 + 6 => {
            let t = i32::from(u16::from_be_bytes([f[l4 + 4], f[l4 + 5]])) + i32::from(d);
            f[l4 + 4..l4 + 6].copy_from_slice(&(t.clamp(0, 0xffff) as u16).to_be_bytes());
        }
        Mutation::EtherType(e) => f[12..14].copy_from_slice(&e.to_be_bytes()),
        Mutation::BadIpChecksum(x) if len >= 26 => {
            let c = u16::from_be_bytes([f[24], f[25]]) ^ x;
            f[24..26].copy_from_slice(&c.to_be_bytes());
        }
        Mutation::BadL4Checksum(x) if proto == 6 || proto == 17 => {
            let at = if proto == 6 { l4 + 16 } else { l4 + 6 };
            if at + 2 <= len {
                let c = u16::from_be_bytes([f[at], f[at + 1]]) ^ x;
                f[at..at + 2].copy_from_slice(&c.to_be_bytes());
            }
        }
        Mutation::Padding(n) => f.extend((0..n).map(|i| i ^ 0xa5)),
        _ => {}
    }
}
