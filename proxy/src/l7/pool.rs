//! Upstream HTTP connections and the `connectionPool` limits (L7-4 circuit breaking).
//!
//! HTTP/1.1 carries one request at a time per connection: each endpoint keeps its idle
//! connections, a request takes one or opens one while the destination is under
//! `tcp.maxConnections`, and otherwise waits as one of at most `http1MaxPendingRequests`
//! pending requests; beyond that it overflows (503, flag `UO`). HTTP/2 multiplexes: one
//! connection per endpoint, shared. `http2MaxRequests` caps requests in flight for both.

use std::{
    io,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::{
    body::UpstreamBody,
    upstream::{Cluster, Connector, Limits, UpstreamEndpoint},
};

/// Idle HTTP/1.1 connections kept per endpoint; more are closed when returned.
const MAX_IDLE_PER_ENDPOINT: usize = 64;
/// HTTP/2 windows towards upstreams: requests are mostly small, but a stream must not stall a
/// large response every 64 KiB (the protocol default) while it waits for WINDOW_UPDATE.
const H2_STREAM_WINDOW: u32 = 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

/// Which HTTP version to speak upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamVersion {
    Http1,
    Http2,
}

/// One endpoint's connections.
#[derive(Default)]
pub struct EndpointPool {
    idle: Mutex<Vec<Http1Connection>>,
    http2: tokio::sync::Mutex<Option<Http2Connection>>,
}

impl std::fmt::Debug for EndpointPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.idle.lock().map(|i| i.len()).unwrap_or(0);
        f.debug_struct("EndpointPool").field("idle", &idle).finish()
    }
}

impl EndpointPool {
    /// Idle HTTP/1.1 connections now (for the admin API).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }

    fn take_idle(&self) -> Option<Http1Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(conn) = idle.pop() {
            if conn.sender.is_ready() {
                return Some(conn);
            }
            // Closed by the upstream while idle: dropping it frees its slot.
        }
        None
    }

    /// Closes one idle connection, to make room under `maxConnections` for another endpoint.
    fn close_one_idle(&self) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.pop().is_some()
    }

    fn put_idle(&self, conn: Http1Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_PER_ENDPOINT {
            idle.push(conn);
        }
    }
}

/// Holds one unit of the destination's connection count; dropping it gives the unit back and
/// wakes a pending request.
struct OpenConnection {
    limits: Arc<Limits>,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        Limits::give_back(&self.limits.connections);
        self.limits.released.notify_one();
    }
}

struct Http1Connection {
    sender: http1::SendRequest<UpstreamBody>,
    /// Requests this connection has carried.
    served: u32,
    _open: OpenConnection,
}

struct Http2Connection {
    sender: http2::SendRequest<UpstreamBody>,
    _open: Arc<OpenConnection>,
}

/// Holds a pending-request slot while a request waits for a connection.
struct Pending<'a>(&'a Limits);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        Limits::give_back(&self.0.pending);
    }
}

/// Why no connection could be had.
#[derive(Debug)]
pub enum AcquireError {
    /// A `connectionPool` limit was reached (`UO`).
    Overflow(&'static str),
    /// Connecting or the HTTP handshake failed (`UF`).
    Connect(io::Error),
}

/// A connection lent to one request; give it back with `release` when the response is over.
pub struct Lease {
    kind: LeaseKind,
}

enum LeaseKind {
    Http1 { conn: Http1Connection, endpoint: Arc<UpstreamEndpoint>, max_requests: Option<u32> },
    Http2(http2::SendRequest<UpstreamBody>),
}

impl Lease {
    pub async fn send(&mut self, request: Request<UpstreamBody>) -> Result<Response<Incoming>, hyper::Error> {
        match &mut self.kind {
            LeaseKind::Http1 { conn, .. } => {
                conn.sender.ready().await?;
                conn.served += 1;
                conn.sender.send_request(request).await
            }
            LeaseKind::Http2(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
        }
    }

    /// Returns the connection to its endpoint when it can carry another request (the response
    /// was read to its end, `maxRequestsPerConnection` is not reached); otherwise closes it.
    pub fn release(self, reusable: bool) {
        let LeaseKind::Http1 { conn, endpoint, max_requests } = self.kind else { return };
        if !reusable || max_requests.is_some_and(|max| conn.served >= max) {
            return;
        }
        if conn.sender.is_ready() {
            endpoint.pool.put_idle(conn);
            return;
        }
        // hyper marks the connection ready once its task has seen the end of the response,
        // which can be a moment after the body's last frame reached us.
        tokio::spawn(async move {
            let mut conn = conn;
            if conn.sender.ready().await.is_ok() {
                let limits = conn._open.limits.clone();
                endpoint.pool.put_idle(conn);
                limits.released.notify_one();
            }
        });
    }
}

/// Gets a connection to `endpoint` of `cluster` for one request.
pub async fn acquire(
    cluster: &Cluster,
    endpoint: &Arc<UpstreamEndpoint>,
    version: UpstreamVersion,
    connector: &Connector,
    client_ip: IpAddr,
) -> Result<Lease, AcquireError> {
    match version {
        UpstreamVersion::Http1 => acquire_http1(cluster, endpoint, connector, client_ip).await,
        UpstreamVersion::Http2 => acquire_http2(cluster, endpoint, connector, client_ip).await,
    }
}

async fn acquire_http1(
    cluster: &Cluster,
    endpoint: &Arc<UpstreamEndpoint>,
    connector: &Connector,
    client_ip: IpAddr,
) -> Result<Lease, AcquireError> {
    let limits = &cluster.limits;
    let settings = cluster.policy.connection_pool.as_ref();
    let max_connections = settings.and_then(|s| s.max_connections);
    let max_pending = settings.and_then(|s| s.http1_max_pending_requests);
    let max_requests = settings.and_then(|s| s.max_requests_per_connection);
    let lease = |conn| Lease { kind: LeaseKind::Http1 { conn, endpoint: endpoint.clone(), max_requests } };
    let mut pending = None;
    loop {
        // Registered before looking, so a connection returned in between is not missed.
        let released = limits.released.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        if let Some(conn) = endpoint.pool.take_idle() {
            return Ok(lease(conn));
        }
        if Limits::try_take(&limits.connections, max_connections) {
            let open = OpenConnection { limits: limits.clone() };
            drop(pending.take());
            let io = connector.open(endpoint, client_ip).await.map_err(AcquireError::Connect)?;
            let (sender, connection) = http1::Builder::new()
                .handshake(TokioIo::new(io))
                .await
                .map_err(|e| AcquireError::Connect(io::Error::other(e)))?;
            tokio::spawn(async move {
                if let Err(e) = connection.with_upgrades().await {
                    tracing::debug!("upstream HTTP/1.1 connection ended: {e}");
                }
            });
            return Ok(lease(Http1Connection { sender, served: 0, _open: open }));
        }
        // At the connection limit: an idle connection to another endpoint can make room.
        if cluster.endpoints.iter().any(|e| !Arc::ptr_eq(e, endpoint) && e.pool.close_one_idle()) {
            continue;
        }
        if pending.is_none() {
            if !Limits::try_take(&limits.pending, max_pending) {
                return Err(AcquireError::Overflow("http1MaxPendingRequests reached"));
            }
            pending = Some(Pending(limits));
        }
        released.await;
    }
}

async fn acquire_http2(
    cluster: &Cluster,
    endpoint: &Arc<UpstreamEndpoint>,
    connector: &Connector,
    client_ip: IpAddr,
) -> Result<Lease, AcquireError> {
    let mut slot = endpoint.pool.http2.lock().await;
    if let Some(conn) = slot.as_ref()
        && !conn.sender.is_closed()
    {
        return Ok(Lease { kind: LeaseKind::Http2(conn.sender.clone()) });
    }
    *slot = None;
    let max_connections = cluster.policy.connection_pool.as_ref().and_then(|s| s.max_connections);
    if !Limits::try_take(&cluster.limits.connections, max_connections) {
        return Err(AcquireError::Overflow("maxConnections reached"));
    }
    let open = Arc::new(OpenConnection { limits: cluster.limits.clone() });
    let io = connector.open(endpoint, client_ip).await.map_err(AcquireError::Connect)?;
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| AcquireError::Connect(io::Error::other(e)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("upstream HTTP/2 connection ended: {e}");
        }
    });
    *slot = Some(Http2Connection { sender: sender.clone(), _open: open });
    Ok(Lease { kind: LeaseKind::Http2(sender) })
}
