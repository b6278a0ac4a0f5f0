//! The connection tables as a packet meets them: which state its flow is
//! in (`lookup`), when an entry expires, and how a packet keeps one alive.
//! Writing entries is `flow`'s.
//!
//! Entries are used through references into the maps (`get`, or a value
//! pointer). The tables are preallocated, so an element's memory stays the
//! map's while the program runs, even when another CPU deletes the entry,
//! and every bit pattern is a valid `ConnEntry`: a reference is always to
//! a valid value. What another CPU can do is recycle the element for
//! another key meanwhile; the reference then shows that flow's values.
//! Readers check that an entry is the one they looked for (`owned_by`)
//! where acting on another flow's would matter, and otherwise act on it
//! for this one packet, as they would on a packet that raced the change.

use aya_ebpf::maps::LruHashMap;
use router_common::{CONN_CLOSING, ConnEntry, ConnKey, PROTO_TCP};

use crate::{
    clock::Clock,
    flags, inflight,
    maps::{CONNS, HALF_OPEN, TCP_CLOSING_NS, TCP_IDLE_NS, UDP_IDLE_NS},
};

/// An entry is refreshed at most this often, so an established flow does
/// not bounce its entry's cache line between CPUs (`DSR_FLOWS` too).
pub const REFRESH_NS: u64 = 1_000_000_000;

/// Which packet of its flow a packet is, as the counters see it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The packet created the flow: a new connection.
    NewFlow,
    /// A later packet, found in a connection table.
    Tracked,
}

/// Which connection table holds a flow.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Confirmed flows.
    Conns,
    /// New flows, until the client's next packet.
    HalfOpen,
}

impl Table {
    #[inline(always)]
    pub fn map(self) -> &'static LruHashMap<ConnKey, ConnEntry> {
        match self {
            Table::Conns => &CONNS,
            Table::HalfOpen => &HALF_OPEN,
        }
    }
}

/// Whether entry `e` of `table` has outlived its timeout. A half-open flow
/// gets the short closing timeout: a handshake (or a client's second
/// datagram) takes a round trip, and a spoofed packet's entries must not
/// hold their SNAT port for the idle timeout. A client that answers later
/// is picked up mid-stream like an evicted flow, and a UDP client that
/// sends once and waits longer opens a new flow to the same backend while
/// the weights are unchanged.
#[inline(always)]
pub fn expired(table: Table, e: &ConnEntry, now: u64, proto: u8) -> bool {
    idle_past(
        e.last_seen_ns,
        now,
        e.is_closing() || table == Table::HalfOpen,
        proto,
    )
}

/// Whether an entry last seen at `last_seen_ns` has been idle past its
/// timeout: the closing one, else its protocol's. `DSR_FLOWS` entries
/// expire by the same rule.
#[inline(always)]
pub fn idle_past(last_seen_ns: u64, now: u64, closing: bool, proto: u8) -> bool {
    let timeout = if closing {
        TCP_CLOSING_NS.load()
    } else if proto == PROTO_TCP {
        TCP_IDLE_NS.load()
    } else {
        UDP_IDLE_NS.load()
    };
    now.saturating_sub(last_seen_ns) > timeout
}

/// Keeps an entry alive. Writes at most once a second (or on FIN/RST) so an
/// established flow does not bounce the entry's cache line between CPUs.
/// Returns whether this packet marked the entry closing (see
/// `inflight::on_close`).
#[inline(always)]
pub fn refresh(e: &mut ConnEntry, now: u64, fin_or_rst: bool) -> bool {
    if fin_or_rst && !e.is_closing() {
        e.last_seen_ns = now;
        return flags::first_to_set(e, CONN_CLOSING);
    }
    if now.saturating_sub(e.last_seen_ns) > REFRESH_NS {
        e.last_seen_ns = now;
    }
    false
}

/// A `ConnKey`, built as four words: a struct literal with `_pad: [0; 3]`
/// compiles to a call of a byte-wise BPF memset on every packet.
#[inline(always)]
pub fn key(src_addr: u32, dst_addr: u32, src_port: u16, dst_port: u16, proto: u8) -> ConnKey {
    let (s, d) = (src_port.to_ne_bytes(), dst_port.to_ne_bytes());
    let words = [
        src_addr,
        dst_addr,
        u32::from_ne_bytes([s[0], s[1], d[0], d[1]]),
        u32::from_ne_bytes([proto, 0, 0, 0]),
    ];
    // SAFETY: ConnKey is repr(C), 16 bytes, 4-aligned, padded explicitly,
    // and every bit pattern is a valid value; the words follow its field order.
    unsafe { core::mem::transmute::<[u32; 4], ConnKey>(words) }
}

/// The reply-direction key that a forward entry created.
#[inline(always)]
pub fn reply_key(fwd: &ConnEntry, proto: u8) -> ConnKey {
    key(
        fwd.new_dst_addr,
        fwd.new_src_addr,
        fwd.new_dst_port,
        fwd.new_src_port,
        proto,
    )
}

/// Whether `e` is the reply entry of the flow whose forward key is `fwd`:
/// it translates back to exactly that client and VIP. A reply key held by
/// a flow's own reply entry is that flow's to reuse.
#[inline(always)]
pub fn owned_by(e: &ConnEntry, fwd: &ConnKey) -> bool {
    e.is_reply()
        && e.new_dst_addr == fwd.src_addr
        && e.new_dst_port == fwd.src_port
        && e.new_src_addr == fwd.dst_addr
        && e.new_src_port == fwd.dst_port
}

/// Whether a SYN (without ACK) that finds entry `e` of `table` at its key
/// opens a new connection rather than retransmitting the one `e` holds.
/// A client's stack never sends a SYN on a connection it still has, so a
/// SYN is a retransmit only while both directions of the flow are live and
/// open. Otherwise it is a new connection on a reused 4-tuple (clients
/// cycle through their ports), and riding the old entry would skip the
/// Maglev pick and, once the old reply entry has expired, lose the
/// backend's SYN-ACK: after a backend's RST, say, the client sends nothing
/// more and the forward entry outlives its reply entry by the idle timeout.
/// The same holds for a half-open flow whose reply entry the LRU dropped:
/// every SYN-ACK would miss it.
#[inline(always)]
pub fn syn_starts_over(table: Table, key: &ConnKey, e: &ConnEntry, now: u64) -> bool {
    if e.is_closing() {
        return true;
    }
    if e.is_reply() {
        return false;
    }
    // SAFETY: a table value, read at once (see the module's note); a
    // recycled element fails `owned_by`.
    match unsafe { table.map().get(reply_key(e, key.proto)) } {
        Some(r) => !owned_by(r, key) || r.is_closing() || expired(table, r, now, key.proto),
        None => true,
    }
}

/// The state of a packet's flow, as its key finds it in the tables. The
/// entries are references into the tables (see the module's note).
pub enum Lookup<'a> {
    /// A live forward entry in CONNS: a confirmed flow's client packet.
    Established(&'a mut ConnEntry),
    /// A live reply entry, in either table: the backend's packet.
    Reply(&'a mut ConnEntry),
    /// A live forward entry in HALF_OPEN: the flow waits for its client's
    /// second packet to confirm it.
    HalfOpen(&'a mut ConnEntry),
    /// An entry that a new flow replaces.
    Stale(Stale),
    /// No entry at all.
    Miss,
}

impl Lookup<'_> {
    /// The entry that a new flow replaces: the `Stale` state's, none for
    /// any other.
    #[inline(always)]
    pub fn stale(self) -> Option<Stale> {
        match self {
            Lookup::Stale(stale) => Some(stale),
            _ => None,
        }
    }
}

/// An entry at a packet's key that does not carry the packet: expired, or
/// live but ended by a SYN that opens a new connection on its 4-tuple. A
/// copy, because creating the new flow removes or overwrites the element.
#[derive(Clone, Copy)]
pub struct Stale {
    pub entry: ConnEntry,
    pub table: Table,
}

/// Finds the flow of the packet with key `key`. CONNS first: a flow is in
/// HALF_OPEN only until it is confirmed.
#[inline(always)]
pub fn lookup<'a>(key: &ConnKey, syn: bool, clock: &mut Clock) -> Lookup<'a> {
    if let Some(e) = CONNS.get_ptr_mut(key) {
        // SAFETY: a table value (see the module's note); this packet's
        // entry, which the program writes only through `flags` where
        // another CPU may write too.
        return state(Table::Conns, key, unsafe { &mut *e }, syn, clock);
    }
    if let Some(e) = HALF_OPEN.get_ptr_mut(key) {
        // SAFETY: as above.
        return state(Table::HalfOpen, key, unsafe { &mut *e }, syn, clock);
    }
    Lookup::Miss
}

/// The state of the flow whose entry `e` was found in `table`. Called
/// with a constant `table` from each branch of `lookup`, so each inlined
/// copy is specialised to its table.
#[inline(always)]
fn state<'a>(
    table: Table,
    key: &ConnKey,
    e: &'a mut ConnEntry,
    syn: bool,
    clock: &mut Clock,
) -> Lookup<'a> {
    // A SYN stamps its connect time, and an entry awaiting a measurement
    // takes one: either reads the fine clock, so it is the one read.
    let now = clock.ns(syn || e.awaits_latency());
    let expired = expired(table, e, now, key.proto);
    // A SYN on a closed or half-gone flow is a new connection.
    let restarts = syn && syn_starts_over(table, key, e, now);
    if !expired && !restarts {
        return if e.is_reply() {
            Lookup::Reply(e)
        } else if table == Table::Conns {
            Lookup::Established(e)
        } else {
            Lookup::HalfOpen(e)
        };
    }
    // The new connection ends the live one on its 4-tuple; an expired
    // one is the daemon's to uncount (see `inflight`).
    if !expired {
        inflight::release(e);
    }
    Lookup::Stale(Stale { entry: *e, table })
}
