//! DSR flows (see `router_common::dsr`): the client's packets only, each
//! encapsulated to the flow's backend, which answers the client itself.
//!
//! One table, `DSR_FLOWS`, pins a flow to its backend. A packet whose flow
//! has no entry (its first, or any packet after an eviction, an expiry,
//! or a move from another LB node) is placed by the service's Maglev
//! table, which picks the same backend on every node with the same seed
//! and weights; a TCP packet other than a SYN counts `lru_miss`. Nothing
//! is counted in flight: the LB never sees the backend's side of a
//! connection, so a DSR service places by Maglev alone (the daemon
//! refuses least-loaded for it).

use core::mem::MaybeUninit;

use aya_ebpf::{bindings::BPF_ANY, programs::XdpContext};
use router_common::{
    Service,
    dsr::{DSR_CLOSING, DsrFlow, FORWARD_GUE, FORWARD_NAT, gue_source_port},
    flow_hash::flow_hash,
    reasons::Reason,
};

use crate::{
    classify::{self, Packet},
    clock::Clock,
    conn, encap,
    fib::{self, Outer},
    maps::{BACKENDS, DSR_FLOWS, FIB_GEN, FLOW_HASH_KEY0, FLOW_HASH_KEY1, SERVICES},
    mem::zeroed64,
    pool, select, stats, too_big,
    verdict::Verdict,
};

/// Whether `pkt` is for a DSR service, where its filter bucket is shared
/// with NAT services or SNAT addresses: one `SERVICES` lookup.
#[inline(always)]
pub fn is_dsr(pkt: &Packet) -> bool {
    // SAFETY: as in `untracked` (main.rs): a preallocated map value.
    match unsafe { SERVICES.get(pkt.service_key()) } {
        Some(svc) => svc.forwarding != FORWARD_NAT,
        None => false,
    }
}

/// The verdict for a packet `router` handed over (see `FILTER_DSR_ONLY`),
/// in the `router_dsr` program it tail-calls: a program of its own, with
/// a stack of its own (the NAT path's frame leaves no room for this one's).
#[inline(always)]
pub fn run(ctx: &XdpContext) -> Result<Verdict, ()> {
    let pkt = match classify::packet(ctx) {
        Ok(pkt) => pkt,
        // A fragment, IP options, a cut header: as on the NAT path.
        Err(classify::Unbalanced::Reason(reason)) => return Ok(reason.into()),
        // `router` keeps ICMP (see `Destination::dsr_only`), and hands
        // IPv6 to `router_v6`.
        Err(classify::Unbalanced::Icmp | classify::Unbalanced::Ipv6) => return Err(()),
    };
    let mut clock = Clock::unread();
    if let Some(e) = DSR_FLOWS.get_ptr_mut(pkt.key) {
        // SAFETY: a preallocated LRU element: the memory stays the map's
        // while the program runs. A concurrent update of the same flow on
        // another CPU writes the same values, except the refresh stamp.
        let e = unsafe { &mut *e };
        let now = clock.ns(false);
        let live = !conn::idle_past(e.last_seen_ns, now, e.is_closing(), pkt.l4.proto);
        // A SYN after the flow closed is a new connection on a reused
        // 4-tuple: it is placed afresh.
        if live && !(pkt.control.syn && e.is_closing()) {
            if pkt.control.fin_or_rst {
                e.flags |= DSR_CLOSING;
                e.last_seen_ns = now;
            } else if now.saturating_sub(e.last_seen_ns) > conn::REFRESH_NS {
                e.last_seen_ns = now;
            }
            return forward(ctx, e, &pkt, false);
        }
    }
    // SAFETY: as in `untracked` (main.rs): a preallocated map value.
    match unsafe { SERVICES.get(pkt.service_key()) } {
        Some(svc) if svc.forwarding != FORWARD_NAT => new_flow(ctx, &pkt, svc, &mut clock),
        // A bucket of DSR services alone holds no SNAT address and no NAT
        // service's address: another port of a DSR address, or another
        // address in the bucket, is the host's, as on the NAT path.
        None => Ok(Reason::PassNotService.into()),
        // The service turned NAT between the daemon's two writes (it
        // clears the bucket's `FILTER_DSR_ONLY` first); the next packet
        // takes the NAT path.
        Some(_) => Ok(Reason::DropNoBackend.into()),
    }
}

/// Places a flow of DSR service `svc` and sends its packet.
#[inline(always)]
fn new_flow(
    ctx: &XdpContext,
    pkt: &Packet,
    svc: &Service,
    clock: &mut Clock,
) -> Result<Verdict, ()> {
    let key = &pkt.key;
    if pkt.is_tcp() && !pkt.control.syn {
        stats::reason(Reason::LruMiss);
    }
    let hash = flow_hash(
        [FLOW_HASH_KEY0.load(), FLOW_HASH_KEY1.load()],
        key.src_addr,
        key.dst_addr,
        key.src_port,
        key.dst_port,
        key.proto,
    );
    let Some(at) = pool::placement(svc, key.src_addr) else {
        return Ok(Reason::DropNoBackend.into());
    };
    // Never by load: see the module's note.
    let backend_id = select::backend(svc, &at, hash, false);
    let Some(be) = BACKENDS.get(backend_id) else {
        return Ok(Reason::DropNoBackend.into());
    };
    if be.in_use == 0 {
        return Ok(Reason::DropNoBackend.into());
    }
    let mut slot = MaybeUninit::uninit();
    let e: &mut DsrFlow = zeroed64(&mut slot);
    e.backend_addr = be.addr;
    e.backend_id = backend_id;
    e.service_id = svc.id;
    if svc.forwarding == FORWARD_GUE {
        e.gue_sport = gue_source_port(hash).to_be();
        e.gue_dport = svc.gue_port;
    }
    e.flags = if pkt.control.fin_or_rst {
        DSR_CLOSING
    } else {
        0
    };
    e.last_seen_ns = clock.ns(false);
    // Resolved before the insert, so the entry goes in with its next hop.
    let fib_gen = match FIB_GEN.get(0) {
        Some(g) => *g,
        None => 0,
    };
    let outer_len = pkt.ip.tot_len.saturating_add(e.overhead());
    let hop = fib::resolve_outer(ctx, e, outer_len, fib_gen);
    let value: &DsrFlow = e;
    if DSR_FLOWS.insert(key, value, BPF_ANY as u64).is_err() {
        return Ok(Reason::DropConnTableFull.into());
    }
    send(ctx, e, pkt, hop, true)
}

/// Sends a packet of flow `e`, resolving its next hop first if the cached
/// one is not current.
#[inline(always)]
fn forward(ctx: &XdpContext, e: &mut DsrFlow, pkt: &Packet, new: bool) -> Result<Verdict, ()> {
    let fib_gen = match FIB_GEN.get(0) {
        Some(g) => *g,
        None => 0,
    };
    let hop = if fib_gen == 0 || e.fib_gen != fib_gen {
        let outer_len = pkt.ip.tot_len.saturating_add(e.overhead());
        fib::resolve_outer(ctx, e, outer_len, fib_gen)
    } else {
        Outer::Resolved
    };
    send(ctx, e, pkt, hop, new)
}

#[inline(always)]
fn send(ctx: &XdpContext, e: &DsrFlow, pkt: &Packet, hop: Outer, new: bool) -> Result<Verdict, ()> {
    let overhead = e.overhead();
    let outer_len = pkt.ip.tot_len as u32 + overhead as u32;
    let mtu = match hop {
        Outer::TooBig(mtu) => mtu,
        Outer::Resolved => e.mtu,
        Outer::Failed => {
            // The stack forwards the encapsulated packet and resolves the
            // neighbour on the way; later packets take the fast path.
            encap::push(ctx, e, pkt.ip.tot_len)?;
            count(ctx, e, new);
            return Ok(Reason::PassFibFailed.into());
        }
    };
    if mtu != 0 && outer_len > mtu {
        return refuse(ctx, mtu.saturating_sub(overhead as u32));
    }
    encap::push(ctx, e, pkt.ip.tot_len)?;
    count(ctx, e, new);
    // SAFETY: `ctx.ctx` is the xdp_md the kernel passed in, valid for the
    // whole run.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    if e.ifindex == ingress {
        return Ok(Reason::Tx.into());
    }
    Ok(Verdict::redirect(e.ifindex))
}

/// A packet that does not fit the tunnel: ICMP back to a client that set
/// DF (it will send less), a drop otherwise (the program cannot fragment).
#[inline(always)]
fn refuse(ctx: &XdpContext, fits: u32) -> Result<Verdict, ()> {
    let ip: *const [u8; crate::parse::IP_LEN] = crate::parse::ptr_at(ctx, crate::parse::IP_OFF)?;
    // SAFETY: `ptr_at` checked the header lies within the packet.
    let df = unsafe { (*ip)[6] } & 0x40 != 0;
    if !df {
        return Ok(Reason::DropTooBig.into());
    }
    too_big::answer(ctx, fits.min(u16::MAX as u32) as u16)?;
    Ok(Reason::IcmpTooBig.into())
}

#[inline(always)]
fn count(ctx: &XdpContext, e: &DsrFlow, new: bool) {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    stats::counted(e.service_id, e.backend_id, bytes, new);
}
