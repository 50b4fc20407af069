//! The HTTP engine shared by waypoints and gateways (L7-1 to L7-11): one request's journey
//! from a client connection to an endpoint, under the VirtualService and DestinationRule in
//! force, with L7 authorization, faults, retries, timeouts, mirrors and request telemetry.
//!
//! `serve_http` (`server`) runs an HTTP/1.1 or HTTP/2 server on any byte stream (an HBONE
//! stream at the waypoint) under the client-side `limits`, and hands each request to
//! `router::handle`, which decides (pure functions in `matching`, `lb`, `retry`, `outlier`)
//! and sends (`forward`, `pool`, `upstream`, with the client's body read by `request_body`).

pub mod authn;
pub mod body;
pub mod flags;
mod forward;
pub mod headers;
pub mod jwt;
pub mod lb;
pub mod limits;
pub mod matching;
pub mod memory;
pub mod origination;
pub mod outlier;
pub mod pool;
pub mod request_body;
pub mod retry;
mod rewrite;
mod router;
mod server;
pub mod upstream;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use http::HeaderValue;

pub use forward::choose_weighted;
pub use router::handle;
pub use server::serve_http;

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
    /// Timeouts every client connection and request is held to (OPS-4).
    pub limits: limits::HttpLimits,
    /// Request bodies held for retries and mirrors, all requests together.
    pub body_budget: Arc<request_body::BodyBudget>,
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
    /// The `traceparent` of the HBONE tunnel the client came through, read only when the
    /// proxy traces: a request without a trace of its own joins the tunnel's (OBS-7).
    pub tunnel_trace: Option<crate::telemetry::TraceContext>,
}

impl Downstream {
    /// The request scheme the client used: `https` when a gateway terminated its TLS (GW-1),
    /// for `x-forwarded-proto` (L7-9) and `match[].scheme`; `http` otherwise (HBONE's mTLS is
    /// the mesh's, not the application's).
    pub fn scheme(&self) -> &'static str {
        match self.target {
            Target::Gateway { server: Some(_), .. } => "https",
            _ => "http",
        }
    }
}

/// The destination a client addressed.
#[derive(Debug, Clone)]
pub enum Target {
    /// A service's VIP and port.
    Service { service: Arc<Service>, port: u16 },
    /// A pod's IP and port.
    Workload { workload: Arc<Workload>, port: u16 },
    /// A gateway's server port (`port.number`, GW-1): requests are routed by Host among the
    /// VirtualServices bound to the Gateways served there, as `view` has them now; on TLS the
    /// server the SNI chose (`server`) bounds them (GW-2).
    Gateway {
        port: u16,
        view: tokio::sync::watch::Receiver<Arc<crate::model::gateways::GatewayView>>,
        server: Option<crate::model::gateways::ServerId>,
    },
}

impl Target {
    /// The address the client connected to.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Target::Service { service, port } => {
                SocketAddr::new(service.vip.unwrap_or(IpAddr::from([0, 0, 0, 0])), *port)
            }
            Target::Workload { workload, port } => SocketAddr::new(workload.ip, *port),
            Target::Gateway { port, .. } => SocketAddr::new(IpAddr::from([0, 0, 0, 0]), *port),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Target::Service { port, .. } | Target::Workload { port, .. } | Target::Gateway { port, .. } => *port,
        }
    }

    pub fn service(&self) -> Option<&Arc<Service>> {
        match self {
            Target::Service { service, .. } => Some(service),
            Target::Workload { .. } | Target::Gateway { .. } => None,
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
