//! `strait waypoint`: the L7 proxy of a namespace (L7-1). Node proxies send it the traffic
//! of services (and pods) labelled `istio.io/use-waypoint`, over HBONE with the service VIP as
//! the CONNECT target; it applies the VirtualServices, DestinationRules and L7 policies in
//! force and opens HBONE, as its own identity, to the endpoint it chose.
//!
//! It runs in its own pod, which nothing captures: it listens on 15008 like any HBONE peer.

mod admin_views;
pub(crate) mod inbound;
pub(crate) mod sniff;
mod tcp;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use http::HeaderValue;
use strait_ebpf_common::HBONE_PORT;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    admin::{self, AdminState, OperatorEndpoints, Readiness},
    admission::{self, Gate, LimitSettings},
    hbone::HbonePool,
    identity::{CertStore, CertificateProvider, ClientCertSlot, Identity, LocalCa},
    l7::{
        L7Context,
        authn::Authn,
        limits::HttpLimits,
        request_body::BodyBudget,
        upstream::{Connector, Upstreams},
    },
    model::{self, ModelHandle, WaypointName},
    node::{CaSource, ConfigSource},
    sys,
    telemetry::{
        AccessLog, AccessLogFormat, MetricsRegistry, Reporter, RequestTelemetry, Telemetry, TracingOptions, TrafficMap,
        logging::LogControl,
    },
    xds::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, L7_TYPE_URL},
};

/// Command-line settings of `strait waypoint`.
#[derive(Debug, Clone)]
pub struct WaypointOptions {
    pub source: ConfigSource,
    pub name: String,
    pub namespace: String,
    /// The service account whose identity the waypoint holds (default: its name).
    pub service_account: String,
    pub trust_domain: String,
    pub ca: CaSource,
    pub cert_ttl: Duration,
    /// Admin API, metrics and readiness.
    pub endpoints: OperatorEndpoints,
    pub access_log_format: AccessLogFormat,
    pub access_log: Option<PathBuf>,
    pub logging: Option<LogControl>,
    /// Value of the `server` header on responses that have none (L7-9); `None` adds nothing.
    pub server_header: Option<String>,
    /// On SIGTERM, how long streams in flight may take to finish.
    pub drain_timeout: Duration,
    /// Limits on connections from the network, before any handshake (OPS-4).
    pub limits: LimitSettings,
    /// The open-file limit to run with; as high as allowed when `None`.
    pub max_open_files: Option<u64>,
    /// Client-side timeouts and the buffered-body budget of the HTTP listener (OPS-4).
    pub http_limits: HttpLimits,
    /// Spans of requests over OTLP (OBS-7); none when `None`.
    pub tracing: Option<TracingOptions>,
}

/// What each HBONE stream handler needs.
pub struct WaypointContext {
    pub name: WaypointName,
    pub trust_domain: String,
    pub model: ModelHandle,
    pub l7: Arc<L7Context>,
    /// Connection-level telemetry, for TCP routes.
    pub telemetry: Telemetry,
    /// CONNECT streams being served, for a graceful drain.
    pub active_streams: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts one CONNECT stream as active while it lives.
pub struct ActiveStream(Arc<std::sync::atomic::AtomicUsize>);

impl ActiveStream {
    pub fn new(counter: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(counter.clone())
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// What a waypoint and a gateway start alike (GW-1: a gateway is this engine behind other
/// listeners): identity and certificates, the configuration, telemetry, the L7 engine, the
/// operator endpoints.
pub(crate) struct Engine {
    pub ctx: Arc<WaypointContext>,
    pub certs: Arc<CertStore>,
    pub identity: Identity,
    pub gate: Arc<Gate>,
    /// A gateway's admission of client connections (`None` for a waypoint).
    pub clients: Option<Arc<Gate>>,
    pub ready: Readiness,
    pub drain_tx: tokio::sync::watch::Sender<bool>,
    pub fd_limit: u64,
}

impl Engine {
    /// Starts everything but the listeners; `reporter` and `gateway` are the L7 engine's.
    pub(crate) async fn start(
        options: &WaypointOptions,
        reporter: Reporter,
        gateway: String,
    ) -> anyhow::Result<Engine> {
        let fd_limit = sys::set_fd_limit(options.max_open_files);
        let limits = options.limits.resolve(fd_limit);
        let name = WaypointName { namespace: options.namespace.clone(), name: options.name.clone() };
        let identity = Identity::new(&options.trust_domain, &options.namespace, &options.service_account);
        // The proxy's own certificate, once held, authenticates it to the control plane.
        let own_cert =
            matches!(options.source, ConfigSource::ControlPlane(_)).then(|| Arc::new(ClientCertSlot::default()));
        let certs = CertStore::new(certificate_provider(options, own_cert.clone()).await?, options.cert_ttl);
        let tls = certs.get(&identity).await.with_context(|| format!("cannot obtain a certificate for {identity}"))?;
        let (model, xds) = match &options.source {
            ConfigSource::Directory { dir, empty_config_hold } => {
                (model::reload::load_and_watch(dir, *empty_config_hold)?, None)
            }
            ConfigSource::ControlPlane(control_plane) => {
                let slot = own_cert.unwrap_or_default();
                slot.set(&tls.cert)?;
                tokio::spawn(keep_client_cert(certs.clone(), identity.clone(), slot.clone()));
                let client = control_plane.client_options(
                    xds_node(&name, matches!(reporter, Reporter::Waypoint)),
                    &[ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, L7_TYPE_URL],
                    Some(slot),
                );
                info!(address = %control_plane.address, "waiting for the configuration from the control plane");
                let (model, status) = crate::xds::client::follow(client, &options.trust_domain).await?;
                (model, Some(status))
            }
        };
        drop(tls);

        let access_log = AccessLog::open(options.access_log_format, options.access_log.as_deref())?;
        let mut metrics = MetricsRegistry::new();
        let requests = metrics.register_requests();
        let gate = Gate::new("hbone", limits.handshakes);
        // A gateway's clients (GW-1): a connection holds two descriptors like an outbound one,
        // and no limit per source, since an ingress sees many clients behind one load
        // balancer's address.
        let clients = (!matches!(reporter, Reporter::Waypoint)).then(|| {
            Gate::new("gateway", admission::Limits { per_source: limits.outbound.total, total: limits.outbound.total })
        });
        metrics.register(admission::refusal_counters(
            [Some(gate.clone()), clients.clone()].into_iter().flatten().collect(),
        ));
        metrics.register(crate::hbone::server::handshake_failure_counters());
        metrics.register_gauges(certs.expiry_gauges());
        let role = if matches!(reporter, Reporter::Waypoint) { "waypoint" } else { "gateway" };
        let telemetry =
            Telemetry::new(access_log, metrics.traffic(), Arc::new(TrafficMap::new(format!("{role} {name}"))));
        // Istio names a waypoint's spans' service `<name>.<namespace>`.
        let tracer = match &options.tracing {
            Some(tracing) => Some(
                tracing
                    .start(format!("{}.{}", name.name, name.namespace), name.to_string(), &mut metrics)
                    .map_err(|e| anyhow!(e))?,
            ),
            None => None,
        };
        let upstreams = Upstreams::new(Connector {
            hbone: HbonePool::unmarked(certs.clone()),
            identity: identity.clone(),
            trust_domain: options.trust_domain.clone(),
        });
        let server_header = match &options.server_header {
            Some(v) => {
                Some(HeaderValue::from_str(v).map_err(|_| anyhow!("--server-header `{v}` is not a header value"))?)
            }
            None => None,
        };
        // ServiceEntry hosts of resolution DNS, resolved like the node proxy does (SPEC GW-3).
        tokio::spawn(crate::node::dns::keep_resolved(upstreams.dns.clone(), model.clone()));
        let authn = Authn::start(model.clone(), name.clone()).await;
        let (drain_tx, drain) = tokio::sync::watch::channel(false);
        let l7 = Arc::new(L7Context {
            model: model.clone(),
            upstreams,
            authn,
            telemetry: RequestTelemetry::new(telemetry.access_log(), requests, telemetry.map()).with_tracer(tracer),
            reporter,
            gateway,
            waypoint: name.clone(),
            server_header,
            drain,
            limits: options.http_limits,
            body_budget: BodyBudget::new(options.http_limits.body_buffer_budget),
        });
        let ctx = Arc::new(WaypointContext {
            name,
            trust_domain: options.trust_domain.clone(),
            model: model.clone(),
            l7: l7.clone(),
            telemetry,
            active_streams: Arc::default(),
        });
        tokio::spawn(forget_removed_destinations(ctx.clone()));
        let map = ctx.telemetry.map();
        let ready = serve_operator_endpoints(options, &model, &certs, metrics, &l7, map, xds).await?;
        Ok(Engine { ctx, certs, identity, gate, clients, ready, drain_tx, fd_limit })
    }

    /// Serves HBONE on `listener` (peer identity verified), each CONNECT stream to `handle`.
    pub(crate) fn serve_hbone<F, Fut>(
        &self,
        listener: tokio::net::TcpListener,
        accepting: tokio::sync::watch::Receiver<bool>,
        handle: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn(Arc<WaypointContext>, crate::hbone::server::InboundStream) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (ctx, certs, identity, gate) =
            (self.ctx.clone(), self.certs.clone(), self.identity.clone(), self.gate.clone());
        tokio::spawn(async move {
            admission::accept_loop("HBONE", &listener, Some(&gate), accepting, |stream, peer, pass| {
                tokio::spawn(inbound::serve_connection(
                    ctx.clone(),
                    certs.clone(),
                    identity.clone(),
                    stream,
                    peer,
                    pass,
                    handle.clone(),
                ));
            })
            .await;
        })
    }

    /// Runs until SIGTERM or SIGINT, then drains: `stop_accepting` ends the accept loops
    /// (`accepts`), open connections get GOAWAY or close after their request, and what is in
    /// flight may finish for `drain_timeout`.
    pub(crate) async fn run_until_signal(
        self,
        stop_accepting: tokio::sync::watch::Sender<bool>,
        accepts: Vec<tokio::task::JoinHandle<()>>,
        drain_timeout: Duration,
    ) -> anyhow::Result<()> {
        let mut terminate = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        let _ = stop_accepting.send(true);
        for accept in accepts {
            let _ = accept.await;
        }
        self.ready.set_not_ready();
        let _ = self.drain_tx.send(true);
        let deadline = std::time::Instant::now() + drain_timeout;
        let active = || self.ctx.active_streams.load(std::sync::atomic::Ordering::Acquire);
        if active() > 0 {
            info!(
                streams = active(),
                "draining: waiting for open streams to finish (--drain-timeout {drain_timeout:?})"
            );
        }
        while active() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        info!(left = active(), "shutting down");
        self.ctx.telemetry.flush();
        Ok(())
    }
}

pub async fn run(options: WaypointOptions) -> anyhow::Result<()> {
    let engine = Engine::start(&options, Reporter::Waypoint, model::routes::MESH_GATEWAY.to_owned()).await?;
    let name = engine.ctx.name.clone();
    if engine.ctx.model.current().waypoint(&name).is_none() {
        warn!(
            waypoint = %name,
            "no pod of the configuration runs this waypoint (label gateway.networking.k8s.io/gateway-name={}): \
             node proxies will not send it traffic",
            name.name
        );
    }
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, HBONE_PORT));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for HBONE on {addr} (is another proxy running in this pod?)"))?;
    engine.ready.set_ready();
    info!(
        waypoint = %name, identity = %engine.identity,
        "strait waypoint ready on port {HBONE_PORT} (open-file limit {})", engine.fd_limit
    );
    let (stop_accepting, accepting) = tokio::sync::watch::channel(false);
    let accept = engine.serve_hbone(listener, accepting, inbound::handle_stream);
    engine.run_until_signal(stop_accepting, vec![accept], options.drain_timeout).await
}

async fn certificate_provider(
    options: &WaypointOptions,
    client_cert: Option<Arc<ClientCertSlot>>,
) -> anyhow::Result<Arc<dyn CertificateProvider>> {
    Ok(match options.ca.remote_client(client_cert)? {
        Some(remote) => remote,
        None => match &options.ca {
            CaSource::Local { dir, .. } => Arc::new(LocalCa::load_or_create(dir, &options.trust_domain)?),
            CaSource::Remote { .. } => unreachable!("remote_client answers for a remote CA"),
        },
    })
}

/// Keeps the certificate presented to the control plane the waypoint's current one, as the
/// store renews it.
async fn keep_client_cert(certs: Arc<CertStore>, identity: Identity, slot: Arc<ClientCertSlot>) {
    // Renewal happens at half life (hours by default): a minute's lag costs nothing.
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        if let Ok(tls) = certs.get(&identity).await
            && let Err(e) = slot.set(&tls.cert)
        {
            warn!("cannot present the renewed certificate to the control plane: {e}");
        }
    }
}

/// The `node` the proxy subscribes as: Istio's id for a waypoint (or gateway) pod, and metadata
/// naming the waypoint, which is what its L7 resources are chosen by; a gateway names itself with
/// `STRAIT_GATEWAY` instead and gets every L7 resource and Istio Gateway (GW-1), choosing by its
/// labels as it does from a directory.
fn xds_node(name: &WaypointName, waypoint: bool) -> strait_proto::envoy::config::core::v3::Node {
    let env = |var: &str, default: String| std::env::var(var).ok().filter(|v| !v.is_empty()).unwrap_or(default);
    let (kind, key) = if waypoint {
        ("waypoint", crate::xds::resources::WAYPOINT_METADATA)
    } else {
        ("router", crate::xds::resources::GATEWAY_METADATA)
    };
    crate::xds::client::proxy_node(
        kind,
        &env("INSTANCE_IP", "0.0.0.0".into()),
        &env("POD_NAME", name.name.clone()),
        &name.namespace,
        None,
        &[(key, name.to_string())],
    )
}

/// Destinations of services that left the configuration are forgotten, with their connections.
async fn forget_removed_destinations(ctx: Arc<WaypointContext>) {
    let mut model = ctx.model.clone();
    while model.changed().await {
        ctx.l7.upstreams.retain_known(&model.current());
    }
}

async fn serve_operator_endpoints(
    options: &WaypointOptions,
    model: &ModelHandle,
    certs: &Arc<CertStore>,
    metrics: MetricsRegistry,
    l7: &Arc<L7Context>,
    map: Arc<TrafficMap>,
    xds: Option<crate::xds::client::SharedStatus>,
) -> anyhow::Result<Readiness> {
    let ready = Readiness::default();
    let engine = l7.clone();
    let state = AdminState {
        model: model.clone(),
        capture: None,
        clusters: Some(Arc::new(move || admin_views::clusters(&engine))),
        hbone: None,
        map: Some(Arc::new(move || map.json())),
        certs: certs.clone(),
        node_name: String::new(),
        waypoint: Some(l7.waypoint.clone()),
        trust_domain: options.trust_domain.clone(),
        logging: options.logging.clone(),
        ready: ready.clone(),
        xds,
    };
    // Closed with the process: a waypoint restarts as a new pod, with addresses of its own.
    drop(admin::start(&options.endpoints, state, metrics).await?);
    Ok(ready)
}
