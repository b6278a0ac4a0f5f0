//! The control API server: HTTP/JSON on a Unix socket (mode 0600), used by
//! the CLI. It is handed a narrow [`Control`] handle: it asks the daemon to
//! report or act, and never sees the daemon's state or touches BPF maps.

use std::{future::Future, os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Path as UrlPath, Query, Request, State, rejection::QueryRejection},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};

use crate::{
    api::{
        DrainQuery, ErrorReply, Override, OverrideChange, OverrideError, ReloadReply, StatusReply,
        views::{BackendView, PoolView, ServiceView},
    },
    pools::PoolError,
    server::bounded,
};

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

/// What the control API may ask of the daemon.
pub trait Control: Send + Sync + 'static {
    fn status(&self) -> impl Future<Output = anyhow::Result<StatusReply>> + Send;
    /// Re-reads the config; a refused one changes nothing.
    fn reload(&self) -> impl Future<Output = ReloadReply> + Send;
    fn views(
        &self,
    ) -> impl Future<Output = anyhow::Result<(Vec<ServiceView>, Vec<BackendView>)>> + Send;
    /// Applies an operator's change at once; refused whole or made whole.
    fn change_override(
        &self,
        service: String,
        backend: String,
        change: OverrideChange,
    ) -> impl Future<Output = Result<Override, OverrideError>> + Send;
    fn pools(&self) -> impl Future<Output = anyhow::Result<Vec<PoolView>>> + Send;
    /// Sets a pool's share (the others keep their proportions); returns
    /// every pool's share after it. Refused whole or made whole.
    fn set_pool_share(
        &self,
        service: String,
        pool: String,
        share: u32,
    ) -> impl Future<Output = Result<Vec<(String, u32)>, OverrideError>> + Send;
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(ErrorReply { error: msg.into() })).into_response()
}

fn internal(e: anyhow::Error) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
}

impl IntoResponse for OverrideError {
    fn into_response(self) -> Response {
        let code = match &self {
            OverrideError::NoService(_) | OverrideError::NoBackend { .. } => StatusCode::NOT_FOUND,
            OverrideError::DeadlineTooLarge(_) => StatusCode::BAD_REQUEST,
            OverrideError::NotRunning => StatusCode::SERVICE_UNAVAILABLE,
            OverrideError::Datapath(_) => StatusCode::INTERNAL_SERVER_ERROR,
            OverrideError::Pool(PoolError::Share(_)) => StatusCode::BAD_REQUEST,
            OverrideError::Pool(_) => StatusCode::NOT_FOUND,
        };
        error(code, format!("{self:#}"))
    }
}

async fn status<C: Control>(State(c): State<Arc<C>>) -> Response {
    match c.status().await {
        Ok(reply) => Json(reply).into_response(),
        Err(e) => internal(e),
    }
}

async fn reload<C: Control>(State(c): State<Arc<C>>) -> Response {
    let reply = c.reload().await;
    let code = if reply.ok {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    (code, Json(reply)).into_response()
}

async fn apply<C: Control>(
    c: Arc<C>,
    (service, backend): (String, String),
    change: OverrideChange,
) -> Response {
    match c.change_override(service, backend, change).await {
        Ok(ov) => Json(ov).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn set_weight<C: Control>(
    State(c): State<Arc<C>>,
    UrlPath((service, backend, weight)): UrlPath<(String, String, u32)>,
) -> Response {
    apply(c, (service, backend), OverrideChange::Weight(weight)).await
}

async fn auto_weight<C: Control>(
    State(c): State<Arc<C>>,
    UrlPath(names): UrlPath<(String, String)>,
) -> Response {
    apply(c, names, OverrideChange::AutoWeight).await
}

async fn drain<C: Control>(
    State(c): State<Arc<C>>,
    UrlPath(names): UrlPath<(String, String)>,
    query: Result<Query<DrainQuery>, QueryRejection>,
) -> Response {
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    apply(
        c,
        names,
        OverrideChange::Drain {
            deadline_secs: q.deadline_secs,
        },
    )
    .await
}

async fn undrain<C: Control>(
    State(c): State<Arc<C>>,
    UrlPath(names): UrlPath<(String, String)>,
) -> Response {
    apply(c, names, OverrideChange::Undrain).await
}

async fn services<C: Control>(State(c): State<Arc<C>>) -> Response {
    match c.views().await {
        Ok((services, _)) => Json(services).into_response(),
        Err(e) => internal(e),
    }
}

async fn all_backends<C: Control>(State(c): State<Arc<C>>) -> Response {
    match c.views().await {
        Ok((_, backends)) => Json(backends).into_response(),
        Err(e) => internal(e),
    }
}

async fn service_backends<C: Control>(
    State(c): State<Arc<C>>,
    UrlPath(service): UrlPath<String>,
) -> Response {
    match c.views().await {
        Ok((services, backends)) => {
            if !services.iter().any(|s| s.name == service) {
                return OverrideError::NoService(service).into_response();
            }
            let mine: Vec<_> = backends
                .into_iter()
                .filter(|b| b.service == service)
                .collect();
            Json(mine).into_response()
        }
        Err(e) => internal(e),
    }
}

async fn pools<C: Control>(State(c): State<Arc<C>>) -> Response {
    match c.pools().await {
        Ok(pools) => Json(pools).into_response(),
        Err(e) => internal(e),
    }
}

async fn service_pools<C: Control>(
    State(c): State<Arc<C>>,
    UrlPath(service): UrlPath<String>,
) -> Response {
    match c.pools().await {
        Ok(pools) => {
            let mine: Vec<PoolView> = pools.into_iter().filter(|p| p.service == service).collect();
            if mine.is_empty() {
                // Tell "no such service" from "no pools" as `pool set` does.
                return match c.views().await {
                    Ok((services, _)) if services.iter().any(|s| s.name == service) => {
                        OverrideError::Pool(PoolError::NoPools(service)).into_response()
                    }
                    Ok(_) => OverrideError::NoService(service).into_response(),
                    Err(e) => internal(e),
                };
            }
            Json(mine).into_response()
        }
        Err(e) => internal(e),
    }
}

async fn set_pool_share<C: Control>(
    State(c): State<Arc<C>>,
    UrlPath((service, pool, share)): UrlPath<(String, String, u32)>,
) -> Response {
    match c.set_pool_share(service, pool, share).await {
        Ok(shares) => Json(shares).into_response(),
        Err(e) => e.into_response(),
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

pub fn router<C: Control>(control: Arc<C>) -> Router {
    Router::new()
        .route("/v1/status", get(status::<C>))
        .route("/v1/reload", post(reload::<C>))
        .route("/v1/services", get(services::<C>))
        .route("/v1/backends", get(all_backends::<C>))
        .route(
            "/v1/services/{service}/backends",
            get(service_backends::<C>),
        )
        .route(
            "/v1/services/{service}/backends/{backend}/weight/{weight}",
            post(set_weight::<C>),
        )
        .route(
            "/v1/services/{service}/backends/{backend}/weight",
            axum::routing::delete(auto_weight::<C>),
        )
        .route(
            "/v1/services/{service}/backends/{backend}/drain",
            post(drain::<C>).delete(undrain::<C>),
        )
        .route("/v1/pools", get(pools::<C>))
        .route("/v1/services/{service}/pools", get(service_pools::<C>))
        .route(
            "/v1/services/{service}/pools/{pool}/share/{share}",
            post(set_pool_share::<C>),
        )
        .layer(middleware::from_fn(refuse_bodies))
        .with_state(control)
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::api::{
        OverrideChange,
        client::{ClientError, request},
    };

    /// A control handle with one service `s` and one backend `b`, that
    /// records the changes it was asked for.
    #[derive(Default)]
    struct Fake {
        asked: Mutex<Vec<OverrideChange>>,
        stopped: bool,
    }

    impl Control for Fake {
        async fn status(&self) -> anyhow::Result<StatusReply> {
            anyhow::bail!("no datapath in this test")
        }

        async fn reload(&self) -> ReloadReply {
            ReloadReply {
                ok: false,
                message: "config: line 3: unknown key".into(),
            }
        }

        async fn views(&self) -> anyhow::Result<(Vec<ServiceView>, Vec<BackendView>)> {
            Ok((Vec::new(), Vec::new()))
        }

        async fn change_override(
            &self,
            service: String,
            backend: String,
            change: OverrideChange,
        ) -> Result<Override, OverrideError> {
            if service != "s" {
                return Err(OverrideError::NoService(service));
            }
            if backend != "b" {
                return Err(OverrideError::NoBackend { service, backend });
            }
            let mut o = Override::default();
            change.apply(&mut o, u64::MAX - 10)?;
            if self.stopped {
                return Err(OverrideError::NotRunning);
            }
            self.asked.lock().unwrap().push(change);
            Ok(o)
        }

        async fn pools(&self) -> anyhow::Result<Vec<PoolView>> {
            Ok(Vec::new())
        }

        async fn set_pool_share(
            &self,
            service: String,
            pool: String,
            share: u32,
        ) -> Result<Vec<(String, u32)>, OverrideError> {
            if service != "s" {
                return Err(OverrideError::NoService(service));
            }
            if pool != "canary" {
                return Err(PoolError::NoPool {
                    service,
                    pool,
                    known: "stable, canary".into(),
                }
                .into());
            }
            if share > 100 {
                return Err(PoolError::Share(crate::pools::ShareError::AboveHundred(share)).into());
            }
            Ok(vec![
                ("stable".into(), 100 - share),
                ("canary".into(), share),
            ])
        }
    }

    async fn serve(fake: Fake) -> (std::path::PathBuf, Arc<Fake>) {
        let dir = std::env::temp_dir().join(format!(
            "router-control-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let path = dir.join("sock");
        let listener = bind(&path).unwrap();
        let fake = Arc::new(fake);
        let app = router(Arc::clone(&fake));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (path, fake)
    }

    fn rand_suffix() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    }

    fn refused(r: Result<hyper::body::Bytes, ClientError>) -> (u16, String) {
        match r {
            Err(ClientError::Refused { status, message }) => (status, message),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn each_refusal_gets_the_status_of_its_kind_and_changes_nothing() {
        let (sock, fake) = serve(Fake::default()).await;
        let post = |path: &'static str| request(&sock, "POST", path);
        assert_eq!(
            refused(post("/v1/services/x/backends/b/weight/5").await),
            (404, "no service named \"x\"".into())
        );
        assert_eq!(
            refused(post("/v1/services/s/backends/y/drain").await),
            (404, "service \"s\" has no backend named \"y\"".into())
        );
        // now + deadline overflows: refused before anything is changed.
        assert_eq!(
            refused(post("/v1/services/s/backends/b/drain?deadline_secs=20").await),
            (400, "deadline_secs 20 is too large".into())
        );
        assert_eq!(refused(post("/v1/reload").await).0, 400);
        assert_eq!(
            refused(post("/v1/services/s/pools/canary/share/101").await),
            (400, "share 101 is above 100 percent".into())
        );
        assert_eq!(
            refused(post("/v1/services/s/pools/blue/share/5").await),
            (
                404,
                "service \"s\" has no pool named \"blue\" (its pools: stable, canary)".into()
            )
        );
        // Not a number: refused by the route before the daemon is asked.
        assert_eq!(
            refused(post("/v1/services/s/pools/canary/share/-5").await).0,
            400
        );
        let status = refused(request(&sock, "GET", "/v1/status").await);
        assert_eq!(status, (500, "no datapath in this test".into()));
        assert!(fake.asked.lock().unwrap().is_empty());

        let body = post("/v1/services/s/backends/b/drain?deadline_secs=5")
            .await
            .unwrap();
        let o: Override = serde_json::from_slice(&body).unwrap();
        assert!(o.drain && o.drain_deadline_unix == Some(u64::MAX - 5));
        assert_eq!(
            *fake.asked.lock().unwrap(),
            [OverrideChange::Drain {
                deadline_secs: Some(5)
            }]
        );
        let _ = std::fs::remove_dir_all(sock.parent().unwrap());
    }

    #[tokio::test]
    async fn a_stopped_control_loop_is_unavailable_not_an_internal_error() {
        let (sock, _) = serve(Fake {
            stopped: true,
            ..Fake::default()
        })
        .await;
        let r = request(&sock, "POST", "/v1/services/s/backends/b/weight/3").await;
        assert_eq!(refused(r), (503, "the controller is not running".into()));
        let _ = std::fs::remove_dir_all(sock.parent().unwrap());
    }
}
