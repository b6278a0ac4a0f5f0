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
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
};

use anyhow::{Context, Result};
use router_common::reasons;
use router_testkit::packet::Mac;

mod bench;
mod paths;
mod perf;
mod profile;
mod profiling;
mod results;

use bench::Bench;
use paths::{SYN_CASES, SingleResult, pin_to_last_cpu};
pub use profiling::ProfileSettings;
use results::{machine, rows, table, write_results};

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
/// Inside the ephemeral range that Linux clients take their ports from
/// (32768–60999 by default), as the clients of a deployed LB do.
const SYN_FIRST_PORT: u16 = 33_000;
/// Untimed calls before each timed loop (cache, branch predictor, FIB cache).
const WARMUP_CALLS: u32 = 1000;

/// Katran's ratios to XDP_PASS measured the same way, and the targets.
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
/// DSR's forward path against NAT's established one: the goal of issue 17.
pub(super) const DSR_GOAL: f64 = 1.3;
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
    /// The profiling pass after the timed runs.
    pub profile: ProfileSettings,
    pub quick: bool,
    pub out_dir: PathBuf,
}

impl Settings {
    pub fn full(out_dir: PathBuf) -> Self {
        Self {
            runs: 15,
            repeat: 1_000_000,
            single_calls: 20_000,
            profile: ProfileSettings {
                new_flow_secs: 3.0,
                flow_secs: 5.0,
            },
            quick: false,
            out_dir,
        }
    }

    pub fn quick(out_dir: PathBuf) -> Self {
        Self {
            runs: 5,
            repeat: 100_000,
            single_calls: 2_000,
            // About 10 s in all, most of it perf starting and perf script.
            profile: ProfileSettings {
                new_flow_secs: 0.3,
                flow_secs: 0.8,
            },
            quick: true,
            out_dir,
        }
    }
}

pub const METHOD: &str = "\
- Every program runs through BPF_PROG_TEST_RUN (aya `TestRun::test_run`) with an \
`xdp_md` context whose `ingress_ifindex` is a veth in a private network namespace \
with static neighbours, so `bpf_fib_lookup` resolves real next hops. Nothing is \
attached to any interface. The process is pinned to one CPU. All frames are 54 bytes: \
TCP/IPv4 frames without payload, and UDP/IPv4 frames with 12 bytes of payload.
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
the median of the kernel-reported `duration` of the timed calls, so that one call \
stretched by an interrupt moves it no more than any other (the p90 column is the \
90th percentile of the same calls; each run's mean is kept in the JSON as \
`kernel_ns`). That duration \
excludes the syscall entry/exit and the data copies but includes a fixed per-call \
overhead (the timer reads and the test-run set-up around one repetition) that repeat \
mode amortises away. It is measured in the same run as O = T0_single − T0_repeat, \
where T0_single is the trivial program's median in the same single-call loop and \
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
established forward (an ACK of a flow confirmed by a handshake: connection-table hit with \
cached next hop); SYN new flow (each timed call a new client port, inside the host's \
ephemeral range as a Linux client's are, so each SYN looks for a host socket on the SNAT \
4-tuple before it keeps the port: connection-table \
miss, the pick, SNAT claim, two inserts, FIB lookup; the datapath is loaded afresh \
for every run with a half-open table sized for every SYN of the run on each CPU's \
share, and after the run the benchmark checks that the table holds every flow, so \
no timed SYN evicts one and SNAT ports never collide). SYN rows by pick: Maglev \
(3 backends), least-loaded scanning 4, 8, 16 and 32 backends, least-loaded two \
choices from the Maglev table with 16, 32 and 64 backends; every backend has a \
resolved neighbour, so every SYN takes the same XDP_TX path. The least-loaded \
rows check that the flows spread (scan: no backend more than one flow above \
another); reply \
(backend → SNAT address:port of the established flow: reply-entry hit); DSR established \
forward (the same flow's ACK on a second datapath serving the service by DSR over IPIP, \
its entry made by an untimed SYN: the IP header and the filter bucket, checked to be \
marked DSR-only, the tail call into `router_dsr` on that bit, which classifies the \
packet again, a `DSR_FLOWS` hit with cached next hop, and the 20-byte outer \
header; checked to leave exactly one entry), judged against the goal of ≤ 1.3× the \
NAT established path's overhead-subtracted ns, per run; IPv6 DSR established forward \
(the IPv6 twin of that flow's ACK, 74 bytes, on a third datapath serving the service's \
IPv6 twin by IPv6 in IPv6: `router`'s tail call on the EtherType into `router_v6`, \
the IPv6 parse, a `DSR_FLOWS6` hit with cached next hop and the 40-byte outer header; \
checked to leave exactly one entry), judged the same way; first ACK of a \
new flow (a fresh datapath, one untimed SYN per client port and the backend's \
untimed SYN-ACK, then each flow's ACK, which acknowledges it, timed: it promotes the flow from the half-open table into CONNS, and after the run \
the benchmark checks that CONNS holds both directions of every flow and nothing is \
left half-open); UDP first datagram of a new flow (a fresh datapath serving the \
same service over UDP, each timed call a new client port in the ephemeral range: \
the host-socket lookup, the pick, SNAT claim and two inserts, checked like the SYN \
rows: every datagram forwarded, a new flow each, both directions of every flow held \
in the half-open table); SYN + first ACK, the sum of the Maglev SYN row and the first-ACK \
row per run, net of the per-call overhead twice: what a new connection costs the \
datapath.
- Each path's timed calls are preceded by untimed warm-up calls, and after each timed \
batch the per-reason counters are checked: every call must have taken the intended \
path (verdict and reason), otherwise the benchmark fails. The benchmark asserts \
nothing about speed.
- Every figure is the median over the runs of the per-run figure (SYN + first ACK: \
of the per-run sums of the two medians); ratios are the median of the per-run \
ratios (trivial measured in the same run). min–max over the runs is given beside each \
ns figure.
- Profile (the section \"Where the time goes\"): after every timed run, so that it \
disturbs no timing, the SYN (Maglev), first-ACK, established and reply paths are \
called again exactly as in the timed loop (fresh frames, a fresh datapath with tables \
sized so nothing evicts for each batch of 20,000 new flows, the same counter checks) \
under `perf record -e cpu-clock -g` attached to the benchmark's own thread and switched \
on only around those calls, for a few seconds of calls per path (under a second with \
`--quick`; the seconds are in the table). \
The machine has no hardware PMU, so `cpu-clock` is the kernel's software timer, \
sampling at 20 kHz; each sample is the interrupted call chain, and the JIT-ed program \
and its BPF subprograms are named by their kernel symbols (`bpf_prog_<tag>_<name>`). \
A sample counts as inside the program when its chain holds the `router` program's \
frame; its part is that of the first kernel function, from the one the program (or \
one of its subprograms) called down to the leaf, that a part names: LRU insert \
(`htab_lru_map_update_elem` and the LRU free-list pop below it), hash lookup \
(`lookup_nulls_elem_raw`, `__htab_map_lookup_elem`, `htab_*lookup*`), LRU delete, \
socket lookup (`bpf_xdp_skc_lookup_tcp`, `bpf_xdp_sk_lookup_udp`, `bpf_sk_release`), \
FIB lookup (`bpf_xdp_fib_lookup`), clock (the ktime helpers); failing that, BPF \
subprograms when the program called one (e.g. its memset or memmove), program's own \
instructions when the program's frame is the leaf, and other. Shares are of sampled \
time inside the program, not of calls; ns = share × the path's overhead-subtracted \
median of the same invocation, so the column sums to that median. A share of n \
samples carries a sampling error of about √n samples: with the counts given, the \
reader can judge which differences are noise. The JSON keeps each part's sample \
count and the in-program samples by the function the program called.
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
        self.push(key(series, "kernel_call_p90_ns"), r.kernel_call_p90_ns);
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

pub fn run_datapath(settings: &Settings) -> Result<()> {
    // Before the minutes of timed runs, not after them.
    perf::check_available()?;
    // Before any program is loaded: perf names a program by the symbol
    // the kernel gives it at load time.
    let _kallsyms = perf::JitKallsyms::on()?;
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
    let profiles = {
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
                None,
            )?;
            s.push_single("non_service", &r);
            let frame = b.est_ack.clone();
            let r = b.router_single(&frame, n, XDP_TX, reasons::TX, "established single", None)?;
            s.push_single("established", &r);
            let r = b.dsr_single(n)?;
            s.push_single("dsr_established", &r);
            let r = b.v6_single(false, n)?;
            s.push_single("dsr6_established", &r);
            let r = b.v6_single(true, n)?;
            s.push_single("nat6_established", &r);
            for case in &SYN_CASES {
                let r = b.syn_single(n, case, None)?;
                s.push_single(case.key, &r);
            }
            let r = b.first_ack_single(n, None)?;
            s.push_single("first_ack", &r);
            let r = b.udp_first_single(n)?;
            s.push_single("udp_first", &r);
            let frame = b.reply_ack.clone();
            let r = b.router_single(&frame, n, XDP_TX, reasons::TX, "reply single", None)?;
            s.push_single("reply", &r);
            eprintln!("  run {}/{} done", i + 1, settings.runs);
        }
        eprintln!("bench datapath: profiling");
        profiling::run_profiles(&mut b, &settings.profile)?
    };
    let rows = rows(&s)?;
    let table = table(&rows);
    println!("{table}");
    write_results(settings, &m, &s, &rows, &table, &profiles)
}
