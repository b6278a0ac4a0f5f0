//! Crafting test packets byte by byte, with checksums computed in full (so
//! they check the datapath's incremental updates independently).

use std::net::{Ipv4Addr, SocketAddrV4};

use router_common::csum::checksum;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub type Mac = [u8; 6];

/// The sequence and acknowledgement number of a packet that sets neither.
pub const DEFAULT_SEQ: u32 = 0x0101_0101;

#[derive(Clone, Debug)]
pub struct Packet {
    pub eth_dst: Mac,
    pub eth_src: Mac,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// 6 TCP, 17 UDP, anything else: an opaque payload after the IP header.
    pub proto: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    pub ip_options: Vec<u8>,
    /// Raw flags+fragment-offset field.
    pub frag: u16,
    pub ttl: u8,
    pub ip_id: u16,
    /// TCP sequence and acknowledgement numbers. Both default to the same
    /// value, so a client's ACK built with the defaults acknowledges a
    /// SYN-ACK built with them, and every default segment lies within the
    /// datapath's sequence window of every other.
    pub seq: u32,
    pub ack: u32,
    /// Send a UDP checksum of 0 ("none").
    pub udp_no_checksum: bool,
}

impl Packet {
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Self {
        Self {
            eth_dst: [0x02, 0, 0, 0, 0, 0x01],
            eth_src: [0x02, 0, 0, 0, 0, 0x02],
            src,
            dst,
            proto: 6,
            tcp_flags: flags,
            payload: Vec::new(),
            ip_options: Vec::new(),
            frag: 0x4000, // DF
            ttl: 64,
            ip_id: 0x1234,
            seq: DEFAULT_SEQ,
            ack: DEFAULT_SEQ,
            udp_no_checksum: false,
        }
    }

    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Self {
        Self {
            proto: 17,
            tcp_flags: 0,
            payload: payload.to_vec(),
            ..Self::tcp(src, dst, 0)
        }
    }

    pub fn with_payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    pub fn with_seq(mut self, seq: u32, ack: u32) -> Self {
        self.seq = seq;
        self.ack = ack;
        self
    }

    pub fn with_macs(mut self, dst: Mac, src: Mac) -> Self {
        self.eth_dst = dst;
        self.eth_src = src;
        self
    }

    /// The same packet after translation to a new tuple and next hop, one
    /// router hop on (its TTL one less).
    pub fn translated(
        &self,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        eth_dst: Mac,
        eth_src: Mac,
    ) -> Self {
        Self {
            src,
            dst,
            eth_dst,
            eth_src,
            ttl: self.ttl.wrapping_sub(1),
            ..self.clone()
        }
    }

    pub fn with_ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    fn l4(&self) -> Vec<u8> {
        let (s, d) = (self.src.port().to_be_bytes(), self.dst.port().to_be_bytes());
        match self.proto {
            6 => {
                let mut h = Vec::with_capacity(20 + self.payload.len());
                h.extend_from_slice(&s);
                h.extend_from_slice(&d);
                h.extend_from_slice(&self.seq.to_be_bytes());
                h.extend_from_slice(&self.ack.to_be_bytes());
                h.push(5 << 4);
                h.push(self.tcp_flags);
                h.extend_from_slice(&64240u16.to_be_bytes());
                h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
                h.extend_from_slice(&self.payload);
                let c = checksum(&h, self.pseudo_sum(h.len()));
                h[16..18].copy_from_slice(&c.to_ne_bytes());
                h
            }
            17 => {
                let len = (8 + self.payload.len()) as u16;
                let mut h = Vec::with_capacity(len as usize);
                h.extend_from_slice(&s);
                h.extend_from_slice(&d);
                h.extend_from_slice(&len.to_be_bytes());
                h.extend_from_slice(&[0, 0]);
                h.extend_from_slice(&self.payload);
                if !self.udp_no_checksum {
                    let c = match checksum(&h, self.pseudo_sum(h.len())) {
                        0 => 0xffff,
                        c => c,
                    };
                    h[6..8].copy_from_slice(&c.to_ne_bytes());
                }
                h
            }
            _ => self.payload.clone(),
        }
    }

    fn pseudo_sum(&self, l4_len: usize) -> u32 {
        let mut b = Vec::with_capacity(12);
        b.extend_from_slice(&self.src.ip().octets());
        b.extend_from_slice(&self.dst.ip().octets());
        b.push(0);
        b.push(self.proto);
        b.extend_from_slice(&(l4_len as u16).to_be_bytes());
        b.chunks(2)
            .map(|c| u16::from_ne_bytes([c[0], c[1]]) as u32)
            .sum()
    }

    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4();
        let ihl = 5 + self.ip_options.len() / 4;
        let mut ip = Vec::with_capacity(ihl * 4);
        ip.push(0x40 | ihl as u8);
        ip.push(0);
        ip.extend_from_slice(&((ihl * 4 + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&self.ip_id.to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.push(self.ttl);
        ip.push(self.proto);
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&self.src.ip().octets());
        ip.extend_from_slice(&self.dst.ip().octets());
        ip.extend_from_slice(&self.ip_options);
        let c = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_ne_bytes());

        let mut out = Vec::with_capacity(14 + ip.len() + l4.len());
        out.extend_from_slice(&self.eth_dst);
        out.extend_from_slice(&self.eth_src);
        out.extend_from_slice(&0x0800u16.to_be_bytes());
        out.extend_from_slice(&ip);
        out.extend_from_slice(&l4);
        out
    }
}

impl Packet {
    /// The packet's IPv4 datagram: the frame without its Ethernet header.
    pub fn datagram(&self) -> Vec<u8> {
        self.build().split_off(14)
    }

    /// An ICMP message from `src` to `dst`: `(type, code)`, the four bytes
    /// after the checksum (`rest`: an echo's identifier and sequence, a
    /// "fragmentation needed"'s next-hop MTU), then `body`; its checksum
    /// computed in full.
    pub fn icmp(src: Ipv4Addr, dst: Ipv4Addr, kind: (u8, u8), rest: [u8; 4], body: &[u8]) -> Self {
        let mut m = vec![kind.0, kind.1, 0, 0];
        m.extend_from_slice(&rest);
        m.extend_from_slice(body);
        let c = checksum(&m, 0);
        m[2..4].copy_from_slice(&c.to_ne_bytes());
        Self {
            proto: 1,
            payload: m,
            ..Self::tcp(SocketAddrV4::new(src, 0), SocketAddrV4::new(dst, 0), 0)
        }
    }

    /// The ICMP error `(type, code)` that `src` sends about packet `about`:
    /// to `about`'s source, quoting the first `quote` bytes of its datagram
    /// (all of it if it is shorter).
    pub fn icmp_error(
        src: Ipv4Addr,
        about: &Packet,
        kind: (u8, u8),
        rest: [u8; 4],
        quote: usize,
    ) -> Self {
        let d = about.datagram();
        Self::icmp(src, *about.src.ip(), kind, rest, &d[..quote.min(d.len())])
    }
}

pub fn addr(s: &str) -> SocketAddrV4 {
    s.parse()
        .unwrap_or_else(|e| panic!("bad test address {s}: {e}"))
}

pub fn ip(s: &str) -> Ipv4Addr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad test address {s}: {e}"))
}

/// Verifies the IPv4 header checksum and the TCP/UDP checksum of a frame
/// (an IPv6 frame: see `checksums_valid6`), or for ICMP the checksums `icmp_checksums_valid` checks.
pub fn checksums_valid(frame: &[u8]) -> bool {
    if frame.get(12..14) == Some(&[0x86, 0xdd]) {
        return crate::packet6::checksums_valid6(frame);
    }
    if frame.len() < 34 {
        return false;
    }
    let ihl = (frame[14] & 0x0f) as usize * 4;
    let ip = &frame[14..14 + ihl];
    if checksum(ip, 0) != 0 {
        return false;
    }
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let l4 = &frame[14 + ihl..14 + tot];
    let proto = ip[9];
    if proto == 1 {
        return icmp_checksums_valid(l4);
    }
    // IPIP: the inner datagram's own checksums.
    if proto == 4 {
        return inner_valid(&frame[..14], l4);
    }
    let gue = proto == 17
        && l4.len() >= 28
        && u16::from_be_bytes([l4[2], l4[3]]) == router_common::dsr::DEFAULT_GUE_PORT;
    transport_checksum_valid(ip, l4)
        // GUE (variant 1) to its port: the inner datagram after the UDP header.
        && (!gue || inner_valid(&frame[..14], &l4[8..]))
}

/// `checksums_valid` of an inner datagram under Ethernet header `eth`.
fn inner_valid(eth: &[u8], datagram: &[u8]) -> bool {
    let ihl = datagram.first().map_or(0, |b| usize::from(b & 0x0f) * 4);
    let tot = match datagram {
        [_, _, a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])),
        _ => 0,
    };
    if ihl < 20 || tot < ihl + 8 || tot > datagram.len() {
        return false;
    }
    let mut f = eth.to_vec();
    f.extend_from_slice(datagram);
    checksums_valid(&f)
}

/// The TCP or UDP checksum of segment `l4` under IPv4 header `ip`; a UDP
/// checksum of 0 ("none") is valid.
fn transport_checksum_valid(ip: &[u8], l4: &[u8]) -> bool {
    let proto = ip[9];
    if proto == 17 && l4.len() >= 8 && l4[6] == 0 && l4[7] == 0 {
        return true;
    }
    let mut pseudo: u32 = 0;
    for c in ip[12..20].chunks(2) {
        pseudo += u16::from_ne_bytes([c[0], c[1]]) as u32;
    }
    pseudo += u16::from_ne_bytes([0, proto]) as u32;
    pseudo += u16::from_ne_bytes((l4.len() as u16).to_be_bytes()) as u32;
    checksum(l4, pseudo) == 0
}

/// The ICMP checksum of message `m` and, for an error (destination
/// unreachable, time exceeded) that quotes a whole IPv4 header, the quoted
/// header's checksum, and the quoted TCP or UDP checksum when the quote
/// holds the whole datagram it covers.
pub fn icmp_checksums_valid(m: &[u8]) -> bool {
    if m.len() < 8 || checksum(m, 0) != 0 {
        return false;
    }
    let quote = &m[8..];
    if !matches!(m[0], 3 | 11) || quote.len() < 20 {
        return true;
    }
    let ihl = (quote[0] & 0x0f) as usize * 4;
    if ihl < 20 || quote.len() < ihl || checksum(&quote[..ihl], 0) != 0 {
        return false;
    }
    let tot = u16::from_be_bytes([quote[2], quote[3]]) as usize;
    match quote[9] {
        6 | 17 if tot >= ihl && tot <= quote.len() => {
            transport_checksum_valid(&quote[..ihl], &quote[ihl..tot])
        }
        _ => true,
    }
}

/// Recomputes, in place, the IPv4 header checksum and (for TCP and UDP) the
/// transport checksum of an Ethernet frame whose IP header and ports were
/// patched after building. The frame must hold the whole datagram that its
/// IPv4 total length announces.
pub fn fill_checksums(frame: &mut [u8]) {
    let ihl = (frame[14] & 0x0f) as usize * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&frame[14..14 + ihl], 0);
    frame[24..26].copy_from_slice(&c.to_ne_bytes());
    let tot = u16::from_be_bytes([frame[16], frame[17]]) as usize;
    let proto = frame[23];
    let l4_start = 14 + ihl;
    let l4_len = tot - ihl;
    let at = match proto {
        6 => l4_start + 16,
        17 => l4_start + 6,
        _ => return,
    };
    frame[at..at + 2].copy_from_slice(&[0, 0]);
    let mut pseudo: u32 = 0;
    for c in frame[26..34].chunks(2) {
        pseudo += u16::from_ne_bytes([c[0], c[1]]) as u32;
    }
    pseudo += u16::from_ne_bytes([0, proto]) as u32;
    pseudo += u16::from_ne_bytes((l4_len as u16).to_be_bytes()) as u32;
    let mut c = checksum(&frame[l4_start..l4_start + l4_len], pseudo);
    if proto == 17 && c == 0 {
        c = 0xffff;
    }
    frame[at..at + 2].copy_from_slice(&c.to_ne_bytes());
}

/// splitmix64: spreads flood index `i` over sources and ports the way a
/// random spoofer would, reproducibly.
fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes spoofed SYN number `i` into `buf` from `template` (a SYN to the
/// VIP with the right MACs): source 198.19.x.y, a source port in
/// 1024–65535 and a sequence number, all derived from `i`.
pub fn spoofed_syn(template: &[u8], i: u64, buf: &mut [u8]) -> usize {
    let len = template.len();
    buf[..len].copy_from_slice(template);
    let r = mix(i);
    buf[26..30].copy_from_slice(&[198, 19, (r >> 8) as u8, r as u8]);
    let port = 1024 + ((r >> 16) % 64_512) as u16;
    buf[34..36].copy_from_slice(&port.to_be_bytes());
    buf[38..42].copy_from_slice(&((r >> 32) as u32).to_be_bytes());
    fill_checksums(&mut buf[..len]);
    len
}

/// What a DSR router sends for `inner` (an IPv4 datagram): an Ethernet
/// header to `eth_dst` from `eth_src`, an outer IPv4 header from `src` to
/// `dst` (TTL 64, ID 0, the inner DSCP/ECN and DF bit), and for GUE a UDP
/// header with ports `(sport, dport)` and no checksum, built here from the
/// RFCs, independently of the datapath.
pub fn encapsulated(
    inner: &[u8],
    (src, dst): (Ipv4Addr, Ipv4Addr),
    (eth_dst, eth_src): (Mac, Mac),
    gue: Option<(u16, u16)>,
) -> Vec<u8> {
    let extra = if gue.is_some() { 28 } else { 20 };
    let mut ip = vec![0x45, inner[1]];
    ip.extend_from_slice(&((inner.len() + extra) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, inner[6] & 0x40, 0, 64]);
    ip.push(if gue.is_some() { 17 } else { 4 });
    ip.extend_from_slice(&[0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_ne_bytes());
    let mut out = Vec::new();
    out.extend_from_slice(&eth_dst);
    out.extend_from_slice(&eth_src);
    out.extend_from_slice(&0x0800u16.to_be_bytes());
    out.extend_from_slice(&ip);
    if let Some((sport, dport)) = gue {
        out.extend_from_slice(&sport.to_be_bytes());
        out.extend_from_slice(&dport.to_be_bytes());
        out.extend_from_slice(&((inner.len() + 8) as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
    }
    out.extend_from_slice(inner);
    out
}
