//! TCP sequence arithmetic for the datapath's blind-attack checks: what a
//! segment says about its sender's sequence space, and whether a RST, FIN
//! or ACK lies close enough to what the LB has seen of the flow to be the
//! endpoint's own.
//!
//! The LB sees every segment of both directions, so it knows each sender's
//! `snd_nxt` (`ConnEntry::seq_next`) as well as the sender's peer does. An
//! off-path attacker who knows a flow's 4-tuple but not its sequence
//! numbers must guess a value within `SEQ_WINDOW` either side: one try in
//! 2,048 per forged packet, about the odds Linux itself gave a blind RST
//! inside a 1 MiB receive window before RFC 5961. The window is what a
//! legitimate segment may lag or lead the furthest one seen: retransmits of
//! data not yet acknowledged (at most a send window behind), a RST that
//! overtook data on another queue.
//!
//! Arithmetic is modulo 2^32 (RFC 793), in host order.

/// How far either side of a direction's `seq_next` a RST or FIN may lie,
/// and how far one segment may move it forward.
pub const SEQ_WINDOW: u32 = 1 << 20;

/// The sequence number just past a segment: its payload, and one each for
/// SYN and FIN, which take a sequence number of their own.
#[inline(always)]
pub fn segment_end(seq: u32, payload_len: u16, syn: bool, fin: bool) -> u32 {
    seq.wrapping_add(payload_len as u32)
        .wrapping_add(syn as u32)
        .wrapping_add(fin as u32)
}

/// Whether `seq` lies within `SEQ_WINDOW` of `next`, either side.
#[inline(always)]
pub fn near(seq: u32, next: u32) -> bool {
    seq.wrapping_sub(next).wrapping_add(SEQ_WINDOW) <= 2 * SEQ_WINDOW
}

/// Whether a segment ending at `end` moves its direction's `seq_next`
/// forward: past it, by at most `SEQ_WINDOW` (a blind segment far ahead
/// must not drag the window away from the real flow).
#[inline(always)]
pub fn advances(end: u32, next: u32) -> bool {
    let d = end.wrapping_sub(next);
    d != 0 && d <= SEQ_WINDOW
}

/// Whether acknowledgement number `ack` acknowledges data the other
/// direction has sent: at most its `seq_next` (nothing it has not sent),
/// and no more than `SEQ_WINDOW` behind. A client's ACK that answers the
/// backend's SYN-ACK carries exactly the SYN-ACK's end.
#[inline(always)]
pub fn acknowledges(ack: u32, other_next: u32) -> bool {
    other_next.wrapping_sub(ack) <= SEQ_WINDOW
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_and_fin_take_a_number_each() {
        assert_eq!(segment_end(100, 0, true, false), 101);
        assert_eq!(segment_end(100, 10, false, true), 111);
        assert_eq!(segment_end(u32::MAX, 2, false, false), 1);
    }

    #[test]
    fn near_is_a_window_either_side_across_the_wrap() {
        assert!(near(5, 5));
        assert!(near(5u32.wrapping_sub(SEQ_WINDOW), 5));
        assert!(near(5 + SEQ_WINDOW, 5));
        assert!(!near(5 + SEQ_WINDOW + 1, 5));
        assert!(!near(5u32.wrapping_sub(SEQ_WINDOW + 1), 5));
        assert!(near(3, u32::MAX - 2));
        assert!(!near(0x8000_0000, 0));
    }

    #[test]
    fn only_a_bounded_step_forward_advances() {
        assert!(advances(11, 10));
        assert!(advances(10 + SEQ_WINDOW, 10));
        assert!(!advances(10, 10));
        assert!(!advances(9, 10));
        assert!(!advances(11 + SEQ_WINDOW, 10));
        assert!(advances(2, u32::MAX));
    }

    #[test]
    fn an_ack_must_not_run_ahead_of_what_was_sent() {
        assert!(acknowledges(1001, 1001));
        assert!(acknowledges(1001u32.wrapping_sub(SEQ_WINDOW), 1001));
        assert!(!acknowledges(1002, 1001));
        assert!(!acknowledges(1000u32.wrapping_sub(SEQ_WINDOW), 1001));
        assert!(acknowledges(u32::MAX, 0));
    }
}
