//! Pools: named groups of a service's backends, chosen per client before
//! the service's selection picks a backend inside the pool.
//!
//! A new flow of a pooled service finds its pool in three steps, each read
//! from maps that only userspace writes:
//! 1. the client's source address in the service's segments (`SEGMENTS`,
//!    longest prefix wins);
//! 2. else the client's share bucket (`client_bucket`) in the service's
//!    live half of `SHARES`: the same address always falls in the same
//!    bucket, so a client stays in one pool while the shares stand;
//! 3. then, while the pool has no room (`POOL_NO_ROOM`), its fallback, at
//!    most `MAX_FALLBACK_DEPTH` steps down the chain.

/// Pools per service. Pool indexes (0..MAX_POOLS) fit a byte.
pub const MAX_POOLS: u32 = 8;

/// Share buckets per service half. Shares are whole percents; the
/// userspace share table draws each bucket's pool independently, so a
/// pool's part of the buckets has a binomial spread of at most 0.39 points
/// around its share (√(0.25 / 16384)).
pub const SHARE_BUCKETS: u32 = 16384;

/// Buckets per `ShareSlots` value.
pub const SLOTS_PER_ENTRY: u32 = 8;

/// Fallback steps followed from a client's pool; config refuses longer chains.
pub const MAX_FALLBACK_DEPTH: u32 = 3;

/// `Pool::fallback`: no fallback pool.
pub const NO_POOL: u32 = u32::MAX;

/// Segments across all services (`SEGMENTS` capacity).
pub const MAX_SEGMENTS: u32 = 4096;

/// `Pool::flags`: every backend is saturated, unhealthy or drained; new
/// connections go to the fallback pool, if any has room.
pub const POOL_NO_ROOM: u32 = 1;
/// `Pool::flags`: no backend has weight above 0; the pool cannot take a
/// connection at all, even when no pool in its chain has room.
pub const POOL_EMPTY: u32 = 2;

#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The share bucket of a client address (as loaded natively from its
/// network-order bytes) under the flow hash's secret `key`: the address
/// alone, not the ports, so every connection of a client lands in the same
/// bucket. Keyed so that a client cannot pick its pool by picking its
/// address from a precomputed list.
#[inline(always)]
pub fn client_bucket(key: [u32; 2], src_addr: u32) -> u32 {
    let h = fmix32(src_addr ^ key[0]).wrapping_add(key[1]);
    fmix32(h ^ 0x2545_f491) & (SHARE_BUCKETS - 1)
}

/// Index of the `SHARES` entry holding `bucket` of service `service_id`'s
/// half `half`, and the byte within it.
#[inline(always)]
pub fn share_slot(service_id: u32, half: u32, bucket: u32) -> (u32, usize) {
    let per_half = SHARE_BUCKETS / SLOTS_PER_ENTRY;
    let entry = (service_id * 2 + (half & 1)) * per_half + bucket / SLOTS_PER_ENTRY;
    (entry, (bucket % SLOTS_PER_ENTRY) as usize)
}

/// Index of the `SPILLS` counter of connections that pool `from` of
/// service `service_id` handed to pool `to`.
#[inline(always)]
pub fn spill_index(service_id: u32, from: u32, to: u32) -> u32 {
    (service_id * MAX_POOLS + (from & (MAX_POOLS - 1))) * MAX_POOLS + (to & (MAX_POOLS - 1))
}

const _: () = assert!(SHARE_BUCKETS.is_power_of_two());
const _: () = assert!(MAX_POOLS.is_power_of_two());
const _: () = assert!(SHARE_BUCKETS.is_multiple_of(SLOTS_PER_ENTRY));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_spread_evenly_and_ignore_nothing_of_the_address() {
        // 1 Mi consecutive addresses (a /12 of clients) over 16,384 buckets:
        // 64 each on average, σ = 8 for a uniform hash; every bucket within
        // 5σ.
        let mut counts = [0u32; SHARE_BUCKETS as usize];
        for a in 0..(1u32 << 20) {
            counts[client_bucket([7, 9], (198 << 24) | (16 << 16) | a) as usize] += 1;
        }
        let (min, max) = (
            counts.iter().min().copied().unwrap_or(0),
            counts.iter().max().copied().unwrap_or(0),
        );
        assert!(min >= 24 && max <= 104, "bucket fill {min}..{max}");
        // The key matters: another key moves most addresses.
        let moved = (0..1000u32)
            .filter(|a| client_bucket([7, 9], *a) != client_bucket([8, 9], *a))
            .count();
        assert!(moved > 990, "{moved} of 1000 moved");
    }

    #[test]
    fn slots_and_spills_do_not_overlap() {
        assert_eq!(share_slot(0, 0, 0), (0, 0));
        assert_eq!(share_slot(0, 0, 9), (1, 1));
        assert_eq!(share_slot(0, 1, 0), (SHARE_BUCKETS / SLOTS_PER_ENTRY, 0));
        assert_eq!(
            share_slot(1, 0, 0),
            (2 * SHARE_BUCKETS / SLOTS_PER_ENTRY, 0)
        );
        assert_eq!(spill_index(0, 1, 2), 10);
        assert_eq!(spill_index(1, 0, 0), MAX_POOLS * MAX_POOLS);
    }
}
