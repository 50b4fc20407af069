//! Configuration as users write it: Kubernetes and Istio resources in YAML (CFG-1).
//!
//! This module only parses; `model::compile` turns resources into what the data path needs.
//! Every resource remembers the file and line it came from, so any later complaint about it
//! can point the user at the exact place.

#[cfg(feature = "crd-schema")]
pub mod crds;
mod duration;
mod kinds;
mod mesh;
mod networking;
mod parse;
mod positions;
#[cfg(feature = "crd-schema")]
pub mod schema;
mod security;
mod source;
mod syntax;

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;

pub use duration::parse_duration;
pub use mesh::{MeshConfig, OutboundMode};
pub use networking::{
    ClientTlsSettings, ConnectionPoolSettings, ConsistentHash, DestinationRule, DestinationRuleSpec, DestinationSpec,
    HeaderOperations, Headers, HttpMatch, HttpRetry, HttpRoute, IstioGateway, IstioGatewaySpec, L4MatchAttributes,
    LoadBalancerSettings, OutlierDetectionSettings, Percent, RetryOnToken, RouteDestination, SimpleLb, StringMatch,
    SubsetSpec, TlsMode, TrafficPolicySpec, VirtualService, VirtualServiceSpec,
};
pub use networking::{
    EntryEndpoint, EntryWorkloadSelector, Location, Resolution, ServiceEntry, ServiceEntryPort, ServiceEntrySpec,
};
pub use networking::{ServerHost, ServerPort, ServerProtocol, ServerSpec, ServerTls, ServerTlsMode, TlsVersion};
pub use parse::parse_file;
pub use positions::locate;
pub use security::{
    AuthorizationAction, AuthorizationPolicy, AuthorizationPolicySpec, Cidr, ClaimToHeader, Condition,
    ExtensionProvider, JwtHeader, JwtRule, MtlsModeSetting, MutualTls, Operation, PeerAuthentication,
    PeerAuthenticationSpec, PolicyTargetRef, RequestAuthentication, RequestAuthenticationSpec, Rule, RuleFrom, RuleTo,
    Source, WorkloadSelector, parse_port,
};
pub use source::{ConfigDir, Loaded, MAX_UNSETTLED, POLL as CONFIG_POLL, load_dir};

/// Where a resource or a problem is: file and 1-based line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl Origin {
    pub fn new(file: &Path, line: usize) -> Self {
        Self { file: file.to_path_buf(), line }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Line 0: a resource without lines, such as an API object (`k8s:Pod/ns/name`).
        if self.line == 0 {
            return write!(f, "{}", self.file.display());
        }
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// How bad a diagnostic is: errors reject the whole change, warnings are only reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in the configuration, with its place and, where known, the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub origin: Origin,
    /// Dotted path of the offending field (`spec.ports[0].port`), when known.
    pub field: Option<String>,
    pub message: String,
}

impl Diagnostic {
    pub fn error(origin: Origin, field: Option<&str>, message: impl Into<String>) -> Self {
        Self { severity: Severity::Error, origin, field: field.map(str::to_owned), message: message.into() }
    }

    pub fn warning(origin: Origin, field: Option<&str>, message: impl Into<String>) -> Self {
        Self { severity: Severity::Warning, ..Self::error(origin, field, message) }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}: {level}: ", self.origin)?;
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        f.write_str(&self.message)
    }
}

/// A parsed resource and where it was written.
#[derive(Debug, Clone)]
pub struct Located<T> {
    pub origin: Origin,
    pub resource: T,
    /// The document as written (YAML), kept for the kinds a control plane forwards to waypoints
    /// as their users wrote them (CFG-3): VirtualService, DestinationRule, AuthorizationPolicy,
    /// RequestAuthentication. `None` for other kinds.
    pub document: Option<Arc<str>>,
}

impl<T> Located<T> {
    pub fn new(origin: Origin, resource: T) -> Self {
        Self { origin, resource, document: None }
    }
}

/// Every resource kind strait reads. Kinds it does not use yet are kept as `Other` so that a
/// directory shared with other tools still loads.
#[derive(Debug, Clone)]
pub enum Resource {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    EndpointSlice(EndpointSlice),
    AuthorizationPolicy(AuthorizationPolicy),
    PeerAuthentication(PeerAuthentication),
    RequestAuthentication(RequestAuthentication),
    VirtualService(VirtualService),
    DestinationRule(DestinationRule),
    /// Only of a waypoint class: other Gateways are `Other` until GWAPI-1.
    Gateway(Gateway),
    /// `networking.istio.io` Gateway: the listeners of ingress and egress gateways (GW-1).
    IstioGateway(IstioGateway),
    ServiceEntry(ServiceEntry),
    /// The `istio` ConfigMap of `istio-system`: the mesh-wide settings (L4-5).
    MeshConfig(MeshConfig),
    Other {
        api_version: String,
        kind: String,
    },
}

impl Resource {
    /// Whether a control plane forwards this kind to waypoints and gateways (and, for some, node
    /// proxies) as written (see `Located`).
    pub fn forwarded_as_written(&self) -> bool {
        matches!(
            self,
            Resource::VirtualService(_)
                | Resource::IstioGateway(_)
                | Resource::MeshConfig(_)
                | Resource::DestinationRule(_)
                | Resource::AuthorizationPolicy(_)
                | Resource::RequestAuthentication(_)
        )
    }

    /// Kind, namespace (empty for cluster-scoped kinds) and name: what makes a resource unique,
    /// as the API server sees it. `None` for kinds strait does not read.
    pub fn key(&self) -> Option<(&'static str, &str, &str)> {
        let (kind, meta) = match self {
            Resource::Namespace(ns) => return Some(("Namespace", "", &ns.metadata.name)),
            Resource::Pod(r) => ("Pod", &r.metadata),
            Resource::Service(r) => ("Service", &r.metadata),
            Resource::EndpointSlice(r) => ("EndpointSlice", &r.metadata),
            Resource::AuthorizationPolicy(r) => ("AuthorizationPolicy", &r.metadata),
            Resource::PeerAuthentication(r) => ("PeerAuthentication", &r.metadata),
            Resource::RequestAuthentication(r) => ("RequestAuthentication", &r.metadata),
            Resource::VirtualService(r) => ("VirtualService", &r.metadata),
            Resource::DestinationRule(r) => ("DestinationRule", &r.metadata),
            Resource::Gateway(r) => ("Gateway", &r.metadata),
            // Not `Gateway`: a Gateway API Gateway of the same name is another resource.
            Resource::IstioGateway(r) => ("networking.istio.io/Gateway", &r.metadata),
            Resource::ServiceEntry(r) => ("ServiceEntry", &r.metadata),
            Resource::MeshConfig(r) => ("ConfigMap", &r.metadata),
            Resource::Other { .. } => return None,
        };
        Some((kind, meta.namespace_or_default(), &meta.name))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Kept for the annotations that change behaviour, such as `istio.io/dry-run`.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl ObjectMeta {
    /// The namespace, `default` when unset (as `kubectl apply` does).
    pub fn namespace_or_default(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

/// Gateway classes whose Gateways declare waypoints (L4-3): Istio's, so Gateways written for
/// Istio work unchanged, and strait's own.
pub const WAYPOINT_GATEWAY_CLASSES: [&str; 2] = ["istio-waypoint", "strait-waypoint"];

/// Gateway API `Gateway` of a waypoint class (`WAYPOINT_GATEWAY_CLASSES`): declares the waypoint
/// named after it, and with its `istio.io/waypoint-for` label, what traffic it takes (L4-3).
#[derive(Debug, Clone, Deserialize)]
pub struct Gateway {
    pub metadata: ObjectMeta,
    pub spec: GatewaySpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    pub gateway_class_name: String,
}

/// Kubernetes `v1` Namespace: its labels decide enrolment.
#[derive(Debug, Clone, Deserialize)]
pub struct Namespace {
    pub metadata: ObjectMeta,
}

/// Kubernetes `v1` Pod: the fields a node proxy needs.
#[derive(Debug, Clone, Deserialize)]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub host_network: bool,
    #[serde(default)]
    pub containers: Vec<Container>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: u16,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<IpAddr>,
}

/// Kubernetes `v1` Service.
#[derive(Debug, Clone, Deserialize)]
pub struct Service {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// An address, or `None` for a headless service.
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub target_port: Option<PortRef>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// A port given by number or by the name of a container port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The versions of `EndpointSlice` read from a directory: `discovery.k8s.io/v1` (the only one
/// `strait control --kubernetes` watches) and `v1beta1` (Kubernetes 1.17-1.24), whose fields
/// strait reads are the same.
pub const DISCOVERY: [&str; 2] = ["discovery.k8s.io/v1", "discovery.k8s.io/v1beta1"];

/// Kubernetes `discovery.k8s.io` EndpointSlice: the endpoints of the Service named by its
/// `kubernetes.io/service-name` label. strait uses them for Services without a selector (L4-3);
/// a Service with a selector takes its endpoints from the Pods it selects.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    pub metadata: ObjectMeta,
    /// `IPv4`, `IPv6` or `FQDN`.
    pub address_type: String,
    /// Null in the API when the slice is empty.
    #[serde(default, deserialize_with = "null_is_empty")]
    pub endpoints: Vec<SliceEndpoint>,
    #[serde(default, deserialize_with = "null_is_empty")]
    pub ports: Vec<SlicePort>,
}

impl EndpointSlice {
    /// The Service this slice belongs to (`kubernetes.io/service-name`).
    pub fn service_name(&self) -> Option<&str> {
        self.metadata.labels.get(SERVICE_NAME_LABEL).map(String::as_str)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    /// Addresses of `addressType`, kept as text so that one bad address is told and skipped
    /// without losing the slice.
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: EndpointConditions,
    #[serde(default)]
    pub target_ref: Option<ObjectReference>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct EndpointConditions {
    /// Unset means unknown, which consumers read as ready (the API's documented rule).
    #[serde(default)]
    pub ready: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ObjectReference {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlicePort {
    /// The name of the Service port it serves (empty for a Service's only, unnamed port).
    #[serde(default)]
    pub name: Option<String>,
    /// Unset means "every port", which strait cannot map to a Service port: not used.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

fn null_is_empty<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}
