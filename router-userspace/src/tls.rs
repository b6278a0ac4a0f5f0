//! TLS for the one link that crosses hosts: `router agent` serving GPU
//! readings, and the daemon polling it. rustls with the ring provider; PEM
//! files only. The agent's certificate and key are its own; the daemon
//! trusts exactly the CA file it is given, not the system's roots, since
//! agents sit on private networks with private CAs.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{}: no certificate in it", .0.display())]
    NoCertificate(PathBuf),
    #[error("{}: {source}", path.display())]
    Rejected {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// rustls refused what `path` holds.
fn rejected(path: &Path) -> impl FnOnce(rustls::Error) -> TlsError {
    let path = path.to_owned();
    move |source| TlsError::Rejected { path, source }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The agent's side: its certificate chain and private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Pem {
        path: key.to_owned(),
        source,
    })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rejected(cert))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(rejected(key))?;
    Ok(Arc::new(config))
}

/// The daemon's side: trusts the CAs in `ca_file` and nothing else.
pub fn client_config(ca_file: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca_file)? {
        roots.add(cert).map_err(rejected(ca_file))?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rejected(ca_file))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::{Router, routing::get};

    use tokio::net::TcpListener;

    use super::*;
    use crate::{
        server::{
            bounded::{self, Limits, ServerStats},
            tls_listener::TlsListener,
        },
        telemetry::{TelemetryError, http_client},
    };

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name)
    }

    const LIMITS: Limits = Limits {
        max_connections: 4,
        header_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(2),
        connection_timeout: Duration::from_secs(5),
        max_header_bytes: 8 << 10,
        max_per_peer: None,
    };

    /// An HTTPS server on 127.0.0.1 with the fixture agent certificate.
    async fn https_server() -> std::net::SocketAddr {
        let config = server_config(&fixture("agent.pem"), &fixture("agent.key")).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let app = Router::new().route("/r", get(|| async { "{\"ok\":1}" }));
        let listener = TlsListener {
            tcp,
            acceptor: config.into(),
        };
        let stats = Arc::new(ServerStats::default());
        tokio::spawn(bounded::serve(
            "test",
            listener,
            app,
            LIMITS,
            stats,
            std::future::pending(),
        ));
        addr
    }

    async fn fetch(url: &str, ca: Option<&str>) -> Result<String, TelemetryError> {
        let tls = ca.map(|ca| client_config(&fixture(ca)).unwrap());
        let body =
            http_client::get_tls(url, None, tls.as_ref(), Duration::from_secs(2), 1 << 10).await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn an_https_agent_is_reached_only_through_its_own_ca() {
        let addr = https_server().await;
        let url = format!("https://127.0.0.1:{}/r", addr.port());
        assert_eq!(fetch(&url, Some("ca.pem")).await.unwrap(), "{\"ok\":1}");
        let localhost = format!("https://localhost:{}/r", addr.port());
        assert_eq!(
            fetch(&localhost, Some("ca.pem")).await.unwrap(),
            "{\"ok\":1}"
        );

        let e = fetch(&url, Some("other-ca.pem")).await.unwrap_err();
        assert!(
            e.to_string().contains("TLS") && e.to_string().contains("certificate"),
            "{e}"
        );
        let e = fetch(&url, None).await.unwrap_err();
        assert!(e.to_string().contains("needs a CA"), "{e}");
        // Plain HTTP to the TLS port gets no answer it could take for one.
        let plain = format!("http://127.0.0.1:{}/r", addr.port());
        assert!(fetch(&plain, None).await.is_err());
    }

    #[tokio::test]
    async fn a_stalled_handshake_holds_one_slot_not_the_server() {
        let addr = https_server().await;
        // Connected, and never a ClientHello.
        let _stalled: Vec<tokio::net::TcpStream> = connect_idle(addr, 2).await;
        let url = format!("https://127.0.0.1:{}/r", addr.port());
        assert_eq!(fetch(&url, Some("ca.pem")).await.unwrap(), "{\"ok\":1}");
    }

    async fn connect_idle(addr: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        out
    }

    #[test]
    fn bad_pem_files_are_named() {
        let e = client_config(&fixture("leaf.ext")).unwrap_err();
        assert!(e.to_string().contains("leaf.ext: no certificate"), "{e}");
        let e = server_config(&fixture("agent.pem"), &fixture("ca.pem")).unwrap_err();
        assert!(e.to_string().contains("ca.pem"), "{e}");
        let e = client_config(&fixture("missing.pem")).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
    }
}
