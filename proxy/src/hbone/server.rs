//! The HBONE server side of one TLS connection: handshake, peer identity, then one task per
//! CONNECT stream. What a stream may reach is the caller's decision (`node::inbound`).

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Request, Response, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::{
    CONNECTION_WINDOW, LOCAL_ERROR_RESETS, MAX_CONCURRENT_STREAMS, MAX_FRAME, REMEMBERED_RESETS, STREAM_WINDOW,
    socket::Socket,
};
use crate::{
    admission::Pass,
    identity::{Identity, peer_identity},
};

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

/// Handshakes that failed, by reason, for `strait_hbone_handshake_failures_total`: garbage,
/// scanners and floods end here, so they are counted rather than logged one line each.
#[derive(Debug, Default)]
pub struct HandshakeFailures {
    tls: AtomicU64,
    timeout: AtomicU64,
    no_identity: AtomicU64,
    /// When a failure was last logged: one warning per `LOG_EVERY` says what is going on (a
    /// peer with a certificate from another root is worth knowing about), a flood adds nothing.
    last_warning: Mutex<Option<Instant>>,
}

const LOG_EVERY: Duration = Duration::from_secs(10);

/// This process's handshake failures (every HBONE listener of the process counts here).
pub static HANDSHAKE_FAILURES: HandshakeFailures = HandshakeFailures {
    tls: AtomicU64::new(0),
    timeout: AtomicU64::new(0),
    no_identity: AtomicU64::new(0),
    last_warning: Mutex::new(None),
};

impl HandshakeFailures {
    fn count(&self, error: &ServeError, peer: SocketAddr) {
        let counter = match error {
            ServeError::Tls(_) => &self.tls,
            ServeError::Timeout => &self.timeout,
            ServeError::NoIdentity => &self.no_identity,
            ServeError::Http2(_) => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            *last = Some(Instant::now());
            warn!(
                %peer,
                "HBONE handshake failed: {error} (counted in strait_hbone_handshake_failures_total; \
                 the next failures are not logged for {}s)",
                LOG_EVERY.as_secs()
            );
        }
    }

    /// `(reason, count)` pairs.
    pub fn read(&self) -> [(&'static str, u64); 3] {
        [
            ("tls", self.tls.load(Ordering::Relaxed)),
            ("timeout", self.timeout.load(Ordering::Relaxed)),
            ("no_identity", self.no_identity.load(Ordering::Relaxed)),
        ]
    }
}

/// `strait_hbone_handshake_failures_total{reason}`, read at every scrape.
pub fn handshake_failure_counters() -> crate::telemetry::ScrapedCounters {
    crate::telemetry::ScrapedCounters::by_label(
        "strait_hbone_handshake_failures",
        "HBONE connections that ended before the peer proved an identity, by reason",
        "reason",
        || HANDSHAKE_FAILURES.read(),
    )
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

impl ServeError {
    /// Whether the peer never got past the handshake (it proved no identity): such failures are
    /// counted in `HANDSHAKE_FAILURES`, not written as access lines.
    pub fn before_identity(&self) -> bool {
        !matches!(self, ServeError::Http2(_))
    }
}

/// Serves one HBONE connection: TLS with `config`, then HTTP/2; every stream goes to `handle`.
/// `admission` (the connection's place among unauthenticated ones, OPS-4) is given back once
/// the peer has proved its identity. When `drain` completes, the client is told (GOAWAY) to open
/// no more streams here, and the connection ends once the streams it has are done.
pub async fn serve_connection_until<F, Fut, D>(
    tcp: TcpStream,
    peer_addr: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    admission: Option<Pass>,
    handle: F,
    drain: D,
) -> Result<(), ServeError>
where
    F: Fn(InboundStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
    D: Future<Output = ()>,
{
    let (tls, peer_identity) = match handshake(tcp, config).await {
        Ok(done) => done,
        Err(e) => {
            HANDSHAKE_FAILURES.count(&e, peer_addr);
            return Err(e);
        }
    };
    drop(admission);
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
            .max_concurrent_reset_streams(REMEMBERED_RESETS)
            .max_local_error_reset_streams(LOCAL_ERROR_RESETS)
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

async fn handshake(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
) -> Result<(tokio_rustls::server::TlsStream<Socket>, Identity), ServeError> {
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(Socket::new(tcp)))
        .await
        .map_err(|_| ServeError::Timeout)?
        .map_err(ServeError::Tls)?;
    let identity = peer_identity(tls.get_ref().1.peer_certificates()).ok_or(ServeError::NoIdentity)?;
    Ok((tls, identity))
}
