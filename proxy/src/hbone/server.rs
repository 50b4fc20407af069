//! The HBONE server side of one TLS connection: handshake, peer identity, then one task per
//! CONNECT stream. What a stream may reach is the caller's decision (`node::inbound`).

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Request, Response, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::{CONNECTION_WINDOW, MAX_CONCURRENT_STREAMS, MAX_FRAME, STREAM_WINDOW};
use crate::identity::{Identity, peer_identity};

/// A client that opens TCP and never finishes the handshake must not hold resources for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One CONNECT stream and who sent it.
pub struct InboundStream {
    pub request: Request<RecvStream>,
    pub respond: SendResponse<Bytes>,
    /// The client's SPIFFE identity, proven by its certificate.
    pub peer_identity: Identity,
    pub peer_addr: SocketAddr,
}

/// Answers a stream with an error status and ends it.
pub fn refuse(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let response = Response::builder().status(status).body(()).unwrap_or_default();
    let _ = respond.send_response(response, true);
}

/// Why a connection ended before carrying any stream.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("TLS handshake timed out")]
    Timeout,
    #[error("the client presented no SPIFFE identity")]
    NoIdentity,
    #[error("HTTP/2: {0}")]
    Http2(h2::Error),
}

/// Serves one HBONE connection: TLS with `config`, then HTTP/2; every stream goes to `handle`.
pub async fn serve_connection<F, Fut>(
    tcp: TcpStream,
    peer_addr: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    handle: F,
) -> Result<(), ServeError>
where
    F: Fn(InboundStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve_connection_until(tcp, peer_addr, config, handle, std::future::pending()).await
}

/// Like `serve_connection`; when `drain` completes, the client is told (GOAWAY) to open no more
/// streams here, and the connection ends once the streams it has are done.
pub async fn serve_connection_until<F, Fut, D>(
    tcp: TcpStream,
    peer_addr: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    handle: F,
    drain: D,
) -> Result<(), ServeError>
where
    F: Fn(InboundStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
    D: Future<Output = ()>,
{
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(tcp))
        .await
        .map_err(|_| ServeError::Timeout)?
        .map_err(ServeError::Tls)?;
    let peer_identity = peer_identity(tls.get_ref().1.peer_certificates()).ok_or(ServeError::NoIdentity)?;
    serve_streams(tls, peer_identity, peer_addr, handle, drain).await
}

/// The HTTP/2 side of an HBONE connection whose client proved `peer_identity`: every stream goes
/// to `handle`. Apart from TLS, so that the fuzz targets can feed it bytes directly.
pub async fn serve_streams<I, F, Fut, D>(
    io: I,
    peer_identity: Identity,
    peer_addr: SocketAddr,
    handle: F,
    drain: D,
) -> Result<(), ServeError>
where
    I: AsyncRead + AsyncWrite + Unpin,
    F: Fn(InboundStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
    D: Future<Output = ()>,
{
    let mut connection = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .handshake::<_, Bytes>(io),
    )
    .await
    .map_err(|_| ServeError::Timeout)?
    .map_err(ServeError::Http2)?;
    // Accepting also drives the connection's I/O; streams run in their own tasks.
    tokio::pin!(drain);
    let mut draining = false;
    loop {
        let next = tokio::select! {
            next = connection.accept() => next,
            () = &mut drain, if !draining => {
                draining = true;
                connection.graceful_shutdown();
                continue;
            }
        };
        let Some(next) = next else { break };
        match next {
            Ok((request, respond)) => {
                tokio::spawn(handle(InboundStream {
                    request,
                    respond,
                    peer_identity: peer_identity.clone(),
                    peer_addr,
                }));
            }
            Err(e) => {
                // A protocol error ends this connection only, never the process.
                debug!(%peer_addr, "HBONE connection closed: {e}");
                return Err(ServeError::Http2(e));
            }
        }
    }
    Ok(())
}
