//! Per-CPU counters: no atomics and no shared cache lines on the hot path.

use router_common::{
    ConnEntry, LATENCY_KINDS, TrafficCounters, latency_bucket, reasons::Reason, v6::NatEntry6,
};

use crate::{
    conn::Origin,
    maps::{BACKEND_STATS, LATENCY, REASONS, SERVICE_STATS},
};

#[inline(always)]
pub fn reason(reason: Reason) {
    if let Some(c) = REASONS.get_ptr_mut(reason as u32) {
        // SAFETY: this CPU's slot of a per-CPU array: nothing else writes
        // it while this program runs, and any u64 is a valid count.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn add(c: *mut TrafficCounters, bytes: u64, new_conn: bool, reply: bool) {
    // SAFETY: as in `reason`.
    let c = unsafe { &mut *c };
    c.packets += 1;
    c.bytes += bytes;
    if new_conn {
        c.new_conns += 1;
    }
    if reply {
        c.reply_packets += 1;
    }
}

/// Counts a packet of the flow direction `e` against its service and
/// backend; the packet that created the flow counts a new connection.
#[inline(always)]
pub fn traffic(e: &ConnEntry, bytes: u64, origin: Origin) {
    let (new_conn, reply) = (origin == Origin::NewFlow, e.is_reply());
    if let Some(c) = SERVICE_STATS.get_ptr_mut(e.service_id) {
        add(c, bytes, new_conn, reply);
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(e.backend_id) {
        add(c, bytes, new_conn, reply);
    }
}

/// Counts a DSR packet (`bytes` as sent, encapsulated) against service
/// `service_id` and backend `backend_id`; `new_conn` for a flow's first.
#[inline(always)]
pub fn counted(service_id: u32, backend_id: u32, bytes: u64, new_conn: bool) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(service_id) {
        add(c, bytes, new_conn, false);
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id) {
        add(c, bytes, new_conn, false);
    }
}

/// `traffic` for a packet of IPv6 NAT flow direction `e`.
#[inline(always)]
pub fn counted6(e: &NatEntry6, bytes: u64, new_conn: bool) {
    let reply = e.is_reply();
    if let Some(c) = SERVICE_STATS.get_ptr_mut(e.service_id) {
        add(c, bytes, new_conn, reply);
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(e.backend_id) {
        add(c, bytes, new_conn, reply);
    }
}

/// Records one latency sample of `kind` for a backend. Runs at most three
/// times per connection, never on the established fast path.
#[inline(always)]
pub fn latency(backend_id: u32, kind: u32, us: u32) {
    let Some(index) = backend_id
        .checked_mul(LATENCY_KINDS)
        .and_then(|i| i.checked_add(kind))
    else {
        return;
    };
    if let Some(h) = LATENCY.get_ptr_mut(index) {
        // SAFETY: as in `reason`.
        let h = unsafe { &mut *h };
        if let Some(b) = h.buckets.get_mut(latency_bucket(us)) {
            *b += 1;
        }
        h.sum_us += us as u64;
    }
}
