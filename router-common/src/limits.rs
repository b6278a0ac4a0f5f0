//! Capacities of the maps and tables, and the bounds that size them. The
//! program declares its maps with the defaults; userspace resizes them at
//! load time within these bounds.

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
/// The last attempt (0: the client's own port) at which a flow not opened
/// by a SYN looks for a pair its own reply entry still holds. Each attempt
/// costs two lookups, and any spoofed mid-stream packet pays for all of
/// them; a flow that had to probe further than this is the rare one, and
/// gets a new pair as if it had lost both entries.
pub const OWN_PAIR_ATTEMPTS: u32 = 2;
const _: () = assert!(OWN_PAIR_ATTEMPTS <= SNAT_PROBES);
