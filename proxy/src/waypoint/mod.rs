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
    identity::{CaClientOptions, CertStore, CertificateProvider, Identity, IstioCaClient, LocalCa},
    l7::{
        L7Context,
        authn::Authn,
        limits::HttpLimits,
        request_body::BodyBudget,
        upstream::{Connector, Upstreams},
    },
    model::{self, ModelHandle, WaypointName},
    node::CaSource,
    sys,
    telemetry::{
        AccessLog, AccessLogFormat, MetricsRegistry, Reporter, RequestTelemetry, Telemetry, logging::LogControl,
    },
};

/// Command-line settings of `strait waypoint`.
#[derive(Debug, Clone)]
pub struct WaypointOptions {
    pub config_dir: PathBuf,
    /// How long a configuration capturing no workload is held back (OPS-5).
    pub empty_config_hold: Duration,
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

pub async fn run(options: WaypointOptions) -> anyhow::Result<()> {
    let fd_limit = sys::set_fd_limit(options.max_open_files);
    let limits = options.limits.resolve(fd_limit);
    let model = model::reload::load_and_watch(&options.config_dir, options.empty_config_hold)?;
    let name = WaypointName { namespace: options.namespace.clone(), name: options.name.clone() };
    if model.current().waypoint(&name).is_none() {
        warn!(
            waypoint = %name,
            "no pod of the configuration runs this waypoint (label gateway.networking.k8s.io/gateway-name={}): \
             node proxies will not send it traffic",
            name.name
        );
    }
    let identity = Identity::new(&options.trust_domain, &options.namespace, &options.service_account);
    let certs = CertStore::new(certificate_provider(&options).await?, options.cert_ttl);
    let tls = certs.get(&identity).await.with_context(|| format!("cannot obtain a certificate for {identity}"))?;
    drop(tls);

    let access_log = AccessLog::open(options.access_log_format, options.access_log.as_deref())?;
    let mut metrics = MetricsRegistry::new();
    let requests = metrics.register_requests();
    let gate = Gate::new("hbone", limits.handshakes);
    metrics.register(admission::refusal_counters(vec![gate.clone()]));
    metrics.register(crate::hbone::server::handshake_failure_counters());
    let telemetry = Telemetry::new(access_log, metrics.traffic());
    let upstreams = Upstreams::new(Connector {
        hbone: HbonePool::unmarked(certs.clone()),
        identity: identity.clone(),
        trust_domain: options.trust_domain.clone(),
    });
    let server_header = match &options.server_header {
        Some(v) => Some(HeaderValue::from_str(v).map_err(|_| anyhow!("--server-header `{v}` is not a header value"))?),
        None => None,
    };
    let authn = Authn::start(model.clone(), name.clone()).await;
    let (drain_tx, drain) = tokio::sync::watch::channel(false);
    let l7 = Arc::new(L7Context {
        model: model.clone(),
        upstreams,
        authn,
        telemetry: RequestTelemetry::new(telemetry.access_log(), requests),
        reporter: Reporter::Waypoint,
        gateway: model::routes::MESH_GATEWAY.to_owned(),
        waypoint: name.clone(),
        server_header,
        drain,
        limits: options.http_limits,
        body_budget: BodyBudget::new(options.http_limits.body_buffer_budget),
    });
    let ctx = Arc::new(WaypointContext {
        name: name.clone(),
        trust_domain: options.trust_domain.clone(),
        model: model.clone(),
        l7: l7.clone(),
        telemetry,
        active_streams: Arc::default(),
    });
    tokio::spawn(forget_removed_destinations(ctx.clone()));
    let ready = serve_operator_endpoints(&options, &model, &certs, metrics, &l7).await?;

    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, HBONE_PORT));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for HBONE on {addr} (is another proxy running in this pod?)"))?;
    ready.set_ready();
    info!(waypoint = %name, %identity, "strait waypoint ready on port {HBONE_PORT} (open-file limit {fd_limit})");

    let (stop_accepting, accepting) = tokio::sync::watch::channel(false);
    let accept = {
        let (ctx, certs, identity, gate) = (ctx.clone(), certs.clone(), identity.clone(), gate.clone());
        tokio::spawn(async move {
            admission::accept_loop("HBONE", &listener, Some(&gate), accepting, |stream, peer, pass| {
                tokio::spawn(inbound::serve_connection(
                    ctx.clone(),
                    certs.clone(),
                    identity.clone(),
                    stream,
                    peer,
                    pass,
                ));
            })
            .await;
        })
    };
    let mut terminate = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    let _ = stop_accepting.send(true);
    let _ = accept.await;
    // Graceful drain: no new connections (the accept loop ended with the listener), GOAWAY on
    // open ones, HTTP connections close after their request; what is in flight may finish,
    // for a while.
    ready.set_not_ready();
    let _ = drain_tx.send(true);
    let deadline = std::time::Instant::now() + options.drain_timeout;
    let active = || ctx.active_streams.load(std::sync::atomic::Ordering::Acquire);
    if active() > 0 {
        info!(
            streams = active(),
            "draining: waiting for open streams to finish (--drain-timeout {:?})", options.drain_timeout
        );
    }
    while active() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    info!(left = active(), "shutting down");
    Ok(())
}

async fn certificate_provider(options: &WaypointOptions) -> anyhow::Result<Arc<dyn CertificateProvider>> {
    Ok(match &options.ca {
        CaSource::Local { dir, .. } => Arc::new(LocalCa::load_or_create(dir, &options.trust_domain)?),
        CaSource::Remote { address, root, token, server_name } => Arc::new(IstioCaClient::new(
            address,
            root,
            CaClientOptions { token: token.clone(), server_name: server_name.clone() },
        )?),
    })
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
) -> anyhow::Result<Readiness> {
    let ready = Readiness::default();
    let engine = l7.clone();
    let state = AdminState {
        model: model.clone(),
        capture: None,
        clusters: Some(Arc::new(move || admin_views::clusters(&engine))),
        certs: certs.clone(),
        node_name: String::new(),
        waypoint: Some(l7.waypoint.clone()),
        trust_domain: options.trust_domain.clone(),
        logging: options.logging.clone(),
        ready: ready.clone(),
    };
    // Closed with the process: a waypoint restarts as a new pod, with addresses of its own.
    drop(admin::start(&options.endpoints, state, metrics).await?);
    Ok(ready)
}
