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

mod conn;
mod fib;
mod flags;
mod host;
mod inflight;
mod latency;
mod maps;
mod mem;
mod nat;
mod parse;
mod select;
mod stats;

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_redirect, macros::xdp, programs::XdpContext,
};
use aya_log_ebpf::warn;
use router_common::{
    ConnEntry, FILTER_SNAT, FILTER_VIP, PROTO_TCP, ServiceKey, addr_filter_bucket, reasons,
};

use crate::{
    conn::{FlowFlags, NewFlow, Table},
    maps::{ADDR_FILTER, CONNS, DATAPATH_LOG, FIB_GEN, HALF_OPEN, SERVICES, SNAT_ADDRS},
    parse::{Skip, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

#[xdp]
pub fn router(ctx: XdpContext) -> u32 {
    match try_router(&ctx) {
        Ok(action) => action,
        // Only reachable when a re-check of already validated bounds fails.
        Err(()) => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn counted(reason: u32, action: u32) -> u32 {
    stats::reason(reason);
    action
}

fn try_router(ctx: &XdpContext) -> Result<u32, ()> {
    let ip = match parse::ipv4(ctx) {
        Ok(ip) => ip,
        Err(Skip::NotIpv4) => return Ok(counted(reasons::PASS_NOT_SERVICE, xdp_action::XDP_PASS)),
        Err(_) => return Ok(counted(reasons::DROP_MALFORMED, xdp_action::XDP_DROP)),
    };
    let filter = match ADDR_FILTER.get(addr_filter_bucket(ip.dst)) {
        Some(bits) => *bits,
        None => 0,
    };
    if filter == 0 {
        return Ok(counted(reasons::PASS_NOT_SERVICE, xdp_action::XDP_PASS));
    }
    let l4 = match parse::l4(ctx) {
        Ok(l4) => l4,
        Err(Skip::Malformed) => return Ok(counted(reasons::DROP_MALFORMED, xdp_action::XDP_DROP)),
        Err(Skip::Fragment) => return Ok(counted(reasons::PASS_FRAGMENT, xdp_action::XDP_PASS)),
        Err(Skip::Options) => return Ok(counted(reasons::PASS_IP_OPTIONS, xdp_action::XDP_PASS)),
        Err(Skip::UnknownProto) | Err(Skip::NotIpv4) => {
            return Ok(counted(reasons::PASS_UNKNOWN_PROTO, xdp_action::XDP_PASS));
        }
    };
    let key = conn::key(ip.src, ip.dst, l4.src_port, l4.dst_port, l4.proto);
    let tcp = l4.proto == PROTO_TCP;
    let syn = tcp && l4.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let fin_or_rst = tcp && l4.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    let rst = tcp && l4.tcp_flags & TCP_RST != 0;
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
                latency::observe(&key, e, &l4);
            }
            return forward(ctx, e, l4.proto, ip.tot_len, false);
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
                latency::observe(&key, e, &l4);
            }
            return forward(ctx, e, l4.proto, ip.tot_len, false);
        }
        if !expired {
            inflight::release(e);
        }
        stale = Some((*e, Table::HalfOpen));
    }

    if filter & FILTER_VIP != 0 {
        let skey = ServiceKey {
            addr: ip.dst,
            port: l4.dst_port,
            proto: l4.proto,
            _pad: 0,
        };
        if let Some(svc) = unsafe { SERVICES.get(skey) } {
            if tcp && !syn {
                // Mid-flow packet with no entry (evicted, expired, or the LB
                // restarted): re-hash. While weights are unchanged Maglev maps
                // it to the same backend, and with the client's own port kept
                // as SNAT port (or the pair its surviving reply entry holds)
                // the backend sees the same 4-tuple as before. The flow is
                // confirmed by the client's next packet like any new one,
                // so a flood of spoofed ACKs cannot reach CONNS either.
                stats::reason(reasons::LRU_MISS);
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
                NewFlow::Created => forward(ctx, fwd, l4.proto, ip.tot_len, true),
                NewFlow::NoBackend => Ok(counted(reasons::DROP_NO_BACKEND, xdp_action::XDP_DROP)),
                NewFlow::SnatExhausted => {
                    if DATAPATH_LOG.load() != 0 {
                        warn!(ctx, "snat ports exhausted for service {}", svc.id);
                    }
                    Ok(counted(reasons::DROP_SNAT_EXHAUSTED, xdp_action::XDP_DROP))
                }
                NewFlow::TableFull => {
                    if DATAPATH_LOG.load() != 0 {
                        warn!(ctx, "connection table insert failed for service {}", svc.id);
                    }
                    Ok(counted(reasons::DROP_CONN_TABLE_FULL, xdp_action::XDP_DROP))
                }
            };
        }
    }
    if filter & FILTER_SNAT != 0 {
        // A TCP reply whose entry is gone must not reach the host's stack:
        // having no socket for it, the stack would answer with a reset and
        // end the backend's side of a connection that only lost its entry
        // (a half-open one under a SYN flood, say). The host's own traffic
        // through the SNAT address has a socket and passes.
        if tcp && SNAT_ADDRS.get_ptr(ip.dst).is_some() && !host::has_tcp_socket(ctx, &ip, &l4) {
            return Ok(counted(reasons::DROP_NO_REPLY_ENTRY, xdp_action::XDP_DROP));
        }
        return Ok(counted(reasons::PASS_NO_REPLY_ENTRY, xdp_action::XDP_PASS));
    }
    Ok(counted(reasons::PASS_NOT_SERVICE, xdp_action::XDP_PASS))
}

/// Translates a packet per its connection entry and sends it to the next hop.
/// `e` points into CONNS (established) or at a fresh copy (new flow, where a
/// resolved next hop is cached on the next packet's lookup).
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    e: &mut ConnEntry,
    proto: u8,
    tot_len: u16,
    new_conn: bool,
) -> Result<u32, ()> {
    let fib_gen = match FIB_GEN.get(0) {
        Some(g) => *g,
        None => 0,
    };
    if fib_gen == 0 || e.fib_gen != fib_gen {
        match fib::lookup(ctx, e, proto, tot_len) {
            Some(hop) => {
                // Concurrent writers on other CPUs store the same values.
                e.dmac = hop.dmac;
                e.smac = hop.smac;
                e.ifindex = hop.ifindex;
                e.fib_gen = fib_gen;
            }
            None => {
                // Hand the translated packet to the stack, which resolves the
                // neighbour; later packets of the flow then take the fast path.
                // It is still this flow's traffic (often its SYN): count it.
                nat::rewrite_l3_l4(ctx, e, proto)?;
                count_traffic(ctx, e, new_conn);
                return Ok(counted(reasons::PASS_FIB_FAILED, xdp_action::XDP_PASS));
            }
        }
    }
    nat::rewrite_l3_l4(ctx, e, proto)?;
    nat::rewrite_macs(ctx, &e.dmac, &e.smac)?;
    count_traffic(ctx, e, new_conn);
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    if e.ifindex == ingress {
        return Ok(counted(reasons::TX, xdp_action::XDP_TX));
    }
    let action = unsafe { bpf_redirect(e.ifindex, 0) } as u32;
    Ok(counted(reasons::REDIRECT, action))
}

#[inline(always)]
fn count_traffic(ctx: &XdpContext, e: &ConnEntry, new_conn: bool) {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    stats::traffic(e.service_id, e.backend_id, bytes, new_conn, e.is_reply());
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
