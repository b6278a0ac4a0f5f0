//! ICMPv6 "packet too big" (RFC 4443 §3.2) for a client whose packet,
//! encapsulated, would not fit the route to its backend: IPv6 routers
//! never fragment, so without it a DSR flow with full segments would
//! stall. As `too_big` does for IPv4, the answer comes from the VIP and
//! goes back out the way the packet came.

use aya_ebpf::{
    helpers::generated::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use router_common::{csum, v6::PROTO_ICMPV6};

use crate::{
    parse::{ETH_LEN, ptr_at},
    parse6::{IP6_LEN, IP6_OFF},
};

const ICMP6_LEN: usize = 8;
/// What the error quotes of the packet: its first 512 bytes, the most one
/// `bpf_csum_diff` sums, and room for every header a client's stack needs
/// to find its socket (extension headers included). A packet too big for
/// a tunnel over a link of IPv6's minimum MTU is longer than this.
pub const QUOTE6_LEN: usize = 512;
const ICMP6_PACKET_TOO_BIG: u8 = 2;
const ERR_HOP_LIMIT: u8 = 64;

/// Turns the packet (an IPv6 datagram of at least `QUOTE6_LEN` bytes)
/// into the error telling its sender that `mtu` bytes fit, in place. A
/// BPF function of its own, building nothing on the stack: the headers are
/// written into the packet and summed there by `bpf_csum_diff`, because
/// `router_v6`'s frame and this one share the 512 bytes a program has.
#[inline(never)]
pub fn answer(ctx: &XdpContext, mtu: u32) -> Result<(), ()> {
    let grow = (IP6_LEN + ICMP6_LEN) as i32;
    // SAFETY: the helpers move the packet's start and end within its
    // buffer and invalidate earlier packet pointers, of which none is used
    // past each call. Growing the head leaves the old frame where it was,
    // `grow` bytes further in: its IPv6 header starts the quote.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return Err(());
    }
    let want = (ETH_LEN + IP6_LEN + ICMP6_LEN + QUOTE6_LEN) as i32;
    let len = (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, want - len) } != 0 {
        return Err(());
    }
    const OLD_ETH: usize = IP6_LEN + ICMP6_LEN;
    const QUOTE: usize = ETH_LEN + IP6_LEN + ICMP6_LEN;
    let eth: *mut [u8; ETH_LEN] = ptr_at(ctx, 0)?;
    let old_eth: *const [u8; ETH_LEN] = ptr_at(ctx, OLD_ETH)?;
    let ip: *mut [u8; IP6_LEN] = ptr_at(ctx, IP6_OFF)?;
    let old_ip: *const [u8; IP6_LEN] = ptr_at(ctx, QUOTE)?;
    let icmp: *mut [u8; ICMP6_LEN] = ptr_at(ctx, IP6_OFF + IP6_LEN)?;
    // SAFETY: `ptr_at` checked each lies within the packet; the new
    // headers and the old ones do not overlap (the old Ethernet header
    // ends where the quote begins).
    let (eth, old_eth, ip, old_ip, icmp) =
        unsafe { (&mut *eth, &*old_eth, &mut *ip, &*old_ip, &mut *icmp) };
    // Back where it came from, from the VIP (the packet's destination).
    eth[0..6].copy_from_slice(&old_eth[6..12]);
    eth[6..12].copy_from_slice(&old_eth[0..6]);
    eth[12..14].copy_from_slice(&old_eth[12..14]);
    let icmp_len = (ICMP6_LEN + QUOTE6_LEN) as u32;
    ip[0..4].copy_from_slice(&(6u32 << 28).to_be_bytes());
    ip[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
    ip[6] = PROTO_ICMPV6;
    ip[7] = ERR_HOP_LIMIT;
    ip[8..24].copy_from_slice(&old_ip[24..40]);
    ip[24..40].copy_from_slice(&old_ip[8..24]);
    icmp[0] = ICMP6_PACKET_TOO_BIG;
    icmp[1..4].copy_from_slice(&[0, 0, 0]);
    icmp[4..8].copy_from_slice(&mtu.to_be_bytes());

    // The pseudo-header (RFC 8200 §8.1: both addresses, the length, the
    // next header) and the message, summed where they lie.
    let addrs: *mut [u8; 32] = ptr_at(ctx, IP6_OFF + 8)?;
    let message: *mut [u8; ICMP6_LEN] = ptr_at(ctx, IP6_OFF + IP6_LEN)?;
    let quote: *mut [u8; QUOTE6_LEN] = ptr_at(ctx, QUOTE)?;
    // Network-order words summed natively, as `csum` does.
    let sum = u32::from(u16::from_ne_bytes((icmp_len as u16).to_be_bytes()))
        + u32::from(u16::from_ne_bytes([0, PROTO_ICMPV6]))
        + sum_of(addrs.cast(), 32)?
        + sum_of(message.cast(), ICMP6_LEN as u32)?
        + sum_of(quote.cast(), QUOTE6_LEN as u32)?;
    let c = !csum::fold(sum);
    let field: *mut [u8; 2] = ptr_at(ctx, IP6_OFF + IP6_LEN + 2)?;
    // SAFETY: as above.
    unsafe { *field = c.to_ne_bytes() };
    Ok(())
}

/// The folded one's-complement sum of `n` bytes (a multiple of 4, at most
/// 512) of the packet at `p`, which `ptr_at` has checked.
#[inline(always)]
fn sum_of(p: *mut u32, n: u32) -> Result<u32, ()> {
    // SAFETY: the region lies within the packet (the caller's `ptr_at`);
    // the helper only reads it.
    let part = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p, n, 0) };
    if part < 0 {
        return Err(());
    }
    Ok(u32::from(csum::fold(part as u32)))
}
