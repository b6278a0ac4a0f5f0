//! The mock inference replica (tests/fixtures/mock_replica.py): a namespace
//! to run it in, starting it, and the client side of its API (streamed and
//! plain completions, `/metrics`, `/control`) over plain TCP.
//!
//! The clients run in the calling thread's namespace: wrap them in
//! [`netns::in_netns`].

use std::{
    ffi::OsStr,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::netns::{self, ChildGuard, HttpResponse};

/// How long [`spawn_mock_replica`] waits for `/health` to answer 200.
const START_TIMEOUT: Duration = Duration::from_secs(10);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Path of tests/fixtures/mock_replica.py.
pub fn mock_replica_script() -> PathBuf {
    crate::fixtures::fixture("mock_replica.py")
}

/// A network namespace with only `lo` up, for a replica and its clients to
/// talk over 127.0.0.1 without taking host ports. Deleted on drop, with
/// whatever still runs in it.
#[derive(Debug)]
pub struct LoopbackNs {
    name: String,
}

impl LoopbackNs {
    pub fn new() -> Result<Self> {
        // The netns harness's naming pattern (`rt<pid>x...-role`), so a run
        // killed before this guard drops is cleaned up by the next one.
        let name = format!(
            "rt{}xr{}-rep",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for LoopbackNs {
    fn drop(&mut self) {
        if let Ok(pids) = ip(&["netns", "pids", &self.name]) {
            let own = std::process::id();
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                if pid == own {
                    continue;
                }
                if let Ok(pid) = i32::try_from(pid) {
                    // SAFETY: kill(2) has no memory-safety preconditions;
                    // the pid lives in a namespace this guard created.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if let Err(err) = ip(&["netns", "del", &self.name]) {
            eprintln!("replica: deleting {}: {err:#}", self.name);
        }
    }
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {args:?}"))?;
    ensure!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts the mock replica in `ns` on `bind:port` with extra CLI `args`
/// (e.g. `["--max-batch", "2"]`) and waits until `/health` answers 200.
pub fn spawn_mock_replica(
    ns: &str,
    name: &str,
    bind: Ipv4Addr,
    port: u16,
    args: &[&str],
) -> Result<ChildGuard> {
    let script = mock_replica_script();
    let bind_arg = bind.to_string();
    let port_arg = port.to_string();
    let mut argv: Vec<&OsStr> = vec![
        OsStr::new("python3"),
        script.as_os_str(),
        OsStr::new("--name"),
        OsStr::new(name),
        OsStr::new("--bind"),
        OsStr::new(&bind_arg),
        OsStr::new("--port"),
        OsStr::new(&port_arg),
    ];
    argv.extend(args.iter().map(OsStr::new));
    let mut guard = netns::spawn(ns, &argv)?;
    let probe = if bind.is_unspecified() {
        Ipv4Addr::LOCALHOST
    } else {
        bind
    };
    let addr = SocketAddr::from((probe, port));
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = guard.try_wait()? {
            bail!("mock replica {name} exited at start: {status}");
        }
        let answer = netns::in_netns(ns, || {
            netns::http_get(addr, "/health", Duration::from_millis(500))
        })?;
        match answer {
            Ok(r) if r.status == 200 => return Ok(guard),
            _ if Instant::now() >= deadline => {
                bail!("mock replica {name} did not answer /health within {START_TIMEOUT:?}")
            }
            _ => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// POSTs a JSON body over a fresh connection and reads the whole response.
pub fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Result<HttpResponse> {
    let mut reader = send_post(addr, path, body, timeout)?;
    let status = read_head(&mut reader)?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut reader, &mut text)
        .with_context(|| format!("reading the body of POST {path}"))?;
    Ok(HttpResponse { status, body: text })
}

/// Sets replica parameters with `POST /control` (see the fixture's doc).
pub fn control(addr: SocketAddr, json: &str) -> Result<()> {
    let r = post_json(addr, "/control", json, Duration::from_secs(5))?;
    ensure!(
        r.status == 200,
        "POST /control {json}: {} {}",
        r.status,
        r.body
    );
    Ok(())
}

/// A streamed completion as the client saw it.
#[derive(Debug, Clone)]
pub struct Streamed {
    /// The replica's name (`X-Replica`).
    pub replica: String,
    /// Each token's text and when it arrived.
    pub tokens: Vec<(Instant, String)>,
    /// Whether `data: [DONE]` arrived.
    pub done: bool,
}

/// Requests `max_tokens` tokens with `"stream": true` and records when each
/// SSE chunk arrives.
pub fn stream_completion(addr: SocketAddr, max_tokens: u32, timeout: Duration) -> Result<Streamed> {
    let body = format!(r#"{{"prompt":"hello","max_tokens":{max_tokens},"stream":true}}"#);
    let mut reader = send_post(addr, "/v1/completions", &body, timeout)?;
    let mut replica = String::new();
    let status = read_head_with(&mut reader, |name, value| {
        if name.eq_ignore_ascii_case("x-replica") {
            replica = value.to_owned();
        }
    })?;
    ensure!(status == 200, "completion answered {status}");
    let mut streamed = Streamed {
        replica,
        tokens: Vec::new(),
        done: false,
    };
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).context("reading the stream")? == 0 {
            break;
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            streamed.done = true;
            continue;
        }
        let chunk: serde_json::Value =
            serde_json::from_str(data).with_context(|| format!("chunk {data:?}"))?;
        let text = chunk["choices"][0]["text"]
            .as_str()
            .with_context(|| format!("no choices[0].text in {data}"))?;
        streamed.tokens.push((Instant::now(), text.to_owned()));
    }
    Ok(streamed)
}

fn send_post(
    addr: SocketAddr,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Result<BufReader<TcpStream>> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .with_context(|| format!("sending POST {path} to {addr}"))?;
    Ok(BufReader::new(stream))
}

fn read_head(reader: &mut BufReader<TcpStream>) -> Result<u16> {
    read_head_with(reader, |_, _| {})
}

/// Reads the status line and headers; returns the status code.
fn read_head_with(
    reader: &mut BufReader<TcpStream>,
    mut header: impl FnMut(&str, &str),
) -> Result<u16> {
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .context("reading the status line")?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    loop {
        line.clear();
        ensure!(
            reader.read_line(&mut line).context("reading headers")? > 0,
            "connection closed in the headers"
        );
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            return Ok(status);
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            header(name.trim(), value.trim());
        }
    }
}
