//! ICMP errors about tracked flows, translated in both directions the way
//! Linux IPVS translates them in NAT mode: a "fragmentation needed" for a
//! flow must reach the endpoint that sent the too-large packet, or path-MTU
//! discovery stalls, and a port unreachable must reach the UDP client.
//!
//! An error quotes the IPv4 header and at least 8 bytes of the packet that
//! caused it, which is a packet the balancer sent, so it arrives at that
//! packet's source: a SNAT address (the balancer sent SNAT → backend) or a
//! VIP (it sent VIP → client). The quoted tuple reversed is the key of the
//! flow direction that packets from the error's far end take:
//!
//! - from the backend's side: backend → SNAT, the flow's reply entry, which
//!   translates to VIP → client;
//! - from the client's side: client → VIP, the flow's forward entry, which
//!   translates to SNAT → backend.
//!
//! Either way the entry `e` at that key says it all: the error goes out as
//! `e.new_src → e.new_dst` (whoever sent it, a router on the path or the
//! endpoint), and its quote becomes what the other end sent or received,
//! `e.new_dst:port → e.new_src:port`. Every checksum is updated
//! incrementally: the outer and the quoted IPv4 header, the quoted TCP or
//! UDP checksum where the quote holds it (UDP's always, TCP's from 18
//! quoted bytes on; a UDP checksum of 0 stays 0), and the ICMP checksum
//! over all of those.
//!
//! An error changes no state: it never refreshes, closes or creates a
//! flow. It is forwarded as the flow's packets are, one router hop on: its
//! TTL is checked and decremented like theirs. It is translated only on a live entry that owns it: a reply
//! entry, or a forward entry whose reply key is still its own (a forward
//! entry whose backend 4-tuple went to another flow would carry the error
//! to that flow's connection). Anything else is passed as before, with
//! its own counter: errors no entry owns, errors whose quote has IP
//! options, is a later fragment or is not TCP or UDP (ICMP about ICMP is
//! never translated), and ICMP that is not an error (echo and the rest).
//! An error whose quote is cut short of the IPv4 header and 8 bytes is
//! dropped, as the host's stack would drop it.
//!
//! Offsets are fixed: neither the outer nor the quoted header may carry
//! options (the outer's were refused before this), so the verifier sees
//! constant bounds only.

use aya_ebpf::programs::XdpContext;
use router_common::{ConnEntry, ConnKey, PROTO_TCP, PROTO_UDP, csum, reasons::Reason};

use crate::{
    clock::Clock,
    conn::{self, Lookup, Table},
    forward,
    parse::{IP_LEN, IP_OFF, L4_OFF, ptr_at},
    verdict::Verdict,
};

/// The ICMP types translated: destination unreachable (fragmentation
/// needed among its codes) and time exceeded.
const DEST_UNREACH: u8 = 3;
const TIME_EXCEEDED: u8 = 11;

const ICMP_LEN: usize = 8;
/// Where the quoted IPv4 header and the quoted transport header start.
const INNER_IP_OFF: usize = L4_OFF + ICMP_LEN;
const INNER_L4_OFF: usize = INNER_IP_OFF + IP_LEN;
/// Transport bytes every error quotes (RFC 792): the ports, and UDP's
/// checksum.
const QUOTE_MIN: usize = 8;
/// Quoted transport bytes that hold TCP's checksum.
const TCP_CSUM_QUOTED: usize = 18;

/// The verdict for an ICMP packet to one of our addresses (outer IPv4
/// header checked, without options, not a fragment). Inlined: as a BPF
/// function of its own its stack would add to the packet path's, past the
/// verifier's 512 bytes.
#[inline(always)]
pub fn error(ctx: &XdpContext) -> Result<Verdict, ()> {
    let outer: *const [u8; IP_LEN] = ptr_at(ctx, IP_OFF)?;
    // Read afresh (volatile): reusing what parsing read would keep those
    // registers alive across the protocol branch, and spill them on the
    // TCP and UDP path.
    // SAFETY: `ptr_at` checked the header lies within the packet; a byte
    // array has no alignment, and `read_volatile` copies it.
    let outer = unsafe { core::ptr::read_volatile(outer) };
    let tot_len = u16::from_be_bytes([outer[2], outer[3]]);
    let ttl = outer[8];
    let outer_dst = u32::from_ne_bytes([outer[16], outer[17], outer[18], outer[19]]);
    let Ok(icmp) = ptr_at::<[u8; ICMP_LEN]>(ctx, L4_OFF) else {
        return Ok(Reason::DropMalformed.into());
    };
    if (tot_len as usize) < IP_LEN + ICMP_LEN {
        return Ok(Reason::DropMalformed.into());
    }
    // SAFETY: as for the outer header.
    let icmp_type = unsafe { (*icmp)[0] };
    if icmp_type != DEST_UNREACH && icmp_type != TIME_EXCEEDED {
        return Ok(Reason::PassIcmpOther.into());
    }
    // `parse::ipv4` checked that the datagram fits the frame, so a total
    // length that covers the quote puts it in the packet; the verifier
    // needs its own check all the same.
    if (tot_len as usize) < IP_LEN + ICMP_LEN + IP_LEN + QUOTE_MIN {
        return Ok(Reason::DropMalformed.into());
    }
    let Ok(inner) = ptr_at::<[u8; IP_LEN + QUOTE_MIN]>(ctx, INNER_IP_OFF) else {
        return Ok(Reason::DropMalformed.into());
    };
    // SAFETY: as for the outer header.
    let inner = unsafe { &*inner };
    if inner[0] >> 4 != 4 || inner[0] & 0x0f < 5 {
        return Ok(Reason::DropMalformed.into());
    }
    let proto = inner[9];
    // Options move the ports; a later fragment quotes no ports at all.
    if inner[0] & 0x0f != 5
        || u16::from_be_bytes([inner[6], inner[7]]) & 0x1fff != 0
        || (proto != PROTO_TCP && proto != PROTO_UDP)
    {
        return Ok(Reason::PassIcmpUntracked.into());
    }
    let quoted_src = u32::from_ne_bytes([inner[12], inner[13], inner[14], inner[15]]);
    let quoted_dst = u32::from_ne_bytes([inner[16], inner[17], inner[18], inner[19]]);
    // An error goes to the source of the packet it quotes.
    if quoted_src != outer_dst {
        return Ok(Reason::PassIcmpUntracked.into());
    }
    let quoted_sport = u16::from_ne_bytes([inner[20], inner[21]]);
    let quoted_dport = u16::from_ne_bytes([inner[22], inner[23]]);
    let key = conn::key(quoted_dst, quoted_src, quoted_dport, quoted_sport, proto);
    let mut clock = Clock::unread();
    // No SYN: the lookup only reads. An expired entry is `Stale`.
    let state = conn::lookup(&key, false, &mut clock);
    let now = clock.ns(false);
    let e = match state {
        Lookup::Reply(e) => e,
        Lookup::Established(e) if reply_is_own(Table::Conns, &key, e, now) => e,
        Lookup::HalfOpen(e) if reply_is_own(Table::HalfOpen, &key, e, now) => e,
        _ => return Ok(Reason::PassIcmpUntracked.into()),
    };
    // Forwarded like the flow's packets, so one router hop on (see `nat`).
    if ttl <= 1 {
        return Ok(Reason::DropTtlExpired.into());
    }
    let tcp_csum_quoted =
        proto == PROTO_TCP && tot_len as usize >= INNER_L4_OFF - IP_OFF + TCP_CSUM_QUOTED;
    rewrite(ctx, e, proto, tcp_csum_quoted)?;
    // The flow's own protocol for the next hop, so the error takes the
    // route the flow's packets take, and the hop it caches is theirs.
    forward::translated(ctx, e, (proto, tot_len))
}

/// Whether forward entry `fwd` (live, at `key` in `table`) still holds its
/// reply key with a live reply entry of its own: the backend 4-tuple an
/// error would be carried to is this flow's.
#[inline(always)]
fn reply_is_own(table: Table, key: &ConnKey, fwd: &ConnEntry, now: u64) -> bool {
    // SAFETY: a table value, read at once (see `conn`); a recycled element
    // fails `owned_by`.
    match unsafe { table.map().get(conn::reply_key(fwd, key.proto)) } {
        Some(r) => conn::owned_by(r, key) && !conn::expired(table, r, now, key.proto),
        None => false,
    }
}

/// Translates the error per entry `e`: outer `e.new_src → e.new_dst`,
/// quote `e.new_dst:port → e.new_src:port`, with every checksum.
#[inline(always)]
fn rewrite(ctx: &XdpContext, e: &ConnEntry, proto: u8, tcp_csum_quoted: bool) -> Result<(), ()> {
    let outer: *mut [u8; IP_LEN] = ptr_at(ctx, IP_OFF)?;
    // SAFETY: `ptr_at` checked the header lies within the packet, which is
    // this program's alone while it runs; a byte array has no alignment.
    let outer = unsafe { &mut *outer };
    let delta = swap32(outer, 12, e.new_src_addr) + swap32(outer, 16, e.new_dst_addr);
    fix_csum(outer, 10, delta);

    let inner: *mut [u8; IP_LEN + QUOTE_MIN] = ptr_at(ctx, INNER_IP_OFF)?;
    // SAFETY: as above.
    let inner = unsafe { &mut *inner };
    let addrs = swap32(inner, 12, e.new_dst_addr) + swap32(inner, 16, e.new_src_addr);
    let ports = swap16(inner, IP_LEN, e.new_dst_port) + swap16(inner, IP_LEN + 2, e.new_src_port);
    // The ICMP checksum covers every word changed in the quote.
    let mut icmp_delta = addrs + ports + fix_csum(inner, 10, addrs);
    // The quoted transport checksum covers the pseudo-header's addresses
    // and the ports.
    if proto == PROTO_UDP {
        if inner[IP_LEN + 6] | inner[IP_LEN + 7] != 0 {
            icmp_delta += fix_udp_csum(inner, IP_LEN + 6, addrs + ports);
        }
    } else if tcp_csum_quoted {
        let tcp_csum: *mut [u8; 2] = ptr_at(ctx, INNER_L4_OFF + TCP_CSUM_QUOTED - 2)?;
        // SAFETY: as above; past the bytes `inner` covers.
        let tcp_csum = unsafe { &mut *tcp_csum };
        icmp_delta += fix_csum(tcp_csum, 0, addrs + ports);
    }

    let icmp: *mut [u8; ICMP_LEN] = ptr_at(ctx, L4_OFF)?;
    // SAFETY: as above.
    let icmp = unsafe { &mut *icmp };
    fix_csum(icmp, 2, icmp_delta);
    Ok(())
}

/// Writes `new` (wire order) over the 32-bit field at `at`; returns the
/// checksum delta.
#[inline(always)]
fn swap32<const N: usize>(b: &mut [u8; N], at: usize, new: u32) -> u32 {
    let old = u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    b[at..at + 4].copy_from_slice(&new.to_ne_bytes());
    csum::delta32(old, new)
}

/// Same for a 16-bit field.
#[inline(always)]
fn swap16<const N: usize>(b: &mut [u8; N], at: usize, new: u16) -> u32 {
    let old = u16::from_ne_bytes([b[at], b[at + 1]]);
    b[at..at + 2].copy_from_slice(&new.to_ne_bytes());
    csum::delta16(old, new)
}

/// Folds `delta` into the checksum field at `at`; returns the field's own
/// change, as a delta for a checksum that covers it.
#[inline(always)]
fn fix_csum<const N: usize>(b: &mut [u8; N], at: usize, delta: u32) -> u32 {
    let old = u16::from_ne_bytes([b[at], b[at + 1]]);
    swap16(b, at, csum::apply(old, delta))
}

/// `fix_csum` for a UDP checksum known not to be 0 ("none"): a computed 0
/// is sent as all ones, which means the same.
#[inline(always)]
fn fix_udp_csum<const N: usize>(b: &mut [u8; N], at: usize, delta: u32) -> u32 {
    let old = u16::from_ne_bytes([b[at], b[at + 1]]);
    let new = match csum::apply(old, delta) {
        0 => 0xffff,
        c => c,
    };
    swap16(b, at, new)
}
