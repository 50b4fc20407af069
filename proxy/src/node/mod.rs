//! `strait node`: the per-node proxy. It loads the capture programs, keeps them in step with
//! the configuration, and proxies every connection they hand it.

pub(crate) mod copy;
pub use copy::FastPath;
pub(crate) mod dns;
mod handover;
pub(crate) mod inbound;
mod live;
mod outbound;
mod peek;
pub(crate) mod policy;

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use strait_ebpf_common::{
    HBONE_PORT, INBOUND_PLAINTEXT_PORT, LISTENER_HBONE, LISTENER_INBOUND_PLAINTEXT, LISTENER_OUTBOUND, OUTBOUND_PORT,
};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{error, info, warn};

use crate::{
    admin::{self, AdminState, OperatorEndpoints, Readiness},
    admission::{self, Gate, LimitSettings, ListenerLimits},
    capture::{self, Capture, SteerRouting},
    hbone::HbonePool,
    identity::{
        BearerToken, CaClientOptions, CaServerOptions, CertStore, CertificateProvider, ClientCertSlot, IstioCaClient,
        LocalCa, serve_ca,
    },
    model::{self, Model, ModelHandle},
    sys,
    telemetry::{
        AccessLog, AccessLogFormat, MetricsRegistry, ScrapedCounters, ScrapedGauge, Telemetry, TracingOptions,
        TrafficMap, logging::LogControl,
    },
    xds::{
        ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, L7_TYPE_URL,
        client::{SharedStatus, XdsClientOptions},
    },
};

/// How often capture is reconciled with the routing table even without a config change, so a
/// pod whose veth appears after its YAML is captured promptly.
const RECONCILE_EVERY: Duration = Duration::from_millis(300);

/// Command-line settings of `strait node`.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub source: ConfigSource,
    pub node_name: String,
    /// Admin API, metrics and readiness.
    pub endpoints: OperatorEndpoints,
    pub access_log_format: AccessLogFormat,
    /// File the access lines are appended to; stdout when `None`.
    pub access_log: Option<PathBuf>,
    /// The process's log filter, for the admin API's `/logging`.
    pub logging: Option<LogControl>,
    pub trust_domain: String,
    /// Where workload certificates come from.
    pub ca: CaSource,
    /// Lifetime of workload certificates.
    pub cert_ttl: Duration,
    /// The node's uplink; found from the routing table when not given.
    pub uplink: Option<String>,
    /// Where the eBPF maps and links are pinned (a directory on bpffs).
    pub bpf_pin_dir: PathBuf,
    /// Remove capture when stopping, instead of leaving it pinned for the next run.
    pub detach_on_exit: bool,
    /// Limits on connections from the network, before any handshake (OPS-4).
    pub limits: LimitSettings,
    /// The open-file limit to run with; as high as allowed when `None`.
    pub max_open_files: Option<u64>,
    /// On SIGTERM, how long open connections may take to finish (OPS-3).
    pub drain_timeout: Duration,
    /// Unix socket a successor takes the listening sockets over from (OPS-3).
    pub handover_socket: PathBuf,
    /// The source address of outbound HBONE connections.
    pub hbone_source: HboneSource,
    /// Whether admitted plain TCP connections are moved in the kernel (splice).
    pub fast_path: FastPath,
    /// Spans of tunnelled connections over OTLP (OBS-7); none when `None`.
    pub tracing: Option<TracingOptions>,
}

/// The source address outbound HBONE connections leave from (L4-6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum HboneSource {
    /// The client pod's own address (transparent bind; IPv4 only, IPv6 leaves from the node),
    /// as Istio ambient does: peers and firewalls between nodes see the pod.
    #[default]
    Pod,
    /// The node's address, for platforms that drop or rewrite host-sent packets with a pod's
    /// source.
    Node,
}

/// Where a proxy's configuration comes from (CFG-1, CFG-2).
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// A directory of YAML, watched; a configuration capturing no workload is held back for
    /// `empty_config_hold` (OPS-5).
    Directory { dir: PathBuf, empty_config_hold: Duration },
    /// A control plane's delta ADS (`strait control`, or istiod).
    ControlPlane(ControlPlane),
}

/// How to follow a control plane.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    /// `[https://]host[:port]`.
    pub address: String,
    /// PEM roots the control plane's certificate chains to.
    pub root: PathBuf,
    /// The name to verify in its certificate, when not the address's host.
    pub server_name: Option<String>,
    /// Bootstrap or Kubernetes token (until the proxy holds a certificate of its own).
    pub token: Option<BearerToken>,
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Directory { dir, .. } => write!(f, "{}", dir.display()),
            Self::ControlPlane(cp) => write!(f, "xDS {}", cp.address),
        }
    }
}

impl ControlPlane {
    /// The xDS client's settings: subscribing to `type_urls` as `node`.
    pub fn client_options(
        &self,
        node: strait_proto::envoy::config::core::v3::Node,
        type_urls: &[&str],
        client_cert: Option<Arc<ClientCertSlot>>,
    ) -> XdsClientOptions {
        XdsClientOptions {
            address: self.address.clone(),
            root: self.root.clone(),
            server_name: self.server_name.clone(),
            token: self.token.clone(),
            client_cert,
            node,
            type_urls: type_urls.iter().map(|t| (*t).to_owned()).collect(),
            optional_type_urls: Vec::new(),
        }
    }
}

/// Where the node proxy gets workload certificates (ID-1, ID-2).
#[derive(Debug, Clone)]
pub enum CaSource {
    /// The built-in CA, kept in `dir`; with `listen`, also served over Istio's CA API to other
    /// proxies presenting `token`.
    Local { dir: PathBuf, listen: Option<SocketAddr>, token: Option<String> },
    /// A remote CA speaking Istio's CA API (istiod, `strait control`, or another strait node).
    Remote { address: String, root: PathBuf, token: Option<BearerToken>, server_name: Option<String> },
}

impl CaSource {
    /// The remote CA's client, presenting `client_cert` once it holds one.
    pub fn remote_client(
        &self,
        client_cert: Option<Arc<ClientCertSlot>>,
    ) -> Result<Option<Arc<IstioCaClient>>, crate::identity::IdentityError> {
        let Self::Remote { address, root, token, server_name } = self else { return Ok(None) };
        let options = CaClientOptions { token: token.clone(), server_name: server_name.clone(), client_cert };
        Ok(Some(Arc::new(IstioCaClient::new(address, root, options)?)))
    }
}

/// What every connection handler needs.
pub struct NodeContext {
    pub model: ModelHandle,
    /// Access lines and metrics: `opened`/`closed` once per connection.
    pub telemetry: Telemetry,
    pub node_name: String,
    pub trust_domain: String,
    pub certs: Arc<CertStore>,
    pub pool: Arc<HbonePool>,
    /// Open inbound connections, decided again when policy changes.
    pub live: Arc<live::LiveConnections>,
    /// Connections being served, all listeners together, for the drain.
    pub in_flight: Arc<AtomicUsize>,
    /// Turns true when the proxy drains: HBONE connections get GOAWAY, so peers move their
    /// new streams to a fresh connection (the successor's, after a handover).
    pub draining: watch::Receiver<bool>,
    /// What ServiceEntry hosts of resolution DNS resolve to (GW-3).
    pub dns: Arc<dns::DnsCache>,
    /// The source address of outbound HBONE connections.
    pub hbone_source: HboneSource,
}

/// Counts one connection as in flight while it lives.
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The admission gates of the three listeners.
struct Gates {
    hbone: Arc<Gate>,
    plaintext: Arc<Gate>,
    outbound: Arc<Gate>,
}

impl Gates {
    fn new(limits: &ListenerLimits) -> Self {
        Self {
            hbone: Gate::new("hbone", limits.handshakes),
            plaintext: Gate::new("inbound_plaintext", limits.plaintext),
            outbound: Gate::new("outbound", limits.outbound),
        }
    }
}

pub async fn run(options: NodeOptions) -> anyhow::Result<()> {
    sys::check_node_privileges().map_err(|e| anyhow!(e))?;
    let fd_limit = sys::set_fd_limit(options.max_open_files);
    let limits = options.limits.resolve(fd_limit);
    copy::set_fast_path(options.fast_path);

    // The proxy's own certificate, once it has one, authenticates it to the control plane.
    let own_cert = matches!(options.source, ConfigSource::ControlPlane(_)).then(|| Arc::new(ClientCertSlot::default()));
    let remote_ca = options.ca.remote_client(own_cert.clone())?;
    let provider = certificate_provider(&options, remote_ca.clone()).await?;
    let certs = CertStore::new(provider, options.cert_ttl);
    let (model, xds) = match &options.source {
        ConfigSource::Directory { dir, empty_config_hold } => {
            (model::reload::load_and_watch(dir, *empty_config_hold)?, None)
        }
        ConfigSource::ControlPlane(control_plane) => {
            if let (Some(ca), Some(slot)) = (remote_ca, &own_cert) {
                obtain_own_certificate(ca, &options, slot.clone()).await;
            }
            let node = xds_node(&options.node_name);
            let mut client = control_plane.client_options(node, &[ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL], own_cert);
            // The `mesh` routes of ServiceEntry hosts (GW-3), which `strait control` serves and
            // istiod does not.
            client.optional_type_urls = vec![L7_TYPE_URL.to_owned()];
            info!(address = %control_plane.address, "waiting for the configuration from the control plane");
            let (model, status) = crate::xds::client::follow(client, &options.trust_domain).await?;
            (model, Some(status))
        }
    };

    let mut capture = Capture::load(&options.bpf_pin_dir)?;
    let routing =
        SteerRouting::install().map_err(|e| anyhow!("cannot install policy routing for captured traffic: {e}"))?;
    let (listeners, predecessor) = listeners(&options.handover_socket)?;
    capture.set_listener(LISTENER_OUTBOUND, &listeners.outbound)?;
    capture.set_listener(LISTENER_HBONE, &listeners.hbone)?;
    capture.set_listener(LISTENER_INBOUND_PLAINTEXT, &listeners.plaintext)?;
    let uplink = match &options.uplink {
        Some(name) => Some(name.clone()),
        None => capture::uplink_interface().context("cannot read the routing table")?,
    };
    match &uplink {
        Some(name) => capture.attach_uplink(name)?,
        None => warn!(
            "no uplink found (no default route nor any route through a gateway): \
             HBONE from other nodes will not reach this proxy; pass --uplink"
        ),
    }
    let capture = Arc::new(Mutex::new(capture));
    reconcile(&capture, &model.current(), &options.node_name);
    prefetch_certificates(&certs, &model.current(), &options.node_name, &options.trust_domain);

    let pool = HbonePool::new(certs.clone());
    // Turns true once a successor has the listeners: this process then only drains.
    let (handed_over_tx, handed_over) = watch::channel(false);
    tokio::spawn(keep_capture_in_step(
        capture.clone(),
        model.clone(),
        options.node_name.clone(),
        certs.clone(),
        pool.clone(),
        options.trust_domain.clone(),
        handed_over.clone(),
    ));
    let gates = Gates::new(&limits);
    let (drain_tx, draining) = watch::channel(false);
    let (telemetry, ready, serving) =
        serve_operator_endpoints(&options, &model, &capture, &certs, &pool, &gates, xds).await?;

    let ctx = Arc::new(NodeContext {
        model,
        telemetry,
        node_name: options.node_name.clone(),
        trust_domain: options.trust_domain.clone(),
        pool,
        certs,
        live: Arc::default(),
        in_flight: Arc::default(),
        draining,
        dns: Arc::default(),
        hbone_source: options.hbone_source,
    });
    tokio::spawn(recheck_on_change(ctx.clone()));
    tokio::spawn(dns::keep_resolved(ctx.dns.clone(), ctx.model.clone()));
    let fds = [listeners.outbound.as_raw_fd(), listeners.plaintext.as_raw_fd(), listeners.hbone.as_raw_fd()];
    let (stop_accepting, accepting) = watch::channel(false);
    accept_all(&ctx, listeners, &gates, accepting)?;
    if let Some(predecessor) = predecessor {
        predecessor.confirm();
    }
    // Not fatal: without it a successor binds listeners of its own (SO_REUSEPORT) instead.
    if let Err(e) = handover::serve(options.handover_socket.clone(), fds, move || {
        let _ = handed_over_tx.send(true);
    }) {
        warn!(
            socket = %options.handover_socket.display(),
            "cannot serve listener handover: {e}; a restart will open new listeners instead"
        );
    }
    ready.set_ready();
    info!(
        node = %options.node_name,
        config = %options.source,
        "strait node ready; capturing on port {OUTBOUND_PORT} (open-file limit {fd_limit}; limits: {limits:?})"
    );

    let mut serving = Some(serving);
    let stopping = Stopping { ready: &ready, stop_accepting: &stop_accepting, drain: &drain_tx, serving: &mut serving };
    let handed_over = wait_for_shutdown(&ctx, stopping, handed_over, options.drain_timeout).await?;
    let _ = stop_accepting.send(true);
    let left = ctx.in_flight.load(Ordering::Acquire);
    if left > 0 {
        warn!(connections = left, "drain timeout reached: closing the connections still open");
    }
    match capture.lock() {
        Ok(mut c) => {
            info!(stats = ?c.stats(), "final capture counters");
            // After a handover the capture and its routing belong to the successor.
            c.release(options.detach_on_exit && !handed_over, !handed_over);
        }
        Err(_) => error!("capture state was poisoned"),
    }
    drop(capture);
    if handed_over {
        std::mem::forget(routing);
    } else {
        drop(routing);
    }
    ctx.telemetry.flush();
    info!("stopped");
    Ok(())
}

/// The listening sockets: the running node proxy's, when one hands them over (OPS-3), else new.
fn listeners(
    handover_socket: &std::path::Path,
) -> anyhow::Result<(handover::Listeners, Option<handover::Predecessor>)> {
    match handover::take_over(handover_socket) {
        Ok(Some((listeners, predecessor))) => {
            info!(socket = %handover_socket.display(), "took over the listening sockets of the running strait node");
            return Ok((listeners, Some(predecessor)));
        }
        Ok(None) => {}
        Err(e) => warn!(
            socket = %handover_socket.display(),
            "cannot take the listeners over from the running strait node ({e}); opening new ones"
        ),
    }
    let bind = |port: u16, what: &str| {
        sys::transparent_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
            .with_context(|| format!("cannot listen on the {what} port {port}"))
    };
    let listeners = handover::Listeners {
        outbound: bind(OUTBOUND_PORT, "outbound capture")?,
        plaintext: bind(INBOUND_PLAINTEXT_PORT, "inbound plaintext")?,
        hbone: bind(HBONE_PORT, "HBONE")?,
    };
    Ok((listeners, None))
}

/// One accept loop per listener, so a listener out of descriptors never holds up the others.
fn accept_all(
    ctx: &Arc<NodeContext>,
    listeners: handover::Listeners,
    gates: &Gates,
    accepting: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let tokio_listener = |l: std::net::TcpListener| TcpListener::from_std(l).context("cannot use a listening socket");
    let outbound = tokio_listener(listeners.outbound)?;
    let plaintext = tokio_listener(listeners.plaintext)?;
    let hbone = tokio_listener(listeners.hbone)?;
    let (c, gate, stop) = (ctx.clone(), gates.outbound.clone(), accepting.clone());
    tokio::spawn(async move {
        admission::accept_loop("outbound", &outbound, Some(&gate), stop, |stream, peer, pass| {
            let flight = InFlight::new(&c.in_flight);
            let c = c.clone();
            tokio::spawn(async move {
                outbound::handle(c, stream, peer).await;
                drop((pass, flight));
            });
        })
        .await;
    });
    let (c, gate, stop) = (ctx.clone(), gates.plaintext.clone(), accepting.clone());
    tokio::spawn(async move {
        admission::accept_loop("inbound plaintext", &plaintext, Some(&gate), stop, |stream, peer, pass| {
            let flight = InFlight::new(&c.in_flight);
            let c = c.clone();
            tokio::spawn(async move {
                inbound::serve_plaintext(c, stream, peer).await;
                drop((pass, flight));
            });
        })
        .await;
    });
    let (c, gate) = (ctx.clone(), gates.hbone.clone());
    tokio::spawn(async move {
        admission::accept_loop("HBONE", &hbone, Some(&gate), accepting, |stream, peer, pass| {
            let flight = InFlight::new(&c.in_flight);
            let c = c.clone();
            tokio::spawn(async move {
                inbound::serve_hbone(c, stream, peer, pass).await;
                drop(flight);
            });
        })
        .await;
    });
    Ok(())
}

/// What a drain turns off.
struct Stopping<'a> {
    ready: &'a Readiness,
    stop_accepting: &'a watch::Sender<bool>,
    drain: &'a watch::Sender<bool>,
    serving: &'a mut Option<admin::Serving>,
}

/// Serves until told to stop, and drains (OPS-3): on SIGTERM or SIGINT the proxy is no longer
/// ready and keeps serving, new connections included (none is refused or left in a queue
/// while no successor runs), until a successor takes the listeners over; it stops once no
/// connection is open, or when `drain_timeout` is over. A second signal stops it at once.
/// Returns whether a successor took over.
async fn wait_for_shutdown(
    ctx: &NodeContext,
    stopping: Stopping<'_>,
    mut handed_over: watch::Receiver<bool>,
    drain_timeout: Duration,
) -> anyhow::Result<bool> {
    let mut terminate = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let mut deadline: Option<Instant> = None;
    let mut handed = false;
    loop {
        tokio::select! {
            _ = async { tokio::select! { _ = terminate.recv() => {}, _ = interrupt.recv() => {} } } => {
                if deadline.is_some() {
                    info!("second signal: stopping now");
                    return Ok(handed);
                }
                stopping.ready.set_not_ready();
                let _ = stopping.drain.send(true);
                deadline = Some(Instant::now() + drain_timeout);
                info!(
                    connections = ctx.in_flight.load(Ordering::Acquire),
                    "draining: stopping once open connections have finished (--drain-timeout {drain_timeout:?})"
                );
            }
            changed = handed_over.wait_for(|h| *h), if !handed => {
                if changed.is_ok() {
                    handed = true;
                    stopping.ready.set_not_ready();
                    let _ = stopping.stop_accepting.send(true);
                    let _ = stopping.drain.send(true);
                    // The successor answers the operator endpoints from now on.
                    if let Some(serving) = stopping.serving.take() {
                        serving.close();
                    }
                }
            }
            () = tokio::time::sleep(Duration::from_millis(50)), if deadline.is_some() => {
                let over = deadline.is_some_and(|d| Instant::now() >= d);
                if over || ctx.in_flight.load(Ordering::Acquire) == 0 {
                    return Ok(handed);
                }
            }
        }
    }
}

/// The node proxy's own certificate (naming its node), asked for with the bootstrap or
/// Kubernetes token and kept renewed; waits for the first attempt, as the xDS stream is better
/// opened with it, but carries on with the token if it fails.
async fn obtain_own_certificate(ca: Arc<IstioCaClient>, options: &NodeOptions, slot: Arc<ClientCertSlot>) {
    let (first_tx, first) = tokio::sync::oneshot::channel();
    let identity = own_identity(&options.trust_domain);
    tokio::spawn(crate::identity::keep_own_certificate(ca, identity, options.cert_ttl, slot, first_tx));
    match tokio::time::timeout(Duration::from_secs(10), first).await {
        Ok(Ok(Ok(()))) => {}
        _ => warn!("no certificate of this node proxy yet: authenticating to the control plane with the token"),
    }
}

/// The node proxy's identity: its pod's service account where Kubernetes' downward API names
/// it (`POD_NAMESPACE` and `SERVICE_ACCOUNT`, as ztunnel reads them), which is what its
/// Kubernetes token proves (ID-2); else the node proxies' identity bootstrap tokens give
/// (`spiffe://<td>/ns/istio-system/sa/ztunnel`).
fn own_identity(trust_domain: &str) -> crate::identity::Identity {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    match (env("POD_NAMESPACE"), env("SERVICE_ACCOUNT")) {
        (Some(namespace), Some(account)) => crate::identity::Identity::new(trust_domain, &namespace, &account),
        _ => crate::identity::node_proxy_identity(trust_domain),
    }
}

/// The `node` this proxy subscribes as, shaped as ztunnel's (Kubernetes' downward-API
/// variables when set, as ztunnel reads them).
fn xds_node(node_name: &str) -> strait_proto::envoy::config::core::v3::Node {
    let env = |name: &str, default: String| std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or(default);
    crate::xds::client::proxy_node(
        "ztunnel",
        &env("INSTANCE_IP", "0.0.0.0".into()),
        &env("POD_NAME", format!("strait-node-{node_name}")),
        &env("POD_NAMESPACE", crate::identity::caller::NODE_PROXY_NAMESPACE.into()),
        Some(node_name),
        &[],
    )
}

async fn certificate_provider(
    options: &NodeOptions,
    remote: Option<Arc<IstioCaClient>>,
) -> anyhow::Result<Arc<dyn CertificateProvider>> {
    if let Some(remote) = remote {
        info!("workload certificates come from a remote CA");
        return Ok(remote);
    }
    match &options.ca {
        CaSource::Local { dir, listen, token } => {
            let ca = Arc::new(LocalCa::load_or_create(dir, &options.trust_domain)?);
            if let Some(addr) = listen {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for the CA API on {addr}"))?;
                if token.is_none() {
                    warn!("the CA API on {addr} has no token (--ca-token-file): it will refuse every request");
                }
                let ip_sans = if addr.ip().is_unspecified() { Vec::new() } else { vec![addr.ip()] };
                let server_options = CaServerOptions {
                    token: token.clone(),
                    default_ttl: options.cert_ttl,
                    ip_sans,
                    ..Default::default()
                };
                let serving = ca.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_ca(listener, serving, server_options).await {
                        error!("the CA API stopped: {e}");
                    }
                });
                info!(%addr, "serving Istio's CA API (istio.v1.auth.IstioCertificateService)");
            }
            Ok(ca)
        }
        CaSource::Remote { address, root, token, server_name } => {
            let client = IstioCaClient::new(
                address,
                root,
                CaClientOptions { token: token.clone(), server_name: server_name.clone(), client_cert: None },
            )?;
            info!(%address, "workload certificates come from a remote CA");
            Ok(Arc::new(client))
        }
    }
}

/// Late rejection (L4-7): every new configuration is applied to the open connections too.
async fn recheck_on_change(ctx: Arc<NodeContext>) {
    let mut model = ctx.model.clone();
    while model.changed().await {
        ctx.live.recheck(&model.current());
    }
}

/// Opens the access log and serves the admin API, metrics and readiness (OBS-1 to OBS-3).
async fn serve_operator_endpoints(
    options: &NodeOptions,
    model: &ModelHandle,
    capture: &Arc<Mutex<Capture>>,
    certs: &Arc<CertStore>,
    pool: &Arc<HbonePool>,
    gates: &Gates,
    xds: Option<SharedStatus>,
) -> anyhow::Result<(Telemetry, Readiness, admin::Serving)> {
    let access_log = AccessLog::open(options.access_log_format, options.access_log.as_deref())?;
    let mut metrics = MetricsRegistry::new();
    let reader = capture.clone();
    metrics.register(ScrapedCounters::each("strait_capture", "Counter of the eBPF capture programs", move || {
        reader.lock().map(|c| c.stats()).unwrap_or_default()
    }));
    let reader = capture.clone();
    metrics.register(ScrapedCounters::by_label(
        "strait_xdp_drops",
        "Packets the XDP guard on the uplink dropped, by reason (CAP-4)",
        "reason",
        move || {
            let stats = reader.lock().map(|c| c.stats()).unwrap_or_default();
            stats.into_iter().filter_map(|(name, v)| Some((name.strip_prefix("xdp_drop_")?, v))).collect::<Vec<_>>()
        },
    ));
    let gates = [gates.hbone.clone(), gates.plaintext.clone(), gates.outbound.clone()];
    metrics.register(admission::refusal_counters(gates.to_vec()));
    metrics.register(crate::hbone::server::handshake_failure_counters());
    metrics.register(outbound::refusal_counters());
    metrics.register(copy::fast_path_counters());
    let reader = pool.clone();
    metrics.register_gauge(ScrapedGauge::new(
        "strait_hbone_pool_connections",
        "Outbound HBONE connections pooled by this node proxy (one per source pod and destination address, L4-6)",
        move || i64::try_from(reader.connection_count()).unwrap_or(i64::MAX),
    ));
    metrics.register_gauges(certs.expiry_gauges());
    let map = Arc::new(TrafficMap::new(format!("node {}", options.node_name)));
    let tracer = match &options.tracing {
        Some(tracing) => {
            Some(tracing.start("strait-node".into(), options.node_name.clone(), &mut metrics).map_err(|e| anyhow!(e))?)
        }
        None => None,
    };
    let telemetry = Telemetry::new(access_log, metrics.traffic(), map.clone()).with_tracer(tracer);
    let ready = Readiness::default();
    let state = AdminState {
        model: model.clone(),
        capture: Some(capture.clone()),
        clusters: None,
        hbone: {
            let pool = pool.clone();
            Some(Arc::new(move || serde_json::to_string(&pool.connections()).unwrap_or_else(|_| "[]".into())))
        },
        map: Some(Arc::new(move || map.json())),
        certs: certs.clone(),
        node_name: options.node_name.clone(),
        waypoint: None,
        trust_domain: options.trust_domain.clone(),
        logging: options.logging.clone(),
        ready: ready.clone(),
        xds,
    };
    let serving = admin::start(&options.endpoints, state, metrics).await?;
    Ok((telemetry, ready, serving))
}

/// Issues certificates for this node's captured workloads before their first connection, so
/// that no connection waits for the CA.
fn prefetch_certificates(certs: &Arc<CertStore>, model: &Model, node: &str, trust_domain: &str) {
    certs.prefetch(model.workloads_on(node).filter(|w| w.captured).map(|w| w.identity(trust_domain)));
}

async fn keep_capture_in_step(
    capture: Arc<Mutex<Capture>>,
    mut model: ModelHandle,
    node: String,
    certs: Arc<CertStore>,
    pool: Arc<HbonePool>,
    trust_domain: String,
    mut handed_over: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            changed = model.changed() => {
                if !changed { return }
                prefetch_certificates(&certs, &model.current(), &node, &trust_domain);
            }
            _ = tokio::time::sleep(RECONCILE_EVERY) => {}
            // The successor keeps capture in step from now on.
            _ = handed_over.wait_for(|h| *h) => return,
        }
        let current = model.current();
        // Off the data path's thread: a pass dumps the node's links, routes and neighbours over
        // netlink and syncs the eBPF maps. Measured at 0.08-0.35 ms per pass (median 0.14) on
        // the bench's two nodes of three pods each, three passes a second, and it grows with the
        // pods of the node: run inline on the proxy's single runtime thread, every connection
        // of the node would wait for it.
        let (capture_now, node_now, model_now) = (capture.clone(), node.clone(), current.clone());
        if tokio::task::spawn_blocking(move || reconcile(&capture_now, &model_now, &node_now)).await.is_err() {
            error!("a capture reconcile pass panicked; the next pass tries again");
        }
        pool.retain_sources(&current.workloads_on(&node).filter(|w| w.captured).map(|w| w.ip).collect());
    }
}

fn reconcile(capture: &Mutex<Capture>, model: &Model, node: &str) {
    let Ok(mut capture) = capture.lock() else {
        error!("capture state was poisoned; capture is no longer updated");
        return;
    };
    match capture.pod_interfaces(model, node) {
        Ok(interfaces) => capture.reconcile(model, node, &interfaces, &policy::kernel_policy(model, node)),
        Err(e) => warn!("cannot read the node's routes, links or neighbours: {e}"),
    }
}
