//! The `router` XDP program: a NAT load balancer with weighted Maglev
//! steering and pinned connections. The entry point stays thin; every
//! verdict is chosen in `try_router`, and every pass or drop is counted.
#![no_std]
#![no_main]
// Atomic fetch-or/and/add on map values (see `flags`, `inflight`).
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core_intrinsics: the BPF target's core has no fetch atomics"
)]

mod classify;
mod conn;
mod fib;
mod flags;
mod forward;
mod host;
mod inflight;
mod latency;
mod maps;
mod mem;
mod nat;
mod parse;
mod select;
mod stats;
mod verdict;

use core::mem::MaybeUninit;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use aya_log_ebpf::warn;
use router_common::{ConnEntry, FILTER_SNAT, FILTER_VIP, ServiceKey, reasons::Reason};

use crate::{
    classify::Packet,
    conn::{FlowFlags, NewFlow, Origin, Table},
    maps::{CONNS, DATAPATH_LOG, HALF_OPEN, SERVICES, SNAT_ADDRS},
    verdict::Verdict,
};

#[xdp]
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

fn try_router(ctx: &XdpContext) -> Result<Verdict, ()> {
    let pkt = match classify::packet(ctx) {
        Ok(pkt) => pkt,
        Err(reason) => return Ok(reason.into()),
    };
    let key = pkt.key;
    let Packet { ref l4, .. } = pkt;
    let (syn, fin_or_rst, rst) = (pkt.control.syn, pkt.control.fin_or_rst, pkt.control.rst);
    let now = conn::now_ns();

    let mut stale: Option<(ConnEntry, Table)> = None;
    if let Some(e) = CONNS.get_ptr_mut(key) {
        // SAFETY: a map value pointer from a successful lookup; the entry
        // stays valid for this program run (RCU).
        let e = unsafe { &mut *e };
        let expired = conn::expired(Table::Conns, e, now, l4.proto);
        // A SYN on a closed or half-gone flow is a new connection.
        let reused = syn && conn::syn_starts_over(Table::Conns, &key, e, now);
        if !reused && !expired {
            if conn::refresh(e, now, fin_or_rst) || rst {
                inflight::on_close(&key, e, rst, now);
            }
            if e.awaits_latency() {
                latency::observe(&key, e, l4);
            }
            return forward::packet(ctx, e, &pkt, Origin::Tracked);
        }
        // The new connection ends the live one on its 4-tuple; an expired
        // one is the daemon's to uncount (see `inflight`).
        if !expired {
            inflight::release(e);
        }
        stale = Some((*e, Table::Conns));
    } else if let Some(e) = HALF_OPEN.get_ptr_mut(key) {
        // SAFETY: as above.
        let mut e = unsafe { &mut *e };
        let expired = conn::expired(Table::HalfOpen, e, now, l4.proto);
        let restart = syn && conn::syn_starts_over(Table::HalfOpen, &key, e, now);
        if !restart && !expired {
            // The client's second packet (for TCP, the handshake's ACK)
            // confirms the flow; a retransmitted SYN or a packet from the
            // backend does not.
            if !syn
                && !e.is_reply()
                && let Some(p) = conn::promote(&key, e, now)
            {
                // SAFETY: the promoted entry's place in CONNS, just looked up.
                e = unsafe { &mut *p };
            }
            if conn::refresh(e, now, fin_or_rst) || rst {
                inflight::on_close(&key, e, rst, now);
            }
            if e.awaits_latency() {
                latency::observe(&key, e, l4);
            }
            return forward::packet(ctx, e, &pkt, Origin::Tracked);
        }
        if !expired {
            inflight::release(e);
        }
        stale = Some((*e, Table::HalfOpen));
    }

    if pkt.filter & FILTER_VIP != 0 {
        let skey = ServiceKey {
            addr: pkt.ip.dst,
            port: l4.dst_port,
            proto: l4.proto,
            _pad: 0,
        };
        if let Some(svc) = unsafe { SERVICES.get(skey) } {
            if pkt.is_tcp() && !syn {
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
            return match conn::create(
                &key,
                svc,
                stale,
                now,
                FlowFlags {
                    syn,
                    fin_or_rst,
                    rst,
                },
                fwd,
            ) {
                NewFlow::Created => forward::packet(ctx, fwd, &pkt, Origin::NewFlow),
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
            };
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
            && !host::has_tcp_socket(ctx, &pkt.ip, l4)
        {
            return Ok(Reason::DropNoReplyEntry.into());
        }
        return Ok(Reason::PassNoReplyEntry.into());
    }
    Ok(Reason::PassNotService.into())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
