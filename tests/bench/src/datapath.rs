//! `bench datapath`: nanoseconds per packet of the `router` XDP program,
//! measured with BPF_PROG_TEST_RUN and compared with a trivial XDP_PASS
//! program measured in the same run and the same timing mode.
//!
//! Everything runs in a private network namespace holding one veth with
//! static neighbours (as the fixtures do), so `bpf_fib_lookup` resolves next
//! hops without touching the host; nothing is attached to any interface.
//!
//! Two timing modes:
//! - `repeat`: one syscall with `repeat = N`; the kernel reports the average
//!   time per repetition. The kernel feeds the *rewritten* packet back in on
//!   every repetition, so this is only valid for a path that leaves the packet
//!   unchanged: the non-service pass.
//! - `single`: `repeat = 1` calls in a loop, each timed by the kernel
//!   (`duration` excludes the syscall entry/exit and the data copies), averaged
//!   over many calls. A fixed per-call overhead (the timer reads around one
//!   repetition) remains; it is measured on the trivial program in the same
//!   loop and subtracted, see [`METHOD`].

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions, Xdp},
};
use router::datapath::{
    BackendSpec, Datapath, LoadOptions, SCAN_LIMIT, Selection, ServiceSpec, XDP_PASS_OBJ,
};
use router_common::{addr_filter_bucket, reasons};
use serde_json::{Value, json};

use router_testkit::{
    kernel_ns::{EnteredNs, TEST_NEIGHBOURS, run},
    packet::{Mac, Packet, TCP_ACK, TCP_SYN},
    test_run::xdp_md,
};

use crate::report::median;

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const LB_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0x0c, 0x02];
const BACKEND0_MAC: Mac = [0x02, 0, 0, 0, 0x0b, 0x00];

const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const SYN_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 1), 8000);
/// Neither a VIP nor a SNAT address (checked against the address pre-filter).
const NON_SERVICE_DST: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 99), 8000);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(198, 18, 0, 11),
    Ipv4Addr::new(198, 18, 0, 12),
    Ipv4Addr::new(198, 18, 0, 13),
];
const BACKEND_PORT: u16 = 8000;
/// The established flow's client port (the SNAT port the LB keeps for it).
const EST_CLIENT_PORT: u16 = 40000;
/// First client port of the SYN path; each timed SYN uses the next one.
const SYN_FIRST_PORT: u16 = 1024;
/// Untimed calls before each timed loop (cache, branch predictor, FIB cache).
const WARMUP_CALLS: u32 = 1000;

/// Katran's ratios to XDP_PASS measured the same way, and the issue's targets.
struct Reference {
    target: f64,
    katran: &'static str,
}

const NON_SERVICE_REF: Reference = Reference {
    target: 2.0,
    katran: "5×",
};
const ESTABLISHED_REF: Reference = Reference {
    target: 6.0,
    katran: "≈12×",
};
const SYN_REF: Reference = Reference {
    target: 11.0,
    katran: "≈22×",
};
/// A new connection, SYN and first ACK: the goal of issue 12.
const NEW_CONN_REF: Reference = Reference {
    target: 16.0,
    katran: "—",
};

pub struct Settings {
    /// Repeated runs; every figure is the median over them.
    pub runs: usize,
    /// `repeat` for the repeat-mode syscall.
    pub repeat: u32,
    /// Timed single-packet calls per path and run.
    pub single_calls: u32,
    pub quick: bool,
    pub out_dir: PathBuf,
}

impl Settings {
    pub fn full(out_dir: PathBuf) -> Self {
        Self {
            runs: 15,
            repeat: 1_000_000,
            single_calls: 20_000,
            quick: false,
            out_dir,
        }
    }

    pub fn quick(out_dir: PathBuf) -> Self {
        Self {
            runs: 5,
            repeat: 100_000,
            single_calls: 2_000,
            quick: true,
            out_dir,
        }
    }
}

pub const METHOD: &str = "\
- Every program runs through BPF_PROG_TEST_RUN (aya `TestRun::test_run`) with an \
`xdp_md` context whose `ingress_ifindex` is a veth in a private network namespace \
with static neighbours, so `bpf_fib_lookup` resolves real next hops. Nothing is \
attached to any interface. The process is pinned to one CPU. All frames are 54-byte \
TCP/IPv4 frames without payload.
- The reference is the trivial `xdp_pass` program (returns XDP_PASS), measured in \
every run, in both timing modes, with a frame of the same size (the non-service frame) \
and the same context.
- `repeat` mode: one syscall with `repeat = R`; the figure is the kernel-reported \
`duration`, the average time per repetition (integer ns, truncated by the kernel). \
With R > 1 the kernel feeds the rewritten frame back in, so repeat mode is valid only \
for the non-service pass, which leaves the frame unchanged. Ratio = path / trivial, \
both per-repetition averages from the same run (this is Katran's method).
- `single` mode: a loop of `repeat = 1` calls, each with its own frame where the \
path needs it (every SYN is a new flow: a new client port per call); the figure is \
the mean of the kernel-reported `duration` over the timed calls. That duration \
excludes the syscall entry/exit and the data copies but includes a fixed per-call \
overhead (the timer reads and the test-run set-up around one repetition) that repeat \
mode amortises away. It is measured in the same run as O = T0_single − T0_repeat, \
where T0_single is the trivial program's mean in the same single-call loop and \
T0_repeat its repeat-mode figure. Overhead-subtracted ns = path_single − O. \
Ratio = (path_single − O) / T0_repeat = 1 + (path_single − T0_single) / T0_repeat: \
the path's cost beyond the trivial program, measured in single mode where the fixed \
overhead cancels exactly, in units of the trivial program's own per-packet cost, so \
single-mode ratios read on the same scale as repeat-mode ones. The raw ratio \
path_single / T0_single (which keeps the overhead in both and so understates the \
difference) is listed too. Wall-clock time per call, syscall included, is recorded \
in the JSON for reference only.
- Paths of the `router` program: non-service pass (TCP SYN to an address that is \
neither VIP nor SNAT address, and whose address pre-filter bucket is empty); \
established forward (an ACK of a flow created by one SYN: connection-table hit with \
cached next hop); SYN new flow (each timed call a new client port: connection-table \
miss, the pick, SNAT claim, two inserts, FIB lookup; the datapath is loaded afresh \
for every run with a half-open table sized for every SYN of the run on each CPU's \
share, and after the run the benchmark checks that the table holds every flow, so \
no timed SYN evicts one and SNAT ports never collide). SYN rows by pick: Maglev \
(3 backends), least-loaded scanning 4, 8, 16 and 32 backends, least-loaded two \
choices from the Maglev table with 16, 32 and 64 backends; every backend has a \
resolved neighbour, so every SYN takes the same XDP_TX path. The least-loaded \
rows check that the flows spread (scan: no backend more than one flow above \
another); reply \
(backend → SNAT address:port of the established flow: reply-entry hit); first ACK of a \
new flow (a fresh datapath, one untimed SYN per client port, then each flow's ACK \
timed: it promotes the flow from the half-open table into CONNS, and after the run \
the benchmark checks that CONNS holds both directions of every flow and nothing is \
left half-open); SYN + first ACK, the sum of the Maglev SYN row and the first-ACK \
row per run, net of the per-call overhead twice: what a new connection costs the \
datapath.
- Each path's timed calls are preceded by untimed warm-up calls, and after each timed \
batch the per-reason counters are checked: every call must have taken the intended \
path (verdict and reason), otherwise the benchmark fails. The benchmark asserts \
nothing about speed.
- Every figure is the median over the runs; ratios are the median of the per-run \
ratios (trivial measured in the same run). min–max over the runs is given beside each \
ns figure.
";

/// `path/single/what`: the sample key of a single-mode series.
fn key(path: &str, what: &str) -> String {
    format!("{path}/single/{what}")
}

/// One named series of per-run samples.
#[derive(Default)]
struct Samples(BTreeMap<String, Vec<f64>>);

impl Samples {
    fn push(&mut self, key: impl Into<String>, v: f64) {
        self.0.entry(key.into()).or_default().push(v);
    }

    /// The three figures of one single-mode run of `series`.
    fn push_single(&mut self, series: &str, r: &SingleResult) {
        self.push(key(series, "kernel_ns"), r.kernel_ns);
        self.push(key(series, "wall_ns"), r.wall_ns);
        self.push(
            key(series, "kernel_call_median_ns"),
            r.kernel_call_median_ns,
        );
    }

    fn get(&self, key: &str) -> Result<&[f64]> {
        self.0
            .get(key)
            .map(Vec::as_slice)
            .with_context(|| format!("no samples for {key}"))
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        })
}

fn service() -> ServiceSpec {
    ServiceSpec {
        name: "bench".into(),
        vip: VIP,
        proto: router_common::PROTO_TCP,
        snat: vec![LB_ADDR],
        snat_port_min: 10000,
        snat_port_max: 32767,
        selection: router::datapath::Selection::Maglev,
        backends: BACKENDS
            .iter()
            .enumerate()
            .map(|(i, a)| BackendSpec {
                name: format!("b{i}"),
                address: SocketAddrV4::new(*a, BACKEND_PORT),
                weight: 1,
                max_in_flight: 0,
            })
            .collect(),
    }
}

fn load_datapath() -> Result<Datapath> {
    load_datapath_with(&service(), SCAN_LIMIT, 0)
}

/// A datapath serving `spec`, with a half-open table that holds every flow
/// of `syns` SYNs (two entries each) without evicting one. With
/// BPF_F_NO_COMMON_LRU each possible CPU gets its own share of the table,
/// and inserts on the pinned CPU can only use that share, so the table is
/// sized for the share.
fn load_datapath_with(spec: &ServiceSpec, scan_limit: usize, syns: u32) -> Result<Datapath> {
    let cpus = aya::util::nr_cpus()
        .map_err(|(_, e)| anyhow::anyhow!("counting possible CPUs: {e}"))? as u64;
    let half_open = (u64::from(syns) * 2 * cpus * 5 / 4).next_power_of_two();
    let conn_table_size = u32::try_from((half_open * 4).max(1 << 18))
        .context("connection table for this many SYNs and CPUs")?;
    let mut dp = Datapath::load(LoadOptions {
        conn_table_size,
        ..LoadOptions::default()
    })
    .context("loading the router program")?;
    dp.set_scan_limit(scan_limit);
    dp.apply(std::slice::from_ref(spec))
        .context("applying the benchmark service")?;
    Ok(dp)
}

/// A least-loaded service of `n` backends, all with resolved neighbours
/// (the three benchmark backend addresses on distinct ports).
fn least_loaded_service(n: usize) -> ServiceSpec {
    ServiceSpec {
        selection: Selection::LeastLoaded,
        backends: (0..n)
            .map(|i| BackendSpec {
                name: format!("b{i}"),
                address: SocketAddrV4::new(BACKENDS[i % 3], BACKEND_PORT + (i / 3) as u16),
                weight: 100,
                max_in_flight: 0,
            })
            .collect(),
        ..service()
    }
}

/// The SYN rows: how each pick is configured.
struct SynCase {
    key: &'static str,
    path: &'static str,
    backends: usize,
    least_loaded: bool,
    /// Least-loaded services above this size draw two choices.
    scan_limit: usize,
}

const SYN_CASES: [SynCase; 8] = [
    SynCase {
        key: "syn",
        path: "SYN new flow (Maglev, 3 backends)",
        backends: 3,
        least_loaded: false,
        scan_limit: SCAN_LIMIT,
    },
    SynCase {
        key: "syn_ll_4",
        path: "SYN, least-loaded scan, 4 backends",
        backends: 4,
        least_loaded: true,
        scan_limit: 64,
    },
    SynCase {
        key: "syn_ll_8",
        path: "SYN, least-loaded scan, 8 backends",
        backends: 8,
        least_loaded: true,
        scan_limit: 64,
    },
    SynCase {
        key: "syn_ll_16",
        path: "SYN, least-loaded scan, 16 backends",
        backends: 16,
        least_loaded: true,
        scan_limit: 64,
    },
    SynCase {
        key: "syn_ll_32",
        path: "SYN, least-loaded scan, 32 backends",
        backends: 32,
        least_loaded: true,
        scan_limit: 64,
    },
    SynCase {
        key: "syn_p2c_16",
        path: "SYN, least-loaded two choices, 16 backends",
        backends: 16,
        least_loaded: true,
        scan_limit: 0,
    },
    SynCase {
        key: "syn_p2c_32",
        path: "SYN, least-loaded two choices, 32 backends",
        backends: 32,
        least_loaded: true,
        scan_limit: 0,
    },
    SynCase {
        key: "syn_p2c_64",
        path: "SYN, least-loaded two choices, 64 backends",
        backends: 64,
        least_loaded: true,
        scan_limit: 0,
    },
];

/// Mean kernel-reported ns per call and mean wall-clock ns per call.
struct SingleResult {
    kernel_ns: f64,
    /// Median of the per-call kernel durations (single mode only).
    kernel_call_median_ns: f64,
    wall_ns: f64,
}

/// One frame with TCP `flags` per client port of the SYN paths, `total`
/// ports from `SYN_FIRST_PORT` on: each its own flow.
fn client_frames(total: u32, flags: u8) -> Vec<Vec<u8>> {
    (0..total)
        .map(|i| {
            let port = SYN_FIRST_PORT + i as u16;
            Packet::tcp(SocketAddrV4::new(SYN_CLIENT_ADDR, port), VIP, flags)
                .with_macs(LB_MAC, CLIENT_MAC)
                .build()
        })
        .collect()
}

/// Entries of connection table `name` (CONNS or HALF_OPEN).
fn table_entries(dp: &mut Datapath, name: &str) -> Result<u64> {
    let map: aya::maps::HashMap<_, router_common::ConnKey, router_common::ConnEntry> =
        aya::maps::HashMap::try_from(
            dp.ebpf_mut()
                .map_mut(name)
                .with_context(|| format!("{name} map"))?,
        )?;
    Ok(map.keys().filter(Result::is_ok).count() as u64)
}

/// Times `frames.len()` single-packet calls (repeat = 1), one per frame.
fn single_calls(
    prog: &Xdp,
    frames: &[Vec<u8>],
    ctx: &[u8],
    expect: u32,
    what: &str,
) -> Result<SingleResult> {
    let mut out = vec![0u8; 512];
    let mut durations: Vec<f64> = Vec::with_capacity(frames.len());
    let start = Instant::now();
    for f in frames {
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(f),
                data_out: Some(&mut out),
                ctx_in: Some(ctx),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN ({what})"))?;
        if r.return_value != expect {
            bail!(
                "{what}: verdict {} where {expect} was expected",
                r.return_value
            );
        }
        durations.push(r.duration.as_nanos() as f64);
    }
    let wall = start.elapsed().as_nanos();
    let n = frames.len().max(1) as f64;
    Ok(SingleResult {
        kernel_ns: durations.iter().sum::<f64>() / n,
        kernel_call_median_ns: median(&durations),
        wall_ns: wall as f64 / n,
    })
}

/// Kernel-reported ns per repetition and wall-clock ns per repetition.
fn repeat_call(
    prog: &Xdp,
    frame: &[u8],
    ctx: &[u8],
    repeat: u32,
    expect: u32,
    what: &str,
) -> Result<SingleResult> {
    let mut out = vec![0u8; 512];
    let start = Instant::now();
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(ctx),
            repeat,
            ..TestRunOptions::default()
        })
        .with_context(|| format!("BPF_PROG_TEST_RUN repeat={repeat} ({what})"))?;
    let wall = start.elapsed().as_nanos();
    if r.return_value != expect {
        bail!(
            "{what}: verdict {} where {expect} was expected",
            r.return_value
        );
    }
    Ok(SingleResult {
        kernel_ns: r.duration.as_nanos() as f64,
        kernel_call_median_ns: r.duration.as_nanos() as f64,
        wall_ns: wall as f64 / f64::from(repeat.max(1)),
    })
}

fn reason_vec(dp: &Datapath) -> Result<Vec<u64>> {
    Ok(dp
        .reason_counts()
        .context("reading the reason counters")?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// Checks that exactly `n` packets were counted, all under `reason`.
fn check_reasons(before: &[u64], after: &[u64], reason: u32, n: u64, what: &str) -> Result<()> {
    for (i, name) in reasons::NAMES.iter().enumerate() {
        let delta = after[i].saturating_sub(before[i]);
        let want = if i as u32 == reason { n } else { 0 };
        ensure!(
            delta == want,
            "{what}: counter {name} moved by {delta}, expected {want}: the path measured is not the one intended"
        );
    }
    Ok(())
}

fn trivial_program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    ebpf.program_mut("xdp_pass")
        .context("xdp_pass program missing from its object")?
        .try_into()
        .context("xdp_pass is not an XDP program")
}

fn pin_to_last_cpu() -> Result<usize> {
    // SAFETY: sysconf has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let cpu = usize::try_from(n).unwrap_or(1).saturating_sub(1);
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes within it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        bail!(
            "sched_setaffinity to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(cpu)
}

struct Bench {
    dp: Datapath,
    trivial: Ebpf,
    ctx: Vec<u8>,
    /// Frames of the established flow and its reply.
    est_ack: Vec<u8>,
    reply_ack: Vec<u8>,
    non_service: Vec<u8>,
    // Dropped last: leaves and removes the namespace.
    _ns: EnteredNs,
}

impl Bench {
    fn new() -> Result<Self> {
        let ns = EnteredNs::new("rtbench").context("creating the benchmark netns")?;
        let ifindex = ns
            .test_arm(
                ("bx0", "bx1"),
                "02:00:00:00:00:01",
                "198.18.0.1/24",
                &TEST_NEIGHBOURS,
            )
            .context("setting up the benchmark netns")?;

        // The non-service frame must stop at the address pre-filter.
        let bucket = |a: Ipv4Addr| addr_filter_bucket(u32::from_ne_bytes(a.octets()));
        let ns_bucket = bucket(*NON_SERVICE_DST.ip());
        ensure!(
            ns_bucket != bucket(*VIP.ip()) && ns_bucket != bucket(LB_ADDR),
            "non-service address {} shares a pre-filter bucket with the VIP or SNAT address",
            NON_SERVICE_DST.ip()
        );

        let mut dp = load_datapath()?;
        let mut trivial = Ebpf::load(XDP_PASS_OBJ).context("loading the xdp_pass object")?;
        trivial_program(&mut trivial)?
            .load()
            .context("loading the xdp_pass program")?;

        let client = SocketAddrV4::new(CLIENT_ADDR, EST_CLIENT_PORT);
        let syn = Packet::tcp(client, VIP, TCP_SYN)
            .with_macs(LB_MAC, CLIENT_MAC)
            .build();
        let ctx = xdp_md(ifindex, syn.len());
        // Create the established flow and learn its backend and SNAT port.
        let prog = dp.program_mut().context("router program")?;
        let mut out = vec![0u8; 512];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&syn),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN (SYN of the established flow)")?;
        ensure!(
            r.return_value == XDP_TX && r.data_size_out as usize == syn.len(),
            "SYN of the established flow: verdict {} (expected XDP_TX)",
            r.return_value
        );
        let backend = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        let snat_port = u16::from_be_bytes([out[34], out[35]]);
        let backend_mac: Mac = out[0..6]
            .try_into()
            .context("destination MAC of the translated SYN")?;
        ensure!(
            BACKENDS.contains(&backend) && backend_mac[..5] == BACKEND0_MAC[..5],
            "translated SYN went to {backend} ({backend_mac:02x?}), not a benchmark backend"
        );

        let est_ack = Packet::tcp(client, VIP, TCP_ACK)
            .with_macs(LB_MAC, CLIENT_MAC)
            .build();
        let reply_ack = Packet::tcp(
            SocketAddrV4::new(backend, BACKEND_PORT),
            SocketAddrV4::new(LB_ADDR, snat_port),
            TCP_ACK,
        )
        .with_macs(LB_MAC, backend_mac)
        .build();
        let non_service = Packet::tcp(client, NON_SERVICE_DST, TCP_SYN)
            .with_macs(LB_MAC, CLIENT_MAC)
            .build();
        ensure!(
            est_ack.len() == syn.len()
                && reply_ack.len() == syn.len()
                && non_service.len() == syn.len(),
            "benchmark frames differ in length"
        );
        Ok(Self {
            dp,
            trivial,
            ctx,
            est_ack,
            reply_ack,
            non_service,
            _ns: ns,
        })
    }

    /// Single-mode calls of one unchanged frame on the shared router datapath,
    /// checked against the reason counters.
    fn router_single(
        &mut self,
        frame: &[u8],
        calls: u32,
        expect: u32,
        reason: u32,
        what: &str,
    ) -> Result<SingleResult> {
        let warm = vec![frame.to_vec(); WARMUP_CALLS as usize];
        let timed = vec![frame.to_vec(); calls as usize];
        let before = reason_vec(&self.dp)?;
        let prog = self.dp.program_mut().context("router program")?;
        single_calls(prog, &warm, &self.ctx, expect, what)?;
        let r = single_calls(prog, &timed, &self.ctx, expect, what)?;
        let after = reason_vec(&self.dp)?;
        check_reasons(
            &before,
            &after,
            reason,
            u64::from(WARMUP_CALLS + calls),
            what,
        )?;
        Ok(r)
    }

    fn trivial_single(&mut self, calls: u32) -> Result<SingleResult> {
        let warm = vec![self.non_service.clone(); WARMUP_CALLS as usize];
        let timed = vec![self.non_service.clone(); calls as usize];
        let prog = trivial_program(&mut self.trivial)?;
        single_calls(prog, &warm, &self.ctx, XDP_PASS, "xdp_pass single")?;
        single_calls(prog, &timed, &self.ctx, XDP_PASS, "xdp_pass single")
    }

    fn trivial_repeat(&mut self, repeat: u32) -> Result<SingleResult> {
        let prog = trivial_program(&mut self.trivial)?;
        repeat_call(
            prog,
            &self.non_service,
            &self.ctx,
            repeat,
            XDP_PASS,
            "xdp_pass repeat",
        )
    }

    fn non_service_repeat(&mut self, repeat: u32) -> Result<SingleResult> {
        let before = reason_vec(&self.dp)?;
        let prog = self.dp.program_mut().context("router program")?;
        let r = repeat_call(
            prog,
            &self.non_service,
            &self.ctx,
            repeat,
            XDP_PASS,
            "non-service repeat",
        )?;
        let after = reason_vec(&self.dp)?;
        check_reasons(
            &before,
            &after,
            reasons::PASS_NOT_SERVICE,
            u64::from(repeat),
            "non-service repeat",
        )?;
        Ok(r)
    }

    /// SYN path: a freshly loaded datapath, every call a new client port.
    fn syn_single(&mut self, calls: u32, case: &SynCase) -> Result<SingleResult> {
        let total = WARMUP_CALLS + calls;
        ensure!(
            u32::from(SYN_FIRST_PORT) + total <= u32::from(u16::MAX),
            "too many SYN calls per run ({total}) for distinct client ports"
        );
        let frames = client_frames(total, TCP_SYN);
        let (warm, timed) = frames.split_at(WARMUP_CALLS as usize);
        let spec = if case.least_loaded {
            least_loaded_service(case.backends)
        } else {
            service()
        };
        let mut dp = load_datapath_with(&spec, case.scan_limit, total)?;
        let before = reason_vec(&dp)?;
        let prog = dp.program_mut().context("router program")?;
        single_calls(prog, warm, &self.ctx, XDP_TX, "SYN single")?;
        let r = single_calls(prog, timed, &self.ctx, XDP_TX, "SYN single")?;
        let after = reason_vec(&dp)?;
        check_reasons(&before, &after, reasons::TX, u64::from(total), "SYN single")?;
        let st = dp.status().context("datapath status")?;
        let new_conns: u64 = st.services.iter().map(|s| s.counters.new_conns).sum();
        ensure!(
            new_conns == u64::from(total),
            "SYN single: {new_conns} new connections for {total} SYNs"
        );
        // The state claimed: every flow still in the half-open table, none
        // evicted by a later SYN of the same run.
        let held = table_entries(&mut dp, "HALF_OPEN")?;
        ensure!(
            held == 2 * u64::from(total),
            "{}: the half-open table holds {held} entries for {total} SYNs: it evicted",
            case.path
        );
        if case.least_loaded {
            // Least-loaded spreads the flows: no backend more than one
            // flow above another with equal weights when scanned.
            let counts: Vec<u64> = st.services[0]
                .backends
                .iter()
                .map(|b| b.in_flight)
                .collect();
            let (lo, hi) = (
                counts.iter().min().copied().unwrap_or(0),
                counts.iter().max().copied().unwrap_or(0),
            );
            ensure!(
                counts.iter().sum::<u64>() == u64::from(total)
                    && (case.scan_limit == 0 || hi - lo <= 1),
                "{}: in-flight spread {lo}..{hi} over {counts:?}",
                case.path
            );
        }
        Ok(r)
    }
}

impl Bench {
    /// The first ACK of a new flow, which promotes it from the half-open
    /// table into CONNS: a freshly loaded datapath, one SYN per client port
    /// (untimed), then each flow's ACK timed.
    fn first_ack_single(&mut self, calls: u32) -> Result<SingleResult> {
        let total = WARMUP_CALLS + calls;
        ensure!(
            u32::from(SYN_FIRST_PORT) + total <= u32::from(u16::MAX),
            "too many first-ACK calls per run ({total}) for distinct client ports"
        );
        let (syns, acks) = (client_frames(total, TCP_SYN), client_frames(total, TCP_ACK));
        let mut dp = load_datapath_with(&service(), 0, total)?;
        let before = reason_vec(&dp)?;
        let prog = dp.program_mut().context("router program")?;
        single_calls(prog, &syns, &self.ctx, XDP_TX, "first ACK: its SYN")?;
        let (warm, timed) = acks.split_at(WARMUP_CALLS as usize);
        single_calls(prog, warm, &self.ctx, XDP_TX, "first ACK single")?;
        let r = single_calls(prog, timed, &self.ctx, XDP_TX, "first ACK single")?;
        let after = reason_vec(&dp)?;
        check_reasons(
            &before,
            &after,
            reasons::TX,
            2 * u64::from(total),
            "first ACK single",
        )?;
        // The state claimed: every flow promoted, both directions in CONNS,
        // nothing left half-open and nothing evicted.
        let (conns, half_open) = (
            table_entries(&mut dp, "CONNS")?,
            table_entries(&mut dp, "HALF_OPEN")?,
        );
        ensure!(
            conns == 2 * u64::from(total) && half_open == 0,
            "first ACK single: CONNS holds {conns} and HALF_OPEN {half_open} entries \
             for {total} promoted flows"
        );
        Ok(r)
    }
}

pub struct Machine {
    pub kernel: String,
    pub cpu_model: String,
    pub nproc: usize,
    pub hypervisor: bool,
    pub bpf_jit_enable: String,
    pub pinned_cpu: usize,
}

fn machine(pinned_cpu: usize) -> Result<Machine> {
    let kernel = run(&["uname", "-r"])?.trim().to_string();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let hypervisor = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
    // Not available_parallelism: that counts the CPUs this (pinned) process may use.
    // SAFETY: sysconf has no memory effects.
    let nproc = usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) })
        .context("counting online CPUs")?;
    let bpf_jit_enable = std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    Ok(Machine {
        kernel,
        cpu_model,
        nproc,
        hypervisor,
        bpf_jit_enable,
        pinned_cpu,
    })
}

/// One row of the results table.
struct Row {
    path: &'static str,
    mode: &'static str,
    ns: Vec<f64>,
    adjusted: Option<Vec<f64>>,
    ratio: Option<Vec<f64>>,
    raw_ratio: Option<Vec<f64>>,
    reference: Option<&'static Reference>,
}

impl Row {
    fn verdict(&self) -> &'static str {
        match (self.reference, &self.ratio) {
            (Some(r), Some(v)) if median(v) <= r.target => "met",
            (Some(_), Some(_)) => "missed",
            _ => "—",
        }
    }
}

fn per_run(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| f(*x, *y)).collect()
}

fn rows(s: &Samples) -> Result<Vec<Row>> {
    let t0_rep = s.get("trivial/repeat/kernel_ns")?;
    let t0_single = s.get("trivial/single/kernel_ns")?;
    // Fixed per-call overhead of single mode, per run.
    let overhead = per_run(t0_single, t0_rep, |a, b| a - b);
    let mut rows = vec![
        Row {
            path: "trivial XDP_PASS (reference)",
            mode: "repeat",
            ns: t0_rep.to_vec(),
            adjusted: None,
            ratio: Some(vec![1.0; t0_rep.len()]),
            raw_ratio: None,
            reference: None,
        },
        Row {
            path: "non-service pass",
            mode: "repeat",
            ns: s.get("non_service/repeat/kernel_ns")?.to_vec(),
            adjusted: None,
            ratio: Some(per_run(
                s.get("non_service/repeat/kernel_ns")?,
                t0_rep,
                |a, b| a / b,
            )),
            raw_ratio: None,
            reference: Some(&NON_SERVICE_REF),
        },
        Row {
            path: "trivial XDP_PASS (reference)",
            mode: "single",
            ns: t0_single.to_vec(),
            adjusted: Some(t0_rep.to_vec()),
            ratio: Some(vec![1.0; t0_rep.len()]),
            raw_ratio: Some(vec![1.0; t0_rep.len()]),
            reference: None,
        },
    ];
    let fixed = [
        ("non-service pass", "non_service", Some(&NON_SERVICE_REF)),
        (
            "established TCP forward",
            "established",
            Some(&ESTABLISHED_REF),
        ),
        ("reply (backend → SNAT)", "reply", None),
        ("first ACK of a new flow (promotes it)", "first_ack", None),
    ];
    let syns = SYN_CASES
        .iter()
        .map(|c| (c.path, c.key, (c.key == "syn").then_some(&SYN_REF)));
    for (path, series, reference) in fixed.into_iter().chain(syns) {
        let ns = s.get(&key(series, "kernel_ns"))?;
        let adjusted = per_run(ns, &overhead, |a, o| a - o);
        rows.push(Row {
            path,
            mode: "single",
            ns: ns.to_vec(),
            ratio: Some(per_run(&adjusted, t0_rep, |a, b| a / b)),
            raw_ratio: Some(per_run(ns, t0_single, |a, b| a / b)),
            adjusted: Some(adjusted),
            reference,
        });
    }
    // The whole cost of a new connection to the datapath: its SYN (Maglev)
    // and the client's first ACK, each net of the per-call overhead.
    let syn = s.get(&key("syn", "kernel_ns"))?;
    let ack = s.get(&key("first_ack", "kernel_ns"))?;
    let both = per_run(syn, ack, |a, b| a + b);
    let adjusted = per_run(&both, &overhead, |a, o| a - 2.0 * o);
    rows.push(Row {
        path: "SYN + first ACK (a new connection, Maglev)",
        mode: "single",
        ns: both,
        ratio: Some(per_run(&adjusted, t0_rep, |a, b| a / b)),
        // Two calls against one: a raw ratio would count the overhead twice.
        raw_ratio: None,
        adjusted: Some(adjusted),
        reference: Some(&NEW_CONN_REF),
    });
    Ok(rows)
}

fn fmt_ns(v: &[f64]) -> String {
    let (lo, hi) = min_max(v);
    format!("{:.1} ({:.1}–{:.1})", median(v), lo, hi)
}

fn fmt_ratio(v: &[f64]) -> String {
    format!("{:.2}×", median(v))
}

fn table(rows: &[Row]) -> String {
    let mut t = String::new();
    t.push_str(
        "| path | mode | ns/packet, median (min–max) | overhead-subtracted ns | ratio to XDP_PASS | raw ratio | target | Katran | result |\n",
    );
    t.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.path,
            r.mode,
            fmt_ns(&r.ns),
            r.adjusted
                .as_deref()
                .map(fmt_ns)
                .unwrap_or_else(|| "—".into()),
            r.ratio
                .as_deref()
                .map(fmt_ratio)
                .unwrap_or_else(|| "—".into()),
            r.raw_ratio
                .as_deref()
                .map(fmt_ratio)
                .unwrap_or_else(|| "—".into()),
            r.reference
                .map(|x| format!("≤ {}×", x.target))
                .unwrap_or_else(|| "—".into()),
            r.reference.map(|x| x.katran).unwrap_or("—"),
            r.verdict(),
        );
    }
    t
}

fn json_rows(rows: &[Row]) -> Value {
    Value::Array(
        rows.iter()
            .map(|r| {
                json!({
                    "path": r.path,
                    "mode": r.mode,
                    "ns_median": median(&r.ns),
                    "overhead_subtracted_ns_median": r.adjusted.as_deref().map(median),
                    "ratio_median": r.ratio.as_deref().map(median),
                    "raw_ratio_median": r.raw_ratio.as_deref().map(median),
                    "target_ratio": r.reference.map(|x| x.target),
                    "katran_ratio": r.reference.map(|x| x.katran),
                    "result": r.verdict(),
                })
            })
            .collect(),
    )
}

pub fn run_datapath(settings: &Settings) -> Result<()> {
    let cpu = pin_to_last_cpu()?;
    let m = machine(cpu)?;
    eprintln!(
        "bench datapath: {} runs, repeat {}, {} single calls per path and run{}",
        settings.runs,
        settings.repeat,
        settings.single_calls,
        if settings.quick { " (quick)" } else { "" }
    );
    let mut s = Samples::default();
    {
        let mut b = Bench::new()?;
        for i in 0..settings.runs {
            let n = settings.single_calls;
            // Repeat mode, trivial first, then the path it is compared with.
            let t = b.trivial_repeat(settings.repeat)?;
            s.push("trivial/repeat/kernel_ns", t.kernel_ns);
            s.push("trivial/repeat/wall_ns", t.wall_ns);
            let r = b.non_service_repeat(settings.repeat)?;
            s.push("non_service/repeat/kernel_ns", r.kernel_ns);
            s.push("non_service/repeat/wall_ns", r.wall_ns);

            let t = b.trivial_single(n)?;
            s.push_single("trivial", &t);
            let frame = b.non_service.clone();
            let r = b.router_single(
                &frame,
                n,
                XDP_PASS,
                reasons::PASS_NOT_SERVICE,
                "non-service single",
            )?;
            s.push_single("non_service", &r);
            let frame = b.est_ack.clone();
            let r = b.router_single(&frame, n, XDP_TX, reasons::TX, "established single")?;
            s.push_single("established", &r);
            for case in &SYN_CASES {
                let r = b.syn_single(n, case)?;
                s.push_single(case.key, &r);
            }
            let r = b.first_ack_single(n)?;
            s.push_single("first_ack", &r);
            let frame = b.reply_ack.clone();
            let r = b.router_single(&frame, n, XDP_TX, reasons::TX, "reply single")?;
            s.push_single("reply", &r);
            eprintln!("  run {}/{} done", i + 1, settings.runs);
        }
    }
    let rows = rows(&s)?;
    let table = table(&rows);
    println!("{table}");
    write_results(settings, &m, &s, &rows, &table)
}

fn write_results(
    settings: &Settings,
    m: &Machine,
    s: &Samples,
    rows: &[Row],
    table: &str,
) -> Result<()> {
    let dir = &settings.out_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let machine_md = format!(
        "- kernel: `{}`\n- CPU: {} ({} CPUs online{}; the benchmark ran pinned to CPU {})\n- BPF JIT: `net.core.bpf_jit_enable = {}`\n",
        m.kernel,
        m.cpu_model,
        m.nproc,
        if m.hypervisor {
            ", virtual machine"
        } else {
            ""
        },
        m.pinned_cpu,
        m.bpf_jit_enable,
    );
    let t0_rep = s.get("trivial/repeat/kernel_ns")?;
    let t0_single = s.get("trivial/single/kernel_ns")?;
    let overhead = median(&per_run(t0_single, t0_rep, |a, b| a - b));
    let wall_rep_ratio = median(&per_run(
        s.get("non_service/repeat/wall_ns")?,
        s.get("trivial/repeat/wall_ns")?,
        |a, b| a / b,
    ));
    let ns_single = rows
        .iter()
        .find(|r| r.path == "non-service pass" && r.mode == "single")
        .and_then(|r| r.ratio.as_deref())
        .map(median)
        .context("non-service single row")?;
    let ns_repeat = rows
        .iter()
        .find(|r| r.path == "non-service pass" && r.mode == "repeat")
        .and_then(|r| r.ratio.as_deref())
        .map(median)
        .context("non-service repeat row")?;
    let md = format!(
        "# Datapath benchmark\n\n\
         Generated by `cargo xtask bench datapath{quick}` \
         (`cargo run --release -p router-bench --bin bench -- datapath{quick}`). \
         {runs} runs; repeat mode R = {repeat}; single mode {calls} timed calls per path and run \
         (after {warm} untimed warm-up calls).\n\n\
         {table}\n\
         Fixed single-mode per-call overhead O = T0_single − T0_repeat: {overhead:.1} ns (median), \
         subtracted from every single-mode figure in the \"overhead-subtracted\" column. \
         \"ratio to XDP_PASS\" is the overhead-corrected ratio and is what the target is judged on; \
         \"raw ratio\" is path_single / T0_single.\n\n\
         Consistency checks. (1) The non-service pass is measured in both modes: {ns_single:.2}× in \
         single mode (overhead-corrected) against {ns_repeat:.2}× in repeat mode. What remains between \
         the two is the extra cost of running a program once per syscall, with caches and predictors \
         disturbed between calls, which subtracting O cannot remove; the single-mode ratios of the \
         other paths carry the same bias, so they overstate rather than understate their cost next \
         to repeat-mode figures such as Katran's. (2) Wall-clock time around the repeat-mode syscall \
         (fractional ns, not truncated like the kernel's figure, but including interrupts and \
         rescheduling that the kernel's timer leaves out): non-service / trivial = {wall_rep_ratio:.2}×.\n\n\
         ## Method\n\n{METHOD}\n\
         ## Machine\n\n{machine_md}\n\
         Raw per-run numbers: `datapath.json`.\n",
        quick = if settings.quick { " --quick" } else { "" },
        runs = settings.runs,
        repeat = settings.repeat,
        calls = settings.single_calls,
        warm = WARMUP_CALLS,
    );
    let samples: serde_json::Map<String, Value> =
        s.0.iter()
            .map(|(k, v)| ((*k).to_string(), json!(v)))
            .collect();
    let doc = json!({
        "benchmark": "datapath",
        "quick": settings.quick,
        "settings": {
            "runs": settings.runs,
            "repeat": settings.repeat,
            "single_calls": settings.single_calls,
            "warmup_calls": WARMUP_CALLS,
            "frame_bytes": 54,
        },
        "machine": {
            "kernel": m.kernel,
            "cpu_model": m.cpu_model,
            "nproc": m.nproc,
            "virtual_machine": m.hypervisor,
            "bpf_jit_enable": m.bpf_jit_enable,
            "pinned_cpu": m.pinned_cpu,
        },
        "units": "ns per packet; kernel_ns = BPF_PROG_TEST_RUN duration (repeat: per repetition; single: mean per call), kernel_call_median_ns = median of the per-call durations of one single-mode run (not used in the table), wall_ns = wall clock per packet around the syscall(s)",
        "per_run": samples,
        "single_overhead_ns_per_run": per_run(t0_single, t0_rep, |a, b| a - b),
        "summary": json_rows(rows),
        "commit": crate::report::source_commit(),
        "method": METHOD,
    });
    write(&dir.join("datapath.md"), &md)?;
    write(
        &dir.join("datapath.json"),
        &(serde_json::to_string_pretty(&doc).context("encoding datapath.json")? + "\n"),
    )?;
    eprintln!(
        "wrote {} and {}",
        dir.join("datapath.md").display(),
        dir.join("datapath.json").display()
    );
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
