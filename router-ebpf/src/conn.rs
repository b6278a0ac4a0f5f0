//! The connection table: expiry of entries, and creation of both directions
//! of a new flow (Maglev pick, SNAT port allocation).

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::generated::bpf_ktime_get_coarse_ns,
};
use router_common::{
    CONN_AWAIT_REQUEST, CONN_AWAIT_SYNACK, CONN_CLOSING, CONN_REPLY, ConnEntry, ConnKey,
    MAX_SNAT_ADDRS, NO_BACKEND, PROTO_TCP, SNAT_PROBES, Service, flow_hash::flow_hash,
};

use crate::{
    latency::now_us,
    maps::{BACKENDS, CONNS, MAGLEV_TABLES, TABLE_SIZE, TCP_CLOSING_NS, TCP_IDLE_NS, UDP_IDLE_NS},
    mem::zeroed64,
    nat::deltas,
};

const REFRESH_NS: u64 = 1_000_000_000;

#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
pub fn expired(e: &ConnEntry, now: u64, proto: u8) -> bool {
    let timeout = if e.flags & CONN_CLOSING != 0 {
        TCP_CLOSING_NS.load()
    } else if proto == PROTO_TCP {
        TCP_IDLE_NS.load()
    } else {
        UDP_IDLE_NS.load()
    };
    now.saturating_sub(e.last_seen_ns) > timeout
}

/// Keeps an entry alive. Writes at most once a second (or on FIN/RST) so an
/// established flow does not bounce the entry's cache line between CPUs.
#[inline(always)]
pub fn refresh(e: &mut ConnEntry, now: u64, fin_or_rst: bool) {
    if fin_or_rst && e.flags & CONN_CLOSING == 0 {
        e.flags |= CONN_CLOSING;
        e.last_seen_ns = now;
    } else if now.saturating_sub(e.last_seen_ns) > REFRESH_NS {
        e.last_seen_ns = now;
    }
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

/// What the creating packet says about the flow.
#[derive(Clone, Copy)]
pub struct FlowFlags {
    pub syn: bool,
    pub fin_or_rst: bool,
}

pub enum NewFlow {
    /// Both directions are in CONNS; the forward entry is in `out` for this packet.
    Created,
    NoBackend,
    SnatExhausted,
    TableFull,
}

/// Maglev pick for a flow: the backend id in the service's live table half.
#[inline(always)]
fn pick(svc: &Service, hash: u32) -> u32 {
    // checked_rem: a plain `%` would keep a divide-by-zero panic path, which
    // the verifier rejects; the loader guarantees a non-zero size anyway.
    let size = TABLE_SIZE.load();
    let Some(slot) = hash.checked_rem(size) else {
        return NO_BACKEND;
    };
    let idx = (svc.id * 2 + (svc.active_table & 1)) * size + slot;
    match MAGLEV_TABLES.get(idx) {
        Some(id) => *id,
        None => NO_BACKEND,
    }
}

/// Creates both directions of a new flow. `stale` is an expired or closed
/// forward entry for the same key, whose reply entry is removed first so its
/// SNAT port (often the client's own) is free again. `out` is an all-zero
/// entry that receives the forward direction. A flow created by a SYN
/// starts its latency measurements (see `latency`).
#[inline(always)]
pub fn create(
    key: &ConnKey,
    svc: &Service,
    stale: Option<ConnEntry>,
    now: u64,
    flags: FlowFlags,
    out: &mut ConnEntry,
) -> NewFlow {
    let hash = flow_hash(
        key.src_addr,
        key.dst_addr,
        key.src_port,
        key.dst_port,
        key.proto,
    );
    let backend_id = pick(svc, hash);
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
    if let Some(old) = stale
        && old.flags & CONN_REPLY == 0
    {
        let _ = CONNS.remove(reply_key(&old, key.proto));
    }

    let await_synack = if flags.syn { CONN_AWAIT_SYNACK } else { 0 };
    let Some((snat_addr, snat_port)) = allocate_snat(
        key,
        svc,
        hash,
        (be_addr, be_port, backend_id),
        now,
        await_synack,
    ) else {
        return NewFlow::SnatExhausted;
    };

    let (l3, l4) = deltas(
        (key.src_addr, key.dst_addr, key.src_port, key.dst_port),
        (snat_addr, be_addr, snat_port, be_port),
    );
    let fwd = out;
    fwd.new_src_addr = snat_addr;
    fwd.new_dst_addr = be_addr;
    fwd.new_src_port = snat_port;
    fwd.new_dst_port = be_port;
    fwd.l3_csum_delta = l3;
    fwd.l4_csum_delta = l4;
    fwd.backend_id = backend_id;
    fwd.service_id = svc.id;
    fwd.flags = if flags.fin_or_rst { CONN_CLOSING } else { 0 }
        | if flags.syn { CONN_AWAIT_REQUEST } else { 0 };
    fwd.last_seen_ns = now;
    // Passed by reference: the entry is inserted from where it was built.
    let value: &ConnEntry = fwd;
    if CONNS.insert(key, value, BPF_ANY as u64).is_err() {
        let _ = CONNS.remove(reply_key(fwd, key.proto));
        return NewFlow::TableFull;
    }
    NewFlow::Created
}

/// Claims a (SNAT address, port) pair by inserting the reply entry with
/// BPF_NOEXIST: the insert itself is the atomic test-and-set, so two CPUs can
/// never hand out the same pair. The client's own port is tried first so a
/// client that reuses its 4-tuple lands on the same backend 4-tuple (and the
/// backend's TIME_WAIT logic sees exactly what a direct connection would).
#[inline(always)]
fn allocate_snat(
    key: &ConnKey,
    svc: &Service,
    hash: u32,
    (be_addr, be_port, backend_id): (u32, u16, u32),
    now: u64,
    await_synack: u32,
) -> Option<(u32, u16)> {
    let stamp_us = if await_synack != 0 { now_us() } else { 0 };
    let count = if svc.snat_count == 0 || svc.snat_count > MAX_SNAT_ADDRS as u32 {
        1
    } else {
        svc.snat_count
    };
    let span = (svc.snat_port_max as u32).saturating_sub(svc.snat_port_min as u32) + 1;
    for attempt in 0..=SNAT_PROBES {
        let addr_idx = (hash >> 16)
            .wrapping_add(attempt)
            .checked_rem(count)
            .unwrap_or(0) as usize;
        let snat_addr = *svc.snat_addrs.get(addr_idx)?;
        // On attempt 0 the port is the client's own, already in wire order.
        let snat_port = if attempt == 0 {
            key.src_port
        } else {
            let r = hash
                .wrapping_add(attempt.wrapping_mul(0x9e37_79b9))
                .checked_rem(span)
                .unwrap_or(0);
            ((svc.snat_port_min as u32 + r) as u16).to_be()
        };
        let rkey = self::key(be_addr, snat_addr, be_port, snat_port, key.proto);
        let (l3, l4) = deltas(
            (be_addr, snat_addr, be_port, snat_port),
            (key.dst_addr, key.src_addr, key.dst_port, key.src_port),
        );
        let mut slot = MaybeUninit::uninit();
        let reply: &mut ConnEntry = zeroed64(&mut slot);
        reply.new_src_addr = key.dst_addr;
        reply.new_dst_addr = key.src_addr;
        reply.new_src_port = key.dst_port;
        reply.new_dst_port = key.src_port;
        reply.l3_csum_delta = l3;
        reply.l4_csum_delta = l4;
        reply.backend_id = backend_id;
        reply.service_id = svc.id;
        reply.flags = CONN_REPLY | await_synack;
        reply.stamp_us = stamp_us;
        reply.last_seen_ns = now;
        let value: &ConnEntry = reply;
        if CONNS.insert(rkey, value, BPF_NOEXIST as u64).is_ok() {
            return Some((snat_addr, snat_port));
        }
    }
    None
}
