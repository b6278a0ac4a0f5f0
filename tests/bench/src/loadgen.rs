//! The benchmarks' in-tree load generator: HTTP/1.1 with one TCP connection
//! per request (`Connection: close`, a new socket every time), closed-loop at
//! the maximum rate or open-loop at a fixed rate, and streaming completions
//! with Poisson arrivals and fixed or heavy-tailed (log-normal) lengths for
//! the routing-quality benchmark.
//!
//! Why in-tree: wrk and hey have no open-loop fixed-rate mode, and neither
//! reports time to first token. Latency here always includes the TCP
//! handshake (from `connect()` to the last byte), which is what a NAT
//! balancer's SYN path adds to; wrk starts its clock after the connection is
//! up.
//!
//! Runs are bounded in time and in requests in flight. Everything runs on a
//! tokio runtime built inside a network namespace (see [`in_ns`]): threads
//! created by a thread inherit its namespace, so every socket the runtime
//! opens belongs to that namespace.

use std::{
    future::Future,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpSocket, TcpStream},
};

use router_testkit::netns;

/// Runs `f` to completion on a fresh multi-threaded tokio runtime inside
/// network namespace `ns`.
pub fn in_ns<T, F, Fut>(ns: &str, worker_threads: usize, f: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = T>,
    T: Send,
{
    netns::in_netns(ns, move || -> Result<T> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads)
            .enable_all()
            .build()
            .context("building the load generator's runtime")?;
        Ok(rt.block_on(f()))
    })?
}

/// What one load run saw.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    /// Wall time of the run (from the first request to the deadline).
    pub elapsed_s: f64,
    /// Successful requests.
    pub ok: u64,
    /// Failed requests (connect, I/O, timeout, bad status).
    pub errors: u64,
    /// Requests an open-loop run could not start because too many were in
    /// flight (counted as errors too).
    pub overflow: u64,
    /// Latency of every successful request, µs, sorted.
    pub latencies_us: Vec<u32>,
    /// Successful requests completed in each second of the run.
    pub per_second: Vec<u64>,
    /// Open loop: how late requests started against their schedule, µs, p99.
    pub start_lag_p99_us: u32,
    /// The first few distinct error messages, for the report.
    pub error_samples: Vec<String>,
}

impl RunResult {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed_s.max(1e-9)
    }

    /// Percentile `p` (0–100) of the latencies in ms; NaN without samples.
    pub fn latency_ms(&self, p: f64) -> f64 {
        percentile_us(&self.latencies_us, p) / 1e3
    }
}

/// Nearest-rank percentile of sorted µs samples.
pub fn percentile_us(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Collects samples from many tasks.
#[derive(Default)]
struct Collector {
    latencies: Mutex<Vec<u32>>,
    per_second: Mutex<Vec<u64>>,
    ok: AtomicU64,
    errors: AtomicU64,
    error_samples: Mutex<Vec<String>>,
}

impl Collector {
    fn success(&self, run_start: Instant, started: Instant, done: Instant) {
        let us = u32::try_from(done.duration_since(started).as_micros()).unwrap_or(u32::MAX);
        self.ok.fetch_add(1, Ordering::Relaxed);
        lock(&self.latencies).push(us);
        let sec = usize::try_from(done.duration_since(run_start).as_secs()).unwrap_or(usize::MAX);
        let mut ps = lock(&self.per_second);
        if sec < 100_000 {
            if ps.len() <= sec {
                ps.resize(sec + 1, 0);
            }
            ps[sec] += 1;
        }
    }

    fn failure(&self, err: &anyhow::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut samples = lock(&self.error_samples);
        let msg = format!("{err:#}");
        if samples.len() < 5 && !samples.contains(&msg) {
            samples.push(msg);
        }
    }

    fn merge(&self, other: Collector) {
        self.ok.fetch_add(other.ok.into_inner(), Ordering::Relaxed);
        self.errors
            .fetch_add(other.errors.into_inner(), Ordering::Relaxed);
        lock(&self.latencies).extend(other.latencies.into_inner().unwrap_or_default());
        let mut ps = lock(&self.per_second);
        let theirs = other.per_second.into_inner().unwrap_or_default();
        if ps.len() < theirs.len() {
            ps.resize(theirs.len(), 0);
        }
        for (a, b) in ps.iter_mut().zip(theirs) {
            *a += b;
        }
        let mut samples = lock(&self.error_samples);
        for e in other.error_samples.into_inner().unwrap_or_default() {
            if samples.len() < 5 && !samples.contains(&e) {
                samples.push(e);
            }
        }
    }

    fn finish(self, elapsed: Duration, seconds: usize) -> RunResult {
        let mut latencies_us = self.latencies.into_inner().unwrap_or_default();
        latencies_us.sort_unstable();
        let mut per_second = self.per_second.into_inner().unwrap_or_default();
        // Completions after the deadline (the last requests finishing) are
        // not part of any full second.
        per_second.resize(seconds, 0);
        RunResult {
            elapsed_s: elapsed.as_secs_f64(),
            ok: self.ok.into_inner(),
            errors: self.errors.into_inner(),
            overflow: 0,
            latencies_us,
            per_second,
            start_lag_p99_us: 0,
            error_samples: self.error_samples.into_inner().unwrap_or_default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking task cannot leave these vectors inconsistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One HTTP/1.1 GET over a new connection, read to EOF; errors unless the
/// status is 200.
async fn get_once(addr: SocketAddr, request: &[u8], timeout: Duration) -> Result<()> {
    tokio::time::timeout(timeout, async {
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        s.set_nodelay(true)?;
        s.write_all(request).await.context("write")?;
        let mut buf = Vec::with_capacity(512);
        s.read_to_end(&mut buf).await.context("read")?;
        anyhow::ensure!(
            buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200"),
            "bad response from {addr}: {:?}",
            String::from_utf8_lossy(&buf[..buf.len().min(40)])
        );
        Ok(())
    })
    .await
    .with_context(|| format!("request to {addr} timed out after {timeout:?}"))?
}

fn request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: bench\r\nUser-Agent: router-bench\r\nConnection: close\r\n\r\n")
        .into_bytes()
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Closed loop: `conns` workers, each opening a connection, sending one
/// request, reading the response to EOF and starting over, for `duration`.
/// Targets are used in turn (round-robin over all workers' requests).
pub async fn closed_loop(targets: &[SocketAddr], conns: usize, duration: Duration) -> RunResult {
    let targets: Arc<[SocketAddr]> = targets.into();
    let req: Arc<[u8]> = request("/").into();
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (targets, req, next) = (targets.clone(), req.clone(), next.clone());
        // Each worker keeps its own samples (no lock per request) and
        // hands them over at the end.
        tasks.push(tokio::spawn(async move {
            let col = Collector::default();
            while Instant::now() < deadline {
                let addr = targets[next.fetch_add(1, Ordering::Relaxed) % targets.len()];
                let t0 = Instant::now();
                match get_once(addr, &req, REQUEST_TIMEOUT).await {
                    Ok(()) => col.success(start, t0, Instant::now()),
                    Err(e) => {
                        col.failure(&e);
                        // Do not spin on an error that repeats at once
                        // (e.g. no free local port).
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            col
        }));
    }
    let all = Collector::default();
    for t in tasks {
        if let Ok(col) = t.await {
            all.merge(col);
        }
    }
    all.finish(start.elapsed(), duration.as_secs() as usize)
}

/// Open loop at a fixed rate: request `i` is due at `i / rate`; each starts
/// as a task of its own so a slow response never delays the next request.
/// At most `max_in_flight` at once; requests beyond that are counted as
/// overflow errors, not sent. Latency is from the request's actual start;
/// how late starts were against the schedule is reported separately.
pub async fn open_loop(
    targets: &[SocketAddr],
    rate: f64,
    duration: Duration,
    max_in_flight: usize,
) -> RunResult {
    let req: Arc<[u8]> = request("/").into();
    let col = Arc::new(Collector::default());
    let in_flight = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let total = (rate * duration.as_secs_f64()) as u64;
    let mut overflow = 0;
    let mut lags = Vec::with_capacity(total as usize);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        lags.push(u32::try_from(due.elapsed().as_micros()).unwrap_or(u32::MAX));
        if in_flight.load(Ordering::Relaxed) >= max_in_flight {
            overflow += 1;
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let addr = targets[i as usize % targets.len()];
        let (req, col, in_flight) = (req.clone(), col.clone(), in_flight.clone());
        tasks.spawn(async move {
            let t0 = Instant::now();
            match get_once(addr, &req, REQUEST_TIMEOUT).await {
                Ok(()) => col.success(start, t0, Instant::now()),
                Err(e) => col.failure(&e),
            }
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
        // Reap finished tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    let elapsed = start.elapsed();
    while tasks.join_next().await.is_some() {}
    let col = Arc::into_inner(col).unwrap_or_default();
    let mut r = col.finish(elapsed, duration.as_secs() as usize);
    r.errors += overflow;
    r.overflow = overflow;
    lags.sort_unstable();
    r.start_lag_p99_us = percentile_us(&lags, 99.0) as u32;
    r
}

/// A small deterministic PRNG (xorshift64*): the arrival times of a run are
/// reproducible from its seed, and no extra dependency is needed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// Uniform in (0, 1].
    pub fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        ((x >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Exponentially distributed with the given rate (gaps of a Poisson process).
    pub fn exp(&mut self, rate: f64) -> f64 {
        -self.unit().ln() / rate
    }

    /// A generator for stream `stream` of `seed`: its draws are unrelated to
    /// those of `Rng::new(seed)` and of other streams, so one seed can drive
    /// several independent sequences (arrival gaps, request lengths). The
    /// seed is scrambled with SplitMix64 first because xorshift seeded with
    /// nearby values gives correlated first draws.
    pub fn stream(seed: u64, stream: u64) -> Self {
        let mut z = (seed ^ stream.rotate_left(32)).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self::new(z ^ (z >> 31))
    }

    /// Standard normal (Box–Muller; uses two uniform draws, keeps one
    /// result so every call consumes the same number of draws).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.unit(), self.unit());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Log-normal with the given median and σ of its logarithm.
    pub fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }
}

/// How many tokens each streamed request asks for (`max_tokens`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Lengths {
    /// Every request asks for the same number.
    Fixed(u32),
    /// Heavy-tailed, as real completion lengths are: log-normal with this
    /// median and σ of the logarithm, rounded to the nearest token and
    /// clamped to `[min, max]`.
    LogNormal {
        median: f64,
        sigma: f64,
        min: u32,
        max: u32,
    },
}

impl Lengths {
    /// The next request's length.
    pub fn draw(&self, rng: &mut Rng) -> u32 {
        match *self {
            Lengths::Fixed(n) => n,
            Lengths::LogNormal {
                median,
                sigma,
                min,
                max,
            } => {
                let x = rng.lognormal(median, sigma).round();
                // Clamped as a float first: the cast saturates anyway, but
                // this keeps the bounds the caller's.
                x.clamp(f64::from(min), f64::from(max)) as u32
            }
        }
    }

    /// The expected length. For the log-normal this is the unclamped,
    /// unrounded mean, median × e^(σ²/2): rounding to whole tokens is
    /// unbiased to well under a token, and the clamp moves it by far less
    /// than that for the bench's parameters (see the tests).
    pub fn mean(&self) -> f64 {
        match *self {
            Lengths::Fixed(n) => f64::from(n),
            Lengths::LogNormal { median, sigma, .. } => median * (sigma * sigma / 2.0).exp(),
        }
    }
}

/// One streamed completion as the client saw it.
#[derive(Debug, Clone)]
pub struct StreamSample {
    /// Seconds since the run started when the request was sent.
    pub sent_s: f64,
    /// The `max_tokens` it asked for (and, from the mock replica, got).
    pub max_tokens: u32,
    /// Time to the first token (first SSE data chunk), ms.
    pub ttft_ms: f64,
    /// Time to `data: [DONE]`, ms.
    pub e2e_ms: f64,
    /// The replica that served it (`X-Replica`).
    pub replica: String,
    /// The client address it was sent from, where the run chose one.
    pub source: Option<Ipv4Addr>,
}

/// What a streaming run saw.
#[derive(Debug, Clone, Default)]
pub struct StreamRun {
    pub elapsed_s: f64,
    pub samples: Vec<StreamSample>,
    /// Failed requests, refused ones (generator limit) included.
    pub errors: u64,
    /// When each failed request was due (seconds since the start), so a
    /// caller can count the errors of a window of the run.
    pub error_sent_s: Vec<f64>,
    pub error_samples: Vec<String>,
    pub start_lag_p99_us: u32,
    /// Requests due in the run (sent or refused), and the tokens they asked
    /// for in all: the lengths actually drawn, for the record.
    pub arrivals: u64,
    pub tokens_asked: u64,
}

/// Connects to `addr`, from `source` when given (an address of this
/// namespace, any free port).
async fn connect_from(addr: SocketAddr, source: Option<Ipv4Addr>) -> Result<TcpStream> {
    let Some(src) = source else {
        return TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"));
    };
    let socket = TcpSocket::new_v4().context("socket")?;
    socket
        .bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))
        .with_context(|| format!("bind {src}"))?;
    socket
        .connect(addr)
        .await
        .with_context(|| format!("connect {addr} from {src}"))
}

async fn stream_once(
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
    body: &str,
    timeout: Duration,
) -> Result<(f64, f64, String)> {
    let t0 = Instant::now();
    tokio::time::timeout(timeout, async {
        let s = connect_from(addr, source).await?;
        s.set_nodelay(true)?;
        let mut s = BufReader::new(s);
        let req = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.get_mut()
            .write_all(req.as_bytes())
            .await
            .context("write")?;
        let mut line = String::new();
        s.read_line(&mut line).await.context("status line")?;
        anyhow::ensure!(
            line.starts_with("HTTP/1.1 200"),
            "status {:?}",
            line.trim_end()
        );
        let mut replica = String::new();
        loop {
            line.clear();
            anyhow::ensure!(s.read_line(&mut line).await? > 0, "closed in the headers");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("x-replica")
            {
                replica = v.trim().to_owned();
            }
        }
        let mut ttft = None;
        loop {
            line.clear();
            anyhow::ensure!(
                s.read_line(&mut line).await.context("stream")? > 0,
                "stream ended before [DONE]"
            );
            let Some(data) = line.trim_end().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                let e2e = t0.elapsed().as_secs_f64() * 1e3;
                let ttft = ttft.context("[DONE] before any token")?;
                return Ok((ttft, e2e, replica));
            }
            if ttft.is_none() {
                ttft = Some(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
    })
    .await
    .with_context(|| format!("completion timed out after {timeout:?}"))?
}

/// A streaming run's fixed parameters.
pub struct StreamLoad {
    pub target: SocketAddr,
    /// How long arrivals go on.
    pub duration: Duration,
    /// Each request's `max_tokens`.
    pub lengths: Lengths,
    /// A request not done within this counts as an error.
    pub timeout: Duration,
    /// Seeds the arrival times and the lengths: the same seed gives the
    /// same arrivals with the same lengths, in the same order.
    pub seed: u64,
    /// Arrivals beyond this many requests in flight are errors, not sent.
    pub max_in_flight: usize,
}

/// `Rng::stream` number of the request lengths. The gaps keep drawing from
/// `Rng::new(seed)`, so a fixed-length run has the arrivals it always had.
const LENGTH_STREAM: u64 = 1;

/// The arrivals of a streaming run, in order: (seconds since the start
/// when the request is due, its `max_tokens`). Poisson arrivals whose rate
/// is `rate_at(seconds since start)`; lengths drawn from a stream of their
/// own, so the n-th request's length does not depend on the rates.
pub struct Arrivals<F> {
    rate_at: F,
    gaps: Rng,
    draws: Rng,
    lengths: Lengths,
    t: f64,
    end_s: f64,
}

impl<F: Fn(f64) -> f64> Arrivals<F> {
    pub fn new(seed: u64, lengths: Lengths, duration: Duration, rate_at: F) -> Self {
        Self {
            rate_at,
            gaps: Rng::new(seed),
            draws: Rng::stream(seed, LENGTH_STREAM),
            lengths,
            t: 0.0,
            end_s: duration.as_secs_f64(),
        }
    }
}

impl<F: Fn(f64) -> f64> Iterator for Arrivals<F> {
    type Item = (f64, u32);

    fn next(&mut self) -> Option<(f64, u32)> {
        // Thinning-free: the gap uses the rate at the current time, which is
        // exact for the piecewise-constant schedules the benchmark uses.
        self.t += self.gaps.exp((self.rate_at)(self.t).max(1e-6));
        (self.t < self.end_s).then(|| (self.t, self.lengths.draw(&mut self.draws)))
    }
}

/// One request's outcome: when it was due, its `max_tokens`, its source
/// address, and its TTFT, end-to-end time and replica or the error.
type Outcome = (f64, u32, Option<Ipv4Addr>, Result<(f64, f64, String)>);

/// Gathers a streaming run's outcomes as they come in.
#[derive(Default)]
struct StreamTally {
    samples: Vec<StreamSample>,
    errors: u64,
    error_sent_s: Vec<f64>,
    error_samples: Vec<String>,
}

impl StreamTally {
    fn add(&mut self, res: Result<Outcome, tokio::task::JoinError>) {
        match res {
            Ok((sent_s, max_tokens, source, Ok((ttft_ms, e2e_ms, replica)))) => {
                self.samples.push(StreamSample {
                    sent_s,
                    max_tokens,
                    ttft_ms,
                    e2e_ms,
                    replica,
                    source,
                });
            }
            Ok((sent_s, _, _, Err(e))) => self.error(Some(sent_s), format!("{e:#}")),
            Err(e) => self.error(None, format!("task: {e}")),
        }
    }

    fn error(&mut self, sent_s: Option<f64>, msg: String) {
        self.errors += 1;
        // A task that panicked lost its due time; it counts in no window
        // but in the total.
        self.error_sent_s.extend(sent_s);
        if self.error_samples.len() < 5 && !self.error_samples.contains(&msg) {
            self.error_samples.push(msg);
        }
    }
}

fn completion_body(max_tokens: u32) -> String {
    format!(r#"{{"prompt":"hello","max_tokens":{max_tokens},"stream":true}}"#)
}

/// `Rng::stream` number of the source addresses, apart from the gaps and
/// the lengths, so choosing sources changes neither.
const SOURCE_STREAM: u64 = 2;

/// Open-loop streaming completions: the [`Arrivals`] of `load` and
/// `rate_at`, one streamed completion per connection. Waits for every
/// request to finish or time out. `stop` ends the arrivals early.
pub async fn stream_poisson(
    load: StreamLoad,
    rate_at: impl Fn(f64) -> f64,
    stop: Arc<AtomicBool>,
) -> StreamRun {
    stream_poisson_from(load, rate_at, stop, &[]).await
}

/// [`stream_poisson`], each request sent from one of `sources` drawn at
/// random (uniformly, from the seed: the same seed gives every request
/// the same source), or from the namespace's default when `sources` is
/// empty. Many sources stand for many users, for policies keyed on the
/// client's address.
pub async fn stream_poisson_from(
    load: StreamLoad,
    rate_at: impl Fn(f64) -> f64,
    stop: Arc<AtomicBool>,
    sources: &[Ipv4Addr],
) -> StreamRun {
    let StreamLoad {
        target,
        duration,
        lengths,
        timeout,
        seed,
        max_in_flight,
    } = load;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut lags = Vec::new();
    let mut tally = StreamTally::default();
    let (mut arrivals, mut tokens_asked) = (0u64, 0u64);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut pick = Rng::stream(seed, SOURCE_STREAM);
    for (t, max_tokens) in Arrivals::new(seed, lengths, duration, rate_at) {
        // Drawn for every arrival, sent or refused, so the n-th request's
        // source does not depend on what was in flight.
        let source = (!sources.is_empty()).then(|| {
            let i = (pick.unit() * sources.len() as f64) as usize;
            sources[i.min(sources.len() - 1)]
        });
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let due = start + Duration::from_secs_f64(t);
        tokio::time::sleep_until(due.into()).await;
        lags.push(u32::try_from(due.elapsed().as_micros()).unwrap_or(u32::MAX));
        arrivals += 1;
        tokens_asked += u64::from(max_tokens);
        if in_flight.load(Ordering::Relaxed) >= max_in_flight {
            tally.error(
                Some(t),
                format!("generator limit: {max_in_flight} in flight"),
            );
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let in_flight = in_flight.clone();
        tasks.spawn(async move {
            let r = stream_once(target, source, &completion_body(max_tokens), timeout).await;
            in_flight.fetch_sub(1, Ordering::Relaxed);
            (t, max_tokens, source, r)
        });
        while let Some(r) = tasks.try_join_next() {
            tally.add(r);
        }
    }
    let elapsed_s = start.elapsed().as_secs_f64();
    while let Some(r) = tasks.join_next().await {
        tally.add(r);
    }
    lags.sort_unstable();
    StreamRun {
        elapsed_s,
        samples: tally.samples,
        errors: tally.errors,
        error_sent_s: tally.error_sent_s,
        error_samples: tally.error_samples,
        start_lag_p99_us: percentile_us(&lags, 99.0) as u32,
        arrivals,
        tokens_asked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile_us(&v, 50.0), 50.0);
        assert_eq!(percentile_us(&v, 99.0), 99.0);
        assert_eq!(percentile_us(&v, 99.9), 100.0);
        assert_eq!(percentile_us(&v, 0.0), 1.0);
        assert!(percentile_us(&[], 50.0).is_nan());
    }

    /// The bench's length distribution: median 16, σ 0.8, [1, 512].
    const BENCH_LENGTHS: Lengths = Lengths::LogNormal {
        median: 16.0,
        sigma: 0.8,
        min: 1,
        max: 512,
    };

    #[test]
    fn lognormal_draws_have_the_median_and_sigma_asked_for() {
        let mut rng = Rng::stream(42, LENGTH_STREAM);
        let n = 200_000;
        let logs: Vec<f64> = (0..n).map(|_| rng.lognormal(16.0, 0.8).ln()).collect();
        let mean = logs.iter().sum::<f64>() / f64::from(n);
        let var = logs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / f64::from(n - 1);
        // Standard errors: 0.8/√n ≈ 0.0018 for the mean, ≈ 0.0013 for σ.
        assert!((mean - 16f64.ln()).abs() < 0.01, "mean of log {mean}");
        assert!((var.sqrt() - 0.8).abs() < 0.01, "σ of log {}", var.sqrt());
    }

    #[test]
    fn lengths_are_clamped_whole_tokens_with_the_expected_mean() {
        let mut rng = Rng::stream(7, LENGTH_STREAM);
        let n = 200_000;
        let mut v: Vec<u32> = (0..n).map(|_| BENCH_LENGTHS.draw(&mut rng)).collect();
        assert!(v.iter().all(|&x| (1..=512).contains(&x)));
        v.sort_unstable();
        assert_eq!(v[v.len() / 2], 16, "median");
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / f64::from(n);
        // The analytic mean, 16·e^0.32 ≈ 22.03, is what capacity uses.
        assert!((BENCH_LENGTHS.mean() - 22.03).abs() < 0.01);
        assert!((mean - BENCH_LENGTHS.mean()).abs() < 0.3, "mean {mean}");
        // p99 of the log-normal: 16·e^(2.326·0.8) ≈ 103.
        let p99 = v[v.len() * 99 / 100];
        assert!((95..=112).contains(&p99), "p99 {p99}");
        let wide = Lengths::LogNormal {
            median: 16.0,
            sigma: 3.0,
            min: 4,
            max: 40,
        };
        assert!((0..1000).all(|_| (4..=40).contains(&wide.draw(&mut rng))));
        let fixed = Lengths::Fixed(9);
        assert_eq!(fixed.draw(&mut rng), 9);
        assert_eq!(fixed.mean(), 9.0);
    }

    #[test]
    fn the_same_seed_gives_the_same_arrivals_and_lengths() {
        let rate = |t: f64| if t < 1.0 { 20.0 } else { 50.0 };
        let run = |seed| -> Vec<(f64, u32)> {
            Arrivals::new(seed, BENCH_LENGTHS, Duration::from_secs(5), rate).collect()
        };
        let a = run(1001);
        assert_eq!(a, run(1001));
        assert_ne!(a, run(1002));
        assert!(a.len() > 150 && a.iter().all(|&(t, _)| t < 5.0));
        // Lengths come from a stream of their own: another rate schedule
        // changes the times, not the n-th request's length.
        let other: Vec<u32> = Arrivals::new(1001, BENCH_LENGTHS, Duration::from_secs(5), |_| 80.0)
            .map(|(_, n)| n)
            .collect();
        let lengths: Vec<u32> = a.iter().map(|&(_, n)| n).collect();
        assert_eq!(lengths[..], other[..lengths.len()]);
        // A fixed length keeps the gaps of Rng::new(seed), as before.
        let mut gaps = Rng::new(1001);
        let first = gaps.exp(20.0);
        let fixed: Vec<(f64, u32)> =
            Arrivals::new(1001, Lengths::Fixed(16), Duration::from_secs(5), rate).collect();
        assert_eq!(fixed[0], (first, 16));
    }

    #[test]
    fn exponential_gaps_have_the_right_mean() {
        let mut rng = Rng::new(7);
        let n = 200_000;
        let mean = (0..n).map(|_| rng.exp(50.0)).sum::<f64>() / f64::from(n);
        assert!((mean - 0.02).abs() < 0.0005, "mean gap {mean}");
    }
}
