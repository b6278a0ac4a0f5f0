//! Hashes that place a value in a bucket of a map. The datapath and
//! userspace must agree on them bit for bit: userspace fills the buckets
//! the datapath reads.

use crate::limits::ADDR_FILTER_SIZE;

/// Bucket of the destination-address pre-filter for an address as read
/// off the wire (network byte order, loaded natively).
#[inline(always)]
pub fn addr_filter_bucket(addr_be: u32) -> u32 {
    let x = addr_be ^ (addr_be >> 16);
    (x ^ (x >> 8)) & (ADDR_FILTER_SIZE - 1)
}
