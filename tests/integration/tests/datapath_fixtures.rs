//! BPF_PROG_TEST_RUN fixtures for the `router` XDP program, table-driven in
//! Katran's style: a crafted input packet, the expected verdict, the expected
//! output bytes, and the counter that must account for it.
//!
//! Each test runs in its own network namespace holding a veth with static
//! neighbours, so `bpf_fib_lookup` resolves deterministic next hops.
//!
//! A row is a `Case` (router-testkit's xdp_fixture) with named fields:
//! `name`, `input`, `verdict`, `output` (`Unchanged`, the rewritten
//! `Bytes`, or `Unchecked` where the test checks parts of the frame
//! itself) and the `reasons` counters that must move. Rows that follow one
//! another on one fixture are written as a table and run in order.
//!
//! - `nat`: flows both ways, SNAT ports, weights, next hops, latency clocks;
//! - `edge_input`: traffic that is not a service's, malformed frames;
//! - `conn_table`: evicted, expired and half-open entries, ports reused;
//! - `floods`: spoofed SYN, ACK and UDP floods against a small table;
//! - `blind`: forged RSTs, FINs and ACKs off the sequence window, TTLs,
//!   client ports the host holds;
//! - `icmp`: ICMP errors about flows translated both ways, and the ICMP
//!   that is not;
//! - `next_hops`: next hops shared by a backend's flows, and when not;
//! - `dsr`: IPIP and GUE encapsulation, pinned and re-hashed DSR flows,
//!   "fragmentation needed" for the tunnel, and the backends' decap program;
//! - `nat6`: IPv6 NAT services: both directions translated with their
//!   pseudo-header checksums, probed SNAT ports, a lost entry found again,
//!   closing, replies without an entry, the hop limit.
//! - `v6`: IPv6 services: IPv6-in-IPv6 and GUE over IPv6, extension
//!   headers, "packet too big", Neighbor Discovery, IPv6 decapsulation.

#[path = "datapath_fixtures/blind.rs"]
mod blind;
#[path = "datapath_fixtures/conn_table.rs"]
mod conn_table;
#[path = "datapath_fixtures/dsr.rs"]
mod dsr;
#[path = "datapath_fixtures/edge_input.rs"]
mod edge_input;
#[path = "datapath_fixtures/floods.rs"]
mod floods;
#[path = "datapath_fixtures/icmp.rs"]
mod icmp;
#[path = "datapath_fixtures/nat.rs"]
mod nat;
#[path = "datapath_fixtures/nat6.rs"]
mod nat6;
#[path = "datapath_fixtures/next_hops.rs"]
mod next_hops;
#[path = "datapath_fixtures/v6.rs"]
mod v6;

const VIP: &str = "198.18.100.1:8000";
