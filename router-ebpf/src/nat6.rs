//! IPv6 NAT, in the `router_nat6` program, which `router_v6` hands the
//! packets of IPv6 NAT services and those to IPv6 SNAT addresses: what
//! `router` does for IPv4 NAT, over one table. `NAT6_CONNS` holds both
//! directions of a flow (the client's forward entry, the backend's reply
//! entry), and a flow is placed by its service's Maglev table.
//!
//! What IPv4 has and this does not: a half-open table (a flood of new
//! IPv6 flows shares the LRU with established ones, which are found again
//! on their own 4-tuple if evicted), placement by load and in-flight
//! counts, the TCP sequence check on RST and FIN, and latency samples.
//! ICMPv6 errors about a flow are translated (see `icmp6`).

use core::mem::MaybeUninit;

use aya_ebpf::programs::XdpContext;
use router_common::{
    CONN_CLOSING, PROTO_TCP, Service,
    dsr::FORWARD_NAT,
    reasons::Reason,
    v6::{NatEntry6, ServiceKey6},
};

use crate::{
    clock::Clock,
    conn, fib,
    fib::Outer,
    flow6, host_socket, icmp6,
    maps::{FIB_GEN, NAT6_CONNS, SERVICES6, SNAT_ADDRS6},
    nat::{self, Hop},
    parse::ptr_at,
    parse6::{self, IP6_OFF, Packet6},
    rewrite6, stats,
    too_big6::{self, QUOTE6_LEN},
    verdict::Verdict,
};

/// The verdict for an IPv6 packet of a NAT service or to a SNAT address.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> Result<Verdict, ()> {
    let mut slot = MaybeUninit::uninit();
    let pkt = match parse(ctx, &mut slot) {
        // SAFETY: `parse` wrote the packet when it returned no reason.
        None => unsafe { slot.assume_init_ref() },
        // An ICMPv6 error, maybe about one of the flows here.
        Some(Reason::PassIcmpUntracked) => return icmp6::error(ctx),
        Some(reason) => return Ok(reason.into()),
    };
    let mut clock = Clock::unread();
    let (e, new) = match flow(ctx, pkt, &mut clock) {
        Ok(found) => found,
        Err(reason) => return Ok(reason.into()),
    };
    forward(ctx, e, pkt, new)
}

/// `parse6::packet` as a BPF function of its own: the walk's spilled
/// registers take its frame, not the one `flow6::create` adds to. Writes
/// the packet into `out`, or returns why there is none (a BPF function
/// cannot return a `Result` of a struct: its BTF would not load).
#[inline(never)]
fn parse(ctx: &XdpContext, out: &mut MaybeUninit<Packet6>) -> Option<Reason> {
    // Opaque to LLVM, which would otherwise pass the packet's bounds in
    // place of the context: the verifier refuses arithmetic on a bound
    // passed that way.
    let ctx = core::hint::black_box(ctx);
    match parse6::packet(ctx) {
        Ok(pkt) => {
            out.write(pkt);
            None
        }
        Err(reason) => Some(reason),
    }
}

/// The entry that carries the packet, and whether this packet created
/// its flow; or why the packet is not carried.
#[inline(always)]
fn flow<'a>(
    ctx: &XdpContext,
    pkt: &Packet6,
    clock: &mut Clock,
) -> Result<(&'a mut NatEntry6, bool), Reason> {
    if let Some(e) = NAT6_CONNS.get_ptr_mut(pkt.key) {
        // SAFETY: a preallocated LRU element, whose memory stays the map's
        // while the program runs (see `conn`).
        let e = unsafe { &mut *e };
        let now = clock.ns(false);
        if live(e, pkt, now) {
            if pkt.fin_or_rst && !e.is_closing() {
                close(e, pkt.key.proto);
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
        Some(svc) if svc.forwarding == FORWARD_NAT => open(ctx, pkt, svc, clock),
        // A DSR service's packet is `router_v6`'s: it never comes here.
        Some(_) => Err(Reason::PassNotService),
        None => Err(untracked(ctx, pkt)),
    }
}

/// Whether entry `e`, found at the packet's key, carries it: live, and
/// not a closed or half-gone flow's entry that a client's SYN starts over.
/// Its own BPF function, as are `close` and `untracked`: their keys and
/// the socket tuple would otherwise sit in the packet path's frame, which
/// `flow6::create`'s shares the program's 512 bytes with.
#[inline(never)]
fn live(e: &NatEntry6, pkt: &Packet6, now: u64) -> bool {
    if conn::idle_past(e.last_seen_ns, now, e.is_closing(), pkt.key.proto) {
        return false;
    }
    if !pkt.syn || e.is_reply() {
        return true;
    }
    // A client's stack sends a SYN on a 4-tuple only for a connection it
    // does not have: a retransmit rides its flow while both entries live,
    // anything else is a new connection (see `conn::syn_starts_over`).
    if e.is_closing() {
        return false;
    }
    let rkey = flow6::reply_key(
        &e.new_dst,
        e.new_dst_port,
        &e.new_src,
        e.new_src_port,
        pkt.key.proto,
    );
    // SAFETY: a table value, read at once.
    match unsafe { NAT6_CONNS.get(rkey) } {
        Some(r) => {
            flow6::owned_by(r, &pkt.key)
                && !conn::idle_past(r.last_seen_ns, now, r.is_closing(), pkt.key.proto)
        }
        None => false,
    }
}

/// Marks both entries of `e`'s flow closing: either direction's FIN or
/// RST puts the flow on the short timeout, and a SYN on its 4-tuple then
/// opens a new one. The other direction's key is the one `e` translates
/// to, reversed.
#[inline(never)]
fn close(e: &mut NatEntry6, proto: u8) {
    e.flags |= CONN_CLOSING;
    if proto != PROTO_TCP {
        return;
    }
    let peer = flow6::reply_key(
        &e.new_dst,
        e.new_dst_port,
        &e.new_src,
        e.new_src_port,
        proto,
    );
    if let Some(p) = NAT6_CONNS.get_ptr_mut(peer) {
        // SAFETY: a table element; a racing recycle gives it another
        // flow's values, which a closing flag only shortens.
        unsafe { (*p).flags |= CONN_CLOSING };
    }
}

/// Opens a flow to service `svc` for its first packet.
#[inline(always)]
fn open<'a>(
    ctx: &XdpContext,
    pkt: &Packet6,
    svc: &Service,
    clock: &mut Clock,
) -> Result<(&'a mut NatEntry6, bool), Reason> {
    match flow6::create(ctx, pkt, svc, clock) {
        Reason::Tx => {}
        reason => return Err(reason),
    }
    match NAT6_CONNS.get_ptr_mut(pkt.key) {
        // SAFETY: as in `flow`, for the element just inserted.
        Some(e) => Ok((unsafe { &mut *e }, true)),
        // Evicted by another CPU's insert in between: rare enough to drop.
        None => Err(Reason::DropConnTableFull),
    }
}

/// The verdict for a packet no entry carries and no service takes: to a
/// SNAT address, a reply whose entry is gone, which must not reach the
/// host's stack unless a socket of the host's own takes it (the stack
/// would reset the backend's side of a connection that only lost its
/// entry; see `untracked` in main.rs).
#[inline(never)]
fn untracked(ctx: &XdpContext, pkt: &Packet6) -> Reason {
    if SNAT_ADDRS6.get_ptr(pkt.key.dst_addr).is_none() {
        return Reason::PassNotService;
    }
    if pkt.is_tcp() && !host_socket::has_socket6(ctx, &pkt.key) {
        return Reason::DropNoReplyEntry;
    }
    Reason::PassNoReplyEntry
}

/// Translates a packet per entry `e` and sends it to the next hop,
/// resolving the hop first if the cached one is not current. A BPF
/// function of its own, whose frame holds the FIB's parameters.
#[inline(never)]
fn forward(ctx: &XdpContext, e: &mut NatEntry6, pkt: &Packet6, new: bool) -> Result<Verdict, ()> {
    let hop_limit: *const u8 = ptr_at(ctx, IP6_OFF + 7)?;
    // SAFETY: `ptr_at` checked the byte lies within the packet.
    if unsafe { *hop_limit } <= 1 {
        return Ok(Reason::DropTtlExpired.into());
    }
    let fib_gen = match FIB_GEN.get(0) {
        Some(g) => *g,
        None => 0,
    };
    let hop = if fib_gen == 0 || e.fib_gen != fib_gen {
        fib::resolve6(ctx, e, pkt.key.proto, pkt.len, fib_gen)
    } else {
        Outer::Resolved
    };
    let l4 = (pkt.key.proto, pkt.l4_off);
    let verdict = match hop {
        Outer::TooBig(mtu) => {
            // IPv6 routers never fragment: the sender hears, from the
            // address it sent to (the VIP, or the SNAT address for a
            // backend's reply). Shorter than the quote, it cannot have
            // been too big for a link of IPv6's minimum MTU.
            if (pkt.len as usize) < QUOTE6_LEN {
                return Ok(Reason::DropTooBig.into());
            }
            too_big6::answer(ctx, mtu)?;
            return Ok(Reason::IcmpTooBig.into());
        }
        // The stack forwards the translated packet and resolves the
        // neighbour on the way; later packets take the fast path.
        Outer::Failed => {
            rewrite6::packet(ctx, e, l4, Hop::Stack)?;
            Reason::PassFibFailed.into()
        }
        Outer::Resolved => {
            rewrite6::packet(ctx, e, l4, Hop::Program)?;
            nat::rewrite_macs(ctx, &e.dmac, &e.smac)?;
            // SAFETY: `ctx.ctx` is the xdp_md the kernel passed in, valid
            // for the whole run.
            let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
            if e.ifindex == ingress {
                Reason::Tx.into()
            } else {
                Verdict::redirect(e.ifindex)
            }
        }
    };
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    stats::counted6(e, bytes, new);
    Ok(verdict)
}
