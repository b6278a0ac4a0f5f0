//! Active health checks: one probe of a backend (TCP connect, or an HTTP GET
//! that must answer 2xx) and the fall/rise state machine that turns a stream
//! of probe results into up or down.
//!
//! State machine ([`HealthState`]):
//! - A backend starts [`Health::Unknown`] and is not routable until it has
//!   answered once: the *first* success makes it healthy at once (no `rise`
//!   wait), so a fresh daemon routes after one probe instead of `rise`.
//! - `fall` consecutive failures make an unknown or healthy backend
//!   unhealthy; `rise` consecutive successes make an unhealthy one healthy.
//! - Any result of the other kind resets the count, so a flapping backend
//!   stays where it is instead of bouncing with every probe.
//! - `fall` or `rise` of 0 behaves as 1.
//! - A daemon that adopts a running datapath starts the backends that the
//!   datapath was routing to as *assumed* healthy ([`HealthState::assumed`]):
//!   routable, so a restart does not take them out of the tables until the
//!   first probe, which then settles them either way at once (one failure
//!   is enough: the earlier daemon's verdict is as old as the restart).
//! - A probe that fails on a *local* error ([`ProbeFailure::local`]: the
//!   daemon is out of file descriptors, socket buffers or local ports) says
//!   nothing of the backend and is not fed to the state machine at all: the
//!   controller keeps the last verdict (fails open) and counts it.

use std::{net::SocketAddr, time::Duration};

use serde::Serialize;
use tokio::net::TcpStream;

use crate::telemetry::{
    TelemetryError,
    http_client::{self, is_local_error},
};

/// Health endpoints answer a few bytes; more than this is not read, and a
/// 2xx with a longer body still counts as healthy.
const MAX_HEALTH_BODY: usize = 64 << 10;

/// How to probe one backend and how many results flip its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub addr: SocketAddr,
    /// When set, `GET path` over HTTP/1.1 must answer 2xx.
    pub http_path: Option<String>,
    /// Without `http_path`: a TCP connect must succeed. With it, the HTTP
    /// exchange already includes the connect and this adds nothing.
    pub tcp: bool,
    /// For the whole probe: connect, request and response.
    pub timeout: Duration,
    /// Consecutive failures that make a backend unhealthy.
    pub fall: u32,
    /// Consecutive successes that make an unhealthy backend healthy.
    pub rise: u32,
}

impl HealthCheck {
    /// Whether this check probes anything. One that does not (no TCP, no
    /// HTTP) always passes: the backend is taken as healthy.
    pub fn is_active(&self) -> bool {
        self.tcp || self.http_path.is_some()
    }

    /// Probes once; `Err` says why the probe failed, for logs and status,
    /// and whether the failure was the daemon's own.
    pub async fn probe(&self) -> Result<(), ProbeFailure> {
        if let Some(path) = &self.http_path {
            return self.probe_http(path).await;
        }
        if !self.tcp {
            return Ok(());
        }
        match tokio::time::timeout(self.timeout, TcpStream::connect(self.addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(ProbeFailure {
                local: is_local_error(&e),
                message: format!("TCP connect to {}: {e}", self.addr),
            }),
            Err(_) => Err(ProbeFailure::backend(format!(
                "TCP connect to {} timed out after {:?}",
                self.addr, self.timeout
            ))),
        }
    }

    async fn probe_http(&self, path: &str) -> Result<(), ProbeFailure> {
        let slash = if path.starts_with('/') { "" } else { "/" };
        // SocketAddr's Display brackets IPv6 addresses, as a URL needs.
        let url = format!("http://{}{slash}{path}", self.addr);
        match http_client::get(&url, None, self.timeout, MAX_HEALTH_BODY).await {
            Ok(_) => Ok(()),
            // Only raised after a 2xx status line: the backend answered.
            Err(TelemetryError::TooLarge { .. }) => Ok(()),
            Err(e) => Err(ProbeFailure {
                local: matches!(e, TelemetryError::Local(_)),
                message: format!("GET {url}: {e}"),
            }),
        }
    }
}

/// Why a probe failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeFailure {
    pub message: String,
    /// The daemon could not probe (see `http_client::is_local_error`): no
    /// verdict on the backend.
    pub local: bool,
}

impl ProbeFailure {
    /// A failure that is the backend's (or its network's).
    pub fn backend(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            local: false,
        }
    }

    /// A failure that is the daemon's own.
    pub fn local(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            local: true,
        }
    }
}

impl std::fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What the probes say about a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not yet answered a probe, nor failed `fall` in a row.
    #[default]
    Unknown,
    Healthy,
    Unhealthy,
}

/// The fall/rise state machine of one backend (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HealthState {
    status: Health,
    /// Consecutive results of the current streak; which kind is
    /// `streak_ok`.
    streak: u32,
    streak_ok: bool,
    /// Routable on an earlier daemon's word until the first probe result.
    assumed: bool,
}

impl HealthState {
    pub fn new() -> Self {
        Self::default()
    }

    /// A backend that the adopted datapath was routing to: healthy until
    /// its first probe says otherwise.
    pub fn assumed() -> Self {
        Self {
            status: Health::Healthy,
            assumed: true,
            ..Self::default()
        }
    }

    pub fn status(&self) -> Health {
        self.status
    }

    /// Whether traffic may go to the backend: only once it is healthy.
    pub fn is_routable(&self) -> bool {
        self.status == Health::Healthy
    }

    /// Feeds one probe result; returns the new status when it changed.
    pub fn record(&mut self, ok: bool, fall: u32, rise: u32) -> Option<Health> {
        if std::mem::take(&mut self.assumed) && !ok {
            self.streak_ok = false;
            self.streak = 1;
            self.status = Health::Unhealthy;
            return Some(Health::Unhealthy);
        }
        if self.streak_ok == ok {
            self.streak = self.streak.saturating_add(1);
        } else {
            self.streak_ok = ok;
            self.streak = 1;
        }
        let next = match (self.status, ok) {
            (Health::Unknown, true) => Health::Healthy,
            (Health::Unhealthy, true) if self.streak >= rise.max(1) => Health::Healthy,
            (Health::Unknown | Health::Healthy, false) if self.streak >= fall.max(1) => {
                Health::Unhealthy
            }
            (status, _) => status,
        };
        if next == self.status {
            return None;
        }
        self.status = next;
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    fn feed(state: &mut HealthState, results: &str, fall: u32, rise: u32) -> Vec<Health> {
        results
            .chars()
            .filter_map(|c| state.record(c == '+', fall, rise))
            .collect()
    }

    #[test]
    fn first_success_makes_healthy_at_once() {
        let mut s = HealthState::new();
        assert_eq!(s.status(), Health::Unknown);
        assert!(!s.is_routable());
        assert_eq!(s.record(true, 3, 5), Some(Health::Healthy));
        assert!(s.is_routable());
        assert_eq!(s.record(true, 3, 5), None);
    }

    #[test]
    fn an_assumed_backend_is_routable_until_its_first_probe_settles_it() {
        let mut s = HealthState::assumed();
        assert!(s.is_routable());
        // One failure ends the assumption, whatever `fall` is.
        assert_eq!(feed(&mut s, "-", 3, 2), vec![Health::Unhealthy]);
        assert!(!s.is_routable());
        // From there it is an ordinary unhealthy backend: `rise` to return.
        assert_eq!(feed(&mut s, "++", 3, 2), vec![Health::Healthy]);

        let mut s = HealthState::assumed();
        assert_eq!(feed(&mut s, "+", 3, 2), vec![]);
        assert!(s.is_routable());
        // Confirmed: now `fall` failures in a row take it out, as usual.
        assert_eq!(feed(&mut s, "--", 3, 2), vec![]);
        assert_eq!(feed(&mut s, "-", 3, 2), vec![Health::Unhealthy]);
    }

    #[test]
    fn unknown_becomes_unhealthy_after_fall_failures() {
        let mut s = HealthState::new();
        assert_eq!(feed(&mut s, "--", 3, 2), vec![]);
        assert_eq!(s.status(), Health::Unknown);
        assert_eq!(feed(&mut s, "-", 3, 2), vec![Health::Unhealthy]);
        // From unhealthy, it takes `rise`, not one.
        assert_eq!(feed(&mut s, "+", 3, 2), vec![]);
        assert_eq!(feed(&mut s, "+", 3, 2), vec![Health::Healthy]);
    }

    #[test]
    fn fall_and_rise_thresholds() {
        let mut s = HealthState::new();
        assert_eq!(feed(&mut s, "+", 3, 2), vec![Health::Healthy]);
        assert_eq!(feed(&mut s, "--", 3, 2), vec![]);
        assert_eq!(feed(&mut s, "-", 3, 2), vec![Health::Unhealthy]);
        assert_eq!(feed(&mut s, "----", 3, 2), vec![]);
        assert_eq!(feed(&mut s, "+", 3, 2), vec![]);
        assert_eq!(feed(&mut s, "+", 3, 2), vec![Health::Healthy]);
    }

    #[test]
    fn flapping_resets_the_streak() {
        let mut s = HealthState::new();
        feed(&mut s, "+", 3, 3);
        // Never three failures in a row: stays healthy.
        assert_eq!(feed(&mut s, "--+--+--+-+--+", 3, 3), vec![]);
        assert_eq!(s.status(), Health::Healthy);
        assert_eq!(feed(&mut s, "---", 3, 3), vec![Health::Unhealthy]);
        // Never three successes in a row: stays unhealthy.
        assert_eq!(feed(&mut s, "++-++-+-++-", 3, 3), vec![]);
        assert_eq!(s.status(), Health::Unhealthy);
        assert_eq!(feed(&mut s, "+++", 3, 3), vec![Health::Healthy]);
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let mut s = HealthState::new();
        assert_eq!(
            feed(&mut s, "+-+-", 0, 0),
            vec![
                Health::Healthy,
                Health::Unhealthy,
                Health::Healthy,
                Health::Unhealthy
            ]
        );
    }

    fn check(addr: SocketAddr, http_path: Option<&str>) -> HealthCheck {
        HealthCheck {
            addr,
            http_path: http_path.map(str::to_owned),
            tcp: true,
            timeout: Duration::from_millis(500),
            fall: 3,
            rise: 2,
        }
    }

    /// A listener answering every connection with `response` after reading
    /// the request head (an empty response closes without answering).
    async fn http_server(response: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let mut seen = Vec::new();
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    assert!(seen.starts_with(b"GET /health HTTP/1.1\r\n"));
                    let _ = s.write_all(response).await;
                });
            }
        });
        addr
    }

    /// The message of a failure that must be the backend's.
    fn backend_failure(f: ProbeFailure) -> String {
        assert!(!f.local, "{f} taken for a local error");
        f.message
    }

    async fn unused_addr() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    #[tokio::test]
    async fn tcp_probe_succeeds_and_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = listener.local_addr().unwrap();
        assert_eq!(check(up, None).probe().await, Ok(()));

        let err = check(unused_addr().await, None)
            .probe()
            .await
            .map_err(backend_failure)
            .unwrap_err();
        assert!(err.contains("TCP connect"), "{err}");
    }

    #[tokio::test]
    async fn http_probe_requires_2xx() {
        let ok = http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        assert_eq!(check(ok, Some("/health")).probe().await, Ok(()));
        // A path without the leading slash is taken as rooted.
        assert_eq!(check(ok, Some("health")).probe().await, Ok(()));

        let broken =
            http_server(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n").await;
        let err = check(broken, Some("/health"))
            .probe()
            .await
            .map_err(backend_failure)
            .unwrap_err();
        assert!(err.contains("HTTP 500"), "{err}");

        let hangs_up = http_server(b"").await;
        assert!(check(hangs_up, Some("/health")).probe().await.is_err());

        let refused = unused_addr().await;
        let err = check(refused, Some("/health"))
            .probe()
            .await
            .map_err(backend_failure)
            .unwrap_err();
        assert!(err.contains("unreachable"), "{err}");
    }

    #[tokio::test]
    async fn http_probe_with_a_large_2xx_body_is_healthy() {
        static BIG: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
            let mut r = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                2 * MAX_HEALTH_BODY
            )
            .into_bytes();
            r.resize(r.len() + 2 * MAX_HEALTH_BODY, b'x');
            r
        });
        let addr = http_server(BIG.as_slice()).await;
        assert_eq!(check(addr, Some("/health")).probe().await, Ok(()));
    }

    #[tokio::test]
    async fn probes_time_out() {
        // Accepts, reads the request, never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let started = tokio::time::Instant::now();
        let c = check(addr, Some("/health"));
        // A hang guard only: the listener never answers, so without its
        // deadline the probe would never end; the error says it fired.
        let err = tokio::time::timeout(Duration::from_secs(30), c.probe())
            .await
            .expect("the probe never ended")
            .map_err(backend_failure)
            .unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        // A timeout cannot fire early; how late it fires is the scheduler's.
        assert!(started.elapsed() >= c.timeout);

        // A connect that gets no answer at all: once the accept queue of a
        // listener with backlog 0 holds its one connection, the kernel
        // drops further SYNs.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let _listener = socket.listen(0).unwrap();
        let mut timed_out = false;
        for _ in 0..8 {
            let mut c = check(addr, None);
            c.timeout = Duration::from_millis(200);
            if let Err(e) = c.probe().await {
                assert!(!e.local && e.message.contains("timed out"), "{e}");
                timed_out = true;
                break;
            }
        }
        assert!(timed_out, "backlog never filled");
    }

    #[tokio::test]
    async fn an_inactive_check_always_passes() {
        let c = HealthCheck {
            tcp: false,
            ..check(unused_addr().await, None)
        };
        assert!(!c.is_active());
        assert_eq!(c.probe().await, Ok(()));
    }
}
