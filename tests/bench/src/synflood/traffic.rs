//! What runs during a scenario: the flood's senders, the new connections
//! and the long-lived streams.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use router_testkit::{
    netns,
    packet::spoofed_syn,
    raw_sender::{RawSender, SendStats},
};

use super::rig::get_ok;
use super::{MAX_STREAM_LINES, NEW_CONN_GAP, StreamResult};

/// One flood from every sender in parallel (spoofed SYNs numbered from
/// `first`), at most `rate_pps` in all, for at most `duration` and
/// `max_packets`.
pub(super) fn flood_from(
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
pub(super) struct NewConns {
    pub(super) attempts: u64,
    pub(super) failures: u64,
    pub(super) errors: Vec<String>,
    pub(super) slowest: Duration,
}

/// New connections from the client, one after another, while `flooding`;
/// bounded by count and by time besides the flood's own end.
pub(super) fn new_connections(
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

/// Opens a stream of `lines` lines through the VIP and reads up to its
/// first line, which names the backend serving it. `read_timeout` must outlast
/// the flood: a flood congests every queue on the way, and TCP backs off
/// its retransmissions to seconds; such a stream resumes once the flood
/// stops, while one whose flow the LB lost never does.
pub(super) fn open_stream(
    vip: SocketAddr,
    lines: usize,
    interval_ms: u64,
    read_timeout: Duration,
) -> Result<(String, BufReader<TcpStream>)> {
    let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(5))
        .with_context(|| format!("connecting to {vip}"))?;
    s.set_read_timeout(Some(read_timeout))?;
    // One write, one segment (see `netns::http_get`).
    let request = format!("GET /stream?lines={lines}&interval_ms={interval_ms} HTTP/1.0\r\n\r\n");
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

/// Reads a stream to its end; every line must name `backend`, and the
/// stream must end with the backend's `end N` for the `lines` it sent
/// (see `open_stream`). A backend slowed down by the flood's CPU load
/// sends its lines later, never fewer, so a stream cut short by the LB is
/// told from a slow one by its end alone.
pub(super) fn read_stream(
    backend: String,
    expected: usize,
    mut r: BufReader<TcpStream>,
) -> StreamResult {
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
            Ok(0) => break Some(format!("closed after {lines} lines, without its end")),
            Ok(_) if line.trim() == backend => lines += 1,
            Ok(_) if line.trim() == format!("end {expected}") && lines == expected => break None,
            Ok(_) if line.starts_with("end ") => {
                break Some(format!(
                    "{:?} after {lines} of {expected} lines",
                    line.trim()
                ));
            }
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

#[cfg(test)]
mod tests {
    use std::{io::Write as _, net::TcpListener};

    use super::*;

    /// What `read_stream` makes of a stream whose backend sent `body`
    /// after the first line (which `open_stream` has read).
    fn read(body: &'static str, expected: usize) -> StreamResult {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        let writer = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(body.as_bytes()).unwrap();
        });
        let stream = TcpStream::connect(at).unwrap();
        let result = read_stream("b0".into(), expected, BufReader::new(stream));
        writer.join().unwrap();
        result
    }

    #[test]
    fn a_stream_is_whole_only_with_every_line_and_its_end() {
        let whole = read("b0\nb0\nend 3\n", 3);
        assert_eq!((whole.lines, whole.error), (3, None));
        let cut = read("b0\n", 3);
        assert_eq!(
            cut.error.as_deref(),
            Some("closed after 2 lines, without its end")
        );
        let short = read("b0\nend 3\n", 3);
        assert_eq!(short.error.as_deref(), Some("\"end 3\" after 2 of 3 lines"));
        let foreign = read("b1\n", 3);
        assert_eq!(foreign.error.as_deref(), Some("line 1 came from \"b1\""));
    }
}
