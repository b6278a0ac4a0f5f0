//! The control API's client: one HTTP/1 request over the Unix socket.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use super::{ErrorReply, ReloadReply};

/// Largest response the CLI accepts.
const MAX_RESPONSE: usize = 16 << 20;

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
