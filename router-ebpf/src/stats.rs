//! Per-CPU counters: no atomics and no shared cache lines on the hot path.

use router_common::TrafficCounters;

use crate::maps::{BACKEND_STATS, REASONS, SERVICE_STATS};

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
