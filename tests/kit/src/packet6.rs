//! IPv6 frames for the fixtures, built from the RFCs independently of the
//! datapath: TCP and UDP with optional extension headers, ICMPv6 (Neighbor
//! Discovery), the tunnels a DSR router wraps them in, and the "packet too
//! big" error it answers with.

use std::net::{Ipv6Addr, SocketAddrV6};

use router_common::{
    csum::checksum,
    v6::{Addr6, ConnKey6},
};

use crate::packet::Mac;

/// An IPv6 packet to build.
#[derive(Clone, Debug)]
pub struct Packet6 {
    pub src: SocketAddrV6,
    pub dst: SocketAddrV6,
    /// 6 (TCP), 17 (UDP) or 58 (ICMPv6, `payload` then holds the whole message).
    pub proto: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    pub eth_dst: Mac,
    pub eth_src: Mac,
    pub hop_limit: u8,
    pub traffic_class: u8,
    /// Extension headers before the transport header, each (next-header
    /// number of the header itself, its body after the two fixed bytes,
    /// padded by `build` to a multiple of 8).
    pub ext: Vec<(u8, Vec<u8>)>,
}

impl Packet6 {
    pub fn tcp(src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Self {
        Packet6 {
            src,
            dst,
            proto: 6,
            tcp_flags: flags,
            payload: Vec::new(),
            eth_dst: [0x02, 0, 0, 0, 0, 0x01],
            eth_src: [0x02, 0, 0, 0, 0x0c, 0x02],
            hop_limit: 64,
            traffic_class: 0,
            ext: Vec::new(),
        }
    }

    pub fn udp(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Self {
        Packet6 {
            proto: 17,
            tcp_flags: 0,
            payload: payload.to_vec(),
            ..Self::tcp(src, dst, 0)
        }
    }

    /// An ICMPv6 message (`body` after type, code and checksum).
    pub fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, kind: u8, body: &[u8]) -> Self {
        let mut m = vec![kind, 0, 0, 0];
        m.extend_from_slice(body);
        Packet6 {
            proto: 58,
            payload: m,
            hop_limit: 255,
            ..Self::tcp(
                SocketAddrV6::new(src, 0, 0, 0),
                SocketAddrV6::new(dst, 0, 0, 0),
                0,
            )
        }
    }

    /// A Neighbor Solicitation for `target` (RFC 4861 §4.3), to its
    /// solicited-node multicast address.
    pub fn neighbor_solicitation(src: Ipv6Addr, target: Ipv6Addr, mac: Mac) -> Self {
        let t = target.octets();
        let group = Ipv6Addr::new(
            0xff02,
            0,
            0,
            0,
            0,
            1,
            0xff00 | u16::from(t[13]),
            u16::from_be_bytes([t[14], t[15]]),
        );
        let mut body = vec![0u8; 4];
        body.extend_from_slice(&t);
        // Source link-layer address option.
        body.extend_from_slice(&[1, 1]);
        body.extend_from_slice(&mac);
        let mut p = Self::icmp6(src, group, 135, &body);
        p.eth_dst = [0x33, 0x33, 0xff, t[13], t[14], t[15]];
        p.eth_src = mac;
        p
    }

    pub fn with_payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    pub fn with_macs(mut self, dst: Mac, src: Mac) -> Self {
        self.eth_dst = dst;
        self.eth_src = src;
        self
    }

    pub fn with_ext(mut self, kind: u8, body: &[u8]) -> Self {
        self.ext.push((kind, body.to_vec()));
        self
    }

    pub fn with_traffic_class(mut self, tc: u8) -> Self {
        self.traffic_class = tc;
        self
    }

    /// The transport header and payload, checksummed over the pseudo-header.
    fn transport(&self) -> Vec<u8> {
        let mut l4 = match self.proto {
            6 => {
                let mut t = Vec::with_capacity(20 + self.payload.len());
                t.extend_from_slice(&self.src.port().to_be_bytes());
                t.extend_from_slice(&self.dst.port().to_be_bytes());
                t.extend_from_slice(&1000u32.to_be_bytes());
                t.extend_from_slice(&0u32.to_be_bytes());
                t.extend_from_slice(&[0x50, self.tcp_flags]);
                t.extend_from_slice(&65535u16.to_be_bytes());
                t.extend_from_slice(&[0, 0, 0, 0]);
                t.extend_from_slice(&self.payload);
                t
            }
            17 => {
                let mut u = Vec::with_capacity(8 + self.payload.len());
                u.extend_from_slice(&self.src.port().to_be_bytes());
                u.extend_from_slice(&self.dst.port().to_be_bytes());
                u.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                u.extend_from_slice(&[0, 0]);
                u.extend_from_slice(&self.payload);
                u
            }
            _ => self.payload.clone(),
        };
        let at = match self.proto {
            6 => 16,
            17 => 6,
            _ => 2,
        };
        let c = upper_checksum(*self.src.ip(), *self.dst.ip(), self.proto, &l4);
        let c = if self.proto == 17 && c == 0 {
            0xffff
        } else {
            c
        };
        l4[at..at + 2].copy_from_slice(&c.to_ne_bytes());
        l4
    }

    /// The IPv6 datagram: fixed header, extension headers, transport.
    pub fn datagram(&self) -> Vec<u8> {
        let l4 = self.transport();
        let mut ext = Vec::new();
        let kinds: Vec<u8> = self.ext.iter().map(|(k, _)| *k).collect();
        for (i, (_, body)) in self.ext.iter().enumerate() {
            let next = kinds.get(i + 1).copied().unwrap_or(self.proto);
            let mut h = vec![next, 0];
            h.extend_from_slice(body);
            while h.len() < 8 || h.len() % 8 != 0 {
                h.push(0);
            }
            h[1] = (h.len() / 8 - 1) as u8;
            ext.extend_from_slice(&h);
        }
        let first = (6u32 << 28) | (u32::from(self.traffic_class) << 20);
        let mut d = Vec::with_capacity(40 + ext.len() + l4.len());
        d.extend_from_slice(&first.to_be_bytes());
        d.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
        d.push(kinds.first().copied().unwrap_or(self.proto));
        d.push(self.hop_limit);
        d.extend_from_slice(&self.src.ip().octets());
        d.extend_from_slice(&self.dst.ip().octets());
        d.extend_from_slice(&ext);
        d.extend_from_slice(&l4);
        d
    }

    /// The Ethernet frame.
    pub fn build(&self) -> Vec<u8> {
        frame(self.eth_dst, self.eth_src, &self.datagram())
    }
}

/// An Ethernet frame of type IPv6 around `datagram`.
pub fn frame(eth_dst: Mac, eth_src: Mac, datagram: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + datagram.len());
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&eth_src);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(datagram);
    f
}

/// The checksum of an upper-layer message `l4` (its own checksum field
/// zero) over the IPv6 pseudo-header (RFC 8200 §8.1).
pub fn upper_checksum(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40 + l4.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    pseudo.extend_from_slice(l4);
    checksum(&pseudo, 0)
}

/// What a DSR router sends for `inner` (an IPv6 datagram): an outer IPv6
/// header from `src` to `dst` with the inner traffic class, flow label
/// `label` and hop limit 64, next header 41 or, for GUE, UDP with ports
/// `(sport, dport)` and a zero checksum (RFC 6935).
pub fn encapsulated6(
    inner: &[u8],
    (src, dst): (Ipv6Addr, Ipv6Addr),
    (eth_dst, eth_src): (Mac, Mac),
    gue: Option<(u16, u16)>,
    label: u32,
) -> Vec<u8> {
    let tclass = (inner[0] << 4) | (inner[1] >> 4);
    let extra = if gue.is_some() { 8 } else { 0 };
    let first = (6u32 << 28) | (u32::from(tclass) << 20) | (label & 0xfffff);
    let mut d = Vec::new();
    d.extend_from_slice(&first.to_be_bytes());
    d.extend_from_slice(&((inner.len() + extra) as u16).to_be_bytes());
    d.push(if gue.is_some() { 17 } else { 41 });
    d.push(64);
    d.extend_from_slice(&src.octets());
    d.extend_from_slice(&dst.octets());
    if let Some((sport, dport)) = gue {
        d.extend_from_slice(&sport.to_be_bytes());
        d.extend_from_slice(&dport.to_be_bytes());
        d.extend_from_slice(&((inner.len() + 8) as u16).to_be_bytes());
        d.extend_from_slice(&[0, 0]);
    }
    d.extend_from_slice(inner);
    frame(eth_dst, eth_src, &d)
}

/// The ICMPv6 "packet too big" (RFC 4443 §3.2) a router at `from` sends
/// to `to` for `offending` (an IPv6 datagram), quoting its first `quote`
/// bytes, hop limit 64.
pub fn packet_too_big(
    offending: &[u8],
    (from, to): (Ipv6Addr, Ipv6Addr),
    (eth_dst, eth_src): (Mac, Mac),
    mtu: u32,
    quote: usize,
) -> Vec<u8> {
    let mut m = vec![2, 0, 0, 0];
    m.extend_from_slice(&mtu.to_be_bytes());
    m.extend_from_slice(&offending[..quote]);
    let c = upper_checksum(from, to, 58, &m);
    m[2..4].copy_from_slice(&c.to_ne_bytes());
    let mut d = Vec::new();
    d.extend_from_slice(&(6u32 << 28).to_be_bytes());
    d.extend_from_slice(&(m.len() as u16).to_be_bytes());
    d.extend_from_slice(&[58, 64]);
    d.extend_from_slice(&from.octets());
    d.extend_from_slice(&to.octets());
    d.extend_from_slice(&m);
    frame(eth_dst, eth_src, &d)
}

/// Verifies an IPv6 frame's upper-layer checksum over its pseudo-header
/// (TCP, UDP, ICMPv6), walking extension headers; for a tunnel (IPv6 in
/// IPv6, or UDP with a zero checksum, which is GUE's) the inner packet's.
pub fn checksums_valid6(frame: &[u8]) -> bool {
    let Some(d) = frame.get(14..) else {
        return false;
    };
    if d.len() < 40 || d[0] >> 4 != 6 {
        return false;
    }
    let len = 40 + u16::from_be_bytes([d[4], d[5]]) as usize;
    let Some(d) = d.get(..len) else {
        return false;
    };
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&d[8..24]).unwrap_or_default());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&d[24..40]).unwrap_or_default());
    let (mut nh, mut off) = (d[6], 40);
    while matches!(nh, 0 | 43 | 60) && off + 2 <= d.len() {
        let next = d[off];
        off += (d[off + 1] as usize + 1) * 8;
        nh = next;
    }
    let Some(l4) = d.get(off..) else {
        return false;
    };
    let inner = |at: usize| {
        let mut f = frame[..14].to_vec();
        f.extend_from_slice(&l4[at..]);
        checksums_valid6(&f)
    };
    match nh {
        41 => inner(0),
        17 if l4.len() >= 8 && l4[6..8] == [0, 0] => inner(8),
        6 | 17 | 58 => upper_checksum(src, dst, nh, l4) == 0,
        _ => false,
    }
}

pub fn addr6(s: &str) -> SocketAddrV6 {
    s.parse()
        .unwrap_or_else(|e| panic!("bad IPv6 socket address {s}: {e}"))
}

pub fn ip6(s: &str) -> Ipv6Addr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad IPv6 address {s}: {e}"))
}

/// The datapath's key of a packet from `src` to `dst` (`[addr]:port` each).
pub fn conn_key6(src: &str, dst: &str, proto: u8) -> ConnKey6 {
    let (s, d) = (addr6(src), addr6(dst));
    ConnKey6 {
        src_addr: Addr6::from_octets(s.ip().octets()),
        dst_addr: Addr6::from_octets(d.ip().octets()),
        src_port: s.port().to_be(),
        dst_port: d.port().to_be(),
        proto,
        _pad: [0; 3],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_tcp_segment_checksums_to_zero_over_its_pseudo_header() {
        let p = Packet6::tcp(
            addr6("[2001:2::2]:40000"),
            addr6("[2001:2::100]:8000"),
            0x02,
        )
        .with_payload(b"hello");
        let d = p.datagram();
        assert_eq!(d.len(), 40 + 20 + 5);
        assert_eq!(upper_checksum(*p.src.ip(), *p.dst.ip(), 6, &d[40..]), 0);
    }

    #[test]
    fn extension_headers_chain_to_the_transport_and_pad_to_eight_bytes() {
        let p = Packet6::udp(addr6("[2001:2::2]:5000"), addr6("[2001:2::100]:53"), b"q")
            .with_ext(0, &[1, 0, 0, 0])
            .with_ext(60, &[1, 2, 0, 0, 0, 0, 0, 0, 0, 0]);
        let d = p.datagram();
        assert_eq!(d[6], 0, "first: hop-by-hop");
        assert_eq!((d[40], d[41]), (60, 0), "then destination options, 8 bytes");
        assert_eq!((d[48], d[49]), (17, 1), "then UDP, 16 bytes");
        assert_eq!(d.len(), 40 + 8 + 16 + 9);
    }
}
