//! The SYN-flood scenario, shared by the flood test (which asserts what
//! must hold) and `bench synflood` (which records the figures): a real
//! daemon with a deliberately small connection table, long-lived streams
//! through the VIP, then a SYN flood from spoofed sources in 198.19.0.0/16
//! while new legitimate connections keep being opened.
//!
//! Nothing leaves the topology: spoofed SYNs are raw frames injected on the
//! client's interface; the backends answer the LB's SNAT address; the
//! SYN-ACKs the LB translates back towards 198.19.0.0/16 meet a blackhole
//! route in the LB's namespace (and the ones it cannot translate are
//! answered by its own stack with a reset to the backend).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use anyhow::{Result, ensure};
use router::api::StatusReply;
use router_testkit::{netns, raw_sender::RawSender};
use serde::Serialize;

mod page;
mod rig;
mod traffic;

pub use page::run_bench;
pub use rig::{Rig, syn_template};

use traffic::{NewConns, flood_from, new_connections, open_stream, read_stream};

/// The service's VIP in every flood scenario.
pub const VIP: &str = "198.18.100.1:8000";
/// [`VIP`] as an address.
pub const VIP_ADDR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 1), 8000);
/// Where spoofed sources come from: inside the benchmarking range, outside
/// every address the topology uses, and blackholed in the LB's namespace.
pub const SPOOF_NET: &str = "198.19.0.0/16";

/// SNAT addresses besides the LB's own (four in all, the most a service
/// may have). Every half-open flow holds a backend 4-tuple (backend, SNAT
/// address and port), and a spoofed SYN that lands on a real handshake's
/// 4-tuple takes it over (the newest SYN wins), so the real client has to
/// retransmit its SYN. Four addresses make that four times rarer;
/// docs/operations.md ("Under attack") advises the same.
pub const SNAT_EXTRA: [Ipv4Addr; 3] = [
    Ipv4Addr::new(198, 18, 0, 5),
    Ipv4Addr::new(198, 18, 0, 6),
    Ipv4Addr::new(198, 18, 0, 7),
];
/// Lines a stream may carry before its reader stops (a bound, never reached
/// by a stream of the configured length).
const MAX_STREAM_LINES: usize = 100_000;
/// Gap between two new legitimate connections during the flood.
const NEW_CONN_GAP: Duration = Duration::from_millis(50);
/// The unpaced flood that measures what the datapath absorbs.
const CALIBRATION: Duration = Duration::from_secs(1);
/// Share of the calibrated rate that a paced flood is sent at.
const PACE_FRACTION: f64 = 2.0 / 3.0;
/// Spoofed SYN numbers of the calibration, apart from the flood's own.
const CALIBRATION_FIRST_INDEX: u64 = 1 << 40;
/// Client threads opening new connections during the flood, each one
/// connection at a time.
const NEW_CONN_THREADS: usize = 4;
/// Legitimate connections made before the flood, to check the path.
const BEFORE_FLOOD_CONNS: usize = 10;
/// Legitimate connections made after the flood has stopped.
const AFTER_FLOOD_CONNS: usize = 20;

/// What to run.
#[derive(Clone, Debug, Serialize)]
pub struct Params {
    /// `conn_table_size` in the daemon's config: small, so the flood overflows it.
    pub conn_table_size: u32,
    /// Long-lived streams opened before the flood.
    pub streams: usize,
    /// Interval between two lines of a stream.
    pub stream_interval_ms: u64,
    /// The flood stops at whichever bound comes first.
    pub flood_max: Duration,
    pub flood_max_packets: u64,
    /// Send at [`PACE_FRACTION`] of the rate the datapath absorbed in a
    /// first, unpaced second instead of as fast as the senders can. Offered
    /// faster than the LB processes, the excess is dropped on the way in,
    /// legitimate packets with it, and what fails then is capacity, not the
    /// router's handling of a flood; the test wants the latter. The fraction
    /// leaves room for what shares the machine with the LB here (backends
    /// answering every SYN, clients, streams), which the calibration second
    /// did not have to carry.
    pub pace_to_datapath: bool,
    /// Sending threads, each with its own raw socket. On a two-core
    /// machine one saturates a core with the kernel's work per frame; the
    /// test keeps the other core for the LB and the clients, the benchmark
    /// takes both.
    pub flood_threads: usize,
    pub backends: usize,
}

impl Params {
    /// Short enough for the test suite.
    pub fn test() -> Params {
        Params {
            conn_table_size: 8192,
            streams: 20,
            stream_interval_ms: 100,
            flood_max: Duration::from_secs(8),
            flood_max_packets: 10_000_000,
            pace_to_datapath: true,
            flood_threads: 1,
            backends: 2,
        }
    }

    /// The recorded benchmark: a longer flood from every core, paced or as
    /// fast as the senders go (`quick`: as long as the test's).
    pub fn bench(paced: bool, quick: bool) -> Params {
        Params {
            flood_max: Duration::from_secs(if quick { 8 } else { 20 }),
            flood_max_packets: 20_000_000,
            flood_threads: 2,
            pace_to_datapath: paced,
            ..Params::test()
        }
    }
}

/// One stream as its reader saw it.
#[derive(Clone, Debug, Serialize)]
pub struct StreamResult {
    pub backend: String,
    pub lines: usize,
    /// Longest wait for a line: congestion shows here, not as a failure.
    pub max_gap_ms: u64,
    /// Why the stream did not end whole (every line, then its end marker),
    /// if it did not.
    pub error: Option<String>,
}

/// Everything measured; the test asserts on it and the benchmark records it.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub params: Params,
    /// Frames the raw sockets handed to the kernel, and in how long.
    pub flood_sent: u64,
    pub flood_refused: u64,
    pub flood_secs: f64,
    pub flood_rate_pps: f64,
    /// With `pace_to_datapath`: the rate the datapath absorbed in the
    /// unpaced calibration second; the flood was paced to a share of it.
    pub calibrated_rate_pps: Option<f64>,
    /// Flows the datapath created during the flood (every spoofed SYN that
    /// reached it, plus the legitimate new connections), and their rate.
    pub datapath_new_flows: u64,
    pub datapath_rate_pps: f64,
    /// Per-reason counter movement over the flood (only reasons that moved).
    pub reasons_during_flood: BTreeMap<String, u64>,
    /// Per-reason counter movement over the whole run, streams included.
    pub reasons_total: BTreeMap<String, u64>,
    pub streams: Vec<StreamResult>,
    /// Streams that ended whole: every line, each from the backend that
    /// started them, then the backend's end marker (see `read_stream`). A
    /// stream whose flow the LB lost ends in a reset, a read timeout, or
    /// without its end.
    pub streams_kept: usize,
    /// Lines a stream carries when its backend keeps its pace.
    pub stream_lines_expected: usize,
    pub new_conn_attempts: u64,
    pub new_conn_failures: u64,
    /// The first few failures, for the log.
    pub new_conn_errors: Vec<String>,
    /// The slowest successful new connection (connect, request, answer).
    pub new_conn_slowest_ms: u64,
    pub after_flood_attempts: u64,
    pub after_flood_failures: u64,
    /// Connection-table entries at the end (the daemon's latest scan): both
    /// directions of each legitimate connection made, closed ones included
    /// until they are reclaimed. Spoofed SYNs never get there.
    pub conn_table_entries: u64,
}

impl Report {
    /// Every legitimate connection the scenario made: before, streams,
    /// during and after the flood.
    pub fn legitimate_connections(&self) -> u64 {
        BEFORE_FLOOD_CONNS as u64
            + self.streams.len() as u64
            + self.new_conn_attempts
            + self.after_flood_attempts
    }
}

fn reasons(st: &StatusReply) -> BTreeMap<String, u64> {
    st.datapath.reasons.iter().cloned().collect()
}

fn new_flows(st: &StatusReply) -> u64 {
    st.datapath
        .services
        .iter()
        .map(|s| s.counters.new_conns)
        .sum()
}

/// Counters that moved between two snapshots.
fn moved(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(*before.get(k).unwrap_or(&0))))
        .filter(|(_, d)| *d > 0)
        .collect()
}

/// Runs the scenario once and measures it. Fails only when the rig cannot
/// be built or driven; what the flood did to traffic is in the report.
pub fn run(p: &Params) -> Result<Report> {
    let table = format!("conn_table_size = {}\n", p.conn_table_size);
    let rig = Rig::new("synflood", p.backends, &table, &SNAT_EXTRA)?;
    let vip = SocketAddr::V4(VIP_ADDR);
    let client_ns = rig.topo.client_ns();

    // The path works before anything else happens.
    let (_, failed, errors) = rig.short_gets(BEFORE_FLOOD_CONNS)?;
    ensure!(failed == 0, "GETs failed before the flood: {errors:?}");
    let start_status = rig.status()?;

    // Streams long enough to span the flood with a margin on both sides.
    let stream_secs = p.flood_max.as_secs_f64() + 4.0;
    let interval = p.stream_interval_ms.max(1);
    let stream_lines_expected = (stream_secs * 1000.0 / interval as f64) as usize;
    let read_timeout = p.flood_max + Duration::from_secs(10);
    let streams = netns::in_netns(client_ns, || {
        (0..p.streams)
            .map(|_| open_stream(vip, stream_lines_expected, interval, read_timeout))
            .collect::<Result<Vec<_>>>()
    })??;

    let template = syn_template(rig.lb_mac, rig.client_mac);
    let senders = (0..p.flood_threads.max(1))
        .map(|_| RawSender::open(rig.topo.client_ns(), rig.topo.client_if()))
        .collect::<Result<Vec<_>>>()?;
    let calibrated_rate_pps = if p.pace_to_datapath {
        let before = new_flows(&rig.status()?);
        let sent = flood_from(
            &senders,
            &template,
            CALIBRATION_FIRST_INDEX,
            (CALIBRATION, p.flood_max_packets),
            None,
        );
        let absorbed = new_flows(&rig.status()?).saturating_sub(before);
        ensure!(
            absorbed > 0 && sent.sent > 0,
            "the calibration flood reached nothing ({} sent)",
            sent.sent
        );
        Some(absorbed as f64 / sent.elapsed.as_secs_f64())
    } else {
        None
    };
    let flooding = AtomicBool::new(true);
    let before_flood = rig.status()?;

    let (stream_results, flood, legit, flood_status) = thread::scope(|s| -> Result<_> {
        let readers: Vec<_> = streams
            .into_iter()
            .map(|(backend, r)| s.spawn(move || read_stream(backend, stream_lines_expected, r)))
            .collect();

        let flooding = &flooding;
        let legit: Vec<_> = (0..NEW_CONN_THREADS)
            .map(|_| s.spawn(move || new_connections(client_ns, vip, flooding, p.flood_max)))
            .collect();

        let flood = flood_from(
            &senders,
            &template,
            0,
            (p.flood_max, p.flood_max_packets),
            calibrated_rate_pps.map(|r| r * PACE_FRACTION),
        );
        let flood_status = rig.status();
        flooding.store(false, Ordering::Relaxed);
        let mut all = NewConns::default();
        for l in legit {
            let one = l
                .join()
                .map_err(|_| anyhow::anyhow!("a new-connection thread panicked"))??;
            all.attempts += one.attempts;
            all.failures += one.failures;
            all.errors.extend(one.errors);
            all.slowest = all.slowest.max(one.slowest);
        }
        let legit = all;
        let streams = readers
            .into_iter()
            .map(|r| {
                r.join()
                    .map_err(|_| anyhow::anyhow!("a stream reader panicked"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((streams, flood, legit, flood_status?))
    })?;

    let (after_flood_attempts, after_flood_failures, mut after_errors) =
        rig.short_gets(AFTER_FLOOD_CONNS)?;
    let end_status = rig.status()?;
    // The daemon scans the table every 2 s; the streams ran on for 4 s
    // after the flood, so this scan saw the table as the flood left it.
    let conn_table_entries = rig.metric("router_conn_table_entries")? as u64;
    rig.stop()?;

    let datapath_new_flows = new_flows(&flood_status).saturating_sub(new_flows(&before_flood));
    let secs = flood.elapsed.as_secs_f64();
    let streams_kept = stream_results.iter().filter(|r| r.error.is_none()).count();
    let NewConns {
        attempts: new_conn_attempts,
        failures: new_conn_failures,
        errors: mut new_conn_errors,
        slowest,
    } = legit;
    new_conn_errors.append(&mut after_errors);
    Ok(Report {
        params: p.clone(),
        flood_sent: flood.sent,
        flood_refused: flood.refused,
        flood_secs: secs,
        flood_rate_pps: flood.rate_pps(),
        calibrated_rate_pps,
        datapath_new_flows,
        datapath_rate_pps: if secs > 0.0 {
            datapath_new_flows as f64 / secs
        } else {
            0.0
        },
        reasons_during_flood: moved(&reasons(&before_flood), &reasons(&flood_status)),
        reasons_total: moved(&reasons(&start_status), &reasons(&end_status)),
        streams: stream_results,
        streams_kept,
        stream_lines_expected,
        new_conn_attempts,
        new_conn_failures,
        new_conn_errors,
        new_conn_slowest_ms: slowest.as_millis() as u64,
        after_flood_attempts,
        after_flood_failures,
        conn_table_entries,
    })
}
