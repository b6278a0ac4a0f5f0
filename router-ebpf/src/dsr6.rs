//! IPv6 DSR flows, in the `router_v6` program: what `dsr` does for IPv4,
//! over `DSR_FLOWS6`, with an outer IPv6 header. IPv6 services have no
//! pools. A NAT service's packets, and those to an IPv6 SNAT address, go
//! on to `router_nat6` (see `nat6`): DSR flows, the kind several ingress
//! nodes serve, find their entry first.

use aya_ebpf::{bindings::BPF_ANY, programs::XdpContext};
use router_common::{
    Service,
    dsr::{DSR_CLOSING, FORWARD_GUE, FORWARD_NAT, gue_source_port},
    flow_hash::flow_hash6,
    reasons::Reason,
    v6::{Addr6, DsrFlow6, ServiceKey6, TAIL_NAT6, flow_label},
};

use crate::{
    clock::Clock,
    conn, encap6,
    fib::{self, Outer},
    maps::{
        BACKEND_ADDRS6, BACKENDS, DSR_FLOWS6, FIB_GEN, FLOW_HASH_KEY0, FLOW_HASH_KEY1, SERVICES6,
        SNAT_ADDRS6, TAIL_CALLS,
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
        // An ICMPv6 error: IPv6 NAT's to translate, if about its flows.
        Err(Reason::PassIcmpUntracked) => return to_nat6(ctx),
        Err(reason) => return Ok(reason.into()),
    };
    let mut clock = Clock::unread();
    // One path from here to the wire, whether the flow is new or not: the
    // program's stack holds one copy of each header it builds.
    let (e, new) = match flow(&pkt, &mut clock) {
        Ok(found) => found,
        Err(Miss::Reason(reason)) => return Ok(reason.into()),
        Err(Miss::Nat) => return to_nat6(ctx),
    };
    forward(ctx, e, &pkt, new)
}

/// Why a packet has no DSR flow.
enum Miss {
    /// Not carried, for this reason.
    Reason(Reason),
    /// IPv6 NAT's: a NAT service's packet or one to a SNAT address.
    Nat,
}

impl From<Reason> for Miss {
    #[inline(always)]
    fn from(reason: Reason) -> Self {
        Miss::Reason(reason)
    }
}

/// Whether `addr` is an IPv6 SNAT address. A BPF function of its own, so
/// the key's copy takes its frame, not the one `place` adds to.
#[inline(never)]
fn is_snat6(addr: &Addr6) -> bool {
    SNAT_ADDRS6.get_ptr(addr).is_some()
}

/// Hands the packet to `router_nat6`: it ends this program.
#[inline(always)]
fn to_nat6(ctx: &XdpContext) -> Result<Verdict, ()> {
    // SAFETY: `TAIL_NAT6` of TAIL_CALLS holds `router_nat6` (the daemon
    // puts it there at load), an XDP program taking the same context.
    unsafe { TAIL_CALLS.tail_call(ctx, TAIL_NAT6) };
    // Only without `router_nat6` installed: nothing can translate it.
    Ok(Reason::DropNoBackend.into())
}

/// The packet's flow entry, in `DSR_FLOWS6`, and whether this packet
/// created it; or why the packet is not carried.
#[inline(always)]
fn flow<'a>(pkt: &Packet6, clock: &mut Clock) -> Result<(&'a mut DsrFlow6, bool), Miss> {
    if let Some(e) = DSR_FLOWS6.get_ptr_mut(pkt.key) {
        // SAFETY: as in `dsr::run`: a preallocated LRU element, whose
        // memory stays the map's while the program runs.
        let e = unsafe { &mut *e };
        let now = clock.ns(false);
        let live = !conn::idle_past(e.last_seen_ns, now, e.is_closing(), pkt.key.proto);
        // A SYN after the flow closed is a new connection on a reused
        // 4-tuple: it is placed afresh.
        if live && !(pkt.syn && e.is_closing()) {
            if pkt.fin_or_rst {
                e.flags |= DSR_CLOSING;
                e.last_seen_ns = now;
            } else if now.saturating_sub(e.last_seen_ns) > conn::REFRESH_NS {
                e.last_seen_ns = now;
            }
            return Ok((e, false));
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
        Some(svc) if svc.forwarding != FORWARD_NAT => {
            place(pkt, svc, clock).map_err(Miss::Reason)?;
            // SAFETY: as above, for the element just inserted.
            match DSR_FLOWS6.get_ptr_mut(pkt.key) {
                Some(e) => Ok((unsafe { &mut *e }, true)),
                // Evicted by another CPU's insert in between: rare
                // enough to drop.
                None => Err(Reason::DropConnTableFull.into()),
            }
        }
        Some(_) => Err(Miss::Nat),
        None if is_snat6(&pkt.key.dst_addr) => Err(Miss::Nat),
        // The host's own IPv6 traffic, and anything else not a service's.
        None => Err(Reason::PassNotService.into()),
    }
}

/// Places a new flow of IPv6 DSR service `svc` by its Maglev table and
/// inserts its entry, without a next hop yet (`forward` finds it). A BPF
/// function of its own, whose frame holds the entry it builds.
#[inline(never)]
fn place(pkt: &Packet6, svc: &Service, clock: &mut Clock) -> Result<(), Reason> {
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
    let at = pool::placement(svc, 0).ok_or(Reason::DropNoBackend)?;
    let backend_id = select::backend(svc, &at, hash, false);
    let be = BACKENDS.get(backend_id).ok_or(Reason::DropNoBackend)?;
    let addr = BACKEND_ADDRS6
        .get(backend_id)
        .ok_or(Reason::DropNoBackend)?;
    if be.in_use == 0 {
        return Err(Reason::DropNoBackend);
    }
    // Inserted all zero from .rodata and filled in place: an entry built
    // on the stack would take 88 of the bytes `router_v6`'s frames share.
    let zero: &DsrFlow6 = &EMPTY_FLOW;
    DSR_FLOWS6
        .insert(key, zero, BPF_ANY as u64)
        .map_err(|_| Reason::DropConnTableFull)?;
    let e = DSR_FLOWS6
        .get_ptr_mut(key)
        .ok_or(Reason::DropConnTableFull)?;
    // SAFETY: a preallocated LRU element, just inserted: the memory stays
    // the map's while the program runs. Another CPU placing the same flow
    // at once writes the same values.
    let e = unsafe { &mut *e };
    let gue = svc.forwarding == FORWARD_GUE;
    e.backend_addr = *addr;
    e.backend_id = backend_id;
    e.service_id = svc.id;
    e.flags = if pkt.fin_or_rst { DSR_CLOSING } else { 0 };
    if gue {
        e.gue_sport = gue_source_port(hash).to_be();
        e.gue_dport = svc.gue_port;
    }
    e.flow_label = flow_label(hash);
    e.last_seen_ns = clock.ns(false);
    Ok(())
}

/// The value every new `DSR_FLOWS6` entry starts from.
static EMPTY_FLOW: DsrFlow6 = DsrFlow6 {
    backend_addr: Addr6 { words: [0; 4] },
    outer_src: Addr6 { words: [0; 4] },
    backend_id: 0,
    service_id: 0,
    dmac: [0; 6],
    smac: [0; 6],
    ifindex: 0,
    fib_gen: 0,
    mtu: 0,
    flags: 0,
    gue_sport: 0,
    gue_dport: 0,
    flow_label: 0,
    _pad: 0,
    last_seen_ns: 0,
};

/// Sends a packet of flow `e`, resolving its next hop first if the cached
/// one is not current (always, for a flow this packet created). A BPF
/// function of its own: the FIB's parameters and the outer header take
/// its frame, not `router_v6`'s.
#[inline(never)]
fn forward(ctx: &XdpContext, e: &mut DsrFlow6, pkt: &Packet6, new: bool) -> Result<Verdict, ()> {
    let fib_gen = match FIB_GEN.get(0) {
        Some(g) => *g,
        None => 0,
    };
    let overhead = e.overhead();
    let outer_len = pkt.len.saturating_add(overhead);
    let hop = if fib_gen == 0 || e.fib_gen != fib_gen {
        fib::resolve_outer(ctx, e, outer_len, fib_gen)
    } else {
        Outer::Resolved
    };
    let mtu = match hop {
        Outer::TooBig(mtu) => mtu,
        Outer::Resolved => e.mtu,
        Outer::Failed => 0,
    };
    if mtu != 0 && outer_len as u32 > mtu {
        // IPv6 has no DF bit: no router fragments, so the client always
        // hears. One too short to quote cannot have been too big for a
        // link of IPv6's minimum MTU.
        if (pkt.len as usize) < QUOTE6_LEN {
            return Ok(Reason::DropTooBig.into());
        }
        too_big6::answer(ctx, mtu.saturating_sub(overhead as u32))?;
        return Ok(Reason::IcmpTooBig.into());
    }
    // SAFETY: `ctx.ctx` is the xdp_md the kernel passed in, valid for the
    // whole run.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let verdict = match hop {
        // The stack forwards the encapsulated packet and resolves the
        // neighbour on the way (Neighbor Discovery); later packets take
        // the fast path.
        Outer::Failed => Reason::PassFibFailed.into(),
        _ if e.ifindex == ingress => Reason::Tx.into(),
        _ => Verdict::redirect(e.ifindex),
    };
    encap6::push(ctx, e, pkt.len)?;
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    stats::counted(e.service_id, e.backend_id, bytes, new);
    Ok(verdict)
}
