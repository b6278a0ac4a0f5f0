//! Creating an IPv6 NAT flow: the backend by the service's Maglev table,
//! a (SNAT address, port) pair whose reply key is free, and both entries in
//! `NAT6_CONNS`. As for IPv4 (see `flow`), a reply key (backend, SNAT
//! address and port) belongs to at most one flow, the client's own port is
//! tried first so the backend sees the client's 4-tuple, and a flow picked
//! up mid-stream takes back the pair its surviving reply entry holds.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    programs::XdpContext,
};
use router_common::{
    CONN_CLOSING, CONN_REPLY, MAX_SNAT_ADDRS, NO_BACKEND, OWN_PAIR_ATTEMPTS, SNAT_PROBES, Service,
    flow_hash::flow_hash6,
    reasons::Reason,
    v6::{Addr6, ConnKey6, NatEntry6, NatScratch6, Snat6},
};

use crate::{
    clock::Clock,
    conn, host_socket,
    maps::{
        BACKEND_ADDRS6, BACKENDS, EPHEMERAL_PORT_MAX, EPHEMERAL_PORT_MIN, FLOW_HASH_KEY0,
        FLOW_HASH_KEY1, NAT6_CONNS, NAT6_SCRATCH, SNAT6,
    },
    parse6::Packet6,
    pool, rewrite6, select, stats,
};

/// Words of a `NatScratch6`.
const SCRATCH_WORDS: usize = core::mem::size_of::<NatScratch6>() / 8;

/// What a flow's SNAT claim works from, on `create`'s stack: a BPF call
/// takes five arguments.
struct Claim<'a> {
    svc: &'a Service,
    snat: &'a Snat6,
    hash: u32,
}

/// Opens a flow of IPv6 NAT service `svc` for its first packet `pkt`: both
/// entries inserted, the packet's (forward) one last. A BPF function of its
/// own: the entry and keys it builds take its frame, not the packet path's.
#[inline(never)]
pub fn create(ctx: &XdpContext, pkt: &Packet6, svc: &Service, clock: &mut Clock) -> Reason {
    let key = &pkt.key;
    if pkt.is_tcp() && !pkt.syn {
        // Mid-flow with no entry (evicted, expired, the LB restarted):
        // re-hashed, to the same backend while the weights are unchanged.
        stats::reason(Reason::LruMiss);
    }
    let picked = pick(&pkt.key, svc);
    let (hash, backend_id) = ((picked >> 32) as u32, picked as u32);
    let (Some(be), Some(be_addr), Some(snat)) = (
        BACKENDS.get(backend_id),
        BACKEND_ADDRS6.get(backend_id),
        // SAFETY: a preallocated map value the daemon replaces whole; a
        // racing update can mix two of the service's address lists for
        // this one flow, each of them the service's.
        unsafe { SNAT6.get(svc.id) },
    ) else {
        return Reason::DropNoBackend;
    };
    if be.in_use == 0 {
        return Reason::DropNoBackend;
    }
    let Some(scratch) = scratch() else {
        return Reason::DropConnTableFull;
    };
    let NatScratch6 { entry: e, rkey } = scratch;
    e.backend_id = backend_id;
    e.service_id = svc.id;
    e.last_seen_ns = clock.ns(false);
    // The reply key: the backend's address and port; `claim` fills in the
    // SNAT pair.
    rkey.src_addr = *be_addr;
    rkey.src_port = be.port;
    rkey.proto = key.proto;
    if !claim(ctx, pkt, &Claim { svc, snat, hash }, rkey, e) {
        return Reason::DropSnatExhausted;
    }
    // The forward entry: client → VIP becomes SNAT → backend.
    e.new_src = rkey.dst_addr;
    e.new_dst = rkey.src_addr;
    e.new_src_port = rkey.dst_port;
    e.new_dst_port = rkey.src_port;
    e.l4_csum_delta = rewrite6::delta(
        &key.src_addr,
        &key.dst_addr,
        &rkey.dst_addr,
        &rkey.src_addr,
        rewrite6::ports((key.src_port, key.dst_port), (rkey.dst_port, rkey.src_port)),
    );
    e.flags = if pkt.fin_or_rst { CONN_CLOSING } else { 0 };
    // By reference: a value argument would be copied onto the stack.
    let entry: &NatEntry6 = e;
    if NAT6_CONNS.insert(key, entry, BPF_ANY as u64).is_err() {
        return Reason::DropConnTableFull;
    }
    Reason::Tx
}

/// This CPU's scratch entry and key, zeroed: built there, not on the
/// stack, which the program's functions share.
#[inline(always)]
fn scratch() -> Option<&'static mut NatScratch6> {
    let p = NAT6_SCRATCH.get_ptr_mut(0)?;
    let words = p.cast::<u64>();
    for i in 0..SCRATCH_WORDS {
        // SAFETY: `p` is this CPU's element of a per-CPU array, 8-aligned,
        // `SCRATCH_WORDS` words long, that nothing else writes while the
        // program runs here.
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: as above; all zero is a valid value.
    Some(unsafe { &mut *p })
}

/// The flow hash of `key` (high word) and the backend its service's table
/// gives it (low word, `NO_BACKEND` for none). A BPF function of its own:
/// the hash's and the table's registers spill into its frame.
#[inline(never)]
fn pick(key: &ConnKey6, svc: &Service) -> u64 {
    let hash = flow_hash6(
        [FLOW_HASH_KEY0.load(), FLOW_HASH_KEY1.load()],
        key.src_addr.words,
        key.dst_addr.words,
        key.src_port,
        key.dst_port,
        key.proto,
    );
    // No pools on an IPv6 service, so the client's address is not read.
    let backend_id = match pool::placement(svc, 0) {
        Some(at) => select::backend(svc, &at, hash, false),
        None => NO_BACKEND,
    };
    (u64::from(hash) << 32) | u64::from(backend_id)
}

/// Claims a (SNAT address, port) pair for flow `pkt` by inserting its
/// reply entry at reply key `rkey` (the backend's half filled in, the
/// pair written into it; the entry built in `e`, whose ids and stamp the
/// caller set). A flow not opened by a SYN first looks for a pair its own
/// reply entry still holds; then the client's own port (where the host
/// cannot be using it), then probed ports. A key held by a live entry of
/// another flow is skipped; a free one is taken with `BPF_NOEXIST`, so two
/// CPUs never hand out the same one. A BPF function of its own.
#[inline(never)]
fn claim(
    ctx: &XdpContext,
    pkt: &Packet6,
    c: &Claim,
    rkey: &mut ConnKey6,
    e: &mut NatEntry6,
) -> bool {
    let key = &pkt.key;
    let mut own = None;
    if !pkt.syn {
        for attempt in 0..OWN_PAIR_ATTEMPTS {
            if !candidate(rkey, key, c, attempt) {
                return false;
            }
            let k: &ConnKey6 = rkey;
            // SAFETY: a table value, read at once (see `conn`).
            if unsafe { NAT6_CONNS.get(k) }.is_some_and(|r| owned_by(r, key)) {
                own = Some(attempt);
                break;
            }
        }
    }
    let (first, last) = match own {
        Some(a) => (a, a),
        None => (0, SNAT_PROBES),
    };
    for attempt in first..=last {
        if !candidate(rkey, key, c, attempt) {
            return false;
        }
        if attempt == 0 && own.is_none() && !client_port_usable(ctx, rkey) {
            continue;
        }
        let k: &ConnKey6 = rkey;
        // SAFETY: as above.
        let flags = match unsafe { NAT6_CONNS.get(k) } {
            None => BPF_NOEXIST,
            Some(r) if owned_by(r, key) || stale(r, e.last_seen_ns, key.proto) => BPF_ANY,
            Some(_) => continue,
        };
        // The reply entry: backend → SNAT becomes VIP → client.
        e.new_src = key.dst_addr;
        e.new_dst = key.src_addr;
        e.new_src_port = key.dst_port;
        e.new_dst_port = key.src_port;
        e.l4_csum_delta = rewrite6::delta(
            &rkey.src_addr,
            &rkey.dst_addr,
            &key.dst_addr,
            &key.src_addr,
            rewrite6::ports((rkey.src_port, rkey.dst_port), (key.dst_port, key.src_port)),
        );
        e.flags = CONN_REPLY;
        let (k, entry): (&ConnKey6, &NatEntry6) = (rkey, e);
        if NAT6_CONNS.insert(k, entry, flags as u64).is_ok() {
            if attempt > 0 && own.is_none() {
                stats::reason(Reason::SnatPortProbed);
            }
            return true;
        }
    }
    false
}

/// Whether entry `r` no longer holds its key: idle past its timeout, or
/// closing (a SYN on a closed flow's 4-tuple is a new connection).
#[inline(always)]
fn stale(r: &NatEntry6, now: u64, proto: u8) -> bool {
    conn::idle_past(r.last_seen_ns, now, r.is_closing(), proto)
}

/// The key a backend's reply to (SNAT address, port) arrives with.
#[inline(always)]
pub fn reply_key(
    be_addr: &Addr6,
    be_port: u16,
    snat: &Addr6,
    snat_port: u16,
    proto: u8,
) -> ConnKey6 {
    ConnKey6 {
        src_addr: *be_addr,
        dst_addr: *snat,
        src_port: be_port,
        dst_port: snat_port,
        proto,
        _pad: [0; 3],
    }
}

/// Whether `r` is the reply entry of the flow whose forward key is `fwd`.
#[inline(always)]
pub fn owned_by(r: &NatEntry6, fwd: &ConnKey6) -> bool {
    r.is_reply()
        && r.new_dst == fwd.src_addr
        && r.new_dst_port == fwd.src_port
        && r.new_src == fwd.dst_addr
        && r.new_src_port == fwd.dst_port
}

/// Writes attempt `attempt`'s (SNAT address, port) into reply key `rkey`:
/// the client's own port first, then ports drawn from the service's range
/// by the flow hash. False if the service has no SNAT address there.
#[inline(always)]
fn candidate(rkey: &mut ConnKey6, key: &ConnKey6, c: &Claim, attempt: u32) -> bool {
    let count = if c.snat.count == 0 || c.snat.count > MAX_SNAT_ADDRS as u32 {
        1
    } else {
        c.snat.count
    };
    let idx = (c.hash >> 16)
        .wrapping_add(attempt)
        .checked_rem(count)
        .unwrap_or(0) as usize;
    // As in `flow::snat_candidate`: a mask the verifier can see.
    const { assert!(MAX_SNAT_ADDRS.is_power_of_two()) };
    let idx = core::hint::black_box(idx) & (MAX_SNAT_ADDRS - 1);
    let Some(addr) = c.snat.addrs.get(idx) else {
        return false;
    };
    rkey.dst_addr = *addr;
    rkey.dst_port = if attempt == 0 {
        key.src_port
    } else {
        let span = (c.svc.snat_port_max as u32).saturating_sub(c.svc.snat_port_min as u32) + 1;
        let r = c
            .hash
            .wrapping_add(attempt.wrapping_mul(0x9e37_79b9))
            .checked_rem(span)
            .unwrap_or(0);
        ((c.svc.snat_port_min as u32 + r) as u16).to_be()
    };
    true
}

/// Whether the client's own port may be the SNAT port of reply key `rkey`:
/// outside the host's ephemeral range, or in it with no socket of the
/// host's on that 4-tuple (see `flow::client_port_usable`).
#[inline(never)]
fn client_port_usable(ctx: &XdpContext, rkey: &ConnKey6) -> bool {
    let port = u16::from_be(rkey.dst_port) as u32;
    if port < EPHEMERAL_PORT_MIN.load() || port > EPHEMERAL_PORT_MAX.load() {
        return true;
    }
    !host_socket::has_socket6(ctx, rkey)
}
