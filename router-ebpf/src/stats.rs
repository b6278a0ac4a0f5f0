//! Per-CPU counters: no atomics and no shared cache lines on the hot path.

use router_common::{LATENCY_KINDS, TrafficCounters, latency_bucket};

use crate::maps::{BACKEND_STATS, LATENCY, REASONS, SERVICE_STATS};

#[inline(always)]
pub fn reason(index: u32) {
    if let Some(c) = REASONS.get_ptr_mut(index) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn add(c: *mut TrafficCounters, bytes: u64, new_conn: bool, reply: bool) {
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

#[inline(always)]
pub fn traffic(service_id: u32, backend_id: u32, bytes: u64, new_conn: bool, reply: bool) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(service_id) {
        add(c, bytes, new_conn, reply);
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id) {
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
        let h = unsafe { &mut *h };
        if let Some(b) = h.buckets.get_mut(latency_bucket(us)) {
            *b += 1;
        }
        h.sum_us += us as u64;
    }
}
