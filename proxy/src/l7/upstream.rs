//! Destinations of the L7 engine: a service port (optionally one DestinationRule subset) with
//! its endpoints, its traffic policy, and the state that outlives a configuration change
//! (endpoints' health and idle connections, the connection pool's counters).
//!
//! `Upstreams` hands out a `Cluster` per (host, subset, port). A new model rebuilds the
//! clusters it touches lazily, reusing the endpoint objects of endpoints that are still there,
//! so an ejected endpoint stays ejected and warm connections stay warm across reloads.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use strait_ebpf_common::HBONE_PORT;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::Notify,
};

use super::{
    lb::Balancer,
    origination::{Loaded, Origination},
    outlier::{self, Health, TryOutcome},
    pool::{Detached, EndpointPool, UpstreamVersion},
};
use crate::{
    config::Resolution,
    hbone::{ConnectRequest, H2Stream, HbonePool},
    identity::Identity,
    model::{
        AppProtocol, Model, Service, Workload, entry_workload,
        routes::{Destination, EffectivePolicy, OutlierDetection},
    },
    node::dns::DnsCache,
    sys,
};

/// Which destination: a host, a subset of it, a port of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterKey {
    pub host: String,
    pub subset: Option<String>,
    pub port: u16,
}

impl ClusterKey {
    /// The destination a route names, for a request that came in on service port `incoming`: a
    /// destination without a port takes that port, or the service's only port.
    pub fn of(model: &Model, destination: &Destination, incoming: u16) -> ClusterKey {
        let port = destination.port.unwrap_or_else(|| match model.service_by_host(&destination.host) {
            Some(s) if s.port(incoming).is_none() && s.ports.len() == 1 => s.ports[0].port,
            _ => incoming,
        });
        ClusterKey { host: destination.host.clone(), subset: destination.subset.clone(), port }
    }

    /// Envoy's cluster name, `outbound|<port>|<subset>|<host>`, for access logs.
    pub fn name(&self) -> String {
        format!("outbound|{}|{}|{}", self.port, self.subset.as_deref().unwrap_or(""), self.host)
    }
}

/// Counters of one destination's connection pool (`connectionPool` limits), kept across
/// configuration changes.
#[derive(Debug, Default)]
pub struct Limits {
    /// Open upstream connections, all endpoints together.
    pub connections: AtomicU32,
    /// Requests waiting for a connection.
    pub pending: AtomicU32,
    /// Requests in flight.
    pub active_requests: AtomicU32,
    /// Retries in flight.
    pub active_retries: AtomicU32,
    /// Signalled when a connection is returned or closed, for pending requests.
    pub released: Notify,
}

impl Limits {
    /// Takes one unit of `counter` if it stays within `max` (`None` = unlimited).
    pub fn try_take(counter: &AtomicU32, max: Option<u32>) -> bool {
        let max = max.unwrap_or(u32::MAX);
        counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok()
    }

    pub fn give_back(counter: &AtomicU32) {
        let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(1)));
    }
}

/// One endpoint: a pod and the port requests reach it on.
#[derive(Debug)]
pub struct UpstreamEndpoint {
    pub addr: SocketAddr,
    pub workload: Arc<Workload>,
    pub health: Health,
    /// Requests in flight (LEAST_REQUEST).
    pub active: AtomicU32,
    pub pool: EndpointPool,
}

/// A destination, as the engine uses it for one configuration.
#[derive(Debug)]
pub struct Cluster {
    pub key: ClusterKey,
    /// The service behind the destination; `None` for a pod addressed directly.
    pub service: Option<Arc<Service>>,
    /// What the service port declares; `Unknown` means "as the client spoke".
    pub protocol: AppProtocol,
    pub policy: EffectivePolicy,
    pub endpoints: Vec<Arc<UpstreamEndpoint>>,
    pub balancer: Balancer,
    pub limits: Arc<Limits>,
    /// TLS towards endpoints outside the mesh (DestinationRule `tls` SIMPLE or MUTUAL); kept
    /// across rebuilds while the settings stay the same, so its configs are built once.
    pub origination: Option<Arc<Origination>>,
    /// The model generation this cluster was built from.
    generation: u64,
    /// For a ServiceEntry of resolution DNS: the DNS answers' generation its endpoints are from.
    dns_generation: Option<u64>,
}

impl Cluster {
    /// Picks an endpoint that outlier detection has not ejected.
    pub fn pick(&self, hash: Option<u64>, now: Instant) -> Option<&Arc<UpstreamEndpoint>> {
        let i = self.balancer.pick(
            self.endpoints.len(),
            hash,
            |i| self.endpoints[i].health.available(now),
            |i| self.endpoints[i].active.load(Ordering::Relaxed),
        )?;
        self.endpoints.get(i)
    }

    /// Counts a try's outcome against `endpoint` for outlier detection.
    pub fn record(&self, endpoint: &UpstreamEndpoint, outcome: TryOutcome) {
        let Some(detector) = &self.policy.outlier_detection else { return };
        let now = Instant::now();
        if endpoint.health.record(outcome, detector, now) {
            self.maybe_eject(endpoint, detector, now);
        }
    }

    fn maybe_eject(&self, endpoint: &UpstreamEndpoint, detector: &OutlierDetection, now: Instant) {
        let ejected = self.endpoints.iter().filter(|e| e.health.ejected(now)).count();
        if outlier::may_eject(detector, ejected, self.endpoints.len()) {
            let length = endpoint.health.eject(detector, now);
            tracing::info!(cluster = %self.key.name(), endpoint = %endpoint.addr, ?length, "outlier detection ejected an endpoint");
        }
    }
}

/// Opens upstream connections: HBONE as the proxy's identity to endpoints in the mesh, plain
/// TCP or TLS (origination, SPEC GW-3) to endpoints outside it.
pub struct Connector {
    pub hbone: Arc<HbonePool>,
    /// The identity this proxy speaks as (the waypoint's).
    pub identity: Identity,
    pub trust_domain: String,
}

impl Connector {
    /// `tls`: originate TLS with these configs when the endpoint is outside the mesh (the mesh's
    /// endpoints always get HBONE).
    pub async fn open(
        &self,
        endpoint: &UpstreamEndpoint,
        client_ip: IpAddr,
        tls: Option<(&Loaded, UpstreamVersion)>,
        traceparent: Option<&str>,
    ) -> io::Result<UpstreamIo> {
        let w = &endpoint.workload;
        if !w.reached_over_hbone() {
            let tcp = sys::connect(endpoint.addr).await?;
            return match tls {
                None => Ok(UpstreamIo::Tcp(tcp)),
                Some((loaded, version)) => Ok(UpstreamIo::Tls(Box::new(loaded.connect(version, tcp).await?))),
            };
        }
        let request = ConnectRequest {
            source: self.identity.clone(),
            destination: w.identity(&self.trust_domain),
            destination_node: w.node.clone().unwrap_or_default(),
            connect_addr: SocketAddr::new(w.ip, HBONE_PORT),
            authority: endpoint.addr,
            // A pooled upstream connection carries many clients' requests: the IP only.
            client_addr: SocketAddr::new(client_ip, 0),
            baggage: String::new(),
            // This socket is made in the waypoint's (or gateway's) own pod: it leaves from that
            // pod's address already (L4-6).
            bind: None,
            traceparent: traceparent.map(str::to_owned),
        };
        let tunnel = self.hbone.connect(&request).await.map_err(io::Error::other)?;
        Ok(UpstreamIo::Hbone(Box::new(tunnel.into_stream())))
    }
}

/// An upstream connection: an HBONE stream, a TCP socket, or TLS originated over one.
pub enum UpstreamIo {
    Hbone(Box<H2Stream>),
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Hbone(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Hbone(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Hbone(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Hbone(s) => Pin::new(s.as_mut()).poll_flush(cx),
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Hbone(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Why there is no cluster for a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterError {
    /// The host is not a service of the model (Envoy's `NC`).
    UnknownHost(String),
    /// The service has no such port.
    UnknownPort(String, u16),
    /// The route names a subset no DestinationRule defines.
    UnknownSubset(String, String),
}

impl std::fmt::Display for ClusterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterError::UnknownHost(h) => write!(f, "no service `{h}`"),
            ClusterError::UnknownPort(h, p) => write!(f, "service `{h}` has no port {p}"),
            ClusterError::UnknownSubset(h, s) => write!(f, "no DestinationRule defines subset `{s}` of `{h}`"),
        }
    }
}

/// Every destination the engine has sent to, and how to connect.
pub struct Upstreams {
    /// Shared with the tasks that open connections on their own (`pool`).
    pub connector: Arc<Connector>,
    /// Exchanges finished in the background after their client went away.
    pub detached: Arc<Detached>,
    /// The addresses of ServiceEntry hosts of resolution DNS (SPEC GW-3): the endpoints of
    /// those destinations. Kept resolved by the engine's owner (`node::dns::keep_resolved`).
    pub dns: Arc<DnsCache>,
    clusters: Mutex<HashMap<ClusterKey, Arc<Cluster>>>,
}

impl Upstreams {
    pub fn new(connector: Connector) -> Self {
        Self {
            connector: Arc::new(connector),
            detached: Arc::default(),
            dns: Arc::default(),
            clusters: Mutex::new(HashMap::new()),
        }
    }

    /// The cluster for `key` under `model`, built (or rebuilt for a newer model, or new DNS
    /// answers) on demand.
    pub fn cluster(&self, model: &Model, key: &ClusterKey) -> Result<Arc<Cluster>, ClusterError> {
        let mut clusters = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        let previous = clusters.get(key);
        if let Some(c) = previous
            && c.generation == model.generation
            && c.dns_generation.is_none_or(|g| g == self.dns.generation())
        {
            return Ok(c.clone());
        }
        let cluster = Arc::new(build_cluster(model, &self.dns, key, previous.map(Arc::as_ref))?);
        clusters.insert(key.clone(), cluster.clone());
        Ok(cluster)
    }

    /// A destination of one pod, for traffic addressed to the pod's IP.
    pub fn workload_cluster(&self, model: &Model, workload: &Arc<Workload>, port: u16) -> Arc<Cluster> {
        let key = ClusterKey { host: workload.ip.to_string(), subset: None, port };
        let mut clusters = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        let previous = clusters.get(&key);
        if let Some(c) = previous
            && c.generation == model.generation
        {
            return c.clone();
        }
        let addr = SocketAddr::new(workload.ip, port);
        let endpoint = match previous.and_then(|c| c.endpoints.first()) {
            Some(kept) if kept.workload == *workload => kept.clone(),
            _ => Arc::new(UpstreamEndpoint {
                addr,
                workload: workload.clone(),
                health: Health::default(),
                active: AtomicU32::new(0),
                pool: EndpointPool::default(),
            }),
        };
        let cluster = Arc::new(Cluster {
            key: key.clone(),
            service: None,
            protocol: AppProtocol::Unknown,
            policy: EffectivePolicy::default(),
            balancer: Balancer::new(None, &[addr]),
            endpoints: vec![endpoint],
            limits: previous.map(|c| c.limits.clone()).unwrap_or_default(),
            origination: None,
            generation: model.generation,
            dns_generation: None,
        });
        clusters.insert(key, cluster.clone());
        cluster
    }

    /// Forgets clusters of hosts the model no longer has (their connections close as the last
    /// request on them ends).
    pub fn retain_known(&self, model: &Model) {
        let mut clusters = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        clusters.retain(|key, c| c.service.is_none() || model.service_by_host(&key.host).is_some());
    }

    /// Every cluster built so far (for the admin API).
    pub fn snapshot(&self) -> Vec<Arc<Cluster>> {
        self.clusters.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }
}

fn build_cluster(
    model: &Model,
    dns: &DnsCache,
    key: &ClusterKey,
    previous: Option<&Cluster>,
) -> Result<Cluster, ClusterError> {
    let service = model.service_by_host(&key.host).ok_or_else(|| ClusterError::UnknownHost(key.host.clone()))?;
    let port = service.port(key.port).ok_or_else(|| ClusterError::UnknownPort(key.host.clone(), key.port))?;
    let rule = model.routing.destination_rule_for(&key.host);
    let labels = match &key.subset {
        None => None,
        Some(name) => Some(
            &rule
                .and_then(|r| r.subset(name))
                .ok_or_else(|| ClusterError::UnknownSubset(key.host.clone(), name.clone()))?
                .labels,
        ),
    };
    let policy = rule.map(|r| r.policy_for(key.subset.as_deref(), key.port)).unwrap_or_default();
    // Pools hold connections of one kind of TLS: new settings start with new endpoints.
    let same_tls = previous.is_some_and(|c| c.policy.tls == policy.tls);
    let origination = match previous.and_then(|c| c.origination.as_ref()) {
        Some(kept) if same_tls => Some(kept.clone()),
        _ => Origination::new(policy.tls.as_ref(), &key.host).map(Arc::new),
    };
    let old: HashMap<SocketAddr, &Arc<UpstreamEndpoint>> =
        previous.filter(|_| same_tls).map(|c| c.endpoints.iter().map(|e| (e.addr, e)).collect()).unwrap_or_default();
    // A ServiceEntry of resolution DNS: its names' addresses, as last resolved, are the
    // endpoints, outside the mesh (SPEC GW-3). The generation is read first: answers newer than
    // it only cause one rebuild too many.
    let dns_generation = dns.generation();
    let dns_entry =
        service.entry.as_ref().filter(|e| matches!(e.resolution, Resolution::Dns | Resolution::DnsRoundRobin));
    let resolved: Vec<(SocketAddr, Arc<Workload>)> = dns_entry
        .map(|entry| {
            entry
                .dns
                .iter()
                .flat_map(|d| dns.addresses(&d.name).into_iter().map(move |ip| SocketAddr::new(ip, d.target(key.port))))
                .map(|addr| {
                    let workload = match old.get(&addr) {
                        Some(kept) => kept.workload.clone(),
                        None => Arc::new(entry_workload(&service.namespace, addr.ip(), Default::default(), None)),
                    };
                    (addr, workload)
                })
                .collect()
        })
        .unwrap_or_default();
    let listed = port.endpoints.iter().map(|e| (e.addr(), e.workload.clone()));
    let endpoints: Vec<Arc<UpstreamEndpoint>> = listed
        .chain(resolved)
        .filter(|(_, w)| labels.is_none_or(|l| l.iter().all(|(k, v)| w.labels.get(k) == Some(v))))
        .map(|(addr, workload)| {
            match old.get(&addr) {
                // Same pod, same identity: keep its health and connections.
                Some(kept) if kept.workload == workload => (*kept).clone(),
                _ => Arc::new(UpstreamEndpoint {
                    addr,
                    workload,
                    health: Health::default(),
                    active: AtomicU32::new(0),
                    pool: EndpointPool::default(),
                }),
            }
        })
        .collect();
    if let Some(o) = &origination
        && endpoints.iter().any(|e| e.workload.reached_over_hbone())
    {
        // As in Istio, TLS inside the mesh's mTLS would be encrypted twice: HBONE is kept.
        tracing::warn!(
            cluster = %key.name(),
            mode = ?o.settings.mode,
            "DestinationRule tls applies to endpoints outside the mesh; endpoints in the mesh keep HBONE"
        );
    }
    let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
    Ok(Cluster {
        key: key.clone(),
        service: Some(service.clone()),
        protocol: port.protocol,
        balancer: Balancer::new(policy.load_balancer.as_ref(), &addrs),
        policy,
        endpoints,
        limits: previous.map(|c| c.limits.clone()).unwrap_or_default(),
        origination,
        generation: model.generation,
        dns_generation: dns_entry.map(|_| dns_generation),
    })
}
