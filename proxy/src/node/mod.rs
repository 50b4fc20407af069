//! `strait node`: the per-node proxy. It loads the capture programs, keeps them in step with
//! the configuration, and proxies every connection they hand it.

pub(crate) mod copy;
pub(crate) mod inbound;
mod live;
mod outbound;
pub(crate) mod policy;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use strait_ebpf_common::{
    HBONE_PORT, INBOUND_PLAINTEXT_PORT, LISTENER_HBONE, LISTENER_INBOUND_PLAINTEXT, LISTENER_OUTBOUND, OUTBOUND_PORT,
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    admin::{self, AdminState, OperatorEndpoints, Readiness},
    capture::{self, Capture, SteerRouting},
    hbone::HbonePool,
    identity::{CaClientOptions, CaServerOptions, CertStore, CertificateProvider, IstioCaClient, LocalCa, serve_ca},
    model::{self, Model, ModelHandle},
    sys,
    telemetry::{AccessLog, AccessLogFormat, MetricsRegistry, ScrapedCounters, Telemetry, logging::LogControl},
};

/// How often capture is reconciled with the routing table even without a config change, so a
/// pod whose veth appears after its YAML is captured promptly.
const RECONCILE_EVERY: Duration = Duration::from_millis(300);

/// Command-line settings of `strait node`.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub config_dir: PathBuf,
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
}

/// Where the node proxy gets workload certificates (ID-1, ID-2).
#[derive(Debug, Clone)]
pub enum CaSource {
    /// The built-in CA, kept in `dir`; with `listen`, also served over Istio's CA API to other
    /// proxies presenting `token`.
    Local { dir: PathBuf, listen: Option<SocketAddr>, token: Option<String> },
    /// A remote CA speaking Istio's CA API (istiod, or another strait node).
    Remote { address: String, root: PathBuf, token: Option<String>, server_name: Option<String> },
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
}

pub async fn run(options: NodeOptions) -> anyhow::Result<()> {
    sys::check_node_privileges().map_err(|e| anyhow!(e))?;
    let fd_limit = sys::raise_fd_limit();

    let model = model::reload::load_and_watch(&options.config_dir)?;

    let provider = certificate_provider(&options).await?;
    let certs = CertStore::new(provider, options.cert_ttl);

    let mut capture = Capture::load(&options.bpf_pin_dir)?;
    let routing =
        SteerRouting::install().map_err(|e| anyhow!("cannot install policy routing for captured traffic: {e}"))?;
    let listener = sys::transparent_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, OUTBOUND_PORT)))
        .with_context(|| format!("cannot listen on the outbound capture port {OUTBOUND_PORT}"))?;
    capture.set_listener(LISTENER_OUTBOUND, &listener)?;
    let hbone_listener = sys::transparent_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, HBONE_PORT)))
        .with_context(|| format!("cannot listen on the HBONE port {HBONE_PORT}"))?;
    capture.set_listener(LISTENER_HBONE, &hbone_listener)?;
    let plaintext_listener =
        sys::transparent_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT)))
            .with_context(|| format!("cannot listen on the inbound plaintext port {INBOUND_PLAINTEXT_PORT}"))?;
    capture.set_listener(LISTENER_INBOUND_PLAINTEXT, &plaintext_listener)?;
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

    tokio::spawn(keep_capture_in_step(
        capture.clone(),
        model.clone(),
        options.node_name.clone(),
        certs.clone(),
        options.trust_domain.clone(),
    ));
    let (telemetry, ready) = serve_operator_endpoints(&options, &model, &capture, &certs).await?;

    let ctx = Arc::new(NodeContext {
        model,
        telemetry,
        node_name: options.node_name.clone(),
        trust_domain: options.trust_domain.clone(),
        pool: HbonePool::new(certs.clone()),
        certs,
        live: Arc::default(),
    });
    tokio::spawn(recheck_on_change(ctx.clone()));
    ready.set_ready();
    info!(node = %options.node_name, config = %options.config_dir.display(), "strait node ready; capturing on port {OUTBOUND_PORT} (open-file limit {fd_limit})");

    let mut terminate = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(outbound::handle(ctx.clone(), stream, peer));
                }
                Err(e) => accept_failed("outbound", e).await,
            },
            accepted = plaintext_listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(inbound::serve_plaintext(ctx.clone(), stream, peer));
                }
                Err(e) => accept_failed("inbound plaintext", e).await,
            },
            accepted = hbone_listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(inbound::serve_hbone(ctx.clone(), stream, peer));
                }
                Err(e) => accept_failed("HBONE", e).await,
            },
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    info!("shutting down");
    drop(listener);
    drop(hbone_listener);
    drop(plaintext_listener);
    match capture.lock() {
        Ok(mut c) => {
            info!(stats = ?c.stats(), "final capture counters");
            c.release(options.detach_on_exit);
        }
        Err(_) => error!("capture state was poisoned"),
    }
    drop(capture);
    drop(routing);
    Ok(())
}

async fn certificate_provider(options: &NodeOptions) -> anyhow::Result<Arc<dyn CertificateProvider>> {
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
                CaClientOptions { token: token.clone(), server_name: server_name.clone() },
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
) -> anyhow::Result<(Telemetry, Readiness)> {
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
    let telemetry = Telemetry::new(access_log, metrics.traffic());
    let ready = Readiness::default();
    let state = AdminState {
        model: model.clone(),
        capture: Some(capture.clone()),
        clusters: None,
        certs: certs.clone(),
        node_name: options.node_name.clone(),
        trust_domain: options.trust_domain.clone(),
        logging: options.logging.clone(),
        ready: ready.clone(),
    };
    admin::start(&options.endpoints, state, metrics).await?;
    Ok((telemetry, ready))
}

/// Out of file descriptors and the like: back off instead of spinning.
async fn accept_failed(listener: &str, e: std::io::Error) {
    warn!("accept on the {listener} listener failed: {e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
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
    trust_domain: String,
) {
    loop {
        tokio::select! {
            changed = model.changed() => {
                if !changed { return }
                prefetch_certificates(&certs, &model.current(), &node, &trust_domain);
            }
            _ = tokio::time::sleep(RECONCILE_EVERY) => {}
        }
        reconcile(&capture, &model.current(), &node);
    }
}

fn reconcile(capture: &Mutex<Capture>, model: &Model, node: &str) {
    let interfaces = match capture::pod_interfaces() {
        Ok(i) => i,
        Err(e) => {
            warn!("cannot read the routing table: {e}");
            return;
        }
    };
    match capture.lock() {
        Ok(mut c) => c.reconcile(model, node, &interfaces, &policy::kernel_policy(model, node)),
        Err(_) => error!("capture state was poisoned; capture is no longer updated"),
    }
}
