//! A minimal HTTP/1.1 GET for telemetry polls: plain HTTP, one request per
//! connection, a hard deadline for the whole exchange (so a slow-loris
//! endpoint cannot hold a poll), and a body size limit.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Uri, body::Bytes};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::TelemetryError;

/// GETs `url` (http only) with optional bearer token; the whole exchange,
/// connect to last body byte, must finish within `timeout`.
pub async fn get(
    url: &str,
    bearer: Option<&str>,
    timeout: Duration,
    max_body: usize,
) -> Result<Bytes, TelemetryError> {
    match tokio::time::timeout(timeout, get_inner(url, bearer, max_body)).await {
        Ok(r) => r,
        Err(_) => Err(TelemetryError::Timeout(timeout)),
    }
}

async fn get_inner(
    url: &str,
    bearer: Option<&str>,
    max_body: usize,
) -> Result<Bytes, TelemetryError> {
    let uri: Uri = url
        .parse()
        .map_err(|e| TelemetryError::Unreachable(format!("bad URL {url}: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(TelemetryError::Unreachable(format!(
            "{url}: only http:// is supported"
        )));
    }
    let host = uri
        .host()
        .ok_or_else(|| TelemetryError::Unreachable(format!("{url}: no host")))?;
    let port = uri.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| TelemetryError::Unreachable(format!("{url}: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| TelemetryError::Unreachable(format!("{url}: {e}")))?;
    let conn = tokio::spawn(conn);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut req = hyper::Request::get(path).header("host", host);
    if let Some(token) = bearer {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| TelemetryError::Unreachable(format!("{url}: {e}")))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| TelemetryError::Unreachable(format!("{url}: {e}")))?;
    let body = read_body(url, resp, max_body).await;
    conn.abort();
    body
}

/// Checks the status and reads the body within `max_body`: shared by the
/// one-shot and the pooled client, so both fail the same way.
async fn read_body(
    url: &str,
    resp: hyper::Response<hyper::body::Incoming>,
    max_body: usize,
) -> Result<Bytes, TelemetryError> {
    let status = resp.status();
    if !status.is_success() {
        return Err(TelemetryError::Status {
            status: status.as_u16(),
            url: url.to_string(),
        });
    }
    Ok(Limited::new(resp.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                TelemetryError::TooLarge {
                    url: url.to_string(),
                    limit: max_body,
                }
            } else {
                TelemetryError::Unreachable(format!("{url}: {e}"))
            }
        })?
        .to_bytes())
}

type Pool = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Empty<Bytes>,
>;

/// A client that keeps connections to one endpoint open between polls
/// (HTTP/1.1 keep-alive), so a poll costs a request, not a TCP handshake.
/// One per source: a pool belongs to the runtime that opened it.
#[derive(Clone, Debug)]
pub struct PooledClient(Pool);

impl Default for PooledClient {
    fn default() -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        Self(
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(1)
                .build(connector),
        )
    }
}

impl PooledClient {
    /// Same contract as [`get`]: http only, whole-exchange deadline, body limit.
    pub async fn get(
        &self,
        url: &str,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Bytes, TelemetryError> {
        let exchange = async {
            let uri: Uri = url
                .parse()
                .map_err(|e| TelemetryError::Unreachable(format!("bad URL {url}: {e}")))?;
            if uri.scheme_str() != Some("http") {
                return Err(TelemetryError::Unreachable(format!(
                    "{url}: only http:// is supported"
                )));
            }
            let req = hyper::Request::get(uri)
                .body(Empty::<Bytes>::new())
                .map_err(|e| TelemetryError::Unreachable(format!("{url}: {e}")))?;
            let resp = self
                .0
                .request(req)
                .await
                .map_err(|e| TelemetryError::Unreachable(format!("{url}: {e}")))?;
            read_body(url, resp, max_body).await
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(TelemetryError::Timeout(timeout)),
        }
    }
}
