//! Map keys and values. Addresses and ports are kept in network byte order
//! exactly as they appear on the wire, so the datapath never swaps bytes.

/// Sentinel in a Maglev slot: the service has no backend with weight > 0.
pub const NO_BACKEND: u32 = u32::MAX;
/// Default Maglev table size per service (prime; ≥ 100 × backends for ≤ 655 backends).
pub const DEFAULT_TABLE_SIZE: u32 = 65537;
/// Upper bound on services; each owns two table halves in `MAGLEV_TABLES`.
pub const MAX_SERVICES: u32 = 64;
/// Upper bound on backends across all services (ids index `BACKENDS` and stats).
pub const MAX_BACKENDS: u32 = 4096;
/// Default connection-table capacity (both directions count as one entry each).
pub const DEFAULT_CONN_TABLE_SIZE: u32 = 262_144;
/// Least capacity of the half-open table. Under a SYN flood it must hold a
/// real handshake for one round trip to the backend while the flood churns
/// it: 65 536 entries (32 768 flows, about 8 MiB) hold one for 3 ms at
/// 10 million spoofed SYNs a second spread over the CPUs, and for a good
/// part of a second at the rates a small host is flooded with. A half-open
/// flow never keeps a new SYN from its backend 4-tuple (the newest SYN takes
/// it), so a large table cannot exhaust SNAT ports.
pub const MIN_HALF_OPEN_TABLE_SIZE: u32 = 65_536;

/// Capacity of the half-open table (`HALF_OPEN`: flows opened by a SYN whose
/// client has not answered yet) next to a connection table of
/// `conn_table_size`: a quarter of it, at least [`MIN_HALF_OPEN_TABLE_SIZE`].
pub const fn half_open_table_size(conn_table_size: u32) -> u32 {
    let quarter = conn_table_size / 4;
    if quarter < MIN_HALF_OPEN_TABLE_SIZE {
        MIN_HALF_OPEN_TABLE_SIZE
    } else {
        quarter
    }
}
/// Capacity of `SNAT_ADDRS`, the exact set of SNAT addresses.
pub const MAX_SNAT_ADDRS_TOTAL: u32 = MAX_SERVICES * MAX_SNAT_ADDRS as u32;
/// Number of buckets in the destination-address pre-filter.
pub const ADDR_FILTER_SIZE: u32 = 4096;
/// Maximum SNAT addresses per service.
pub const MAX_SNAT_ADDRS: usize = 4;
/// SNAT probes after the client's own port is found taken.
pub const SNAT_PROBES: u32 = 8;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `ADDR_FILTER` bit: some service listens on an address in this bucket.
pub const FILTER_VIP: u32 = 1;
/// `ADDR_FILTER` bit: some service translates to a SNAT address in this bucket.
pub const FILTER_SNAT: u32 = 2;

/// Bucket of the destination-address pre-filter for an address as read
/// off the wire (network byte order, loaded natively).
#[inline(always)]
pub fn addr_filter_bucket(addr_be: u32) -> u32 {
    let x = addr_be ^ (addr_be >> 16);
    (x ^ (x >> 8)) & (ADDR_FILTER_SIZE - 1)
}

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
    pub _pad2: u32,
}

/// `MEMBERS` value: one backend of a service's scan list, with its
/// capacity weight (never 0: backends at weight 0 are left out).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Member {
    pub backend_id: u32,
    pub weight: u32,
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

/// `ConnEntry::flags` bit: this entry translates backend → client replies.
pub const CONN_REPLY: u32 = 1;
/// `ConnEntry::flags` bit: a FIN or RST was seen; the short timeout applies.
pub const CONN_CLOSING: u32 = 2;
/// `ConnEntry::flags` bit on a reply entry: the SYN was forwarded at
/// `stamp_us` and the backend's SYN-ACK has not been seen yet.
pub const CONN_AWAIT_SYNACK: u32 = 4;
/// `ConnEntry::flags` bit on a forward entry: the client has sent no payload yet.
pub const CONN_AWAIT_REQUEST: u32 = 8;
/// `ConnEntry::flags` bit on a reply entry: the client's first payload was
/// forwarded at `stamp_us` and the backend has sent no payload yet.
pub const CONN_AWAIT_RESPONSE: u32 = 16;
/// `ConnEntry::flags` bit on a forward entry: the flow is counted in its
/// backend's in-flight count (`BACKEND_LOAD`). Cleared atomically by
/// whoever ends the flow, so an end is counted once.
pub const CONN_COUNTED: u32 = 32;
/// Every latency-measurement bit: one test keeps established flows that are
/// done measuring on the shortest path.
pub const CONN_AWAIT_ANY: u32 = CONN_AWAIT_SYNACK | CONN_AWAIT_REQUEST | CONN_AWAIT_RESPONSE;

/// `CONNS` value: how to rewrite a packet of this flow direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEntry {
    pub new_src_addr: u32,
    pub new_dst_addr: u32,
    pub new_src_port: u16,
    pub new_dst_port: u16,
    /// One's-complement delta for the IPv4 header checksum (addresses only).
    pub l3_csum_delta: u32,
    /// One's-complement delta for the TCP/UDP checksum (pseudo-header + ports).
    pub l4_csum_delta: u32,
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

/// Per-CPU traffic counters for one service or one backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
    pub new_conns: u64,
    pub reply_packets: u64,
}

/// Buckets of a latency histogram. Bucket `b` counts latencies of `b`
/// significant bits in microseconds: bucket 0 is 0 µs, bucket `b` holds
/// `[2^(b-1), 2^b)` µs, and the last bucket also takes everything above
/// (2^26 µs ≈ 67 s), so `le = 2^b µs` is each bucket's Prometheus bound.
pub const LATENCY_BUCKETS: usize = 28;
/// `LATENCY` index for a backend: `backend_id * LATENCY_KINDS + kind`.
pub const LATENCY_KINDS: u32 = 2;
/// SYN forwarded → SYN-ACK from the backend: connect latency.
pub const LATENCY_CONNECT: u32 = 0;
/// Client's first payload → backend's first payload: time to first byte
/// (time to first token for a streaming completion).
pub const LATENCY_FIRST_BYTE: u32 = 1;

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

/// The histogram bucket for a latency in microseconds.
#[inline(always)]
pub fn latency_bucket(us: u32) -> usize {
    // Branch-free bit length: the BPF backend has no count-leading-zeros.
    let mut v = us;
    let mut bits = 0u32;
    let mut step = 16u32;
    while step > 0 {
        if v >> step != 0 {
            v >>= step;
            bits += step;
        }
        step >>= 1;
    }
    let len = bits + (v != 0) as u32;
    if len as usize >= LATENCY_BUCKETS {
        LATENCY_BUCKETS - 1
    } else {
        len as usize
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
}

// Layout is part of the kernel ABI between the two halves: pin it.
const _: () = {
    assert!(core::mem::size_of::<ServiceKey>() == 8);
    assert!(core::mem::size_of::<Service>() == 40);
    assert!(core::mem::size_of::<Backend>() == 24);
    assert!(core::mem::size_of::<Member>() == 8);
    assert!(core::mem::size_of::<BackendLoad>() == 16);
    assert!(core::mem::size_of::<ConnKey>() == 16);
    assert!(core::mem::size_of::<ConnEntry>() == 64);
    assert!(core::mem::size_of::<TrafficCounters>() == 32);
    assert!(core::mem::size_of::<LatencyHistogram>() == 8 * (LATENCY_BUCKETS + 1));
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_bucket_is_the_bit_length_capped() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1), 1);
        assert_eq!(latency_bucket(2), 2);
        assert_eq!(latency_bucket(3), 2);
        assert_eq!(latency_bucket(4), 3);
        assert_eq!(latency_bucket(1023), 10);
        assert_eq!(latency_bucket(1024), 11);
        assert_eq!(latency_bucket((1 << 26) - 1), 26);
        assert_eq!(latency_bucket(1 << 26), 27);
        assert_eq!(latency_bucket(u32::MAX), 27);
        for us in [5u32, 77, 4096, 99_999, 12_345_678] {
            let b = latency_bucket(us);
            assert!(us < 1 << b && us >= 1 << (b - 1), "{us} in bucket {b}");
        }
    }
}
