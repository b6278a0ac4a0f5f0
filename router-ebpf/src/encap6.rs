//! IPv6 DSR encapsulation: an outer IPv6 header (and, for GUE, a UDP
//! header) in front of the client's IPv6 packet, which is left as it came.
//! The backend's `decap` program strips them.

use aya_ebpf::{helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use router_common::{
    PROTO_UDP,
    dsr::OUTER_TTL,
    v6::{Addr6, DsrFlow6, PROTO_IPV6},
};

use crate::{
    encap::put_udp,
    parse::{ETH_LEN, ptr_at},
    parse6::{IP6_LEN, IP6_OFF},
};

const ETH_P_IPV6: [u8; 2] = 0x86ddu16.to_be_bytes();

/// Prepends flow `e`'s outer headers to the packet, whose IPv6 datagram
/// is `inner_len` bytes, and addresses the frame to the cached next hop.
/// The outer header takes the inner one's traffic class (DSCP and ECN)
/// and the flow's own label.
///
/// GUE's UDP checksum is 0: RFC 6935 allows it for tunnel protocols over
/// IPv6, as Linux's `udp6zerocsumrx` and the `decap` program do, because
/// the inner packet carries its own transport checksum.
#[inline(always)]
pub fn push(ctx: &XdpContext, e: &DsrFlow6, inner_len: u16) -> Result<(), ()> {
    let tclass = {
        let ip: *const [u8; 2] = ptr_at(ctx, IP6_OFF)?;
        // SAFETY: `ptr_at` checked both bytes lie within the packet.
        let ip = unsafe { &*ip };
        (ip[0] << 4) | (ip[1] >> 4)
    };
    let gue = e.gue_dport != 0;
    let overhead = e.overhead();
    // SAFETY: the helper moves the packet's start within the headroom the
    // kernel reserves for it and invalidates earlier packet pointers, of
    // which none is used past here.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        return Err(());
    }
    let payload = inner_len.wrapping_add(overhead - IP6_LEN as u16);
    let label = e.flow_label & 0x000f_ffff;
    let first = (6u32 << 28) | ((tclass as u32) << 20) | label;

    let eth: *mut [u8; ETH_LEN] = ptr_at(ctx, 0)?;
    // SAFETY: as above, for the new start of the packet.
    let eth = unsafe { &mut *eth };
    eth[0..6].copy_from_slice(&e.dmac);
    eth[6..12].copy_from_slice(&e.smac);
    eth[12..14].copy_from_slice(&ETH_P_IPV6);
    // Written in place, with the addresses in 16-bit stores (the header
    // is 2-aligned), so that no 40-byte copy is built on the stack.
    let ip: *mut [u8; 8] = ptr_at(ctx, IP6_OFF)?;
    // SAFETY: as above.
    let ip = unsafe { &mut *ip };
    ip[0..4].copy_from_slice(&first.to_be_bytes());
    ip[4..6].copy_from_slice(&payload.to_be_bytes());
    ip[6] = if gue { PROTO_UDP } else { PROTO_IPV6 };
    ip[7] = OUTER_TTL;
    put_addr(ctx, IP6_OFF + 8, &e.outer_src)?;
    put_addr(ctx, IP6_OFF + 24, &e.backend_addr)?;
    if gue {
        put_udp(
            ctx,
            IP6_OFF + IP6_LEN,
            (e.gue_sport, e.gue_dport),
            inner_len,
        )?;
    }
    Ok(())
}

/// Writes address `a` at frame offset `at` (2-aligned).
#[inline(always)]
fn put_addr(ctx: &XdpContext, at: usize, a: &Addr6) -> Result<(), ()> {
    let p: *mut [u16; 8] = ptr_at(ctx, at)?;
    // SAFETY: `ptr_at` checked the address lies within the packet, and it
    // is 2-aligned.
    let p = unsafe { &mut *p };
    for (i, w) in a.words.iter().enumerate() {
        // The halves of a natively loaded word, stored natively.
        p[i * 2] = *w as u16;
        p[i * 2 + 1] = (*w >> 16) as u16;
    }
    Ok(())
}
