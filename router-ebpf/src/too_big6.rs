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
/// BPF function of its own: its headers take a frame of their own rather
/// than room in `router_v6`'s.
#[inline(never)]
pub fn answer(ctx: &XdpContext, mtu: u32) -> Result<(), ()> {
    let (mut eth, mut addrs) = ([0u8; ETH_LEN], [0u8; 32]);
    {
        let e: *const [u8; ETH_LEN] = ptr_at(ctx, 0)?;
        let ip: *const [u8; IP6_LEN] = ptr_at(ctx, IP6_OFF)?;
        // SAFETY: `ptr_at` checked both lie within the packet; byte
        // arrays have no alignment.
        let (e, ip) = unsafe { (&*e, &*ip) };
        eth[0..6].copy_from_slice(&e[6..12]);
        eth[6..12].copy_from_slice(&e[0..6]);
        eth[12..14].copy_from_slice(&e[12..14]);
        // From the VIP (the packet's destination) to its sender.
        addrs[0..16].copy_from_slice(&ip[24..40]);
        addrs[16..32].copy_from_slice(&ip[8..24]);
    }
    let grow = (IP6_LEN + ICMP6_LEN) as i32;
    // SAFETY: the helpers move the packet's start and end within its
    // buffer and invalidate earlier packet pointers, of which none is used
    // past each call.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return Err(());
    }
    let want = (ETH_LEN + IP6_LEN + ICMP6_LEN + QUOTE6_LEN) as i32;
    let len = (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, want - len) } != 0 {
        return Err(());
    }
    let icmp_len = (ICMP6_LEN + QUOTE6_LEN) as u32;
    let mut ip = [0u8; IP6_LEN];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
    ip[6] = PROTO_ICMPV6;
    ip[7] = ERR_HOP_LIMIT;
    ip[8..40].copy_from_slice(&addrs);
    let mut icmp = [0u8; ICMP6_LEN];
    icmp[0] = ICMP6_PACKET_TOO_BIG;
    icmp[4..8].copy_from_slice(&mtu.to_be_bytes());

    let quote: *const [u8; QUOTE6_LEN] = ptr_at(ctx, IP6_OFF + IP6_LEN + ICMP6_LEN)?;
    // SAFETY: `ptr_at` checked the quote lies within the packet; the
    // helper only reads it (no source buffer, a 4-byte multiple).
    let quoted = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            quote as *mut u32,
            QUOTE6_LEN as u32,
            0,
        )
    };
    if quoted < 0 {
        return Err(());
    }
    // The pseudo-header (RFC 8200 §8.1) and the ICMPv6 header, summed
    // together: each `header` sum, inverted back, is a partial sum.
    let mut pseudo = [0u8; 40];
    pseudo[0..32].copy_from_slice(&addrs);
    pseudo[32..36].copy_from_slice(&icmp_len.to_be_bytes());
    pseudo[39] = PROTO_ICMPV6;
    let sum = (!csum::header(&pseudo)) as u32
        + (!csum::header(&icmp)) as u32
        + csum::fold(quoted as u32) as u32;
    let c = !csum::fold(sum);
    icmp[2..4].copy_from_slice(&c.to_ne_bytes());

    let e: *mut [u8; ETH_LEN] = ptr_at(ctx, 0)?;
    let h: *mut [u8; IP6_LEN] = ptr_at(ctx, IP6_OFF)?;
    let i: *mut [u8; ICMP6_LEN] = ptr_at(ctx, IP6_OFF + IP6_LEN)?;
    // SAFETY: `ptr_at` checked each lies within the (new) packet.
    unsafe {
        *e = eth;
        *h = ip;
        *i = icmp;
    }
    Ok(())
}
