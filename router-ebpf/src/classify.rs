//! The first step of every packet: is it ours to balance? A packet that is
//! not leaves here with its reason; one that is becomes a `Packet`, with
//! its flow key and the TCP bits that move a flow's state.

use aya_ebpf::programs::XdpContext;
use router_common::{
    ConnKey, FILTER_DSR_ONLY, PROTO_TCP, PROTO_UDP, ServiceKey, addr_filter_bucket, reasons::Reason,
};

use crate::{
    conn,
    maps::ADDR_FILTER,
    parse::{self, Ipv4, L4, Skip, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Why a packet is not balanced as it stands.
pub enum Unbalanced {
    /// Passed or dropped for this reason, without a lookup.
    Reason(Reason),
    /// ICMP to one of our addresses: an error about a tracked flow is
    /// translated, anything else passes (see `icmp`).
    Icmp,
    /// An IPv6 frame, for `router_v6`.
    Ipv6,
}

impl From<Reason> for Unbalanced {
    #[inline(always)]
    fn from(reason: Reason) -> Self {
        Unbalanced::Reason(reason)
    }
}

impl From<Skip> for Unbalanced {
    #[inline(always)]
    fn from(skip: Skip) -> Self {
        Unbalanced::Reason(match skip {
            Skip::NotIpv4 => Reason::PassNotService,
            Skip::Ipv6 => return Unbalanced::Ipv6,
            Skip::Malformed => Reason::DropMalformed,
            Skip::Fragment => Reason::PassFragment,
            Skip::Options => Reason::PassIpOptions,
            Skip::UnknownProto => Reason::PassUnknownProto,
            Skip::Icmp => return Unbalanced::Icmp,
        })
    }
}

/// What a TCP packet's flags say about its flow; all false for UDP.
#[derive(Clone, Copy)]
pub struct Control {
    /// A SYN without ACK: a client opening a connection.
    pub syn: bool,
    /// The flow is closing: the short timeout applies from here on.
    pub fin_or_rst: bool,
    /// The flow is over at once.
    pub rst: bool,
    /// The ACK flag: only a packet with it can confirm a half-open flow.
    pub ack: bool,
}

/// A packet to one of our addresses, with headers that the datapath can
/// translate.
pub struct Packet {
    pub ip: Ipv4,
    pub l4: L4,
    /// The destination's `ADDR_FILTER` bits (`FILTER_*`), never 0: which
    /// kinds of our addresses it may be.
    pub filter: u32,
    pub key: ConnKey,
    pub control: Control,
}

/// An IPv4 packet to an address in a bucket of ours.
pub struct Destination {
    pub ip: Ipv4,
    /// The bucket's `FILTER_*` bits, never 0.
    pub filter: u32,
}

impl Destination {
    /// For the `router_dsr` program as it stands: a TCP or UDP packet to a
    /// bucket of DSR services alone (see `FILTER_DSR_ONLY`). ICMP stays,
    /// for `icmp`.
    #[inline(always)]
    pub fn dsr_only(&self) -> bool {
        self.filter & FILTER_DSR_ONLY != 0
            && (self.ip.proto == PROTO_TCP || self.ip.proto == PROTO_UDP)
    }
}

/// The packet, or the reason it passes or drops without a lookup (or, for
/// ICMP, that `icmp` decides).
#[inline(always)]
pub fn packet(ctx: &XdpContext) -> Result<Packet, Unbalanced> {
    transport(ctx, destination(ctx)?)
}

/// The first step: the IP header and the destination's pre-filter bits,
/// which come before the transport checks so that traffic for nobody costs
/// one array read past the IP header.
#[inline(always)]
pub fn destination(ctx: &XdpContext) -> Result<Destination, Unbalanced> {
    let ip = parse::ipv4(ctx).map_err(|skip| match skip {
        Skip::NotIpv4 => Reason::PassNotService.into(),
        Skip::Ipv6 => Unbalanced::Ipv6,
        // The one other thing `ipv4` finds: ICMP and the rest are the
        // transport step's.
        _ => Reason::DropMalformed.into(),
    })?;
    let filter = match ADDR_FILTER.get(addr_filter_bucket(ip.dst)) {
        Some(bits) => *bits,
        None => 0,
    };
    if filter == 0 {
        return Err(Reason::PassNotService.into());
    }
    Ok(Destination { ip, filter })
}

/// The second step, for a destination of ours: the transport header, the
/// flow key and the TCP bits.
#[inline(always)]
pub fn transport(ctx: &XdpContext, d: Destination) -> Result<Packet, Unbalanced> {
    let Destination { ip, filter } = d;
    let l4 = parse::l4(ctx)?;
    let key = conn::key(ip.src, ip.dst, l4.src_port, l4.dst_port, l4.proto);
    let tcp = l4.proto == PROTO_TCP;
    let control = Control {
        syn: tcp && l4.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        fin_or_rst: tcp && l4.tcp_flags & (TCP_FIN | TCP_RST) != 0,
        rst: tcp && l4.tcp_flags & TCP_RST != 0,
        ack: tcp && l4.tcp_flags & TCP_ACK != 0,
    };
    Ok(Packet {
        ip,
        l4,
        filter,
        key,
        control,
    })
}

impl Packet {
    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.l4.proto == PROTO_TCP
    }

    /// The `SERVICES` key of the service this packet would be for.
    #[inline(always)]
    pub fn service_key(&self) -> ServiceKey {
        ServiceKey {
            addr: self.ip.dst,
            port: self.l4.dst_port,
            proto: self.l4.proto,
            _pad: 0,
        }
    }
}
