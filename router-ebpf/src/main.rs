//! The `router` XDP program: a NAT load balancer with weighted Maglev
//! steering and pinned connections. `try_router` is the packet's state
//! machine (classify, look the flow up, act on its state) and returns one
//! verdict, which the entry point counts.
#![no_std]
#![no_main]
// Atomic fetch-or/and/add on map values (see `flags`, `inflight`).
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core_intrinsics: the BPF target's core has no fetch atomics"
)]

mod classify;
mod clock;
mod conn;
mod dsr;
mod dsr6;
mod encap;
mod encap6;
mod fib;
mod flags;
mod flow;
mod flow6;
mod forward;
mod host_socket;
mod icmp;
mod icmp6;
mod inflight;
mod latency;
mod maps;
mod mem;
mod nat;
mod nat6;
mod parse;
mod parse6;
mod pool;
mod rewrite6;
mod select;
mod seq;
mod stats;
mod too_big;
mod too_big6;
mod verdict;

use core::mem::MaybeUninit;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use aya_log_ebpf::warn;
use router_common::{
    ConnEntry, FILTER_DSR, FILTER_SNAT, FILTER_VIP, Service,
    reasons::Reason,
    v6::{TAIL_DSR, TAIL_V6},
};

use crate::{
    classify::Packet,
    clock::Clock,
    conn::{Lookup, Origin, Stale},
    flow::{Confirm, NewFlow},
    maps::{DATAPATH_LOG, SERVICES, SNAT_ADDRS, TAIL_CALLS},
    verdict::Verdict,
};

// Inlined into the entry point the macro wraps it in, as `try_router` is
// into it: no packet pays for a BPF call.
#[xdp]
#[inline(always)]
pub fn router(ctx: XdpContext) -> u32 {
    match try_router(&ctx) {
        // Every verdict is counted here, and only here.
        Ok(verdict) => {
            stats::reason(verdict.reason());
            verdict.action()
        }
        // Only reachable when a re-check of already validated bounds fails.
        Err(()) => xdp_action::XDP_PASS,
    }
}

/// DSR services' packets (see `dsr`), tail-called from `router`.
#[xdp]
#[inline(always)]
pub fn router_dsr(ctx: XdpContext) -> u32 {
    match dsr::run(&ctx) {
        Ok(verdict) => {
            stats::reason(verdict.reason());
            verdict.action()
        }
        Err(()) => xdp_action::XDP_PASS,
    }
}

/// Every IPv6 frame (see `dsr6`), tail-called from `router`.
#[xdp]
#[inline(always)]
pub fn router_v6(ctx: XdpContext) -> u32 {
    match dsr6::run(&ctx) {
        Ok(verdict) => {
            stats::reason(verdict.reason());
            verdict.action()
        }
        Err(()) => xdp_action::XDP_PASS,
    }
}

/// IPv6 NAT services' packets and their replies (see `nat6`),
/// tail-called from `router_v6`.
#[xdp]
#[inline(always)]
pub fn router_nat6(ctx: XdpContext) -> u32 {
    match nat6::run(&ctx) {
        Ok(verdict) => {
            stats::reason(verdict.reason());
            verdict.action()
        }
        Err(()) => xdp_action::XDP_PASS,
    }
}

/// Classify the packet, find its flow's state, act on the state. A live
/// entry carries the packet; anything else is a new flow or not ours.
#[inline(always)]
fn try_router(ctx: &XdpContext) -> Result<Verdict, ()> {
    let dest = match classify::destination(ctx) {
        Ok(d) => d,
        Err(classify::Unbalanced::Reason(reason)) => return Ok(reason.into()),
        Err(classify::Unbalanced::Ipv6) => return to_v6(ctx),
        // `destination` reads no transport header.
        Err(classify::Unbalanced::Icmp) => return Err(()),
    };
    // DSR flows never enter the NAT tables. A bucket of DSR services alone
    // is handed over on its bit (see `FILTER_DSR_ONLY`), before the
    // transport header is read; one shared with NAT's after a look at the
    // service. NAT services pay the bit tests.
    if dest.dsr_only() {
        return to_dsr(ctx);
    }
    let pkt = match classify::transport(ctx, dest) {
        Ok(pkt) => pkt,
        Err(classify::Unbalanced::Reason(reason)) => return Ok(reason.into()),
        Err(classify::Unbalanced::Icmp) => return icmp::error(ctx),
        Err(classify::Unbalanced::Ipv6) => return Err(()),
    };
    if pkt.filter & FILTER_DSR != 0 && dsr::is_dsr(&pkt) {
        return to_dsr(ctx);
    }
    let mut clock = Clock::unread();
    let state = conn::lookup(&pkt.key, pkt.control.syn, &mut clock);
    // The lookup's reading, if it found an entry; a SYN reads the fine
    // clock for the connect stamp its new flow takes (see `clock`).
    let now = clock.ns(pkt.control.syn);
    let e = match state {
        // Forwarding takes one from the TTL (see `nat`); a packet that has
        // none left to give ends here, before it changes any state.
        Lookup::Established(_) | Lookup::Reply(_) | Lookup::HalfOpen(_) if pkt.ip.ttl <= 1 => {
            return Ok(Reason::DropTtlExpired.into());
        }
        Lookup::Established(e) | Lookup::Reply(e) => e,
        // The client's next packet (for TCP, the handshake's ACK)
        // confirms the flow if it acknowledges the backend's answer; a
        // retransmitted SYN does not.
        Lookup::HalfOpen(e) if !pkt.control.syn => match flow::confirm(&pkt, e, now) {
            Confirm::Promoted(e) | Confirm::Refused(e) => e,
            Confirm::Unproven(e) => {
                stats::reason(Reason::Unconfirmed);
                e
            }
        },
        Lookup::HalfOpen(e) => e,
        // One arm, so the new-flow path is inlined once.
        Lookup::Stale(_) | Lookup::Miss => return untracked(ctx, &pkt, state.stale(), &mut clock),
    };
    // A RST or FIN counts only near the sequence its direction has
    // reached: a blind one is forwarded for the endpoint to judge, and
    // changes nothing here.
    let in_window = seq::track(e, &pkt);
    let (fin_or_rst, rst) = if pkt.control.fin_or_rst && !in_window {
        stats::reason(Reason::TcpOutOfWindow);
        (false, false)
    } else {
        (pkt.control.fin_or_rst, pkt.control.rst)
    };
    // A FIN that marks this direction closing, or any RST, may be the
    // flow's last word.
    if conn::refresh(e, now, fin_or_rst) || rst {
        inflight::on_close(&pkt.key, e, rst, now);
    }
    if e.awaits_latency() {
        latency::observe(&pkt.key, e, &pkt.l4, &mut clock);
    }
    forward::packet(ctx, e, &pkt, Origin::Tracked)
}

/// Hands the packet to `router_dsr`, which classifies it again: it ends
/// this program.
#[inline(always)]
fn to_dsr(ctx: &XdpContext) -> Result<Verdict, ()> {
    // SAFETY: `TAIL_DSR` of TAIL_CALLS holds `router_dsr` (the daemon puts
    // it there at load), an XDP program taking the same context.
    unsafe { TAIL_CALLS.tail_call(ctx, TAIL_DSR) };
    // Only without `router_dsr` installed: nothing can forward it.
    Ok(Reason::DropNoBackend.into())
}

/// Hands an IPv6 frame to `router_v6`: it ends this program.
#[inline(always)]
fn to_v6(ctx: &XdpContext) -> Result<Verdict, ()> {
    // SAFETY: `TAIL_V6` of TAIL_CALLS holds `router_v6` (the daemon puts
    // it there at load), an XDP program taking the same context.
    unsafe { TAIL_CALLS.tail_call(ctx, TAIL_V6) };
    // Only without `router_v6` installed: the host's, as before IPv6
    // services.
    Ok(Reason::PassNotService.into())
}

/// A packet that no live entry carries: a new flow's first packet if it
/// is for a service, else one for a SNAT address whose reply entry is gone.
/// `stale` is the entry the new flow replaces, if one was found.
#[inline(always)]
fn untracked(
    ctx: &XdpContext,
    pkt: &Packet,
    stale: Option<Stale>,
    clock: &mut Clock,
) -> Result<Verdict, ()> {
    if pkt.filter & FILTER_VIP != 0 {
        // SAFETY: the map is preallocated, so the value's memory stays the
        // map's while the program runs, and every bit pattern is a valid
        // Service. An update racing this read can at worst route this one
        // packet by a mix of the old and new service.
        if let Some(svc) = unsafe { SERVICES.get(pkt.service_key()) } {
            if pkt.ip.ttl <= 1 {
                return Ok(Reason::DropTtlExpired.into());
            }
            return new_flow(ctx, pkt, svc, stale, clock);
        }
    }
    if pkt.filter & FILTER_SNAT != 0 {
        // A TCP reply whose entry is gone must not reach the host's stack:
        // having no socket for it, the stack would answer with a reset and
        // end the backend's side of a connection that only lost its entry
        // (a half-open one under a SYN flood, say). The host's own traffic
        // through the SNAT address has a socket and passes.
        if pkt.is_tcp()
            && SNAT_ADDRS.get_ptr(pkt.ip.dst).is_some()
            && !host_socket::has_tcp_socket(ctx, &pkt.ip, &pkt.l4)
        {
            return Ok(Reason::DropNoReplyEntry.into());
        }
        return Ok(Reason::PassNoReplyEntry.into());
    }
    Ok(Reason::PassNotService.into())
}

/// Opens a flow to service `svc` for its first packet `pkt`.
#[inline(always)]
fn new_flow(
    ctx: &XdpContext,
    pkt: &Packet,
    svc: &Service,
    stale: Option<Stale>,
    clock: &mut Clock,
) -> Result<Verdict, ()> {
    if pkt.is_tcp() && !pkt.control.syn {
        // Mid-flow packet with no entry (evicted, expired, or the LB
        // restarted): re-hash. While weights are unchanged Maglev maps
        // it to the same backend, and with the client's own port kept
        // as SNAT port (or the pair its surviving reply entry holds)
        // the backend sees the same 4-tuple as before. The flow is
        // confirmed by the client's next packet like any new one,
        // so a flood of spoofed ACKs cannot reach CONNS either.
        stats::reason(Reason::LruMiss);
    }
    let mut slot = MaybeUninit::uninit();
    let fwd: &mut ConnEntry = mem::zeroed64(&mut slot);
    match flow::create(ctx, pkt, svc, stale, clock, fwd) {
        NewFlow::Created => forward::packet(ctx, fwd, pkt, Origin::NewFlow),
        NewFlow::NoBackend => Ok(Reason::DropNoBackend.into()),
        NewFlow::SnatExhausted => {
            if DATAPATH_LOG.load() != 0 {
                warn!(ctx, "snat ports exhausted for service {}", svc.id);
            }
            Ok(Reason::DropSnatExhausted.into())
        }
        NewFlow::TableFull => {
            if DATAPATH_LOG.load() != 0 {
                warn!(ctx, "connection table insert failed for service {}", svc.id);
            }
            Ok(Reason::DropConnTableFull.into())
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// SAFETY: the loader reads the license from the `license` section, which
// holds nothing else, and no other symbol has this name.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
