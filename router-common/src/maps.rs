//! Map keys and values, and the special values their fields take.
//! Addresses and ports are kept in network byte order exactly as they
//! appear on the wire, so the datapath never swaps bytes.

use crate::{
    flags::{
        CONN_AWAIT_ANY, CONN_AWAIT_REQUEST, CONN_AWAIT_RESPONSE, CONN_AWAIT_SYNACK, CONN_CLOSING,
        CONN_COUNTED, CONN_HEARD, CONN_REPLY,
    },
    latency::LATENCY_BUCKETS,
    limits::MAX_SNAT_ADDRS,
};

/// The layout of every pinned map's keys and values and the meaning of
/// their flags, as one number. A daemon adopts a pinned datapath only if
/// its `LAYOUT` map holds this value: the map sizes it also checks cannot
/// tell a rearranged `ConnEntry` from the old one. Bump it with any change
/// to a struct here, a `CONN_*` or `FILTER_*` bit, or a map's indexing
/// (`layout_fingerprint` in the tests below names what it covers).
///
/// 8: NAT over IPv6 (`NAT6_CONNS`, `SNAT6`, `SNAT_ADDRS6`, `NAT6_SCRATCH`,
/// `NatEntry6`, `Snat6`, `NatScratch6`; `router_nat6` at `TAIL_NAT6`). 7: IPv6 services (`SERVICES6`, `BACKEND_ADDRS6`, `DSR_FLOWS6` and
/// their `v6` types; `DSR_PROG` became `TAIL_CALLS`, with `router_v6`
/// beside `router_dsr`). 6: the `FILTER_DSR_ONLY` bit. 5: DSR (`Service` gained `forwarding` and `gue_port`; the `DSR_FLOWS`
/// map, `DsrFlow`; the `FILTER_DSR` bit). 4: pools (`POOLS`, `SEGMENTS`, `SHARES`, `SPILLS`; `Service` gained
/// `pools`, `share_half` and `segments`). 3: the `NEXT_HOPS` map (`NextHop`) and the `FIB_GEN_PER_FLOW` bit of
/// `FIB_GEN`. 2: `ConnEntry` gained `seq_next` (checksum deltas folded to
/// u16) and `CONN_HEARD`. 1 stands for every datapath pinned before the
/// stamp.
pub const LAYOUT_VERSION: u32 = 8;

/// Set in `FIB_GEN` while the host routes by more than the destination
/// (policy rules, multipath routes): a next hop found for one flow to a
/// backend may then be wrong for another, so every flow looks its own up
/// and `NEXT_HOPS` is not used. The other bits are the generation.
pub const FIB_GEN_PER_FLOW: u32 = 1 << 31;

/// Sentinel in a Maglev slot: the service has no backend with weight > 0.
pub const NO_BACKEND: u32 = u32::MAX;

/// `proto` of `ServiceKey` and `ConnKey`: the IP protocol number.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `SERVICES` key: where a service listens.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// `SERVICES` value. Replaced as a whole by userspace, so `active_table`
/// flips atomically from a packet's point of view (hash-map updates are
/// RCU-swapped elements, never torn).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub id: u32,
    /// Which half of this service's double-buffered Maglev table is live: 0 or 1.
    pub active_table: u32,
    /// SNAT addresses, network order; `snat_count` of them are valid (1..=4).
    pub snat_addrs: [u32; MAX_SNAT_ADDRS],
    pub snat_count: u32,
    /// Probe range for SNAT ports, host order, inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// How a new flow picks its backend: `SELECT_MAGLEV` or
    /// `SELECT_LEAST_LOADED` (see `selection`).
    pub selection: u32,
    /// Backends listed in the live half of `MEMBERS` for this service; 0
    /// makes a least-loaded service draw two choices from its Maglev table
    /// instead of scanning (services larger than `MAX_SCAN_MEMBERS`).
    pub members: u32,
    /// Pools of the service (see `pools`); 0: none, the service's own
    /// table and members place every flow.
    pub pools: u32,
    /// Which half of the service's `SHARES` buckets is live: 0 or 1.
    pub share_half: u32,
    /// Segments (`SEGMENTS` entries) of the service: 0 skips the lookup.
    pub segments: u32,
    /// `FORWARD_NAT`, `FORWARD_IPIP` or `FORWARD_GUE` (see `dsr`).
    pub forwarding: u32,
    /// `FORWARD_GUE`'s UDP destination port, network order.
    pub gue_port: u16,
    pub _pad: u16,
}

/// `POOLS` key: pool `index` (0..MAX_POOLS) of service `service_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub service_id: u32,
    pub index: u32,
}

/// `POOLS` value. Replaced as a whole by userspace (a hash map value is
/// swapped, never torn), so a pool's table flip, member count and flags
/// change together from a packet's point of view.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pool {
    /// The table slot whose `MAGLEV_TABLES` and `MEMBERS` halves hold the
    /// pool's backends, indexed as a service id is.
    pub table: u32,
    /// Live half of the pool's table and members: 0 or 1.
    pub active_table: u32,
    /// As `Service::members`, for the pool's scan list.
    pub members: u32,
    /// Index of the pool that takes this one's new connections while it
    /// has no room; `NO_POOL` for none.
    pub fallback: u32,
    /// `POOL_NO_ROOM`, `POOL_EMPTY`.
    pub flags: u32,
    pub _pad: u32,
}

/// `SEGMENTS` key data (after the trie's prefix length): the service id,
/// big-endian so that its 32 bits are the prefix's first, then the client
/// network in wire order. A segment's prefix length is 32 + its CIDR's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SegmentKey {
    pub service_id_be: u32,
    pub addr: u32,
}

/// `SHARES` value: the pool index of `SLOTS_PER_ENTRY` consecutive share
/// buckets (see `pools::share_slot`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShareSlots {
    pub pools: [u8; 8],
}

/// `BACKENDS` value, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
    pub service_id: u32,
    /// 1 when the slot holds a configured backend.
    pub in_use: u32,
    /// Capacity weight: how much concurrent work the backend takes relative
    /// to its service's others. Read by the two-choices pick, which draws
    /// candidates from the Maglev table and must weigh them; 0 is never picked.
    pub weight: u32,
    /// In-flight flows at which the backend has no room (0: no limit); see
    /// `selection::better`.
    pub max_in_flight: u32,
}

/// `MEMBERS` value: one backend of a service's scan list, with its
/// capacity weight (never 0: backends at weight 0 are left out) and room.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Member {
    pub backend_id: u32,
    pub weight: u32,
    /// As `Backend::max_in_flight`.
    pub max_in_flight: u32,
    pub _pad: u32,
}

/// `BACKEND_LOAD` value, indexed by backend id: cumulative counts of the
/// backend's flows, so `opened - closed` is its in-flight count. Shared by
/// every CPU (not per-CPU: a SYN on any CPU must see every CPU's flows) and
/// only ever changed by atomic adds: the datapath adds on a flow's start
/// and end, the daemon adds corrections for flows that vanished without an
/// end (LRU eviction, expiry) through its memory mapping of the array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendLoad {
    pub opened: u64,
    pub closed: u64,
}

impl BackendLoad {
    /// Flows open now. A count that reads negative (a correction or an end
    /// raced a start) is 0.
    #[inline(always)]
    pub fn in_flight(&self) -> u64 {
        let n = self.opened.wrapping_sub(self.closed);
        if n > i64::MAX as u64 { 0 } else { n }
    }
}

/// `CONNS` key: a flow as seen on the wire in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `CONNS` value: how to rewrite a packet of this flow direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEntry {
    pub new_src_addr: u32,
    pub new_dst_addr: u32,
    pub new_src_port: u16,
    pub new_dst_port: u16,
    /// One's-complement delta for the IPv4 header checksum (addresses
    /// only), folded to 16 bits.
    pub l3_csum_delta: u16,
    /// One's-complement delta for the TCP/UDP checksum (pseudo-header +
    /// ports), folded to 16 bits.
    pub l4_csum_delta: u16,
    /// TCP: the sequence number just past this direction's furthest
    /// segment seen (its sender's `snd_nxt`, as far as the LB can tell),
    /// host order; valid while `CONN_HEARD` is set. What a RST or FIN must
    /// be near to end the flow, and what a client's ACK must acknowledge to
    /// confirm it (see `tcp_seq`). 0 for UDP.
    pub seq_next: u32,
    /// Cached next hop, valid while `fib_gen` equals the live `FIB_GEN`.
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub ifindex: u32,
    /// 0 means no cached next hop.
    pub fib_gen: u32,
    pub backend_id: u32,
    pub service_id: u32,
    pub flags: u32,
    /// Start of the latency being measured (see the `CONN_AWAIT_*` bits), in
    /// microseconds of `bpf_ktime_get_ns`, truncated: a u32 wraps after 71
    /// minutes, and wrapping subtraction is exact for anything shorter.
    pub stamp_us: u32,
    /// `bpf_ktime_get_coarse_ns` of the last refresh (refreshed at most once a second).
    pub last_seen_ns: u64,
}

/// `NEXT_HOPS` value (per CPU, per backend id): the next hop that
/// `bpf_fib_lookup` last found for a backend's address, so a new flow to it
/// needs no FIB lookup of its own. Valid for packets to `addr` while
/// `fib_gen` equals the live `FIB_GEN` and their total length is at most
/// `ok_len`: the lookup also checked the route's MTU, for that length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub ifindex: u32,
    /// The backend address (wire order) the hop was found for: a backend
    /// id reused for another address misses.
    pub addr: u32,
    /// 0: empty.
    pub fib_gen: u32,
    /// The largest IPv4 total length the lookup accepted, host order.
    pub ok_len: u16,
    pub _pad: u16,
}

/// The state `flags` holds, by name. Plain reads: a bit that another CPU
/// changes at the same moment may be seen either way, which every caller
/// allows for (changes that must not be lost go through atomics).
impl ConnEntry {
    /// Translates backend → client replies (else client → backend).
    #[inline(always)]
    pub fn is_reply(&self) -> bool {
        self.flags & CONN_REPLY != 0
    }

    /// A FIN or RST was seen: the short timeout applies.
    #[inline(always)]
    pub fn is_closing(&self) -> bool {
        self.flags & CONN_CLOSING != 0
    }

    /// A forward entry whose flow is in its backend's in-flight count.
    #[inline(always)]
    pub fn is_counted(&self) -> bool {
        self.flags & CONN_COUNTED != 0
    }

    /// Some latency measurement is still open on this entry. Entries done
    /// measuring fail this one test and skip the rest.
    #[inline(always)]
    pub fn awaits_latency(&self) -> bool {
        self.flags & CONN_AWAIT_ANY != 0
    }

    /// A reply entry waiting for the backend's SYN-ACK.
    #[inline(always)]
    pub fn awaits_synack(&self) -> bool {
        self.flags & CONN_AWAIT_SYNACK != 0
    }

    /// A forward entry whose client has sent no payload yet.
    #[inline(always)]
    pub fn awaits_request(&self) -> bool {
        self.flags & CONN_AWAIT_REQUEST != 0
    }

    /// This direction's sender has been heard from; for TCP, `seq_next`
    /// is valid.
    #[inline(always)]
    pub fn is_heard(&self) -> bool {
        self.flags & CONN_HEARD != 0
    }

    /// A reply entry waiting for the backend's first payload.
    #[inline(always)]
    pub fn awaits_response(&self) -> bool {
        self.flags & CONN_AWAIT_RESPONSE != 0
    }
}

/// Per-CPU traffic counters for one service or one backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
    pub new_conns: u64,
    pub reply_packets: u64,
}

/// Per-CPU log2 latency histogram (`LATENCY` value).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatencyHistogram {
    pub buckets: [u64; LATENCY_BUCKETS],
    pub sum_us: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: [0; LATENCY_BUCKETS],
            sum_us: 0,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), padded explicitly, and every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for ConnKey {}
    unsafe impl aya::Pod for ConnEntry {}
    unsafe impl aya::Pod for TrafficCounters {}
    unsafe impl aya::Pod for LatencyHistogram {}
    unsafe impl aya::Pod for Member {}
    unsafe impl aya::Pod for BackendLoad {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for PoolKey {}
    unsafe impl aya::Pod for Pool {}
    unsafe impl aya::Pod for SegmentKey {}
    unsafe impl aya::Pod for ShareSlots {}
}

// Layout is part of the kernel ABI between the two halves: pin it.
const _: () = {
    assert!(core::mem::size_of::<ServiceKey>() == 8);
    assert!(core::mem::size_of::<Service>() == 60);
    assert!(core::mem::size_of::<PoolKey>() == 8);
    assert!(core::mem::size_of::<Pool>() == 24);
    assert!(core::mem::size_of::<SegmentKey>() == 8);
    assert!(core::mem::size_of::<ShareSlots>() == 8);
    assert!(core::mem::size_of::<Backend>() == 24);
    assert!(core::mem::size_of::<Member>() == 16);
    assert!(core::mem::size_of::<BackendLoad>() == 16);
    assert!(core::mem::size_of::<ConnKey>() == 16);
    assert!(core::mem::size_of::<ConnEntry>() == 64);
    assert!(core::mem::offset_of!(ConnEntry, seq_next) == 16);
    assert!(core::mem::offset_of!(ConnEntry, flags) == 48);
    assert!(core::mem::size_of::<TrafficCounters>() == 32);
    assert!(core::mem::size_of::<NextHop>() == 28);
    assert!(core::mem::size_of::<LatencyHistogram>() == 8 * (LATENCY_BUCKETS + 1));
};

/// What `LAYOUT_VERSION` stands for: each map value's and key's size and
/// field offsets, and the flag bits. The test below keeps the two in step.
#[cfg(test)]
mod layout_fingerprint {
    use core::mem::{offset_of, size_of};

    use super::*;
    use crate::flags::*;

    #[test]
    fn layout_version_covers_the_current_layout() {
        let fingerprint = [
            size_of::<ServiceKey>(),
            size_of::<Service>(),
            offset_of!(Service, snat_count),
            offset_of!(Service, selection),
            offset_of!(Service, members),
            offset_of!(Service, pools),
            offset_of!(Service, segments),
            offset_of!(Service, forwarding),
            offset_of!(Service, gue_port),
            size_of::<crate::dsr::DsrFlow>(),
            offset_of!(crate::dsr::DsrFlow, mtu),
            offset_of!(crate::dsr::DsrFlow, gue_sport),
            size_of::<Pool>(),
            offset_of!(Pool, fallback),
            offset_of!(Pool, flags),
            size_of::<SegmentKey>(),
            size_of::<ShareSlots>(),
            size_of::<Backend>(),
            offset_of!(Backend, weight),
            offset_of!(Backend, max_in_flight),
            size_of::<Member>(),
            size_of::<BackendLoad>(),
            size_of::<ConnKey>(),
            size_of::<ConnEntry>(),
            offset_of!(ConnEntry, l3_csum_delta),
            offset_of!(ConnEntry, l4_csum_delta),
            offset_of!(ConnEntry, seq_next),
            offset_of!(ConnEntry, dmac),
            offset_of!(ConnEntry, ifindex),
            offset_of!(ConnEntry, fib_gen),
            offset_of!(ConnEntry, backend_id),
            offset_of!(ConnEntry, flags),
            offset_of!(ConnEntry, stamp_us),
            offset_of!(ConnEntry, last_seen_ns),
            size_of::<TrafficCounters>(),
            size_of::<LatencyHistogram>(),
            size_of::<NextHop>(),
            offset_of!(NextHop, addr),
            offset_of!(NextHop, ok_len),
            FIB_GEN_PER_FLOW as usize,
            (CONN_REPLY
                | CONN_CLOSING
                | CONN_AWAIT_SYNACK
                | CONN_AWAIT_REQUEST
                | CONN_AWAIT_RESPONSE
                | CONN_COUNTED
                | CONN_HEARD) as usize,
            (FILTER_VIP | FILTER_SNAT | FILTER_DSR | FILTER_DSR_ONLY) as usize,
            crate::dsr::DSR_CLOSING as usize,
            (crate::pools::POOL_NO_ROOM | crate::pools::POOL_EMPTY) as usize,
            size_of::<crate::v6::ServiceKey6>(),
            size_of::<crate::v6::ConnKey6>(),
            size_of::<crate::v6::DsrFlow6>(),
            offset_of!(crate::v6::DsrFlow6, mtu),
            offset_of!(crate::v6::DsrFlow6, flow_label),
            crate::v6::TAIL_CALLS as usize,
            size_of::<crate::v6::NatEntry6>(),
            offset_of!(crate::v6::NatEntry6, l4_csum_delta),
            offset_of!(crate::v6::NatEntry6, flags),
            size_of::<crate::v6::Snat6>(),
            size_of::<crate::v6::NatScratch6>(),
        ];
        assert_eq!(
            (LAYOUT_VERSION, fingerprint),
            (
                8,
                [
                    8, 60, 24, 32, 36, 40, 48, 52, 56, 64, 36, 44, 24, 12, 16, 8, 8, 24, 16, 20,
                    16, 16, 16, 64, 12, 14, 16, 20, 32, 36, 40, 48, 52, 56, 32, 232, 28, 16, 24,
                    2147483648, 127, 15, 1, 3, 20, 40, 88, 60, 72, 3, 88, 36, 68, 80, 128
                ]
            ),
            "a pinned map's layout changed: bump LAYOUT_VERSION, say why beside it, \
             and record the new fingerprint here"
        );
    }
}
