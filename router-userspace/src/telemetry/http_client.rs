//! A minimal HTTP/1.1 GET for telemetry polls: plain HTTP (or HTTPS to an
//! agent), one request per connection, a hard deadline for the whole
//! exchange (so a slow-loris endpoint cannot hold a poll), and a body size
//! limit.

use std::{sync::Arc, time::Duration};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Uri, body::Bytes};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::TelemetryError;

/// Whether a failed connect is this host's doing rather than the peer's:
/// the process or system is out of file descriptors (`EMFILE`, `ENFILE`),
/// socket buffers or memory (`ENOBUFS`, `ENOMEM`), or local ports
/// (`EADDRNOTAVAIL`). A refused, reset, unreachable or timed-out connect is
/// the peer's (or the network's) and is not local.
pub fn is_local_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// GETs `url` (http only) with optional bearer token; the whole exchange,
/// connect to last body byte, must finish within `timeout`.
pub async fn get(
    url: &str,
    bearer: Option<&str>,
    timeout: Duration,
    max_body: usize,
) -> Result<Bytes, TelemetryError> {
    get_tls(url, bearer, None, timeout, max_body).await
}

/// [`get`], also for `https://` URLs when `tls` is given: the server's
/// certificate must chain to its roots and name the URL's host.
pub async fn get_tls(
    url: &str,
    bearer: Option<&str>,
    tls: Option<&Arc<rustls::ClientConfig>>,
    timeout: Duration,
    max_body: usize,
) -> Result<Bytes, TelemetryError> {
    match tokio::time::timeout(timeout, get_inner(url, bearer, tls, max_body)).await {
        Ok(r) => r,
        Err(_) => Err(TelemetryError::Timeout(timeout)),
    }
}

async fn get_inner(
    url: &str,
    bearer: Option<&str>,
    tls: Option<&Arc<rustls::ClientConfig>>,
    max_body: usize,
) -> Result<Bytes, TelemetryError> {
    let uri: Uri = url
        .parse()
        .map_err(|e| TelemetryError::Unreachable(format!("bad URL {url}: {e}")))?;
    let tls = match (uri.scheme_str(), tls) {
        (Some("http"), _) => None,
        (Some("https"), Some(tls)) => Some(tls),
        (Some("https"), None) => {
            return Err(TelemetryError::Unreachable(format!(
                "{url}: https:// needs a CA to check the server against"
            )));
        }
        _ => {
            return Err(TelemetryError::Unreachable(format!(
                "{url}: only http:// and https:// are supported"
            )));
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| TelemetryError::Unreachable(format!("{url}: no host")))?;
    let port = uri
        .port_u16()
        .unwrap_or(if tls.is_some() { 443 } else { 80 });
    let stream = TcpStream::connect((host, port)).await.map_err(|e| {
        if is_local_error(&e) {
            TelemetryError::Local(format!("{url}: {e}"))
        } else {
            TelemetryError::Unreachable(format!("{url}: {e}"))
        }
    })?;
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    match tls {
        None => exchange(url, host, path, stream, bearer, max_body).await,
        Some(config) => {
            // An IP literal (`[::1]` loses its brackets) or a DNS name.
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                .map_err(|e| TelemetryError::Unreachable(format!("{url}: {e}")))?;
            let stream = TlsConnector::from(Arc::clone(config))
                .connect(name, stream)
                .await
                .map_err(|e| TelemetryError::Unreachable(format!("{url}: TLS: {e}")))?;
            exchange(url, host, path, stream, bearer, max_body).await
        }
    }
}

/// One request and its answer on an open connection.
async fn exchange<T>(
    url: &str,
    host: &str,
    path: &str,
    io: T,
    bearer: Option<&str>,
    max_body: usize,
) -> Result<Bytes, TelemetryError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| TelemetryError::Unreachable(format!("{url}: {e}")))?;
    let conn = tokio::spawn(conn);
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
            detail: error_detail(resp.into_body()).await,
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

/// Largest error body read for its message; an agent's is a line or two.
const MAX_ERROR_BODY: usize = 4 << 10;
/// Longest message kept from an error body (it ends up in status and logs).
const MAX_ERROR_DETAIL: usize = 240;

/// The message of a `{"error": "..."}` body (what `router agent` and the
/// control API send), on one line and bounded; `None` for any other body,
/// such as a proxy's HTML page, which would only be noise in a status line.
async fn error_detail(body: hyper::body::Incoming) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error: String,
    }
    let bytes = Limited::new(body, MAX_ERROR_BODY)
        .collect()
        .await
        .ok()?
        .to_bytes();
    let message = serde_json::from_slice::<ErrorBody>(&bytes).ok()?.error;
    let one_line: String = message
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(MAX_ERROR_DETAIL)
        .collect();
    (!one_line.is_empty()).then_some(one_line)
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
            let resp = self.0.request(req).await.map_err(|e| {
                // The connect error, if that is what failed, is in the chain.
                let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
                while let Some(c) = cause {
                    if c.downcast_ref::<std::io::Error>()
                        .is_some_and(is_local_error)
                    {
                        return TelemetryError::Local(format!("{url}: {c}"));
                    }
                    cause = c.source();
                }
                TelemetryError::Unreachable(format!("{url}: {e}"))
            })?;
            read_body(url, resp, max_body).await
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(TelemetryError::Timeout(timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// One endpoint that answers every request with `status` and `body`.
    async fn answering(status: &'static str, body: String) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let reply = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}/v1/gpus/0")
    }

    async fn both_clients(url: &str) -> [TelemetryError; 2] {
        let t = Duration::from_secs(5);
        [
            get(url, Some("t"), t, 1024).await.unwrap_err(),
            PooledClient::default().get(url, t, 1024).await.unwrap_err(),
        ]
    }

    #[test]
    fn local_errors_are_the_hosts_shortages_only() {
        use std::io::{Error, ErrorKind};
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EADDRNOTAVAIL,
        ] {
            assert!(is_local_error(&Error::from_raw_os_error(errno)), "{errno}");
        }
        for errno in [
            libc::ECONNREFUSED,
            libc::ECONNRESET,
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
        ] {
            assert!(!is_local_error(&Error::from_raw_os_error(errno)), "{errno}");
        }
        assert!(!is_local_error(&Error::from(ErrorKind::TimedOut)));
    }

    #[tokio::test]
    async fn an_error_status_keeps_the_endpoints_own_message() {
        let url = answering(
            "503 Service Unavailable",
            r#"{"error":"NVML: GPU 0 (GPU-1): utilization: GPU is lost"}"#.into(),
        )
        .await;
        for err in both_clients(&url).await {
            assert_eq!(
                err.to_string(),
                format!("HTTP 503 from {url}: NVML: GPU 0 (GPU-1): utilization: GPU is lost")
            );
        }
    }

    #[tokio::test]
    async fn other_error_bodies_are_left_out() {
        let url = answering(
            "502 Bad Gateway",
            "<html><body>Bad Gateway</body></html>".into(),
        )
        .await;
        for err in both_clients(&url).await {
            assert_eq!(
                err,
                TelemetryError::Status {
                    status: 502,
                    url: url.clone(),
                    detail: None
                }
            );
            assert_eq!(err.to_string(), format!("HTTP 502 from {url}"));
        }
    }

    #[tokio::test]
    async fn an_error_message_is_one_bounded_line() {
        let long = format!("first\nsecond\u{7}{}", "x".repeat(1000));
        let url = answering(
            "500 Internal Server Error",
            serde_json::json!({ "error": long }).to_string(),
        )
        .await;
        for err in both_clients(&url).await {
            let TelemetryError::Status {
                detail: Some(d), ..
            } = err
            else {
                panic!("{err:?}");
            };
            assert!(d.starts_with("first second?xxx"), "{d}");
            assert_eq!(d.chars().count(), MAX_ERROR_DETAIL);
        }
    }
}
