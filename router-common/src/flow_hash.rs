//! The flow hash that picks a Maglev slot. Kernel and userspace share it so
//! the reference model and every LB node map a flow to the same slot.

/// One Murmur3 block round: word `k` mixed into state `h`.
#[inline(always)]
fn round(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of a client flow (src, dst, ports, protocol), fields as loaded
/// natively from network-order bytes, under secret `key`. Murmur3-style
/// mixing: cheap in BPF and uniform enough that Maglev shares stay within
/// a fraction of a percent. The key seeds the state and is folded in
/// again before the finaliser, so without it a client cannot work out
/// offline which source ports land on which Maglev slot. It is no MAC: a
/// client that can tell backends apart by their answers can still search
/// for ports that reach one, and a weight bounds what that gets it. A key
/// of zero gives the unkeyed hash of earlier versions.
#[inline(always)]
pub fn flow_hash(
    key: [u32; 2],
    src_addr: u32,
    dst_addr: u32,
    src_port: u16,
    dst_port: u16,
    proto: u8,
) -> u32 {
    let mut h = 0x9747_b28c_u32 ^ key[0] ^ proto as u32;
    for k in [
        src_addr,
        dst_addr,
        ((src_port as u32) << 16) | dst_port as u32,
    ] {
        h = round(h, k);
    }
    fmix32(h ^ 12 ^ key[1])
}

/// The hash of an IPv6 client flow, as `flow_hash` is of an IPv4 one:
/// every word of both addresses is mixed in, then the ports, under the
/// same secret.
#[inline(always)]
pub fn flow_hash6(
    key: [u32; 2],
    src_addr: [u32; 4],
    dst_addr: [u32; 4],
    src_port: u16,
    dst_port: u16,
    proto: u8,
) -> u32 {
    let mut h = 0x9747_b28c_u32 ^ key[0] ^ proto as u32;
    let words = [
        src_addr[0],
        src_addr[1],
        src_addr[2],
        src_addr[3],
        dst_addr[0],
        dst_addr[1],
        dst_addr[2],
        dst_addr[3],
        ((src_port as u32) << 16) | dst_port as u32,
    ];
    for k in words {
        h = round(h, k);
    }
    fmix32(h ^ 36 ^ key[1])
}

/// A second hash of a flow, independent of `flow_hash` for every practical
/// purpose (a bijective mix of it with another constant): the second of the
/// two choices a large least-loaded service draws from its Maglev table.
#[inline(always)]
pub fn second_choice(hash: u32) -> u32 {
    fmix32(hash ^ 0x5bd1_e995)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ipv6_hash_depends_on_every_address_word_the_ports_and_the_key() {
        let (src, dst) = ([1u32, 2, 3, 4], [5u32, 6, 7, 8]);
        let base = flow_hash6([9, 10], src, dst, 40000, 8000, 6);
        for i in 0..4 {
            let mut s = src;
            s[i] ^= 1 << 7;
            assert_ne!(
                flow_hash6([9, 10], s, dst, 40000, 8000, 6),
                base,
                "src word {i}"
            );
            let mut d = dst;
            d[i] ^= 1 << 7;
            assert_ne!(
                flow_hash6([9, 10], src, d, 40000, 8000, 6),
                base,
                "dst word {i}"
            );
        }
        assert_ne!(flow_hash6([9, 10], src, dst, 40001, 8000, 6), base);
        assert_ne!(flow_hash6([9, 10], src, dst, 40000, 8000, 17), base);
        assert_ne!(flow_hash6([9, 11], src, dst, 40000, 8000, 6), base);
        // Not the IPv4 hash of any one word pair.
        assert_ne!(flow_hash([9, 10], 1, 5, 40000, 8000, 6), base);
    }
}
