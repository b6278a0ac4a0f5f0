//! IPv6 DSR flows, in the `router_v6` program: what `dsr` does for IPv4,
//! over `DSR_FLOWS6`, with an outer IPv6 header. An IPv6 service is always
//! a DSR service (the daemon builds no other), and has no pools.

use aya_ebpf::{bindings::BPF_ANY, programs::XdpContext};
use router_common::{
    dsr::{DSR_CLOSING, FORWARD_GUE, FORWARD_NAT, gue_source_port},
    flow_hash::flow_hash6,
    reasons::Reason,
    v6::{DsrFlow6, ServiceKey6, flow_label},
};

use crate::{
    clock::Clock,
    conn, encap6,
    fib::{self, Outer},
    maps::{
        BACKEND_ADDRS6, BACKENDS, DSR_FLOWS6, FIB_GEN, FLOW_HASH_KEY0, FLOW_HASH_KEY1, SERVICES6,
    },
    parse6::{self, Packet6},
    pool, select, stats,
    too_big6::{self, QUOTE6_LEN},
    verdict::Verdict,
};

/// The verdict for an IPv6 frame.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> Result<Verdict, ()> {
    let pkt = match parse6::packet(ctx) {
        Ok(pkt) => pkt,
        Err(reason) => return Ok(reason.into()),
    };
    let mut clock = Clock::unread();
    if let Some(e) = DSR_FLOWS6.get_ptr_mut(pkt.key) {
        // SAFETY: as in `dsr::run`: a preallocated LRU element.
        let e = unsafe { &mut *e };
        let now = clock.ns(false);
        let live = !conn::idle_past(e.last_seen_ns, now, e.is_closing(), pkt.key.proto);
        if live && !(pkt.syn && e.is_closing()) {
            if pkt.fin_or_rst {
                e.flags |= DSR_CLOSING;
                e.last_seen_ns = now;
            } else if now.saturating_sub(e.last_seen_ns) > conn::REFRESH_NS {
                e.last_seen_ns = now;
            }
            return forward(ctx, e, &pkt, false);
        }
    }
    let key = ServiceKey6 {
        addr: pkt.key.dst_addr,
        port: pkt.key.dst_port,
        proto: pkt.key.proto,
        _pad: 0,
    };
    // SAFETY: as in `untracked` (main.rs): a preallocated map value.
    match unsafe { SERVICES6.get(key) } {
        Some(svc) if svc.forwarding != FORWARD_NAT => new_flow(ctx, &pkt, svc, &mut clock),
        // The host's own IPv6 traffic, and anything else not a service's.
        None => Ok(Reason::PassNotService.into()),
        // Never written by the daemon: nothing here can translate.
        Some(_) => Ok(Reason::DropNoBackend.into()),
    }
}

/// Places a flow of IPv6 DSR service `svc` by its Maglev table and sends
/// its packet.
#[inline(always)]
fn new_flow(
    ctx: &XdpContext,
    pkt: &Packet6,
    svc: &router_common::Service,
    clock: &mut Clock,
) -> Result<Verdict, ()> {
    let key = &pkt.key;
    if pkt.is_tcp() && !pkt.syn {
        stats::reason(Reason::LruMiss);
    }
    let hash = flow_hash6(
        [FLOW_HASH_KEY0.load(), FLOW_HASH_KEY1.load()],
        key.src_addr.words,
        key.dst_addr.words,
        key.src_port,
        key.dst_port,
        key.proto,
    );
    // No pools on an IPv6 service, so the client's address is not read.
    let Some(at) = pool::placement(svc, 0) else {
        return Ok(Reason::DropNoBackend.into());
    };
    let backend_id = select::backend(svc, &at, hash, false);
    let Some(be) = BACKENDS.get(backend_id) else {
        return Ok(Reason::DropNoBackend.into());
    };
    let Some(addr) = BACKEND_ADDRS6.get(backend_id) else {
        return Ok(Reason::DropNoBackend.into());
    };
    if be.in_use == 0 {
        return Ok(Reason::DropNoBackend.into());
    }
    let gue = svc.forwarding == FORWARD_GUE;
    let mut e = DsrFlow6 {
        backend_addr: *addr,
        outer_src: Default::default(),
        backend_id,
        service_id: svc.id,
        dmac: [0; 6],
        smac: [0; 6],
        ifindex: 0,
        fib_gen: 0,
        mtu: 0,
        flags: if pkt.fin_or_rst { DSR_CLOSING } else { 0 },
        gue_sport: if gue {
            gue_source_port(hash).to_be()
        } else {
            0
        },
        gue_dport: if gue { svc.gue_port } else { 0 },
        flow_label: flow_label(hash),
        _pad: 0,
        last_seen_ns: clock.ns(false),
    };
    let fib_gen = match FIB_GEN.get(0) {
        Some(g) => *g,
        None => 0,
    };
    let outer_len = pkt.len.saturating_add(e.overhead());
    let hop = fib::resolve_outer6(ctx, &mut e, outer_len, fib_gen);
    // Passed by reference: the entry is inserted from where it was built.
    let value: &DsrFlow6 = &e;
    if DSR_FLOWS6.insert(key, value, BPF_ANY as u64).is_err() {
        return Ok(Reason::DropConnTableFull.into());
    }
    send(ctx, &e, pkt, hop, true)
}

/// Sends a packet of flow `e`, resolving its next hop first if the cached
/// one is not current.
#[inline(always)]
fn forward(ctx: &XdpContext, e: &mut DsrFlow6, pkt: &Packet6, new: bool) -> Result<Verdict, ()> {
    let fib_gen = match FIB_GEN.get(0) {
        Some(g) => *g,
        None => 0,
    };
    let hop = if fib_gen == 0 || e.fib_gen != fib_gen {
        let outer_len = pkt.len.saturating_add(e.overhead());
        fib::resolve_outer6(ctx, e, outer_len, fib_gen)
    } else {
        Outer::Resolved
    };
    send(ctx, e, pkt, hop, new)
}

#[inline(always)]
fn send(
    ctx: &XdpContext,
    e: &DsrFlow6,
    pkt: &Packet6,
    hop: Outer,
    new: bool,
) -> Result<Verdict, ()> {
    let overhead = e.overhead();
    let outer_len = pkt.len as u32 + overhead as u32;
    let mtu = match hop {
        Outer::TooBig(mtu) => mtu,
        Outer::Resolved => e.mtu,
        Outer::Failed => {
            // The stack forwards the encapsulated packet and resolves the
            // neighbour on the way (Neighbor Discovery); later packets
            // take the fast path.
            encap6::push(ctx, e, pkt.len)?;
            count(ctx, e, new);
            return Ok(Reason::PassFibFailed.into());
        }
    };
    if mtu != 0 && outer_len > mtu {
        // IPv6 has no DF bit: no router fragments, so the client always
        // hears. One too short to quote cannot have been too big for a
        // link of IPv6's minimum MTU.
        if (pkt.len as usize) < QUOTE6_LEN {
            return Ok(Reason::DropTooBig.into());
        }
        too_big6::answer(ctx, mtu.saturating_sub(overhead as u32))?;
        return Ok(Reason::IcmpTooBig.into());
    }
    encap6::push(ctx, e, pkt.len)?;
    count(ctx, e, new);
    // SAFETY: `ctx.ctx` is the xdp_md the kernel passed in, valid for the
    // whole run.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    if e.ifindex == ingress {
        return Ok(Reason::Tx.into());
    }
    Ok(Verdict::redirect(e.ifindex))
}

#[inline(always)]
fn count(ctx: &XdpContext, e: &DsrFlow6, new: bool) {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    stats::counted(e.service_id, e.backend_id, bytes, new);
}
