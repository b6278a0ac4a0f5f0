//! A TCP listener whose connections speak TLS, for the bounded server.

use std::net::IpAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use super::bounded::Listener;

/// A TCP listener whose connections speak TLS. The handshake runs in each
/// connection's own task, within the server's header timeout, so a client
/// that stalls it holds one slot, never the accept loop.
pub struct TlsListener {
    pub tcp: TcpListener,
    pub acceptor: TlsAcceptor,
}

impl Listener for TlsListener {
    type Raw = TcpStream;
    type Io = TlsStream<TcpStream>;

    async fn accept(&self) -> std::io::Result<(TcpStream, Option<IpAddr>)> {
        Listener::accept(&self.tcp).await
    }

    fn upgrade(
        &self,
        raw: TcpStream,
    ) -> impl Future<Output = std::io::Result<Self::Io>> + Send + 'static {
        self.acceptor.accept(raw)
    }
}
