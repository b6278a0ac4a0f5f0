//! Latency measured in the datapath: NAT mode sees both directions of every
//! connection, so the SYN → SYN-ACK gap (connect latency) and the gap from
//! the client's first payload to the backend's first payload (time to first
//! byte, or first token for a streamed completion) are observable here.
//! Entries that are done measuring have no `CONN_AWAIT_*` bit left, and the
//! caller skips this module for them, so established traffic pays one test.

use router_common::{
    CONN_AWAIT_REQUEST, CONN_AWAIT_RESPONSE, CONN_AWAIT_SYNACK, ConnEntry, ConnKey,
    LATENCY_CONNECT, LATENCY_FIRST_BYTE, PROTO_TCP,
};

use crate::{
    clock::Clock,
    conn::{owned_by, reply_key},
    flags,
    maps::{CONNS, HALF_OPEN},
    parse::L4,
    stats,
};

/// Advances the measurement of a TCP flow by one packet of direction `e`
/// (the entry at `key`).
#[inline(always)]
pub fn observe(key: &ConnKey, e: &mut ConnEntry, l4: &L4, clock: &mut Clock) {
    if !e.is_reply() {
        if e.awaits_request() && l4.payload_len > 0 {
            flags::clear(e, CONN_AWAIT_REQUEST);
            // The response is seen on the reply entry, so the stamp goes there.
            // In HALF_OPEN only when CONNS refused the flow's promotion.
            let rkey = reply_key(e, PROTO_TCP);
            let reply = match CONNS.get_ptr_mut(rkey) {
                Some(r) => Some(r),
                None => HALF_OPEN.get_ptr_mut(rkey),
            };
            // Only the flow's own: a half-open flow whose promotion CONNS
            // refused has lost its reply key to a confirmed flow, whose
            // entry must not get this flow's clock.
            // SAFETY: a table value (see `conn`), checked to be this flow's
            // before it is written; its flags change only atomically.
            if let Some(r) = reply
                && owned_by(unsafe { &*r }, key)
            {
                // SAFETY: as above.
                let r = unsafe { &mut *r };
                r.stamp_us = clock.us();
                flags::clear(r, CONN_AWAIT_SYNACK);
                flags::set(r, CONN_AWAIT_RESPONSE);
            }
        }
        return;
    }
    if e.awaits_synack() && l4.is_synack() {
        flags::clear(e, CONN_AWAIT_SYNACK);
        stats::latency(
            e.backend_id,
            LATENCY_CONNECT,
            clock.us().wrapping_sub(e.stamp_us),
        );
    }
    if e.awaits_response() && l4.payload_len > 0 {
        flags::clear(e, CONN_AWAIT_RESPONSE);
        stats::latency(
            e.backend_id,
            LATENCY_FIRST_BYTE,
            clock.us().wrapping_sub(e.stamp_us),
        );
    }
}
