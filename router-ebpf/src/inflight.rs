//! In-flight accounting: every backend's live flows, counted where flows
//! start and end, so a SYN on any CPU sees every CPU's flows at the moment
//! it picks (see `select`).
//!
//! A flow is counted when it is created: `CONN_COUNTED` on its forward
//! entry and one more `opened` for its backend. It is uncounted once, when
//! it ends: a RST either way, or a FIN seen from both sides, or a SYN that
//! starts a new connection on its 4-tuple. Whoever clears `CONN_COUNTED`
//! (atomically) adds the `closed`, so two CPUs that see the two FINs at
//! once count one end. Flows that vanish without an end (LRU eviction,
//! expiry, a drain deadline) are the daemon's to reconcile from its table
//! scan: this module must never guess at them.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use router_common::{CONN_COUNTED, ConnEntry, ConnKey};

use crate::{
    conn::{Table, expired, key, owned_by, reply_key},
    flags,
    maps::{BACKEND_LOAD, CONNS, HALF_OPEN},
};

/// A backend's flows open now (0 for an id out of range).
#[inline(always)]
pub fn in_flight(backend_id: u32) -> u64 {
    match BACKEND_LOAD.get(backend_id) {
        Some(l) => l.in_flight(),
        None => 0,
    }
}

/// Counts a new flow on `backend_id`.
#[inline(always)]
pub fn opened(backend_id: u32) {
    if let Some(l) = BACKEND_LOAD.get_ptr_mut(backend_id) {
        // SAFETY: `l` points into the array's value for this id; the
        // counters are only ever changed by atomic adds.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*l).opened, 1) };
    }
}

#[inline(always)]
fn closed(backend_id: u32) {
    if let Some(l) = BACKEND_LOAD.get_ptr_mut(backend_id) {
        // SAFETY: as in `opened`.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*l).closed, 1) };
    }
}

/// Ends the count of the flow whose forward entry is `fwd`, if it is still
/// counted: exactly one caller wins the flag.
#[inline(always)]
pub fn release(fwd: &mut ConnEntry) {
    if fwd.is_reply() || !fwd.is_counted() {
        return;
    }
    if flags::first_to_clear(fwd, CONN_COUNTED) {
        closed(fwd.backend_id);
    }
}

#[inline(always)]
fn find(k: ConnKey) -> Option<(*mut ConnEntry, Table)> {
    match CONNS.get_ptr_mut(k) {
        Some(e) => Some((e, Table::Conns)),
        None => HALF_OPEN.get_ptr_mut(k).map(|e| (e, Table::HalfOpen)),
    }
}

/// A packet with FIN or RST passed entry `e` (at `at`) and marked it
/// closing (or it is a RST): ends the flow if this was its last word. A RST
/// ends it at once; a FIN ends it when the other direction's entry is
/// closing too. `e` was marked with an atomic fetch before this reads the
/// other side, so when both FINs cross on two CPUs at least one of them
/// sees the other's mark. A forward entry that has expired is the scan's
/// (it has uncounted it already, or will): ending it here would count its
/// end twice.
#[inline(always)]
pub fn on_close(at: &ConnKey, e: &mut ConnEntry, rst: bool, now: u64) {
    if !e.is_reply() {
        if !rst {
            let Some((r, _)) = find(reply_key(e, at.proto)) else {
                return;
            };
            // SAFETY: a table value (see `conn`); a recycled element fails
            // `owned_by`.
            let r = unsafe { &*r };
            if !owned_by(r, at) || !r.is_closing() {
                return;
            }
        }
        release(e);
        return;
    }
    // A reply entry: the count is on the forward entry, at the client's key.
    let fkey = key(
        e.new_dst_addr,
        e.new_src_addr,
        e.new_dst_port,
        e.new_src_port,
        at.proto,
    );
    let Some((f, table)) = find(fkey) else {
        return;
    };
    // SAFETY: a table value (see `conn`), checked below to be this flow's
    // before `release` changes it, atomically.
    let f = unsafe { &mut *f };
    // Only this flow's own forward entry: the client's 4-tuple may since
    // have opened a new flow, translated to another backend pair.
    if f.is_reply() || reply_key(f, at.proto) != *at || expired(table, f, now, at.proto) {
        return;
    }
    if rst || f.is_closing() {
        release(f);
    }
}
