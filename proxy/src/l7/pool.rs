//! Upstream HTTP connections and the `connectionPool` limits (L7-4 circuit breaking).
//!
//! HTTP/1.1 carries one request at a time per connection: each endpoint keeps its idle
//! connections, a request takes one or opens one while the destination is under
//! `tcp.maxConnections`, and otherwise waits as one of at most `http1MaxPendingRequests`
//! pending requests; beyond that it overflows (503, flag `UO`). HTTP/2 multiplexes: one
//! connection per endpoint, shared. `http2MaxRequests` caps requests in flight for both.
//!
//! Connections are opened in tasks of their own, never cancelled by the request that asked
//! for one (OPS-4): a client that resets its request (HTTP/2 rapid reset) would otherwise
//! abandon HBONE CONNECT streams half-open, and the destination's node proxy closes a shared
//! connection on which too many streams are reset before it could accept them
//! (`too_many_resets`), failing every request on it. An abandoned connection joins the pool.

use std::{
    future::{Future, poll_fn},
    io,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::Poll,
    time::{Duration, Instant},
};

use http_body_util::BodyExt as _;
use tokio::sync::oneshot;

use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::{
    body::UpstreamBody,
    origination::Loaded,
    upstream::{Cluster, Connector, Limits, UpstreamEndpoint},
};

/// Idle HTTP/1.1 connections kept per endpoint; more are closed when returned.
const MAX_IDLE_PER_ENDPOINT: usize = 64;
/// HTTP/2 windows towards upstreams: requests are mostly small, but a stream must not stall a
/// large response every 64 KiB (the protocol default) while it waits for WINDOW_UPDATE.
const H2_STREAM_WINDOW: u32 = 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

/// How long a stream sent upstream lives, at least, before the engine resets it because its
/// client went away (OPS-4). HTTP/2 servers count streams reset early against the whole
/// connection: h2 (hyper, tonic) closes it past 20 streams reset before it accepted them,
/// Envoy past 250 reset within a second of opening. A client resetting its requests as fast
/// as it opens them (rapid reset) would have the waypoint's shared upstream connection closed,
/// failing everyone's requests on it. 100 ms was not enough for an overloaded server to accept
/// (a debug-built h2 server on two busy cores closed the connection in 1 run of 8); a second
/// matches Envoy's notion of premature. The client is answered at once all the same; only the
/// reset, which nobody waits for, is held back.
pub const RESET_GRACE: Duration = Duration::from_secs(1);
/// Exchanges whose client went away while the upstream was answering are finished in the
/// background (see `exchange`): at most this many at once, each for at most
/// `DETACHED_TIMEOUT`. A detached exchange costs a task and its buffers, a few KiB.
const MAX_DETACHED: usize = 1000;
const DETACHED_TIMEOUT: Duration = Duration::from_secs(10);
/// Response bytes read from a detached exchange to keep its connection; a longer response is
/// cut off (its connection closed) instead.
const DETACHED_DRAIN_LIMIT: usize = 1024 * 1024;

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

    /// An idle connection opened with TLS certificates of `epoch` (older ones are closed).
    fn take_idle(&self, epoch: u64) -> Option<Http1Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(conn) = idle.pop() {
            // Not `is_ready`: a connection whose task has not run since its handshake is not
            // ready yet, and is perfectly good (`Lease::send` waits for it).
            if !conn.sender.is_closed() && conn.epoch == epoch {
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

    /// The endpoint's HTTP/2 connection, if it has one that is still open (waits while a task
    /// is opening one).
    async fn live_http2(&self, epoch: u64) -> Option<http2::SendRequest<UpstreamBody>> {
        let slot = self.http2.lock().await;
        slot.as_ref().filter(|c| !c.sender.is_closed() && c.epoch == epoch).map(|c| c.sender.clone())
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
    /// The TLS origination certificates' epoch it was opened with (0 without TLS).
    epoch: u64,
    _open: OpenConnection,
}

struct Http2Connection {
    sender: http2::SendRequest<UpstreamBody>,
    epoch: u64,
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
    /// The destination's TLS origination settings cannot be used (a certificate file is
    /// missing or bad): no endpoint is to blame.
    Tls(String),
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
    connector: &Arc<Connector>,
    client_ip: IpAddr,
    traceparent: Option<String>,
) -> Result<Lease, AcquireError> {
    let tls = match &cluster.origination {
        Some(o) if !endpoint.workload.reached_over_hbone() => Some(
            o.current().map_err(|e| AcquireError::Tls(format!("TLS origination to {}: {e}", cluster.key.name())))?,
        ),
        _ => None,
    };
    let dial = Dial { connector: connector.clone(), client_ip, tls, version, traceparent };
    match version {
        UpstreamVersion::Http1 => acquire_http1(cluster, endpoint, dial).await,
        UpstreamVersion::Http2 => acquire_http2(cluster, endpoint, dial).await,
    }
}

/// How to open a connection for one request.
#[derive(Clone)]
struct Dial {
    connector: Arc<Connector>,
    client_ip: IpAddr,
    tls: Option<Arc<Loaded>>,
    version: UpstreamVersion,
    /// The request's span, for the tunnel of a connection opened for it.
    traceparent: Option<String>,
}

impl Dial {
    fn epoch(&self) -> u64 {
        self.tls.as_ref().map_or(0, |t| t.epoch)
    }

    async fn open(&self, endpoint: &UpstreamEndpoint) -> io::Result<super::upstream::UpstreamIo> {
        let tls = self.tls.as_deref().map(|t| (t, self.version));
        self.connector.open(endpoint, self.client_ip, tls, self.traceparent.as_deref()).await
    }
}

async fn acquire_http1(cluster: &Cluster, endpoint: &Arc<UpstreamEndpoint>, dial: Dial) -> Result<Lease, AcquireError> {
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
        if let Some(conn) = endpoint.pool.take_idle(dial.epoch()) {
            return Ok(lease(conn));
        }
        if Limits::try_take(&limits.connections, max_connections) {
            let open = OpenConnection { limits: limits.clone() };
            drop(pending.take());
            return connect_http1(endpoint, dial, open).await.map(lease);
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

/// Opens an HTTP/1.1 connection in its own task; if the request that asked for it is gone by
/// then, the connection waits in the pool for the next one.
async fn connect_http1(
    endpoint: &Arc<UpstreamEndpoint>,
    dial: Dial,
    open: OpenConnection,
) -> Result<Http1Connection, AcquireError> {
    let (tx, rx) = oneshot::channel();
    let endpoint = endpoint.clone();
    let epoch = dial.epoch();
    tokio::spawn(async move {
        let io = match dial.open(&endpoint).await {
            Ok(io) => io,
            Err(e) => {
                let _ = tx.send(Err(AcquireError::Connect(e)));
                return;
            }
        };
        let result = match http1::Builder::new().handshake(TokioIo::new(io)).await {
            Ok((sender, connection)) => {
                tokio::spawn(async move {
                    if let Err(e) = connection.with_upgrades().await {
                        tracing::debug!("upstream HTTP/1.1 connection ended: {e}");
                    }
                });
                Ok(Http1Connection { sender, served: 0, epoch, _open: open })
            }
            Err(e) => Err(AcquireError::Connect(io::Error::other(e))),
        };
        if let Err(Ok(mut abandoned)) = tx.send(result)
            && abandoned.sender.ready().await.is_ok()
        {
            let limits = abandoned._open.limits.clone();
            endpoint.pool.put_idle(abandoned);
            limits.released.notify_one();
        }
    });
    rx.await.unwrap_or_else(|_| Err(AcquireError::Connect(io::Error::other("the connecting task failed"))))
}

async fn acquire_http2(cluster: &Cluster, endpoint: &Arc<UpstreamEndpoint>, dial: Dial) -> Result<Lease, AcquireError> {
    if let Some(sender) = endpoint.pool.live_http2(dial.epoch()).await {
        return Ok(Lease { kind: LeaseKind::Http2(sender) });
    }
    let max_connections = cluster.policy.connection_pool.as_ref().and_then(|s| s.max_connections);
    let connecting = tokio::spawn(connect_http2(endpoint.clone(), cluster.limits.clone(), max_connections, dial));
    let sender = connecting
        .await
        .unwrap_or_else(|_| Err(AcquireError::Connect(io::Error::other("the connecting task failed"))))?;
    Ok(Lease { kind: LeaseKind::Http2(sender) })
}

/// Opens the endpoint's shared HTTP/2 connection unless another task just did, holding the
/// endpoint's slot meanwhile so that requests arriving together share one connection.
async fn connect_http2(
    endpoint: Arc<UpstreamEndpoint>,
    limits: Arc<Limits>,
    max_connections: Option<u32>,
    dial: Dial,
) -> Result<http2::SendRequest<UpstreamBody>, AcquireError> {
    let epoch = dial.epoch();
    let mut slot = endpoint.pool.http2.lock().await;
    if let Some(conn) = slot.as_ref()
        && !conn.sender.is_closed()
        && conn.epoch == epoch
    {
        return Ok(conn.sender.clone());
    }
    *slot = None;
    if !Limits::try_take(&limits.connections, max_connections) {
        return Err(AcquireError::Overflow("maxConnections reached"));
    }
    let open = Arc::new(OpenConnection { limits });
    let io = dial.open(&endpoint).await.map_err(AcquireError::Connect)?;
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
    *slot = Some(Http2Connection { sender: sender.clone(), epoch, _open: open });
    Ok(sender)
}

/// Exchanges finished in the background, all destinations together.
#[derive(Debug, Default)]
pub struct Detached {
    count: AtomicUsize,
}

/// A request on its way upstream: the send, and the lease it holds.
type Sending = Pin<Box<dyn Future<Output = (Result<Response<Incoming>, hyper::Error>, Lease)> + Send>>;

/// Sends `request` on `lease` and returns the response head with the lease. The exchange runs
/// in the requester's task, without a hop: when the request is cancelled (its client reset it
/// or went away), the exchange moves to a task of its own, where a request already sent whole
/// is finished and its response read and discarded, so the connection is reused instead of
/// reset (OPS-4). Resetting it would put a RST_STREAM on a shared upstream connection for every
/// cancelled request, which the upstream's HTTP/2 server answers, past a limit, by closing that
/// connection for everyone.
///
/// Until 2026-12-07 every exchange had its own task and answered through a channel, a task
/// and a wake-up more per request for what only a cancelled request needs.
pub async fn exchange(
    lease: Lease,
    request: Request<UpstreamBody>,
    detached: &Arc<Detached>,
) -> Result<(Response<Incoming>, Lease), String> {
    let sending: Sending = Box::pin(async move {
        let mut lease = lease;
        let response = lease.send(request).await;
        (response, lease)
    });
    let mut exchange = Exchange { sending: Some(sending), detached: detached.clone(), sent: Instant::now() };
    let Some((response, lease)) = exchange.answer().await else {
        return Err("the upstream exchange ended without an answer".to_owned());
    };
    match response {
        Ok(response) => Ok((response, lease)),
        Err(e) => {
            lease.release(false);
            Err(with_causes(&e))
        }
    }
}

/// An exchange in its requester; detached if dropped before the answer came.
struct Exchange {
    /// `None` once answered.
    sending: Option<Sending>,
    detached: Arc<Detached>,
    sent: Instant,
}

impl Exchange {
    /// The answer; `None` if asked twice.
    async fn answer(&mut self) -> Option<(Result<Response<Incoming>, hyper::Error>, Lease)> {
        let answer = poll_fn(|cx| match self.sending.as_mut() {
            Some(sending) => sending.as_mut().poll(cx).map(Some),
            None => Poll::Ready(None),
        })
        .await;
        self.sending = None;
        answer
    }
}

impl Drop for Exchange {
    /// Detaches the exchange if there is room, else lets it run until it is `RESET_GRACE` old.
    fn drop(&mut self) {
        let Some(sending) = self.sending.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let room = self
            .detached
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_DETACHED).then_some(n + 1))
            .is_ok();
        let until = self.sent + if room { DETACHED_TIMEOUT } else { RESET_GRACE };
        let detached = room.then(|| self.detached.clone());
        runtime.spawn(async move {
            let finish = async {
                let (response, lease) = sending.await;
                match response {
                    Ok(response) => {
                        let complete = http_body_util::Limited::new(response.into_body(), DETACHED_DRAIN_LIMIT)
                            .collect()
                            .await
                            .is_ok();
                        lease.release(complete);
                    }
                    Err(_) => lease.release(false),
                }
            };
            let _ = tokio::time::timeout_at(until.into(), finish).await;
            if let Some(detached) = detached {
                detached.count.fetch_sub(1, Ordering::AcqRel);
            }
        });
    }
}

/// An error and what caused it, as one line (hyper's own message is often just the kind).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}
