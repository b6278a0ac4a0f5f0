//! The NAT rewrite of a frame, with every checksum computed from scratch
//! over the whole header or segment before and after the rewrite.
//!
//! The datapath folds a per-flow delta into the checksum it finds; the model
//! sums the packet instead. For a frame whose checksums were right, the
//! result is the plain checksum of the output. For one whose checksums were
//! wrong, the datapath carries the error over to the output unchanged (it is
//! a router, not a validator), so the model does the same: the output's
//! checksum is the correct one plus the input's error,
//! `~(S_out + ~c_in + ~S_in)` in one's-complement arithmetic, where `S` is
//! the sum of the covered words and `c_in` the checksum found. When `c_in`
//! was right, `~c_in` equals `S_in` and this is `~S_out`.
//!
//! Both forms give a value in `0..=0xfffe` (a fold of a positive sum is
//! never zero), so one's-complement equality is byte equality here.

/// A translation: the new source and destination, as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
}

const ETH: usize = 14;
const IP: usize = 20;

/// One's-complement sum of `data` as 16-bit words in memory order (the
/// order does not matter for the sum; native loads keep it byte-exact with
/// a checksum field stored the same way), odd byte padded with zero.
pub fn sum(data: &[u8]) -> u64 {
    let mut s = 0u64;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        s += u64::from(u16::from_ne_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        s += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    s
}

/// Folds a sum to 16 bits with end-around carry.
pub fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The checksum field of a region whose covered words (checksum field as
/// zero) sum to `after`, given that the same region summed to `before` and
/// carried `found`.
pub fn carried(found: u16, before: u64, after: u64) -> u16 {
    !fold(after + u64::from(!found) + u64::from(!fold(before)))
}

fn read16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn write16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_ne_bytes());
}

fn write32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

/// Sum of the IPv4 header of `frame` with its checksum field taken as zero.
fn ip_sum(frame: &[u8]) -> u64 {
    sum(&frame[ETH..ETH + IP]) - u64::from(read16(frame, ETH + 10))
}

/// The transport region of a rewritten packet: where its checksum sits,
/// and how many bytes it covers (after the pseudo-header).
fn l4_region(frame: &[u8], proto: u8) -> (usize, usize) {
    let tot_len = usize::from(u16::from_be_bytes([frame[ETH + 2], frame[ETH + 3]]));
    match proto {
        6 => (16, tot_len - IP),
        _ => (
            6,
            usize::from(u16::from_be_bytes([
                frame[ETH + IP + 4],
                frame[ETH + IP + 5],
            ])),
        ),
    }
}

/// Pseudo-header plus covered transport bytes, checksum field as zero.
fn l4_sum(frame: &[u8], proto: u8) -> u64 {
    let (field, len) = l4_region(frame, proto);
    let l4 = ETH + IP;
    let pseudo = sum(&frame[ETH + 12..ETH + 20])
        + u64::from(u16::from_ne_bytes([0, proto]))
        + u64::from(u16::from_ne_bytes((len as u16).to_be_bytes()));
    pseudo + sum(&frame[l4..l4 + len]) - u64::from(read16(frame, l4 + field))
}

/// Whether the IPv4 and transport checksums of a parsed TCP/UDP frame (no
/// IP options) are right; a UDP checksum of 0 means none and is right.
pub fn checksums_right(frame: &[u8], proto: u8) -> bool {
    if !fold(ip_sum(frame) + u64::from(read16(frame, ETH + 10))) != 0 {
        return false;
    }
    let (field, _) = l4_region(frame, proto);
    let found = read16(frame, ETH + IP + field);
    if proto == 17 && found == 0 {
        return true;
    }
    !fold(l4_sum(frame, proto) + u64::from(found)) == 0
}

/// `frame` translated to `to`: addresses, ports and both checksums, and
/// one less TTL when the datapath is the hop that sends it on (`hop`; the
/// host's stack takes its own otherwise). MACs are the caller's (they
/// depend on the next hop).
pub fn rewrite(frame: &[u8], proto: u8, to: Tuple, hop: bool) -> Vec<u8> {
    let mut out = frame.to_vec();
    let (ip_before, l4_before) = (ip_sum(frame), l4_sum(frame, proto));
    if hop {
        out[ETH + 8] = out[ETH + 8].wrapping_sub(1);
    }
    write32(&mut out, ETH + 12, to.src_addr);
    write32(&mut out, ETH + 16, to.dst_addr);
    write16(&mut out, ETH + IP, to.src_port);
    write16(&mut out, ETH + IP + 2, to.dst_port);
    let ip_after = ip_sum(&out);
    write16(
        &mut out,
        ETH + 10,
        carried(read16(frame, ETH + 10), ip_before, ip_after),
    );
    let (field, _) = l4_region(frame, proto);
    let at = ETH + IP + field;
    let found = read16(frame, at);
    // A UDP checksum of 0 means "none" and stays so; a computed 0 is sent
    // as all ones, which means the same to the receiver.
    if proto == 17 && found == 0 {
        return out;
    }
    let l4_after = l4_sum(&out, proto);
    let mut c = carried(found, l4_before, l4_after);
    if proto == 17 && c == 0 {
        c = 0xffff;
    }
    write16(&mut out, at, c);
    out
}

/// The checksum-delta class of a translation from `from` to `to`: the
/// datapath stores a per-flow delta (any value congruent modulo 0xffff does
/// the same), for the IPv4 header (addresses) and the transport checksum
/// (addresses and ports). Used to seed entries and to check created ones.
pub fn delta_classes(from: Tuple, to: Tuple) -> (u16, u16) {
    let words = |v: u32| u64::from(v & 0xffff) + u64::from(v >> 16);
    let neg = |s: u64| u64::from(!fold(s));
    let l3_old = words(from.src_addr) + words(from.dst_addr);
    let l3_new = words(to.src_addr) + words(to.dst_addr);
    let l4_old = l3_old + u64::from(from.src_port) + u64::from(from.dst_port);
    let l4_new = l3_new + u64::from(to.src_port) + u64::from(to.dst_port);
    (class(l3_new + neg(l3_old)), class(l4_new + neg(l4_old)))
}

/// A one's-complement value with its two zeros made one.
pub fn class(s: u64) -> u16 {
    match fold(s) {
        0xffff => 0,
        v => v,
    }
}
