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

/// The checksum of a header of `N` bytes (`N` even, at most 64 KiB / 2
/// words before the folds could fall short), for a BPF program: a fixed
/// count of words and two folds, no data-dependent loop for the verifier
/// to walk.
#[inline(always)]
pub fn header<const N: usize>(bytes: &[u8; N]) -> u16 {
    const { assert!(N.is_multiple_of(2) && N <= 128) };
    let mut sum = 0u32;
    let mut i = 0;
    while i < N {
        sum += u16::from_ne_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    !fold(sum)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checksums_match_the_general_one() {
        let ip: [u8; 20] = [
            0x45, 0, 0, 0x3c, 0x1c, 0x46, 0x40, 0, 0x40, 6, 0, 0, 0xac, 0x10, 0x0a, 0x63, 0xac,
            0x10, 0x0a, 0x0c,
        ];
        // RFC 1071's classic example header: 0xb1e6.
        assert_eq!(u16::from_be(header(&ip)), 0xb1e6);
        let all_ones = [0xffu8; 36];
        assert_eq!(header(&all_ones), checksum(&all_ones, 0));
    }
}
