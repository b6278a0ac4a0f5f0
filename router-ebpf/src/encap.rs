//! DSR encapsulation: an outer IPv4 header (and, for GUE, a UDP header)
//! in front of the client's packet, which itself is left as it came. The
//! backend strips them (see the `decap` program) and answers the client
//! from the VIP.

use aya_ebpf::{helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use router_common::{
    PROTO_UDP, csum,
    dsr::{DsrFlow, OUTER_TTL, PROTO_IPIP},
};

use crate::parse::{ETH_LEN, IP_LEN, IP_OFF, UDP_LEN, ptr_at};

const ETH_P_IP: [u8; 2] = 0x0800u16.to_be_bytes();
const IP_DF: u8 = 0x40;

/// Prepends flow `e`'s outer headers to the packet, whose IPv4 datagram
/// is `inner_len` bytes, and addresses the frame to the cached next hop.
/// The outer header takes the inner one's DSCP/ECN and DF bit: a packet
/// the client let be fragmented may be fragmented on the tunnel too.
#[inline(always)]
pub fn push(ctx: &XdpContext, e: &DsrFlow, inner_len: u16) -> Result<(), ()> {
    let (tos, df) = {
        let ip: *const [u8; IP_LEN] = ptr_at(ctx, IP_OFF)?;
        // SAFETY: `ptr_at` checked the header lies within the packet; a
        // byte array has no alignment.
        let ip = unsafe { &*ip };
        (ip[1], ip[6] & IP_DF)
    };
    let gue = e.gue_dport != 0;
    let overhead = e.overhead();
    // SAFETY: the helper moves the packet's start within the headroom the
    // kernel reserves for it and invalidates earlier packet pointers, of
    // which none is used past here.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        return Err(());
    }
    let outer_len = inner_len.wrapping_add(overhead);
    let mut hdr = [0u8; IP_LEN];
    hdr[0] = 0x45;
    hdr[1] = tos;
    hdr[2..4].copy_from_slice(&outer_len.to_be_bytes());
    hdr[6] = df;
    hdr[8] = OUTER_TTL;
    hdr[9] = if gue { PROTO_UDP } else { PROTO_IPIP };
    hdr[12..16].copy_from_slice(&e.outer_src.to_ne_bytes());
    hdr[16..20].copy_from_slice(&e.backend_addr.to_ne_bytes());
    let c = csum::header(&hdr);
    hdr[10..12].copy_from_slice(&c.to_ne_bytes());

    let eth: *mut [u8; ETH_LEN] = ptr_at(ctx, 0)?;
    // SAFETY: as above, for the new start of the packet.
    let eth = unsafe { &mut *eth };
    eth[0..6].copy_from_slice(&e.dmac);
    eth[6..12].copy_from_slice(&e.smac);
    eth[12..14].copy_from_slice(&ETH_P_IP);
    let ip: *mut [u8; IP_LEN] = ptr_at(ctx, IP_OFF)?;
    // SAFETY: as above.
    unsafe { *ip = hdr };
    if gue {
        // No UDP checksum (allowed over IPv4): the inner packet has its own.
        put_udp(ctx, IP_OFF + IP_LEN, (e.gue_sport, e.gue_dport), inner_len)?;
    }
    Ok(())
}

/// Writes GUE's UDP header at frame offset `at`: ports `(sport, dport)`
/// (network order), the length of an `inner_len`-byte payload, and no
/// checksum (see `push` and `encap6::push` for why each family may omit
/// it).
#[inline(always)]
pub fn put_udp(
    ctx: &XdpContext,
    at: usize,
    (sport, dport): (u16, u16),
    inner_len: u16,
) -> Result<(), ()> {
    let udp: *mut [u8; UDP_LEN] = ptr_at(ctx, at)?;
    // SAFETY: `ptr_at` checked the header lies within the packet; a byte
    // array has no alignment.
    let udp = unsafe { &mut *udp };
    udp[0..2].copy_from_slice(&sport.to_ne_bytes());
    udp[2..4].copy_from_slice(&dport.to_ne_bytes());
    udp[4..6].copy_from_slice(&(inner_len.wrapping_add(UDP_LEN as u16)).to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
    Ok(())
}
