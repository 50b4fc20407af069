//! Routing in the model (L7-2 to L7-8, L7-4): VirtualServices compiled into route tables,
//! DestinationRules into traffic policies, both indexed by the service host they apply to.
//!
//! Everything here is plain data, already validated: regexes compiled, durations parsed, short
//! host names resolved to FQDNs in the namespace of the resource that wrote them. The L7 engine
//! (`l7`) walks it per request; what changes per request (round-robin cursors, outlier state,
//! connection counts) lives in the engine, not here, so a new model never resets it.

mod compile;
mod destination_rule;
mod hosts;
#[cfg(test)]
mod tests;
mod virtual_service;

use std::{collections::BTreeMap, collections::HashMap, sync::Arc, time::Duration};

use serde::Serialize;

use crate::config::Origin;

pub use compile::compile_routing;
pub(crate) use hosts::{covers as host_covers, matches as host_matches, specificity as host_specificity};

/// The gateway name that means "traffic inside the mesh" (the waypoint's).
pub const MESH_GATEWAY: &str = "mesh";

/// All routing resources of one configuration.
#[derive(Debug, Default, Serialize)]
pub struct Routing {
    /// Every valid VirtualService, in file order.
    pub virtual_services: Vec<Arc<VirtualService>>,
    /// Every valid DestinationRule, in file order.
    pub destination_rules: Vec<Arc<DestinationRule>>,
    /// For each service hostname (FQDN) of the model: the VirtualService that routes mesh
    /// traffic to it (bound to `mesh`, first in file order among those naming the host; exact
    /// host names win over wildcards, longer wildcards over shorter).
    #[serde(skip)]
    pub mesh_routes: HashMap<String, Arc<VirtualService>>,
    /// For each host (FQDN or wildcard) a DestinationRule names: that rule (the first in file
    /// order); and for each service hostname only a wildcard rule matches: the most specific.
    #[serde(skip)]
    pub destination_rule_by_host: HashMap<String, Arc<DestinationRule>>,
}

impl Routing {
    /// The VirtualService routing mesh traffic to `host` (a service FQDN).
    pub fn mesh_routes_for(&self, host: &str) -> Option<&Arc<VirtualService>> {
        self.mesh_routes.get(host)
    }

    /// The DestinationRule for `host` (a service FQDN).
    pub fn destination_rule_for(&self, host: &str) -> Option<&Arc<DestinationRule>> {
        self.destination_rule_by_host.get(host)
    }
}

/// One VirtualService, compiled.
#[derive(Debug, Serialize)]
pub struct VirtualService {
    pub name: String,
    pub namespace: String,
    /// Hosts as FQDNs (`reviews` in namespace `shop` is `reviews.shop.svc.cluster.local`), or
    /// wildcards (`*.example.com`), lower case.
    pub hosts: Vec<String>,
    /// Gateways it binds to: `mesh` for in-mesh traffic (the default when none is written), or
    /// `namespace/name` of Gateway resources.
    pub gateways: Vec<String>,
    pub http: Vec<HttpRoute>,
    pub tcp: Vec<TcpRoute>,
    pub tls: Vec<TlsRoute>,
    #[serde(skip)]
    pub origin: Origin,
}

impl VirtualService {
    /// `namespace/name`, as access logs and diagnostics name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One `http[]` entry: where requests matching any of `matches` go (first matching route wins).
#[derive(Debug, Serialize)]
pub struct HttpRoute {
    pub name: Option<String>,
    /// Alternatives (OR); empty matches every request.
    pub matches: Vec<RouteMatch>,
    pub action: RouteAction,
    /// Header edits of the route itself (applied before the chosen destination's own).
    pub headers: HeaderOps,
    pub rewrite: Option<Rewrite>,
    /// `timeout`: the whole request, retries included. `None` = no timeout (Istio's default).
    pub timeout: Option<Duration>,
    /// `None` = no retries (SPEC L7-5: no default retry).
    pub retries: Option<RetryPolicy>,
    pub fault: Option<Fault>,
    /// `mirror` / `mirrors`, each with its percentage.
    pub mirrors: Vec<Mirror>,
}

/// One `match[]` entry: every condition set must hold (AND).
#[derive(Debug, Default, Serialize)]
pub struct RouteMatch {
    pub name: Option<String>,
    pub uri: Option<StringMatcher>,
    pub scheme: Option<StringMatcher>,
    pub method: Option<StringMatcher>,
    /// Matched against the Host / `:authority` header.
    pub authority: Option<StringMatcher>,
    /// By header name, lower case.
    pub headers: Vec<(String, StringMatcher)>,
    /// Requests must have none of these matching.
    pub without_headers: Vec<(String, StringMatcher)>,
    pub query_params: Vec<(String, StringMatcher)>,
    /// The service port the request was sent to.
    pub port: Option<u16>,
    /// Labels the source workload must carry.
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    /// Restricts the match to these gateways; empty = the VirtualService's gateways.
    pub gateways: Vec<String>,
    /// `ignoreUriCase`: compare `uri` case-insensitively.
    pub ignore_uri_case: bool,
}

/// Istio's StringMatch. `Presence` is the `{}` form of a header match: present, any value.
#[derive(Debug, Serialize)]
pub enum StringMatcher {
    Exact(String),
    Prefix(String),
    /// RE2 syntax, matched against the whole value (anchored).
    Regex(#[serde(serialize_with = "regex_source")] regex::Regex),
    Presence,
}

fn regex_source<S: serde::Serializer>(regex: &regex::Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(regex.as_str())
}

/// What a matching route does.
#[derive(Debug, Serialize)]
pub enum RouteAction {
    /// Send to one of these destinations, chosen by weight.
    Forward(Vec<WeightedDestination>),
    Redirect(Redirect),
    DirectResponse {
        status: u16,
        body: Option<String>,
    },
}

#[derive(Debug, Serialize)]
pub struct WeightedDestination {
    pub destination: Destination,
    /// Relative weight; a single destination written without weight gets 100. 0 = never.
    pub weight: u32,
    /// Header edits for requests sent to this destination.
    pub headers: HeaderOps,
}

/// Where to send: a host (service FQDN), optionally a DestinationRule subset and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    /// `None`: the port the request arrived on (or the service's only port).
    pub port: Option<u16>,
}

#[derive(Debug, Default, Serialize)]
pub struct HeaderOps {
    pub request: HeaderEdits,
    pub response: HeaderEdits,
}

/// `set` replaces, `add` appends, `remove` deletes. Names lower case, values as written.
#[derive(Debug, Default, Serialize)]
pub struct HeaderEdits {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

/// `rewrite`: with a `prefix` uri match the matched prefix is replaced, otherwise the whole path
/// (L7-3).
#[derive(Debug, Serialize)]
pub struct Rewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    pub scheme: Option<String>,
    /// 301 unless written.
    pub status: u16,
}

/// `retries`.
#[derive(Debug, Serialize)]
pub struct RetryPolicy {
    /// Retries after the first try (Istio's `attempts`): at most `attempts + 1` tries.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
}

/// `retryOn`, parsed. When a policy has no `retryOn`, Istio's default applies:
/// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` with 503.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct RetryOn {
    /// `5xx`: any 5xx response, and connect failures and resets.
    pub server_error: bool,
    /// `gateway-error`: 502, 503, 504.
    pub gateway_error: bool,
    /// `reset`: the upstream reset or closed the connection before answering.
    pub reset: bool,
    pub connect_failure: bool,
    /// `retriable-4xx`: 409.
    pub retriable_4xx: bool,
    pub refused_stream: bool,
    /// `retriable-status-codes` and bare codes like `503`.
    pub status_codes: Vec<u16>,
    /// gRPC statuses (`cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`,
    /// `unavailable`) as their numeric codes.
    pub grpc_statuses: Vec<u32>,
}

/// `fault`.
#[derive(Debug, Serialize)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Serialize)]
pub struct FaultDelay {
    pub fixed_delay: Duration,
    pub percentage: Percentage,
}

#[derive(Debug, Serialize)]
pub struct FaultAbort {
    pub status: AbortStatus,
    pub percentage: Percentage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum AbortStatus {
    Http(u16),
    /// A gRPC status code, sent as `grpc-status` with HTTP 200.
    Grpc(u32),
}

/// A share of requests, in percent (0.0 to 100.0): `percentage.value: 0.1` is 1 in 1,000;
/// legacy `percent: 100` is all of them. Absent means 100.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentage(pub f64);

impl Percentage {
    pub const ALL: Percentage = Percentage(100.0);
}

/// `mirror` with its `mirrorPercentage` (or legacy `mirror_percent`).
#[derive(Debug, Serialize)]
pub struct Mirror {
    pub destination: Destination,
    pub percentage: Percentage,
}

/// One `tcp[]` entry.
#[derive(Debug, Serialize)]
pub struct TcpRoute {
    /// Alternatives (OR); empty matches every connection.
    pub matches: Vec<L4Match>,
    pub destinations: Vec<WeightedDestination>,
}

/// One `tls[]` entry (routed by SNI without terminating TLS).
#[derive(Debug, Serialize)]
pub struct TlsRoute {
    pub matches: Vec<L4Match>,
    pub destinations: Vec<WeightedDestination>,
}

/// The connection-level conditions of `tcp[].match` and `tls[].match`.
#[derive(Debug, Default, Serialize)]
pub struct L4Match {
    pub port: Option<u16>,
    /// `destinationSubnets`, as CIDRs.
    pub destination_subnets: Vec<crate::config::Cidr>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    pub gateways: Vec<String>,
    /// `sniHosts` (TLS routes only), lower case, wildcards allowed.
    pub sni_hosts: Vec<String>,
}

/// One DestinationRule, compiled.
#[derive(Debug, Serialize)]
pub struct DestinationRule {
    pub name: String,
    pub namespace: String,
    /// FQDN (or wildcard) the rule applies to.
    pub host: String,
    pub traffic_policy: TrafficPolicy,
    pub subsets: Vec<Subset>,
    #[serde(skip)]
    pub origin: Origin,
}

impl DestinationRule {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }

    /// The policy for traffic to `subset` on service port `port`: each of load balancer,
    /// connection pool, outlier detection and TLS is taken from the most specific level that
    /// sets it: the subset's port-level settings, the subset, the rule's port-level settings,
    /// the rule.
    pub fn policy_for(&self, subset: Option<&str>, port: u16) -> EffectivePolicy {
        let subset_policy = subset.and_then(|s| self.subset(s)).map(|s| &s.traffic_policy);
        let levels = [
            subset_policy.and_then(|p| p.port_level(port)),
            subset_policy.map(|p| &p.settings),
            self.traffic_policy.port_level(port),
            Some(&self.traffic_policy.settings),
        ];
        let mut effective = EffectivePolicy::default();
        for settings in levels.into_iter().flatten() {
            if effective.load_balancer.is_none() {
                effective.load_balancer.clone_from(&settings.load_balancer);
            }
            if effective.connection_pool.is_none() {
                effective.connection_pool.clone_from(&settings.connection_pool);
            }
            if effective.outlier_detection.is_none() {
                effective.outlier_detection.clone_from(&settings.outlier_detection);
            }
            if effective.tls.is_none() {
                effective.tls.clone_from(&settings.tls);
            }
        }
        effective
    }
}

#[derive(Debug, Serialize)]
pub struct Subset {
    pub name: String,
    /// Endpoints must carry all of these labels.
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: TrafficPolicy,
}

/// `trafficPolicy`: settings for every port, and overrides per port.
#[derive(Debug, Default, Serialize)]
pub struct TrafficPolicy {
    pub settings: PolicySettings,
    /// `portLevelSettings`, by service port.
    pub port_level: Vec<(u16, PolicySettings)>,
}

impl TrafficPolicy {
    fn port_level(&self, port: u16) -> Option<&PolicySettings> {
        self.port_level.iter().find(|(p, _)| *p == port).map(|(_, s)| s)
    }
}

/// The four parts of a traffic policy; `None` = not set at this level.
#[derive(Debug, Default, Clone, Serialize)]
pub struct PolicySettings {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<UpstreamTls>,
}

/// The policy one request's destination gets, after merging levels. `None` = Istio's default.
pub type EffectivePolicy = PolicySettings;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum LoadBalancer {
    RoundRobin,
    Random,
    /// Power of two choices by active requests (Envoy's LEAST_REQUEST).
    LeastRequest,
    ConsistentHash(HashKey),
}

/// What `consistentHash` hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum HashKey {
    /// `httpHeaderName`, lower case.
    Header(String),
    /// `httpCookie`; with a `ttl`, the proxy sets the cookie when the request lacks it.
    Cookie {
        name: String,
        path: Option<String>,
        ttl: Option<Duration>,
    },
    SourceIp,
    /// `httpQueryParameterName`.
    QueryParameter(String),
}

/// `connectionPool`; `None` fields are unlimited (Envoy's defaults are effectively so).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConnectionPool {
    /// `tcp.maxConnections`: connections to the destination's endpoints, all together.
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<Duration>,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection.
    pub http1_max_pending_requests: Option<u32>,
    /// `http.http2MaxRequests`: requests in flight.
    pub http2_max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection`: a connection is closed after this many.
    pub max_requests_per_connection: Option<u32>,
    /// `http.maxRetries`: retries in flight across the destination.
    pub max_retries: Option<u32>,
    /// `http.idleTimeout`.
    pub idle_timeout: Option<Duration>,
}

/// `outlierDetection`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    /// `consecutive5xxErrors`: any 5xx (and connect failures) counts.
    pub consecutive_5xx: Option<u32>,
    /// `consecutiveGatewayErrors` and legacy `consecutiveErrors`: 502, 503, 504 (and connect
    /// failures) count.
    pub consecutive_gateway_errors: Option<u32>,
    /// How often ejections are reviewed (default 10 s).
    pub interval: Duration,
    /// An endpoint is out for this long times the number of times it was ejected (default 30 s).
    pub base_ejection_time: Duration,
    /// At most this share of endpoints is ejected at once, but always at least one (default 10).
    pub max_ejection_percent: u32,
    /// Below this share of healthy endpoints, ejection is suspended (default 0).
    pub min_health_percent: u32,
}

/// `tls` of a traffic policy (origination towards the destination).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamTls {
    pub mode: UpstreamTlsMode,
    pub sni: Option<String>,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    pub credential_name: Option<String>,
    pub subject_alt_names: Vec<String>,
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum UpstreamTlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}
