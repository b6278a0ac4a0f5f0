//! Every map and load-time global of the `router` XDP program. Userspace is
//! the only writer of SERVICES, BACKENDS, MAGLEV_TABLES, MEMBERS, POOLS,
//! SEGMENTS, SHARES, ADDR_FILTER, SNAT_ADDRS, SERVICES6, BACKEND_ADDRS6, SNAT6,
//! SNAT_ADDRS6 and FIB_GEN; the program writes CONNS, HALF_OPEN, DSR_FLOWS,
//! DSR_FLOWS6, NAT6_CONNS and the per-CPU counters; both add to BACKEND_LOAD, atomically.

use aya_ebpf::{
    Global,
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_COMMON_LRU},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use router_common::{
    ADDR_FILTER_SIZE, Backend, BackendLoad, ConnEntry, ConnKey, DEFAULT_CONN_TABLE_SIZE,
    DEFAULT_TABLE_SIZE, LATENCY_KINDS, LatencyHistogram, MAX_BACKENDS, MAX_SERVICES,
    MAX_SNAT_ADDRS_TOTAL, Member, NextHop, Pool, PoolKey, SegmentKey, Service, ServiceKey,
    ShareSlots, TrafficCounters,
    dsr::DsrFlow,
    half_open_table_size,
    pools::{MAX_POOLS, MAX_SEGMENTS, SHARE_BUCKETS, SLOTS_PER_ENTRY},
    reasons,
    selection::MAX_SCAN_MEMBERS,
    v6::{
        Addr6, ConnKey6, DsrFlow6, NatEntry6, NatScratch6, ServiceKey6, Snat6,
        TAIL_CALLS as TAIL_CALLS_LEN,
    },
};

#[map]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Two halves per service: `(id * 2 + half) * TABLE_SIZE + slot` → backend id.
/// Userspace sizes it to `MAX_SERVICES * 2 * table_size` at load time.
#[map]
pub static MAGLEV_TABLES: Array<u32> =
    Array::with_max_entries(MAX_SERVICES * 2 * DEFAULT_TABLE_SIZE, 0);

/// Scan lists of least-loaded services, double-buffered with their Maglev
/// tables (the same `active_table` half is live): see
/// `selection::member_index`.
#[map]
pub static MEMBERS: Array<Member> = Array::with_max_entries(MAX_SERVICES * 2 * MAX_SCAN_MEMBERS, 0);

/// Pools of pooled services, by (service id, pool index): the table slot
/// that places the pool's flows, and whether the pool has room.
#[map]
pub static POOLS: HashMap<PoolKey, Pool> = HashMap::with_max_entries(MAX_SERVICES * MAX_POOLS, 0);

/// Client networks routed to a pool, per service: (service id, network) →
/// pool index, longest prefix first (see `SegmentKey`).
#[map]
pub static SEGMENTS: LpmTrie<SegmentKey, u32> = LpmTrie::with_max_entries(MAX_SEGMENTS, 0);

/// Share buckets → pool index, two halves per service, flipped with
/// `Service::share_half` (see `pools::share_slot`).
#[map]
pub static SHARES: Array<ShareSlots> =
    Array::with_max_entries(MAX_SERVICES * 2 * SHARE_BUCKETS / SLOTS_PER_ENTRY, 0);

/// Per CPU: new connections a pool handed to its fallback chain, by
/// (service, from pool, to pool) (see `pools::spill_index`).
#[map]
pub static SPILLS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_SERVICES * MAX_POOLS * MAX_POOLS, 0);

/// Per backend id: flows opened and closed, so every CPU reads a backend's
/// in-flight count at SYN time. Memory-mappable so the daemon can add its
/// corrections atomically beside the program's own adds (a map update from
/// userspace would overwrite them).
#[map]
pub static BACKEND_LOAD: Array<BackendLoad> = Array::with_max_entries(MAX_BACKENDS, BPF_F_MMAPABLE);

/// Both directions of every confirmed flow: one whose client has sent a
/// second packet (for TCP, the handshake's ACK answering the SYN-ACK). LRU,
/// so a full table evicts the coldest flow instead of refusing new ones.
/// Per-CPU LRU lists (BPF_F_NO_COMMON_LRU) keep inserts off a global lock;
/// entries are still shared, so a flow's packets may arrive on any CPU.
#[map]
pub static CONNS: LruHashMap<ConnKey, ConnEntry> =
    LruHashMap::with_max_entries(DEFAULT_CONN_TABLE_SIZE, BPF_F_NO_COMMON_LRU);

/// DSR flows (see `dsr`): the client's direction only, pinned to a
/// backend. Per-CPU LRU lists as `CONNS`; userspace sizes it as `CONNS`.
#[map]
pub static DSR_FLOWS: LruHashMap<ConnKey, DsrFlow> =
    LruHashMap::with_max_entries(DEFAULT_CONN_TABLE_SIZE, BPF_F_NO_COMMON_LRU);

/// The programs `router` tail-calls: `router_dsr` for IPv4 DSR services'
/// packets (`TAIL_DSR`), `router_v6` for every IPv6 frame (`TAIL_V6`); and
/// `router_nat6`, which `router_v6` tail-calls for IPv6 NAT (`TAIL_NAT6`).
/// Set by userspace at every load.
#[map]
pub static TAIL_CALLS: ProgramArray = ProgramArray::with_max_entries(TAIL_CALLS_LEN, 0);

/// IPv6 services (DSR only, see `router_common::v6`), by address, port
/// and protocol. The value is a `Service` as in `SERVICES`: the id, the
/// live table half and the encapsulation.
#[map]
pub static SERVICES6: HashMap<ServiceKey6, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Per backend id: the IPv6 address of an IPv6 service's backend (its
/// `BACKENDS` entry holds the rest, with address 0).
#[map]
pub static BACKEND_ADDRS6: Array<Addr6> = Array::with_max_entries(MAX_BACKENDS, 0);

/// IPv6 DSR flows, as `DSR_FLOWS`; userspace sizes it as `CONNS`.
#[map]
pub static DSR_FLOWS6: LruHashMap<ConnKey6, DsrFlow6> =
    LruHashMap::with_max_entries(DEFAULT_CONN_TABLE_SIZE, BPF_F_NO_COMMON_LRU);

/// IPv6 NAT flows (see `nat6`): both directions of each, forward and
/// reply entries in one table; userspace sizes it as `CONNS`.
#[map]
pub static NAT6_CONNS: LruHashMap<ConnKey6, NatEntry6> =
    LruHashMap::with_max_entries(DEFAULT_CONN_TABLE_SIZE, BPF_F_NO_COMMON_LRU);

/// IPv6 NAT services' SNAT addresses, by service id.
#[map]
pub static SNAT6: HashMap<u32, Snat6> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Every IPv6 SNAT address (as read off the wire) → 1: where `router_v6`
/// finds a backend's reply to hand to `router_nat6`.
#[map]
pub static SNAT_ADDRS6: HashMap<Addr6, u32> = HashMap::with_max_entries(MAX_SNAT_ADDRS_TOTAL, 0);

/// Per CPU: where `router_nat6` builds a new flow's entry and reply key
/// (see `flow6`), off the stack.
#[map]
pub static NAT6_SCRATCH: PerCpuArray<NatScratch6> = PerCpuArray::with_max_entries(1, 0);

/// Both directions of new flows (opened by a SYN, a UDP datagram, or a TCP
/// packet of a flow picked up mid-stream) whose client has not sent a
/// second packet yet. A flood from spoofed sources, SYN, ACK or UDP, never
/// gets past this table, so it churns only here and cannot evict an established
/// flow from CONNS (whose two directions the LRU would evict
/// independently, and a flow that loses its reply entry is lost). The
/// client's next packet moves the flow to CONNS. Like conntrack's early
/// drop of unassured entries, but by construction. Userspace sizes it with
/// `half_open_table_size`.
#[map]
pub static HALF_OPEN: LruHashMap<ConnKey, ConnEntry> = LruHashMap::with_max_entries(
    half_open_table_size(DEFAULT_CONN_TABLE_SIZE),
    BPF_F_NO_COMMON_LRU,
);

/// Destination pre-filter: bucket → FILTER_VIP | FILTER_SNAT. An array lookup
/// is inlined by the verifier, so traffic for nobody costs no hash lookup.
#[map]
pub static ADDR_FILTER: Array<u32> = Array::with_max_entries(ADDR_FILTER_SIZE, 0);

/// Every service's SNAT addresses (as read off the wire) → 1. The
/// pre-filter's buckets are shared by several addresses; this exact set is
/// read only for a TCP reply that has lost its entry, to tell a SNAT address
/// from a bucket neighbour before dropping anything.
#[map]
pub static SNAT_ADDRS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_SNAT_ADDRS_TOTAL, 0);

/// Index 0: generation of the host's routes and neighbours. Userspace bumps it
/// on every netlink change, which invalidates every cached next hop at once,
/// and sets `FIB_GEN_PER_FLOW` in it while backends' next hops may differ
/// by flow.
#[map]
pub static FIB_GEN: Array<u32> = Array::with_max_entries(1, 0);

/// Per CPU, per backend id: the backend's next hop (see `fib::hop`). Per
/// CPU so that it is written without a lock and read without a torn value.
#[map]
pub static NEXT_HOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Index 0: `LAYOUT_VERSION` of the daemon that created the maps. Never
/// read here: it is pinned with the maps so a later daemon can tell
/// whether it reads their entries the way they were written.
#[map]
pub static LAYOUT: Array<u32> = Array::with_max_entries(1, 0);

/// The two words of the flow hash's secret, generated when the maps are
/// created. Never read here (the program gets them as load-time globals):
/// pinned, so that every program loaded over these maps hashes alike.
#[map]
pub static FLOW_HASH_KEY: Array<u32> = Array::with_max_entries(2, 0);

#[map]
pub static SERVICE_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map]
pub static BACKEND_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Per backend, `backend_id * LATENCY_KINDS + kind`: connect and first-byte
/// latency histograms, measured where both directions of a flow pass.
#[map]
pub static LATENCY: PerCpuArray<LatencyHistogram> =
    PerCpuArray::with_max_entries(MAX_BACKENDS * LATENCY_KINDS, 0);

#[map]
pub static REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reasons::COUNT, 0);

// Load-time configuration in .rodata: frozen before the program runs, so a
// value can never change under a packet, and the verifier sees constants.
// SAFETY (each `no_mangle`): userspace sets these by symbol name, and no
// other symbol in the object has one of these names.
#[unsafe(no_mangle)]
pub static TABLE_SIZE: Global<u32> = Global::new(DEFAULT_TABLE_SIZE);
#[unsafe(no_mangle)]
pub static TCP_IDLE_NS: Global<u64> = Global::new(3_600_000_000_000);
#[unsafe(no_mangle)]
pub static TCP_CLOSING_NS: Global<u64> = Global::new(10_000_000_000);
#[unsafe(no_mangle)]
pub static UDP_IDLE_NS: Global<u64> = Global::new(30_000_000_000);
#[unsafe(no_mangle)]
pub static DATAPATH_LOG: Global<u32> = Global::new(0);
/// The flow hash's secret (see `flow_hash`), kept by the daemon in the
/// pinned `FLOW_HASH_KEY` map so a restart hashes every flow as before.
#[unsafe(no_mangle)]
pub static FLOW_HASH_KEY0: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static FLOW_HASH_KEY1: Global<u32> = Global::new(0);
/// The host's ephemeral ports (`net.ipv4.ip_local_port_range`), host
/// order: where its own connections from a SNAT address may sit (see
/// `flow::client_port_usable`). The default, every port, is the safe one.
#[unsafe(no_mangle)]
pub static EPHEMERAL_PORT_MIN: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static EPHEMERAL_PORT_MAX: Global<u32> = Global::new(65535);
