//! `strait control` (CFG-3): the mesh's control plane. It compiles the configuration directory
//! once, with the same path and rules as a proxy reading it (CFG-1: settle, last good
//! configuration, empty-configuration hold), and serves every proxy what it needs over Istio's
//! protocols on one TLS port: delta ADS with the workload API and strait's L7 type, and the CA
//! API (ID-2) with istiod's authorization.

pub mod events;
pub mod kubernetes;
pub mod leader;
pub mod listener;
pub mod map;
pub mod rootcert;
pub mod waypoints;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{info, warn};

use crate::{
    identity::{
        CaServerOptions, CallerAuthenticator, LocalCa, NodeAccounts,
        caserver::{CallerPolicy, ca_service},
        kube_tokens::KubeTokens,
    },
    model,
    telemetry::MetricsRegistry,
    xds::{
        Snapshot, resources,
        server::{AdsMetrics, AdsServer},
    },
};
use listener::GrpcService;

/// Where `strait control` reads the mesh's configuration (CFG-3).
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// A directory of YAML resources (CFG-1).
    Directory(PathBuf),
    /// The Kubernetes API server (in-cluster service account, or `KUBECONFIG`).
    Kubernetes,
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::Directory(dir) => write!(f, "{}", dir.display()),
            ConfigSource::Kubernetes => f.write_str("kubernetes"),
        }
    }
}

/// Command-line settings of `strait control`.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// Where the configuration comes from.
    pub source: ConfigSource,
    /// How long a configuration capturing no workload is held back (OPS-5).
    pub empty_config_hold: Duration,
    /// The one TLS port of delta ADS and the CA API.
    pub listen: SocketAddr,
    /// Prometheus metrics (`strait_xds_*`), and the mesh-wide map (`/map`, `/map.json`).
    pub metrics: SocketAddr,
    /// The port of the proxies' metrics endpoint, where their mesh maps are read (OBS-6).
    pub map_proxy_port: u16,
    /// The mesh CA (Istio's plug-in CA layout).
    pub ca_dir: PathBuf,
    pub trust_domain: String,
    /// Lifetime of certificates when the request names none.
    pub cert_ttl: Duration,
    /// Bootstrap tokens, one file per caller (layout in `identity::caller`).
    pub bootstrap_tokens: Option<PathBuf>,
    /// The node proxies' service accounts (ID-2): with `--kubernetes`, their tokens impersonate
    /// the pods of their node.
    pub node_accounts: NodeAccounts,
    /// The cluster whose tokens are verified; a caller naming another (`ClusterID`) is refused.
    pub cluster_id: String,
    /// The image and control plane address of the waypoints reconciled from Gateways.
    pub waypoint_image: String,
    pub waypoint_xds_address: String,
    /// The Lease that elects the one replica writing to the API server (Kubernetes source only).
    pub leader: Option<leader::LeaderOptions>,
}

/// The waypoint reconciler of `--kubernetes` (L4-3). Only the leader writes; without an
/// election (no `leader` options) this replica is the only writer.
fn start_waypoints(
    client: kube::Client,
    options: &ControlOptions,
    ca: &LocalCa,
    leadership: Option<leader::Leadership>,
) -> anyhow::Result<()> {
    let root_path = ca.root_cert_path();
    let root_cert =
        std::fs::read_to_string(&root_path).with_context(|| format!("cannot read {}", root_path.display()))?;
    let settings = waypoints::WaypointSettings {
        image: options.waypoint_image.clone(),
        xds_address: options.waypoint_xds_address.clone(),
        trust_domain: options.trust_domain.clone(),
        root_cert,
    };
    let leader: Arc<dyn waypoints::Leadership> = Arc::new(move || leadership.as_ref().is_none_or(|l| l.is_leader()));
    // Gateways' root certificate (istio-ca-root-cert), as the waypoints' own.
    rootcert::start(client.clone(), settings.root_cert.clone(), leader.clone());
    waypoints::start(client, settings, leader);
    Ok(())
}

pub async fn run(options: ControlOptions) -> anyhow::Result<()> {
    let ca = Arc::new(LocalCa::load_or_create(&options.ca_dir, &options.trust_domain)?);
    let (snapshots_tx, snapshots) = watch::channel(Arc::new(Snapshot::new()));
    let trust_domain = options.trust_domain.clone();
    let publish = move |model: &model::Model, resources: &[crate::config::Located<crate::config::Resource>]| {
        let started = Instant::now();
        let snapshot = resources::snapshot(model, resources, &trust_domain);
        let counts: Vec<String> =
            snapshot.iter().map(|(t, r)| format!("{}={}", t.rsplit('.').next().unwrap_or(t), r.len())).collect();
        info!(resources = %counts.join(" "), took_ms = started.elapsed().as_millis() as u64, "xDS snapshot built");
        snapshots_tx.send_replace(Arc::new(snapshot));
    };
    let hold = options.empty_config_hold;
    let mut kube_tokens = None;
    // One client (and connection pool) for the election, the token reviews and the waypoint
    // reconciler; the watches have their own (see `kubernetes::start`).
    let client = match &options.source {
        ConfigSource::Kubernetes => Some(kubernetes::client().await?),
        ConfigSource::Directory(_) => None,
    };
    // Campaign from the start: a replica that wins while still listing is ready to write as
    // soon as it has something to write.
    let election = match (&client, options.leader.clone()) {
        (Some(client), Some(leader_options)) => Some(leader::start(client.clone(), leader_options)),
        _ => None,
    };
    let model = match &options.source {
        ConfigSource::Directory(dir) => model::reload::load_and_watch_then(dir, hold, publish)?,
        ConfigSource::Kubernetes => {
            let client = client.context("no Kubernetes client")?;
            // The CA API verifies service-account tokens with this cluster's API server (ID-2).
            kube_tokens = Some(KubeTokens::new(
                client.clone(),
                &options.trust_domain,
                &options.cluster_id,
                options.node_accounts.clone(),
            ));
            let source = kubernetes::start().await?;
            start_waypoints(client, &options, &ca, election.as_ref().map(|(_, leadership)| leadership.clone()))?;
            // The first read waits for every kind to be listed: off the async workers.
            tokio::task::spawn_blocking(move || model::reload::follow_then(source, hold, publish))
                .await
                .context("the Kubernetes source stopped")??
        }
    };

    if options.bootstrap_tokens.is_none() && kube_tokens.is_none() {
        warn!(
            "no --bootstrap-tokens: only callers holding a certificate of this mesh are served, so no new proxy can \
             bootstrap"
        );
    }
    let mut authenticator = CallerAuthenticator::new(&options.trust_domain, options.bootstrap_tokens.as_deref());
    if let Some(kube_tokens) = kube_tokens {
        authenticator = authenticator.with_kubernetes(kube_tokens);
    }
    let authenticator = Arc::new(authenticator);
    let metrics = Arc::new(AdsMetrics::default());
    let ads = AdsServer::new(snapshots, Arc::new(resources::visible), authenticator.clone(), metrics.clone());
    let collector = map::MapCollector::start(ads.connected(), options.map_proxy_port);
    let trust_domain = options.trust_domain.clone();
    let pods_on_node = move |node: &str, identity: &crate::identity::Identity| {
        model.current().workloads_on(node).any(|w| w.identity(&trust_domain) == *identity)
    };
    let policy = CallerPolicy { authenticator, pods_on_node };
    let ca_options = CaServerOptions { default_ttl: options.cert_ttl, ..CaServerOptions::default() };
    let routes = vec![
        ("/envoy.service.discovery.v3.AggregatedDiscoveryService/", GrpcService::new(ads.into_service())),
        (
            "/istio.v1.auth.IstioCertificateService/",
            GrpcService::new(ca_service(ca.clone(), ca_options, Arc::new(policy))),
        ),
    ];
    let ip_sans = if options.listen.ip().is_unspecified() { Vec::new() } else { vec![options.listen.ip()] };
    let tls = listener::server_tls(ca, ip_sans)?;
    let port = tokio::net::TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", options.listen))?;
    tokio::spawn(listener::serve(port, tls, routes, options.node_accounts.clone()));

    let mut registry = MetricsRegistry::new();
    metrics.register(&mut registry);
    let metrics_listener = tokio::net::TcpListener::bind(options.metrics)
        .await
        .with_context(|| format!("cannot listen for metrics on {}", options.metrics))?;
    let map_view: crate::admin::View = Arc::new(move || collector.json());
    tokio::spawn(crate::admin::serve_metrics(metrics_listener, Arc::new(registry), Some(map_view)));

    info!(
        listen = %options.listen,
        config = %options.source,
        "strait control ready: delta ADS and the CA API on {}, metrics and the mesh map (/map) on {}",
        options.listen,
        options.metrics
    );
    let mut terminate = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    info!("stopping");
    if let Some((election, _leadership)) = election {
        election.release().await;
    }
    Ok(())
}
