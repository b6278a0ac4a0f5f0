//! DSR services, from their rules: a client's packet rides its flow's
//! `DSR_FLOWS` entry, or is placed by the service's Maglev table, and
//! leaves inside an outer IPv4 header (IPIP, or GUE: a UDP header to the
//! service's port whose source port follows the flow hash) addressed to
//! the backend from the address the host routes from toward it. Nothing
//! of the NAT tables is read or written; the inner packet is untouched.
//!
//! Which packets come here: TCP and UDP to a pre-filter bucket of DSR
//! services alone, whatever their port; in a bucket shared with NAT
//! services or SNAT addresses, those to a DSR service. Modelled for
//! unpooled services with neighbours for every backend, on routes whose
//! MTU every packet fits (the harness's world): the fixtures cover the
//! rest (fragmentation needed, the stack resolving a neighbour).

use router_common::{
    NO_BACKEND, PROTO_TCP, PROTO_UDP,
    dsr::{DSR_CLOSING, DsrFlow, FORWARD_GUE, FORWARD_NAT, OUTER_TTL, PROTO_IPIP, gue_source_port},
    reasons,
};

use super::{
    Model, Outcome, Traffic, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, nat,
    tables::{Hop, Timeouts},
};

const ETH: usize = 14;

/// A `DSR_FLOWS` entry's compared part, and its age in whole seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DsrEntry {
    pub backend_addr: u32,
    /// Wire order.
    pub outer_src: u32,
    pub backend_id: u32,
    pub service_id: u32,
    pub hop: Hop,
    /// GUE ports, wire order; 0 and 0 for IPIP.
    pub gue_sport: u16,
    pub gue_dport: u16,
    pub closing: bool,
    pub age: u64,
}

impl DsrEntry {
    fn expired(&self, t: &Timeouts, proto: u8) -> bool {
        self.age > t.limit(self.closing, proto)
    }

    fn overhead(&self) -> usize {
        if self.gue_dport != 0 { 28 } else { 20 }
    }

    /// The kernel's entry, last seen `age` seconds before `now_ns`, with a
    /// route MTU no packet of the harness's reaches.
    pub fn to_kernel(&self, now_ns: u64) -> DsrFlow {
        DsrFlow {
            backend_addr: self.backend_addr,
            outer_src: self.outer_src,
            backend_id: self.backend_id,
            service_id: self.service_id,
            dmac: self.hop.dmac,
            smac: self.hop.smac,
            ifindex: self.hop.ifindex,
            fib_gen: self.hop.fib_gen,
            mtu: 1500,
            flags: if self.closing { DSR_CLOSING } else { 0 },
            gue_sport: self.gue_sport,
            gue_dport: self.gue_dport,
            last_seen_ns: now_ns.saturating_sub(self.age * 1_000_000_000),
            _pad: 0,
        }
    }

    /// The compared part of a kernel entry: not its clock or route MTU.
    /// Flags other than `DSR_CLOSING` are an error.
    pub fn from_kernel(f: &DsrFlow) -> Result<Self, String> {
        if f.flags & !DSR_CLOSING != 0 {
            return Err(format!("unknown DSR flags {:#x}", f.flags));
        }
        Ok(Self {
            backend_addr: f.backend_addr,
            outer_src: f.outer_src,
            backend_id: f.backend_id,
            service_id: f.service_id,
            hop: Hop {
                dmac: f.dmac,
                smac: f.smac,
                ifindex: f.ifindex,
                fib_gen: f.fib_gen,
            },
            gue_sport: f.gue_sport,
            gue_dport: f.gue_dport,
            closing: f.flags & DSR_CLOSING != 0,
            age: 0,
        })
    }
}

/// What the packet's flags say, as the NAT path reads them.
#[derive(Clone, Copy)]
pub struct Flags {
    pub syn: bool,
    pub fin_or_rst: bool,
}

impl Model {
    /// Whether a TCP or UDP packet to `dst` (port and protocol wire order)
    /// is the DSR program's.
    pub fn is_dsr(&self, dst: u32, port: u16, proto: u8) -> bool {
        let (dsr, only) = self.cfg.dsr_filter(dst);
        only || (dsr
            && self
                .cfg
                .service(dst, port, proto)
                .is_some_and(|s| s.forwarding != FORWARD_NAT))
    }

    /// The DSR program's verdict for the client's packet `frame` of flow
    /// `key`.
    pub(super) fn dsr(
        &mut self,
        mut out: Outcome,
        frame: &[u8],
        ingress: u32,
        key: router_common::ConnKey,
        flags: Flags,
    ) -> Outcome {
        if let Some(e) = self.dsr.get(&key).copied() {
            let live = !e.expired(&self.cfg.timeouts, key.proto);
            if live && !(flags.syn && e.closing) {
                self.trail.push(if flags.fin_or_rst {
                    "dsr: rides its entry, closing it"
                } else {
                    "dsr: rides its entry"
                });
                let stored = self.dsr.get_mut(&key).expect("just read");
                stored.age = 0;
                stored.closing |= flags.fin_or_rst;
                return self.dsr_send(out, frame, ingress, key, false);
            }
            self.trail.push(if live {
                "dsr: a SYN after the flow closed is placed afresh"
            } else {
                "dsr: entry expired"
            });
        }
        let Some(svc) = self
            .cfg
            .service(key.dst_addr, key.dst_port, key.proto)
            .cloned()
        else {
            self.trail.push("dsr: no service at the port");
            return out.counted(XDP_PASS, reasons::PASS_NOT_SERVICE);
        };
        if svc.forwarding == FORWARD_NAT {
            // Only a service turning NAT between two programs gets here.
            return out.counted(XDP_DROP, reasons::DROP_NO_BACKEND);
        }
        assert!(svc.pools.is_empty(), "the model places DSR flows unpooled");
        if key.proto == PROTO_TCP && !flags.syn {
            self.trail.push("dsr: mid-flow without an entry, re-hashed");
            out.reasons.push(reasons::LRU_MISS);
        }
        let hash = Model::hash(&self.cfg, &key);
        let id = Model::pick(&self.cfg, &key, &svc);
        let Some(b) = (id != NO_BACKEND)
            .then(|| self.cfg.backends.get(&id))
            .flatten()
            .copied()
        else {
            self.trail.push("dsr: no backend");
            return out.counted(XDP_DROP, reasons::DROP_NO_BACKEND);
        };
        self.trail.push("dsr: placed by Maglev");
        let gue = svc.forwarding == FORWARD_GUE;
        self.dsr.insert(
            key,
            DsrEntry {
                backend_addr: b.addr,
                outer_src: 0,
                backend_id: id,
                service_id: svc.id,
                hop: Hop::default(),
                gue_sport: if gue {
                    gue_source_port(hash).to_be()
                } else {
                    0
                },
                gue_dport: if gue { svc.gue_port } else { 0 },
                closing: flags.fin_or_rst,
                age: 0,
            },
        );
        self.dsr_send(out, frame, ingress, key, true)
    }

    /// Encapsulates the packet per the entry at `key`, resolving its next
    /// hop and outer source first when its cached one is not current.
    fn dsr_send(
        &mut self,
        mut out: Outcome,
        frame: &[u8],
        ingress: u32,
        key: router_common::ConnKey,
        new_conn: bool,
    ) -> Outcome {
        let fib_gen = self.cfg.fib_gen;
        let mut e = self.dsr[&key];
        if e.hop.fib_gen == 0 || e.hop.fib_gen != fib_gen {
            let hop = self
                .cfg
                .next_hop(e.backend_addr)
                .expect("the model's world has a neighbour for every DSR backend");
            e.hop = hop;
            e.outer_src = self.cfg.route_src(e.backend_addr);
            if let Some(stored) = self.dsr.get_mut(&key) {
                stored.hop = hop;
                stored.outer_src = e.outer_src;
            }
        }
        self.trail.push(if e.gue_dport != 0 {
            "dsr: sent over GUE"
        } else {
            "dsr: sent over IPIP"
        });
        out.frame = encapsulate(frame, &e);
        out.traffic = Some(Traffic {
            service_id: e.service_id,
            backend_id: e.backend_id,
            bytes: out.frame.len() as u64,
            new_conn,
            reply: false,
        });
        if e.hop.ifindex == ingress {
            out.counted(XDP_TX, reasons::TX)
        } else {
            out.counted(XDP_REDIRECT, reasons::REDIRECT)
        }
    }
}

/// `frame` behind a new Ethernet header to `e`'s next hop, an outer IPv4
/// header (DSCP/ECN and DF from the inner one, TTL 64, no ID), and for GUE
/// a UDP header without checksum; everything from the inner IP header on
/// (Ethernet padding included) as it came.
pub fn encapsulate(frame: &[u8], e: &DsrEntry) -> Vec<u8> {
    let inner = &frame[ETH..];
    let inner_len = usize::from(u16::from_be_bytes([inner[2], inner[3]]));
    let gue = e.gue_dport != 0;
    let outer_len = inner_len + e.overhead();
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[1] = inner[1];
    ip[2..4].copy_from_slice(&(outer_len as u16).to_be_bytes());
    ip[6] = inner[6] & 0x40;
    ip[8] = OUTER_TTL;
    ip[9] = if gue { PROTO_UDP } else { PROTO_IPIP };
    ip[12..16].copy_from_slice(&e.outer_src.to_ne_bytes());
    ip[16..20].copy_from_slice(&e.backend_addr.to_ne_bytes());
    let c = !nat::fold(nat::sum(&ip));
    ip[10..12].copy_from_slice(&c.to_ne_bytes());
    let mut out = Vec::with_capacity(frame.len() + e.overhead());
    out.extend_from_slice(&e.hop.dmac);
    out.extend_from_slice(&e.hop.smac);
    out.extend_from_slice(&[0x08, 0x00]);
    out.extend_from_slice(&ip);
    if gue {
        out.extend_from_slice(&e.gue_sport.to_ne_bytes());
        out.extend_from_slice(&e.gue_dport.to_ne_bytes());
        out.extend_from_slice(&((inner_len + 8) as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
    }
    out.extend_from_slice(inner);
    out
}

/// Whether an encapsulated frame's outer IPv4 header checksum verifies.
pub fn outer_checksum_right(out: &[u8]) -> bool {
    out.len() >= ETH + 20 && nat::fold(nat::sum(&out[ETH..ETH + 20])) == 0xffff
}
