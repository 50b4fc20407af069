//! The mesh the stream targets serve (`model.yaml`), compiled once, and the engine contexts
//! built on it for each input, whose upstream connections can never leave the process.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::{Arc, OnceLock},
    time::Duration,
};

use http::HeaderValue;

use crate::{
    config::{self, JwtRule},
    hbone::HbonePool,
    identity::{BoxFuture, CertStore, CertificateProvider, Identity, IdentityError, IssuedCert},
    l7::{
        L7Context,
        authn::Authn,
        limits::HttpLimits,
        request_body::BodyBudget,
        upstream::{Connector, Upstreams},
    },
    model::{self, ModelHandle, ModelPublisher, WaypointName, routes::MESH_GATEWAY},
    telemetry::{
        AccessLog, AccessLogFormat, MetricsRegistry, Reporter, RequestMetrics, RequestTelemetry, Telemetry, TrafficMap,
    },
    waypoint::WaypointContext,
};

/// The fuzzing mesh: a waypoint in front of `reviews` and `ratings`, every route kind, JWT and
/// L7 policy. Also a seed of the config target.
pub const MODEL_YAML: &str = include_str!("model.yaml");

pub const TRUST_DOMAIN: &str = "cluster.local";
const NAMESPACE: &str = "shop";
const WAYPOINT: &str = "waypoint";
/// The node proxy the node side of the HBONE target plays: the one of the `reviews` pods.
pub const NODE: &str = "node2";
/// Where access lines go by default: they are formatted and written, and cost no disk.
const ACCESS_LOG: &str = "/dev/null";
/// Names a file for the access lines instead, to see what a corpus makes the proxy do.
const ACCESS_LOG_ENV: &str = "STRAIT_FUZZ_ACCESS_LOG";

/// Who is on the other end of a fuzzed connection: the identity its certificate proved, and its
/// address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// The `client` pod (through its node proxy).
    Client,
    /// The waypoint, as the `reviews` node proxy sees it.
    Waypoint,
    /// A `reviews` pod.
    Reviews,
    /// A workload of the trust domain that the mesh's configuration does not know.
    Stranger,
}

impl Peer {
    pub const ALL: [Peer; 4] = [Peer::Client, Peer::Waypoint, Peer::Reviews, Peer::Stranger];

    pub fn identity(self) -> Identity {
        let (namespace, account) = match self {
            Peer::Client => (NAMESPACE, "client"),
            Peer::Waypoint => (NAMESPACE, WAYPOINT),
            Peer::Reviews => (NAMESPACE, "reviews"),
            Peer::Stranger => ("elsewhere", "default"),
        };
        Identity::new(TRUST_DOMAIN, namespace, account)
    }

    /// The peer's pod address (see `model.yaml`), with the port a connection would come from.
    pub fn addr(self) -> SocketAddr {
        let host = match self {
            Peer::Client => 10,
            Peer::Waypoint => 20,
            Peer::Reviews => 11,
            Peer::Stranger => 99,
        };
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 77, 0, host)), 40_000)
    }
}

/// What every input shares: the compiled model and what is built from it once.
pub struct Mesh {
    pub model: ModelHandle,
    /// Kept so that the model never ends.
    _publisher: ModelPublisher,
    pub authn: Arc<Authn>,
    pub telemetry: Telemetry,
    pub requests: Arc<RequestMetrics>,
}

pub fn mesh() -> &'static Mesh {
    static MESH: OnceLock<Mesh> = OnceLock::new();
    MESH.get_or_init(|| {
        let (resources, mut diagnostics) = config::parse_file(Path::new("model.yaml"), MODEL_YAML);
        let (model, compiled) = model::compile(&resources);
        diagnostics.extend(compiled);
        assert!(diagnostics.is_empty(), "the fuzzing mesh must compile cleanly: {diagnostics:?}");
        // The engine dials plain TCP to endpoints outside the mesh; here every endpoint and every
        // pod behind the waypoint is captured, so it only ever opens HBONE, which `NoCa` stops.
        let plaintext = model.workloads.iter().filter(|w| !w.captured && w.waypoint_role.is_none());
        assert_eq!(plaintext.count(), 0, "every pod of the fuzzing mesh must be captured");
        let (publisher, handle) = model::channel(model);
        let mut metrics = MetricsRegistry::new();
        let requests = metrics.register_requests();
        let path = std::env::var_os(ACCESS_LOG_ENV).map_or_else(|| ACCESS_LOG.into(), std::path::PathBuf::from);
        let access_log = AccessLog::open(AccessLogFormat::Text, Some(&path))
            .unwrap_or_else(|e| panic!("the fuzz targets' access log: {e}"));
        // The rules' keys are inline: loading them needs a runtime, not the network. The task
        // that would follow configuration changes ends with this runtime (the model never
        // changes); its own thread, as the caller may be inside a runtime already.
        let authn = std::thread::scope(|s| {
            s.spawn(|| super::runtime().block_on(Authn::start(handle.clone(), waypoint_name())))
                .join()
                .unwrap_or_else(|_| panic!("loading the fuzzing mesh's JWT rules panicked"))
        });
        Mesh {
            model: handle,
            _publisher: publisher,
            authn,
            telemetry: Telemetry::new(access_log, metrics.traffic(), Arc::new(TrafficMap::new("waypoint fuzzing"))),
            requests,
        }
    })
}

/// The JWT rule of the mesh's RequestAuthentication.
pub fn jwt_rule() -> &'static JwtRule {
    static RULE: OnceLock<JwtRule> = OnceLock::new();
    RULE.get_or_init(|| {
        let model = mesh().model.current();
        let authn = model.security.request_authentications.first();
        authn.and_then(|a| a.jwt_rules.first()).cloned().unwrap_or_else(|| panic!("the fuzzing mesh has a JWT rule"))
    })
}

pub fn waypoint_name() -> WaypointName {
    WaypointName { namespace: NAMESPACE.to_owned(), name: WAYPOINT.to_owned() }
}

/// Refuses every certificate, so an upstream HBONE connection fails before any socket exists:
/// the engine answers every request itself (503 with `UF`, after its retries), as when the CA
/// is unreachable.
struct NoCa;

impl CertificateProvider for NoCa {
    fn issue<'a>(&'a self, identity: &'a Identity, _ttl: Duration) -> BoxFuture<'a, Result<IssuedCert, IdentityError>> {
        Box::pin(async move { Err(IdentityError::CaRequest(format!("no CA while fuzzing (asked for {identity})"))) })
    }
}

/// A waypoint's L7 engine on the mesh, with fresh upstream state (pools, outlier detection), so
/// that one input does not change how the next one is handled. Call inside the input's runtime.
pub fn l7_context() -> Arc<L7Context> {
    let mesh = mesh();
    let certs = CertStore::new(Arc::new(NoCa), Duration::from_secs(3600));
    let connector = Connector {
        hbone: HbonePool::unmarked(certs),
        identity: Peer::Waypoint.identity(),
        trust_domain: TRUST_DOMAIN.to_owned(),
    };
    // The sender goes at once: a drain never starts.
    let (_, drain) = tokio::sync::watch::channel(false);
    Arc::new(L7Context {
        model: mesh.model.clone(),
        upstreams: Upstreams::new(connector),
        telemetry: RequestTelemetry::new(mesh.telemetry.access_log(), mesh.requests.clone(), mesh.telemetry.map()),
        reporter: Reporter::Waypoint,
        gateway: MESH_GATEWAY.to_owned(),
        waypoint: waypoint_name(),
        authn: mesh.authn.clone(),
        server_header: Some(HeaderValue::from_static("istio-envoy")),
        drain,
        limits: HttpLimits::default(),
        body_budget: BodyBudget::new(HttpLimits::default().body_buffer_budget),
    })
}

/// The waypoint's HBONE side around a fresh engine.
pub fn waypoint_context() -> Arc<WaypointContext> {
    let mesh = mesh();
    Arc::new(WaypointContext {
        name: waypoint_name(),
        trust_domain: TRUST_DOMAIN.to_owned(),
        model: mesh.model.clone(),
        l7: l7_context(),
        telemetry: mesh.telemetry.clone(),
        active_streams: Arc::default(),
    })
}
