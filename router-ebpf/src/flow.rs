//! Writing a flow's two entries: creation of both directions of a new flow
//! in HALF_OPEN (backend pick, SNAT port allocation), and the move of a
//! confirmed flow to CONNS.
//!
//! A reply key (backend, SNAT address and port) belongs to at most one flow
//! across both tables: it is what the backend sees, and two flows sharing
//! it would be one connection to the backend.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    programs::XdpContext,
};
use router_common::{
    CONN_AWAIT_REQUEST, CONN_AWAIT_SYNACK, CONN_CLOSING, CONN_COUNTED, CONN_HEARD, CONN_REPLY,
    ConnEntry, ConnKey, MAX_SNAT_ADDRS, NO_BACKEND, OWN_PAIR_ATTEMPTS, PROTO_TCP, SNAT_PROBES,
    Service, csum, flow_hash::flow_hash, reasons::Reason,
};

use crate::{
    classify::Packet,
    clock::Clock,
    conn::{Stale, Table, expired, key, owned_by, reply_key},
    host_socket, inflight,
    maps::{
        BACKENDS, CONNS, EPHEMERAL_PORT_MAX, EPHEMERAL_PORT_MIN, FLOW_HASH_KEY0, FLOW_HASH_KEY1,
        HALF_OPEN,
    },
    mem::zeroed64,
    nat::deltas,
    pool, select, seq, stats,
};

/// Fills `reply` (all zero) as the reply entry of flow `fwd` translated to
/// (SNAT address, backend, SNAT port, backend port).
#[inline(always)]
fn fill_reply(
    reply: &mut ConnEntry,
    fwd: &ConnKey,
    (snat_addr, be_addr, snat_port, be_port): (u32, u32, u16, u16),
) {
    let (l3, l4) = deltas(
        (be_addr, snat_addr, be_port, snat_port),
        (fwd.dst_addr, fwd.src_addr, fwd.dst_port, fwd.src_port),
    );
    reply.new_src_addr = fwd.dst_addr;
    reply.new_dst_addr = fwd.src_addr;
    reply.new_src_port = fwd.dst_port;
    reply.new_dst_port = fwd.src_port;
    reply.l3_csum_delta = csum::fold(l3);
    reply.l4_csum_delta = csum::fold(l4);
}

/// Removes the reply entry at `rkey` from `table` if it is the flow `fwd`'s
/// own: a stale flow's reply key may have gone to another flow since.
#[inline(always)]
fn remove_own_reply(table: Table, rkey: ConnKey, fwd: &ConnKey) {
    let map = table.map();
    // SAFETY: a table value, read at once (see `conn`); a recycled element
    // fails `owned_by` and stays.
    if let Some(e) = unsafe { map.get(rkey) }
        && owned_by(e, fwd)
    {
        let _ = map.remove(rkey);
    }
}

/// Claims reply key `rkey` (a backend 4-tuple) for flow `fwd`. Who may take
/// a key from whom decides whether a flow that lost its entries can be
/// found again on its own 4-tuple, so the rule is strict:
///
/// - A confirmed flow (going into CONNS) holds its key against everyone
///   while it lives. Claims there use BPF_NOEXIST, the atomic test-and-set,
///   so two CPUs never hand out the same key; a key held by the flow's own
///   reply entry is reused (its forward entry was evicted), one held by an
///   expired entry is free.
/// - A half-open flow holds its key only against other half-open flows that
///   came before it: the newest SYN takes the key. Otherwise a SYN flood
///   would push real handshakes onto probed ports whenever the client's own
///   port was held by a spoofed flow, and a probed port cannot be found
///   again once the LRU has evicted both of a flow's entries. A real flow
///   that loses its key this way sees its SYN-ACK go astray and starts over
///   with its retransmitted SYN (see `syn_starts_over`).
/// - A flow going into CONNS takes its key from a half-open flow: its
///   client's packet has proved it real; the half-open flow may be spoofed.
///
/// So a key is held against a new flow only by a live confirmed flow, and
/// the client's own port is the flow's 4-tuple unless a confirmed flow held
/// it at the SYN; the probe sequence is then the same the next time. The
/// check of the other table and the insert are two steps; a flow claiming
/// the same key in the other table in between would need the same backend,
/// SNAT address and port on another CPU within those few instructions.
#[inline(always)]
fn claim_reply(target: Table, rkey: ConnKey, reply: &ConnEntry, fwd: &ConnKey, now: u64) -> bool {
    match target {
        Table::HalfOpen => {
            // SAFETY: a table value, read at once (see `conn`).
            if let Some(e) = unsafe { CONNS.get(rkey) } {
                if !owned_by(e, fwd) && !expired(Table::Conns, e, now, fwd.proto) {
                    return false;
                }
                let _ = CONNS.remove(rkey);
            }
            HALF_OPEN.insert(rkey, reply, BPF_ANY as u64).is_ok()
        }
        Table::Conns => {
            // Looked up before any BPF_NOEXIST insert: a failing insert into
            // an LRU map has already taken a free node, evicting some live
            // flow's entry if none was free. A key taken on another CPU
            // between the two steps still fails the insert, as it should.
            // SAFETY: a table value, read at once (see `conn`).
            let claimed = match unsafe { CONNS.get(rkey) } {
                None => CONNS.insert(rkey, reply, BPF_NOEXIST as u64).is_ok(),
                Some(e) if owned_by(e, fwd) => CONNS.insert(rkey, reply, BPF_ANY as u64).is_ok(),
                Some(e) if expired(Table::Conns, e, now, fwd.proto) => {
                    let _ = CONNS.remove(rkey);
                    CONNS.insert(rkey, reply, BPF_NOEXIST as u64).is_ok()
                }
                _ => false,
            };
            if claimed {
                let _ = HALF_OPEN.remove(rkey);
            }
            claimed
        }
    }
}

/// What the client's packet on a half-open flow did to it.
pub enum Confirm<'a> {
    /// The flow moved to CONNS; the entry is its forward entry there.
    Promoted(&'a mut ConnEntry),
    /// The packet proved the flow, but CONNS refused the move (a live
    /// confirmed flow holds its reply key): it goes on from HALF_OPEN.
    Refused(&'a mut ConnEntry),
    /// The packet does not prove the flow (see `seq::confirms`): it stays
    /// half-open.
    Unproven(&'a mut ConnEntry),
}

/// Confirms the half-open flow whose forward entry `half_open` (at
/// `pkt.key`) has just seen a client packet other than a SYN, if that
/// packet proves it real, and says which entry the packet goes on with.
#[inline(always)]
pub fn confirm<'a>(pkt: &Packet, half_open: &'a mut ConnEntry, now: u64) -> Confirm<'a> {
    match promote(pkt, half_open, now) {
        // SAFETY: a table value (see `conn`): the entry just inserted.
        // `half_open` is not used past here.
        Ok(p) => Confirm::Promoted(unsafe { &mut *p }),
        Err(Promotion::Refused) => Confirm::Refused(half_open),
        Err(Promotion::Unproven) => Confirm::Unproven(half_open),
    }
}

/// Why a half-open flow did not move.
enum Promotion {
    Refused,
    Unproven,
}

/// Moves a half-open flow into CONNS once its client's packet proves it
/// real: it acknowledges the backend's answer, which a spoofed source
/// never sees (see `seq::confirms`). The reply entry goes along with its
/// latency and sequence state; a flow whose reply entry the LRU dropped
/// cannot be proven and stays half-open (its packets still flow; a client
/// that goes on past the half-open timeout is picked up mid-stream).
/// Returns the forward entry's place in CONNS.
#[inline(always)]
fn promote(pkt: &Packet, half_open: &ConnEntry, now: u64) -> Result<*mut ConnEntry, Promotion> {
    let fwd_key = &pkt.key;
    let mut fslot = MaybeUninit::uninit();
    let fwd: &mut ConnEntry = zeroed64(&mut fslot);
    // A copy: the HALF_OPEN element is recycled once removed below.
    *fwd = *half_open;
    let rkey = reply_key(fwd, fwd_key.proto);
    let mut rslot = MaybeUninit::uninit();
    let reply: &mut ConnEntry = zeroed64(&mut rslot);
    // SAFETY: a table value, copied at once (see `conn`); a recycled
    // element fails `owned_by`.
    match unsafe { HALF_OPEN.get(rkey) } {
        Some(r) if owned_by(r, fwd_key) && seq::confirms(pkt, r) => *reply = *r,
        _ => return Err(Promotion::Unproven),
    }
    if !claim_reply(Table::Conns, rkey, reply, fwd_key, now) {
        return Err(Promotion::Refused);
    }
    let value: &ConnEntry = fwd;
    if CONNS.insert(fwd_key, value, BPF_ANY as u64).is_err() {
        let _ = CONNS.remove(rkey);
        return Err(Promotion::Refused);
    }
    let _ = HALF_OPEN.remove(fwd_key);
    CONNS.get_ptr_mut(fwd_key).ok_or(Promotion::Refused)
}

/// What became of a new flow.
pub enum NewFlow {
    /// Both directions are in HALF_OPEN; the forward entry is in `out` for this packet.
    Created,
    NoBackend,
    SnatExhausted,
    TableFull,
}

/// Creates both directions of a new flow in HALF_OPEN, whatever opened it:
/// a SYN, a UDP datagram, or a TCP packet of a flow picked up mid-stream
/// after its entries were lost. Only the client's next packet moves it to
/// CONNS (see `confirm`), so a flood of spoofed sources churns HALF_OPEN
/// alone whether it sends SYNs, ACKs or datagrams: each source sends one
/// packet. A `stale` forward entry at the same key and its reply entry
/// are removed first so the SNAT port (often the client's own) is free
/// again and the old entry cannot shadow the new one. `out` is an all-zero entry that receives the
/// forward direction. A flow created by a SYN starts its latency
/// measurements (see `latency`).
#[inline(always)]
pub fn create(
    ctx: &XdpContext,
    pkt: &Packet,
    svc: &Service,
    stale: Option<Stale>,
    clock: &mut Clock,
    out: &mut ConnEntry,
) -> NewFlow {
    let (key, control, l4) = (&pkt.key, pkt.control, &pkt.l4);
    let now = clock.ns(control.syn);
    let hash = flow_hash(
        [FLOW_HASH_KEY0.load(), FLOW_HASH_KEY1.load()],
        key.src_addr,
        key.dst_addr,
        key.src_port,
        key.dst_port,
        key.proto,
    );
    let fresh = control.syn || key.proto != PROTO_TCP;
    let Some(at) = pool::placement(svc, key.src_addr) else {
        return NewFlow::NoBackend;
    };
    let backend_id = select::backend(svc, &at, hash, fresh);
    if backend_id == NO_BACKEND {
        return NewFlow::NoBackend;
    }
    let Some(be) = BACKENDS.get(backend_id) else {
        return NewFlow::NoBackend;
    };
    if be.in_use == 0 {
        return NewFlow::NoBackend;
    }
    let (be_addr, be_port) = (be.addr, be.port);
    if let Some(Stale { entry: old, table }) = stale
        && !old.is_reply()
    {
        remove_own_reply(table, reply_key(&old, key.proto), key);
        // A stale HALF_OPEN entry is overwritten below; one in CONNS would
        // shadow the new flow.
        if table == Table::Conns {
            let _ = CONNS.remove(key);
        }
    }

    let Some((snat_addr, snat_port)) = allocate_snat(
        ctx,
        key,
        svc,
        hash,
        (be_addr, be_port, backend_id),
        now,
        control.syn.then(|| clock.us()),
    ) else {
        return NewFlow::SnatExhausted;
    };

    let (d3, d4) = deltas(
        (key.src_addr, key.dst_addr, key.src_port, key.dst_port),
        (snat_addr, be_addr, snat_port, be_port),
    );
    let fwd = out;
    fwd.new_src_addr = snat_addr;
    fwd.new_dst_addr = be_addr;
    fwd.new_src_port = snat_port;
    fwd.new_dst_port = be_port;
    fwd.l3_csum_delta = csum::fold(d3);
    fwd.l4_csum_delta = csum::fold(d4);
    fwd.backend_id = backend_id;
    fwd.service_id = svc.id;
    // Counted unless a RST opened it: that flow is over as it starts. The
    // client is heard: its first packet starts its sequence space.
    fwd.flags = CONN_HEARD
        | if control.fin_or_rst { CONN_CLOSING } else { 0 }
        | if control.syn { CONN_AWAIT_REQUEST } else { 0 }
        | if control.rst { 0 } else { CONN_COUNTED };
    if pkt.is_tcp() {
        fwd.seq_next = seq::end(l4);
    }
    fwd.last_seen_ns = now;
    // Passed by reference: the entry is inserted from where it was built.
    let value: &ConnEntry = fwd;
    if HALF_OPEN.insert(key, value, BPF_ANY as u64).is_err() {
        let _ = HALF_OPEN.remove(reply_key(fwd, key.proto));
        return NewFlow::TableFull;
    }
    if !control.rst {
        inflight::opened(backend_id);
    }
    NewFlow::Created
}

/// The `attempt`th (SNAT address, port) candidate of a flow: attempt 0 is
/// the client's own port (already in wire order), later ones are probed
/// across the service's range and addresses.
#[inline(always)]
fn snat_candidate(key: &ConnKey, svc: &Service, hash: u32, attempt: u32) -> Option<(u32, u16)> {
    let count = if svc.snat_count == 0 || svc.snat_count > MAX_SNAT_ADDRS as u32 {
        1
    } else {
        svc.snat_count
    };
    let addr_idx = (hash >> 16)
        .wrapping_add(attempt)
        .checked_rem(count)
        .unwrap_or(0) as usize;
    // LLVM proves the index below 4 and drops the bounds check, but the
    // verifier does not follow a modulo. Hidden from LLVM, the index keeps
    // a mask that the verifier can see.
    const { assert!(MAX_SNAT_ADDRS.is_power_of_two()) };
    let addr_idx = core::hint::black_box(addr_idx) & (MAX_SNAT_ADDRS - 1);
    let snat_addr = *svc.snat_addrs.get(addr_idx)?;
    let snat_port = if attempt == 0 {
        key.src_port
    } else {
        let span = (svc.snat_port_max as u32).saturating_sub(svc.snat_port_min as u32) + 1;
        let r = hash
            .wrapping_add(attempt.wrapping_mul(0x9e37_79b9))
            .checked_rem(span)
            .unwrap_or(0);
        ((svc.snat_port_min as u32 + r) as u16).to_be()
    };
    Some((snat_addr, snat_port))
}

/// The first attempt, up to `OWN_PAIR_ATTEMPTS`, whose reply key is held
/// by flow `key`'s own reply entry, in either table. For a flow re-created mid-stream: the LRU may
/// have evicted only its forward entry, and the surviving reply entry holds
/// the 4-tuple the backend knows the connection by. Any other candidate
/// (the client's own port, when the flow had been probed past it) would be
/// a connection the backend never saw.
#[inline(always)]
fn own_reply_attempt(
    key: &ConnKey,
    svc: &Service,
    hash: u32,
    (be_addr, be_port): (u32, u16),
) -> Option<u32> {
    for attempt in 0..=OWN_PAIR_ATTEMPTS {
        let (snat_addr, snat_port) = snat_candidate(key, svc, hash, attempt)?;
        let rkey = self::key(be_addr, snat_addr, be_port, snat_port, key.proto);
        // SAFETY (both): table values, read at once (see `conn`).
        let owned = match unsafe { CONNS.get(rkey) } {
            Some(e) => owned_by(e, key),
            None => match unsafe { HALF_OPEN.get(rkey) } {
                Some(e) => owned_by(e, key),
                None => false,
            },
        };
        if owned {
            return Some(attempt);
        }
    }
    None
}

/// Whether a new flow may take its client's own port as SNAT port, for
/// reply key `rkey`. SNAT addresses are the host's own, so the host's
/// stack may hold a connection of its own on that 4-tuple (the daemon's
/// health probe or telemetry poll of the same backend, say), and the
/// backend's answers on it must not be handed to a client. The host takes
/// such ports from its ephemeral range, which the daemon keeps clear of
/// `snat_port_range`: a client port outside it is free of them, one inside
/// it only while no host socket holds the 4-tuple (one socket lookup).
#[inline(always)]
fn client_port_usable(ctx: &XdpContext, rkey: &ConnKey) -> bool {
    let port = u16::from_be(rkey.dst_port) as u32;
    if port < EPHEMERAL_PORT_MIN.load() || port > EPHEMERAL_PORT_MAX.load() {
        return true;
    }
    !host_socket::has_socket(ctx, rkey)
}

/// Claims a (SNAT address, port) pair for a new flow by claiming its reply
/// key in HALF_OPEN (see `claim_reply`). The client's own port is tried
/// first (where the host cannot be using it: `client_port_usable`) so a
/// client that reuses its 4-tuple lands on the same backend 4-tuple (and
/// the backend's TIME_WAIT logic sees exactly what a direct connection
/// would). A flow not opened by a SYN first takes back a pair its own reply
/// entry still holds (see `own_reply_attempt`); a SYN (`syn_stamp_us`, the
/// microsecond stamp its connect latency is measured from) never looks, so
/// a SYN flood pays nothing for it.
#[inline(always)]
fn allocate_snat(
    ctx: &XdpContext,
    key: &ConnKey,
    svc: &Service,
    hash: u32,
    (be_addr, be_port, backend_id): (u32, u16, u32),
    now: u64,
    syn_stamp_us: Option<u32>,
) -> Option<(u32, u16)> {
    // A SYN starts the connect-latency measurement on the reply entry.
    let syn = syn_stamp_us.is_some();
    let (await_synack, stamp_us) = match syn_stamp_us {
        Some(us) => (CONN_AWAIT_SYNACK, us),
        None => (0, 0),
    };
    let own = if syn {
        None
    } else {
        own_reply_attempt(key, svc, hash, (be_addr, be_port))
    };
    // With an own pair, that one alone: the loop runs once, at its attempt.
    let (first, last) = match own {
        Some(a) => (a, a),
        None => (0, SNAT_PROBES),
    };
    for attempt in first..=last {
        let (snat_addr, snat_port) = snat_candidate(key, svc, hash, attempt)?;
        let rkey = self::key(be_addr, snat_addr, be_port, snat_port, key.proto);
        if attempt == 0 && own.is_none() && !client_port_usable(ctx, &rkey) {
            continue;
        }
        let mut slot = MaybeUninit::uninit();
        let reply: &mut ConnEntry = zeroed64(&mut slot);
        fill_reply(reply, key, (snat_addr, be_addr, snat_port, be_port));
        reply.backend_id = backend_id;
        reply.service_id = svc.id;
        reply.flags = CONN_REPLY | await_synack;
        reply.stamp_us = stamp_us;
        reply.last_seen_ns = now;
        if claim_reply(Table::HalfOpen, rkey, reply, key, now) {
            if attempt > 0 && own.is_none() {
                stats::reason(Reason::SnatPortProbed);
            }
            return Some((snat_addr, snat_port));
        }
    }
    None
}
