//! Layout of the latency histograms (`LATENCY`): which kinds are measured
//! and how a sample in microseconds picks its bucket. The datapath fills
//! the buckets and the daemon exports them, so both read this one layout.

/// Buckets of a latency histogram. Bucket `b` counts latencies of `b`
/// significant bits in microseconds: bucket 0 is 0 µs, bucket `b` holds
/// `[2^(b-1), 2^b)` µs, and the last bucket also takes everything above
/// (2^26 µs ≈ 67 s), so `le = 2^b µs` is each bucket's Prometheus bound.
pub const LATENCY_BUCKETS: usize = 28;
/// `LATENCY` index for a backend: `backend_id * LATENCY_KINDS + kind`.
pub const LATENCY_KINDS: u32 = 2;
/// SYN forwarded → SYN-ACK from the backend: connect latency.
pub const LATENCY_CONNECT: u32 = 0;
/// Client's first payload → backend's first payload: time to first byte
/// (time to first token for a streaming completion).
pub const LATENCY_FIRST_BYTE: u32 = 1;

/// The histogram bucket for a latency in microseconds.
#[inline(always)]
pub fn latency_bucket(us: u32) -> usize {
    // Branch-free bit length: the BPF backend has no count-leading-zeros.
    let mut v = us;
    let mut bits = 0u32;
    let mut step = 16u32;
    while step > 0 {
        if v >> step != 0 {
            v >>= step;
            bits += step;
        }
        step >>= 1;
    }
    let len = bits + (v != 0) as u32;
    if len as usize >= LATENCY_BUCKETS {
        LATENCY_BUCKETS - 1
    } else {
        len as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_bucket_is_the_bit_length_capped() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1), 1);
        assert_eq!(latency_bucket(2), 2);
        assert_eq!(latency_bucket(3), 2);
        assert_eq!(latency_bucket(4), 3);
        assert_eq!(latency_bucket(1023), 10);
        assert_eq!(latency_bucket(1024), 11);
        assert_eq!(latency_bucket((1 << 26) - 1), 26);
        assert_eq!(latency_bucket(1 << 26), 27);
        assert_eq!(latency_bucket(u32::MAX), 27);
        for us in [5u32, 77, 4096, 99_999, 12_345_678] {
            let b = latency_bucket(us);
            assert!(us < 1 << b && us >= 1 << (b - 1), "{us} in bucket {b}");
        }
    }
}
