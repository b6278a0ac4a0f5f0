//! What the datapath should serve, independent of where it came from (a
//! config file today, service discovery later).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    /// IPv4 (`SERVICES`), or IPv6 (`SERVICES6`, served by `router_v6`,
    /// and by `router_nat6` for NAT).
    pub vip: SocketAddr,
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    /// A NAT service's SNAT addresses, of the VIP's family: an IPv4
    /// service's go in its `Service` value, an IPv6 one's in `SNAT6`.
    pub snat: Vec<IpAddr>,
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub selection: Selection,
    pub backends: Vec<BackendSpec>,
    /// Pools, each over some of `backends` (see `router_common::pools`);
    /// empty: every flow is placed from the service's own table.
    pub pools: Vec<PoolSpec>,
    /// Client networks routed to a pool (by index into `pools`).
    pub segments: Vec<SegmentSpec>,
    /// NAT, or DSR with its encapsulation.
    pub forwarding: Forwarding,
}

/// How a service's packets reach a backend (see `router_common::dsr`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Forwarding {
    /// Translated both ways; the backend answers through the LB.
    #[default]
    Nat,
    /// DSR, IPv4-in-IPv4.
    Ipip,
    /// DSR, GUE variant 1 to this UDP port.
    Gue { port: u16 },
}

impl Forwarding {
    /// `Service::forwarding`.
    pub fn code(self) -> u32 {
        use router_common::dsr::{FORWARD_GUE, FORWARD_IPIP, FORWARD_NAT};
        match self {
            Forwarding::Nat => FORWARD_NAT,
            Forwarding::Ipip => FORWARD_IPIP,
            Forwarding::Gue { .. } => FORWARD_GUE,
        }
    }

    /// `Service::gue_port`, network order; 0 unless GUE.
    pub fn gue_port_be(self) -> u16 {
        match self {
            Forwarding::Gue { port } => port.to_be(),
            _ => 0,
        }
    }

    /// What a pinned `Service` value's two fields say.
    pub fn of_service(code: u32, gue_port_be: u16) -> Self {
        use router_common::dsr::{FORWARD_GUE, FORWARD_IPIP};
        match code {
            FORWARD_IPIP => Forwarding::Ipip,
            FORWARD_GUE => Forwarding::Gue {
                port: u16::from_be(gue_port_be),
            },
            _ => Forwarding::Nat,
        }
    }

    pub fn is_dsr(self) -> bool {
        self != Forwarding::Nat
    }
}

/// A pool of a service as the datapath serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSpec {
    pub name: String,
    /// Names of the service's backends in this pool.
    pub backends: Vec<String>,
    /// Percent of unmatched clients; the service's pools add up to 100.
    pub share: u32,
    /// Index of the pool taking this one's new connections while it has no room.
    pub fallback: Option<usize>,
    /// Every backend saturated (by the policy's reading): the pool spills
    /// to its fallback. A pool whose backends all have weight 0 has no room
    /// whatever this says.
    pub saturated: bool,
}

/// A client network routed to a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SegmentSpec {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub pool: usize,
}

/// How the datapath picks a new flow's backend (see
/// `router_common::selection`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// Consistent hashing through the weighted Maglev table.
    #[default]
    Maglev,
    /// The smallest `(in_flight + 1) / weight`, counted in the datapath.
    LeastLoaded,
}

impl Selection {
    pub fn as_str(self) -> &'static str {
        match self {
            Selection::Maglev => "maglev",
            Selection::LeastLoaded => "least_loaded",
        }
    }

    pub(crate) fn code(self) -> u32 {
        match self {
            Selection::Maglev => router_common::selection::SELECT_MAGLEV,
            Selection::LeastLoaded => router_common::selection::SELECT_LEAST_LOADED,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub name: String,
    pub role: BackendRole,
    /// Of the service's VIP's family.
    pub address: SocketAddr,
    pub weight: u32,
    /// In-flight flows at which a least-loaded pick sees no room (0: no limit).
    pub max_in_flight: u32,
}

/// Whether a backend is the service's own or one of its fallback
/// service's, lent while every own backend is saturated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendRole {
    #[default]
    Primary,
    Fallback,
}

/// Load-time settings: fixed for the life of a loaded program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    pub table_size: u32,
    pub conn_table_size: u32,
    pub tcp_idle_ns: u64,
    pub tcp_closing_ns: u64,
    pub udp_idle_ns: u64,
    pub datapath_log: bool,
    /// The host's ephemeral port range (`net.ipv4.ip_local_port_range`),
    /// inclusive: a new flow takes its client's port as SNAT port there
    /// only when no host socket holds that 4-tuple. The default, every
    /// port, always looks.
    pub ephemeral_ports: (u16, u16),
    /// The flow hash's secret. None: the one pinned with the maps, or a
    /// new random one for maps created now. Tests that predict Maglev
    /// slots set it.
    pub flow_hash_key: Option<[u32; 2]>,
}

/// The flow hash's key for a configured `hash_seed`: its high and low
/// 32 bits.
pub fn flow_hash_key_of_seed(seed: u64) -> [u32; 2] {
    [(seed >> 32) as u32, seed as u32]
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            table_size: router_common::DEFAULT_TABLE_SIZE,
            conn_table_size: router_common::DEFAULT_CONN_TABLE_SIZE,
            tcp_idle_ns: 3_600_000_000_000,
            tcp_closing_ns: 10_000_000_000,
            udp_idle_ns: 30_000_000_000,
            datapath_log: false,
            ephemeral_ports: (0, u16::MAX),
            flow_hash_key: None,
        }
    }
}
