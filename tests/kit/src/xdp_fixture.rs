//! The BPF_PROG_TEST_RUN fixture harness: a loaded `router` program in its
//! own network namespace with static neighbours (so `bpf_fib_lookup`
//! resolves deterministic next hops), and table-driven cases in Katran's
//! style: a crafted input packet, the expected verdict, the expected output
//! bytes, and the counter that must account for it.

use router::datapath::{BackendSpec, Datapath, Forwarding, LoadOptions, Selection, ServiceSpec};
use router_common::reasons;

use crate::{
    kernel_ns::{EnteredNs, TEST_NEIGHBOURS, TEST_NEIGHBOURS6},
    packet::{Mac, addr, checksums_valid, ip},
    test_run::run_packet,
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub const ARM2_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x01];

pub const LB_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
pub const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0x0c, 0x02];
pub const CLIENT2_MAC: Mac = [0x02, 0, 0, 0, 0x0c, 0x03];

/// The connection-table key of a flow from `src` to `dst` over `proto`,
/// fields as on the wire.
pub fn conn_key(
    src: std::net::SocketAddrV4,
    dst: std::net::SocketAddrV4,
    proto: u8,
) -> router_common::ConnKey {
    router_common::ConnKey {
        src_addr: u32::from_ne_bytes(src.ip().octets()),
        dst_addr: u32::from_ne_bytes(dst.ip().octets()),
        src_port: src.port().to_be(),
        dst_port: dst.port().to_be(),
        proto,
        _pad: [0; 3],
    }
}

pub fn backend_mac(i: u8) -> Mac {
    [0x02, 0, 0, 0, 0x0b, i]
}

pub struct Fixture {
    pub dp: Datapath,
    pub ifindex: u32,
    pub ns: EnteredNs,
}

pub fn service(name: &str, vip: &str, proto: u8, weights: &[u32]) -> ServiceSpec {
    ServiceSpec {
        forwarding: Forwarding::Nat,
        name: name.into(),
        vip: addr(vip).into(),
        proto,
        snat: vec![ip("198.18.0.1").into()],
        snat_port_min: 10000,
        snat_port_max: 32767,
        selection: Selection::Maglev,
        backends: weights
            .iter()
            .enumerate()
            .map(|(i, w)| BackendSpec {
                role: router::datapath::BackendRole::Primary,
                name: format!("b{i}"),
                address: addr(&format!("198.18.0.{}:8000", 11 + i)).into(),
                weight: *w,
                max_in_flight: 0,
            })
            .collect(),
        pools: Vec::new(),
        segments: Vec::new(),
    }
}

/// An IPv6 DSR service (IPv6 in IPv6) on `vip` over the arm's IPv6
/// backends 2001:2::11, ::12, … (port 8000), one per weight.
pub fn service6(name: &str, vip: &str, weights: &[u32]) -> ServiceSpec {
    ServiceSpec {
        forwarding: Forwarding::Ipip,
        name: name.into(),
        vip: vip.parse().expect("an IPv6 socket address"),
        proto: 6,
        snat: Vec::new(),
        snat_port_min: 10000,
        snat_port_max: 32767,
        selection: Selection::Maglev,
        backends: weights
            .iter()
            .enumerate()
            .map(|(i, w)| BackendSpec {
                role: router::datapath::BackendRole::Primary,
                name: format!("b{i}"),
                address: format!("[2001:2::{}]:8000", 11 + i)
                    .parse()
                    .expect("an IPv6 socket address"),
                weight: *w,
                max_in_flight: 0,
            })
            .collect(),
        pools: Vec::new(),
        segments: Vec::new(),
    }
}

/// An IPv6 NAT service on `vip` over the same backends as `service6`,
/// translating to the SNAT addresses `snat` (the arm's own is 2001:2::1).
pub fn nat_service6(name: &str, vip: &str, snat: &[&str], weights: &[u32]) -> ServiceSpec {
    ServiceSpec {
        forwarding: Forwarding::Nat,
        snat: snat
            .iter()
            .map(|a| a.parse().expect("an IPv6 address"))
            .collect(),
        ..service6(name, vip, weights)
    }
}

/// The same service, placing new flows by least load.
pub fn least_loaded(spec: ServiceSpec) -> ServiceSpec {
    ServiceSpec {
        selection: Selection::LeastLoaded,
        ..spec
    }
}

impl Fixture {
    /// A backend's in-flight count, as the datapath holds it.
    pub fn in_flight(&self, service: &str, backend: &str) -> u64 {
        let id = self.dp.backend_id(service, backend).expect("backend id");
        self.dp.load_counters().in_flight(id)
    }

    /// Flows a backend's count has seen open and close.
    pub fn opened_closed(&self, service: &str, backend: &str) -> (u64, u64) {
        let id = self.dp.backend_id(service, backend).expect("backend id");
        let l = self.dp.load_counters().get(id);
        (l.opened, l.closed)
    }

    pub fn new(services: &[ServiceSpec]) -> Self {
        Self::with_options(
            services,
            LoadOptions {
                table_size: 1021,
                ..LoadOptions::default()
            },
        )
    }

    pub fn with_options(services: &[ServiceSpec], opts: LoadOptions) -> Self {
        let ns = EnteredNs::new("rtfx").expect("netns");
        let ifindex = ns
            .test_arm(
                ("fx0", "fx1"),
                "02:00:00:00:00:01",
                "198.18.0.1/24",
                &TEST_NEIGHBOURS,
            )
            .unwrap();
        ns.test_arm6("fx0", "2001:2::1/64", &TEST_NEIGHBOURS6)
            .unwrap();
        // A second arm, for backends behind another interface (XDP_REDIRECT).
        ns.test_arm(
            ("fx2", "fx3"),
            "02:00:00:00:01:01",
            "198.18.1.1/24",
            &[("198.18.1.11", "02:00:00:00:1b:00")],
        )
        .unwrap();
        let mut dp = Datapath::load(opts).expect("load router program");
        dp.apply(services).expect("apply services");
        Fixture { dp, ifindex, ns }
    }

    pub fn run(&mut self, input: &[u8]) -> (u32, Vec<u8>) {
        run_packet(&mut self.dp, input, self.ifindex).expect("BPF_PROG_TEST_RUN")
    }

    pub fn reasons(&self) -> Vec<u64> {
        self.dp
            .reason_counts()
            .unwrap()
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    /// Runs one case and checks its verdict, its output frame (as the case
    /// says) and that each of its reason counters, and no other, moved by
    /// one.
    pub fn case(&mut self, c: Case<'_>) -> Vec<u8> {
        let before = self.reasons();
        let (verdict, out) = self.run(&c.input);
        assert_eq!(verdict, c.verdict, "{}: verdict", c.name);
        let expected = match &c.output {
            Output::Unchanged => Some(&c.input),
            Output::Bytes(bytes) => Some(bytes),
            Output::Unchecked => None,
        };
        if let Some(expected) = expected {
            assert_eq!(hex(&out), hex(expected), "{}: output bytes", c.name);
        }
        let after = self.reasons();
        for (i, name) in reasons::NAMES.iter().enumerate() {
            let delta = after[i] - before[i];
            let want = u64::from(c.reasons.contains(&(i as u32)));
            assert_eq!(delta, want, "{}: counter {name}", c.name);
        }
        if verdict == XDP_TX {
            assert!(
                checksums_valid(&out),
                "{}: checksums of {}",
                c.name,
                hex(&out)
            );
        }
        out
    }
}

/// One row of a fixture table: a packet in, and what the program must do
/// with it.
pub struct Case<'a> {
    /// What the row shows; assertion messages start with it.
    pub name: &'a str,
    /// The frame, Ethernet header first.
    pub input: Vec<u8>,
    /// `XDP_TX`, `XDP_PASS`, `XDP_DROP` or `XDP_REDIRECT`.
    pub verdict: u32,
    /// The frame the program hands back.
    pub output: Output,
    /// The reason counters (`router_common::reasons`) that move, by one
    /// each; every other counter must stay.
    pub reasons: &'a [u32],
}

/// What a [`Case`] expects of the frame the program hands back.
pub enum Output {
    /// The input, untouched (what a pass or a drop leaves).
    Unchanged,
    /// Exactly these bytes: the rewritten frame.
    Bytes(Vec<u8>),
    /// Not compared: the test checks the parts it knows (a probed port).
    Unchecked,
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn table<'a>(
    f: &'a mut Fixture,
    name: &str,
) -> aya::maps::HashMap<&'a mut aya::maps::MapData, router_common::ConnKey, router_common::ConnEntry>
{
    aya::maps::HashMap::try_from(f.dp.ebpf_mut().map_mut(name).unwrap()).unwrap()
}
