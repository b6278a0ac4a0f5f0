//! Direct server return: what the XDP program needs to encapsulate a
//! client's packet to a backend, which answers the client itself.
//!
//! A DSR service's packets never come back through the LB, so a flow has
//! one entry (`DSR_FLOWS`, keyed by the client's `ConnKey`) and no reply
//! entry, SNAT port or latency stamps. The entry pins the flow to its
//! backend across weight changes; while weights are unchanged a lost entry
//! (another LB node, an eviction) re-hashes to the same backend through
//! Maglev, which is what lets several nodes share flows without state.

/// `Service::forwarding`: translate and answer through the LB (NAT).
pub const FORWARD_NAT: u32 = 0;
/// `Service::forwarding`: DSR, IPv4-in-IPv4 (IP protocol 4).
pub const FORWARD_IPIP: u32 = 1;
/// `Service::forwarding`: DSR, GUE variant 1 (the inner IPv4 packet right
/// after a UDP header to `Service::gue_port`).
pub const FORWARD_GUE: u32 = 2;

/// IP protocol number of IPv4-in-IPv4.
pub const PROTO_IPIP: u8 = 4;
/// Bytes an outer IPv4 header adds.
pub const IPIP_OVERHEAD: u16 = 20;
/// Bytes an outer IPv4 and UDP header add (GUE variant 1 has no header of its own).
pub const GUE_OVERHEAD: u16 = 28;

impl DsrFlow {
    /// The bytes this flow's encapsulation adds.
    #[inline(always)]
    pub fn overhead(&self) -> u16 {
        if self.gue_dport != 0 {
            GUE_OVERHEAD
        } else {
            IPIP_OVERHEAD
        }
    }
}
/// The GUE port when a service names none (Katran's and the Linux fou
/// examples' choice).
pub const DEFAULT_GUE_PORT: u16 = 6080;
/// TTL of the outer header: the tunnel is its own path, whatever the
/// client's packet has left.
pub const OUTER_TTL: u8 = 64;

/// `DsrFlow::flags`: the client sent a FIN or RST; the closing timeout applies.
pub const DSR_CLOSING: u32 = 1;

/// The bytes encapsulation `forwarding` adds; 0 for NAT.
#[inline(always)]
pub const fn overhead(forwarding: u32) -> u16 {
    match forwarding {
        FORWARD_IPIP => IPIP_OVERHEAD,
        FORWARD_GUE => GUE_OVERHEAD,
        _ => 0,
    }
}

/// A GUE source port from a flow's hash, in 32768..=65535: fixed per flow
/// so its packets stay in order, spread across flows so the backend's NIC
/// hashes them to different queues (RSS).
#[inline(always)]
pub const fn gue_source_port(hash: u32) -> u16 {
    0x8000 | (hash as u16 ^ (hash >> 16) as u16)
}

/// `DSR_FLOWS` value: where a DSR flow goes and how it gets there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DsrFlow {
    /// Outer destination: the backend's address, network order.
    pub backend_addr: u32,
    /// Outer source: the address the host routes from toward the backend
    /// (the FIB's preferred source), network order.
    pub outer_src: u32,
    pub backend_id: u32,
    pub service_id: u32,
    /// Cached next hop toward the backend, valid while `fib_gen` equals
    /// the live `FIB_GEN`.
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub ifindex: u32,
    /// 0: no cached next hop.
    pub fib_gen: u32,
    /// The route's MTU toward the backend, as the FIB reported it; an
    /// encapsulated packet longer than this is answered with ICMP.
    pub mtu: u32,
    /// `DSR_CLOSING`.
    pub flags: u32,
    /// GUE source port, network order; 0 for IPIP.
    pub gue_sport: u16,
    /// GUE destination port, network order; 0: the flow is IPIP.
    pub gue_dport: u16,
    /// `bpf_ktime_get_coarse_ns` of the last refresh (at most once a second).
    pub last_seen_ns: u64,
    /// To 64 bytes, the size the program zeroes a stack slot in one go.
    pub _pad: u64,
}

impl DsrFlow {
    #[inline(always)]
    pub fn is_closing(&self) -> bool {
        self.flags & DSR_CLOSING != 0
    }
}

/// Counter indices of the decap program's per-CPU `DECAP_STATS`.
pub const DECAP_PACKETS: u32 = 0;
/// Outer headers to one of the interface's addresses that were not a
/// packet the program strips (an inner packet that is not IPv4, a GUE
/// packet cut short): passed as they are.
pub const DECAP_PASSED: u32 = 1;
pub const DECAP_STATS_COUNT: u32 = 2;

#[cfg(feature = "user")]
// SAFETY: repr(C), padded explicitly, and every bit pattern is a valid value.
unsafe impl aya::Pod for DsrFlow {}

const _: () = {
    assert!(core::mem::size_of::<DsrFlow>() == 64);
    assert!(core::mem::offset_of!(DsrFlow, last_seen_ns) == 48);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gue_source_ports_stay_in_the_upper_half_and_follow_the_hash() {
        for h in [0u32, 1, 0xffff, 0x1234_5678, u32::MAX] {
            assert!(gue_source_port(h) >= 0x8000);
        }
        assert_ne!(gue_source_port(0x0001_0000), gue_source_port(0x0002_0000));
        assert_eq!(overhead(FORWARD_NAT), 0);
        assert_eq!(overhead(FORWARD_IPIP), 20);
        assert_eq!(overhead(FORWARD_GUE), 28);
    }
}
