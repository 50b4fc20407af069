//! The HTTP engine shared by waypoints and gateways (L7-1 to L7-11): one request's journey
//! from a client connection to an endpoint, under the VirtualService and DestinationRule in
//! force, with L7 authorization, faults, retries, timeouts, mirrors and request telemetry.
//!
//! `serve_http` runs an HTTP/1.1 or HTTP/2 server on any byte stream (an HBONE stream at the
//! waypoint) and hands each request to `router::handle`, which decides (pure functions in
//! `matching`, `lb`, `retry`, `outlier`) and sends (`forward`, `pool`, `upstream`).

pub mod authn;
pub mod body;
pub mod flags;
mod forward;
pub mod headers;
pub mod jwt;
pub mod lb;
pub mod matching;
pub mod outlier;
pub mod pool;
pub mod retry;
mod router;
pub mod upstream;

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

pub use forward::choose_weighted;
pub use router::handle;

use crate::{
    identity::Identity,
    model::{AppProtocol, ModelHandle, Service, WaypointName, Workload},
    telemetry::{Reporter, RequestTelemetry},
};

/// What every request handled by one proxy shares.
pub struct L7Context {
    pub model: ModelHandle,
    pub upstreams: upstream::Upstreams,
    pub telemetry: RequestTelemetry,
    pub reporter: Reporter,
    /// The gateway requests arrive through, as `gateways` lists name it: `mesh` at a waypoint.
    pub gateway: String,
    /// The waypoint this engine runs as: AuthorizationPolicies bound to it apply.
    pub waypoint: WaypointName,
    /// RequestAuthentications in force, with their keys.
    pub authn: Arc<authn::Authn>,
    /// Set on responses that carry no `server` header (L7-9); `None` leaves them alone.
    pub server_header: Option<HeaderValue>,
    /// Turns true when the proxy drains: connections finish their request and close.
    pub drain: tokio::sync::watch::Receiver<bool>,
}

/// Resolves once `drain` turns true (never, if its sender is gone without draining).
pub async fn drained(mut drain: tokio::sync::watch::Receiver<bool>) {
    if drain.wait_for(|d| *d).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Who sent requests on one downstream connection, and where to: known from the connection
/// before any request is read.
#[derive(Debug)]
pub struct Downstream {
    /// The original client: its IP as proven by the peer (HBONE `forwarded`, checked against
    /// the peer's identity), and the connection's port.
    pub client_addr: SocketAddr,
    /// The client's verified SPIFFE identity.
    pub identity: Option<Identity>,
    pub source_workload: Option<Arc<Workload>>,
    pub target: Target,
    /// What the destination port declares.
    pub protocol: AppProtocol,
}

/// The destination a client addressed.
#[derive(Debug, Clone)]
pub enum Target {
    /// A service's VIP and port.
    Service { service: Arc<Service>, port: u16 },
    /// A pod's IP and port.
    Workload { workload: Arc<Workload>, port: u16 },
}

impl Target {
    /// The address the client connected to.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Target::Service { service, port } => {
                SocketAddr::new(service.vip.unwrap_or(IpAddr::from([0, 0, 0, 0])), *port)
            }
            Target::Workload { workload, port } => SocketAddr::new(workload.ip, *port),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Target::Service { port, .. } | Target::Workload { port, .. } => *port,
        }
    }

    pub fn service(&self) -> Option<&Arc<Service>> {
        match self {
            Target::Service { service, .. } => Some(service),
            Target::Workload { .. } => None,
        }
    }
}

/// The HTTP version a downstream connection speaks, detected or declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    /// HTTP/2 with prior knowledge (h2c), as gRPC clients and `curl --http2-prior-knowledge`.
    Http2,
}

/// Serves HTTP on `io` until the client closes it; every request goes to `handle`.
pub async fn serve_http<I>(ctx: Arc<L7Context>, down: Arc<Downstream>, io: I, version: HttpVersion)
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let ctx_drain = ctx.drain.clone();
    let service = service_fn(move |request| {
        let (ctx, down) = (ctx.clone(), down.clone());
        async move { Ok::<_, Infallible>(handle(ctx, down, request).await) }
    });
    let io = TokioIo::new(io);
    let drain = drained(ctx_drain);
    tokio::pin!(drain);
    let result = match version {
        HttpVersion::Http1 => {
            // Answers are small and frequent: do not hold the head back for the body.
            let connection =
                hyper::server::conn::http1::Builder::new().writev(true).serve_connection(io, service).with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => result,
                () = &mut drain => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            }
        }
        HttpVersion::Http2 => {
            let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(pool_windows::STREAM)
                .initial_connection_window_size(pool_windows::CONNECTION)
                .serve_connection(io, service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => result,
                () = &mut drain => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!("downstream HTTP connection ended: {e}");
    }
}

/// HTTP/2 windows towards clients: the same reasoning as towards upstreams (`pool`).
mod pool_windows {
    pub const STREAM: u32 = 1024 * 1024;
    pub const CONNECTION: u32 = 4 * 1024 * 1024;
}
