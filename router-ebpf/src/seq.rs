//! Each direction's TCP sequence space as the LB sees it, so that a packet
//! forged by someone off the path (who may know a flow's 4-tuple but not
//! its sequence numbers) can neither end a flow nor confirm a half-open one
//! (see `router_common::tcp_seq` for the window and its odds).
//!
//! Every direction's entry keeps `seq_next`, the end of its sender's
//! furthest segment. It is written only by packets of that direction,
//! which RSS keeps on one CPU, and only when it moves, so established data
//! costs one store in a cache line the lookup has just read.

use router_common::{
    CONN_HEARD, ConnEntry, PROTO_TCP,
    tcp_seq::{acknowledges, advances, near, segment_end},
};

use crate::{
    classify::Packet,
    flags,
    parse::{L4, TCP_FIN, TCP_SYN},
};

/// The sequence number just past TCP segment `l4`.
#[inline(always)]
pub fn end(l4: &L4) -> u32 {
    segment_end(
        l4.seq,
        l4.payload_len,
        l4.tcp_flags & TCP_SYN != 0,
        l4.tcp_flags & TCP_FIN != 0,
    )
}

/// Records packet `pkt` on its direction's entry `e`, and returns whether
/// the packet may end the flow: true unless it is TCP and its sequence
/// number lies outside the window of what this direction has sent. The
/// first packet heard on an entry sets its sequence, and so does every
/// SYN-ACK on a reply entry: the backend's SYN-ACK starts its sequence
/// space, whatever arrived before it.
#[inline(always)]
pub fn track(e: &mut ConnEntry, pkt: &Packet) -> bool {
    if pkt.l4.proto != PROTO_TCP {
        if !e.is_heard() {
            flags::set(e, CONN_HEARD);
        }
        return true;
    }
    let l4 = &pkt.l4;
    let end = end(l4);
    if !e.is_heard() || (e.is_reply() && l4.is_synack()) {
        e.seq_next = end;
        flags::set(e, CONN_HEARD);
        return true;
    }
    let next = e.seq_next;
    if advances(end, next) {
        e.seq_next = end;
    }
    near(l4.seq, next)
}

/// Whether client packet `pkt` proves its half-open flow real, given the
/// flow's reply entry `reply`: the backend has answered, and a TCP packet
/// acknowledges what the backend sent (for a handshake, exactly the
/// SYN-ACK). A spoofed source never sees the backend's answer, so it
/// cannot name its sequence number; a UDP flow is confirmed by the
/// client's next datagram once the backend has answered.
#[inline(always)]
pub fn confirms(pkt: &Packet, reply: &ConnEntry) -> bool {
    if !reply.is_heard() {
        return false;
    }
    pkt.l4.proto != PROTO_TCP || (pkt.control.ack && acknowledges(pkt.l4.ack_seq, reply.seq_next))
}
