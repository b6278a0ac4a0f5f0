//! Bit flags held in map values: `ConnEntry::flags` (`CONN_*`) and the
//! destination pre-filter's buckets (`FILTER_*`). Each bit's meaning is
//! part of the ABI between the program and the daemon, like the layouts.

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
/// `ConnEntry::flags` bit: this direction's sender has been heard from
/// since the entry was made, and (for TCP) `seq_next` holds the end of its
/// furthest segment. Set on a forward entry by the packet that creates it,
/// on a reply entry by the backend's first packet (its SYN-ACK, for a flow
/// opened by a SYN). A half-open flow is confirmed only once its reply
/// entry has it (see `tcp_seq`).
pub const CONN_HEARD: u32 = 64;
/// Every latency-measurement bit: one test keeps established flows that are
/// done measuring on the shortest path.
pub const CONN_AWAIT_ANY: u32 = CONN_AWAIT_SYNACK | CONN_AWAIT_REQUEST | CONN_AWAIT_RESPONSE;

/// `ADDR_FILTER` bit: some service listens on an address in this bucket.
pub const FILTER_VIP: u32 = 1;
/// `ADDR_FILTER` bit: some service translates to a SNAT address in this bucket.
pub const FILTER_SNAT: u32 = 2;
/// `ADDR_FILTER` bit: some DSR service listens on an address in this
/// bucket, so its packets look in `DSR_FLOWS` before the NAT tables.
pub const FILTER_DSR: u32 = 4;
/// `ADDR_FILTER` bit, only beside `FILTER_DSR`: every service on every
/// address in this bucket is a DSR service, and no SNAT address falls in
/// it. Nothing of the NAT path can answer such a packet, so `router` hands
/// it to `router_dsr` without looking the service up first.
pub const FILTER_DSR_ONLY: u32 = 8;
