//! Picking a new flow's backend: the service's Maglev table, or the least
//! loaded of its backends by in-flight count per unit of capacity (see
//! `router_common::selection`). Reads maps only; never writes.

use router_common::{
    NO_BACKEND, Service,
    flow_hash::second_choice,
    selection::{Candidate, MAX_SCAN_MEMBERS, SELECT_LEAST_LOADED, member_index, rank},
};

use aya_ebpf::{cty::c_void, helpers::generated::bpf_loop};

use crate::{
    inflight::in_flight,
    maps::{BACKENDS, MAGLEV_TABLES, MEMBERS, TABLE_SIZE},
};

/// The table a flow is placed from: a service's own, or its pool's (see
/// `pool::placement`), indexed as `MAGLEV_TABLES` and `MEMBERS` are.
#[derive(Clone, Copy)]
pub struct Placement {
    pub table: u32,
    /// The live half: 0 or 1.
    pub half: u32,
    /// Scan-list length; 0 draws two choices from the Maglev table.
    pub members: u32,
}

/// The backend for a new flow of `svc` with flow hash `hash`, from the
/// table `at`. `fresh` is a flow that starts here (a SYN, a UDP flow): only
/// those are placed by load. A TCP flow picked up mid-stream goes through
/// Maglev, which maps it to the backend it had while the weights are
/// unchanged.
#[inline(always)]
pub fn backend(svc: &Service, at: &Placement, hash: u32, fresh: bool) -> u32 {
    if fresh && svc.selection == SELECT_LEAST_LOADED {
        if at.members > 0 {
            return scan(at, hash);
        }
        return two_choices(at, hash);
    }
    maglev(at, hash)
}

/// The backend id in the live Maglev table half at `hash`'s slot.
#[inline(always)]
fn maglev(at: &Placement, hash: u32) -> u32 {
    // checked_rem: a plain `%` would keep a divide-by-zero panic path, which
    // the verifier rejects; the loader guarantees a non-zero size anyway.
    let size = TABLE_SIZE.load();
    let Some(slot) = hash.checked_rem(size) else {
        return NO_BACKEND;
    };
    let idx = (at.table * 2 + (at.half & 1)) * size + slot;
    match MAGLEV_TABLES.get(idx) {
        Some(id) => *id,
        None => NO_BACKEND,
    }
}

/// What the scan carries from member to member (on the caller's stack).
#[repr(C)]
struct Scan {
    table: u32,
    half: u32,
    n: u32,
    start: u32,
    best: u32,
    _pad: u32,
    best_rank: u64,
}

/// Every member compared; ties go to the first in an order that starts at
/// a slot given by the flow hash, so equally loaded backends share new
/// flows instead of the first listed taking them all. The members are
/// walked with `bpf_loop`: its body is verified once, where an unrolled or
/// bounded loop would be verified once per member and path, past the
/// verifier's budget for the whole program.
#[inline(always)]
fn scan(at: &Placement, hash: u32) -> u32 {
    let n = if at.members < MAX_SCAN_MEMBERS {
        at.members
    } else {
        MAX_SCAN_MEMBERS
    };
    let Some(start) = hash.checked_rem(n) else {
        return NO_BACKEND;
    };
    let mut st = Scan {
        table: at.table,
        half: at.half,
        n,
        start,
        best: NO_BACKEND,
        _pad: 0,
        best_rank: u64::MAX,
    };
    // SAFETY: the callback reads and writes only the `Scan` it is handed,
    // which lives on this stack frame until bpf_loop returns.
    unsafe {
        bpf_loop(
            n,
            scan_member as *mut c_void,
            (&raw mut st).cast::<c_void>(),
            0,
        )
    };
    st.best
}

/// One member of a `scan`: `bpf_loop`'s callback (0: go on, 1: stop).
#[inline(never)]
extern "C" fn scan_member(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Scan` that `scan` passed to bpf_loop.
    let st = unsafe { &mut *ctx.cast::<Scan>() };
    let i = i as u32;
    if i >= st.n {
        return 1;
    }
    let mut j = st.start + i;
    if j >= st.n {
        j -= st.n;
    }
    let Some(m) = MEMBERS.get(member_index(st.table, st.half, j)) else {
        return 0;
    };
    if m.weight == 0 {
        return 0;
    }
    let this = rank(&Candidate {
        in_flight: in_flight(m.backend_id),
        weight: m.weight,
        max_in_flight: m.max_in_flight,
    });
    if st.best == NO_BACKEND || this < st.best_rank {
        st.best = m.backend_id;
        st.best_rank = this;
    }
    0
}

#[inline(always)]
fn candidate(backend_id: u32) -> Candidate {
    match BACKENDS.get(backend_id) {
        Some(b) if b.in_use != 0 => Candidate {
            in_flight: in_flight(backend_id),
            weight: b.weight,
            max_in_flight: b.max_in_flight,
        },
        _ => Candidate::default(),
    }
}

/// Two candidates drawn from the Maglev table (so in proportion to
/// weight), by two independent hashes; the better (room, then score) wins,
/// the first on a tie. A backend whose weight has just gone to 0 can still
/// sit in a table half until the flip: it is never picked.
#[inline(always)]
fn two_choices(at: &Placement, hash: u32) -> u32 {
    let a = maglev(at, hash);
    let b = maglev(at, second_choice(hash));
    let (ra, rb) = (rank(&candidate(a)), rank(&candidate(b)));
    let (pick, r) = if b != NO_BACKEND && b != a && rb < ra {
        (b, rb)
    } else {
        (a, ra)
    };
    // Weight 0 (or no backend at all) ranks u64::MAX.
    if r == u64::MAX { NO_BACKEND } else { pick }
}
