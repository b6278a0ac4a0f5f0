//! The world every session runs in: services, addresses, timeouts, and
//! the loaded program with its maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, LazyLock},
    time::Duration,
};

use aya::maps::{Array, HashMap as BpfHashMap};
use router::{
    datapath::{
        BackendSpec, Datapath, Forwarding, LoadCounters, LoadOptions, PoolSpec, SCAN_LIMIT,
        SegmentSpec, Selection, ServiceSpec,
    },
    maglev::{self, MaglevBackend},
};
use router_common::{
    MAX_BACKENDS, MAX_SERVICES, Service, ServiceKey,
    dsr::{FORWARD_GUE, FORWARD_IPIP, FORWARD_NAT},
    selection::{SELECT_LEAST_LOADED, SELECT_MAGLEV},
};
use router_testkit::{
    kernel_ns::{EnteredNs, TEST_NEIGHBOURS},
    model::{self, Config, Hop, Timeouts},
};

use super::kernel::LoadSeeder;

/// Timeouts, in seconds, and the ages seeded around them: every age is at
/// least 10 s from every timeout, and a session must finish in `MAX_SESSION`.
pub(crate) const CLOSING_S: u64 = 10;
pub(crate) const UDP_IDLE_S: u64 = 30;
pub(crate) const TCP_IDLE_S: u64 = 50;
pub(crate) const AGES: [u64; 4] = [0, 20, 40, 70];
pub(crate) const MAX_SESSION: Duration = Duration::from_secs(5);

pub(crate) const TABLE_SIZE: u32 = 251;
pub(crate) const ARM0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub(crate) const ARM1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];

pub(crate) fn wire(a: &str) -> u32 {
    let ip: Ipv4Addr = a.parse().unwrap_or_else(|e| panic!("address {a}: {e}"));
    u32::from_ne_bytes(ip.octets())
}

pub(crate) fn ip_of(w: u32) -> Ipv4Addr {
    Ipv4Addr::from(w.to_ne_bytes())
}

pub(crate) struct SvcDef {
    /// NAT, or DSR (then Maglev, unpooled, no SNAT addresses, and every
    /// backend a neighbour: what the model covers of DSR).
    pub(crate) forwarding: Forwarding,
    pub(crate) name: &'static str,
    pub(crate) vip: &'static str,
    pub(crate) proto: u8,
    pub(crate) snat: &'static [&'static str],
    pub(crate) ports: (u16, u16),
    pub(crate) selection: Selection,
    pub(crate) backends: Vec<String>,
    /// Weights per weight set.
    pub(crate) weights: [Vec<u32>; 3],
    /// Room limits (`max_in_flight`, 0: none) per weight set: small, so
    /// that the seeded counts (0 to 3 in flight) leave some backends full.
    pub(crate) rooms: [Vec<u32>; 3],
    /// Pools: (name, backend indexes, share, fallback pool); none: unpooled.
    pub(crate) pools: &'static [(&'static str, &'static [usize], u32, Option<usize>)],
    /// Segments: (CIDR, pool).
    pub(crate) segments: &'static [(&'static str, usize)],
    /// Per weight set, the pools the daemon reads as saturated.
    pub(crate) saturated: [&'static [bool]; 3],
}

/// Index into SERVICES of the large least-loaded service.
pub(crate) const BIG: usize = 6;
/// Its backends: more than the daemon scans, so it draws two choices
/// while more than `SCAN_LIMIT` of them have weight (sets 0 and 2), and
/// is scanned in set 1. Most have no neighbour (their packets are passed
/// to the stack); one in four is a neighbour, on either arm.
pub(crate) const BIG_BACKENDS: usize = SCAN_LIMIT + 8;

/// Chosen for collisions: S0 and S1 share a backend and a SNAT address,
/// S1's two-port range runs out, S4 listens on one of S0's SNAT
/// addresses, S3 has no backend with weight, S5 has one SNAT port. S0,
/// S2, S3 and S6 place fresh flows by load: S0 and S2 scan their members
/// (none in S0's set 2, which then draws two choices from an empty
/// table, as S3 always does), S6 draws two choices except in set 1.
pub(crate) static SERVICES: LazyLock<Vec<SvcDef>> = LazyLock::new(|| {
    let strs = |a: &[&str]| a.iter().map(|b| b.to_string()).collect::<Vec<_>>();
    let n = BIG_BACKENDS;
    vec![
        SvcDef {
            forwarding: Forwarding::Nat,
            name: "web",
            vip: "198.18.100.1:8000",
            proto: 6,
            snat: &["198.18.0.1", "198.18.0.5", "198.18.0.6"],
            ports: (10000, 32767),
            selection: Selection::LeastLoaded,
            backends: strs(&[
                "198.18.0.11:8000",
                "198.18.0.12:8000",
                "198.18.0.13:8000",
                "198.18.1.11:8000",
                "198.18.0.44:8000",
            ]),
            weights: [
                vec![1, 1, 1, 1, 1],
                vec![0, 3, 1, 0, 1],
                vec![0, 0, 0, 0, 0],
            ],
            rooms: [
                vec![2, 0, 3, 1, 0],
                vec![0, 1, 2, 0, 0],
                vec![1, 1, 1, 1, 1],
            ],
            pools: &[],
            segments: &[],
            saturated: [&[], &[], &[]],
        },
        SvcDef {
            forwarding: Forwarding::Nat,
            name: "narrow",
            vip: "198.18.100.2:443",
            proto: 6,
            snat: &["198.18.0.1"],
            ports: (40000, 40001),
            selection: Selection::Maglev,
            backends: strs(&["198.18.0.11:8000", "198.18.0.12:8000"]),
            weights: [vec![1, 1], vec![0, 1], vec![1, 0]],
            rooms: [vec![1, 0], vec![1, 1], vec![0, 0]],
            pools: &[],
            segments: &[],
            saturated: [&[], &[], &[]],
        },
        SvcDef {
            forwarding: Forwarding::Nat,
            name: "dns",
            vip: "198.18.100.1:5353",
            proto: 17,
            snat: &["198.18.0.1", "198.18.0.8"],
            ports: (20000, 20063),
            selection: Selection::LeastLoaded,
            backends: strs(&["198.18.0.12:53", "198.18.0.13:53", "198.18.1.11:53"]),
            weights: [vec![1, 1, 1], vec![2, 0, 1], vec![0, 0, 1]],
            rooms: [vec![1, 2, 0], vec![0, 3, 1], vec![0, 0, 2]],
            pools: &[],
            segments: &[],
            saturated: [&[], &[], &[]],
        },
        SvcDef {
            forwarding: Forwarding::Nat,
            name: "dark",
            vip: "198.18.100.3:80",
            proto: 6,
            snat: &["198.18.0.1"],
            ports: (10000, 10100),
            selection: Selection::LeastLoaded,
            backends: strs(&["198.18.0.11:80"]),
            weights: [vec![0], vec![0], vec![0]],
            rooms: [vec![0], vec![1], vec![0]],
            pools: &[],
            segments: &[],
            saturated: [&[], &[], &[]],
        },
        SvcDef {
            forwarding: Forwarding::Nat,
            name: "on-snat",
            vip: "198.18.0.5:8080",
            proto: 6,
            snat: &["198.18.0.9", "198.18.0.10", "198.18.0.14", "198.18.0.15"],
            ports: (1024, 65535),
            selection: Selection::Maglev,
            backends: strs(&["198.18.0.13:8080", "198.18.0.11:8080"]),
            weights: [vec![1, 2], vec![1, 0], vec![0, 0]],
            rooms: [vec![0, 1], vec![0, 0], vec![2, 2]],
            pools: &[],
            segments: &[],
            saturated: [&[], &[], &[]],
        },
        SvcDef {
            forwarding: Forwarding::Nat,
            name: "one-port",
            vip: "198.18.100.4:9999",
            proto: 17,
            snat: &["198.18.0.7"],
            ports: (50000, 50000),
            selection: Selection::Maglev,
            backends: strs(&["198.18.0.11:9999"]),
            weights: [vec![1], vec![0], vec![1]],
            rooms: [vec![0], vec![0], vec![1]],
            pools: &[],
            segments: &[],
            saturated: [&[], &[], &[]],
        },
        SvcDef {
            forwarding: Forwarding::Nat,
            name: "big",
            vip: "198.18.100.5:7000",
            proto: 6,
            snat: &["198.18.0.1", "198.18.0.6"],
            ports: (30000, 30999),
            selection: Selection::LeastLoaded,
            backends: (0..n)
                .map(|i| match i % 8 {
                    0 => format!("198.18.0.{}:{}", 11 + i / 8 % 3, 7000 + i),
                    4 => format!("198.18.1.11:{}", 7000 + i),
                    _ => format!("198.18.0.{}:7000", 100 + i),
                })
                .collect(),
            weights: [
                (0..n).map(|i| [1, 2, 3, 0, 1, 4][i % 6]).collect(),
                (0..n)
                    .map(|i| if i % 2 == 1 { 0 } else { 1 + i as u32 % 5 })
                    .collect(),
                (0..n).map(|i| u32::from(i % 8 != 3)).collect(),
            ],
            rooms: [
                (0..n)
                    .map(|i| if i % 5 == 0 { 0 } else { 1 + i as u32 % 4 })
                    .collect(),
                (0..n).map(|i| [0, 2, 4][i % 3]).collect(),
                (0..n).map(|i| u32::from(i % 7 == 0)).collect(),
            ],
            pools: &[],
            segments: &[],
            saturated: [&[], &[], &[]],
        },
        // Pools: gold spills to silver, silver to bronze. Set 0: gold full,
        // silver takes its clients; set 1: every pool full, each client
        // stays in the first that can take a flow; set 2: no weight
        // anywhere, nothing can take one. Three clients are in segments
        // (one in gold, so that a spill to a pool with room is taken
        // whatever the key makes of the share buckets), the others go by
        // their share buckets (bronze has no share).
        SvcDef {
            forwarding: Forwarding::Nat,
            name: "tiers",
            vip: "198.18.100.6:80",
            proto: 6,
            snat: &["198.18.0.1"],
            ports: (10000, 32767),
            selection: Selection::Maglev,
            backends: strs(&[
                "198.18.0.11:80",
                "198.18.0.12:80",
                "198.18.0.13:80",
                "198.18.1.11:80",
            ]),
            weights: [vec![1, 1, 1, 1], vec![1, 2, 0, 1], vec![0, 0, 0, 0]],
            rooms: [vec![0, 0, 0, 0], vec![0, 0, 0, 0], vec![0, 0, 0, 0]],
            pools: &[
                ("gold", &[0], 60, Some(1)),
                ("silver", &[1, 2], 40, Some(2)),
                ("bronze", &[3], 0, None),
            ],
            segments: &[
                ("198.19.0.0/16", 2),
                ("198.18.1.0/24", 1),
                ("198.18.0.44/32", 0),
            ],
            saturated: [
                &[true, false, false],
                &[true, true, true],
                &[false, false, false],
            ],
        },
        // DSR over IPIP on an address of its own, so its bucket is DSR's
        // alone: every TCP and UDP packet to it goes to `router_dsr`.
        // Backends on both arms (XDP_TX and XDP_REDIRECT); set 2 has no
        // weight anywhere.
        SvcDef {
            forwarding: Forwarding::Ipip,
            name: "tunnel",
            vip: "198.18.100.7:8000",
            proto: 6,
            snat: &[],
            ports: (1024, 65535),
            selection: Selection::Maglev,
            backends: strs(&["198.18.0.11:8000", "198.18.0.12:8000", "198.18.1.11:8000"]),
            weights: [vec![1, 1, 1], vec![0, 1, 2], vec![0, 0, 0]],
            rooms: [vec![0, 0, 0], vec![0, 0, 0], vec![0, 0, 0]],
            pools: &[],
            segments: &[],
            saturated: [&[], &[], &[]],
        },
        // DSR over GUE beside NAT services on web's address: the bucket is
        // shared, so `router` looks the service up before handing over.
        SvcDef {
            forwarding: Forwarding::Gue { port: 6080 },
            name: "gue",
            vip: "198.18.100.1:9000",
            proto: 6,
            snat: &[],
            ports: (1024, 65535),
            selection: Selection::Maglev,
            backends: strs(&["198.18.0.13:9000", "198.18.1.11:9000"]),
            weights: [vec![1, 1], vec![1, 0], vec![2, 1]],
            rooms: [vec![0, 0], vec![0, 0], vec![0, 0]],
            pools: &[],
            segments: &[],
            saturated: [&[], &[], &[]],
        },
    ]
});

/// Index into SERVICES of the DSR service alone in its bucket.
pub(crate) const TUNNEL: usize = 8;

pub(crate) const CLIENTS: [&str; 5] = [
    "198.18.0.2",
    "198.18.0.3",
    "198.19.0.9",
    "198.18.0.44",
    "198.18.1.11",
];
/// 8080 is the port of the VIP on a SNAT address: a client of one service
/// on its own port meets another service there.
pub(crate) const CLIENT_PORTS: [u16; 9] =
    [40000, 40001, 10000, 20000, 1024, 55555, 8000, 33333, 8080];

pub(crate) fn specs(set: usize) -> Vec<ServiceSpec> {
    SERVICES
        .iter()
        .map(|s| ServiceSpec {
            forwarding: s.forwarding,
            name: s.name.into(),
            vip: s.vip.parse().unwrap_or_else(|e| panic!("{}: {e}", s.vip)),
            proto: s.proto,
            snat: s.snat.iter().map(|a| ip_of(wire(a)).into()).collect(),
            snat_port_min: s.ports.0,
            snat_port_max: s.ports.1,
            selection: s.selection,
            backends: s
                .backends
                .iter()
                .zip(&s.weights[set])
                .enumerate()
                .map(|(i, (b, w))| BackendSpec {
                    role: router::datapath::BackendRole::Primary,
                    name: format!("b{i}"),
                    address: b.parse().unwrap_or_else(|e| panic!("{b}: {e}")),
                    weight: *w,
                    max_in_flight: s.rooms[set][i],
                })
                .collect(),
            pools: s
                .pools
                .iter()
                .enumerate()
                .map(|(p, (name, members, share, fallback))| PoolSpec {
                    name: (*name).into(),
                    backends: members.iter().map(|i| format!("b{i}")).collect(),
                    share: *share,
                    fallback: *fallback,
                    saturated: s.saturated[set].get(p).copied().unwrap_or(false),
                })
                .collect(),
            segments: s
                .segments
                .iter()
                .map(|(cidr, pool)| {
                    let (a, len) = cidr.split_once('/').expect("cidr");
                    SegmentSpec {
                        addr: a.parse().expect("segment address"),
                        prefix_len: len.parse().expect("prefix length"),
                        pool: *pool,
                    }
                })
                .collect(),
        })
        .collect()
}

/// The model's view of `s`'s pools in weight set `set`: each pool's table
/// and scan list as the daemon builds them, its room, the share buckets
/// and the segments.
fn model_pools(
    s: &SvcDef,
    set: usize,
    input: &[MaglevBackend<'_>],
    members: &[model::Member],
) -> (Vec<model::pools::Pool>, Vec<u8>, Vec<model::pools::Segment>) {
    if s.pools.is_empty() {
        return (Vec::new(), Vec::new(), Vec::new());
    }
    let pools = s
        .pools
        .iter()
        .enumerate()
        .map(|(p, (_, of, _, fallback))| {
            let mine: Vec<MaglevBackend<'_>> = of.iter().map(|i| input[*i]).collect();
            let ids: Vec<u32> = mine.iter().map(|b| b.id).collect();
            let empty = of.iter().all(|i| s.weights[set][*i] == 0);
            let scan: Vec<model::Member> = members
                .iter()
                .filter(|m| ids.contains(&m.backend_id))
                .copied()
                .collect();
            // The daemon's rule for a pool's scan list is a service's.
            let scan = if s.selection == Selection::LeastLoaded && scan.len() <= SCAN_LIMIT {
                scan
            } else {
                Vec::new()
            };
            model::pools::Pool {
                table: maglev::build(&mine, TABLE_SIZE),
                members: scan,
                fallback: fallback.map(|f| f as u32),
                no_room: empty || s.saturated[set].get(p).copied().unwrap_or(false),
                empty,
            }
        })
        .collect();
    let shares: Vec<(&str, u32)> = s.pools.iter().map(|(n, _, sh, _)| (*n, *sh)).collect();
    let segments = s
        .segments
        .iter()
        .map(|(cidr, pool)| {
            let (a, len) = cidr.split_once('/').expect("cidr");
            let addr: Ipv4Addr = a.parse().expect("segment address");
            model::pools::Segment {
                addr: u32::from(addr),
                prefix_len: len.parse().expect("prefix length"),
                pool: *pool as u32,
            }
        })
        .collect();
    (pools, router::pools::share_table(&shares), segments)
}

/// A destination a flow may send to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dest {
    pub(crate) addr: u32,
    /// Host order.
    pub(crate) port: u16,
    pub(crate) proto: u8,
    /// Index into SERVICES when this is one's VIP, port and protocol.
    pub(crate) service: Option<usize>,
}

pub(crate) struct World {
    pub(crate) fx: Harness,
    /// Model configuration per weight set of the tables and scan lists
    /// (outer) and of the `BACKENDS` slots (inner).
    pub(crate) configs: Vec<Vec<Config>>,
    /// Which weight set the datapath serves now, which one its `BACKENDS`
    /// slots hold (another one while an apply is caught between writing
    /// them and flipping the tables), and which sets were checked against
    /// the kernel's Maglev tables and scan lists.
    pub(crate) live_set: usize,
    pub(crate) slot_set: usize,
    pub(crate) checked_sets: BTreeSet<usize>,
    pub(crate) dests: Vec<Dest>,
    /// Backend (address, port in host order) pool for stray replies.
    pub(crate) backends: Vec<(u32, u16)>,
    /// Service ids and backend ids whose counters are compared.
    pub(crate) service_ids: Vec<u32>,
    pub(crate) backend_ids: Vec<u32>,
    /// Per service (SERVICES order): its id and backend ids.
    pub(crate) ids: Vec<(u32, Vec<u32>)>,
    pub(crate) packets: u64,
    pub(crate) sessions: u64,
    /// Packets per reason and per verdict, for the closing summary.
    pub(crate) tally: BTreeMap<&'static str, u64>,
    /// The counters as the last session that passed left them.
    pub(crate) counters: Option<super::session::Counters>,
}

/// The loaded program in its namespace.
pub(crate) struct Harness {
    pub(crate) dp: Datapath,
    /// The daemon's mapping of the in-flight counts, read as the daemon
    /// reads them.
    pub(crate) load: Arc<LoadCounters>,
    /// The test's own writable mapping of them, for seeding.
    pub(crate) load_seed: LoadSeeder,
    pub(crate) arm0: u32,
    pub(crate) arm1: u32,
    pub(crate) _ns: EnteredNs,
}

pub(crate) fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An address in 198.18.0.0/15 that shares `addr`'s pre-filter bucket
/// and is none of `taken`.
pub(crate) fn bucket_neighbour(addr: u32, taken: &BTreeSet<u32>) -> u32 {
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    (0..1u32 << 17)
        .map(|i| u32::from_ne_bytes(Ipv4Addr::from(base + i).octets()))
        .find(|a| {
            *a != addr
                && !taken.contains(a)
                && model::filter_bucket(*a) == model::filter_bucket(addr)
        })
        .unwrap_or_else(|| panic!("no bucket neighbour of {}", ip_of(addr)))
}

impl World {
    /// A world whose datapath hashes flows with `flow_hash_key`, so that a
    /// seed replays the share buckets and Maglev picks too.
    pub(crate) fn new(flow_hash_key: [u32; 2]) -> Self {
        // An entry seeded 70 s old needs a clock that has run that long.
        let need = (AGES[3] + 5) * 1_000_000_000;
        let now = coarse_now_ns();
        if now < need {
            std::thread::sleep(Duration::from_nanos(need - now));
        }
        let ns = EnteredNs::new("rtdiff").expect("netns");
        let arm0 = ns
            .test_arm(
                ("df0", "df1"),
                "02:00:00:00:00:01",
                "198.18.0.1/24",
                &TEST_NEIGHBOURS,
            )
            .expect("arm 0");
        let arm1 = ns
            .test_arm(
                ("df2", "df3"),
                "02:00:00:00:01:01",
                "198.18.1.1/24",
                &[("198.18.1.11", "02:00:00:00:1b:00")],
            )
            .expect("arm 1");
        // The LRU tables split their entries among the possible CPUs
        // (BPF_F_NO_COMMON_LRU) and a CPU evicts once its share is used: a
        // session holds at most a few hundred entries, so every share must
        // hold that many (HALF_OPEN is at least 65,536 entries).
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .expect("possible CPUs") as u32;
        assert!(
            router_common::MIN_HALF_OPEN_TABLE_SIZE / cpus >= 256,
            "{cpus} possible CPUs leave HALF_OPEN too few entries per CPU for a session"
        );
        let mut dp = Datapath::load(LoadOptions {
            table_size: TABLE_SIZE,
            conn_table_size: (1024 * cpus).max(16_384),
            tcp_idle_ns: TCP_IDLE_S * 1_000_000_000,
            tcp_closing_ns: CLOSING_S * 1_000_000_000,
            udp_idle_ns: UDP_IDLE_S * 1_000_000_000,
            datapath_log: false,
            // The harness opens no sockets: the client's port is always
            // free of the host's, as the model has it.
            ephemeral_ports: (0, u16::MAX),
            flow_hash_key: Some(flow_hash_key),
        })
        .expect("load the router program");
        dp.apply(&specs(0)).expect("apply services");
        let fib_gen = Array::<_, u32>::try_from(dp.ebpf_mut().map("FIB_GEN").expect("FIB_GEN"))
            .expect("FIB_GEN")
            .get(&0, 0)
            .expect("FIB_GEN[0]");
        assert_ne!(fib_gen, 0, "a loaded datapath has a next-hop generation");
        // The model hashes with the key the datapath holds.
        assert_eq!(
            dp.flow_hash_key(),
            flow_hash_key,
            "the datapath took the key"
        );

        let mut ids = Vec::new();
        {
            let services: BpfHashMap<_, ServiceKey, Service> =
                BpfHashMap::try_from(dp.ebpf_mut().map("SERVICES").expect("SERVICES"))
                    .expect("SERVICES");
            for s in SERVICES.iter() {
                let vip: SocketAddrV4 = s.vip.parse().expect("vip");
                let key = ServiceKey {
                    addr: u32::from_ne_bytes(vip.ip().octets()),
                    port: vip.port().to_be(),
                    proto: s.proto,
                    _pad: 0,
                };
                ids.push((
                    services.get(&key, 0).expect("service in SERVICES").id,
                    Vec::new(),
                ));
            }
        }
        for (s, (_, bids)) in SERVICES.iter().zip(&mut ids) {
            *bids = (0..s.backends.len())
                .map(|i| dp.backend_id(s.name, &format!("b{i}")).expect("backend id"))
                .collect();
        }

        let mut fib = std::collections::HashMap::new();
        for (a, mac) in TEST_NEIGHBOURS {
            fib.insert(wire(a), hop(mac, ARM0_MAC, arm0));
        }
        fib.insert(
            wire("198.18.1.11"),
            hop("02:00:00:00:1b:00", ARM1_MAC, arm1),
        );
        let configs = (0..3)
            .map(|set| {
                (0..3)
                    .map(|slots| model_config(set, slots, &ids, &fib, (fib_gen, flow_hash_key)))
                    .collect()
            })
            .collect();

        let mut dests = Vec::new();
        let mut taken: BTreeSet<u32> = BTreeSet::new();
        for (i, s) in SERVICES.iter().enumerate() {
            let vip: SocketAddrV4 = s.vip.parse().expect("vip");
            let addr = u32::from_ne_bytes(vip.ip().octets());
            dests.push(Dest {
                addr,
                port: vip.port(),
                proto: s.proto,
                service: Some(i),
            });
            taken.insert(addr);
            taken.extend(s.snat.iter().map(|a| wire(a)));
            taken.extend(
                s.backends
                    .iter()
                    .map(|b| wire(b.split(':').next().unwrap_or(b.as_str()))),
            );
        }
        taken.extend(CLIENTS.iter().map(|c| wire(c)));
        let web = dests[0];
        let tunnel = dests[TUNNEL];
        let near_vip = bucket_neighbour(web.addr, &taken);
        let near_snat = bucket_neighbour(wire("198.18.0.1"), &taken);
        for (addr, port, proto) in [
            (web.addr, 8001, 6),             // the VIP, another port
            (web.addr, 8000, 17),            // the VIP, another protocol
            (web.addr, 8000, 1),             // the VIP, ICMP
            (wire("198.18.0.1"), 40000, 6),  // a SNAT address
            (wire("198.18.0.5"), 40000, 6),  // a SNAT address that is a VIP too
            (wire("198.18.0.7"), 50000, 17), // a SNAT address, UDP
            (near_vip, 8000, 6),             // the VIP's bucket neighbour
            (near_snat, 40000, 6),           // a SNAT address's bucket neighbour
            (wire("198.18.0.99"), 8000, 6),  // nobody
            (tunnel.addr, 8001, 6),          // the DSR-only address, another port
            (tunnel.addr, 8000, 17),         // the DSR-only address, UDP
            (tunnel.addr, 8000, 1),          // the DSR-only address, ICMP
        ] {
            dests.push(Dest {
                addr,
                port,
                proto,
                service: None,
            });
        }
        // Stray replies come from the small services' backends and a few
        // of the large one's.
        let mut backends: BTreeSet<(u32, u16)> = BTreeSet::new();
        for (i, s) in SERVICES.iter().enumerate() {
            let n = if i == BIG { 4 } else { s.backends.len() };
            for b in &s.backends[..n] {
                let a: SocketAddrV4 = b.parse().expect("backend");
                backends.insert((u32::from_ne_bytes(a.ip().octets()), a.port()));
            }
        }
        let mut service_ids: Vec<u32> = ids.iter().map(|(s, _)| *s).collect();
        service_ids.push(MAX_SERVICES - 1);
        let mut backend_ids: Vec<u32> = ids.iter().flat_map(|(_, b)| b.clone()).collect();
        backend_ids.push(MAX_BACKENDS - 1);

        World {
            fx: Harness {
                load: dp.load_counters(),
                load_seed: LoadSeeder::map(&mut dp),
                dp,
                arm0,
                arm1,
                _ns: ns,
            },
            configs,
            live_set: 0,
            slot_set: 0,
            checked_sets: BTreeSet::new(),
            dests,
            backends: backends.into_iter().collect(),
            service_ids,
            backend_ids,
            ids,
            packets: 0,
            sessions: 0,
            tally: BTreeMap::new(),
            counters: None,
        }
    }
}

pub(crate) fn mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, p) in s.split(':').enumerate() {
        m[i] = u8::from_str_radix(p, 16).unwrap_or_else(|e| panic!("mac {s}: {e}"));
    }
    m
}

pub(crate) fn hop(dmac: &str, smac: [u8; 6], ifindex: u32) -> Hop {
    Hop {
        dmac: mac(dmac),
        smac,
        ifindex,
        fib_gen: 0,
    }
}

/// The model's configuration with the tables and scan lists of weight set
/// `set` and the `BACKENDS` weights of set `slots`.
pub(crate) fn model_config(
    set: usize,
    slots: usize,
    ids: &[(u32, Vec<u32>)],
    fib: &std::collections::HashMap<u32, Hop>,
    (fib_gen, flow_hash_key): (u32, [u32; 2]),
) -> Config {
    let mut services = std::collections::HashMap::new();
    let mut backends = std::collections::HashMap::new();
    let mut snat_addrs = std::collections::HashSet::new();
    for (s, (sid, bids)) in SERVICES.iter().zip(ids) {
        let addrs: Vec<SocketAddrV4> = s
            .backends
            .iter()
            .map(|b| b.parse().expect("backend"))
            .collect();
        let keys: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        let input: Vec<MaglevBackend<'_>> = keys
            .iter()
            .zip(bids)
            .zip(&s.weights[set])
            .map(|((key, id), weight)| MaglevBackend {
                key,
                id: *id,
                weight: *weight,
            })
            .collect();
        for (i, (a, id)) in addrs.iter().zip(bids).enumerate() {
            backends.insert(
                *id,
                model::Backend {
                    addr: u32::from_ne_bytes(a.ip().octets()),
                    port: a.port().to_be(),
                    weight: s.weights[slots][i],
                    max_in_flight: s.rooms[slots][i],
                },
            );
        }
        // The daemon's scan list: the backends with weight, in spec order,
        // for a least-loaded service small enough to scan.
        let members: Vec<model::Member> = bids
            .iter()
            .enumerate()
            .filter(|(i, _)| s.weights[set][*i] > 0)
            .map(|(i, id)| model::Member {
                backend_id: *id,
                weight: s.weights[set][i],
                max_in_flight: s.rooms[set][i],
            })
            .collect();
        let members = if s.selection == Selection::LeastLoaded && members.len() <= SCAN_LIMIT {
            members
        } else {
            Vec::new()
        };
        // A pool's scan list is the pooled members under the same limit.
        let pooled_members: Vec<model::Member> = bids
            .iter()
            .enumerate()
            .filter(|(i, _)| s.weights[set][*i] > 0)
            .map(|(i, id)| model::Member {
                backend_id: *id,
                weight: s.weights[set][i],
                max_in_flight: s.rooms[set][i],
            })
            .collect();
        let pools_of = model_pools(s, set, &input, &pooled_members);
        let vip: SocketAddrV4 = s.vip.parse().expect("vip");
        let snat: Vec<u32> = s.snat.iter().map(|a| wire(a)).collect();
        snat_addrs.extend(snat.iter().copied());
        services.insert(
            (
                u32::from_ne_bytes(vip.ip().octets()),
                vip.port().to_be(),
                s.proto,
            ),
            model::Service {
                id: *sid,
                snat,
                port_min: s.ports.0,
                port_max: s.ports.1,
                table: maglev::build(&input, TABLE_SIZE),
                pools: pools_of.0,
                shares: pools_of.1,
                segments: pools_of.2,
                selection: match s.selection {
                    Selection::Maglev => SELECT_MAGLEV,
                    Selection::LeastLoaded => SELECT_LEAST_LOADED,
                },
                members,
                forwarding: match s.forwarding {
                    Forwarding::Nat => FORWARD_NAT,
                    Forwarding::Ipip => FORWARD_IPIP,
                    Forwarding::Gue { .. } => FORWARD_GUE,
                },
                gue_port: match s.forwarding {
                    Forwarding::Gue { port } => port.to_be(),
                    _ => 0,
                },
            },
        );
    }
    // The host routes from its address on the arm a destination is on.
    let sources = fib
        .iter()
        .map(|(dst, hop)| {
            let on_arm1 = hop.smac == ARM1_MAC;
            (
                *dst,
                wire(if on_arm1 { "198.18.1.1" } else { "198.18.0.1" }),
            )
        })
        .collect();
    Config {
        services,
        backends,
        snat_addrs,
        sources,
        fib: fib.clone(),
        fib_gen,
        flow_hash_key,
        table_size: TABLE_SIZE,
        timeouts: Timeouts {
            tcp_idle: TCP_IDLE_S,
            tcp_closing: CLOSING_S,
            udp_idle: UDP_IDLE_S,
        },
    }
}
