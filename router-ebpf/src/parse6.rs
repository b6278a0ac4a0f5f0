//! IPv6 parsing for `router_v6`: the fixed header, the walk over the
//! extension headers that may sit before the transport header, and the
//! ports. Nothing here writes to the packet.

use aya_ebpf::programs::XdpContext;
use router_common::{
    PROTO_TCP, PROTO_UDP,
    reasons::Reason,
    v6::{Addr6, ConnKey6, MAX_EXT_HEADERS, PROTO_ICMPV6},
};

use crate::parse::{ETH_LEN, TCP_ACK, TCP_FIN, TCP_LEN, TCP_RST, TCP_SYN, UDP_LEN, ptr_at};

pub const IP6_LEN: usize = 40;
pub const IP6_OFF: usize = ETH_LEN;
const ETH_P_IPV6: u16 = 0x86dd;
/// Extension headers the walk steps over (RFC 8200 §4.1): they carry
/// nothing the balancer acts on, and the backend gets them as they came.
const NH_HOP_BY_HOP: u8 = 0;
const NH_ROUTING: u8 = 43;
const NH_FRAGMENT: u8 = 44;
const NH_DEST_OPTS: u8 = 60;

/// An IPv6 packet to a port of ours, as far as DSR and NAT need it.
pub struct Packet6 {
    pub key: ConnKey6,
    /// The IPv6 datagram's length (fixed header, extension headers and
    /// payload), host order: what the tunnel carries.
    pub len: u16,
    /// Where the transport header starts in the frame (NAT rewrites its
    /// ports and checksum there).
    pub l4_off: u16,
    /// A SYN without ACK: a client opening a connection.
    pub syn: bool,
    /// A FIN or RST: the flow is closing.
    pub fin_or_rst: bool,
}

impl Packet6 {
    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.key.proto == PROTO_TCP
    }
}

/// Whether the frame is IPv6: `router` hands those to `router_v6`.
#[inline(always)]
pub fn is_ipv6(ctx: &XdpContext) -> bool {
    match ptr_at::<u16>(ctx, 12) {
        // SAFETY: `ptr_at` checked the field lies within the packet; the
        // frame starts at an even offset (see `parse::ipv4`).
        Ok(t) => u16::from_be(unsafe { *t }) == ETH_P_IPV6,
        Err(()) => false,
    }
}

/// The packet, or why it is not balanced: not IPv6 or not well formed,
/// ICMPv6 (Neighbor Discovery above all, which the host must answer), a
/// fragment, or a transport the balancer does not know.
#[inline(always)]
pub fn packet(ctx: &XdpContext) -> Result<Packet6, Reason> {
    if !is_ipv6(ctx) {
        return Err(Reason::PassNotService);
    }
    let ip: *const [u8; IP6_LEN] = ptr_at(ctx, IP6_OFF).map_err(|()| Reason::DropMalformed)?;
    // SAFETY: `ptr_at` checked the header lies within the packet; a byte
    // array has no alignment.
    let ip = unsafe { &*ip };
    if ip[0] >> 4 != 6 {
        return Err(Reason::DropMalformed);
    }
    // Ethernet padding may make the frame longer, never shorter. A
    // jumbogram (payload length 0 and a hop-by-hop option, RFC 2675) is
    // no link's here: its transport header lies past `len` and it drops
    // as malformed below, as the stack would drop it.
    let payload = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    let len = IP6_LEN + payload;
    if ctx.data() + IP6_OFF + len > ctx.data_end() {
        return Err(Reason::DropMalformed);
    }
    let (proto, l4_off) = transport(ctx, ip[6], len)?;
    let (src_port, dst_port, flags) = ports(ctx, proto, l4_off, len)?;
    // Read last, so that nothing holds 32 bytes across the walk.
    let src = addr(ctx, IP6_OFF + 8)?;
    let dst = addr(ctx, IP6_OFF + 24)?;
    let tcp = proto == PROTO_TCP;
    Ok(Packet6 {
        key: ConnKey6 {
            src_addr: src,
            dst_addr: dst,
            src_port,
            dst_port,
            proto,
            _pad: [0; 3],
        },
        len: len as u16,
        l4_off: l4_off as u16,
        syn: tcp && flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        fin_or_rst: tcp && flags & (TCP_FIN | TCP_RST) != 0,
    })
}

/// The address at frame offset `at`, in eight 16-bit loads (the header
/// is 2-aligned: see `is_ipv6`) where bytes would take sixteen.
#[inline(always)]
pub fn addr(ctx: &XdpContext, at: usize) -> Result<Addr6, Reason> {
    let a: *const [u16; 8] = ptr_at(ctx, at).map_err(|()| Reason::DropMalformed)?;
    // SAFETY: `ptr_at` checked the address lies within the packet, and it
    // is 2-aligned.
    let a = unsafe { &*a };
    // Two halves loaded natively make the word loaded natively.
    let w = |i: usize| u32::from(a[i]) | (u32::from(a[i + 1]) << 16);
    Ok(Addr6 {
        words: [w(0), w(2), w(4), w(6)],
    })
}

/// Walks the extension headers from next-header `nh` to the transport
/// header: its protocol and its offset in the frame. A datagram of `len`
/// bytes holds them all.
#[inline(always)]
fn transport(ctx: &XdpContext, mut nh: u8, len: usize) -> Result<(u8, usize), Reason> {
    let mut off = IP6_OFF + IP6_LEN;
    for _ in 0..MAX_EXT_HEADERS {
        match nh {
            PROTO_TCP | PROTO_UDP => return Ok((nh, off)),
            // Neighbor Discovery and echo are the host's; an error may be
            // about an IPv6 NAT flow (see `icmp6`).
            PROTO_ICMPV6 => return Err(icmp_kind(ctx, off)),
            // The host reassembles; its stack then finds no socket.
            NH_FRAGMENT => return Err(Reason::PassFragment),
            NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS => {
                let h: *const [u8; 2] = ptr_at(ctx, off).map_err(|()| Reason::DropMalformed)?;
                // SAFETY: `ptr_at` checked both bytes lie within the packet.
                let h = unsafe { &*h };
                // Masked so the verifier sees the offset bounded: each
                // header is at most 2 KiB, and there are at most four.
                off = (off + (h[1] as usize + 1) * 8) & 0x3fff;
                if off > IP6_OFF + len {
                    return Err(Reason::DropMalformed);
                }
                nh = h[0];
            }
            // AH, ESP, "no next header", anything else.
            _ => return Err(Reason::PassUnknownProto),
        }
    }
    match nh {
        PROTO_TCP | PROTO_UDP => Ok((nh, off)),
        PROTO_ICMPV6 => Err(Reason::PassNotService),
        NH_FRAGMENT => Err(Reason::PassFragment),
        // More extension headers than the walk takes: the host's to judge.
        _ => Err(Reason::PassIpOptions),
    }
}

/// What an ICMPv6 message at `off` is to the balancer: an error (types
/// below 128, RFC 4443 §2.1) directly after the fixed header may be about
/// an IPv6 NAT flow (`PassIcmpUntracked` until `icmp6` finds its flow);
/// anything else, Neighbor Discovery and echo above all, is the host's.
#[inline(always)]
fn icmp_kind(ctx: &XdpContext, off: usize) -> Reason {
    if off != IP6_OFF + IP6_LEN {
        return Reason::PassNotService;
    }
    match ptr_at::<u8>(ctx, off) {
        // SAFETY: `ptr_at` checked the byte lies within the packet.
        Ok(t) if unsafe { *t } < 128 => Reason::PassIcmpUntracked,
        _ => Reason::PassNotService,
    }
}

/// The ports (network order, loaded natively) and TCP flags of the
/// transport header at `off`, which must fit in the datagram.
#[inline(always)]
fn ports(ctx: &XdpContext, proto: u8, off: usize, len: usize) -> Result<(u16, u16, u8), Reason> {
    let end = IP6_OFF + len;
    if proto == PROTO_TCP {
        let tcp: *const [u8; TCP_LEN] = ptr_at(ctx, off).map_err(|()| Reason::DropMalformed)?;
        // SAFETY: `ptr_at` checked the header lies within the packet.
        let tcp = unsafe { &*tcp };
        let doff = (tcp[12] >> 4) as usize * 4;
        if doff < TCP_LEN || off + doff > end {
            return Err(Reason::DropMalformed);
        }
        return Ok((
            u16::from_ne_bytes([tcp[0], tcp[1]]),
            u16::from_ne_bytes([tcp[2], tcp[3]]),
            tcp[13],
        ));
    }
    let udp: *const [u8; UDP_LEN] = ptr_at(ctx, off).map_err(|()| Reason::DropMalformed)?;
    // SAFETY: as above.
    let udp = unsafe { &*udp };
    let ulen = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    if ulen < UDP_LEN || off + ulen > end {
        return Err(Reason::DropMalformed);
    }
    Ok((
        u16::from_ne_bytes([udp[0], udp[1]]),
        u16::from_ne_bytes([udp[2], udp[3]]),
        0,
    ))
}
