//! The soak's clients: short connections and long streams through both VIPs,
//! each outcome recorded with the backend that served it.
//!
//! A completed connection names its backend in the answer (the fixture
//! backend's body or stream lines, the mock replica's `X-Replica`). A failed
//! one often has no answer, so each connection's local port is read as soon
//! as the kernel has chosen it (the connect runs non-blocking), and a
//! failure without an answer is attributed by looking that flow up in the datapath's own
//! connection table: the entry the SYN created says which backend the
//! datapath sent it to. An entry older than the connection, or none at all
//! (the SYN was never balanced), leaves the failure unattributed.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    mem::size_of,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::maps::{Array, HashMap, Map, MapData, MapError};
use router_common::{Backend, CONN_CLOSING, CONN_REPLY, ConnEntry, ConnKey, PROTO_TCP};

use super::{BACKENDS, Ctx, Rng, Service};
use router_testkit::netns;

/// SYNs are retried at 1 s and 3 s within this, so a SYN the datapath
/// dropped once (no backend for an instant) still connects.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest silence on an open connection before it counts as failed.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// `bpf_ktime_get_coarse_ns` ticks once a jiffy; an entry stamped by our
/// own SYN can read a little older than the client's clock read before it.
const COARSE_SLACK_NS: u64 = 50_000_000;
/// Tokens of a short (non-streamed) completion.
const SHORT_TOKENS: u32 = 2;

/// What a client did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    /// `GET /` on the web VIP: one short connection.
    WebGet,
    /// A non-streamed completion on the llama VIP.
    Completion,
    /// `GET /stream` on the web VIP for a few seconds.
    WebStream,
    /// A streamed completion of many tokens on the llama VIP.
    CompletionStream,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::WebGet => "web_get",
            Kind::Completion => "completion",
            Kind::WebStream => "web_stream",
            Kind::CompletionStream => "completion_stream",
        }
    }

    pub(crate) fn is_web(self) -> bool {
        matches!(self, Kind::WebGet | Kind::WebStream)
    }

    pub(crate) fn is_stream(self) -> bool {
        matches!(self, Kind::WebStream | Kind::CompletionStream)
    }
}

/// How a failure's backend was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Via {
    /// The backend answered before the connection failed.
    Answer,
    /// The datapath's connection-table entry for the flow; what its reply
    /// entry looked like.
    ConnTable(String),
    /// Neither: no answer and no entry created by this connection.
    Nothing,
    /// The connection table could not be read.
    LookupFailed(String),
}

/// One connection from start to end.
#[derive(Clone, Debug)]
pub(crate) struct Outcome {
    pub kind: Kind,
    pub start: Instant,
    pub end: Instant,
    /// Time to connect, when it connected.
    pub connect: Option<Duration>,
    /// The client's local port, when one was bound.
    pub port: Option<u16>,
    /// The backend that served it (for a failure: see `via`).
    pub backend: Option<String>,
    pub via: Via,
    /// `None`: completed.
    pub error: Option<String>,
}

/// A connection that broke, with the backend if it had answered.
struct Broken {
    backend: Option<String>,
    error: String,
}

impl Broken {
    fn new(backend: Option<&str>, error: impl std::fmt::Display) -> Self {
        Self {
            backend: backend.map(str::to_owned),
            error: error.to_string(),
        }
    }
}

/// Short connections, one after another at `pace`, alternating at random
/// between the two services, until the soak ends.
pub(crate) fn short_worker(ctx: &Ctx<'_>, seed: u64, pace: Duration) -> Vec<Outcome> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    while !ctx.ending() {
        let started = Instant::now();
        let kind = if rng.below(2) == 0 {
            Kind::WebGet
        } else {
            Kind::Completion
        };
        out.push(exchange(ctx, kind, &mut rng));
        ctx.sleep_until(started + pace);
    }
    out
}

/// Long streams, one after another, until the soak ends; a stream that is
/// open then runs to its end.
pub(crate) fn stream_worker(ctx: &Ctx<'_>, seed: u64) -> Vec<Outcome> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    while !ctx.ending() {
        let kind = if rng.below(2) == 0 {
            Kind::WebStream
        } else {
            Kind::CompletionStream
        };
        out.push(exchange(ctx, kind, &mut rng));
        // A failed stream would otherwise retry in a tight loop.
        if out.last().is_some_and(|o| o.error.is_some()) {
            ctx.sleep_until(Instant::now() + Duration::from_millis(100));
        }
    }
    out
}

/// One connection of `kind`, start to end, recorded.
fn exchange(ctx: &Ctx<'_>, kind: Kind, rng: &mut Rng) -> Outcome {
    let service = if kind.is_web() {
        Service::Web
    } else {
        Service::Llama
    };
    let vip = service.vip();
    ctx.live.attempted.fetch_add(1, Ordering::Relaxed);
    let since = coarse_now_ns();
    let start = Instant::now();
    let (port, connected) = connect_from_known_port(vip, CONNECT_TIMEOUT, ctx.reuse_ports);
    let connect = connected.is_ok().then(|| start.elapsed());
    let result = match connected {
        Ok(stream) => match kind {
            Kind::WebGet => web_get(stream),
            Kind::Completion => completion(stream),
            Kind::WebStream => web_stream(stream, 2.0 + f64::from(rng.below(5))),
            Kind::CompletionStream => completion_stream(stream, 60 + 20 * rng.below(4)),
        },
        Err(e) => Err(Broken::new(None, format!("connect: {e}"))),
    };
    let end = Instant::now();
    let outcome = match result {
        Ok(backend) => Outcome {
            kind,
            start,
            end,
            connect,
            port,
            backend: Some(backend),
            via: Via::Answer,
            error: None,
        },
        Err(broken) => {
            let (backend, via) = match (broken.backend, port) {
                (Some(b), _) => (Some(b), Via::Answer),
                (None, Some(port)) => match flow_backend(&ctx.pin_path(), port, vip, since) {
                    Ok(Some((name, reply))) => (Some(name), Via::ConnTable(reply)),
                    Ok(None) => (None, Via::Nothing),
                    Err(e) => (None, Via::LookupFailed(format!("{e:#}"))),
                },
                (None, None) => (None, Via::Nothing),
            };
            Outcome {
                kind,
                start,
                end,
                connect,
                port,
                backend,
                via,
                error: Some(broken.error),
            }
        }
    };
    if outcome.error.is_none() {
        ctx.live.completed.fetch_add(1, Ordering::Relaxed);
    } else {
        ctx.live.failed.fetch_add(1, Ordering::Relaxed);
    }
    outcome
}

/// `GET /` on the web service: the fixture backend answers with its name.
fn web_get(mut s: TcpStream) -> Result<String, Broken> {
    s.write_all(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
        .map_err(|e| Broken::new(None, format!("sending GET /: {e}")))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| Broken::new(None, format!("reading the answer: {e}")))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| Broken::new(None, format!("truncated answer {text:?}")))?;
    let name = body.trim();
    let known = BACKENDS
        .iter()
        .any(|b| b.service == Service::Web && b.name == name);
    let status = status_code(head);
    if !known {
        return Err(Broken::new(
            None,
            format!("answer from no web backend: {text:?}"),
        ));
    }
    if status != Some(200) {
        return Err(Broken::new(Some(name), format!("status {status:?}")));
    }
    Ok(name.to_owned())
}

/// A non-streamed completion of two tokens.
fn completion(s: TcpStream) -> Result<String, Broken> {
    let mut r = post_completion(s, SHORT_TOKENS, false)?;
    let (status, replica) = read_head(&mut r).map_err(|e| Broken::new(None, e))?;
    let replica = replica.ok_or_else(|| Broken::new(None, "no X-Replica header"))?;
    let mut body = String::new();
    r.read_to_string(&mut body)
        .map_err(|e| Broken::new(Some(&replica), format!("reading the completion: {e}")))?;
    if status != 200 {
        return Err(Broken::new(
            Some(&replica),
            format!("status {status}: {}", body.trim()),
        ));
    }
    let v: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| Broken::new(Some(&replica), format!("completion is not JSON: {e}")))?;
    if v["choices"][0]["finish_reason"] != "length" {
        return Err(Broken::new(
            Some(&replica),
            format!("incomplete completion {body:?}"),
        ));
    }
    Ok(replica)
}

/// `GET /stream` for `seconds`: a line with the backend's name every
/// 100 ms, then the backend closes. The fixture sends no end marker, and a
/// killed backend's kernel closes the connection cleanly, so a stream that
/// ends well before its time counts as broken.
fn web_stream(mut s: TcpStream, seconds: f64) -> Result<String, Broken> {
    write!(
        s,
        "GET /stream?seconds={seconds}&interval_ms=100 HTTP/1.0\r\nHost: web\r\n\r\n"
    )
    .map_err(|e| Broken::new(None, format!("sending GET /stream: {e}")))?;
    let sent = Instant::now();
    let mut r = BufReader::new(s);
    let (status, _) = read_head(&mut r).map_err(|e| Broken::new(None, e))?;
    if status != 200 {
        return Err(Broken::new(None, format!("stream status {status}")));
    }
    let mut owner: Option<String> = None;
    let mut lines = 0u32;
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {
                let name = line.trim();
                match &owner {
                    None => owner = Some(name.to_owned()),
                    Some(o) if o != name => {
                        return Err(Broken::new(
                            Some(o),
                            format!("stream moved from {o} to {name} after {lines} lines"),
                        ));
                    }
                    Some(_) => {}
                }
                lines += 1;
            }
            Err(e) => {
                return Err(Broken::new(
                    owner.as_deref(),
                    format!("stream broke after {lines} lines: {e}"),
                ));
            }
        }
    }
    let Some(owner) = owner else {
        return Err(Broken::new(None, "stream closed before its first line"));
    };
    // The fixture stops once another interval would pass the deadline.
    let lasted = sent.elapsed().as_secs_f64();
    if lasted < seconds - 0.3 {
        return Err(Broken::new(
            Some(&owner),
            format!("stream ended after {lasted:.1} s of {seconds} s ({lines} lines)"),
        ));
    }
    Ok(owner)
}

/// A streamed completion of `tokens` tokens: one SSE chunk per token, then
/// `data: [DONE]`.
fn completion_stream(s: TcpStream, tokens: u32) -> Result<String, Broken> {
    let mut r = post_completion(s, tokens, true)?;
    let (status, replica) = read_head(&mut r).map_err(|e| Broken::new(None, e))?;
    let replica = replica.ok_or_else(|| Broken::new(None, "no X-Replica header"))?;
    if status != 200 {
        return Err(Broken::new(Some(&replica), format!("status {status}")));
    }
    let (mut got, mut done) = (0u32, false);
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => match line.trim_end().strip_prefix("data: ") {
                Some("[DONE]") => done = true,
                Some(_) => got += 1,
                None => {}
            },
            Err(e) => {
                return Err(Broken::new(
                    Some(&replica),
                    format!("stream broke after {got} of {tokens} tokens: {e}"),
                ));
            }
        }
    }
    if !done || got != tokens {
        return Err(Broken::new(
            Some(&replica),
            format!("stream ended after {got} of {tokens} tokens (done: {done})"),
        ));
    }
    Ok(replica)
}

fn post_completion(
    mut s: TcpStream,
    tokens: u32,
    stream: bool,
) -> Result<BufReader<TcpStream>, Broken> {
    let body = format!(r#"{{"prompt":"soak","max_tokens":{tokens},"stream":{stream}}}"#);
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: llama\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| Broken::new(None, format!("sending the completion request: {e}")))?;
    Ok(BufReader::new(s))
}

fn status_code(head: &str) -> Option<u16> {
    head.split_whitespace().nth(1).and_then(|s| s.parse().ok())
}

/// Reads the status line and headers: the status and `X-Replica`.
fn read_head(r: &mut BufReader<TcpStream>) -> Result<(u16, Option<String>), String> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) => return Err("closed before the status line".into()),
        Ok(_) => {}
        Err(e) => return Err(format!("reading the status line: {e}")),
    }
    let status = status_code(&line).ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut replica = None;
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return Err("closed in the headers".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading the headers: {e}")),
        }
        let h = line.trim_end();
        if h.is_empty() {
            return Ok((status, replica));
        }
        if let Some((name, value)) = h.split_once(':')
            && name.trim().eq_ignore_ascii_case("x-replica")
        {
            replica = Some(value.trim().to_owned());
        }
    }
}

/// Connects to `dst` and learns the local port even when the connect
/// fails: the connect is started non-blocking, the port is read once the
/// kernel has chosen it, then the outcome is awaited. Without `bind_first`
/// the kernel picks the port as for any client (per destination, cycling
/// through the range); with it, the port is bound first (`bind` to port
/// 0), which reuses recently used ports far more often. Returns the port
/// when one was chosen.
fn connect_from_known_port(
    dst: SocketAddrV4,
    timeout: Duration,
    bind_first: bool,
) -> (Option<u16>, std::io::Result<TcpStream>) {
    let flags = libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, flags, 0) };
    if raw < 0 {
        return (None, Err(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    if bind_first {
        let any = sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        // SAFETY: bind(2) reads `len` bytes of a live sockaddr_in.
        if unsafe { libc::bind(fd.as_raw_fd(), (&raw const any).cast(), len) } != 0 {
            return (None, Err(std::io::Error::last_os_error()));
        }
    }
    let remote = sockaddr(dst);
    // SAFETY: connect(2) reads `len` bytes of a live sockaddr_in.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const remote).cast(), len) };
    let started = if rc == 0 {
        Ok(())
    } else {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINPROGRESS) {
            Ok(())
        } else {
            Err(e)
        }
    };
    let port = local_port(&fd);
    if let Err(e) = started {
        return (port, Err(e));
    }
    if let Err(e) = await_connect(&fd, timeout) {
        return (port, Err(e));
    }
    // SAFETY: fcntl(2) on a descriptor we own; clears O_NONBLOCK so the
    // std stream's timeouts apply.
    let rc = unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK)
    };
    if rc != 0 {
        return (port, Err(std::io::Error::last_os_error()));
    }
    let s = TcpStream::from(fd);
    let timeouts = s
        .set_read_timeout(Some(READ_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(READ_TIMEOUT)));
    (port, timeouts.map(|()| s))
}

/// The socket's local port, once the kernel has chosen one.
fn local_port(fd: &OwnedFd) -> Option<u16> {
    // SAFETY: all-zero is a valid sockaddr_in.
    let mut local: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: getsockname(2) writes at most `len` bytes into `local`.
    let rc = unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut local).cast(), &raw mut len) };
    let port = u16::from_be(local.sin_port);
    (rc == 0 && port != 0).then_some(port)
}

/// Waits for a non-blocking connect to finish; its error if it failed.
fn await_connect(fd: &OwnedFd, timeout: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            ));
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: poll(2) on one live pollfd.
        let rc = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            continue;
        }
        let mut err: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt(2) writes one c_int.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&raw mut err).cast(),
                &raw mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        return if err == 0 {
            Ok(())
        } else {
            Err(std::io::Error::from_raw_os_error(err))
        };
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// CLOCK_MONOTONIC_COARSE, the clock of `bpf_ktime_get_coarse_ns` that
/// stamps connection entries.
pub(crate) fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The backend the datapath sent the client's flow from `client_port` to
/// `vip` to, from the pinned connection table, if this connection (started
/// at `since`, coarse clock) created or refreshed the entry; with the state
/// of the flow's reply entry, which is what carries the backend's answers
/// back (a failure with a forward entry but no live reply entry is the
/// datapath's, not the backend's).
pub(crate) fn flow_backend(
    pin_path: &Path,
    client_port: u16,
    vip: SocketAddrV4,
    since: u64,
) -> Result<Option<(String, String)>> {
    let key = ConnKey {
        src_addr: u32::from_ne_bytes(netns::CLIENT_ADDR.octets()),
        dst_addr: u32::from_ne_bytes(vip.ip().octets()),
        src_port: u16::from_ne_bytes(client_port.to_be_bytes()),
        dst_port: u16::from_ne_bytes(vip.port().to_be_bytes()),
        proto: PROTO_TCP,
        _pad: [0; 3],
    };
    // A confirmed flow is in CONNS; one whose SYN was refused never got
    // past HALF_OPEN (the client never answered a SYN-ACK).
    let mut found = None;
    for table in ["CONNS", "HALF_OPEN"] {
        let map: HashMap<MapData, ConnKey, ConnEntry> =
            HashMap::try_from(pinned_map(pin_path, table)?).context(table)?;
        match map.get(&key, 0) {
            Ok(e) => {
                found = Some((map, e));
                break;
            }
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("looking the flow up in {table}")),
        }
    }
    let Some((conns, entry)) = found else {
        return Ok(None);
    };
    ensure!(
        entry.flags & CONN_REPLY == 0,
        "the client's key holds a reply entry"
    );
    if entry.last_seen_ns.saturating_add(COARSE_SLACK_NS) < since {
        // Left by an earlier connection from the same port.
        return Ok(None);
    }
    // The reply direction: backend → SNAT address and port, as rewritten.
    let reply_key = ConnKey {
        src_addr: entry.new_dst_addr,
        dst_addr: entry.new_src_addr,
        src_port: entry.new_dst_port,
        dst_port: entry.new_src_port,
        proto: PROTO_TCP,
        _pad: [0; 3],
    };
    let now = coarse_now_ns();
    let reply = match conns.get(&reply_key, 0) {
        Ok(r) => format!(
            "reply entry {}, idle {:.1} s",
            if r.flags & CONN_CLOSING != 0 {
                "closing"
            } else {
                "live"
            },
            now.saturating_sub(r.last_seen_ns) as f64 / 1e9
        ),
        Err(MapError::KeyNotFound) => "no reply entry".to_owned(),
        Err(e) => format!("reply entry unreadable: {e}"),
    };
    let backends: Array<MapData, Backend> =
        Array::try_from(pinned_map(pin_path, "BACKENDS")?).context("BACKENDS")?;
    let b = backends
        .get(&entry.backend_id, 0)
        .with_context(|| format!("BACKENDS[{}]", entry.backend_id))?;
    let addr = Ipv4Addr::from(b.addr.to_ne_bytes());
    match BACKENDS
        .iter()
        .enumerate()
        .find(|(i, _)| netns::backend_addr(*i) == addr)
    {
        Some((_, def)) => Ok(Some((def.name.to_owned(), reply))),
        None => bail!(
            "backend id {} has the unknown address {addr}",
            entry.backend_id
        ),
    }
}

fn pinned_map(pin_path: &Path, name: &str) -> Result<Map> {
    let path = pin_path.join("maps").join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("reading {}", path.display()))
}
