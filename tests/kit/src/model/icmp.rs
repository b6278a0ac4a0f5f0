//! ICMP to one of our addresses (outer header without options, not a
//! fragment): an error about a tracked flow is translated, as Linux IPVS
//! does in NAT mode, and everything else passes.
//!
//! The rules, in the order they are checked:
//!
//! 1. The ICMP header (8 bytes) must be in the frame and in the total
//!    length: otherwise malformed.
//! 2. Only destination unreachable (3) and time exceeded (11) are errors
//!    that are translated; any other type passes (`pass_icmp_other`).
//! 3. An error must quote an IPv4 header and 8 bytes after it, within the
//!    total length, with version 4 and IHL ≥ 5: otherwise malformed.
//! 4. A quote with IP options, a quoted later fragment (offset ≠ 0), a
//!    quoted protocol other than TCP and UDP, or a quote whose source is
//!    not the error's destination is not translated (`pass_icmp_untracked`).
//! 5. The quoted tuple reversed is a flow direction's key, asked of CONNS,
//!    then HALF_OPEN when CONNS has no entry at all. The entry must be live;
//!    a reply entry carries the error, a forward entry only while the
//!    reply entry at its reply key, in the same table, is its own and live.
//!    Otherwise `pass_icmp_untracked`.
//! 6. The entry's translation `to` makes the outer header `to.src →
//!    to.dst` and the quote `to.dst:port → to.src:port`. Checksums are
//!    summed from scratch and carry the input's error (see `nat`): the
//!    outer and quoted IPv4 headers, the quoted UDP checksum (not when 0,
//!    and a computed 0 is all ones), the quoted TCP checksum when the
//!    quote holds its bytes (18 quoted transport bytes), and the ICMP
//!    checksum over the whole message. The quoted transport checksum
//!    covers a whole segment the quote may cut; only its pseudo-header
//!    addresses and ports change, so their words are what is summed.
//! 7. It is forwarded as the flow's packets are: with a TTL of 0 or 1 it
//!    is dropped (`drop_ttl_expired`); it goes to the next hop with the
//!    flow's protocol for the lookup, caching the hop in the entry, one
//!    TTL less when the program sends it (the stack takes its own when it
//!    resolves the neighbour), and counted as the entry's traffic. No
//!    other state changes: no refresh, no closing, no count, no latency,
//!    no sequence.

use router_common::reasons;

use super::{
    Model, Outcome, XDP_DROP, XDP_PASS,
    nat::{Tuple, carried, fold, sum},
    parse::Ip,
    tables::{Table, owned_by, reply_key_of},
};

const ETH: usize = 14;
const IP: usize = 20;
const ICMP: usize = ETH + IP;
const INNER: usize = ICMP + 8;
const INNER_L4: usize = INNER + IP;

fn ne16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn ne32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_ne_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

/// Sum of `len` bytes at `at` with the 16-bit checksum field at `field`
/// (an absolute offset within them) taken as zero.
fn sum_without(b: &[u8], at: usize, len: usize, field: usize) -> u64 {
    sum(&b[at..at + len]) - u64::from(ne16(b, field))
}

/// Rewrites the checksum at `field` of the region `[at, at + len)` of
/// `out`, which summed to `before` (field zero) in the input.
fn recompute(out: &mut [u8], input: &[u8], at: usize, len: usize, field: usize) {
    let before = sum_without(input, at, len, field);
    let after = sum_without(out, at, len, field);
    put16(out, field, carried(ne16(input, field), before, after));
}

/// The words a quoted TCP or UDP checksum covers that translation
/// changes: the pseudo-header's addresses and the ports.
fn quoted_tuple_sum(f: &[u8]) -> u64 {
    sum(&f[INNER + 12..INNER + 20]) + sum(&f[INNER_L4..INNER_L4 + 4])
}

/// Whether the checksums of an ICMP frame that the model reads as an error
/// with a plain quote (no options) are right: the outer IPv4 header, the
/// ICMP message, and the quoted IPv4 header. The quoted transport checksum
/// covers bytes the quote may not hold, so it is not checked here.
pub fn checksums_right(f: &[u8]) -> bool {
    let tot_len = usize::from(u16::from_be_bytes([f[ETH + 2], f[ETH + 3]]));
    let ok = |at: usize, len: usize| !fold(sum(&f[at..at + len])) == 0;
    ok(ETH, IP) && ok(ICMP, tot_len - IP) && ok(INNER, IP)
}

impl Model {
    /// ICMP to one of our addresses.
    pub(super) fn icmp(&mut self, out: Outcome, frame: &[u8], ingress: u32, ip: &Ip) -> Outcome {
        if frame.len() < ICMP + 8 || ip.tot_len < IP + 8 {
            return out.counted(XDP_DROP, reasons::DROP_MALFORMED);
        }
        if !matches!(frame[ICMP], 3 | 11) {
            return out.counted(XDP_PASS, reasons::PASS_ICMP_OTHER);
        }
        if ip.tot_len < IP + 8 + IP + 8 {
            self.trail.push("ICMP error: quote cut short");
            return out.counted(XDP_DROP, reasons::DROP_MALFORMED);
        }
        let (version, ihl) = (frame[INNER] >> 4, frame[INNER] & 0x0f);
        if version != 4 || ihl < 5 {
            self.trail.push("ICMP error: quote not IPv4");
            return out.counted(XDP_DROP, reasons::DROP_MALFORMED);
        }
        let proto = frame[INNER + 9];
        let later_fragment = u16::from_be_bytes([frame[INNER + 6], frame[INNER + 7]]) & 0x1fff != 0;
        if ihl != 5 || later_fragment || (proto != 6 && proto != 17) {
            self.trail
                .push("ICMP error: quote with options, a later fragment, or not TCP/UDP");
            return out.counted(XDP_PASS, reasons::PASS_ICMP_UNTRACKED);
        }
        let quoted = Tuple {
            src_addr: ne32(frame, INNER + 12),
            dst_addr: ne32(frame, INNER + 16),
            src_port: ne16(frame, INNER_L4),
            dst_port: ne16(frame, INNER_L4 + 2),
        };
        if quoted.src_addr != ip.dst {
            self.trail
                .push("ICMP error: addressed elsewhere than its quote's source");
            return out.counted(XDP_PASS, reasons::PASS_ICMP_UNTRACKED);
        }
        // The reversed quote: the key of the direction the error's far end
        // sends on.
        let key = reply_key_of(quoted, proto);
        let Some(table) = [Table::Conns, Table::HalfOpen]
            .into_iter()
            .find(|t| self.tables.map(*t).contains_key(&key))
        else {
            self.trail.push("ICMP error: no entry");
            return out.counted(XDP_PASS, reasons::PASS_ICMP_UNTRACKED);
        };
        let timeouts = self.cfg.timeouts;
        let e = self.tables.map(table)[&key];
        if timeouts.expired(table, &e, proto) {
            self.trail.push("ICMP error: entry expired");
            return out.counted(XDP_PASS, reasons::PASS_ICMP_UNTRACKED);
        }
        if e.is_reply() {
            self.trail
                .push("ICMP error from the backend's side translated");
        } else {
            let own = self
                .tables
                .get(table, &reply_key_of(e.to, proto))
                .is_some_and(|r| owned_by(r, &key) && !timeouts.expired(table, r, proto));
            if !own {
                self.trail
                    .push("ICMP error: forward entry without its own live reply entry");
                return out.counted(XDP_PASS, reasons::PASS_ICMP_UNTRACKED);
            }
            self.trail
                .push("ICMP error from the client's side translated");
        }
        // Forwarded like the flow's packets: one router hop on.
        if ip.ttl <= 1 {
            self.trail.push("ICMP error: TTL expired");
            return out.counted(XDP_DROP, reasons::DROP_TTL_EXPIRED);
        }
        let tot_len = ip.tot_len;
        self.send(
            out,
            frame.len(),
            ingress,
            e,
            Some((table, key)),
            false,
            |hop| translate(frame, tot_len, proto, e.to, hop),
        )
    }
}

/// `frame` (an error with a plain TCP or UDP quote) translated per `to`,
/// its TTL one less when the program sends it on (`hop`).
fn translate(frame: &[u8], tot_len: usize, proto: u8, to: Tuple, hop: bool) -> Vec<u8> {
    let mut out = frame.to_vec();
    if hop {
        out[ETH + 8] = out[ETH + 8].wrapping_sub(1);
    }
    put32(&mut out, ETH + 12, to.src_addr);
    put32(&mut out, ETH + 16, to.dst_addr);
    recompute(&mut out, frame, ETH, IP, ETH + 10);

    put32(&mut out, INNER + 12, to.dst_addr);
    put32(&mut out, INNER + 16, to.src_addr);
    put16(&mut out, INNER_L4, to.dst_port);
    put16(&mut out, INNER_L4 + 2, to.src_port);
    recompute(&mut out, frame, INNER, IP, INNER + 10);

    let quoted = tot_len - IP - 8 - IP;
    let field = match proto {
        17 if ne16(frame, INNER_L4 + 6) != 0 => Some(INNER_L4 + 6),
        6 if quoted >= 18 => Some(INNER_L4 + 16),
        _ => None,
    };
    if let Some(field) = field {
        let mut c = carried(
            ne16(frame, field),
            quoted_tuple_sum(frame),
            quoted_tuple_sum(&out),
        );
        if proto == 17 && c == 0 {
            c = 0xffff;
        }
        put16(&mut out, field, c);
    }

    recompute(&mut out, frame, ICMP, tot_len - IP, ICMP + 2);
    out
}
