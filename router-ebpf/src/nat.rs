//! The NAT rewrite: addresses, ports, MACs, and checksums updated from the
//! per-flow deltas computed once when the flow was created.

use aya_ebpf::programs::XdpContext;
use router_common::{ConnEntry, PROTO_TCP, csum};

use crate::parse::{IP_LEN, IP_OFF, L4_OFF, TCP_LEN, UDP_LEN, ptr_at};

/// Checksum deltas for translating (src, dst, sport, dport) to the new tuple.
/// Returns (l3, l4).
#[inline(always)]
pub fn deltas(old: (u32, u32, u16, u16), new: (u32, u32, u16, u16)) -> (u32, u32) {
    let l3 = csum::delta32(old.0, new.0) + csum::delta32(old.1, new.1);
    let l4 = l3 + csum::delta16(old.2, new.2) + csum::delta16(old.3, new.3);
    (l3, l4)
}

/// Who sends a translated packet on, and so takes one from its TTL.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// The program itself: it is the packet's router hop.
    Program,
    /// The host's stack, which decrements the TTL when it forwards.
    Stack,
}

/// Rewrites L3/L4 per `e`; for `Hop::Program`, takes one from the TTL as
/// a router does (the caller has checked that it is above 1). The caller
/// has already validated the headers, so a failed bounds check here only
/// means the verifier needs to see it again.
#[inline(always)]
pub fn rewrite_l3_l4(ctx: &XdpContext, e: &ConnEntry, proto: u8, hop: Hop) -> Result<(), ()> {
    let ip: *mut [u8; IP_LEN] = ptr_at(ctx, IP_OFF)?;
    // SAFETY: `ptr_at` checked the header lies within the packet, which is
    // this program's alone while it runs; a byte array has no alignment.
    let ip = unsafe { &mut *ip };
    ip[12..16].copy_from_slice(&e.new_src_addr.to_ne_bytes());
    ip[16..20].copy_from_slice(&e.new_dst_addr.to_ne_bytes());
    // TTL and protocol share a 16-bit word: its change joins the flow's
    // own delta, so the header checksum is updated once.
    let ttl_word = u16::from_ne_bytes([ip[8], ip[9]]);
    if hop == Hop::Program {
        ip[8] = ip[8].wrapping_sub(1);
    }
    let ttl_delta = csum::delta16(ttl_word, u16::from_ne_bytes([ip[8], ip[9]]));
    let c = csum::apply(
        u16::from_ne_bytes([ip[10], ip[11]]),
        e.l3_csum_delta as u32 + ttl_delta,
    );
    ip[10..12].copy_from_slice(&c.to_ne_bytes());
    rewrite_l4(
        ctx,
        L4_OFF,
        proto,
        (e.new_src_port, e.new_dst_port),
        e.l4_csum_delta,
    )
}

/// Writes the ports (network order) of the TCP or UDP header at frame
/// offset `off` and folds `delta` into its checksum: the transport half of
/// a NAT rewrite, the same for both families (`rewrite6` passes the offset
/// its walk found; IPv4's is constant). A UDP checksum of 0 means "none"
/// (IPv4) or is the sender's error (IPv6) and stays; a computed 0 is sent
/// as all ones.
#[inline(always)]
pub fn rewrite_l4(
    ctx: &XdpContext,
    off: usize,
    proto: u8,
    (src_port, dst_port): (u16, u16),
    delta: u16,
) -> Result<(), ()> {
    if proto == PROTO_TCP {
        let tcp: *mut [u8; TCP_LEN] = ptr_at(ctx, off)?;
        // SAFETY: `ptr_at` checked the header lies within the packet, which
        // is this program's alone while it runs; a byte array has no
        // alignment.
        let tcp = unsafe { &mut *tcp };
        tcp[0..2].copy_from_slice(&src_port.to_ne_bytes());
        tcp[2..4].copy_from_slice(&dst_port.to_ne_bytes());
        let c = csum::apply(u16::from_ne_bytes([tcp[16], tcp[17]]), delta as u32);
        tcp[16..18].copy_from_slice(&c.to_ne_bytes());
    } else {
        let udp: *mut [u8; UDP_LEN] = ptr_at(ctx, off)?;
        // SAFETY: as for TCP.
        let udp = unsafe { &mut *udp };
        udp[0..2].copy_from_slice(&src_port.to_ne_bytes());
        udp[2..4].copy_from_slice(&dst_port.to_ne_bytes());
        let old = u16::from_ne_bytes([udp[6], udp[7]]);
        if old != 0 {
            let c = match csum::apply(old, delta as u32) {
                0 => 0xffff,
                c => c,
            };
            udp[6..8].copy_from_slice(&c.to_ne_bytes());
        }
    }
    Ok(())
}

/// Takes one from the TTL of the packet's IPv4 header (without options),
/// with its checksum, as `rewrite_l3_l4` does for `Hop::Program`: for a
/// packet the program sends on already translated (an ICMP error, see
/// `icmp`; the caller has checked that the TTL is above 1).
#[inline(always)]
pub fn take_ttl(ctx: &XdpContext) -> Result<(), ()> {
    let ip: *mut [u8; IP_LEN] = ptr_at(ctx, IP_OFF)?;
    // SAFETY: as in `rewrite_l3_l4`.
    let ip = unsafe { &mut *ip };
    let ttl_word = u16::from_ne_bytes([ip[8], ip[9]]);
    ip[8] = ip[8].wrapping_sub(1);
    let delta = csum::delta16(ttl_word, u16::from_ne_bytes([ip[8], ip[9]]));
    let c = csum::apply(u16::from_ne_bytes([ip[10], ip[11]]), delta);
    ip[10..12].copy_from_slice(&c.to_ne_bytes());
    Ok(())
}

#[inline(always)]
pub fn rewrite_macs(ctx: &XdpContext, dmac: &[u8; 6], smac: &[u8; 6]) -> Result<(), ()> {
    let eth: *mut [u8; 12] = ptr_at(ctx, 0)?;
    // SAFETY: as in `rewrite_l3_l4`.
    let eth = unsafe { &mut *eth };
    eth[0..6].copy_from_slice(dmac);
    eth[6..12].copy_from_slice(smac);
    Ok(())
}
