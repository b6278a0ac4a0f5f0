//! The IPv6 NAT rewrite: addresses, ports and the transport checksum from
//! the per-flow delta computed once when the flow was created. IPv6 has no
//! header checksum, so the hop limit changes alone.

use aya_ebpf::programs::XdpContext;
use router_common::{
    csum,
    v6::{Addr6, NatEntry6},
};

use crate::{
    nat::{self, Hop},
    parse::ptr_at,
    parse6::{IP6_LEN, IP6_OFF},
};

/// The transport checksum's delta, folded, for translating addresses
/// (`old_src`, `old_dst`) to (`new_src`, `new_dst`) and ports `ports` (old
/// in the low word, new in the high one, see `ports`): the pseudo-header holds both
/// addresses. A BPF function of its own (of at most five arguments),
/// where the sixteen words it reads spill into its frame.
#[inline(never)]
pub fn delta(
    old_src: &Addr6,
    old_dst: &Addr6,
    new_src: &Addr6,
    new_dst: &Addr6,
    ports: u64,
) -> u16 {
    let mut sum = csum::delta32(ports as u32, (ports >> 32) as u32);
    for i in 0..4 {
        sum += csum::delta32(old_src.words[i], new_src.words[i]);
        sum += csum::delta32(old_dst.words[i], new_dst.words[i]);
    }
    csum::fold(sum)
}

/// The old and the new (source, destination) ports, network order, as
/// `delta` takes them.
#[inline(always)]
pub fn ports(old: (u16, u16), new: (u16, u16)) -> u64 {
    let word = |(s, d): (u16, u16)| u64::from(s) | (u64::from(d) << 16);
    word(old) | (word(new) << 32)
}

/// Rewrites the packet per `e` (transport header at `l4_off`); for
/// `Hop::Program`, takes one from the hop limit as a router does (the
/// caller has checked that it is above 1).
#[inline(always)]
pub fn packet(
    ctx: &XdpContext,
    e: &NatEntry6,
    (proto, l4_off): (u8, u16),
    hop: Hop,
) -> Result<(), ()> {
    let ip: *mut [u8; IP6_LEN] = ptr_at(ctx, IP6_OFF)?;
    // SAFETY: `ptr_at` checked the header lies within the packet, which is
    // this program's alone while it runs; a byte array has no alignment.
    let ip = unsafe { &mut *ip };
    if hop == Hop::Program {
        ip[7] = ip[7].wrapping_sub(1);
    }
    put_addr(ctx, IP6_OFF + 8, &e.new_src)?;
    put_addr(ctx, IP6_OFF + 24, &e.new_dst)?;
    // Masked as `parse6` masked it: the verifier sees the offset bounded.
    nat::rewrite_l4(
        ctx,
        l4_off as usize & 0x3fff,
        proto,
        (e.new_src_port, e.new_dst_port),
        e.l4_csum_delta,
    )
}

/// Writes `a` at frame offset `at` in eight 16-bit stores (the header is
/// 2-aligned: see `parse6::is_ipv6`), as `parse6` reads addresses.
#[inline(always)]
pub fn put_addr(ctx: &XdpContext, at: usize, a: &Addr6) -> Result<(), ()> {
    let p: *mut [u16; 8] = ptr_at(ctx, at)?;
    // SAFETY: `ptr_at` checked the address lies within the packet, and it
    // is 2-aligned.
    let p = unsafe { &mut *p };
    for i in 0..4 {
        let w = a.words[i];
        p[i * 2] = w as u16;
        p[i * 2 + 1] = (w >> 16) as u16;
    }
    Ok(())
}
