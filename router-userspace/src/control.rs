//! The control API: HTTP/JSON on a Unix socket (mode 0600), served by the
//! daemon and used by the CLI. It reads state and asks the daemon to act; it
//! never touches BPF maps itself.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path as UrlPath, Query, Request, State, rejection::QueryRejection},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::{net::UnixStream, sync::Mutex};

use crate::{bounded, daemon::DaemonState, datapath::DatapathStatus};

/// Largest response the CLI accepts.
const MAX_RESPONSE: usize = 16 << 20;

/// The control socket's server bounds (see [`bounded`]). Each CLI command
/// opens one connection for one request, `router top` one per refresh; a
/// reload, the slowest request, reads the config and rebuilds tables.
pub const LIMITS: bounded::Limits = bounded::Limits {
    max_connections: 64,
    header_timeout: Duration::from_secs(5),
    request_timeout: Duration::from_secs(30),
    connection_timeout: Duration::from_secs(60),
    max_header_bytes: 16 << 10,
    max_per_peer: None,
};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatusReply {
    pub config: String,
    pub uptime_secs: u64,
    pub last_reload: Option<ReloadReply>,
    pub datapath: DatapathStatus,
    /// Per backend: weight, reason, telemetry and health as the policy sees them.
    pub policy: Vec<crate::controller::BackendPolicyStatus>,
    /// Policy ticks on which every healthy backend of a service was saturated.
    pub all_saturated_ticks: u64,
    /// New connections sent to fallback services' backends, in total.
    pub fallback_connections: u64,
    /// Health probes that failed on a local error (the daemon out of
    /// sockets) and so changed no backend's verdict.
    #[serde(default)]
    pub health_local_errors: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReloadReply {
    pub ok: bool,
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(ErrorReply { error: msg.into() })).into_response()
}

type Shared = Arc<Mutex<DaemonState>>;

async fn status(State(state): State<Shared>) -> Response {
    let st = state.lock().await;
    match st.status() {
        Ok(reply) => Json(reply).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

async fn reload(State(state): State<Shared>) -> Response {
    let mut st = state.lock().await;
    let reply = st.reload();
    let code = if reply.ok {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    (code, Json(reply)).into_response()
}

async fn apply_override(
    state: Shared,
    service: &str,
    backend: &str,
    change: impl FnOnce(&mut crate::controller::Override),
) -> Response {
    let mut st = state.lock().await;
    match st.override_backend(service, backend, change) {
        Ok(ov) => Json(ov).into_response(),
        Err(e) if e.starts_with("no service") || e.contains("has no backend") => {
            error(StatusCode::NOT_FOUND, e)
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn set_weight(
    State(state): State<Shared>,
    UrlPath((service, backend, weight)): UrlPath<(String, String, u32)>,
) -> Response {
    apply_override(state, &service, &backend, |o| o.weight = Some(weight)).await
}

async fn auto_weight(
    State(state): State<Shared>,
    UrlPath((service, backend)): UrlPath<(String, String)>,
) -> Response {
    apply_override(state, &service, &backend, |o| o.weight = None).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainQuery {
    /// Seconds from now after which the backend's remaining flows are ended.
    pub deadline_secs: Option<u64>,
}

async fn drain(
    State(state): State<Shared>,
    UrlPath((service, backend)): UrlPath<(String, String)>,
    query: Result<Query<DrainQuery>, QueryRejection>,
) -> Response {
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let deadline = match q
        .deadline_secs
        .map(|d| crate::daemon::unix_now().checked_add(d))
    {
        Some(None) => return error(StatusCode::BAD_REQUEST, "deadline_secs is too large"),
        Some(Some(at)) => Some(at),
        None => None,
    };
    apply_override(state, &service, &backend, |o| {
        o.drain = true;
        o.drain_deadline_unix = deadline;
        o.flows_ended = None;
    })
    .await
}

async fn services(State(state): State<Shared>) -> Response {
    let st = state.lock().await;
    match st.views() {
        Ok((services, _, _)) => Json(services).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

async fn all_backends(State(state): State<Shared>) -> Response {
    let st = state.lock().await;
    match st.views() {
        Ok((_, backends, _)) => Json(backends).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

async fn service_backends(
    State(state): State<Shared>,
    UrlPath(service): UrlPath<String>,
) -> Response {
    let st = state.lock().await;
    match st.views() {
        Ok((services, backends, _)) => {
            if !services.iter().any(|s| s.name == service) {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("no service named {service:?}"),
                );
            }
            let mine: Vec<_> = backends
                .into_iter()
                .filter(|b| b.service == service)
                .collect();
            Json(mine).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

/// Largest request body accepted. The API takes no bodies (everything is in
/// the path or the query), so anything announcing more is refused before a
/// handler runs.
pub const MAX_REQUEST_BODY: u64 = 0;

async fn refuse_bodies(req: Request, next: Next) -> Response {
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .map(|v| v.to_str().ok().and_then(|s| s.parse::<u64>().ok()));
    match length {
        Some(None) => return error(StatusCode::BAD_REQUEST, "malformed Content-Length"),
        Some(Some(n)) if n > MAX_REQUEST_BODY => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body of {n} bytes refused: the control API takes no bodies"),
            );
        }
        _ if chunked => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "chunked request body refused: the control API takes no bodies",
            );
        }
        _ => {}
    }
    next.run(req).await
}

async fn undrain(
    State(state): State<Shared>,
    UrlPath((service, backend)): UrlPath<(String, String)>,
) -> Response {
    apply_override(state, &service, &backend, |o| {
        o.drain = false;
        o.drain_deadline_unix = None;
        o.flows_ended = None;
    })
    .await
}

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/reload", post(reload))
        .route("/v1/services", get(services))
        .route("/v1/backends", get(all_backends))
        .route("/v1/services/{service}/backends", get(service_backends))
        .route(
            "/v1/services/{service}/backends/{backend}/weight/{weight}",
            post(set_weight),
        )
        .route(
            "/v1/services/{service}/backends/{backend}/weight",
            axum::routing::delete(auto_weight),
        )
        .route(
            "/v1/services/{service}/backends/{backend}/drain",
            post(drain).delete(undrain),
        )
        .layer(middleware::from_fn(refuse_bodies))
        .with_state(state)
}

/// Percent-encodes a name for one path segment of the control API.
pub fn path_segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Binds the control socket: parent directory created, a stale socket
/// replaced, permissions 0600 so only root can steer traffic.
pub fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    let listener = bind_std(path)?;
    listener.set_nonblocking(true)?;
    Ok(tokio::net::UnixListener::from_std(listener)?)
}

/// `bind` without a runtime: the daemon binds before it starts any thread
/// (see `daemon::privileges`) and hands the socket to tokio later.
pub fn bind_std(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    use anyhow::Context;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{} is in use: is another router daemon running?",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(listener)
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the router daemon is not running (no control socket at {0})")]
    NotRunning(PathBuf),
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control API: {0}")]
    Http(String),
    #[error("daemon answered {status}: {message}")]
    Refused { status: u16, message: String },
}

/// One request to the daemon; returns the JSON body of a 2xx answer.
pub async fn request(socket: &Path, method: &str, path: &str) -> Result<Bytes, ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning(socket.to_path_buf())
            }
            _ => ClientError::Io {
                path: socket.to_path_buf(),
                source: e,
            },
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "router")
        .body(Empty::<Bytes>::new())
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?
        .to_bytes();
    if !status.is_success() {
        let message = serde_json::from_slice::<ErrorReply>(&body)
            .map(|e| e.error)
            .or_else(|_| serde_json::from_slice::<ReloadReply>(&body).map(|r| r.message))
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        return Err(ClientError::Refused {
            status: status.as_u16(),
            message,
        });
    }
    Ok(body)
}
