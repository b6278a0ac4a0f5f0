//! ICMP "fragmentation needed" for a client whose packet, encapsulated,
//! would not fit the route to its backend. Path-MTU discovery on the
//! client then lowers what it sends; without this, a DSR flow with full
//! segments would stall. The answer comes from the VIP, as a router on
//! the client's path to the VIP would send it, and goes back out the
//! interface the packet came in on, to the MAC it came from.

use aya_ebpf::{
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use router_common::csum;

use crate::parse::{ETH_LEN, IP_LEN, IP_OFF, PROTO_ICMP, ptr_at};

const ICMP_LEN: usize = 8;
/// What the error quotes: the packet's IPv4 header and 8 bytes after it.
const QUOTE_LEN: usize = IP_LEN + 8;
/// The error's IPv4 datagram.
const ERR_LEN: usize = IP_LEN + ICMP_LEN + QUOTE_LEN;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ERR_TTL: u8 = 64;

/// Turns the packet (an IPv4 datagram without options, at least
/// `QUOTE_LEN` bytes) into the ICMP error telling its sender that `mtu`
/// bytes fit, in place.
#[inline(always)]
pub fn answer(ctx: &XdpContext, mtu: u16) -> Result<(), ()> {
    let (mut eth, mut addrs) = ([0u8; ETH_LEN], [0u8; 8]);
    {
        let e: *const [u8; ETH_LEN] = ptr_at(ctx, 0)?;
        let ip: *const [u8; IP_LEN] = ptr_at(ctx, IP_OFF)?;
        // SAFETY: `ptr_at` checked both lie within the packet; byte
        // arrays have no alignment.
        let (e, ip) = unsafe { (&*e, &*ip) };
        // Back where it came from.
        eth[0..6].copy_from_slice(&e[6..12]);
        eth[6..12].copy_from_slice(&e[0..6]);
        eth[12..14].copy_from_slice(&e[12..14]);
        // From the VIP (the packet's destination) to its sender.
        addrs[0..4].copy_from_slice(&ip[16..20]);
        addrs[4..8].copy_from_slice(&ip[12..16]);
    }
    let grow = (IP_LEN + ICMP_LEN) as i32;
    // SAFETY: the helpers move the packet's start and end within its
    // buffer and invalidate earlier packet pointers, of which none is used
    // past each call.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return Err(());
    }
    let len = (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, (ETH_LEN + ERR_LEN) as i32 - len) } != 0 {
        return Err(());
    }
    let mut ip = [0u8; IP_LEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ERR_LEN as u16).to_be_bytes());
    ip[8] = ERR_TTL;
    ip[9] = PROTO_ICMP;
    ip[12..20].copy_from_slice(&addrs);
    let c = csum::header(&ip);
    ip[10..12].copy_from_slice(&c.to_ne_bytes());

    let e: *mut [u8; ETH_LEN] = ptr_at(ctx, 0)?;
    let h: *mut [u8; IP_LEN] = ptr_at(ctx, IP_OFF)?;
    let icmp: *mut [u8; ICMP_LEN + QUOTE_LEN] = ptr_at(ctx, IP_OFF + IP_LEN)?;
    // SAFETY: `ptr_at` checked each lies within the (new) packet.
    let (e, h, icmp) = unsafe { (&mut *e, &mut *h, &mut *icmp) };
    *e = eth;
    *h = ip;
    icmp[0] = ICMP_DEST_UNREACH;
    icmp[1] = ICMP_FRAG_NEEDED;
    icmp[2..6].copy_from_slice(&[0, 0, 0, 0]);
    icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
    let c = csum::header(icmp);
    icmp[2..4].copy_from_slice(&c.to_ne_bytes());
    Ok(())
}
