//! How a new flow picks its backend, shared by the XDP program and the
//! userspace reference model so both make the same choice bit for bit.
//!
//! - `SELECT_MAGLEV`: the flow hash indexes the service's weighted Maglev
//!   table. Consistent: every node with the same weights maps a flow to the
//!   same backend, with no shared state.
//! - `SELECT_LEAST_LOADED`: among the backends with room (fewer flows in
//!   flight than their `max_in_flight`, where one is set), the one with the
//!   smallest `(in_flight + 1) / weight` (IPVS `sed`, Envoy's weighted least
//!   request), where `weight` is the backend's capacity and `in_flight` its
//!   live flows counted by the datapath at this instant. When none has room,
//!   the smallest score among all. An inference engine batches up to a fixed
//!   number of requests and queues the rest, so a request sent to a full
//!   replica waits while another may have a free batch slot: room decides
//!   first, exactly and at the moment of the pick. Services of up to
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

/// One backend as a pick sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Candidate {
    pub in_flight: u64,
    pub weight: u32,
    /// 0: no limit.
    pub max_in_flight: u32,
}

impl Candidate {
    #[inline(always)]
    pub fn has_room(&self) -> bool {
        self.max_in_flight == 0 || self.in_flight < self.max_in_flight as u64
    }
}

/// A candidate's place in the pick's order, lower first: every backend with
/// room before every backend without, each by `(in_flight + 1) / weight` as
/// a 32.32 fixed-point quotient; weight 0 last of all. One number per
/// candidate keeps the pick to one comparison: comparing the parts one by
/// one multiplied the verifier's paths through the program sevenfold.
#[inline(always)]
pub fn rank(c: &Candidate) -> u64 {
    if c.weight == 0 {
        return u64::MAX;
    }
    // (2^31 − 1) · 2^32 < 2^63: the quotient never reaches the room bit.
    const CAP: u64 = (1 << 31) - 2;
    let n = if c.in_flight < CAP { c.in_flight } else { CAP };
    let quotient = ((n + 1) << 32) / c.weight as u64;
    let full = if c.has_room() { 0 } else { 1u64 << 63 };
    quotient | full
}

/// Whether `a` is a strictly better pick than `b` (see `rank`).
#[inline(always)]
pub fn better(a: &Candidate, b: &Candidate) -> bool {
    rank(a) < rank(b)
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

    fn c(in_flight: u64, weight: u32, max_in_flight: u32) -> Candidate {
        Candidate {
            in_flight,
            weight,
            max_in_flight,
        }
    }

    #[test]
    fn room_comes_before_the_score() {
        // Full (8 of 8) loses to a slower one with room, whatever the scores.
        assert!(better(&c(3, 40, 8), &c(8, 100, 8)));
        assert!(!better(&c(8, 100, 8), &c(3, 40, 8)));
        // No limit is always room.
        assert!(better(&c(500, 1, 0), &c(8, 100, 8)));
        // Both full: the score decides again.
        assert!(better(&c(9, 100, 8), &c(8, 40, 8)));
        // Weight 0 never wins, room or not.
        assert!(!better(&c(0, 0, 0), &c(9, 1, 8)));
    }

    #[test]
    fn rank_orders_as_the_exact_comparison_for_serving_sizes() {
        // Every pair of small counts and weights up to 1000: the fixed-point
        // rank agrees with the exact cross-multiplied comparison.
        for (na, wa, nb, wb) in [
            (0, 1, 0, 2),
            (3, 100, 1, 40),
            (7, 333, 2, 97),
            (15, 1000, 14, 999),
        ] {
            let (a, b) = (c(na, wa, 0), c(nb, wb, 0));
            assert_eq!(better(&a, &b), less_loaded(na, wa, nb, wb), "{a:?} {b:?}");
            assert_eq!(better(&b, &a), less_loaded(nb, wb, na, wa), "{b:?} {a:?}");
        }
        for na in 0..20u64 {
            for nb in 0..20u64 {
                for (wa, wb) in [(100, 40), (100, 100), (97, 13), (1000, 1)] {
                    assert_eq!(
                        better(&c(na, wa, 0), &c(nb, wb, 0)),
                        less_loaded(na, wa, nb, wb),
                        "{na}/{wa} against {nb}/{wb}"
                    );
                }
            }
        }
    }

    #[test]
    fn huge_counts_do_not_overflow() {
        assert!(less_loaded(u64::MAX, u32::MAX, u64::MAX, 1));
        assert!(!less_loaded(u64::MAX, 1, 0, u32::MAX));
        assert!(
            rank(&c(u64::MAX, 1, 0)) < rank(&c(1, 1, 1)),
            "room bit above any quotient"
        );
        assert!(
            rank(&c(u64::MAX, 1, 1)) < u64::MAX,
            "weight 0 after everything"
        );
    }
}
