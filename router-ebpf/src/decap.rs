//! The `decap` XDP program, for backends of DSR services: strips the
//! outer header of an IPIP or GUE (variant 1) packet addressed to one of
//! this host's `DECAP_ADDRS`, or of an IPv6-in-IPv6 or GUE-over-IPv6
//! packet addressed to one of its `DECAP_ADDRS6`, and passes the client's
//! packet up the stack,
//! which delivers it to the VIP on the backend's loopback. Many kernels
//! (this project's among them) ship without the ipip and fou modules that
//! would do this; `router decap attach` loads it instead.
//!
//! Everything else passes untouched, so the program is safe on a
//! backend's only interface. An outer header with options or fragmented is
//! passed as well: the stack reassembles it, and with no tunnel module it
//! is then dropped and counted by the stack.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use router_common::{
    PROTO_UDP,
    dsr::{
        DECAP_PACKETS, DECAP_PASSED, DECAP_STATS_COUNT, GUE_OVERHEAD, IPIP_OVERHEAD, PROTO_IPIP,
    },
    v6::{Addr6, GUE6_OVERHEAD, IP6IP6_OVERHEAD, PROTO_IPV6},
};

/// Outer destinations (network order) this host decapsulates for; the
/// value is the GUE port (network order) accepted to that address, or 0
/// for IPIP only.
#[map]
static DECAP_ADDRS: HashMap<u32, u32> = HashMap::with_max_entries(64, 0);

/// The same for IPv6 outer destinations: the GUE port accepted, or 0 for
/// IPv6-in-IPv6 only.
#[map]
static DECAP_ADDRS6: HashMap<Addr6, u32> = HashMap::with_max_entries(64, 0);

#[map]
static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DECAP_STATS_COUNT, 0);

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const IP6_LEN: usize = 40;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

#[xdp]
pub fn decap(ctx: XdpContext) -> u32 {
    match try_decap(&ctx) {
        Ok(Some(stat)) => {
            if let Some(c) = DECAP_STATS.get_ptr_mut(stat) {
                // SAFETY: this CPU's slot of a per-CPU array.
                unsafe { *c += 1 };
            }
            xdp_action::XDP_PASS
        }
        Ok(None) | Err(()) => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

/// The counter to add to, or `None` for a packet that is not a tunnel's.
#[inline(always)]
fn try_decap(ctx: &XdpContext) -> Result<Option<u32>, ()> {
    let eth: *const [u8; ETH_LEN] = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the header lies within the packet; a byte
    // array has no alignment.
    let eth = unsafe { *eth };
    let overhead = match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => match outer4(ctx)? {
            Some(o) => o,
            None => return Ok(None),
        },
        ETH_P_IPV6 => match outer6(ctx)? {
            Some(o) => o,
            None => return Ok(None),
        },
        _ => return Ok(None),
    };
    // The inner packet must be of the outer one's family (an IPv4 VIP's
    // tunnel is IPv4, an IPv6 VIP's IPv6), whole as far as its header's
    // first byte goes.
    let Ok(inner) = ptr_at::<u8>(ctx, ETH_LEN + overhead) else {
        return Ok(Some(DECAP_PASSED));
    };
    let version = if u16::from_be_bytes([eth[12], eth[13]]) == ETH_P_IP {
        4
    } else {
        6
    };
    // SAFETY: as above.
    if unsafe { *inner } >> 4 != version {
        return Ok(Some(DECAP_PASSED));
    }
    // The Ethernet header moves up to just before the inner packet; the
    // MACs stay (the frame was for this host), and so does the type.
    let moved: *mut [u8; ETH_LEN] = ptr_at(ctx, overhead)?;
    // SAFETY: as above; `eth` is a copy, so the overlap does not matter.
    unsafe { *moved = eth };
    // SAFETY: moves the packet's start within its buffer; no earlier
    // packet pointer is used past here.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, overhead as i32) } != 0 {
        return Err(());
    }
    Ok(Some(DECAP_PACKETS))
}

/// The outer headers' length of an IPIP or GUE packet to one of
/// `DECAP_ADDRS`, or `None` for anything else.
#[inline(always)]
fn outer4(ctx: &XdpContext) -> Result<Option<usize>, ()> {
    let ip: *const [u8; IP_LEN] = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: as in `try_decap`.
    let ip = unsafe { &*ip };
    if ip[0] != 0x45 || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Ok(None);
    }
    let dst = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    // SAFETY: a plain integer value, copied at once.
    let Some(gue_port) = (unsafe { DECAP_ADDRS.get(dst) }).copied() else {
        return Ok(None);
    };
    Ok(match ip[9] {
        PROTO_IPIP => Some(IPIP_OVERHEAD as usize),
        PROTO_UDP if gue_port != 0 && gue_to(ctx, ETH_LEN + IP_LEN, gue_port)? => {
            Some(GUE_OVERHEAD as usize)
        }
        _ => None,
    })
}

/// The same for IPv6-in-IPv6 or GUE over IPv6 to one of `DECAP_ADDRS6`.
/// An outer header followed by extension headers is not one this LB
/// sends: it passes.
#[inline(always)]
fn outer6(ctx: &XdpContext) -> Result<Option<usize>, ()> {
    let ip: *const [u8; IP6_LEN] = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: as in `try_decap`.
    let ip = unsafe { &*ip };
    if ip[0] >> 4 != 6 {
        return Ok(None);
    }
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&ip[24..40]);
    // SAFETY: a plain integer value, copied at once.
    let Some(gue_port) = (unsafe { DECAP_ADDRS6.get(Addr6::from_octets(dst)) }).copied() else {
        return Ok(None);
    };
    Ok(match ip[6] {
        PROTO_IPV6 => Some(IP6IP6_OVERHEAD as usize),
        PROTO_UDP if gue_port != 0 && gue_to(ctx, ETH_LEN + IP6_LEN, gue_port)? => {
            Some(GUE6_OVERHEAD as usize)
        }
        _ => None,
    })
}

/// Whether the UDP header at `off` is addressed to GUE port `port`
/// (network order).
#[inline(always)]
fn gue_to(ctx: &XdpContext, off: usize, port: u32) -> Result<bool, ()> {
    let udp: *const [u8; 4] = ptr_at(ctx, off)?;
    // SAFETY: as in `try_decap`.
    let udp = unsafe { &*udp };
    Ok(u32::from(u16::from_ne_bytes([udp[2], udp[3]])) == port)
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
