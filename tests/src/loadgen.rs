//! The benchmarks' in-tree load generator: HTTP/1.1 with one TCP connection
//! per request (`Connection: close`, a new socket every time), closed-loop at
//! the maximum rate or open-loop at a fixed rate, and streaming completions
//! with Poisson arrivals for the routing-quality benchmark.
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
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpStream,
};

use crate::netns;

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
}

/// One streamed completion as the client saw it.
#[derive(Debug, Clone)]
pub struct StreamSample {
    /// Seconds since the run started when the request was sent.
    pub sent_s: f64,
    /// Time to the first token (first SSE data chunk), ms.
    pub ttft_ms: f64,
    /// Time to `data: [DONE]`, ms.
    pub e2e_ms: f64,
    /// The replica that served it (`X-Replica`).
    pub replica: String,
}

/// What a streaming run saw.
#[derive(Debug, Clone, Default)]
pub struct StreamRun {
    pub elapsed_s: f64,
    pub samples: Vec<StreamSample>,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub start_lag_p99_us: u32,
}

async fn stream_once(
    addr: SocketAddr,
    body: &str,
    timeout: Duration,
) -> Result<(f64, f64, String)> {
    let t0 = Instant::now();
    tokio::time::timeout(timeout, async {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
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
    pub max_tokens: u32,
    /// A request not done within this counts as an error.
    pub timeout: Duration,
    /// Seeds the arrival times: the same seed gives the same arrivals.
    pub seed: u64,
    /// Arrivals beyond this many requests in flight are errors, not sent.
    pub max_in_flight: usize,
}

/// One request's outcome: when it was sent, and its TTFT, end-to-end time
/// and replica or the error.
type Outcome = (f64, Result<(f64, f64, String)>);

/// Open-loop streaming completions: Poisson arrivals whose rate is
/// `rate_at(seconds since start)`, one streamed completion per connection.
/// Waits for every request to finish or time out. `stop` ends the arrivals
/// early.
pub async fn stream_poisson(
    load: StreamLoad,
    rate_at: impl Fn(f64) -> f64,
    stop: Arc<AtomicBool>,
) -> StreamRun {
    let StreamLoad {
        target,
        duration,
        max_tokens,
        timeout,
        seed,
        max_in_flight,
    } = load;
    let body: Arc<str> =
        format!(r#"{{"prompt":"hello","max_tokens":{max_tokens},"stream":true}}"#).into();
    let start = Instant::now();
    let mut rng = Rng::new(seed);
    let mut tasks = tokio::task::JoinSet::new();
    let mut lags = Vec::new();
    let mut errors = 0u64;
    let mut error_samples = Vec::new();
    let mut samples = Vec::new();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut t = 0.0;
    let mut collect = |res: Result<Outcome, tokio::task::JoinError>,
                       samples: &mut Vec<StreamSample>| match res {
        Ok((sent_s, Ok((ttft_ms, e2e_ms, replica)))) => samples.push(StreamSample {
            sent_s,
            ttft_ms,
            e2e_ms,
            replica,
        }),
        Ok((_, Err(e))) => {
            errors += 1;
            let msg = format!("{e:#}");
            if error_samples.len() < 5 && !error_samples.contains(&msg) {
                error_samples.push(msg);
            }
        }
        Err(e) => {
            errors += 1;
            if error_samples.len() < 5 {
                error_samples.push(format!("task: {e}"));
            }
        }
    };
    loop {
        // Thinning-free: the gap uses the rate at the current time, which is
        // exact for the piecewise-constant schedules the benchmark uses.
        t += rng.exp(rate_at(t).max(1e-6));
        if t >= duration.as_secs_f64() || stop.load(Ordering::Relaxed) {
            break;
        }
        let due = start + Duration::from_secs_f64(t);
        tokio::time::sleep_until(due.into()).await;
        lags.push(u32::try_from(due.elapsed().as_micros()).unwrap_or(u32::MAX));
        if in_flight.load(Ordering::Relaxed) >= max_in_flight {
            collect(
                Ok((
                    t,
                    Err(anyhow::anyhow!(
                        "generator limit: {max_in_flight} in flight"
                    )),
                )),
                &mut samples,
            );
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (body, in_flight) = (body.clone(), in_flight.clone());
        let sent_s = t;
        tasks.spawn(async move {
            let r = stream_once(target, &body, timeout).await;
            in_flight.fetch_sub(1, Ordering::Relaxed);
            (sent_s, r)
        });
        while let Some(r) = tasks.try_join_next() {
            collect(r, &mut samples);
        }
    }
    let elapsed_s = start.elapsed().as_secs_f64();
    while let Some(r) = tasks.join_next().await {
        collect(r, &mut samples);
    }
    lags.sort_unstable();
    StreamRun {
        elapsed_s,
        samples,
        errors,
        error_samples,
        start_lag_p99_us: percentile_us(&lags, 99.0) as u32,
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

    #[test]
    fn exponential_gaps_have_the_right_mean() {
        let mut rng = Rng::new(7);
        let n = 200_000;
        let mean = (0..n).map(|_| rng.exp(50.0)).sum::<f64>() / f64::from(n);
        assert!((mean - 0.02).abs() < 0.0005, "mean gap {mean}");
    }
}
