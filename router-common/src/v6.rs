//! IPv6 services' map keys and values. A DSR service (see `dsr`) is
//! `router_v6`'s: it encapsulates the client's packet to the backend in an
//! outer IPv6 header (IPv6-in-IPv6, or GUE over UDP), and the backend
//! answers the client itself. A NAT service is `router_nat6`'s, which
//! translates both directions as `router` does for IPv4 (`NatEntry6` in
//! `NAT6_CONNS`, SNAT to the service's `Snat6` addresses). Addresses are kept as
//! four words loaded natively from the 16 wire bytes, as IPv4 addresses
//! are kept as one, so the datapath never swaps bytes.

/// Index in `TAIL_CALLS` of `router_dsr`, the IPv4 DSR program.
pub const TAIL_DSR: u32 = 0;
/// Index in `TAIL_CALLS` of `router_v6`, which takes every IPv6 frame.
pub const TAIL_V6: u32 = 1;
/// Index in `TAIL_CALLS` of `router_nat6`, which `router_v6` hands IPv6
/// NAT services' packets and their replies.
pub const TAIL_NAT6: u32 = 2;
/// Entries of `TAIL_CALLS`.
pub const TAIL_CALLS: u32 = 3;

/// Next-header number of IPv6 encapsulated in IPv6 (RFC 2473).
pub const PROTO_IPV6: u8 = 41;
/// Next-header number of ICMPv6: never balanced (Neighbor Discovery,
/// echo and errors go to the host's stack).
pub const PROTO_ICMPV6: u8 = 58;
/// Bytes an outer IPv6 header adds.
pub const IP6IP6_OVERHEAD: u16 = 40;
/// Bytes an outer IPv6 and UDP header add (GUE variant 1).
pub const GUE6_OVERHEAD: u16 = 48;
/// Extension headers `router_v6` walks past (hop-by-hop, routing and
/// destination options) before it finds the transport header; a packet
/// with more passes to the host.
pub const MAX_EXT_HEADERS: u32 = 4;
/// IPv6's minimum link MTU (RFC 8200): the least a path may carry.
pub const IPV6_MIN_MTU: u32 = 1280;

/// An IPv6 address: the 16 wire bytes as four words loaded natively.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr6 {
    pub words: [u32; 4],
}

impl Addr6 {
    /// From the address's 16 bytes in wire order.
    #[inline(always)]
    pub const fn from_octets(b: [u8; 16]) -> Self {
        let mut words = [0u32; 4];
        let mut i = 0;
        while i < 4 {
            words[i] = u32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
            i += 1;
        }
        Addr6 { words }
    }

    /// The 16 bytes in wire order.
    #[inline(always)]
    pub const fn octets(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let w = self.words[i].to_ne_bytes();
            b[i * 4] = w[0];
            b[i * 4 + 1] = w[1];
            b[i * 4 + 2] = w[2];
            b[i * 4 + 3] = w[3];
            i += 1;
        }
        b
    }
}

/// `SERVICES6` key: where an IPv6 service listens.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey6 {
    pub addr: Addr6,
    /// Network order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// `DSR_FLOWS6` key: a client's flow to an IPv6 service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey6 {
    pub src_addr: Addr6,
    pub dst_addr: Addr6,
    /// Network order.
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `DSR_FLOWS6` value: where an IPv6 DSR flow goes and how it gets there
/// (the IPv6 twin of `dsr::DsrFlow`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DsrFlow6 {
    /// Outer destination: the backend's address.
    pub backend_addr: Addr6,
    /// Outer source: the address the host routes from toward the backend
    /// (the FIB's preferred source).
    pub outer_src: Addr6,
    pub backend_id: u32,
    pub service_id: u32,
    /// Cached next hop toward the backend, valid while `fib_gen` equals
    /// the live `FIB_GEN`.
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub ifindex: u32,
    /// 0: no cached next hop.
    pub fib_gen: u32,
    /// The route's MTU toward the backend, as the FIB reported it.
    pub mtu: u32,
    /// `dsr::DSR_CLOSING`.
    pub flags: u32,
    /// GUE source port, network order; 0 for IPv6-in-IPv6.
    pub gue_sport: u16,
    /// GUE destination port, network order; 0: the flow is IPv6-in-IPv6.
    pub gue_dport: u16,
    /// The outer header's flow label (20 bits, host order), from the flow
    /// hash: routers and the backend's NIC spread tunnelled flows by it
    /// (RFC 6438) as they would the flows themselves.
    pub flow_label: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns` of the last refresh (at most once a second).
    pub last_seen_ns: u64,
}

impl DsrFlow6 {
    /// The bytes this flow's encapsulation adds.
    #[inline(always)]
    pub fn overhead(&self) -> u16 {
        if self.gue_dport != 0 {
            GUE6_OVERHEAD
        } else {
            IP6IP6_OVERHEAD
        }
    }

    #[inline(always)]
    pub fn is_closing(&self) -> bool {
        self.flags & crate::dsr::DSR_CLOSING != 0
    }
}

/// `NAT6_CONNS` value: one direction of an IPv6 NAT flow, keyed by the
/// packet as it arrives (client → VIP forward, backend → SNAT address
/// reply) and telling what it leaves as. IPv6 has no header checksum:
/// the one delta is the transport checksum's, over the pseudo-header's
/// addresses and the ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry6 {
    pub new_src: Addr6,
    pub new_dst: Addr6,
    /// Network order.
    pub new_src_port: u16,
    pub new_dst_port: u16,
    /// One's-complement delta for the TCP/UDP checksum, folded to 16 bits.
    pub l4_csum_delta: u16,
    pub _pad0: u16,
    /// Cached next hop, valid while `fib_gen` equals the live `FIB_GEN`.
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub ifindex: u32,
    /// 0: no cached next hop.
    pub fib_gen: u32,
    pub backend_id: u32,
    pub service_id: u32,
    /// `CONN_REPLY`, `CONN_CLOSING` (see `flags`).
    pub flags: u32,
    pub _pad1: [u32; 2],
    /// `bpf_ktime_get_coarse_ns` of the last refresh (at most once a second).
    pub last_seen_ns: u64,
}

impl NatEntry6 {
    #[inline(always)]
    pub fn is_reply(&self) -> bool {
        self.flags & crate::flags::CONN_REPLY != 0
    }

    #[inline(always)]
    pub fn is_closing(&self) -> bool {
        self.flags & crate::flags::CONN_CLOSING != 0
    }
}

/// `NAT6_SCRATCH` value: where `router_nat6` builds a new flow's entry and
/// reply key, per CPU, off the stack that its functions share (512 bytes).
/// Only the program reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatScratch6 {
    pub entry: NatEntry6,
    pub rkey: ConnKey6,
}

/// `SNAT6` value, by service id: an IPv6 NAT service's SNAT addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snat6 {
    /// `count` of them are valid (1..=`MAX_SNAT_ADDRS`).
    pub addrs: [Addr6; crate::limits::MAX_SNAT_ADDRS],
    pub count: u32,
    pub _pad: [u32; 3],
}

/// The outer flow label of a flow with hash `hash`: 20 bits, never 0 (0
/// means "no label" to the routers that hash on it).
#[inline(always)]
pub const fn flow_label(hash: u32) -> u32 {
    let l = (hash ^ (hash >> 20)) & 0x000f_ffff;
    if l == 0 { 1 } else { l }
}

#[cfg(feature = "user")]
// SAFETY (each): repr(C), padded explicitly, and every bit pattern is a
// valid value.
mod pod {
    unsafe impl aya::Pod for super::Addr6 {}
    unsafe impl aya::Pod for super::ServiceKey6 {}
    unsafe impl aya::Pod for super::ConnKey6 {}
    unsafe impl aya::Pod for super::DsrFlow6 {}
    unsafe impl aya::Pod for super::NatEntry6 {}
    unsafe impl aya::Pod for super::Snat6 {}
    unsafe impl aya::Pod for super::NatScratch6 {}
}

const _: () = {
    assert!(core::mem::size_of::<Addr6>() == 16);
    assert!(core::mem::size_of::<ServiceKey6>() == 20);
    assert!(core::mem::size_of::<ConnKey6>() == 40);
    assert!(core::mem::size_of::<DsrFlow6>() == 88);
    assert!(core::mem::offset_of!(DsrFlow6, last_seen_ns) == 80);
    assert!(core::mem::size_of::<NatEntry6>() == 88);
    assert!(core::mem::offset_of!(NatEntry6, last_seen_ns) == 80);
    assert!(core::mem::size_of::<Snat6>() == 80);
    assert!(core::mem::size_of::<NatScratch6>() == 128);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_in_wire_order() {
        let b = [
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xab, 0xcd,
        ];
        let a = Addr6::from_octets(b);
        assert_eq!(a.octets(), b);
        assert_eq!(a.words[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
    }

    #[test]
    fn flow_labels_are_twenty_bits_and_never_zero() {
        for h in [0u32, 1, 0xfffff, 0x10_0000, 0x1234_5678, u32::MAX] {
            let l = flow_label(h);
            assert!(l != 0 && l <= 0xfffff, "{h:#x} -> {l:#x}");
        }
        assert_ne!(flow_label(0x1234_5678), flow_label(0x1234_5679));
    }
}
