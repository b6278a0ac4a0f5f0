//! HTTP/1 serving with bounds, for every server the router runs: the
//! daemon's `/metrics` endpoint and control socket, and `router agent`.
//! A client can hold at most one of [`Limits::max_connections`] slots, and
//! only for a bounded time: its request head must arrive within
//! [`Limits::header_timeout`] (which is also how long an idle kept-alive
//! connection may wait for its next request), a handler gets
//! [`Limits::request_timeout`], and a connection is closed after
//! [`Limits::connection_timeout`] however busy. A connection over the cap
//! is closed as soon as it is accepted and counted in [`ServerStats`], so
//! idle clients cannot exhaust the process's file descriptors (which the
//! daemon's health probes and telemetry polls need). Where
//! [`Limits::max_per_peer`] is set, one peer address may hold at most that
//! many slots, so a single host cannot take every slot from the others
//! before it has even sent a token.

use std::{
    collections::HashMap,
    future::Future,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::{Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};
use tracing::warn;

/// The bounds of one server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// A request head must arrive within this of the connection opening or
    /// of the previous response (slow-loris and idle keep-alive guard).
    pub header_timeout: Duration,
    /// Longest a handler may take; the client then gets a 503.
    pub request_timeout: Duration,
    /// Longest a connection lives, keep-alive included; a request in flight
    /// then gets `request_timeout` more to finish.
    pub connection_timeout: Duration,
    /// Request head limit; hyper's floor is 8 KiB.
    pub max_header_bytes: usize,
    /// Connections one peer address may hold at once; `None`: no per-peer
    /// limit (a Unix socket, or a listener only local users reach, where
    /// every client shares one address anyway).
    pub max_per_peer: Option<usize>,
}

/// What a server counts, shared with whoever reports it (`/metrics`).
#[derive(Debug, Default)]
pub struct ServerStats {
    refused: AtomicU64,
    refused_per_peer: AtomicU64,
}

impl ServerStats {
    /// Connections closed on accept because `max_connections` were open.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections closed on accept because their peer already held
    /// `max_per_peer`.
    pub fn refused_per_peer(&self) -> u64 {
        self.refused_per_peer.load(Ordering::Relaxed)
    }
}

/// A listening socket the bounded server accepts from.
pub trait Listener: Send + 'static {
    /// What `accept` returns.
    type Raw: Send + 'static;
    /// What HTTP is spoken on.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// A connection and its peer's address, where it has one.
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Raw, Option<IpAddr>)>> + Send;
    /// Makes an accepted connection ready for HTTP (a TLS handshake, say).
    /// It runs in the connection's own task within `header_timeout`, so a
    /// client that stalls it holds one slot, never the accept loop.
    fn upgrade(
        &self,
        raw: Self::Raw,
    ) -> impl Future<Output = std::io::Result<Self::Io>> + Send + 'static;
}

impl Listener for tokio::net::TcpListener {
    type Raw = tokio::net::TcpStream;
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<(Self::Io, Option<IpAddr>)> {
        // An IPv4 peer on a dual-stack socket counts as its IPv4 address.
        tokio::net::TcpListener::accept(self)
            .await
            .map(|(s, peer)| (s, Some(peer.ip().to_canonical())))
    }
    fn upgrade(
        &self,
        raw: Self::Raw,
    ) -> impl Future<Output = std::io::Result<Self::Io>> + Send + 'static {
        std::future::ready(Ok(raw))
    }
}

impl Listener for tokio::net::UnixListener {
    type Raw = tokio::net::UnixStream;
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<(Self::Io, Option<IpAddr>)> {
        tokio::net::UnixListener::accept(self)
            .await
            .map(|(s, _)| (s, None))
    }
    fn upgrade(
        &self,
        raw: Self::Raw,
    ) -> impl Future<Output = std::io::Result<Self::Io>> + Send + 'static {
        std::future::ready(Ok(raw))
    }
}

/// Connections held per peer address; an entry goes when its count does.
#[derive(Clone, Default)]
struct Peers(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One peer's claim on a connection, given back on drop.
struct PeerSlot {
    peers: Peers,
    peer: IpAddr,
}

impl Peers {
    /// A slot for `peer` unless it already holds `max`.
    fn claim(&self, peer: IpAddr, max: usize) -> Option<PeerSlot> {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(peer).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: self.clone(),
            peer,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut held = self.peers.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.peer);
            }
        }
    }
}

/// How often a repeated warning (refusals, accept errors) reaches the log.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Pause after a failed accept (EMFILE and friends) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Counts occurrences of one condition and says when to log them: the
/// first at once, then at most one line per [`WARN_EVERY`] with the count.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    unreported: u64,
}

impl Throttle {
    /// Notes one occurrence; `Some(n)` when a line is due, `n` occurrences
    /// since the last one.
    fn note(&mut self, now: Instant) -> Option<u64> {
        self.unreported += 1;
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < WARN_EVERY)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unreported))
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown` completes;
/// open connections are then dropped. `name` labels the log lines.
pub async fn serve<L: Listener>(
    name: &'static str,
    listener: L,
    app: Router,
    limits: Limits,
    stats: Arc<ServerStats>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let app = app.layer(middleware::from_fn_with_state(
        limits.request_timeout,
        time_limit,
    ));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let peers = Peers::default();
    let mut conns = JoinSet::new();
    let (mut refusals, mut failures) = (Throttle::default(), Throttle::default());
    let mut peer_refusals = Throttle::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (io, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        if let Some(n) = failures.note(Instant::now()) {
                            warn!("{name}: accept failed {n} times, last: {e}");
                        }
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    drop(io);
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    if let Some(n) = refusals.note(Instant::now()) {
                        warn!(
                            "{name}: {} connections open, closing new ones on accept \
                             ({n} since the last such line)",
                            limits.max_connections
                        );
                    }
                    continue;
                };
                let peer_slot = match (peer, limits.max_per_peer) {
                    (Some(peer), Some(max)) => match peers.claim(peer, max) {
                        Some(claim) => Some(claim),
                        None => {
                            drop(io);
                            stats.refused_per_peer.fetch_add(1, Ordering::Relaxed);
                            if let Some(n) = peer_refusals.note(Instant::now()) {
                                warn!(
                                    "{name}: {peer} holds {max} connections, closing its new \
                                     ones on accept ({n} since the last such line)"
                                );
                            }
                            continue;
                        }
                    },
                    _ => None,
                };
                let io = listener.upgrade(io);
                conns.spawn(connection(io, app.clone(), limits, (slot, peer_slot)));
            }
        }
    }
    conns.shutdown().await;
}

/// One connection, holding its slots until it ends.
async fn connection<I>(
    io: impl Future<Output = std::io::Result<I>>,
    app: Router,
    limits: Limits,
    _slots: (OwnedSemaphorePermit, Option<PeerSlot>),
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // A failed or stalled handshake is the client's: close.
    let Ok(Ok(io)) = tokio::time::timeout(limits.header_timeout, io).await else {
        return;
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    tokio::pin!(conn);
    // Errors are the client's (reset, bad request, header timeout): there
    // is nothing to do but close.
    tokio::select! {
        _ = conn.as_mut() => return,
        () = tokio::time::sleep(limits.connection_timeout) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(limits.request_timeout, conn).await;
}

async fn time_limit(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no answer within {limit:?}"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use axum::routing::get;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    const LIMITS: Limits = Limits {
        max_connections: 2,
        header_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_millis(300),
        connection_timeout: Duration::from_secs(2),
        max_header_bytes: 8 << 10,
        max_per_peer: None,
    };

    async fn start(limits: Limits) -> (std::net::SocketAddr, Arc<ServerStats>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(ServerStats::default());
        let app = Router::new().route("/", get(|| async { "ok" })).route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        );
        tokio::spawn(serve(
            "test",
            listener,
            app,
            limits,
            Arc::clone(&stats),
            std::future::pending(),
        ));
        (addr, stats)
    }

    /// Everything the server sends until it closes (or `wait` passes).
    async fn read_all(s: &mut TcpStream, wait: Duration) -> Option<String> {
        let mut out = Vec::new();
        tokio::time::timeout(wait, s.read_to_end(&mut out))
            .await
            .ok()?
            .ok()?;
        Some(String::from_utf8_lossy(&out).into_owned())
    }

    async fn request(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        read_all(&mut s, Duration::from_secs(5)).await.unwrap()
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_counted() {
        let (addr, stats) = start(LIMITS).await;
        let mut idle = Vec::new();
        for _ in 0..LIMITS.max_connections {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // Let the server accept both before the third arrives.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut third = TcpStream::connect(addr).await.unwrap();
        assert_eq!(
            read_all(&mut third, Duration::from_millis(200)).await,
            Some(String::new()),
            "closed at once, unanswered"
        );
        assert_eq!(stats.refused(), 1);
        // The idle ones time out on their missing request head; slots free up.
        for mut s in idle {
            let got = read_all(&mut s, Duration::from_secs(2)).await;
            assert!(got.is_some(), "an idle connection was kept");
        }
        assert!(request(addr, "/").await.ends_with("ok"));
        assert_eq!(stats.refused(), 1);
    }

    #[tokio::test]
    async fn one_peer_cannot_hold_every_slot() {
        let limits = Limits {
            max_connections: 4,
            max_per_peer: Some(2),
            header_timeout: Duration::from_secs(5),
            ..LIMITS
        };
        let (addr, stats) = start(limits).await;
        // The server listens on 127.0.0.1; 127.0.0.2 is another peer on lo.
        let other = || async {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            s.connect(addr).await.unwrap()
        };
        let mut hog = Vec::new();
        for _ in 0..2 {
            hog.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut third = TcpStream::connect(addr).await.unwrap();
        assert_eq!(
            read_all(&mut third, Duration::from_millis(500)).await,
            Some(String::new()),
            "the hog's third connection is closed unanswered"
        );
        assert_eq!((stats.refused_per_peer(), stats.refused()), (1, 0));
        // Another peer still gets served while the hog holds its two.
        let mut s = other().await;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let reply = read_all(&mut s, Duration::from_secs(2)).await.unwrap();
        assert!(reply.ends_with("ok"), "{reply}");
        // Its slots come back when the hog lets go.
        drop(hog);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(request(addr, "/").await.ends_with("ok"));
        assert_eq!(stats.refused_per_peer(), 1);
    }

    #[tokio::test]
    async fn a_slow_handler_gets_a_503() {
        let (addr, _) = start(LIMITS).await;
        let started = Instant::now();
        // A hang guard only: the handler itself answers "late" after 5 s,
        // so the 503 is what shows the request timeout cut it short.
        let reply = tokio::time::timeout(Duration::from_secs(30), request(addr, "/slow"))
            .await
            .expect("the request never ended");
        assert!(reply.starts_with("HTTP/1.0 503"), "{reply}");
        // A timeout cannot fire early; how late it fires is the scheduler's.
        assert!(started.elapsed() >= LIMITS.request_timeout);
    }

    #[tokio::test]
    async fn a_connection_ends_after_its_lifetime_even_when_busy() {
        let limits = Limits {
            connection_timeout: Duration::from_millis(500),
            header_timeout: Duration::from_secs(5),
            ..LIMITS
        };
        let (addr, _) = start(limits).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        // Keep-alive requests, one every 100 ms, each answered, until the
        // server closes the connection.
        let mut answered = 0;
        loop {
            let sent = s
                .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                .await
                .is_ok();
            let mut buf = [0u8; 1024];
            match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 && sent => answered += 1,
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(answered >= 2, "{answered}");
        let lived = started.elapsed();
        assert!(
            lived >= Duration::from_millis(400) && lived < Duration::from_secs(2),
            "{lived:?}"
        );
    }

    #[test]
    fn throttle_reports_the_first_then_once_per_period() {
        let mut t = Throttle::default();
        let t0 = Instant::now();
        assert_eq!(t.note(t0), Some(1));
        assert_eq!(t.note(t0 + Duration::from_secs(1)), None);
        assert_eq!(t.note(t0 + Duration::from_secs(2)), None);
        assert_eq!(t.note(t0 + WARN_EVERY), Some(3));
        assert_eq!(t.note(t0 + WARN_EVERY * 3), Some(1));
    }
}
