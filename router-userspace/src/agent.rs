//! `router agent`: serves this host's NVML GPU telemetry as HTTP/JSON over
//! TCP to remote router daemons. It owns the agent's API, its bearer-token
//! check and its limits (connections, header size and time, request time);
//! the daemon side is `telemetry::agent_source`.
//!
//! API (every request needs `Authorization: Bearer <token>`):
//! * `GET /v1/gpus/{index}` → a validated [`Reading`] as JSON
//! * `GET /v1/gpus/uuid/{uuid}` → the same, by GPU UUID
//!
//! Errors are `{"error": "..."}`: 401 for a missing or wrong token, 400 for
//! a malformed index or UUID, 404 for a GPU that is not on this host, 503 when NVML
//! fails (the message names the GPU), 504 when NVML does not answer in time.

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Path, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;

use crate::{
    api::ErrorReply,
    server::{bounded, tls_listener::TlsListener},
    telemetry::{
        DeviceSelector, Reading,
        nvml::{NvmlLibrary, ReadFailure},
    },
};

/// Longest an NVML read may take before the request gives up (504). The
/// blocking read itself cannot be cancelled and finishes in the background.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The agent's server bounds (see [`bounded`]): a poll is one short GET, so
/// a client never needs a connection for long, and 256 connections serve
/// many more router daemons than poll one GPU host. A daemon polls each GPU
/// of the host on its own connection, so 16 a peer covers a host of 8 GPUs
/// twice over, and 16 peers are still served while one holds its limit.
pub const LIMITS: bounded::Limits = bounded::Limits {
    max_connections: 256,
    header_timeout: Duration::from_secs(5),
    // Above REQUEST_TIMEOUT, so an NVML read that hangs gets its 504.
    request_timeout: Duration::from_secs(10),
    connection_timeout: Duration::from_secs(30),
    max_header_bytes: 16 << 10,
    max_per_peer: Some(16),
};
/// GETs carry no body; this only caps a handler that ever reads one.
const MAX_BODY_BYTES: usize = 1 << 10;

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub listen: SocketAddr,
    pub token: String,
    /// NVML library to load; the system's `libnvidia-ml.so.1` when `None`.
    pub library: Option<PathBuf>,
    /// Serve HTTPS with this certificate and key (see `tls`); plain HTTP,
    /// token in clear, when `None`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

struct Shared {
    nvml: Arc<NvmlLibrary>,
    token: String,
}

/// A bound agent, not yet serving: NVML is loaded and the port is open.
pub struct Agent {
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    local_addr: SocketAddr,
    app: Router,
}

/// Loads NVML and binds `opts.listen`; fails with a clear message if either
/// is impossible or the token is empty.
pub async fn bind(opts: AgentOptions) -> anyhow::Result<Agent> {
    if opts.token.trim().is_empty() {
        anyhow::bail!("the agent token is empty; every request must be authenticated");
    }
    let library = opts.library.clone();
    let nvml = tokio::task::spawn_blocking(move || NvmlLibrary::open(library.as_deref()))
        .await
        .context("loading NVML")??;
    let listener = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding the agent to {}", opts.listen))?;
    let local_addr = listener.local_addr().context("agent listen address")?;
    let shared = Arc::new(Shared {
        nvml: Arc::new(nvml),
        token: opts.token,
    });
    Ok(Agent {
        listener,
        tls: opts.tls,
        local_addr,
        app: router(shared),
    })
}

/// [`bind`], then [`Agent::serve`] until `shutdown` completes.
pub async fn serve(
    opts: AgentOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    bind(opts).await?.serve(shutdown).await
}

impl Agent {
    /// The bound address (the real port when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes; open connections are then dropped
    /// (a poll is one short GET, so nothing worth draining is lost).
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let stats = Arc::new(bounded::ServerStats::default());
        match self.tls {
            Some(config) => {
                let tls = TlsListener {
                    tcp: self.listener,
                    acceptor: config.into(),
                };
                bounded::serve("agent", tls, self.app, LIMITS, stats, shutdown).await;
            }
            None => {
                bounded::serve("agent", self.listener, self.app, LIMITS, stats, shutdown).await;
            }
        }
        Ok(())
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/gpus/{index}", get(by_index))
        .route("/v1/gpus/uuid/{uuid}", get(by_uuid))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Outermost, so nothing (not even a 404) answers without the token.
        .layer(middleware::from_fn_with_state(Arc::clone(&shared), auth))
        .with_state(shared)
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(ErrorReply { error: msg.into() })).into_response()
}

async fn auth(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer_token(v.as_bytes()));
    match presented {
        Some(t) if constant_time_eq(t, shared.token.as_bytes()) => next.run(req).await,
        _ => {
            let mut resp = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            resp
        }
    }
}

/// The token of `Bearer <token>`; the scheme is case-insensitive (RFC 7235).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

/// Equality without an early exit, so response timing does not reveal how
/// much of a guessed token was right. Only the length can leak.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (x, y) in a.iter().zip(b) {
        diff |= usize::from(x ^ y);
    }
    // Keeps the optimizer from turning the loop back into a short-circuit.
    std::hint::black_box(diff) == 0
}

async fn by_index(State(shared): State<Arc<Shared>>, Path(index): Path<String>) -> Response {
    match index.parse::<u32>() {
        Ok(i) => read(&shared, DeviceSelector::Index(i)).await,
        Err(_) => error(
            StatusCode::BAD_REQUEST,
            format!("GPU index {index:?} is not a number"),
        ),
    }
}

async fn by_uuid(State(shared): State<Arc<Shared>>, Path(uuid): Path<String>) -> Response {
    // NVML UUIDs are "GPU-" and hex; refusing anything else here keeps NUL
    // bytes and oddities away from the C API.
    if uuid.len() > 128 || !uuid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return error(
            StatusCode::BAD_REQUEST,
            "a GPU UUID has only letters, digits and '-'",
        );
    }
    read(&shared, DeviceSelector::Uuid(uuid)).await
}

async fn read(shared: &Shared, device: DeviceSelector) -> Response {
    let nvml = Arc::clone(&shared.nvml);
    let label = device.to_string();
    let task = tokio::task::spawn_blocking(move || nvml.read_classified(&device));
    match tokio::time::timeout(REQUEST_TIMEOUT, task).await {
        Ok(Ok(Ok(reading))) => reply(reading),
        Ok(Ok(Err(ReadFailure::NoSuchGpu(e)))) => error(StatusCode::NOT_FOUND, e.to_string()),
        Ok(Ok(Err(ReadFailure::Failed(e)))) => {
            tracing::warn!("agent: {e}");
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        Ok(Err(join)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{label}: NVML read failed: {join}"),
        ),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("{label}: NVML did not answer within {REQUEST_TIMEOUT:?}"),
        ),
    }
}

fn reply(reading: Reading) -> Response {
    // NvmlLibrary::read validated it already; checking again here keeps the
    // promise local: the agent never serves a reading that fails validation.
    match reading.validate() {
        Ok(()) => Json(reading).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
        assert!(!constant_time_eq(b"", b"s3cret"));
        // Lengths differing by a multiple of 256 must not compare equal.
        assert!(!constant_time_eq(&[0u8; 256], b""));
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer"), None);
        assert_eq!(bearer_token(b""), None);
    }
}
