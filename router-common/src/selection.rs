//! How a new flow picks its backend, shared by the XDP program and the
//! userspace reference model so both make the same choice bit for bit.
//!
//! - `SELECT_MAGLEV`: the flow hash indexes the service's weighted Maglev
//!   table. Consistent: every node with the same weights maps a flow to the
//!   same backend, with no shared state.
//! - `SELECT_LEAST_LOADED`: the backend with the smallest
//!   `(in_flight + 1) / weight` (IPVS `sed`, Envoy's weighted least
//!   request), where `weight` is the backend's capacity and `in_flight` its
//!   live flows counted by the datapath at this instant. Services of up to
//!   `MAX_SCAN_MEMBERS` backends scan them all; larger ones compare two
//!   candidates drawn from the Maglev table (the power of two choices,
//!   drawn in proportion to weight). Only flows that start fresh (a SYN, a
//!   new UDP flow) are placed this way: a TCP flow picked up mid-stream
//!   after losing its entry is re-hashed through Maglev, which finds the
//!   backend it had while the weights are unchanged.

/// `Service::selection`: consistent hashing through the Maglev table.
pub const SELECT_MAGLEV: u32 = 0;
/// `Service::selection`: least in-flight work per unit of capacity.
pub const SELECT_LEAST_LOADED: u32 = 1;

/// Entries per service half in `MEMBERS`: the largest service that can be
/// scanned. The daemon scans services up to its own limit (at most this)
/// and gives larger ones two choices.
pub const MAX_SCAN_MEMBERS: u32 = 64;

/// Whether backend `a` (with `a_in_flight` flows and capacity `a_weight`) is
/// a strictly better pick than backend `b`: `(a + 1) / wa < (b + 1) / wb`,
/// compared as `(a + 1) · wb < (b + 1) · wa`. Counts are capped at 2^32 − 1
/// so no product overflows a u64. A weight of 0 is never better.
#[inline(always)]
pub fn less_loaded(a_in_flight: u64, a_weight: u32, b_in_flight: u64, b_weight: u32) -> bool {
    if a_weight == 0 {
        return false;
    }
    if b_weight == 0 {
        return true;
    }
    let cap = u32::MAX as u64;
    let a = if a_in_flight < cap { a_in_flight } else { cap } + 1;
    let b = if b_in_flight < cap { b_in_flight } else { cap } + 1;
    a * (b_weight as u64) < b * (a_weight as u64)
}

/// Index of a member slot in `MEMBERS`: service `id`'s table half `half`,
/// entry `i`.
#[inline(always)]
pub fn member_index(service_id: u32, half: u32, i: u32) -> u32 {
    (service_id * 2 + (half & 1)) * MAX_SCAN_MEMBERS + i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sed_prefers_the_smaller_expected_delay() {
        // (2+1)/100 = 0.03 < (0+1)/20 = 0.05: the busier but faster one.
        assert!(less_loaded(2, 100, 0, 20));
        assert!(!less_loaded(0, 20, 2, 100));
        // Equal scores are not strictly better either way.
        assert!(!less_loaded(1, 50, 3, 100));
        assert!(!less_loaded(3, 100, 1, 50));
        // Idle beats busy at equal weight.
        assert!(less_loaded(0, 7, 1, 7));
    }

    #[test]
    fn weight_zero_never_wins() {
        assert!(!less_loaded(0, 0, 1_000_000, 1));
        assert!(less_loaded(1_000_000, 1, 0, 0));
        assert!(!less_loaded(0, 0, 0, 0));
    }

    #[test]
    fn huge_counts_do_not_overflow() {
        assert!(less_loaded(u64::MAX, u32::MAX, u64::MAX, 1));
        assert!(!less_loaded(u64::MAX, 1, 0, u32::MAX));
    }
}
