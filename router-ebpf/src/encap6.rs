//! IPv6 DSR encapsulation: an outer IPv6 header (and, for GUE, a UDP
//! header) in front of the client's IPv6 packet, which is left as it came.
//! The backend's `decap` program strips them.

use aya_ebpf::{helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use router_common::{
    PROTO_UDP,
    dsr::OUTER_TTL,
    v6::{DsrFlow6, PROTO_IPV6},
};

use crate::{
    parse::{ETH_LEN, UDP_LEN, ptr_at},
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
    let mut hdr = [0u8; IP6_LEN];
    hdr[0..4].copy_from_slice(&first.to_be_bytes());
    hdr[4..6].copy_from_slice(&payload.to_be_bytes());
    hdr[6] = if gue { PROTO_UDP } else { PROTO_IPV6 };
    hdr[7] = OUTER_TTL;
    hdr[8..24].copy_from_slice(&e.outer_src.octets());
    hdr[24..40].copy_from_slice(&e.backend_addr.octets());

    let eth: *mut [u8; ETH_LEN] = ptr_at(ctx, 0)?;
    // SAFETY: as above, for the new start of the packet.
    let eth = unsafe { &mut *eth };
    eth[0..6].copy_from_slice(&e.dmac);
    eth[6..12].copy_from_slice(&e.smac);
    eth[12..14].copy_from_slice(&ETH_P_IPV6);
    let ip: *mut [u8; IP6_LEN] = ptr_at(ctx, IP6_OFF)?;
    // SAFETY: as above.
    unsafe { *ip = hdr };
    if gue {
        let udp: *mut [u8; UDP_LEN] = ptr_at(ctx, IP6_OFF + IP6_LEN)?;
        // SAFETY: as above.
        let udp = unsafe { &mut *udp };
        udp[0..2].copy_from_slice(&e.gue_sport.to_ne_bytes());
        udp[2..4].copy_from_slice(&e.gue_dport.to_ne_bytes());
        udp[4..6].copy_from_slice(&(inner_len.wrapping_add(UDP_LEN as u16)).to_be_bytes());
        udp[6..8].copy_from_slice(&[0, 0]);
    }
    Ok(())
}
