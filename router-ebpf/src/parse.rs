//! Packet parsing. All packet access goes through `ptr_at`, the one
//! bounds-checked accessor.

use aya_ebpf::programs::XdpContext;
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use router_common::{PROTO_TCP, PROTO_UDP};

pub const ETH_LEN: usize = EthHdr::LEN;
/// An IPv4 header without options: the only kind the datapath rewrites.
pub const IP_LEN: usize = Ipv4Hdr::LEN;
pub const TCP_LEN: usize = TcpHdr::LEN;
pub const UDP_LEN: usize = UdpHdr::LEN;
pub const IP_OFF: usize = ETH_LEN;
pub const L4_OFF: usize = ETH_LEN + IP_LEN;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// IP protocol number of ICMP: errors about tracked flows are translated
/// (see `icmp`).
pub const PROTO_ICMP: u8 = 1;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

/// Why a packet is not a candidate for balancing.
pub enum Skip {
    /// Neither IPv4 nor IPv6 (ARP, …): passed untouched.
    NotIpv4,
    /// IPv6: `router_v6`'s (see `parse6`).
    Ipv6,
    Malformed,
    Fragment,
    Options,
    /// ICMP, not a fragment and without IP options: maybe an error about
    /// one of our flows (see `icmp`).
    Icmp,
    UnknownProto,
}

/// An IPv4 packet's addresses as read off the wire (network order, loaded natively).
pub struct Ipv4 {
    pub src: u32,
    pub dst: u32,
    pub tot_len: u16,
    pub ttl: u8,
    /// The IP protocol number.
    pub proto: u8,
}

/// The transport part of a balancable packet. Offsets are fixed (no IP
/// options) so the rewrite path needs no variable offsets.
pub struct L4 {
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags byte; 0 for UDP.
    pub tcp_flags: u8,
    /// Bytes after the TCP header (0 for UDP): the latency stamps look for
    /// the first packet that carries data, not a bare ACK.
    pub payload_len: u16,
    /// TCP sequence and acknowledgement numbers, host order; 0 for UDP.
    pub seq: u32,
    pub ack_seq: u32,
}

impl L4 {
    /// The backend's answer to a SYN.
    #[inline(always)]
    pub fn is_synack(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
    }
}

/// Ethernet + IPv4 header, with the checks that apply to every IPv4 packet.
#[inline(always)]
pub fn ipv4(ctx: &XdpContext) -> Result<Ipv4, Skip> {
    let ethertype: *const u16 = ptr_at(ctx, 12).map_err(|()| Skip::Malformed)?;
    // SAFETY: `ptr_at` checked the field lies within the packet. Frames
    // start at an even offset (XDP headroom, plus a NET_IP_ALIGN of 0 or
    // 2), so the u16 is aligned, and a BPF load would be exact even if not.
    match u16::from_be(unsafe { *ethertype }) {
        ETH_P_IP => {}
        ETH_P_IPV6 => return Err(Skip::Ipv6),
        _ => return Err(Skip::NotIpv4),
    }
    let ip: *const [u8; IP_LEN] = ptr_at(ctx, IP_OFF).map_err(|()| Skip::Malformed)?;
    // SAFETY: `ptr_at` checked the header lies within the packet; a byte
    // array has no alignment.
    let ip = unsafe { &*ip };
    let ihl = (ip[0] & 0x0f) as usize;
    if ip[0] >> 4 != 4 || ihl < 5 {
        return Err(Skip::Malformed);
    }
    // Ethernet padding may make the frame longer than the datagram, never shorter.
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if tot_len < ihl * 4 || ctx.data() + IP_OFF + tot_len > ctx.data_end() {
        return Err(Skip::Malformed);
    }
    Ok(Ipv4 {
        src: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        dst: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        tot_len: tot_len as u16,
        ttl: ip[8],
        proto: ip[9],
    })
}

/// The checks that only matter once the destination is one of ours.
#[inline(always)]
pub fn l4(ctx: &XdpContext) -> Result<L4, Skip> {
    let ip: *const [u8; IP_LEN] = ptr_at(ctx, IP_OFF).map_err(|()| Skip::Malformed)?;
    // SAFETY: as in `ipv4`.
    let ip = unsafe { &*ip };
    if ip[0] & 0x0f != 5 {
        return Err(Skip::Options);
    }
    // MF flag or a non-zero fragment offset.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Err(Skip::Fragment);
    }
    let proto = ip[9];
    // Before anything TCP and UDP read, so their registers do not have to
    // survive the branch.
    if proto == PROTO_ICMP {
        return Err(Skip::Icmp);
    }
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    match proto {
        PROTO_TCP => {
            let tcp: *const [u8; TCP_LEN] = ptr_at(ctx, L4_OFF).map_err(|()| Skip::Malformed)?;
            // SAFETY: as for the IP header.
            let tcp = unsafe { &*tcp };
            let doff = (tcp[12] >> 4) as usize * 4;
            if doff < TCP_LEN || IP_LEN + doff > tot_len {
                return Err(Skip::Malformed);
            }
            Ok(L4 {
                proto,
                src_port: u16::from_ne_bytes([tcp[0], tcp[1]]),
                dst_port: u16::from_ne_bytes([tcp[2], tcp[3]]),
                tcp_flags: tcp[13],
                payload_len: (tot_len - IP_LEN - doff) as u16,
                seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
                ack_seq: u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
            })
        }
        PROTO_UDP => {
            let udp: *const [u8; UDP_LEN] = ptr_at(ctx, L4_OFF).map_err(|()| Skip::Malformed)?;
            // SAFETY: as for the IP header.
            let udp = unsafe { &*udp };
            let len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
            if len < UDP_LEN || IP_LEN + len > tot_len {
                return Err(Skip::Malformed);
            }
            Ok(L4 {
                proto,
                src_port: u16::from_ne_bytes([udp[0], udp[1]]),
                dst_port: u16::from_ne_bytes([udp[2], udp[3]]),
                tcp_flags: 0,
                payload_len: 0,
                seq: 0,
                ack_seq: 0,
            })
        }
        _ => Err(Skip::UnknownProto),
    }
}
