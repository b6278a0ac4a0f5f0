//! The paths measured and how: the service and datapath loaded for them,
//! the SYN cases, frames, and one timed call or one repeated call of the
//! program through BPF_PROG_TEST_RUN.

use std::{net::SocketAddrV4, time::Instant};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions, Xdp},
};
use router::datapath::{
    BackendSpec, Datapath, Forwarding, LoadOptions, SCAN_LIMIT, Selection, ServiceSpec,
};
use router_common::reasons;
use router_testkit::packet::{Packet, TCP_ACK, TCP_SYN};

use super::{
    BACKEND_PORT, BACKENDS, CLIENT_MAC, LB_ADDR, LB_MAC, SYN_CLIENT_ADDR, SYN_FIRST_PORT, VIP,
};
use crate::report::{median, percentile};

pub(super) fn service() -> ServiceSpec {
    ServiceSpec {
        forwarding: Forwarding::Nat,
        name: "bench".into(),
        vip: VIP.into(),
        proto: router_common::PROTO_TCP,
        snat: vec![LB_ADDR.into()],
        snat_port_min: 10000,
        snat_port_max: 32767,
        selection: router::datapath::Selection::Maglev,
        backends: BACKENDS
            .iter()
            .enumerate()
            .map(|(i, a)| BackendSpec {
                role: router::datapath::BackendRole::Primary,
                name: format!("b{i}"),
                address: SocketAddrV4::new(*a, BACKEND_PORT).into(),
                weight: 1,
                max_in_flight: 0,
            })
            .collect(),
        pools: Vec::new(),
        segments: Vec::new(),
    }
}

/// `service()` forwarded by DSR over IPIP.
pub(super) fn dsr_service() -> ServiceSpec {
    ServiceSpec {
        forwarding: Forwarding::Ipip,
        snat: Vec::new(),
        ..service()
    }
}

/// The IPv6 twin of `dsr_service()`: the VIP and backends in
/// 2001:2::/48 (the fixture arm's IPv6 neighbours), IPv6 in IPv6.
pub(super) fn dsr6_service() -> ServiceSpec {
    let base = dsr_service();
    ServiceSpec {
        name: "llama6".into(),
        vip: std::net::SocketAddr::new(VIP6.into(), base.vip.port()),
        backends: base
            .backends
            .into_iter()
            .enumerate()
            .map(|(i, b)| router::datapath::BackendSpec {
                address: std::net::SocketAddr::new(
                    format!("2001:2::{}", 11 + i)
                        .parse::<std::net::Ipv6Addr>()
                        .expect("a literal address")
                        .into(),
                    b.address.port(),
                ),
                ..b
            })
            .collect(),
        ..base
    }
}

/// `dsr6_service()` as a NAT service, translating from the fixture arm's
/// own IPv6 address.
pub(super) fn nat6_service() -> ServiceSpec {
    ServiceSpec {
        forwarding: Forwarding::Nat,
        snat: vec!["2001:2::1".parse().expect("a literal address")],
        ..dsr6_service()
    }
}

/// The IPv6 VIP of `dsr6_service()`.
pub(super) const VIP6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0x2001, 2, 0x100, 0, 0, 0, 0, 1);

pub(super) fn load_datapath() -> Result<Datapath> {
    load_datapath_with(&service(), SCAN_LIMIT, 0)
}

/// A datapath serving `spec`, with a half-open table that holds every flow
/// of `syns` SYNs (two entries each) without evicting one. With
/// BPF_F_NO_COMMON_LRU each possible CPU gets its own share of the table,
/// and inserts on the pinned CPU can only use that share, so the table is
/// sized for the share.
pub(super) fn load_datapath_with(
    spec: &ServiceSpec,
    scan_limit: usize,
    syns: u32,
) -> Result<Datapath> {
    let cpus = aya::util::nr_cpus()
        .map_err(|(_, e)| anyhow::anyhow!("counting possible CPUs: {e}"))? as u64;
    let half_open = (u64::from(syns) * 2 * cpus * 5 / 4).next_power_of_two();
    let conn_table_size = u32::try_from((half_open * 4).max(1 << 18))
        .context("connection table for this many SYNs and CPUs")?;
    // As the daemon loads it: a client port in the host's ephemeral range
    // costs the SYN a host-socket lookup (see `flow::client_port_usable`).
    let ephemeral_ports = router::host::facts::ephemeral_port_range()
        .context("reading net.ipv4.ip_local_port_range")?;
    let mut dp = Datapath::load(LoadOptions {
        conn_table_size,
        ephemeral_ports,
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
pub(super) fn least_loaded_service(n: usize) -> ServiceSpec {
    ServiceSpec {
        selection: Selection::LeastLoaded,
        backends: (0..n)
            .map(|i| BackendSpec {
                role: router::datapath::BackendRole::Primary,
                name: format!("b{i}"),
                address: SocketAddrV4::new(BACKENDS[i % 3], BACKEND_PORT + (i / 3) as u16).into(),
                weight: 100,
                max_in_flight: 0,
            })
            .collect(),
        ..service()
    }
}

/// The SYN rows: how each pick is configured.
pub(super) struct SynCase {
    pub(super) key: &'static str,
    pub(super) path: &'static str,
    pub(super) backends: usize,
    pub(super) least_loaded: bool,
    /// Least-loaded services above this size draw two choices.
    pub(super) scan_limit: usize,
}

pub(super) const SYN_CASES: [SynCase; 8] = [
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
pub(super) struct SingleResult {
    pub(super) kernel_ns: f64,
    /// Median and 90th percentile of the per-call kernel durations
    /// (single mode; repeat mode has one duration, so both are it).
    pub(super) kernel_call_median_ns: f64,
    pub(super) kernel_call_p90_ns: f64,
    pub(super) wall_ns: f64,
}

/// One frame with TCP `flags` per client port of the SYN paths, `total`
/// ports from `SYN_FIRST_PORT` on: each its own flow.
pub(super) fn client_frames(total: u32, flags: u8) -> Vec<Vec<u8>> {
    (0..total)
        .map(|i| {
            let port = SYN_FIRST_PORT + i as u16;
            Packet::tcp(SocketAddrV4::new(SYN_CLIENT_ADDR, port), VIP, flags)
                .with_macs(LB_MAC, CLIENT_MAC)
                .build()
        })
        .collect()
}

/// One UDP datagram per client port, `total` ports from `SYN_FIRST_PORT`
/// on: each the first of its own flow. Its 12-byte payload gives it the
/// TCP frames' length, so one context fits all.
pub(super) fn udp_client_frames(total: u32) -> Vec<Vec<u8>> {
    (0..total)
        .map(|i| {
            let port = SYN_FIRST_PORT + i as u16;
            Packet::udp(SocketAddrV4::new(SYN_CLIENT_ADDR, port), VIP, &[0u8; 12])
                .with_macs(LB_MAC, CLIENT_MAC)
                .build()
        })
        .collect()
}

/// The backend's SYN-ACK for every half-open flow: one frame per reply
/// entry in HALF_OPEN, from the backend to the flow's SNAT address and
/// port, with the default sequence numbers that the client frames answer.
pub(super) fn syn_acks(dp: &mut Datapath) -> Result<Vec<Vec<u8>>> {
    let map: aya::maps::HashMap<_, router_common::ConnKey, router_common::ConnEntry> =
        aya::maps::HashMap::try_from(
            dp.ebpf_mut()
                .map_mut("HALF_OPEN")
                .context("HALF_OPEN map")?,
        )?;
    let mut frames = Vec::new();
    for item in map.iter() {
        let (k, e) = item.context("reading HALF_OPEN")?;
        if !e.is_reply() {
            continue;
        }
        let at = |a: u32, p: u16| SocketAddrV4::new(a.to_ne_bytes().into(), u16::from_be(p));
        frames.push(
            Packet::tcp(
                at(k.src_addr, k.src_port),
                at(k.dst_addr, k.dst_port),
                TCP_SYN | TCP_ACK,
            )
            .with_macs(LB_MAC, CLIENT_MAC)
            .build(),
        );
    }
    Ok(frames)
}

/// Entries of connection table `name` (CONNS or HALF_OPEN).
pub(super) fn table_entries(dp: &mut Datapath, name: &str) -> Result<u64> {
    let map: aya::maps::HashMap<_, router_common::ConnKey, router_common::ConnEntry> =
        aya::maps::HashMap::try_from(
            dp.ebpf_mut()
                .map_mut(name)
                .with_context(|| format!("{name} map"))?,
        )?;
    Ok(map.keys().filter(Result::is_ok).count() as u64)
}

/// Entries of an IPv6 flow table (`DSR_FLOWS6` with `DsrFlow6` values,
/// `NAT6_CONNS` with `NatEntry6`), whose keys are IPv6's.
pub(super) fn entries6<V: aya::Pod>(dp: &mut Datapath, name: &str) -> Result<u64> {
    let map: aya::maps::HashMap<_, router_common::v6::ConnKey6, V> = aya::maps::HashMap::try_from(
        dp.ebpf_mut()
            .map_mut(name)
            .with_context(|| format!("{name} map"))?,
    )?;
    Ok(map.keys().filter(Result::is_ok).count() as u64)
}

/// Entries of `DSR_FLOWS6`.
pub(super) fn dsr6_entries(dp: &mut Datapath) -> Result<u64> {
    entries6::<router_common::v6::DsrFlow6>(dp, "DSR_FLOWS6")
}

/// Entries of `NAT6_CONNS` (two per flow).
pub(super) fn nat6_entries(dp: &mut Datapath) -> Result<u64> {
    entries6::<router_common::v6::NatEntry6>(dp, "NAT6_CONNS")
}

/// Times `frames.len()` single-packet calls (repeat = 1), one per frame.
pub(super) fn single_calls(
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
        kernel_call_p90_ns: percentile(&durations, 0.9),
        wall_ns: wall as f64 / n,
    })
}

/// Kernel-reported ns per repetition and wall-clock ns per repetition.
pub(super) fn repeat_call(
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
        kernel_call_p90_ns: r.duration.as_nanos() as f64,
        wall_ns: wall as f64 / f64::from(repeat.max(1)),
    })
}

pub(super) fn reason_vec(dp: &Datapath) -> Result<Vec<u64>> {
    Ok(dp
        .reason_counts()
        .context("reading the reason counters")?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// Checks that exactly `n` packets were counted, all under `reason`.
pub(super) fn check_reasons(
    before: &[u64],
    after: &[u64],
    reason: u32,
    n: u64,
    what: &str,
) -> Result<()> {
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

pub(super) fn trivial_program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    ebpf.program_mut("xdp_pass")
        .context("xdp_pass program missing from its object")?
        .try_into()
        .context("xdp_pass is not an XDP program")
}

pub(super) fn pin_to_last_cpu() -> Result<usize> {
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
