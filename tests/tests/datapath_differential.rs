//! Differential test of the datapath: sessions of random map state and
//! random packets, well-formed and not, go through BPF_PROG_TEST_RUN and
//! through the userspace reference model (`router_tests::model`). For every
//! packet the verdict, the output bytes and the reason counters must agree,
//! and a rewritten packet's checksums must verify on their own; after every
//! session the traffic counters, the latency sample counts and both
//! connection tables must agree too.
//!
//! One program and namespace serve every session; a session starts from
//! empty tables, seeds them (both sides alike), and runs its packets. Seeded
//! ages sit far from every timeout (see the model's module docs), so the
//! kernel's clock decides nothing the model cannot.
//!
//! The seed is fixed so a run is repeatable; `ROUTER_DIFFTEST_SEED=<n>`
//! picks another and `ROUTER_DIFFTEST_SEED=random` a fresh one (printed).
//! `ROUTER_DIFFTEST_PACKETS` changes how many packets make a run.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions},
};
use proptest::{
    prelude::*,
    test_runner::{Config as PtConfig, RngAlgorithm, TestCaseError, TestRng, TestRunner},
};
use router::{
    datapath::{BackendSpec, Datapath, LoadOptions, ServiceSpec},
    maglev::{self, MaglevBackend},
};
use router_common::{
    CONN_AWAIT_REQUEST, CONN_AWAIT_RESPONSE, CONN_AWAIT_SYNACK, CONN_CLOSING, CONN_REPLY,
    ConnEntry, ConnKey, LATENCY_KINDS, LatencyHistogram, MAX_BACKENDS, MAX_SERVICES, Service,
    ServiceKey, TrafficCounters, reasons,
};
use router_tests::{
    kernel_ns::{EnteredNs, TEST_NEIGHBOURS},
    model::{self, Config, Entry, Hop, Model, Table, Timeouts, Traffic, Tuple, nat},
    packet::{Packet, checksums_valid},
};

// ---------------------------------------------------------------------------
// The world every session runs in: services, addresses, timeouts.

/// Timeouts, in seconds, and the ages seeded around them: every age is at
/// least 10 s from every timeout, and a session must finish in `MAX_SESSION`.
const CLOSING_S: u64 = 10;
const UDP_IDLE_S: u64 = 30;
const TCP_IDLE_S: u64 = 50;
const AGES: [u64; 4] = [0, 20, 40, 70];
const MAX_SESSION: Duration = Duration::from_secs(5);

const TABLE_SIZE: u32 = 251;
const ARM0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const ARM1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];

fn wire(a: &str) -> u32 {
    let ip: Ipv4Addr = a.parse().unwrap_or_else(|e| panic!("address {a}: {e}"));
    u32::from_ne_bytes(ip.octets())
}

fn ip_of(w: u32) -> Ipv4Addr {
    Ipv4Addr::from(w.to_ne_bytes())
}

struct SvcDef {
    name: &'static str,
    vip: &'static str,
    proto: u8,
    snat: &'static [&'static str],
    ports: (u16, u16),
    backends: &'static [&'static str],
    /// Weights per weight set.
    weights: [&'static [u32]; 3],
}

/// Chosen for collisions: S0 and S1 share a backend and a SNAT address,
/// S1's two-port range runs out, S4 listens on one of S0's SNAT
/// addresses, S3 has no backend with weight, S5 has one SNAT port.
const SERVICES: [SvcDef; 6] = [
    SvcDef {
        name: "web",
        vip: "198.18.100.1:8000",
        proto: 6,
        snat: &["198.18.0.1", "198.18.0.5", "198.18.0.6"],
        ports: (10000, 32767),
        backends: &[
            "198.18.0.11:8000",
            "198.18.0.12:8000",
            "198.18.0.13:8000",
            "198.18.1.11:8000",
            "198.18.0.44:8000",
        ],
        weights: [&[1, 1, 1, 1, 1], &[0, 3, 1, 0, 1], &[0, 0, 0, 0, 0]],
    },
    SvcDef {
        name: "narrow",
        vip: "198.18.100.2:443",
        proto: 6,
        snat: &["198.18.0.1"],
        ports: (40000, 40001),
        backends: &["198.18.0.11:8000", "198.18.0.12:8000"],
        weights: [&[1, 1], &[0, 1], &[1, 0]],
    },
    SvcDef {
        name: "dns",
        vip: "198.18.100.1:5353",
        proto: 17,
        snat: &["198.18.0.1", "198.18.0.8"],
        ports: (20000, 20063),
        backends: &["198.18.0.12:53", "198.18.0.13:53", "198.18.1.11:53"],
        weights: [&[1, 1, 1], &[2, 0, 1], &[0, 0, 1]],
    },
    SvcDef {
        name: "dark",
        vip: "198.18.100.3:80",
        proto: 6,
        snat: &["198.18.0.1"],
        ports: (10000, 10100),
        backends: &["198.18.0.11:80"],
        weights: [&[0], &[0], &[0]],
    },
    SvcDef {
        name: "on-snat",
        vip: "198.18.0.5:8080",
        proto: 6,
        snat: &["198.18.0.9", "198.18.0.10", "198.18.0.14", "198.18.0.15"],
        ports: (1024, 65535),
        backends: &["198.18.0.13:8080", "198.18.0.11:8080"],
        weights: [&[1, 2], &[1, 0], &[0, 0]],
    },
    SvcDef {
        name: "one-port",
        vip: "198.18.100.4:9999",
        proto: 17,
        snat: &["198.18.0.7"],
        ports: (50000, 50000),
        backends: &["198.18.0.11:9999"],
        weights: [&[1], &[0], &[1]],
    },
];

const CLIENTS: [&str; 5] = [
    "198.18.0.2",
    "198.18.0.3",
    "198.19.0.9",
    "198.18.0.44",
    "198.18.1.11",
];
const CLIENT_PORTS: [u16; 8] = [40000, 40001, 10000, 20000, 1024, 55555, 8000, 33333];

fn specs(set: usize) -> Vec<ServiceSpec> {
    SERVICES
        .iter()
        .map(|s| ServiceSpec {
            name: s.name.into(),
            vip: s.vip.parse().unwrap_or_else(|e| panic!("{}: {e}", s.vip)),
            proto: s.proto,
            snat: s.snat.iter().map(|a| ip_of(wire(a))).collect(),
            snat_port_min: s.ports.0,
            snat_port_max: s.ports.1,
            backends: s
                .backends
                .iter()
                .zip(s.weights[set])
                .enumerate()
                .map(|(i, (b, w))| BackendSpec {
                    name: format!("b{i}"),
                    address: b.parse().unwrap_or_else(|e| panic!("{b}: {e}")),
                    weight: *w,
                })
                .collect(),
        })
        .collect()
}

/// A destination a flow may send to.
#[derive(Clone, Copy, Debug)]
struct Dest {
    addr: u32,
    /// Host order.
    port: u16,
    proto: u8,
    /// Index into SERVICES when this is one's VIP, port and protocol.
    service: Option<usize>,
}

struct World {
    fx: Harness,
    /// Model configuration per weight set.
    configs: Vec<Config>,
    /// Which weight set the datapath serves now, and which were checked
    /// against the kernel's Maglev tables.
    live_set: usize,
    checked_sets: BTreeSet<usize>,
    dests: Vec<Dest>,
    /// Backend (address, port in host order) pool for stray replies.
    backends: Vec<(u32, u16)>,
    /// Service ids and backend ids whose counters are compared.
    service_ids: Vec<u32>,
    backend_ids: Vec<u32>,
    /// Per service (SERVICES order): its id and backend ids.
    ids: Vec<(u32, Vec<u32>)>,
    packets: u64,
    sessions: u64,
    /// Packets per reason and per verdict, for the closing summary.
    tally: BTreeMap<&'static str, u64>,
}

/// The loaded program in its namespace.
struct Harness {
    dp: Datapath,
    arm0: u32,
    arm1: u32,
    _ns: EnteredNs,
}

fn coarse_now_ns() -> u64 {
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
fn bucket_neighbour(addr: u32, taken: &BTreeSet<u32>) -> u32 {
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
    fn new() -> Self {
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
        let mut dp = Datapath::load(LoadOptions {
            table_size: TABLE_SIZE,
            conn_table_size: 16_384,
            tcp_idle_ns: TCP_IDLE_S * 1_000_000_000,
            tcp_closing_ns: CLOSING_S * 1_000_000_000,
            udp_idle_ns: UDP_IDLE_S * 1_000_000_000,
            datapath_log: false,
        })
        .expect("load the router program");
        dp.apply(&specs(0)).expect("apply services");
        let fib_gen = Array::<_, u32>::try_from(dp.ebpf_mut().map("FIB_GEN").expect("FIB_GEN"))
            .expect("FIB_GEN")
            .get(&0, 0)
            .expect("FIB_GEN[0]");
        assert_ne!(fib_gen, 0, "a loaded datapath has a next-hop generation");

        let mut ids = Vec::new();
        {
            let services: BpfHashMap<_, ServiceKey, Service> =
                BpfHashMap::try_from(dp.ebpf_mut().map("SERVICES").expect("SERVICES"))
                    .expect("SERVICES");
            for s in &SERVICES {
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
            .map(|set| model_config(set, &ids, &fib, fib_gen))
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
                    .map(|b| wire(b.split(':').next().unwrap_or(b))),
            );
        }
        taken.extend(CLIENTS.iter().map(|c| wire(c)));
        let web = dests[0];
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
        ] {
            dests.push(Dest {
                addr,
                port,
                proto,
                service: None,
            });
        }
        let mut backends: BTreeSet<(u32, u16)> = BTreeSet::new();
        for s in &SERVICES {
            for b in s.backends {
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
                dp,
                arm0,
                arm1,
                _ns: ns,
            },
            configs,
            live_set: 0,
            checked_sets: BTreeSet::new(),
            dests,
            backends: backends.into_iter().collect(),
            service_ids,
            backend_ids,
            ids,
            packets: 0,
            sessions: 0,
            tally: BTreeMap::new(),
        }
    }
}

fn mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, p) in s.split(':').enumerate() {
        m[i] = u8::from_str_radix(p, 16).unwrap_or_else(|e| panic!("mac {s}: {e}"));
    }
    m
}

fn hop(dmac: &str, smac: [u8; 6], ifindex: u32) -> Hop {
    Hop {
        dmac: mac(dmac),
        smac,
        ifindex,
        fib_gen: 0,
    }
}

fn model_config(
    set: usize,
    ids: &[(u32, Vec<u32>)],
    fib: &std::collections::HashMap<u32, Hop>,
    fib_gen: u32,
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
            .zip(s.weights[set])
            .map(|((key, id), weight)| MaglevBackend {
                key,
                id: *id,
                weight: *weight,
            })
            .collect();
        for (a, id) in addrs.iter().zip(bids) {
            backends.insert(
                *id,
                model::Backend {
                    addr: u32::from_ne_bytes(a.ip().octets()),
                    port: a.port().to_be(),
                },
            );
        }
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
            },
        );
    }
    Config {
        services,
        backends,
        snat_addrs,
        fib: fib.clone(),
        fib_gen,
        table_size: TABLE_SIZE,
        timeouts: Timeouts {
            tcp_idle: TCP_IDLE_S,
            tcp_closing: CLOSING_S,
            udp_idle: UDP_IDLE_S,
        },
    }
}

// ---------------------------------------------------------------------------
// Kernel access.

fn xdp_md(ifindex: u32, len: usize) -> Vec<u8> {
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
    let mut v = Vec::with_capacity(24);
    for x in [0u32, len as u32, 0, ifindex, 0, 0] {
        v.extend_from_slice(&x.to_ne_bytes());
    }
    v
}

impl Harness {
    fn run(&mut self, input: &[u8], ingress: u32) -> (u32, Vec<u8>) {
        let ctx = xdp_md(ingress, input.len());
        let mut out = vec![0u8; input.len() + 256];
        let program = self.dp.program_mut().expect("program");
        let r = program
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn table(&mut self, t: Table) -> BpfHashMap<&mut MapData, ConnKey, ConnEntry> {
        let name = match t {
            Table::Conns => "CONNS",
            Table::HalfOpen => "HALF_OPEN",
        };
        BpfHashMap::try_from(self.dp.ebpf_mut().map_mut(name).expect("table")).expect(name)
    }

    fn entries(&mut self, t: Table) -> Vec<(ConnKey, ConnEntry)> {
        self.table(t)
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .expect("reading a table")
    }

    fn clear(&mut self) {
        for t in [Table::Conns, Table::HalfOpen] {
            let keys: Vec<ConnKey> = self
                .table(t)
                .keys()
                .collect::<Result<_, _>>()
                .expect("table keys");
            let mut map = self.table(t);
            for k in keys {
                map.remove(&k).expect("removing an entry");
            }
        }
    }

    fn reasons(&mut self) -> Vec<u64> {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.dp.ebpf_mut().map("REASONS").expect("REASONS"))
                .expect("REASONS");
        (0..reasons::COUNT)
            .map(|i| m.get(&i, 0).expect("reason").iter().sum())
            .collect()
    }

    fn traffic(&mut self, map: &str, ids: &[u32]) -> BTreeMap<u32, [u64; 4]> {
        let m: PerCpuArray<_, TrafficCounters> =
            PerCpuArray::try_from(self.dp.ebpf_mut().map(map).expect("stats")).expect("stats");
        ids.iter()
            .map(|id| {
                let mut sum = [0u64; 4];
                for c in m.get(id, 0).expect("counters").iter() {
                    sum[0] += c.packets;
                    sum[1] += c.bytes;
                    sum[2] += c.new_conns;
                    sum[3] += c.reply_packets;
                }
                (*id, sum)
            })
            .collect()
    }

    fn latency_counts(&mut self, backend_ids: &[u32]) -> BTreeMap<(u32, u32), u64> {
        let m: PerCpuArray<_, LatencyHistogram> =
            PerCpuArray::try_from(self.dp.ebpf_mut().map("LATENCY").expect("LATENCY"))
                .expect("LATENCY");
        let mut out = BTreeMap::new();
        for b in backend_ids {
            for kind in 0..LATENCY_KINDS {
                let n: u64 = m
                    .get(&(b * LATENCY_KINDS + kind), 0)
                    .expect("histogram")
                    .iter()
                    .map(|h| h.buckets.iter().sum::<u64>())
                    .sum();
                out.insert((*b, kind), n);
            }
        }
        out
    }

    /// The live Maglev table half of service `sid`, as the kernel reads it.
    fn live_table(&mut self, key: ServiceKey) -> Vec<u32> {
        let services: BpfHashMap<_, ServiceKey, Service> =
            BpfHashMap::try_from(self.dp.ebpf_mut().map("SERVICES").expect("SERVICES"))
                .expect("SERVICES");
        let svc = services.get(&key, 0).expect("service");
        let tables: Array<_, u32> = Array::try_from(
            self.dp
                .ebpf_mut()
                .map("MAGLEV_TABLES")
                .expect("MAGLEV_TABLES"),
        )
        .expect("MAGLEV_TABLES");
        let base = (svc.id * 2 + (svc.active_table & 1)) * TABLE_SIZE;
        (0..TABLE_SIZE)
            .map(|i| tables.get(&(base + i), 0).expect("slot"))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Sessions as proptest generates them.

#[derive(Clone, Copy, Debug)]
enum Age {
    Fresh,
    /// Past the closing timeout, within both idle timeouts.
    Mid,
    /// Past the UDP idle timeout, within TCP's.
    Old,
    /// Past every timeout.
    Ancient,
}

impl Age {
    fn secs(self) -> u64 {
        AGES[self as usize]
    }
}

fn age() -> impl Strategy<Value = Age> {
    prop_oneof![
        6 => Just(Age::Fresh),
        1 => Just(Age::Mid),
        1 => Just(Age::Old),
        1 => Just(Age::Ancient),
    ]
}

#[derive(Clone, Copy, Debug)]
enum HopSeed {
    None,
    /// Cached under the live generation, with whatever MACs and interface.
    Cached {
        mac: u8,
        ifindex: u8,
    },
    /// Cached under an older generation.
    Outdated,
}

fn hop_seed() -> impl Strategy<Value = HopSeed> {
    prop_oneof![
        3 => Just(HopSeed::None),
        2 => (any::<u8>(), 0u8..3).prop_map(|(mac, ifindex)| HopSeed::Cached { mac, ifindex }),
        1 => Just(HopSeed::Outdated),
    ]
}

/// How one seeded entry looks, apart from its key and translation.
#[derive(Clone, Copy, Debug)]
struct Placed {
    table: Table,
    age: Age,
    closing: bool,
    /// Subset of the CONN_AWAIT_* bits.
    awaits: u8,
    hop: HopSeed,
}

fn table() -> impl Strategy<Value = Table> {
    prop_oneof![Just(Table::Conns), Just(Table::HalfOpen)]
}

fn placed() -> impl Strategy<Value = Placed> {
    (
        table(),
        age(),
        prop::bool::weighted(0.2),
        0u8..8,
        hop_seed(),
    )
        .prop_map(|(table, age, closing, awaits, hop)| Placed {
            table,
            age,
            closing,
            awaits,
            hop,
        })
}

/// Whose reply a seeded reply entry is.
#[derive(Clone, Copy, Debug)]
enum Owner {
    /// The flow's own.
    Own,
    /// Another client's, for the same VIP.
    Client(u8),
    /// Another VIP's.
    Vip(u8),
}

fn owner() -> impl Strategy<Value = Owner> {
    prop_oneof![
        6 => Just(Owner::Own),
        1 => any::<u8>().prop_map(Owner::Client),
        1 => any::<u8>().prop_map(Owner::Vip),
    ]
}

#[derive(Clone, Debug)]
enum Seed {
    /// Both directions of a flow (either may be missing: an eviction), on
    /// its Maglev pick or another backend, on the SNAT pair of a probe.
    Flow {
        flow: u8,
        backend: Option<u8>,
        attempt: u8,
        fwd: Option<Placed>,
        reply: Option<(Placed, Owner)>,
    },
    /// Something at `attempt`'s reply key of a flow's pick: another
    /// client's reply entry, or any entry at all.
    Squatter {
        flow: u8,
        attempt: u8,
        at: Placed,
        owner: Owner,
        reply: bool,
    },
    /// Other clients' reply entries on the first `upto` candidates of a
    /// flow's pick: deep probes and exhaustion.
    Wall { flow: u8, upto: u8, at: Placed },
    /// An entry at a flow's own key with an arbitrary translation.
    Odd {
        flow: u8,
        at: Placed,
        to: (u8, u8),
        reply: bool,
    },
}

fn seed() -> impl Strategy<Value = Seed> {
    prop_oneof![
        4 => (
            any::<u8>(),
            prop::option::weighted(0.2, any::<u8>()),
            prop_oneof![3 => Just(0u8), 1 => 1u8..=8],
            prop::option::weighted(0.85, placed()),
            prop::option::weighted(0.85, (placed(), owner())),
        )
            .prop_map(|(flow, backend, attempt, fwd, reply)| Seed::Flow {
                flow,
                backend,
                attempt,
                fwd,
                reply,
            }),
        2 => (any::<u8>(), 0u8..=8, placed(), owner(), prop::bool::weighted(0.8)).prop_map(
            |(flow, attempt, at, owner, reply)| Seed::Squatter {
                flow,
                attempt,
                at,
                owner,
                reply,
            }
        ),
        1 => (any::<u8>(), 1u8..=9, placed()).prop_map(|(flow, upto, at)| Seed::Wall {
            flow,
            upto,
            at
        }),
        1 => (any::<u8>(), placed(), any::<(u8, u8)>(), any::<bool>()).prop_map(
            |(flow, at, to, reply)| Seed::Odd {
                flow,
                at,
                to,
                reply
            }
        ),
    ]
}

/// A client's flow: (client, client port, destination), as pool indices.
#[derive(Clone, Copy, Debug)]
struct FlowSpec {
    client: u8,
    port: u8,
    dest: u8,
}

#[derive(Clone, Copy, Debug)]
enum Dir {
    /// Client to destination.
    Fwd,
    /// Backend to SNAT address, on the pair the flow's forward entry has,
    /// or else on the SNAT pair of a probe of its Maglev pick.
    Reply(u8),
    /// Some backend to a SNAT address and port of the pools.
    Stray(u8, u8),
}

#[derive(Clone, Copy, Debug)]
enum Mutation {
    None,
    /// Cut to 14 + n % (len - 14) bytes.
    Truncate(u8),
    Version(u8),
    Ihl(u8),
    /// Total length changed by this much.
    TotLen(i8),
    Doff(u8),
    /// UDP length changed by this much.
    UdpLen(i8),
    /// Flags and fragment offset.
    Frag(u16),
    /// IP options of this many words (1..=10).
    Options(u8),
    Proto(u8),
    EtherType(u16),
    /// Checksums XORed with these (a wrong checksum is carried, not fixed).
    BadIpChecksum(u16),
    BadL4Checksum(u16),
    /// Ethernet padding after the datagram.
    Padding(u8),
    UdpNoChecksum,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        40 => Just(Mutation::None),
        2 => any::<u8>().prop_map(Mutation::Truncate),
        1 => any::<u8>().prop_map(Mutation::Version),
        2 => (0u8..16).prop_map(Mutation::Ihl),
        2 => any::<i8>().prop_map(Mutation::TotLen),
        2 => (0u8..16).prop_map(Mutation::Doff),
        2 => any::<i8>().prop_map(Mutation::UdpLen),
        1 => prop_oneof![Just(0x2000u16), Just(0x0010), Just(0x8000), Just(0x3fff), any::<u16>()]
            .prop_map(Mutation::Frag),
        1 => (1u8..=10).prop_map(Mutation::Options),
        1 => prop_oneof![Just(1u8), Just(47), Just(132), any::<u8>()].prop_map(Mutation::Proto),
        1 => prop_oneof![Just(0x86ddu16), Just(0x0806), Just(0x8100), any::<u16>()]
            .prop_map(Mutation::EtherType),
        2 => (1u16..).prop_map(Mutation::BadIpChecksum),
        2 => (1u16..).prop_map(Mutation::BadL4Checksum),
        2 => (1u8..40).prop_map(Mutation::Padding),
        2 => Just(Mutation::UdpNoChecksum),
    ]
}

#[derive(Clone, Debug)]
struct PacketSpec {
    flow: u8,
    dir: Dir,
    flags: u8,
    payload: u8,
    /// Arrives on arm 1 instead of arm 0.
    other_arm: bool,
    mutation: Mutation,
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;

fn tcp_flags() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => Just(SYN),
        2 => Just(SYN | ACK),
        4 => Just(ACK),
        3 => Just(ACK | PSH),
        2 => Just(FIN | ACK),
        1 => Just(RST),
        1 => Just(RST | ACK),
        1 => any::<u8>(),
    ]
}

#[derive(Clone, Debug)]
enum Step {
    Packet(PacketSpec),
    /// The LRU drops one entry: the flow's forward entry or the reply
    /// entry it points at, from either table.
    Evict {
        flow: u8,
        reply: bool,
        table: Table,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let packet = (
        any::<u8>(),
        prop_oneof![
            6 => Just(Dir::Fwd),
            3 => prop_oneof![4 => Just(0u8), 1 => 1u8..=8].prop_map(Dir::Reply),
            1 => any::<(u8, u8)>().prop_map(|(a, b)| Dir::Stray(a, b)),
        ],
        tcp_flags(),
        prop_oneof![3 => Just(0u8), 1 => 1u8..40],
        prop::bool::weighted(0.15),
        mutation(),
    )
        .prop_map(|(flow, dir, flags, payload, other_arm, mutation)| {
            Step::Packet(PacketSpec {
                flow,
                dir,
                flags,
                payload,
                other_arm,
                mutation,
            })
        });
    prop_oneof![
        20 => packet,
        1 => (any::<u8>(), any::<bool>(), table())
            .prop_map(|(flow, reply, table)| Step::Evict { flow, reply, table }),
    ]
}

#[derive(Clone, Debug)]
struct Session {
    weights: usize,
    flows: Vec<FlowSpec>,
    seeds: Vec<Seed>,
    steps: Vec<Step>,
}

fn session(dests: usize) -> impl Strategy<Value = Session> {
    let flow = (
        0..CLIENTS.len() as u8,
        0..CLIENT_PORTS.len() as u8,
        prop_oneof![
            3 => 0u8..SERVICES.len() as u8,
            1 => 0..dests as u8,
        ],
    )
        .prop_map(|(client, port, dest)| FlowSpec { client, port, dest });
    (
        prop_oneof![16 => Just(0usize), 1 => Just(1), 1 => Just(2)],
        prop::collection::vec(flow, 1..=6),
        prop::collection::vec(seed(), 0..=8),
        prop::collection::vec(step(), 1..=44),
    )
        .prop_map(|(weights, flows, seeds, steps)| Session {
            weights,
            flows,
            seeds,
            steps,
        })
}

// ---------------------------------------------------------------------------
// Running a session.

/// A flow's key and, if it goes to a service, that service's index.
fn flow_key(w: &World, f: &FlowSpec) -> (ConnKey, Option<usize>) {
    let d = w.dests[usize::from(f.dest) % w.dests.len()];
    let key = ConnKey {
        src_addr: wire(CLIENTS[usize::from(f.client) % CLIENTS.len()]),
        dst_addr: d.addr,
        src_port: CLIENT_PORTS[usize::from(f.port) % CLIENT_PORTS.len()].to_be(),
        dst_port: d.port.to_be(),
        proto: if d.proto == 1 { 6 } else { d.proto },
        _pad: [0; 3],
    };
    (key, d.service)
}

fn pick<T: Copy>(pool: &[T], i: u8) -> T {
    pool[usize::from(i) % pool.len()]
}

impl World {
    fn cfg(&self) -> &Config {
        &self.configs[self.live_set]
    }

    fn service_of(&self, s: usize) -> &model::Service {
        let def = &SERVICES[s];
        let vip: SocketAddrV4 = def.vip.parse().expect("vip");
        &self.cfg().services[&(
            u32::from_ne_bytes(vip.ip().octets()),
            vip.port().to_be(),
            def.proto,
        )]
    }

    /// Backend (id, address, wire port) for a flow: its Maglev pick, or a
    /// chosen one of its service (any service's for a non-service flow).
    fn backend_for(
        &self,
        key: &ConnKey,
        svc: usize,
        choice: Option<u8>,
    ) -> Option<(u32, u32, u16)> {
        let s = self.service_of(svc);
        let id = match choice {
            Some(c) => pick(&self.ids[svc].1, c),
            None => {
                let id = Model::new(self.cfg().clone()).pick(key, s);
                if id == router_common::NO_BACKEND {
                    pick(&self.ids[svc].1, 0)
                } else {
                    id
                }
            }
        };
        self.cfg().backends.get(&id).map(|b| (id, b.addr, b.port))
    }

    /// The reply key of `key`'s `attempt`-th SNAT candidate on `backend`.
    fn candidate(&self, key: &ConnKey, svc: usize, attempt: u8) -> (u32, u16) {
        let c = Model::snat_candidates(key, self.service_of(svc));
        c[usize::from(attempt) % c.len()]
    }

    fn hop_of(&self, h: HopSeed) -> Hop {
        let gen_now = self.cfg().fib_gen;
        match h {
            HopSeed::None => Hop::default(),
            HopSeed::Cached { mac, ifindex } => Hop {
                dmac: [0x02, 0, 0, 0, 0x5e, mac],
                smac: [0x02, 0, 0, 0, 0x5f, mac],
                ifindex: [self.fx.arm0, self.fx.arm1, 77][usize::from(ifindex) % 3],
                fib_gen: gen_now,
            },
            HopSeed::Outdated => Hop {
                dmac: [0x02, 0, 0, 0, 0x6e, 1],
                smac: [0x02, 0, 0, 0, 0x6f, 1],
                ifindex: self.fx.arm0,
                fib_gen: gen_now.wrapping_add(1),
            },
        }
    }

    fn entry(&self, to: Tuple, ids: (u32, u32), reply: bool, p: &Placed) -> Entry {
        let awaits = [CONN_AWAIT_SYNACK, CONN_AWAIT_REQUEST, CONN_AWAIT_RESPONSE]
            .iter()
            .enumerate()
            .filter(|(i, _)| p.awaits & (1 << i) != 0)
            .fold(0, |a, (_, b)| a | b);
        Entry {
            to,
            backend_id: ids.1,
            service_id: ids.0,
            flags: awaits
                | if reply { CONN_REPLY } else { 0 }
                | if p.closing { CONN_CLOSING } else { 0 },
            hop: self.hop_of(p.hop),
            age: p.age.secs(),
        }
    }

    /// Resolves seeds into entries, in order (a later one at the same key
    /// replaces an earlier one).
    fn seed_entries(&self, s: &Session) -> Vec<(Table, ConnKey, Entry)> {
        let mut out = Vec::new();
        for seed in &s.seeds {
            match seed {
                Seed::Flow {
                    flow,
                    backend,
                    attempt,
                    fwd,
                    reply,
                } => {
                    let (key, svc) = flow_key(self, &pick(&s.flows, *flow));
                    let svc = svc.unwrap_or(0);
                    let Some((bid, baddr, bport)) = self.backend_for(&key, svc, *backend) else {
                        continue;
                    };
                    let (snat, sport) = self.candidate(&key, svc, *attempt);
                    let sid = self.ids[svc].0;
                    let to = Tuple {
                        src_addr: snat,
                        dst_addr: baddr,
                        src_port: sport,
                        dst_port: bport,
                    };
                    if let Some(p) = fwd {
                        out.push((p.table, key, self.entry(to, (sid, bid), false, p)));
                    }
                    if let Some((p, owner)) = reply {
                        let rkey = model::tables::reply_key_of(to, key.proto);
                        let back = self.owner_tuple(&key, *owner);
                        out.push((p.table, rkey, self.entry(back, (sid, bid), true, p)));
                    }
                }
                Seed::Squatter {
                    flow,
                    attempt,
                    at,
                    owner,
                    reply,
                } => {
                    let (key, svc) = flow_key(self, &pick(&s.flows, *flow));
                    let svc = svc.unwrap_or(0);
                    let Some((bid, baddr, bport)) = self.backend_for(&key, svc, None) else {
                        continue;
                    };
                    let (snat, sport) = self.candidate(&key, svc, *attempt);
                    let rkey = model::tables::reply_key_of(
                        Tuple {
                            src_addr: snat,
                            dst_addr: baddr,
                            src_port: sport,
                            dst_port: bport,
                        },
                        key.proto,
                    );
                    let owner = match owner {
                        Owner::Own => Owner::Client(1),
                        o => *o,
                    };
                    let back = self.owner_tuple(&key, owner);
                    out.push((
                        at.table,
                        rkey,
                        self.entry(back, (self.ids[svc].0, bid), *reply, at),
                    ));
                }
                Seed::Wall { flow, upto, at } => {
                    let (key, svc) = flow_key(self, &pick(&s.flows, *flow));
                    let svc = svc.unwrap_or(0);
                    let Some((bid, baddr, bport)) = self.backend_for(&key, svc, None) else {
                        continue;
                    };
                    let back = self.owner_tuple(&key, Owner::Client(1));
                    for attempt in 0..*upto {
                        let (snat, sport) = self.candidate(&key, svc, attempt);
                        let rkey = model::tables::reply_key_of(
                            Tuple {
                                src_addr: snat,
                                dst_addr: baddr,
                                src_port: sport,
                                dst_port: bport,
                            },
                            key.proto,
                        );
                        out.push((
                            at.table,
                            rkey,
                            self.entry(back, (self.ids[svc].0, bid), true, at),
                        ));
                    }
                }
                Seed::Odd {
                    flow,
                    at,
                    to,
                    reply,
                } => {
                    let (key, _) = flow_key(self, &pick(&s.flows, *flow));
                    let (baddr, bport) = pick(&self.backends, to.0);
                    let t = Tuple {
                        src_addr: wire(pick(SERVICES[0].snat, to.1)),
                        dst_addr: baddr,
                        src_port: pick(&CLIENT_PORTS, to.1 / 3).to_be(),
                        dst_port: bport.to_be(),
                    };
                    let sid = pick(&self.service_ids, to.1);
                    let bid = pick(&self.backend_ids, to.0);
                    out.push((at.table, key, self.entry(t, (sid, bid), *reply, at)));
                }
            }
        }
        out
    }

    /// What a reply entry translates back to: the flow's client and VIP,
    /// or someone else's.
    fn owner_tuple(&self, key: &ConnKey, owner: Owner) -> Tuple {
        let own = Tuple {
            src_addr: key.dst_addr,
            dst_addr: key.src_addr,
            src_port: key.dst_port,
            dst_port: key.src_port,
        };
        match owner {
            Owner::Own => own,
            Owner::Client(c) => {
                let mut client = wire(pick(&CLIENTS, c));
                if client == key.src_addr {
                    client = wire(pick(&CLIENTS, c.wrapping_add(1)));
                }
                Tuple {
                    dst_addr: client,
                    ..own
                }
            }
            Owner::Vip(v) => {
                let d = pick(&self.dests, v);
                let port = if d.port.to_be() == key.dst_port {
                    d.port.wrapping_add(1)
                } else {
                    d.port
                };
                Tuple {
                    src_addr: d.addr,
                    src_port: port.to_be(),
                    ..own
                }
            }
        }
    }

    /// The frame for packet `p`, built against the model's current tables.
    fn frame(&self, m: &Model, s: &Session, p: &PacketSpec) -> Vec<u8> {
        let (key, svc) = flow_key(self, &pick(&s.flows, p.flow));
        let (src, dst, proto) = match p.dir {
            Dir::Fwd => (
                (key.src_addr, key.src_port),
                (key.dst_addr, key.dst_port),
                key.proto,
            ),
            Dir::Reply(attempt) => {
                let fwd = m
                    .tables
                    .conns
                    .get(&key)
                    .or_else(|| m.tables.half_open.get(&key))
                    .filter(|e| !e.is_reply());
                match (fwd, svc) {
                    (Some(e), _) => (
                        (e.to.dst_addr, e.to.dst_port),
                        (e.to.src_addr, e.to.src_port),
                        key.proto,
                    ),
                    (None, Some(svc)) => match self.backend_for(&key, svc, None) {
                        Some((_, baddr, bport)) => {
                            let (snat, sport) = self.candidate(&key, svc, attempt);
                            ((baddr, bport), (snat, sport), key.proto)
                        }
                        None => (
                            (key.dst_addr, key.dst_port),
                            (key.src_addr, key.src_port),
                            key.proto,
                        ),
                    },
                    (None, None) => (
                        (key.dst_addr, key.dst_port),
                        (key.src_addr, key.src_port),
                        key.proto,
                    ),
                }
            }
            Dir::Stray(b, a) => {
                let (baddr, bport) = pick(&self.backends, b);
                let snat = wire(pick(
                    &[
                        "198.18.0.1",
                        "198.18.0.5",
                        "198.18.0.7",
                        "198.18.0.8",
                        "198.18.0.9",
                    ],
                    a,
                ));
                let sport = pick(&[40000u16, 40001, 10000, 20000, 50000, 1024], a / 5);
                ((baddr, bport.to_be()), (snat, sport.to_be()), key.proto)
            }
        };
        let sock = |(a, port): (u32, u16)| SocketAddrV4::new(ip_of(a), u16::from_be(port));
        let payload: Vec<u8> = (0..p.payload)
            .map(|i| i.wrapping_mul(37) ^ p.flags)
            .collect();
        let mut pkt = if proto == 17 {
            Packet::udp(sock(src), sock(dst), &payload)
        } else {
            Packet::tcp(sock(src), sock(dst), p.flags).with_payload(&payload)
        };
        pkt = pkt.with_macs([0x02, 0, 0, 0, 0, 0x01], [0x02, 0, 0, 0, 0x0c, p.flow]);
        let dest = self.dests[usize::from(pick(&s.flows, p.flow).dest) % self.dests.len()];
        if dest.proto != 6 && dest.proto != 17 && matches!(p.dir, Dir::Fwd) {
            pkt.proto = dest.proto;
            pkt.payload = vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0];
        }
        match p.mutation {
            Mutation::Options(n) => {
                pkt.ip_options = (0..usize::from(n) * 4)
                    .map(|i| [1u8, 1, 1, 0][i % 4])
                    .collect()
            }
            Mutation::Proto(x) if x != 6 && x != 17 => pkt.proto = x,
            Mutation::UdpNoChecksum => pkt.udp_no_checksum = true,
            Mutation::Frag(f) => pkt.frag = f,
            _ => {}
        }
        let mut f = pkt.build();
        let l4 = 14 + usize::from(f[14] & 0x0f) * 4;
        let proto = f[23];
        match p.mutation {
            Mutation::Truncate(n) => {
                let len = 14 + usize::from(n) % (f.len() - 14);
                f.truncate(len);
            }
            Mutation::Version(v) => f[14] = (v << 4) | (f[14] & 0x0f),
            Mutation::Ihl(i) => f[14] = (f[14] & 0xf0) | i,
            Mutation::TotLen(d) => {
                let t = i32::from(u16::from_be_bytes([f[16], f[17]])) + i32::from(d);
                f[16..18].copy_from_slice(&(t.clamp(0, 0xffff) as u16).to_be_bytes());
            }
            Mutation::Doff(d) if proto == 6 => f[l4 + 12] = (d << 4) | (f[l4 + 12] & 0x0f),
            Mutation::UdpLen(d) if proto == 17 => {
                let t = i32::from(u16::from_be_bytes([f[l4 + 4], f[l4 + 5]])) + i32::from(d);
                f[l4 + 4..l4 + 6].copy_from_slice(&(t.clamp(0, 0xffff) as u16).to_be_bytes());
            }
            Mutation::EtherType(e) => f[12..14].copy_from_slice(&e.to_be_bytes()),
            Mutation::BadIpChecksum(x) => {
                let c = u16::from_be_bytes([f[24], f[25]]) ^ x;
                f[24..26].copy_from_slice(&c.to_be_bytes());
            }
            Mutation::BadL4Checksum(x) if proto == 6 || proto == 17 => {
                let at = if proto == 6 { l4 + 16 } else { l4 + 6 };
                if at + 2 <= f.len() {
                    let c = u16::from_be_bytes([f[at], f[at + 1]]) ^ x;
                    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
                }
            }
            Mutation::Padding(n) => f.extend((0..n).map(|i| i ^ 0xa5)),
            _ => {}
        }
        f
    }

    /// Applies the session's weight set to both sides.
    fn use_weights(&mut self, set: usize) {
        if set != self.live_set {
            self.fx.dp.apply(&specs(set)).expect("apply weights");
            self.live_set = set;
        }
        if self.checked_sets.insert(set) {
            let services: Vec<((u32, u16, u8), model::Service)> = self
                .cfg()
                .services
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            for (key, svc) in services {
                let live = self.fx.live_table(ServiceKey {
                    addr: key.0,
                    port: key.1,
                    proto: key.2,
                    _pad: 0,
                });
                assert!(
                    live == svc.table,
                    "the kernel's live Maglev table of service {} differs from the builder's",
                    svc.id
                );
            }
        }
    }

    fn run_session(&mut self, s: &Session) -> Result<(), TestCaseError> {
        let start = Instant::now();
        self.use_weights(s.weights);
        self.fx.clear();
        let mut m = Model::new(self.cfg().clone());
        let now = coarse_now_ns();
        for (t, key, e) in self.seed_entries(s) {
            // A key lives in one place per table; seeds overwrite.
            m.tables.map_mut(t).insert(key, e);
            self.fx
                .table(t)
                .insert(key, e.to_kernel(&key, now), 0)
                .expect("seeding an entry");
        }
        let traffic_before = (
            self.fx.traffic("SERVICE_STATS", &self.service_ids),
            self.fx.traffic("BACKEND_STATS", &self.backend_ids),
        );
        let latency_before = self.fx.latency_counts(&self.backend_ids);
        let mut want_traffic: Vec<Traffic> = Vec::new();
        let mut want_latency: Vec<(u32, u32)> = Vec::new();
        let mut trace = String::new();
        let mut reasons_before = self.fx.reasons();

        for (i, step) in s.steps.iter().enumerate() {
            let p = match step {
                Step::Evict { flow, reply, table } => {
                    let (key, _) = flow_key(self, &pick(&s.flows, *flow));
                    let k = if *reply {
                        match m.tables.get(*table, &key).filter(|e| !e.is_reply()) {
                            Some(e) => model::tables::reply_key_of(e.to, key.proto),
                            None => continue,
                        }
                    } else {
                        key
                    };
                    if m.tables.map_mut(*table).remove(&k).is_some() {
                        self.fx.table(*table).remove(&k).expect("evicting");
                        trace.push_str(&format!("#{i} evict {table:?} {k:?}\n"));
                    }
                    continue;
                }
                Step::Packet(p) => p,
            };
            let frame = self.frame(&m, s, p);
            let ingress = if p.other_arm {
                self.fx.arm1
            } else {
                self.fx.arm0
            };
            let want = m.step(&frame, ingress);
            let (verdict, out) = self.fx.run(&frame, ingress);
            self.packets += 1;
            let reasons_after = self.fx.reasons();
            let got_reasons: Vec<u32> = (0..reasons::COUNT)
                .flat_map(|r| {
                    let d = reasons_after[r as usize] - reasons_before[r as usize];
                    std::iter::repeat_n(r, d as usize)
                })
                .collect();
            reasons_before = reasons_after;
            trace.push_str(&format!(
                "#{i} {p:?}\n   in  {}\n   out {}\n   verdict {verdict} reasons {:?}\n",
                hex(&frame),
                hex(&out),
                names(&got_reasons)
            ));
            let ctx = || format!("session {:?}\ntrace:\n{trace}", s);
            prop_assert_eq!(verdict, want.verdict, "packet #{}: verdict\n{}", i, ctx());
            prop_assert_eq!(
                hex(&out),
                hex(&want.frame),
                "packet #{}: output bytes\n{}",
                i,
                ctx()
            );
            let mut want_reasons = want.reasons.clone();
            want_reasons.sort_unstable();
            prop_assert_eq!(
                names(&got_reasons),
                names(&want_reasons),
                "packet #{}: reason counters\n{}",
                i,
                ctx()
            );
            let rewritten = want.traffic.is_some();
            if rewritten && input_checksums_right(&frame) {
                prop_assert!(
                    nat::checksums_right(&out, out[23]),
                    "packet #{}: output checksums wrong\n{}",
                    i,
                    ctx()
                );
                if plain_lengths(&out) {
                    prop_assert!(
                        checksums_valid(&out),
                        "packet #{}: output checksums wrong (packet::checksums_valid)\n{}",
                        i,
                        ctx()
                    );
                }
            }
            for r in names(&got_reasons)
                .into_iter()
                .chain(m.trail.iter().copied())
            {
                *self.tally.entry(r).or_default() += 1;
            }
            want_traffic.extend(want.traffic);
            want_latency.extend(want.latency.iter().copied());
        }

        let ctx = || format!("session {:?}\ntrace:\n{trace}", s);
        for t in [Table::Conns, Table::HalfOpen] {
            let mut got = BTreeMap::new();
            for (k, e) in self.fx.entries(t) {
                let e = Entry::from_kernel(&k, &e)
                    .map_err(|err| TestCaseError::fail(format!("{t:?}: {err}\n{}", ctx())))?;
                got.insert(format!("{k:?}"), format!("{:?}", strip(e)));
            }
            let want: BTreeMap<String, String> = m
                .tables
                .map(t)
                .iter()
                .map(|(k, e)| (format!("{k:?}"), format!("{:?}", strip(*e))))
                .collect();
            prop_assert_eq!(got, want, "table {:?} at the end\n{}", t, ctx());
        }

        let traffic_after = (
            self.fx.traffic("SERVICE_STATS", &self.service_ids),
            self.fx.traffic("BACKEND_STATS", &self.backend_ids),
        );
        for (before, after, by_service) in [
            (&traffic_before.0, &traffic_after.0, true),
            (&traffic_before.1, &traffic_after.1, false),
        ] {
            let got: BTreeMap<u32, [u64; 4]> = after
                .iter()
                .map(|(id, a)| {
                    let b = before[id];
                    (*id, [a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3]])
                })
                .filter(|(_, d)| *d != [0; 4])
                .collect();
            let mut want: BTreeMap<u32, [u64; 4]> = BTreeMap::new();
            for t in &want_traffic {
                let id = if by_service {
                    t.service_id
                } else {
                    t.backend_id
                };
                let watched = if by_service {
                    &self.service_ids
                } else {
                    &self.backend_ids
                };
                if !watched.contains(&id) {
                    continue;
                }
                let c = want.entry(id).or_default();
                c[0] += 1;
                c[1] += t.bytes;
                c[2] += u64::from(t.new_conn);
                c[3] += u64::from(t.reply);
            }
            prop_assert_eq!(
                got,
                want,
                "{} traffic counters\n{}",
                if by_service { "service" } else { "backend" },
                ctx()
            );
        }
        let latency_after = self.fx.latency_counts(&self.backend_ids);
        let got: BTreeMap<(u32, u32), u64> = latency_after
            .iter()
            .map(|(k, a)| (*k, a - latency_before[k]))
            .filter(|(_, d)| *d != 0)
            .collect();
        let mut want: BTreeMap<(u32, u32), u64> = BTreeMap::new();
        for k in want_latency {
            if self.backend_ids.contains(&k.0) {
                *want.entry(k).or_default() += 1;
            }
        }
        prop_assert_eq!(got, want, "latency sample counts\n{}", ctx());
        self.fx.clear();
        self.sessions += 1;
        let took = start.elapsed();
        assert!(
            took < MAX_SESSION,
            "a session took {took:?}: seeded ages are only {CLOSING_S} s from a timeout, so the \
             kernel's clock may have decided differently from the model; not a datapath finding"
        );
        Ok(())
    }
}

/// The model entry without what is not compared.
fn strip(e: Entry) -> Entry {
    Entry { age: 0, ..e }
}

fn input_checksums_right(frame: &[u8]) -> bool {
    match model::parse::ipv4(frame) {
        Ok(ip) => match model::parse::transport(frame, &ip) {
            Ok(l4) => nat::checksums_right(frame, l4.proto),
            Err(_) => false,
        },
        Err(_) => false,
    }
}

/// Whether the datagram fills the frame and the UDP length fills the
/// datagram: what `packet::checksums_valid` assumes.
fn plain_lengths(f: &[u8]) -> bool {
    let tot = usize::from(u16::from_be_bytes([f[16], f[17]]));
    tot + 14 == f.len()
        && (f[23] != 17 || usize::from(u16::from_be_bytes([f[38], f[39]])) + 20 == tot)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn names(r: &[u32]) -> Vec<&'static str> {
    r.iter().map(|i| reasons::NAMES[*i as usize]).collect()
}

// ---------------------------------------------------------------------------

fn seed_from_env() -> u64 {
    match std::env::var("ROUTER_DIFFTEST_SEED").ok().as_deref() {
        None | Some("") => 0x5eed_d1ff,
        Some("random") => {
            let s = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            eprintln!("ROUTER_DIFFTEST_SEED={s}");
            s
        }
        Some(v) => v
            .parse()
            .expect("ROUTER_DIFFTEST_SEED: a number or \"random\""),
    }
}

#[test]
fn kernel_and_model_agree_on_every_packet() {
    let target: u64 = std::env::var("ROUTER_DIFFTEST_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let seed = seed_from_env();
    let world = RefCell::new(World::new());
    let strategy = session(world.borrow().dests.len());
    let started = Instant::now();
    let mut round = 0u64;
    while world.borrow().packets < target {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        bytes[8..16].copy_from_slice(&round.to_le_bytes());
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
        let mut runner = TestRunner::new_with_rng(
            PtConfig {
                cases: 500,
                failure_persistence: None,
                max_shrink_iters: 2_000,
                ..PtConfig::default()
            },
            rng,
        );
        let result = runner.run(&strategy, |s| world.borrow_mut().run_session(&s));
        if let Err(e) = result {
            panic!("seed {seed}, round {round}: {e}");
        }
        round += 1;
    }
    let w = world.borrow();
    eprintln!(
        "{} packets in {} sessions, {:.1} s",
        w.packets,
        w.sessions,
        started.elapsed().as_secs_f64()
    );
    eprintln!("reasons counted and rules taken (model):");
    for (what, n) in &w.tally {
        eprintln!("  {n:>8}  {what}");
    }
}
