//! Which frames the datapath looks at, and in what order it refuses the
//! rest. The order matters: a frame can be both for nobody and malformed,
//! and the reason counted differs with the check that fires first.
//!
//! 1. No IPv4 ethertype: not a service packet (ARP, VLAN tags, …). An IPv6
//!    frame is `router_v6`'s (see `ipv6`): the world has no IPv6 service,
//!    so it passes unless its headers are malformed (an ICMPv6 error is
//!    looked at by `router_nat6` first, see `icmp6`).
//! 2. Every IPv4 frame must hold a whole header, say version 4, have
//!    IHL ≥ 5 and a total length between the header and the frame's end
//!    (Ethernet padding may follow): otherwise malformed.
//! 3. Only then the pre-filter on the destination (see `Config::filter`).
//! 4. For a destination that passed it: IP options and fragments go to
//!    the stack; TCP needs a 20-byte header in the frame and a data offset
//!    within the total length, UDP an 8-byte header and a length within the
//!    total length; ICMP is looked at as a possible error about a flow
//!    (see `icmp`); any other protocol goes to the stack.

/// Why a frame is not balanced, before any table is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    NotIpv4,
    Malformed,
    Options,
    Fragment,
    /// ICMP: an error about a tracked flow may be translated (see `icmp`).
    Icmp,
    UnknownProto,
}

/// The IPv4 header fields the decision reads, as on the wire: addresses as
/// the four bytes loaded natively (`u32::from_ne_bytes`), like every key.
#[derive(Clone, Copy, Debug)]
pub struct Ip {
    pub src: u32,
    pub dst: u32,
    pub tot_len: usize,
    pub ttl: u8,
}

/// A balanceable packet: IPv4 without options, not a fragment, TCP or UDP.
#[derive(Clone, Copy, Debug)]
pub struct Transport {
    pub proto: u8,
    /// Ports as the two wire bytes loaded natively.
    pub src_port: u16,
    pub dst_port: u16,
    /// The TCP flags byte; 0 for UDP.
    pub tcp_flags: u8,
    /// TCP payload bytes within the total length; 0 for UDP.
    pub payload_len: usize,
    /// TCP sequence and acknowledgement numbers (host order); 0 for UDP.
    pub seq: u32,
    pub ack: u32,
}

const ETH: usize = 14;
const IP: usize = 20;

fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

fn ne16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn ne32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Step 1 and 2: the checks every frame gets.
pub fn ipv4(frame: &[u8]) -> Result<Ip, Refusal> {
    if frame.len() < ETH {
        return Err(Refusal::Malformed);
    }
    if be16(frame, 12) != 0x0800 {
        return Err(Refusal::NotIpv4);
    }
    if frame.len() < ETH + IP {
        return Err(Refusal::Malformed);
    }
    let (version, ihl) = (frame[ETH] >> 4, usize::from(frame[ETH] & 0x0f));
    if version != 4 || ihl < 5 {
        return Err(Refusal::Malformed);
    }
    let tot_len = be16(frame, ETH + 2);
    if tot_len < ihl * 4 || ETH + tot_len > frame.len() {
        return Err(Refusal::Malformed);
    }
    Ok(Ip {
        src: ne32(frame, ETH + 12),
        dst: ne32(frame, ETH + 16),
        tot_len,
        ttl: frame[ETH + 8],
    })
}

/// Step 4, for a frame that passed `ipv4` and the pre-filter.
pub fn transport(frame: &[u8], ip: &Ip) -> Result<Transport, Refusal> {
    if frame[ETH] & 0x0f != 5 {
        return Err(Refusal::Options);
    }
    if be16(frame, ETH + 6) & 0x3fff != 0 {
        return Err(Refusal::Fragment);
    }
    let l4 = ETH + IP;
    match frame[ETH + 9] {
        6 => {
            if frame.len() < l4 + 20 {
                return Err(Refusal::Malformed);
            }
            let doff = usize::from(frame[l4 + 12] >> 4) * 4;
            if doff < 20 || IP + doff > ip.tot_len {
                return Err(Refusal::Malformed);
            }
            Ok(Transport {
                proto: 6,
                src_port: ne16(frame, l4),
                dst_port: ne16(frame, l4 + 2),
                tcp_flags: frame[l4 + 13],
                payload_len: ip.tot_len - IP - doff,
                seq: be32(frame, l4 + 4),
                ack: be32(frame, l4 + 8),
            })
        }
        17 => {
            if frame.len() < l4 + 8 {
                return Err(Refusal::Malformed);
            }
            let len = be16(frame, l4 + 4);
            if len < 8 || IP + len > ip.tot_len {
                return Err(Refusal::Malformed);
            }
            Ok(Transport {
                proto: 17,
                src_port: ne16(frame, l4),
                dst_port: ne16(frame, l4 + 2),
                tcp_flags: 0,
                payload_len: 0,
                seq: 0,
                ack: 0,
            })
        }
        1 => Err(Refusal::Icmp),
        _ => Err(Refusal::UnknownProto),
    }
}

/// What `router_v6` does with an IPv6 frame (EtherType 0x86dd) in a world
/// without IPv6 services: (verdict, reason). The checks in the kernel's
/// order: a whole fixed header of version 6 whose payload fits the frame,
/// up to four extension headers walked, then the transport header.
pub fn ipv6(frame: &[u8]) -> (u32, u32) {
    use router_common::reasons;
    const PASS: u32 = 2;
    const DROP: u32 = 1;
    let malformed = (DROP, reasons::DROP_MALFORMED);
    if frame.len() < ETH + 40 || frame[ETH] >> 4 != 6 {
        return malformed;
    }
    let end = ETH + 40 + be16(frame, ETH + 4);
    if end > frame.len() {
        return malformed;
    }
    let (mut nh, mut off) = (frame[ETH + 6], ETH + 40);
    let transport = |nh: u8, off: usize| match nh {
        6 => {
            if off + 20 > frame.len() {
                return malformed;
            }
            let doff = usize::from(frame[off + 12] >> 4) * 4;
            if doff < 20 || off + doff > end {
                return malformed;
            }
            (PASS, reasons::PASS_NOT_SERVICE)
        }
        _ => {
            if off + 8 > frame.len() {
                return malformed;
            }
            let len = be16(frame, off + 4);
            if len < 8 || off + len > end {
                return malformed;
            }
            (PASS, reasons::PASS_NOT_SERVICE)
        }
    };
    for _ in 0..router_common::v6::MAX_EXT_HEADERS {
        match nh {
            6 | 17 => return transport(nh, off),
            58 if off == ETH + 40 => return icmp6(frame, end),
            58 => return (PASS, reasons::PASS_NOT_SERVICE),
            44 => return (PASS, reasons::PASS_FRAGMENT),
            0 | 43 | 60 => {
                if off + 2 > frame.len() {
                    return malformed;
                }
                let next = frame[off];
                off = (off + (usize::from(frame[off + 1]) + 1) * 8) & 0x3fff;
                if off > end {
                    return malformed;
                }
                nh = next;
            }
            _ => return (PASS, reasons::PASS_UNKNOWN_PROTO),
        }
    }
    match nh {
        6 | 17 => transport(nh, off),
        58 => (PASS, reasons::PASS_NOT_SERVICE),
        44 => (PASS, reasons::PASS_FRAGMENT),
        _ => (PASS, reasons::PASS_IP_OPTIONS),
    }
}

/// An ICMPv6 message right after the fixed header: an error goes to
/// `router_nat6` (`icmp6`), which finds no flow in a world without IPv6
/// services once its checks, in the kernel's order, pass.
fn icmp6(frame: &[u8], end: usize) -> (u32, u32) {
    use router_common::reasons;
    const PASS: u32 = 2;
    const DROP: u32 = 1;
    let off = ETH + 40;
    match frame.get(off) {
        Some(t) if *t < 128 => {}
        _ => return (PASS, reasons::PASS_NOT_SERVICE),
    }
    if off + 8 > frame.len() {
        return (DROP, reasons::DROP_MALFORMED);
    }
    if !(1..=3).contains(&frame[off]) {
        return (PASS, reasons::PASS_ICMP_OTHER);
    }
    if end - ETH < 40 + 8 + 40 + 8 || off + 8 + 48 > frame.len() {
        return (DROP, reasons::DROP_MALFORMED);
    }
    (PASS, reasons::PASS_ICMP_UNTRACKED)
}
