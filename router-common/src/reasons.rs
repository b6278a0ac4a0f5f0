//! Indices of the per-CPU `REASONS` counter array: one per verdict reason,
//! so operators debug from counters, not logs.

/// Destination is no service or SNAT address (includes IPv6 and non-IP).
pub const PASS_NOT_SERVICE: u32 = 0;
/// Truncated headers, IHL < 5, total length inconsistent with the frame,
/// TCP data offset < 5: dropped (the stack would drop them too).
pub const DROP_MALFORMED: u32 = 1;
/// IPv4 fragment (MF set or offset ≠ 0): passed to the stack, never balanced.
pub const PASS_FRAGMENT: u32 = 2;
/// IPv4 header with options: passed to the stack, never balanced.
pub const PASS_IP_OPTIONS: u32 = 3;
/// New flow for a service whose backends all have weight 0: dropped.
pub const DROP_NO_BACKEND: u32 = 4;
/// `bpf_fib_lookup` found no route or no neighbour: the rewritten packet is
/// passed to the stack, which resolves the neighbour.
pub const PASS_FIB_FAILED: u32 = 5;
/// A connection-table insert failed: the packet is dropped.
pub const DROP_CONN_TABLE_FULL: u32 = 6;
/// A non-SYN TCP packet without an entry was re-hashed through Maglev.
pub const LRU_MISS: u32 = 7;
/// Every SNAT (address, port) probe was taken: the new flow is dropped.
pub const DROP_SNAT_EXHAUSTED: u32 = 8;
/// A protocol other than TCP/UDP to a service or SNAT address: passed.
pub const PASS_UNKNOWN_PROTO: u32 = 9;
/// Packets forwarded with `XDP_TX` (same interface).
pub const TX: u32 = 10;
/// Packets forwarded with `XDP_REDIRECT` (another interface).
pub const REDIRECT: u32 = 11;
/// Packets to a SNAT address with no reply entry: passed to the stack.
/// (For TCP, only when the host has a socket for the packet.)
pub const PASS_NO_REPLY_ENTRY: u32 = 12;
/// TCP to a SNAT address with neither a reply entry nor a host socket: a
/// reply of a translated flow whose entry is gone (evicted, expired).
/// Dropped, because the host's stack would answer it with a reset and end
/// the backend's side of a connection that was only missing its entry.
pub const DROP_NO_REPLY_ENTRY: u32 = 13;

pub const COUNT: u32 = 14;

/// Names as exported by `router status` and metrics, indexed by reason.
pub const NAMES: [&str; COUNT as usize] = [
    "pass_not_service",
    "drop_malformed",
    "pass_fragment",
    "pass_ip_options",
    "drop_no_backend",
    "pass_fib_failed",
    "drop_conn_table_full",
    "lru_miss",
    "drop_snat_exhausted",
    "pass_unknown_proto",
    "tx",
    "redirect",
    "pass_no_reply_entry",
    "drop_no_reply_entry",
];
