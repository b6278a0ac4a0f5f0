//! A reference model of the `router` XDP program's packet decision, written
//! from its rules rather than from its code, for differential tests: the
//! same frame and the same table state go through BPF_PROG_TEST_RUN and
//! through `Model::step`, and the two must agree on the verdict, the output
//! bytes, the reason counters, the traffic counters and the tables.
//!
//! What it covers: the parse checks and their order (`parse`), the
//! destination pre-filter with its shared buckets, the service lookup, the
//! Maglev slot of a flow (`flow_hash`, under the program's secret, into
//! the live table, which the model
//! is given), both connection tables and their rules (`tables`), SNAT
//! allocation, the NAT rewrite with checksums computed from scratch
//! (`nat`), ICMP errors about flows translated from their quote (`icmp`),
//! next hops, latency flags, and the counters. And placement
//! (`load`): each backend's in-flight count (`BACKEND_LOAD`, opened and
//! closed) with the `CONN_COUNTED` bit that says which flows it holds, the
//! ends that uncount a flow, and the two ways a least-loaded service picks
//! by it, room first (a scan of its members, or two choices from its
//! Maglev table). And DSR services (`dsr`): `DSR_FLOWS`, the hand-over from
//! the NAT path by the pre-filter's DSR bits, and the outer headers.
//!
//! Modelling choices, each because the kernel's value depends on a clock or
//! on something a test does not control:
//!
//! - Time: an entry has an age in whole seconds at the start of a session,
//!   and a session takes no time. The harness seeds ages far from every
//!   timeout (and refuses sessions that run long), so every expiry decision
//!   is the same for the kernel's coarse clock and for the model. A refresh
//!   makes an entry's age 0 (the kernel writes at most once a second, which
//!   is invisible at these distances). Entries' `last_seen_ns` and
//!   `stamp_us` are not compared; latency samples are counted, not valued.
//! - Checksum deltas stored in entries are compared by what they do (their
//!   one's-complement class for the entry's key and translation), not as
//!   raw words: any congruent value rewrites packets identically.
//! - The host's sockets: the harness opens none in its namespace, so a TCP
//!   reply to a SNAT address without an entry never has one.
//! - Next hops are a fixed table of neighbours (`Config::fib`), as the
//!   harness configures them; every other destination has none.
//! - The connection tables never evict: the harness sizes them far above
//!   what a session holds and simulates eviction by deleting entries, in
//!   the kernel and in the model alike. Inserts therefore never fail, and
//!   `drop_conn_table_full` is never modelled.
//! - Seeded states may hold one key in both tables, which the claim rules
//!   never produce. Where the datapath asks both tables for a key, CONNS
//!   answers when it has an entry, live or not (`Tables::lookup`); where
//!   it asks one table, only that one counts. The model follows the same
//!   precedence so such states are compared too.
//!
//! The rules in brief (the code says each one where it applies): a packet
//! rides a live entry at its key; a SYN on a closing entry, or on a forward
//! entry whose reply entry is gone, foreign, closing or expired, starts a
//! new connection; the client's next packet on a half-open flow confirms
//! it (both directions to CONNS, unless a live confirmed flow holds its
//! reply key); every new flow starts half-open, takes back a SNAT pair its
//! own reply entry still holds (unless it was opened by a SYN), and
//! otherwise claims the first free candidate (the client's own port, then
//! eight probes); a client's first payload starts the first-byte clock on
//! its own reply entry only. A new flow is counted on its backend unless a
//! RST opened it, and uncounted once: at a RST either way, at the FIN that
//! finds the other direction closing, or when a SYN starts a new connection
//! on its live entry. An expired entry is never uncounted by a packet: it
//! is the daemon's table scan that uncounts it (see `load`).

pub mod dsr;
mod flow;
pub mod icmp;
pub mod load;
pub mod nat;
pub mod parse;
pub mod pools;
pub mod tables;

use std::collections::{HashMap, HashSet};

use router_common::reasons;

pub use load::{Load, Loads};
pub use nat::Tuple;
pub use tables::{Entry, Hop, Table, Tables, Timeouts};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// A service as the datapath sees it.
#[derive(Clone, Debug)]
pub struct Service {
    pub id: u32,
    /// SNAT addresses, wire order, 1 to 4.
    pub snat: Vec<u32>,
    /// Probe range for SNAT ports, host order, inclusive.
    pub port_min: u16,
    pub port_max: u16,
    /// The live Maglev table: slot → backend id (or `NO_BACKEND`).
    pub table: Vec<u32>,
    /// `SELECT_MAGLEV` or `SELECT_LEAST_LOADED` (anything else: Maglev).
    pub selection: u32,
    /// The live half of the service's scan list, in order. Empty makes a
    /// least-loaded service draw two choices.
    pub members: Vec<Member>,
    /// Pools (empty: the service's own table places every flow).
    pub pools: Vec<pools::Pool>,
    /// Share bucket → pool index (`SHARE_BUCKETS` long when pooled).
    pub shares: Vec<u8>,
    pub segments: Vec<pools::Segment>,
    /// `FORWARD_NAT`, `FORWARD_IPIP` or `FORWARD_GUE` (`router_common::dsr`).
    pub forwarding: u32,
    /// GUE's destination port, wire order (0 unless GUE).
    pub gue_port: u16,
}

/// One entry of a scan list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub backend_id: u32,
    pub weight: u32,
    /// In flight at which it has no room; 0: no limit.
    pub max_in_flight: u32,
}

#[derive(Clone, Copy, Debug)]
pub struct Backend {
    pub addr: u32,
    /// Wire order.
    pub port: u16,
    /// The weight its `BACKENDS` slot holds: what two choices weigh it by.
    /// Not always its live table's (an apply writes the slots before it
    /// flips the table).
    pub weight: u32,
    /// Its slot's room limit (0: none), as two choices read it.
    pub max_in_flight: u32,
}

/// Everything the decision reads besides the connection tables.
#[derive(Clone, Debug)]
pub struct Config {
    /// (VIP address, port, protocol), wire order → service.
    pub services: HashMap<(u32, u16, u8), Service>,
    /// Backend id → backend, for every backend slot in use.
    pub backends: HashMap<u32, Backend>,
    pub snat_addrs: HashSet<u32>,
    /// Destination address → next hop resolved from it.
    pub fib: HashMap<u32, Hop>,
    /// Destination address → the source address the host routes from
    /// toward it (a DSR packet's outer source).
    pub sources: HashMap<u32, u32>,
    /// The live next-hop generation (never 0).
    pub fib_gen: u32,
    /// The flow hash's secret, as the program was loaded with it.
    pub flow_hash_key: [u32; 2],
    pub table_size: u32,
    pub timeouts: Timeouts,
}

/// The pre-filter's bucket for an address: a fold of its bits, so many
/// addresses share each of the 4096 buckets.
pub fn filter_bucket(addr: u32) -> u32 {
    let x = addr ^ (addr >> 16);
    (x ^ (x >> 8)) & 0xfff
}

impl Config {
    /// Whether `dst`'s pre-filter bucket holds some VIP, some SNAT address.
    pub fn filter(&self, dst: u32) -> (bool, bool) {
        let b = filter_bucket(dst);
        (
            self.services.keys().any(|(a, _, _)| filter_bucket(*a) == b),
            self.snat_addrs.iter().any(|a| filter_bucket(*a) == b),
        )
    }

    /// Whether `dst`'s bucket holds a DSR service's address, and whether
    /// it holds nothing else: no NAT service's address, no SNAT address.
    pub fn dsr_filter(&self, dst: u32) -> (bool, bool) {
        let b = filter_bucket(dst);
        let mut here = self
            .services
            .iter()
            .filter(|((a, _, _), _)| filter_bucket(*a) == b);
        let dsr = here
            .clone()
            .any(|(_, s)| s.forwarding != router_common::dsr::FORWARD_NAT);
        let nat = here.any(|(_, s)| s.forwarding == router_common::dsr::FORWARD_NAT)
            || self.snat_addrs.iter().any(|a| filter_bucket(*a) == b);
        (dsr, dsr && !nat)
    }

    /// The source the host routes from toward `dst` (0: none known).
    pub fn route_src(&self, dst: u32) -> u32 {
        self.sources.get(&dst).copied().unwrap_or(0)
    }

    pub fn service(&self, addr: u32, port: u16, proto: u8) -> Option<&Service> {
        self.services.get(&(addr, port, proto))
    }

    pub fn next_hop(&self, dst: u32) -> Option<Hop> {
        self.fib.get(&dst).map(|h| Hop {
            fib_gen: self.fib_gen,
            ..*h
        })
    }
}

/// A packet's traffic-counter increment (service and backend alike).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Traffic {
    pub service_id: u32,
    pub backend_id: u32,
    pub bytes: u64,
    pub new_conn: bool,
    pub reply: bool,
}

/// What one packet did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: u32,
    pub frame: Vec<u8>,
    /// Reason counters incremented, in order (a re-hashed TCP packet counts
    /// `lru_miss` besides its verdict's reason).
    pub reasons: Vec<u32>,
    pub traffic: Option<Traffic>,
    /// Latency samples taken: (backend id, kind).
    pub latency: Vec<(u32, u32)>,
}

impl Outcome {
    fn untouched(frame: &[u8]) -> Self {
        Self {
            verdict: XDP_PASS,
            frame: frame.to_vec(),
            reasons: Vec::new(),
            traffic: None,
            latency: Vec::new(),
        }
    }

    fn counted(mut self, verdict: u32, reason: u32) -> Self {
        debug_assert!(reason < reasons::COUNT);
        self.verdict = verdict;
        self.reasons.push(reason);
        self
    }
}

/// The model: configuration, the two connection tables, the DSR flows,
/// and the backends' in-flight counts.
#[derive(Clone, Debug)]
pub struct Model {
    pub cfg: Config,
    pub tables: Tables,
    /// `DSR_FLOWS`: a DSR flow's client key → its entry.
    pub dsr: HashMap<router_common::ConnKey, dsr::DsrEntry>,
    pub loads: Loads,
    /// The rules the last packet went through, for coverage reports.
    pub trail: Vec<&'static str>,
    /// New flows a pool handed down its fallback chain: (service id, from
    /// pool, to pool) → count, as the datapath's `SPILLS` counts them.
    pub spills: HashMap<(u32, u32, u32), u64>,
}

impl Model {
    pub fn new(cfg: Config) -> Self {
        Self {
            cfg,
            tables: Tables::default(),
            dsr: HashMap::new(),
            loads: Loads::default(),
            trail: Vec::new(),
            spills: HashMap::new(),
        }
    }

    /// The (SNAT address, port) pairs, wire order, that a new flow `key`
    /// for `svc` tries, in order.
    pub fn snat_candidates(
        cfg: &Config,
        key: &router_common::ConnKey,
        svc: &Service,
    ) -> Vec<(u32, u16)> {
        Self::probes(key, svc, Self::hash(cfg, key))
    }

    /// The backend id Maglev picks for a new flow `key` of `svc` (whatever
    /// its selection).
    pub fn pick(cfg: &Config, key: &router_common::ConnKey, svc: &Service) -> u32 {
        svc.table[(Self::hash(cfg, key) % cfg.table_size) as usize]
    }

    /// Flow `key`'s hash under the datapath's secret.
    pub fn hash(cfg: &Config, key: &router_common::ConnKey) -> u32 {
        router_common::flow_hash::flow_hash(
            cfg.flow_hash_key,
            key.src_addr,
            key.dst_addr,
            key.src_port,
            key.dst_port,
            key.proto,
        )
    }
}
