//! The decision for one packet: which entry it rides, or which flow it
//! opens, and what becomes of it.

use router_common::{
    CONN_AWAIT_ANY, CONN_AWAIT_REQUEST, CONN_AWAIT_RESPONSE, CONN_AWAIT_SYNACK, CONN_CLOSING,
    CONN_HEARD, ConnKey, NO_BACKEND, OWN_PAIR_ATTEMPTS, PROTO_TCP, SNAT_PROBES,
    flow_hash::flow_hash, reasons,
};

use super::{
    Model, Outcome, Traffic, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX,
    nat::{self, Tuple},
    parse::{self, Refusal, Transport},
    tables::{Entry, Hop, Promotion, Table, owned_by, refresh, reply_entry, reply_key_of},
};

/// How far either side of a direction's furthest sequence number a RST or
/// FIN may lie and still end its flow, and how far one segment may move it.
const WINDOW: u32 = 1 << 20;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// What the packet says about its flow.
#[derive(Clone, Copy)]
struct Kind {
    /// A TCP SYN without ACK: the client opens a connection.
    syn: bool,
    fin_or_rst: bool,
    rst: bool,
    ack: bool,
}

/// The sequence number just past a TCP segment: SYN and FIN take one each.
fn segment_end(l4: &Transport) -> u32 {
    l4.seq
        .wrapping_add(l4.payload_len as u32)
        .wrapping_add(u32::from(l4.tcp_flags & TCP_SYN != 0))
        .wrapping_add(u32::from(l4.tcp_flags & TCP_FIN != 0))
}

/// Records a packet on its direction's entry: the first one heard there
/// (and a SYN-ACK on a reply entry) sets where its sequence is; later
/// ones move it forward by at most the window. Returns whether the
/// packet's sequence number is within the window of where it was (always
/// for UDP, and for the packet that sets it).
fn track(e: &mut Entry, l4: &Transport) -> bool {
    if l4.proto != PROTO_TCP {
        e.flags |= CONN_HEARD;
        return true;
    }
    let end = segment_end(l4);
    let synack = l4.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
    if !e.heard() || (e.is_reply() && synack) {
        e.seq_next = end;
        e.flags |= CONN_HEARD;
        return true;
    }
    let next = e.seq_next;
    let ahead = end.wrapping_sub(next);
    if ahead != 0 && ahead <= WINDOW {
        e.seq_next = end;
    }
    let off = l4.seq.wrapping_sub(next);
    off <= WINDOW || off >= WINDOW.wrapping_neg()
}

/// Whether a client packet proves its half-open flow, whose reply entry
/// is `r`: the backend has been heard, and a TCP packet carries an ACK of
/// at most what the backend sent, no more than the window behind.
fn proves(r: &Entry, l4: &Transport, kind: Kind) -> bool {
    r.heard() && (l4.proto != PROTO_TCP || (kind.ack && r.seq_next.wrapping_sub(l4.ack) <= WINDOW))
}

impl Model {
    /// Runs one frame arriving on `ingress` through the model.
    pub fn step(&mut self, frame: &[u8], ingress: u32) -> Outcome {
        self.trail.clear();
        let mut out = Outcome::untouched(frame);
        if frame.len() >= 14 && frame[12..14] == [0x86, 0xdd] {
            let (verdict, reason) = parse::ipv6(frame);
            return out.counted(verdict, reason);
        }
        let ip = match parse::ipv4(frame) {
            Ok(ip) => ip,
            Err(Refusal::NotIpv4) => return out.counted(XDP_PASS, reasons::PASS_NOT_SERVICE),
            Err(_) => return out.counted(XDP_DROP, reasons::DROP_MALFORMED),
        };
        let (vip_bucket, snat_bucket) = self.cfg.filter(ip.dst);
        if !vip_bucket && !snat_bucket {
            return out.counted(XDP_PASS, reasons::PASS_NOT_SERVICE);
        }
        let l4 = match parse::transport(frame, &ip) {
            Ok(l4) => l4,
            Err(Refusal::Options) => return out.counted(XDP_PASS, reasons::PASS_IP_OPTIONS),
            Err(Refusal::Fragment) => return out.counted(XDP_PASS, reasons::PASS_FRAGMENT),
            Err(Refusal::UnknownProto | Refusal::NotIpv4) => {
                return out.counted(XDP_PASS, reasons::PASS_UNKNOWN_PROTO);
            }
            Err(Refusal::Malformed) => return out.counted(XDP_DROP, reasons::DROP_MALFORMED),
            Err(Refusal::Icmp) => return self.icmp(out, frame, ingress, &ip),
        };
        let key = ConnKey {
            src_addr: ip.src,
            dst_addr: ip.dst,
            src_port: l4.src_port,
            dst_port: l4.dst_port,
            proto: l4.proto,
            _pad: [0; 3],
        };
        let tcp = l4.proto == PROTO_TCP;
        let kind = Kind {
            syn: tcp && l4.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
            fin_or_rst: tcp && l4.tcp_flags & (TCP_FIN | TCP_RST) != 0,
            rst: tcp && l4.tcp_flags & TCP_RST != 0,
            ack: tcp && l4.tcp_flags & TCP_ACK != 0,
        };

        // DSR services' packets never meet the NAT tables.
        if self.is_dsr(ip.dst, l4.dst_port, l4.proto) {
            let flags = super::dsr::Flags {
                syn: kind.syn,
                fin_or_rst: kind.fin_or_rst,
            };
            return self.dsr(out, frame, ingress, key, flags);
        }

        // CONNS is asked first; HALF_OPEN only when CONNS has no entry at
        // all for the key, live or not.
        let found = if self.tables.conns.contains_key(&key) {
            Some(Table::Conns)
        } else if self.tables.half_open.contains_key(&key) {
            Some(Table::HalfOpen)
        } else {
            None
        };
        let mut stale = None;
        if let Some(table) = found {
            let e = self.tables.map(table)[&key];
            let starts_over = self.syn_starts_over(table, &key, &e, kind);
            let expired = self.cfg.timeouts.expired(table, &e, l4.proto);
            if !starts_over && !expired {
                // The datapath is a router hop: a packet it would forward
                // with no TTL to spare ends here.
                if ip.ttl <= 1 {
                    return out.counted(XDP_DROP, reasons::DROP_TTL_EXPIRED);
                }
                return self.ride(out, frame, ingress, table, key, &l4, kind);
            }
            self.trail.push(if starts_over {
                "a SYN starts over on an entry"
            } else {
                "entry expired"
            });
            // The new connection ends the live one on its key; an expired
            // one is the daemon's to uncount.
            if !expired {
                self.release(table, &key, "uncounted: a SYN starts over");
            }
            stale = Some((table, self.tables.map(table)[&key]));
        }

        if vip_bucket && let Some(svc) = self.cfg.service(ip.dst, l4.dst_port, l4.proto) {
            if ip.ttl <= 1 {
                return out.counted(XDP_DROP, reasons::DROP_TTL_EXPIRED);
            }
            if tcp && !kind.syn {
                out.reasons.push(reasons::LRU_MISS);
            }
            let svc = svc.clone();
            return self.open(out, frame, ingress, &key, &svc, stale, (&l4, kind));
        }
        if snat_bucket {
            // A TCP reply without an entry would make the host's stack
            // reset the backend's side; the harness never opens a socket,
            // so no host connection owns one.
            if tcp && self.cfg.snat_addrs.contains(&ip.dst) {
                return out.counted(XDP_DROP, reasons::DROP_NO_REPLY_ENTRY);
            }
            return out.counted(XDP_PASS, reasons::PASS_NO_REPLY_ENTRY);
        }
        out.counted(XDP_PASS, reasons::PASS_NOT_SERVICE)
    }

    /// Whether a SYN that found entry `e` at its key opens a new connection
    /// instead of being a retransmission. A closing entry means the old
    /// connection on this 4-tuple is over. For a forward entry, so does a
    /// reply direction that is no longer the flow's or no longer live: the
    /// backend would never be heard from on it.
    fn syn_starts_over(&self, table: Table, key: &ConnKey, e: &Entry, kind: Kind) -> bool {
        if !kind.syn {
            return false;
        }
        if e.closing() {
            return true;
        }
        if e.is_reply() {
            return false;
        }
        match self.tables.get(table, &reply_key_of(e.to, key.proto)) {
            None => true,
            Some(r) => {
                !owned_by(r, key) || r.closing() || self.cfg.timeouts.expired(table, r, key.proto)
            }
        }
    }

    /// A packet of a flow with a live entry at its key in `table`.
    #[allow(clippy::too_many_arguments)]
    fn ride(
        &mut self,
        out: Outcome,
        frame: &[u8],
        ingress: u32,
        mut table: Table,
        key: ConnKey,
        l4: &Transport,
        kind: Kind,
    ) -> Outcome {
        let mut out = out;
        let timeouts = self.cfg.timeouts;
        if table == Table::HalfOpen && !kind.syn {
            let e = self.tables.half_open[&key];
            // A client packet that acknowledges the backend's answer
            // confirms the flow; the backend's answers, a retransmitted
            // SYN and a blind ACK do not.
            if !e.is_reply() {
                match self
                    .tables
                    .promote(&timeouts, &key, e, |r| proves(r, l4, kind))
                {
                    Promotion::Moved => {
                        self.trail.push("promoted");
                        table = Table::Conns;
                    }
                    Promotion::Refused => self.trail.push("promotion refused"),
                    Promotion::Unproven => {
                        self.trail.push("not proven: stays half-open");
                        out.reasons.push(reasons::UNCONFIRMED);
                    }
                }
            }
        }
        self.trail.push(match table {
            Table::Conns => "rides a CONNS entry",
            Table::HalfOpen => "rides a HALF_OPEN entry",
        });
        let in_window = match self.tables.map_mut(table).get_mut(&key) {
            Some(e) => track(e, l4),
            None => true,
        };
        // A RST or FIN out of the window is forwarded and changes nothing.
        let (fin_or_rst, rst) = if kind.fin_or_rst && !in_window {
            self.trail.push("RST/FIN out of window");
            out.reasons.push(reasons::TCP_OUT_OF_WINDOW);
            (false, false)
        } else {
            (kind.fin_or_rst, kind.rst)
        };
        let newly_closing = match self.tables.map_mut(table).get_mut(&key) {
            Some(e) => refresh(e, fin_or_rst),
            None => false,
        };
        if newly_closing || rst {
            self.on_close(table, &key, rst);
        }
        let samples = self.observe(table, &key, l4);
        let e = self.tables.map(table)[&key];
        let mut out = self.forward(out, frame, ingress, l4.proto, e, Some((table, key)), false);
        out.latency = samples;
        out
    }

    /// Latency bookkeeping on the entry at `key` in `table`: the flags move
    /// as the handshake and the first request and response pass. Samples
    /// are clock values, so only their number is modelled. Entries are
    /// changed in place, one at a time, so an entry that is its own reply
    /// entry sees both changes.
    fn observe(&mut self, table: Table, key: &ConnKey, l4: &Transport) -> Vec<(u32, u32)> {
        let mut samples = Vec::new();
        let e = self.tables.map(table)[key];
        if e.flags & CONN_AWAIT_ANY == 0 {
            return samples;
        }
        if !e.is_reply() {
            if e.flags & CONN_AWAIT_REQUEST != 0 && l4.payload_len > 0 {
                if let Some(e) = self.tables.map_mut(table).get_mut(key) {
                    e.flags &= !CONN_AWAIT_REQUEST;
                }
                // The response arrives on the reply entry, wherever it is,
                // if the flow still holds its reply key.
                let rkey = reply_key_of(e.to, PROTO_TCP);
                let r = match self.tables.conns.get_mut(&rkey) {
                    Some(r) => Some(r),
                    None => self.tables.half_open.get_mut(&rkey),
                };
                if let Some(r) = r
                    && owned_by(r, key)
                {
                    r.flags = (r.flags & !CONN_AWAIT_SYNACK) | CONN_AWAIT_RESPONSE;
                }
            }
            return samples;
        }
        let Some(e) = self.tables.map_mut(table).get_mut(key) else {
            return samples;
        };
        if e.flags & CONN_AWAIT_SYNACK != 0
            && l4.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
        {
            e.flags &= !CONN_AWAIT_SYNACK;
            samples.push((e.backend_id, router_common::LATENCY_CONNECT));
        }
        if e.flags & CONN_AWAIT_RESPONSE != 0 && l4.payload_len > 0 {
            e.flags &= !CONN_AWAIT_RESPONSE;
            samples.push((e.backend_id, router_common::LATENCY_FIRST_BYTE));
        }
        samples
    }

    /// A packet for a service with no live entry: a new flow, in HALF_OPEN
    /// whatever opened it.
    #[allow(clippy::too_many_arguments)]
    fn open(
        &mut self,
        mut out: Outcome,
        frame: &[u8],
        ingress: u32,
        key: &ConnKey,
        svc: &super::Service,
        stale: Option<(Table, Entry)>,
        (l4, kind): (&Transport, Kind),
    ) -> Outcome {
        let hash = flow_hash(
            self.cfg.flow_hash_key,
            key.src_addr,
            key.dst_addr,
            key.src_port,
            key.dst_port,
            key.proto,
        );
        // Only a flow that starts here is placed by load.
        let fresh = kind.syn || key.proto != PROTO_TCP;
        let Some(placed) = self.placed(svc, key.src_addr) else {
            return out.counted(XDP_DROP, reasons::DROP_NO_BACKEND);
        };
        let backend_id = self.select(&placed, hash, fresh);
        let backend = match self.cfg.backends.get(&backend_id) {
            Some(b) if backend_id != NO_BACKEND => *b,
            _ => return out.counted(XDP_DROP, reasons::DROP_NO_BACKEND),
        };
        // Every new flow starts half-open: only its client's next packet
        // confirms it, so a spoofed source (one packet) never reaches CONNS.
        let target = Table::HalfOpen;
        // The old flow on this key gives up its reply key (when it still
        // holds it) and its place, so neither shadows the new flow.
        if let Some((table, old)) = stale
            && !old.is_reply()
        {
            let rkey = reply_key_of(old.to, key.proto);
            if self
                .tables
                .get(table, &rkey)
                .is_some_and(|r| owned_by(r, key))
            {
                self.trail.push("stale flow's reply entry removed");
                self.tables.map_mut(table).remove(&rkey);
            }
            if table != target {
                self.tables.map_mut(table).remove(key);
            }
        }

        let await_synack = if kind.syn { CONN_AWAIT_SYNACK } else { 0 };
        let reply = reply_entry(key, backend_id, svc.id, await_synack);
        let Some(((snat_addr, snat_port), probed)) =
            self.allocate(key, svc, hash, backend, kind, reply)
        else {
            return out.counted(XDP_DROP, reasons::DROP_SNAT_EXHAUSTED);
        };
        if probed {
            out.reasons.push(reasons::SNAT_PORT_PROBED);
        }
        let fwd = Entry {
            to: Tuple {
                src_addr: snat_addr,
                dst_addr: backend.addr,
                src_port: snat_port,
                dst_port: backend.port,
            },
            backend_id,
            service_id: svc.id,
            // The client is heard: its first packet starts its sequence.
            flags: CONN_HEARD
                | if kind.fin_or_rst { CONN_CLOSING } else { 0 }
                | if kind.syn { CONN_AWAIT_REQUEST } else { 0 },
            hop: Hop::default(),
            age: 0,
            seq_next: if key.proto == PROTO_TCP {
                segment_end(l4)
            } else {
                0
            },
        };
        let fwd = Entry {
            flags: fwd.flags | self.count_new(backend_id, kind.rst),
            ..fwd
        };
        self.tables.map_mut(target).insert(*key, fwd);
        self.trail.push(match target {
            Table::Conns => "new flow in CONNS",
            Table::HalfOpen => "new flow in HALF_OPEN",
        });
        self.forward(out, frame, ingress, key.proto, fwd, None, true)
    }

    /// The (SNAT address, port) pairs a flow may get, in the order tried:
    /// first the client's own port, then probes into the service's range.
    pub fn probes(key: &ConnKey, svc: &super::Service, hash: u32) -> Vec<(u32, u16)> {
        let count = svc.snat.len().clamp(1, router_common::MAX_SNAT_ADDRS) as u32;
        let span = u32::from(svc.port_max).saturating_sub(u32::from(svc.port_min)) + 1;
        (0..=SNAT_PROBES)
            .map(|attempt| {
                let addr = svc.snat[((hash >> 16).wrapping_add(attempt) % count) as usize];
                // Attempt 0 keeps the client's port, already in wire order.
                let port = if attempt == 0 {
                    key.src_port
                } else {
                    let r = hash.wrapping_add(attempt.wrapping_mul(0x9e37_79b9)) % span;
                    ((u32::from(svc.port_min) + r) as u16).to_be()
                };
                (addr, port)
            })
            .collect()
    }

    /// Finds the flow a reply key in HALF_OPEN. A flow not opened by a SYN
    /// (UDP, or TCP picked up mid-stream, maybe after losing only its
    /// forward entry) takes back the first candidate pair, up to attempt
    /// `OWN_PAIR_ATTEMPTS`, whose reply entry is its own, as the key's lookup finds it; a SYN never looks.
    /// Otherwise the first candidate it may claim. Says whether that was a
    /// fresh claim past the client's own port.
    fn allocate(
        &mut self,
        key: &ConnKey,
        svc: &super::Service,
        hash: u32,
        backend: super::Backend,
        kind: Kind,
        reply: Entry,
    ) -> Option<((u32, u16), bool)> {
        let target = Table::HalfOpen;
        let timeouts = self.cfg.timeouts;
        let candidates = Self::probes(key, svc, hash);
        let rkey = |(a, p): (u32, u16)| {
            reply_key_of(
                Tuple {
                    src_addr: a,
                    dst_addr: backend.addr,
                    src_port: p,
                    dst_port: backend.port,
                },
                key.proto,
            )
        };
        if !kind.syn
            && let Some(c) = candidates
                .iter()
                .take(OWN_PAIR_ATTEMPTS as usize + 1)
                .copied()
                .find(|c| {
                    self.tables
                        .lookup(&rkey(*c))
                        .is_some_and(|e| owned_by(e, key))
                })
        {
            // That pair alone: it is the 4-tuple the backend knows.
            self.trail.push("own pair taken back");
            return self
                .tables
                .claim(&timeouts, target, rkey(c), reply, key)
                .then_some((c, false));
        }
        const CLAIMED: [&str; 9] = [
            "claimed the client's own port",
            "claimed probe 1",
            "claimed probe 2",
            "claimed probe 3",
            "claimed probe 4",
            "claimed probe 5",
            "claimed probe 6",
            "claimed probe 7",
            "claimed probe 8",
        ];
        for (attempt, c) in candidates.into_iter().enumerate() {
            if self.tables.claim(&timeouts, target, rkey(c), reply, key) {
                self.trail.push(CLAIMED[attempt]);
                return Some((c, attempt > 0));
            }
        }
        None
    }

    /// Translates and sends a packet per entry `e` (which lives at `at`, or
    /// is a new flow's, whose next hop is resolved but not kept).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        out: Outcome,
        frame: &[u8],
        ingress: u32,
        proto: u8,
        e: Entry,
        at: Option<(Table, ConnKey)>,
        new_conn: bool,
    ) -> Outcome {
        self.send(out, frame.len(), ingress, e, at, new_conn, |hop| {
            nat::rewrite(frame, proto, e.to, hop)
        })
    }

    /// Sends a packet of entry `e` (at `at`, as in `forward`) of `bytes`
    /// bytes to the entry's next hop, counted as its traffic; `rewrite`
    /// gives the frame translated, one hop on (TTL one less) when the
    /// program sends it, as it was when it goes to the stack.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn send(
        &mut self,
        mut out: Outcome,
        bytes: usize,
        ingress: u32,
        mut e: Entry,
        at: Option<(Table, ConnKey)>,
        new_conn: bool,
        rewrite: impl Fn(bool) -> Vec<u8>,
    ) -> Outcome {
        out.traffic = Some(Traffic {
            service_id: e.service_id,
            backend_id: e.backend_id,
            bytes: bytes as u64,
            new_conn,
            reply: e.is_reply(),
        });
        if e.hop.fib_gen == 0 || e.hop.fib_gen != self.cfg.fib_gen {
            let Some(hop) = self.cfg.next_hop(e.to.dst_addr) else {
                // The stack sends it on, and takes the TTL's one itself.
                out.frame = rewrite(false);
                return out.counted(XDP_PASS, reasons::PASS_FIB_FAILED);
            };
            e.hop = hop;
            if let Some((table, key)) = at
                && let Some(stored) = self.tables.map_mut(table).get_mut(&key)
            {
                stored.hop = hop;
            }
        }
        out.frame = rewrite(true);
        out.frame[0..6].copy_from_slice(&e.hop.dmac);
        out.frame[6..12].copy_from_slice(&e.hop.smac);
        if e.hop.ifindex == ingress {
            out.counted(XDP_TX, reasons::TX)
        } else {
            out.counted(XDP_REDIRECT, reasons::REDIRECT)
        }
    }
}
