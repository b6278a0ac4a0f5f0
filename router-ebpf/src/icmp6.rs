//! ICMPv6 errors about IPv6 NAT flows, translated in both directions as
//! `icmp` does for IPv4: above all "packet too big", without which an IPv6
//! path-MTU drop past the balancer stalls a flow for good (IPv6 routers
//! never fragment).
//!
//! An error quotes the packet that caused it, which the balancer sent: it
//! arrives at that packet's source, a SNAT address or a VIP. The quoted
//! tuple reversed is the key of the flow direction whose packets come from
//! the error's far end, and that entry `e` says it all: the error goes out
//! as `e.new_src → e.new_dst`, its quote becomes `e.new_dst:port →
//! e.new_src:port`. IPv6 has no header checksum: the quoted transport
//! checksum (where quoted) and the ICMPv6 checksum, over the outer
//! pseudo-header and the quote, are updated incrementally.
//!
//! An error changes no state, is forwarded one hop on like the flow's
//! packets, and is translated only on a live entry that owns it (a reply
//! entry, or a forward entry whose reply key is still its own). Anything
//! else passes: errors no entry owns, an outer or quoted packet with
//! extension headers, a quote that is not TCP or UDP. A quote cut short of
//! the IPv6 header and 8 bytes drops, as the host's stack would drop it.

use aya_ebpf::programs::XdpContext;
use router_common::{
    PROTO_TCP, PROTO_UDP, csum,
    reasons::Reason,
    v6::{ConnKey6, NatEntry6, PROTO_ICMPV6},
};

use crate::{
    clock::Clock,
    conn, fib,
    fib::Outer,
    flow6,
    maps::{FIB_GEN, NAT6_CONNS},
    nat,
    parse::ptr_at,
    parse6::{self, IP6_LEN, IP6_OFF},
    rewrite6,
    verdict::Verdict,
};

const ICMP6_LEN: usize = 8;
const L4_OFF: usize = IP6_OFF + IP6_LEN;
/// Where the quoted IPv6 header and its transport header start.
const INNER_IP_OFF: usize = L4_OFF + ICMP6_LEN;
const INNER_L4_OFF: usize = INNER_IP_OFF + IP6_LEN;
/// Transport bytes every error quotes: the ports, and UDP's checksum.
const QUOTE_MIN: usize = 8;
/// Quoted transport bytes that hold TCP's checksum.
const TCP_CSUM_QUOTED: usize = 18;
/// The errors translated: destination unreachable, packet too big, time
/// exceeded.
const DEST_UNREACH: u8 = 1;
const TIME_EXCEEDED: u8 = 3;

/// The verdict for an ICMPv6 error (`parse6` checked the outer header and
/// that the message follows it directly). A BPF function of its own: its
/// keys and addresses take its frame, not the packet path's.
#[inline(never)]
pub fn error(ctx: &XdpContext) -> Result<Verdict, ()> {
    let outer: *const [u8; IP6_LEN] = ptr_at(ctx, IP6_OFF)?;
    // SAFETY: `ptr_at` checked the header lies within the packet.
    let outer = unsafe { &*outer };
    let len = IP6_LEN + u16::from_be_bytes([outer[4], outer[5]]) as usize;
    let hop_limit = outer[7];
    if outer[6] != PROTO_ICMPV6 {
        return Ok(Reason::PassIcmpUntracked.into());
    }
    let Ok(icmp) = ptr_at::<[u8; ICMP6_LEN]>(ctx, L4_OFF) else {
        return Ok(Reason::DropMalformed.into());
    };
    // SAFETY: as for the outer header.
    let kind = unsafe { (*icmp)[0] };
    if !(DEST_UNREACH..=TIME_EXCEEDED).contains(&kind) {
        return Ok(Reason::PassIcmpOther.into());
    }
    // `parse6` checked that the datagram fits the frame.
    if len < IP6_LEN + ICMP6_LEN + IP6_LEN + QUOTE_MIN {
        return Ok(Reason::DropMalformed.into());
    }
    let Ok(inner) = ptr_at::<[u8; IP6_LEN + QUOTE_MIN]>(ctx, INNER_IP_OFF) else {
        return Ok(Reason::DropMalformed.into());
    };
    // SAFETY: as for the outer header.
    let inner = unsafe { &*inner };
    let proto = inner[6];
    if inner[0] >> 4 != 6 || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return Ok(Reason::PassIcmpUntracked.into());
    }
    let sport = u16::from_ne_bytes([inner[IP6_LEN], inner[IP6_LEN + 1]]);
    let dport = u16::from_ne_bytes([inner[IP6_LEN + 2], inner[IP6_LEN + 3]]);
    let outer_dst = parse6::addr(ctx, IP6_OFF + 24).map_err(|_| ())?;
    let quoted_src = parse6::addr(ctx, INNER_IP_OFF + 8).map_err(|_| ())?;
    // An error goes to the source of the packet it quotes.
    if quoted_src != outer_dst {
        return Ok(Reason::PassIcmpUntracked.into());
    }
    let key = ConnKey6 {
        src_addr: parse6::addr(ctx, INNER_IP_OFF + 24).map_err(|_| ())?,
        dst_addr: quoted_src,
        src_port: dport,
        dst_port: sport,
        proto,
        _pad: [0; 3],
    };
    let k: &ConnKey6 = &key;
    let Some(e) = NAT6_CONNS.get_ptr_mut(k) else {
        return Ok(Reason::PassIcmpUntracked.into());
    };
    // SAFETY: a preallocated LRU element (see `conn`); read for this one
    // packet, as a packet racing a change would be.
    let e = unsafe { &mut *e };
    let now = Clock::unread().ns(false);
    if conn::idle_past(e.last_seen_ns, now, e.is_closing(), proto) || !owns(e, &key, now) {
        return Ok(Reason::PassIcmpUntracked.into());
    }
    // Forwarded like the flow's packets, so one router hop on.
    if hop_limit <= 1 {
        return Ok(Reason::DropTtlExpired.into());
    }
    let tcp_csum_quoted = proto == PROTO_TCP && len >= INNER_L4_OFF - IP6_OFF + TCP_CSUM_QUOTED;
    rewrite(ctx, e, &key, (proto, tcp_csum_quoted))?;
    send(ctx, e, proto, len as u16)
}

/// Whether live entry `e` at `key` owns an error about its flow: a reply
/// entry, or a forward entry whose reply key still holds its own live
/// reply entry (else the backend 4-tuple is another flow's now).
#[inline(always)]
fn owns(e: &NatEntry6, key: &ConnKey6, now: u64) -> bool {
    if e.is_reply() {
        return true;
    }
    let rkey = flow6::reply_key(
        &e.new_dst,
        e.new_dst_port,
        &e.new_src,
        e.new_src_port,
        key.proto,
    );
    // SAFETY: a table value, read at once.
    match unsafe { NAT6_CONNS.get(rkey) } {
        Some(r) => {
            flow6::owned_by(r, key)
                && !conn::idle_past(r.last_seen_ns, now, r.is_closing(), key.proto)
        }
        None => false,
    }
}

/// Translates the error per entry `e` (found at `key`, the quote
/// reversed): outer `e.new_src → e.new_dst`, quote `e.new_dst:port →
/// e.new_src:port`, with the quoted transport checksum where `quoted` says
/// it lies and the ICMPv6 checksum.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    e: &NatEntry6,
    key: &ConnKey6,
    (proto, tcp_csum_quoted): (u8, bool),
) -> Result<(), ()> {
    let outer_src = parse6::addr(ctx, IP6_OFF + 8).map_err(|_| ())?;
    let outer_dst = key.dst_addr;
    // The pseudo-header's addresses.
    let outer = rewrite6::delta(&outer_src, &outer_dst, &e.new_src, &e.new_dst, 0);
    // The quote's addresses and ports: what its transport checksum
    // changes by, and what the ICMPv6 body changes by.
    let quote = rewrite6::delta(
        &key.dst_addr,
        &key.src_addr,
        &e.new_dst,
        &e.new_src,
        rewrite6::ports(
            (key.dst_port, key.src_port),
            (e.new_dst_port, e.new_src_port),
        ),
    );
    rewrite6::put_addr(ctx, IP6_OFF + 8, &e.new_src)?;
    rewrite6::put_addr(ctx, IP6_OFF + 24, &e.new_dst)?;
    rewrite6::put_addr(ctx, INNER_IP_OFF + 8, &e.new_dst)?;
    rewrite6::put_addr(ctx, INNER_IP_OFF + 24, &e.new_src)?;
    let ports: *mut [u8; QUOTE_MIN] = ptr_at(ctx, INNER_L4_OFF)?;
    // SAFETY: `ptr_at` checked the bytes lie within the packet, which is
    // this program's alone while it runs.
    let ports = unsafe { &mut *ports };
    ports[0..2].copy_from_slice(&e.new_dst_port.to_ne_bytes());
    ports[2..4].copy_from_slice(&e.new_src_port.to_ne_bytes());
    let mut icmp_delta = u32::from(outer) + u32::from(quote);
    if proto == PROTO_UDP {
        let old = u16::from_ne_bytes([ports[6], ports[7]]);
        if old != 0 {
            let new = match csum::apply(old, u32::from(quote)) {
                0 => 0xffff,
                c => c,
            };
            ports[6..8].copy_from_slice(&new.to_ne_bytes());
            icmp_delta += csum::delta16(old, new);
        }
    } else if tcp_csum_quoted {
        let c: *mut [u8; 2] = ptr_at(ctx, INNER_L4_OFF + TCP_CSUM_QUOTED - 2)?;
        // SAFETY: as above; past the bytes `ports` covers.
        let c = unsafe { &mut *c };
        let old = u16::from_ne_bytes(*c);
        let new = csum::apply(old, u32::from(quote));
        *c = new.to_ne_bytes();
        icmp_delta += csum::delta16(old, new);
    }
    let icmp: *mut [u8; ICMP6_LEN] = ptr_at(ctx, L4_OFF)?;
    // SAFETY: as above.
    let icmp = unsafe { &mut *icmp };
    let old = u16::from_ne_bytes([icmp[2], icmp[3]]);
    icmp[2..4].copy_from_slice(&csum::apply(old, icmp_delta).to_ne_bytes());
    Ok(())
}

/// Sends the translated error to `e`'s next hop, one hop on (the stack
/// takes its own when the FIB has no hop).
#[inline(always)]
fn send(ctx: &XdpContext, e: &mut NatEntry6, proto: u8, len: u16) -> Result<Verdict, ()> {
    let fib_gen = match FIB_GEN.get(0) {
        Some(g) => *g,
        None => 0,
    };
    let hop = if fib_gen == 0 || e.fib_gen != fib_gen {
        fib::resolve6(ctx, e, proto, len, fib_gen)
    } else {
        Outer::Resolved
    };
    if !matches!(hop, Outer::Resolved) {
        return Ok(Reason::PassFibFailed.into());
    }
    let hop_limit: *mut u8 = ptr_at(ctx, IP6_OFF + 7)?;
    // SAFETY: `ptr_at` checked the byte lies within the packet; the
    // caller checked it is above 1.
    unsafe { *hop_limit -= 1 };
    nat::rewrite_macs(ctx, &e.dmac, &e.smac)?;
    // SAFETY: `ctx.ctx` is the xdp_md the kernel passed in.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    if e.ifindex == ingress {
        return Ok(Reason::Tx.into());
    }
    Ok(Verdict::redirect(e.ifindex))
}
