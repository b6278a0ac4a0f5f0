//! The two connection tables as the model keeps them, and the rules for
//! their entries: when an entry has expired, whose reply key is whose, who
//! may take a reply key from whom, and how a half-open flow is confirmed.
//!
//! Time is an entry's age in whole seconds at the start of a session, with
//! the session itself taking no time: the harness seeds ages far from every
//! timeout and keeps sessions far shorter than the gaps (see `super`).

use std::collections::HashMap;

use router_common::{CONN_CLOSING, CONN_HEARD, CONN_REPLY, ConnEntry, ConnKey, PROTO_TCP};

use super::nat::{Tuple, delta_classes};

/// Which table holds an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    /// CONNS: confirmed flows, UDP flows, flows picked up mid-stream.
    Conns,
    /// HALF_OPEN: flows opened by a SYN whose client has not answered.
    HalfOpen,
}

/// A cached next hop, as an entry carries it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Hop {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub ifindex: u32,
    /// Generation it was resolved under; 0 means none.
    pub fib_gen: u32,
}

/// One direction of a flow: where its packets are translated to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    pub to: Tuple,
    pub backend_id: u32,
    pub service_id: u32,
    pub flags: u32,
    pub hop: Hop,
    /// Seconds since the last refresh.
    pub age: u64,
    /// TCP: the end of the furthest segment heard in this direction
    /// (meaningful with `CONN_HEARD`); 0 otherwise.
    pub seq_next: u32,
}

impl Entry {
    pub fn heard(&self) -> bool {
        self.flags & CONN_HEARD != 0
    }

    pub fn is_reply(&self) -> bool {
        self.flags & CONN_REPLY != 0
    }

    pub fn closing(&self) -> bool {
        self.flags & CONN_CLOSING != 0
    }

    /// The kernel's form of this entry at `key`, stamped `now_ns - age`.
    pub fn to_kernel(&self, key: &ConnKey, now_ns: u64) -> ConnEntry {
        let (l3, l4) = delta_classes(key_tuple(key), self.to);
        ConnEntry {
            new_src_addr: self.to.src_addr,
            new_dst_addr: self.to.dst_addr,
            new_src_port: self.to.src_port,
            new_dst_port: self.to.dst_port,
            l3_csum_delta: l3,
            l4_csum_delta: l4,
            seq_next: self.seq_next,
            dmac: self.hop.dmac,
            smac: self.hop.smac,
            ifindex: self.hop.ifindex,
            fib_gen: self.hop.fib_gen,
            backend_id: self.backend_id,
            service_id: self.service_id,
            flags: self.flags,
            stamp_us: 0,
            last_seen_ns: now_ns.saturating_sub(self.age * 1_000_000_000),
        }
    }

    /// The clock-free part of a kernel entry, for comparison with the
    /// model's: the timestamps are dropped, and the checksum deltas, which
    /// are a function of key and translation, are checked to be that.
    pub fn from_kernel(key: &ConnKey, e: &ConnEntry) -> Result<Entry, String> {
        let to = Tuple {
            src_addr: e.new_src_addr,
            dst_addr: e.new_dst_addr,
            src_port: e.new_src_port,
            dst_port: e.new_dst_port,
        };
        let want = delta_classes(key_tuple(key), to);
        let have = (
            super::nat::class(u64::from(e.l3_csum_delta)),
            super::nat::class(u64::from(e.l4_csum_delta)),
        );
        if want != have {
            return Err(format!(
                "checksum deltas {:#x}/{:#x} do not translate {key:?} to {to:?} (want classes {want:x?})",
                e.l3_csum_delta, e.l4_csum_delta
            ));
        }
        Ok(Entry {
            to,
            backend_id: e.backend_id,
            service_id: e.service_id,
            flags: e.flags,
            hop: Hop {
                dmac: e.dmac,
                smac: e.smac,
                ifindex: e.ifindex,
                fib_gen: e.fib_gen,
            },
            age: 0,
            seq_next: e.seq_next,
        })
    }
}

/// The source and destination a key stands for, as a translation's origin.
pub fn key_tuple(k: &ConnKey) -> Tuple {
    Tuple {
        src_addr: k.src_addr,
        dst_addr: k.dst_addr,
        src_port: k.src_port,
        dst_port: k.dst_port,
    }
}

pub fn conn_key(t: Tuple, proto: u8) -> ConnKey {
    ConnKey {
        src_addr: t.src_addr,
        dst_addr: t.dst_addr,
        src_port: t.src_port,
        dst_port: t.dst_port,
        proto,
        _pad: [0; 3],
    }
}

/// Where the backend's answers to a flow translated to `to` arrive.
pub fn reply_key_of(to: Tuple, proto: u8) -> ConnKey {
    conn_key(
        Tuple {
            src_addr: to.dst_addr,
            dst_addr: to.src_addr,
            src_port: to.dst_port,
            dst_port: to.src_port,
        },
        proto,
    )
}

/// Timeouts in seconds, as loaded.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub tcp_idle: u64,
    pub tcp_closing: u64,
    pub udp_idle: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    pub conns: HashMap<ConnKey, Entry>,
    pub half_open: HashMap<ConnKey, Entry>,
}

impl Tables {
    pub fn map(&self, t: Table) -> &HashMap<ConnKey, Entry> {
        match t {
            Table::Conns => &self.conns,
            Table::HalfOpen => &self.half_open,
        }
    }

    pub fn map_mut(&mut self, t: Table) -> &mut HashMap<ConnKey, Entry> {
        match t {
            Table::Conns => &mut self.conns,
            Table::HalfOpen => &mut self.half_open,
        }
    }

    pub fn get(&self, t: Table, k: &ConnKey) -> Option<&Entry> {
        self.map(t).get(k)
    }

    /// A key's entry where the datapath asks both tables: CONNS answers
    /// if it has one, live or not, and HALF_OPEN only otherwise. (The
    /// claim rules keep a key in one table at a time; seeded states may
    /// break that, and this says which entry wins then.)
    pub fn lookup(&self, k: &ConnKey) -> Option<&Entry> {
        self.conns.get(k).or_else(|| self.half_open.get(k))
    }
}

impl Timeouts {
    /// A half-open entry, or a closing one, lives for the closing timeout:
    /// a handshake takes a round trip. Otherwise the idle timeout of the
    /// packet's protocol applies.
    pub fn expired(&self, table: Table, e: &Entry, proto: u8) -> bool {
        e.age > self.limit(e.closing() || table == Table::HalfOpen, proto)
    }

    /// The timeout, in seconds, of an entry that is closing (or not) in a
    /// flow of `proto`.
    pub fn limit(&self, closing: bool, proto: u8) -> u64 {
        if closing {
            self.tcp_closing
        } else if proto == PROTO_TCP {
            self.tcp_idle
        } else {
            self.udp_idle
        }
    }
}

/// Whether `e` is the reply entry of the flow `fwd` (a client's key): it
/// translates back to exactly that client and VIP.
pub fn owned_by(e: &Entry, fwd: &ConnKey) -> bool {
    e.is_reply()
        && e.to.dst_addr == fwd.src_addr
        && e.to.dst_port == fwd.src_port
        && e.to.src_addr == fwd.dst_addr
        && e.to.src_port == fwd.dst_port
}

/// A packet on a live entry keeps it alive; the first FIN or RST makes it
/// closing (and restarts its clock under the short timeout). Returns
/// whether this packet made it closing.
pub fn refresh(e: &mut Entry, fin_or_rst: bool) -> bool {
    let newly = fin_or_rst && !e.closing();
    if newly {
        e.flags |= CONN_CLOSING;
    }
    e.age = 0;
    newly
}

/// The reply entry a flow needs at `rkey`, translating back to `fwd`'s
/// client and VIP.
pub fn reply_entry(fwd: &ConnKey, backend_id: u32, service_id: u32, flags: u32) -> Entry {
    Entry {
        to: Tuple {
            src_addr: fwd.dst_addr,
            dst_addr: fwd.src_addr,
            src_port: fwd.dst_port,
            dst_port: fwd.src_port,
        },
        backend_id,
        service_id,
        flags: CONN_REPLY | flags,
        hop: Hop::default(),
        age: 0,
        seq_next: 0,
    }
}

impl Tables {
    /// Who may take reply key `rkey` for flow `fwd` going into `target`:
    ///
    /// - into HALF_OPEN: anyone but a live confirmed flow (an entry in
    ///   CONNS that is neither the flow's own nor expired); a CONNS entry
    ///   that is the flow's own or expired is dropped, and whatever
    ///   HALF_OPEN held there is replaced (the newest SYN takes the key).
    /// - into CONNS: a free key, the flow's own reply entry, or an expired
    ///   one; a half-open holder of the key loses it.
    ///
    /// Returns whether the key is the flow's now (holding `reply`).
    pub fn claim(
        &mut self,
        t: &Timeouts,
        target: Table,
        rkey: ConnKey,
        reply: Entry,
        fwd: &ConnKey,
    ) -> bool {
        let held = self.conns.get(&rkey).copied();
        match target {
            Table::HalfOpen => {
                if let Some(e) = held {
                    if !owned_by(&e, fwd) && !t.expired(Table::Conns, &e, fwd.proto) {
                        return false;
                    }
                    self.conns.remove(&rkey);
                }
                self.half_open.insert(rkey, reply);
                true
            }
            Table::Conns => {
                let free = match held {
                    None => true,
                    Some(e) => owned_by(&e, fwd) || t.expired(Table::Conns, &e, fwd.proto),
                };
                if free {
                    self.conns.insert(rkey, reply);
                    self.half_open.remove(&rkey);
                }
                free
            }
        }
    }

    /// Confirms the half-open flow `fwd` (forward entry `e`) if `proof`
    /// holds for its reply entry: both directions move to CONNS, the reply
    /// entry as it is. A flow whose reply entry HALF_OPEN no longer holds
    /// for it cannot be proven and stays. When CONNS refuses the reply key
    /// (a live confirmed flow holds it), nothing moves either.
    pub fn promote(
        &mut self,
        t: &Timeouts,
        fwd: &ConnKey,
        e: Entry,
        proof: impl Fn(&Entry) -> bool,
    ) -> Promotion {
        let rkey = reply_key_of(e.to, fwd.proto);
        let reply = match self.half_open.get(&rkey) {
            Some(r) if owned_by(r, fwd) && proof(r) => *r,
            _ => return Promotion::Unproven,
        };
        if !self.claim(t, Table::Conns, rkey, reply, fwd) {
            return Promotion::Refused;
        }
        self.conns.insert(*fwd, e);
        self.half_open.remove(fwd);
        Promotion::Moved
    }
}

/// What a client packet did to its half-open flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Promotion {
    Moved,
    /// Proven, but CONNS refused the reply key.
    Refused,
    /// The packet does not prove the flow.
    Unproven,
}
