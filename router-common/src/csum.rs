//! Incremental Internet checksum arithmetic (RFC 1624), in the form the
//! datapath uses: a per-flow delta computed once at connection setup and
//! folded into each packet's checksum.

/// Sum of the 16-bit words of a 32-bit value read natively from the wire.
#[inline(always)]
fn words(v: u32) -> u32 {
    (v & 0xffff) + (v >> 16)
}

/// Folds a 32-bit one's-complement accumulator to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Delta that turns a checksum over `old` words into one over `new` words:
/// Σ~old + Σnew, for 32-bit quantities as loaded natively from the wire.
#[inline(always)]
pub fn delta32(old: u32, new: u32) -> u32 {
    words(!old) + words(new)
}

/// Same for 16-bit quantities.
#[inline(always)]
pub fn delta16(old: u16, new: u16) -> u32 {
    (!old) as u32 + new as u32
}

/// Applies a delta to a checksum field as stored in the header (RFC 1624 eq. 3:
/// HC' = ~(~HC + ~m + m')).
#[inline(always)]
pub fn apply(csum: u16, delta: u32) -> u16 {
    !fold((!csum) as u32 + fold(delta) as u32)
}

/// Full checksum of a byte slice (used by userspace to verify rewritten
/// packets independently of the incremental path).
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_ne_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += u16::from_ne_bytes([*last, 0]) as u64;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
