//! The HBONE client: a pool of mutual-TLS HTTP/2 connections and CONNECT streams over them.
//!
//! Connections are keyed by (source address, source identity, destination identity,
//! destination address): every stream on a connection is sent by one pod as one identity to
//! one pod (or waypoint) address of one identity, which is what one TLS session proves (L4-2)
//! and what its TCP addresses show to the peer and to the network between (L4-1, L4-6). A peer
//! that checks the tunnel's destination address against the CONNECT target, as ztunnel does,
//! therefore never sees a stream for another pod on a connection dialled to this one. Many
//! streams share a connection; a connection with no stream for `IDLE_TIMEOUT` is closed.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::Poll,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{RecvStream, SendStream, client::SendRequest};
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::Mutex as AsyncMutex;
use tokio_rustls::TlsConnector;
use tracing::{debug, info};

use super::{
    BAGGAGE, CONNECTION_WINDOW, FORWARDED, LOCAL_ERROR_RESETS, MAX_CONCURRENT_STREAMS, MAX_FRAME, REMEMBERED_RESETS,
    STREAM_WINDOW, TRACEPARENT, forwarded_for, io::H2Stream, new_traceparent,
};
use crate::{
    identity::{CertStore, Identity, IdentityError, peer_identity},
    sys,
};

/// How long an unused pooled connection stays open.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum HboneError {
    #[error("no certificate for {0}: {1}")]
    Certificate(Identity, IdentityError),
    #[error("cannot reach {0} (is HBONE port 15008 reachable, or blocked by a network policy?): {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("TLS handshake with {0} failed: {1}")]
    Tls(SocketAddr, std::io::Error),
    #[error("{addr} presented identity {got}, but {expected} was expected: refusing to send (secure naming)")]
    WrongIdentity { addr: SocketAddr, expected: Identity, got: String },
    #[error("HTTP/2 with {0} failed: {1}")]
    Http2(SocketAddr, h2::Error),
    #[error("{0} refused the tunnel with HTTP status {1}")]
    Refused(SocketAddr, StatusCode),
    #[error("cannot build the CONNECT request: {0}")]
    BadRequest(String),
    #[error("timed out connecting to {0}")]
    Timeout(SocketAddr),
}

/// What one tunnel is for.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub source: Identity,
    pub destination: Identity,
    /// The node the destination runs on, for logs.
    pub destination_node: String,
    /// Where to open the TLS connection if the pool has none: the pod's IP and port 15008.
    pub connect_addr: SocketAddr,
    /// The CONNECT target: the pod's `ip:port` (or a service VIP:port via a waypoint).
    pub authority: SocketAddr,
    /// The original client's address, sent in `forwarded` (port 0 when it is not one client's).
    pub client_addr: SocketAddr,
    pub baggage: String,
    /// The address the HBONE TCP connection is bound to (transparent bind in the node netns);
    /// `None` = the socket's default source (waypoint/gateway pods, which already dial from
    /// their own netns).
    pub bind: Option<std::net::IpAddr>,
    /// The `traceparent` naming the sender's span as the tunnel's parent, when the sender
    /// traces (OBS-7); else a fresh one, as Istio's ztunnel sends.
    pub traceparent: Option<String>,
}

/// The CONNECT request of one tunnel (L4-1). `baggage` is left out when there is none to send
/// (a waypoint's pooled upstream speaks for many clients): an empty header says nothing.
pub(super) fn connect_head(
    authority: SocketAddr,
    client_addr: SocketAddr,
    baggage: &str,
    traceparent: Option<&str>,
) -> Result<Request<()>, http::Error> {
    let mut head = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.to_string())
        .header(FORWARDED, forwarded_for(client_addr));
    if !baggage.is_empty() {
        head = head.header(BAGGAGE, baggage);
    }
    match traceparent {
        Some(traceparent) => head.header(TRACEPARENT, traceparent),
        None => head.header(TRACEPARENT, new_traceparent()),
    }
    .body(())
}

/// An open CONNECT stream. Dropping it ends the stream; the pooled connection stays.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    /// Counts the stream on its connection (and through it, the identity the server proved in
    /// TLS); nothing else is kept per tunnel, since it lives as long as the proxied connection.
    _active: ActiveGuard,
}

impl Tunnel {
    /// The tunnel as a byte stream, for protocols spoken inside it.
    pub fn into_stream(self) -> H2Stream {
        H2Stream::with_guard(self.send, self.recv, self._active)
    }
}

/// What a pooled connection may carry: streams from one source address and identity to one
/// destination address of one identity (L4-1, L4-2, L4-6).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    bind: Option<IpAddr>,
    source: Identity,
    destination: Identity,
    addr: SocketAddr,
}

impl PoolKey {
    fn of(request: &ConnectRequest) -> Self {
        Self {
            bind: request.bind,
            source: request.source.clone(),
            destination: request.destination.clone(),
            addr: request.connect_addr,
        }
    }
}

struct PooledConnection {
    sender: SendRequest<Bytes>,
    peer: Identity,
    addr: SocketAddr,
    /// The socket's own address (the pod's, once bound to it), for `/hbone`; `None` if the
    /// kernel could not say.
    local: Option<SocketAddr>,
    /// When the client certificate this connection proved expires: no new streams after it.
    expires: std::time::SystemTime,
    active: Arc<AtomicUsize>,
    idle_since: Mutex<Instant>,
}

struct ActiveGuard(Arc<PooledConnection>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

/// The connections of one pool key: usually one; more when one carries as many streams as the
/// peer allows.
type Slot = Arc<AsyncMutex<Vec<Arc<PooledConnection>>>>;

/// The node's HBONE connections.
pub struct HbonePool {
    certs: Arc<CertStore>,
    slots: Mutex<HashMap<PoolKey, Slot>>,
    /// Mark sockets so the node's capture programs let them pass (node proxy); a waypoint runs
    /// in a pod nobody captures, and needs no privilege to connect.
    mark_sockets: bool,
}

impl HbonePool {
    /// The node proxy's pool: its sockets carry the proxy's mark.
    pub fn new(certs: Arc<CertStore>) -> Arc<Self> {
        Self::build(certs, true)
    }

    /// A pool of unmarked sockets, for proxies outside the capture path (waypoints, gateways).
    pub fn unmarked(certs: Arc<CertStore>) -> Arc<Self> {
        Self::build(certs, false)
    }

    fn build(certs: Arc<CertStore>, mark_sockets: bool) -> Arc<Self> {
        let pool = Arc::new(Self { certs, slots: Mutex::new(HashMap::new()), mark_sockets });
        tokio::spawn(close_idle(Arc::downgrade(&pool)));
        pool
    }

    /// Opens a CONNECT stream for `request`, reusing a pooled connection when one exists. A
    /// pooled connection the peer has just told to go away (GOAWAY: it drains, or hands over
    /// to a successor, OPS-3) refuses the stream without having seen it; the stream is then
    /// opened once more, on a fresh connection.
    pub async fn connect(&self, request: &ConnectRequest) -> Result<Tunnel, HboneError> {
        let key = PoolKey::of(request);
        let slot = self.slots.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default().clone();
        let mut retried = false;
        loop {
            let (connection, fresh) = self.connection(&slot, request).await?;
            let guard = ActiveGuard(connection.clone());
            match self.open_stream(&connection, request).await {
                Ok((send, recv)) => return Ok(Tunnel { send, recv, _active: guard }),
                Err(HboneError::Http2(addr, e)) if !fresh && !retried && refused_unseen(&e) => {
                    debug!(%addr, "pooled HBONE connection refused a new stream ({e}); opening another");
                    slot.lock().await.retain(|c| !Arc::ptr_eq(c, &connection));
                    retried = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A connection of `slot` with room for one more stream (counted), opening one if needed;
    /// `true` when it is new.
    async fn connection(
        &self,
        slot: &Slot,
        request: &ConnectRequest,
    ) -> Result<(Arc<PooledConnection>, bool), HboneError> {
        // Held only while finding or creating the connection, so that concurrent first
        // connections to one destination share a single handshake.
        let mut held = slot.lock().await;
        let now = std::time::SystemTime::now();
        held.retain(|c| c.expires > now);
        let mut chosen = None;
        let mut i = 0;
        while i < held.len() {
            if held[i].active.load(Ordering::Acquire) >= MAX_CONCURRENT_STREAMS as usize {
                i += 1;
                continue;
            }
            // Never wait here: a connection whose peer has no stream to spare right now (its
            // count lags ours while closed streams finish) is skipped, not queued behind.
            let mut sender = held[i].sender.clone();
            match std::future::poll_fn(|cx| Poll::Ready(sender.poll_ready(cx))).await {
                Poll::Ready(Ok(())) => {
                    chosen = Some(held[i].clone());
                    break;
                }
                Poll::Ready(Err(_)) => {
                    // Closed by the peer or broken: forget it.
                    held.swap_remove(i);
                }
                Poll::Pending => i += 1,
            }
        }
        let (connection, fresh) = match chosen {
            Some(c) => (c, false),
            None => {
                let fresh = tokio::time::timeout(CONNECT_TIMEOUT, self.open(request))
                    .await
                    .map_err(|_| HboneError::Timeout(request.connect_addr))??;
                held.push(fresh.clone());
                (fresh, true)
            }
        };
        // Counted under the lock, so concurrent callers never oversubscribe a connection.
        connection.active.fetch_add(1, Ordering::AcqRel);
        Ok((connection, fresh))
    }

    async fn open(&self, request: &ConnectRequest) -> Result<Arc<PooledConnection>, HboneError> {
        let addr = request.connect_addr;
        let tls_settings =
            self.certs.get(&request.source).await.map_err(|e| HboneError::Certificate(request.source.clone(), e))?;
        // From the source pod's own address when asked (L4-6): the node's capture programs hand
        // the replies to this socket, as they do for inbound delivery from a client's address.
        let tcp = match (request.bind, self.mark_sockets) {
            (Some(source), true) => sys::connect_transparent(source, addr).await,
            (_, true) => sys::connect_marked(addr).await,
            // Unmarked pools dial from their own pod's netns: its address is the source already.
            (_, false) => sys::connect(addr).await,
        }
        .map_err(|e| HboneError::Connect(addr, e))?;
        let local = tcp.local_addr().ok();
        // The name is not checked: peers are verified by SPIFFE identity below.
        let name = ServerName::IpAddress(addr.ip().into());
        let tls = TlsConnector::from(tls_settings.client.clone())
            .connect(name, super::socket::Socket::new(tcp))
            .await
            .map_err(|e| HboneError::Tls(addr, e))?;
        let peer = peer_identity(tls.get_ref().1.peer_certificates());
        if peer.as_ref() != Some(&request.destination) {
            return Err(HboneError::WrongIdentity {
                addr,
                expected: request.destination.clone(),
                got: peer.map_or_else(|| "none".to_owned(), |p| p.to_string()),
            });
        }
        let peer = request.destination.clone();
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_concurrent_reset_streams(REMEMBERED_RESETS)
            .max_local_error_reset_streams(LOCAL_ERROR_RESETS)
            .enable_push(false)
            .handshake(tls)
            .await
            .map_err(|e| HboneError::Http2(addr, e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%addr, "HBONE connection ended: {e}");
            }
        });
        info!(
            %addr,
            local = ?local,
            source = %request.source,
            destination = %peer,
            node = %request.destination_node,
            "HBONE connection established"
        );
        Ok(Arc::new(PooledConnection {
            sender,
            peer,
            addr,
            local,
            expires: tls_settings.cert.not_after,
            active: Arc::new(AtomicUsize::new(0)),
            idle_since: Mutex::new(Instant::now()),
        }))
    }

    async fn open_stream(
        &self,
        connection: &PooledConnection,
        request: &ConnectRequest,
    ) -> Result<(SendStream<Bytes>, RecvStream), HboneError> {
        let addr = connection.addr;
        let h2 = |e| HboneError::Http2(addr, e);
        let mut sender = connection.sender.clone().ready().await.map_err(h2)?;
        let connect =
            connect_head(request.authority, request.client_addr, &request.baggage, request.traceparent.as_deref())
                .map_err(|e| HboneError::BadRequest(e.to_string()))?;
        let (response, send) = sender.send_request(connect, false).map_err(h2)?;
        let response = response.await.map_err(h2)?;
        if response.status() != StatusCode::OK {
            return Err(HboneError::Refused(addr, response.status()));
        }
        Ok((send, response.into_body()))
    }

    fn close_idle_now(&self) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|key, slot| {
            let Ok(mut held) = slot.try_lock() else { return true };
            held.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && c.idle_since.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= IDLE_TIMEOUT;
                if idle {
                    debug!(source = %key.source, destination = %key.destination, "closing idle HBONE connection");
                }
                !idle
            });
            !held.is_empty()
        });
    }
}

impl HbonePool {
    /// Forgets the pooled connections bound to an address that is not in `sources` (this
    /// node's captured pods): a pod that left the mesh or the node, whose address may come back
    /// as another workload's, keeps no proxy socket on it (L4-6). Idle connections close now;
    /// streams still open on one finish first, and no new stream is ever put on it. Connections
    /// with no bound address (a waypoint's or gateway's own) are kept.
    pub fn retain_sources(&self, sources: &HashSet<IpAddr>) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|key, _| {
            let keep = key.bind.is_none_or(|ip| sources.contains(&ip));
            if !keep {
                debug!(bind = ?key.bind, destination = %key.addr, "dropping pooled HBONE connections of a pod no longer captured here");
            }
            keep
        });
    }

    /// The pooled connections, for the admin API's `/hbone`; those whose slot is busy opening a
    /// connection right now are left out of this look.
    pub fn connections(&self) -> Vec<PooledView> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (key, slot) in slots.iter() {
            let Ok(held) = slot.try_lock() else { continue };
            for c in held.iter() {
                let streams = c.active.load(Ordering::Acquire);
                let idle = if streams == 0 {
                    c.idle_since.lock().unwrap_or_else(|p| p.into_inner()).elapsed().as_secs()
                } else {
                    0
                };
                out.push(PooledView {
                    local: c.local.map(|a| a.to_string()),
                    peer: c.addr.to_string(),
                    bind: key.bind,
                    source_identity: key.source.to_string(),
                    destination_identity: c.peer.to_string(),
                    streams,
                    idle_s: idle,
                });
            }
        }
        out.sort_by(|a, b| (&a.local, &a.peer).cmp(&(&b.local, &b.peer)));
        out
    }

    /// How many connections are pooled, for the `strait_hbone_pool_connections` gauge.
    pub fn connection_count(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.values().map(|slot| slot.try_lock().map_or(0, |held| held.len())).sum()
    }
}

/// One pooled connection as `/hbone` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PooledView {
    /// The connection's own address, `ip:port`.
    pub local: Option<String>,
    /// The peer's `ip:15008`.
    pub peer: String,
    /// The address the pool keys the connection on (the source pod's), if any.
    pub bind: Option<IpAddr>,
    pub source_identity: String,
    pub destination_identity: String,
    /// CONNECT streams open on it now.
    pub streams: usize,
    /// Seconds without a stream (0 while it carries one).
    pub idle_s: u64,
}

/// Whether the peer refused a stream before handling it, so opening it elsewhere is safe: it
/// went away (GOAWAY) or refused the stream (REFUSED_STREAM), per RFC 9113 §8.7.
fn refused_unseen(e: &h2::Error) -> bool {
    e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

async fn close_idle(pool: std::sync::Weak<HbonePool>) {
    loop {
        tokio::time::sleep(IDLE_TIMEOUT / 4).await;
        let Some(pool) = pool.upgrade() else { return };
        pool.close_idle_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{BoxFuture, CertificateProvider, IssuedCert};

    /// No certificate is ever issued: these tests look at the pool's keys only.
    struct NoCa;

    impl CertificateProvider for NoCa {
        fn issue<'a>(&'a self, _: &'a Identity, _: Duration) -> BoxFuture<'a, Result<IssuedCert, IdentityError>> {
            Box::pin(async { Err(IdentityError::CaRequest("no CA in this test".into())) })
        }
    }

    fn request(bind: Option<&str>, connect: &str) -> ConnectRequest {
        ConnectRequest {
            source: Identity::new("cluster.local", "a", "client"),
            destination: Identity::new("cluster.local", "b", "server"),
            destination_node: "node2".into(),
            connect_addr: connect.parse().expect("addr"),
            bind: bind.map(|ip| ip.parse().expect("ip")),
            authority: "10.2.0.5:8080".parse().expect("addr"),
            client_addr: "10.1.0.5:40000".parse().expect("addr"),
            baggage: String::new(),
            traceparent: None,
        }
    }

    // L4-1, L4-6: two pods of one identity, or one pod to two pods of one identity on one node,
    // never share a pool key; one pod to one address does.
    #[test]
    fn pool_keys_tell_source_pods_and_destination_addresses_apart() {
        let p11 = PoolKey::of(&request(Some("10.1.0.11"), "10.2.0.21:15008"));
        let p12 = PoolKey::of(&request(Some("10.1.0.12"), "10.2.0.21:15008"));
        let p11_to_p22 = PoolKey::of(&request(Some("10.1.0.11"), "10.2.0.22:15008"));
        assert_ne!(p11, p12);
        assert_ne!(p11, p11_to_p22);
        let mut again = request(Some("10.1.0.11"), "10.2.0.21:15008");
        again.authority = "10.2.0.21:9090".parse().expect("addr");
        again.client_addr = "10.1.0.11:50000".parse().expect("addr");
        assert_eq!(p11, PoolKey::of(&again), "another stream of the same pod to the same address reuses");
    }

    // L4-6: pooled connections of a pod that is no longer captured here are dropped; those of
    // captured pods and those with no bound address (a waypoint's) stay.
    #[tokio::test]
    async fn retain_sources_drops_the_connections_of_pods_gone_from_the_node() {
        let pool = HbonePool::new(CertStore::new(Arc::new(NoCa), Duration::from_secs(3600)));
        let keys = [
            PoolKey::of(&request(Some("10.1.0.11"), "10.2.0.21:15008")),
            PoolKey::of(&request(Some("10.1.0.12"), "10.2.0.21:15008")),
            PoolKey::of(&request(Some("10.1.0.12"), "10.2.0.22:15008")),
            PoolKey::of(&request(None, "10.2.0.21:15008")),
        ];
        for key in &keys {
            pool.slots.lock().expect("slots").insert(key.clone(), Slot::default());
        }
        let captured: HashSet<IpAddr> = ["10.1.0.11".parse().expect("ip"), "10.1.0.99".parse().expect("ip")].into();
        pool.retain_sources(&captured);
        let slots = pool.slots.lock().expect("slots");
        let mut left: Vec<_> = slots.keys().map(|k| (k.bind, k.addr)).collect();
        left.sort();
        assert_eq!(
            left,
            vec![(None, keys[3].addr), (Some("10.1.0.11".parse().expect("ip")), keys[0].addr)],
            "p12's two keys are gone"
        );
        drop(slots);
        pool.retain_sources(&HashSet::new());
        assert_eq!(pool.slots.lock().expect("slots").len(), 1, "only the unbound key stays");
        assert_eq!(pool.connection_count(), 0);
        assert!(pool.connections().is_empty());
    }
}
