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
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use router::control::StatusReply;
use serde::Serialize;

use router_testkit::{
    daemon_proc::{self, ScratchDir, one_arm_config, start_daemon},
    netns::{self, ChildGuard, Topology},
    packet::{Packet, TCP_SYN, spoofed_syn},
    raw_sender::{RawSender, SendStats},
};

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
    /// Why the stream did not end cleanly (EOF after its last line), if it did not.
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
    /// Streams that ended cleanly (EOF, every line from the backend that
    /// started them) after at least half their lines. A stream whose flow
    /// the LB lost ends in a reset or a read timeout instead; the line count
    /// only guards against a stream cut short, since a CPU-starved backend
    /// writes fewer lines in its fixed duration.
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

/// A SYN to the VIP from the client's interface to the LB's, for
/// [`spoofed_syn`] to vary.
pub fn syn_template(lb_mac: [u8; 6], client_mac: [u8; 6]) -> Vec<u8> {
    let src = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 1), 1024);
    Packet::tcp(src, VIP_ADDR, TCP_SYN)
        .with_macs(lb_mac, client_mac)
        .build()
}

/// The rig every flood scenario starts from: topology, HTTP backends, a
/// blackhole for spoofed sources, and the daemon.
pub struct Rig {
    pub topo: Topology,
    pub socket: std::path::PathBuf,
    pub lb_mac: [u8; 6],
    pub client_mac: [u8; 6],
    daemon: Option<router_testkit::daemon_proc::Daemon>,
    _backends: Vec<ChildGuard>,
    _dir: ScratchDir,
}

impl Rig {
    /// Builds the rig; `daemon_extra` is inserted into the config's
    /// `[daemon]` table (e.g. `conn_table_size = 8192`). The service
    /// translates to the LB's address and, with `snat_extra`, to further
    /// addresses that are added to the LB's interface.
    pub fn new(
        tag: &str,
        backends: usize,
        daemon_extra: &str,
        snat_extra: &[Ipv4Addr],
    ) -> Result<Rig> {
        let topo = Topology::one_arm(backends)?;
        for a in snat_extra {
            netns::exec(
                topo.lb_ns(),
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{a}/{}", netns::PREFIX_LEN),
                    "dev",
                    topo.lb_if(),
                ],
            )?;
        }
        let guards = topo.spawn_fixture_backends(8000)?;
        // Replies to spoofed sources die here, silently (no ICMP).
        netns::exec(
            topo.lb_ns(),
            &["ip", "route", "add", "blackhole", SPOOF_NET],
        )?;
        // The LB reaches every backend once, which also resolves their
        // neighbours before the first balanced packet.
        for i in 0..backends {
            netns::wait_for_tcp(
                topo.lb_ns(),
                SocketAddr::new(netns::backend_addr(i).into(), 8000),
                Duration::from_secs(5),
            )?;
        }
        let dir = ScratchDir::new(tag)?;
        let socket = dir.0.join("router.sock");
        let config = dir.0.join("router.toml");
        let list: Vec<(String, String, u32)> = (0..backends)
            .map(|i| {
                (
                    format!("b{i}"),
                    format!("{}:8000", netns::backend_addr(i)),
                    100,
                )
            })
            .collect();
        let mut text = one_arm_config(&socket, topo.lb_if(), VIP, netns::LB_ADDR, &list).replacen(
            "[daemon]\n",
            &format!("[daemon]\n{daemon_extra}"),
            1,
        );
        if !snat_extra.is_empty() {
            let all: Vec<String> = std::iter::once(netns::LB_ADDR)
                .chain(snat_extra.iter().copied())
                .map(|a| format!("\"{a}\""))
                .collect();
            text = text.replacen(
                &format!("snat = \"{}\"", netns::LB_ADDR),
                &format!("snat = [{}]", all.join(", ")),
                1,
            );
        }
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let daemon = start_daemon(topo.lb_ns(), &config, &socket)?;
        let lb_mac = netns::mac_address(topo.lb_ns(), topo.lb_if())?;
        let client_mac = netns::mac_address(topo.client_ns(), topo.client_if())?;
        Ok(Rig {
            topo,
            socket,
            lb_mac,
            client_mac,
            daemon: Some(daemon),
            _backends: guards,
            _dir: dir,
        })
    }

    pub fn status(&self) -> Result<StatusReply> {
        daemon_proc::status(&self.socket)
    }

    /// `n` short GETs through the VIP from the client; returns (attempts,
    /// failures, first errors).
    pub fn short_gets(&self, n: usize) -> Result<(u64, u64, Vec<String>)> {
        let vip = SocketAddr::V4(VIP_ADDR);
        netns::in_netns(self.topo.client_ns(), move || {
            let mut failures = 0u64;
            let mut errors = Vec::new();
            for _ in 0..n {
                if let Err(e) = get_ok(vip) {
                    failures += 1;
                    if errors.len() < 5 {
                        errors.push(format!("{e:#}"));
                    }
                }
            }
            (n as u64, failures, errors)
        })
    }

    /// One unlabelled gauge or counter from the daemon's `/metrics` (served
    /// in the LB's namespace on the default 127.0.0.1:9090).
    pub fn metric(&self, name: &str) -> Result<f64> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 9090));
        let r = netns::in_netns(self.topo.lb_ns(), move || {
            netns::http_get(addr, "/metrics", Duration::from_secs(5))
        })??;
        ensure!(r.status == 200, "/metrics answered {}", r.status);
        // An unlabelled sample reads `name{} value` or `name value`.
        r.body
            .lines()
            .find_map(|l| {
                let rest = l.strip_prefix(name)?;
                let value = rest.strip_prefix("{}").unwrap_or(rest).strip_prefix(' ')?;
                value.trim().parse().ok()
            })
            .with_context(|| format!("no {name} in /metrics"))
    }

    /// Stops the daemon (SIGTERM, so it detaches) and checks it exited cleanly.
    pub fn stop(mut self) -> Result<()> {
        if let Some(d) = self.daemon.take() {
            let code = d.stop(Duration::from_secs(10))?;
            ensure!(code.success(), "daemon exit status {code}");
        }
        Ok(())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            let _ = d.stop(Duration::from_secs(10));
        }
    }
}

/// One GET / through the VIP that must answer 200 with a backend's name.
/// The timeout covers connect (and each read): 10 s lets TCP retransmit a
/// SYN lost to congestion three times (after 1, 3 and 7 s).
fn get_ok(vip: SocketAddr) -> Result<()> {
    let r = netns::http_get(vip, "/", Duration::from_secs(10))?;
    ensure!(
        r.status == 200 && r.body.starts_with('b'),
        "unexpected answer {} {:?}",
        r.status,
        r.body
    );
    Ok(())
}

/// One flood from every sender in parallel (spoofed SYNs numbered from
/// `first`), at most `rate_pps` in all, for at most `duration` and
/// `max_packets`.
fn flood_from(
    senders: &[RawSender],
    template: &[u8],
    first: u64,
    (duration, max_packets): (Duration, u64),
    rate_pps: Option<f64>,
) -> SendStats {
    let threads = senders.len().max(1) as u64;
    let per_thread = max_packets / threads;
    let rate = rate_pps.map(|r| r / threads as f64);
    thread::scope(|s| {
        let floods: Vec<_> = senders
            .iter()
            .enumerate()
            .map(|(t, sender)| {
                s.spawn(move || {
                    sender.flood(per_thread, duration, rate, |i, buf| {
                        spoofed_syn(template, first + i * threads + t as u64, buf)
                    })
                })
            })
            .collect();
        let mut all = SendStats::default();
        for f in floods {
            // A sender thread cannot panic short of a bug in the frame
            // builder; count its frames as refused then.
            if let Ok(st) = f.join() {
                all.sent += st.sent;
                all.refused += st.refused;
                all.elapsed = all.elapsed.max(st.elapsed);
            }
        }
        all
    })
}

/// What one client thread's new connections during the flood came to.
#[derive(Default)]
struct NewConns {
    attempts: u64,
    failures: u64,
    errors: Vec<String>,
    slowest: Duration,
}

/// New connections from the client, one after another, while `flooding`;
/// bounded by count and by time besides the flood's own end.
fn new_connections(
    client_ns: &str,
    vip: SocketAddr,
    flooding: &AtomicBool,
    flood_max: Duration,
) -> Result<NewConns> {
    netns::in_netns(client_ns, || {
        let mut out = NewConns::default();
        let deadline = Instant::now() + flood_max + Duration::from_secs(10);
        while flooding.load(Ordering::Relaxed) && out.attempts < 10_000 && Instant::now() < deadline
        {
            out.attempts += 1;
            let t = Instant::now();
            match get_ok(vip) {
                Ok(()) => out.slowest = out.slowest.max(t.elapsed()),
                Err(e) => {
                    out.failures += 1;
                    if out.errors.len() < 5 {
                        out.errors.push(format!("{e:#}"));
                    }
                }
            }
            thread::sleep(NEW_CONN_GAP);
        }
        out
    })
}

/// Opens a stream of `seconds` through the VIP and reads up to its first
/// line, which names the backend serving it. `read_timeout` must outlast
/// the flood: a flood congests every queue on the way, and TCP backs off
/// its retransmissions to seconds; such a stream resumes once the flood
/// stops, while one whose flow the LB lost never does.
fn open_stream(
    vip: SocketAddr,
    seconds: f64,
    interval_ms: u64,
    read_timeout: Duration,
) -> Result<(String, BufReader<TcpStream>)> {
    let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(5))
        .with_context(|| format!("connecting to {vip}"))?;
    s.set_read_timeout(Some(read_timeout))?;
    // One write, one segment (see `netns::http_get`).
    let request =
        format!("GET /stream?seconds={seconds}&interval_ms={interval_ms} HTTP/1.0\r\n\r\n");
    s.write_all(request.as_bytes())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    for _ in 0..64 {
        line.clear();
        ensure!(r.read_line(&mut line)? > 0, "stream closed in its headers");
        if line == "\r\n" {
            line.clear();
            ensure!(
                r.read_line(&mut line)? > 0,
                "stream closed before its first line"
            );
            return Ok((line.trim().to_owned(), r));
        }
    }
    bail!("no end of headers in 64 lines")
}

/// Reads a stream to its end; every line must name `backend`.
fn read_stream(backend: String, mut r: BufReader<TcpStream>) -> StreamResult {
    let mut lines = 1;
    let mut line = String::new();
    let mut last = Instant::now();
    let mut max_gap = Duration::ZERO;
    let error = loop {
        if lines >= MAX_STREAM_LINES {
            break Some(format!("more than {MAX_STREAM_LINES} lines"));
        }
        line.clear();
        let read = r.read_line(&mut line);
        max_gap = max_gap.max(last.elapsed());
        last = Instant::now();
        match read {
            Ok(0) => break None,
            Ok(_) if line.trim() == backend => lines += 1,
            Ok(_) => break Some(format!("line {lines} came from {:?}", line.trim())),
            Err(e) => break Some(format!("after {lines} lines: {e}")),
        }
    };
    StreamResult {
        backend,
        lines,
        max_gap_ms: max_gap.as_millis() as u64,
        error,
    }
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
            .map(|_| open_stream(vip, stream_secs, interval, read_timeout))
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
            .map(|(backend, r)| s.spawn(move || read_stream(backend, r)))
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
    let streams_kept = stream_results
        .iter()
        .filter(|r| r.error.is_none() && r.lines * 2 >= stream_lines_expected)
        .count();
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

/// `bench synflood`: runs the scenario paced and unpaced (shorter with
/// `quick`) and writes `synflood.md` and `synflood.json` into `out_dir`.
/// Asserts nothing: the flood test does.
pub fn run_bench(quick: bool, out_dir: &Path) -> Result<()> {
    let paced = run(&Params::bench(true, quick))?;
    let unpaced = run(&Params::bench(false, quick))?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let page = bench_page(&paced, &unpaced);
    let md = out_dir.join("synflood.md");
    std::fs::write(&md, &page).with_context(|| format!("writing {}", md.display()))?;
    let json = out_dir.join("synflood.json");
    let both = serde_json::json!({
        "commit": crate::report::source_commit(),
        "paced": paced,
        "unpaced": unpaced,
    });
    let text = serde_json::to_string_pretty(&both).context("encoding the reports")?;
    std::fs::write(&json, text + "\n").with_context(|| format!("writing {}", json.display()))?;
    println!("{page}");
    println!("bench: wrote {} and {}", md.display(), json.display());
    Ok(())
}

/// bench/synflood.md: what was run, then each run's figures.
fn bench_page(paced: &Report, unpaced: &Report) -> String {
    let p = &paced.params;
    let mut s = String::new();
    s.push_str("# SYN flood against a small connection table\n\n");
    s.push_str(&format!(
        "Recorded at commit `{}`.\n\n",
        crate::report::source_commit()
    ));
    s.push_str(&format!(
        "`cargo xtask bench synflood`; the test `tests/integration/tests/floods.rs` runs the paced \
         scenario for 8 s with one sender thread and asserts the behaviour, not the speed. \
         A real daemon in network namespaces (one arm, {} Python HTTP backends, {} SNAT \
         addresses, `conn_table_size = {}`, so a half-open table of {} entries); {} \
         long-lived streams (a line every {} ms) are opened through the VIP; then raw-socket \
         threads in the client namespace send SYNs from spoofed sources in 198.19.0.0/16 \
         (random source and port per packet) at the VIP for {} s, while {} client threads \
         each open a new connection every {} ms. Everything shares this machine's CPUs \
         (senders, LB, backends answering every SYN, clients).\n\n",
        p.backends,
        1 + SNAT_EXTRA.len(),
        p.conn_table_size,
        router_common::half_open_table_size(p.conn_table_size),
        p.streams,
        p.stream_interval_ms,
        p.flood_max.as_secs(),
        NEW_CONN_THREADS,
        NEW_CONN_GAP.as_millis(),
    ));
    s.push_str(
        "Two runs. **Paced**: at two thirds of what the datapath absorbed in an unpaced \
         calibration second, which leaves CPU to the legitimate traffic; this measures how \
         the router handles a flood. **Unpaced**: as fast as the sender threads go; the \
         machine is overloaded and packets are dropped before the program sees them, \
         legitimate ones included, so streams stall until the flood stops and new \
         connections time out: that is capacity, not flood handling. A stream is kept when \
         it ends cleanly with every line from the backend that started it, however long \
         TCP had to retransmit (the longest wait shows how long). \"New flows\" counts every \
         flow the datapath created: spoofed SYNs that reached it and the legitimate \
         connections.\n\n",
    );
    for (title, r) in [("Paced", paced), ("Unpaced", unpaced)] {
        s.push_str(&format!("## {title}\n\n"));
        s.push_str(&r.table());
        s.push('\n');
    }
    s
}

impl Report {
    /// The figures of one run as markdown tables.
    pub fn table(&self) -> String {
        let p = &self.params;
        let reason = |name: &str| *self.reasons_during_flood.get(name).unwrap_or(&0);
        let mut s = String::new();
        s.push_str("| figure | value |\n|---|---|\n");
        let rows = [
            ("conn_table_size", p.conn_table_size.to_string()),
            (
                "half-open table",
                format!(
                    "{} entries",
                    router_common::half_open_table_size(p.conn_table_size)
                ),
            ),
            (
                "backends, SNAT addresses",
                format!("{}, {}", p.backends, 1 + SNAT_EXTRA.len()),
            ),
            (
                "flood duration",
                format!(
                    "{:.1} s (bound {} s)",
                    self.flood_secs,
                    p.flood_max.as_secs()
                ),
            ),
            (
                "flood sent",
                format!(
                    "{} packets, {:.0} packets/s ({} sender threads, {})",
                    self.flood_sent,
                    self.flood_rate_pps,
                    p.flood_threads,
                    match self.calibrated_rate_pps {
                        Some(r) => format!(
                            "paced to two thirds of the {r:.0}/s the datapath absorbed in an \
                             unpaced second"
                        ),
                        None => "unpaced".to_owned(),
                    }
                ),
            ),
            (
                "new flows in the datapath",
                format!(
                    "{} ({:.0}/s; {:.0}× the table)",
                    self.datapath_new_flows,
                    self.datapath_rate_pps,
                    self.datapath_new_flows as f64 / f64::from(p.conn_table_size.max(1))
                ),
            ),
            ("lru_miss during the flood", reason("lru_miss").to_string()),
            (
                "connection-table entries at the end",
                format!(
                    "{} (for {} legitimate connections)",
                    self.conn_table_entries,
                    self.legitimate_connections()
                ),
            ),
            (
                "replies without an entry during the flood: dropped / passed to the host",
                format!(
                    "{} / {}",
                    reason("drop_no_reply_entry"),
                    reason("pass_no_reply_entry")
                ),
            ),
            (
                "drop_conn_table_full / drop_snat_exhausted",
                format!(
                    "{} / {}",
                    reason("drop_conn_table_full"),
                    reason("drop_snat_exhausted")
                ),
            ),
            (
                "streams kept",
                format!(
                    "{} of {} ({} lines each expected)",
                    self.streams_kept,
                    self.streams.len(),
                    self.stream_lines_expected
                ),
            ),
            (
                "longest wait for a stream line",
                format!(
                    "{} ms",
                    self.streams.iter().map(|s| s.max_gap_ms).max().unwrap_or(0)
                ),
            ),
            (
                "new connections during the flood",
                format!(
                    "{} attempted, {} failed; slowest {} ms",
                    self.new_conn_attempts, self.new_conn_failures, self.new_conn_slowest_ms
                ),
            ),
            (
                "new connections after the flood",
                format!(
                    "{} attempted, {} failed",
                    self.after_flood_attempts, self.after_flood_failures
                ),
            ),
        ];
        for (k, v) in rows {
            s.push_str(&format!("| {k} | {v} |\n"));
        }
        s.push_str("\nEvery reason counter that moved during the flood:\n\n");
        s.push_str("| reason | packets |\n|---|---|\n");
        for (k, v) in &self.reasons_during_flood {
            s.push_str(&format!("| `{k}` | {v} |\n"));
        }
        s
    }
}
