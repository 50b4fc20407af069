//! A compiled AuthorizationPolicy: scope resolved, every value parsed, and each condition
//! tagged with the layer that can see it, so evaluation is a walk over plain data.
//!
//! Sources, operations and `when` conditions all become the same thing, a `Predicate` on one
//! attribute of the connection or request; a rule is `from` AND `to` AND `when`, where `from`
//! and `to` are alternatives (OR) of predicate conjunctions (AND).

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Connection, HttpRequest};
use crate::config::{Cidr, Origin, PolicyTargetRef};
use crate::model::{Service, WaypointName, Workload};

/// The API group of Kubernetes Gateway API kinds (`Gateway`, `GatewayClass`).
pub const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";
/// Istio's GatewayClass of waypoints.
pub const WAYPOINT_GATEWAY_CLASS: &str = "istio-waypoint";

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Action {
    Allow,
    Deny,
    /// Marks requests for auditing; never changes a decision (and strait has no audit sink).
    Audit,
    /// Delegates to an external authorizer, which strait does not support: evaluated as DENY
    /// (fail closed), as if the authorizer refused everything the rules send it.
    Custom,
}

/// Which workloads a policy applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Scope {
    /// In the root namespace without a selector: every workload of the mesh.
    Mesh,
    /// Without a selector: every workload of the policy's namespace.
    Namespace,
    /// Workloads carrying all these labels: in the policy's namespace, or in every namespace
    /// when the policy is in the root namespace.
    Selector { labels: BTreeMap<String, String>, all_namespaces: bool },
    /// Bound with `targetRef(s)` to Services or Gateways: enforced by the waypoint or gateway
    /// in front of them, never by the node proxy (as in Istio ambient).
    TargetRefs(Vec<PolicyTargetRef>),
}

/// One AuthorizationPolicy, ready to evaluate.
#[derive(Debug, Clone, Serialize)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub action: Action,
    pub scope: Scope,
    /// Any rule matching makes the policy match; no rules never match.
    pub rules: Vec<Rule>,
    /// `istio.io/dry-run: "true"`: evaluated and reported, never enforced.
    pub dry_run: bool,
    #[serde(skip)]
    pub origin: Origin,
}

impl Policy {
    /// `namespace/name`, how decisions and logs name the policy.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the policy applies to `workload` (at the node proxy).
    pub fn selects(&self, workload: &Workload) -> bool {
        match &self.scope {
            Scope::Mesh => true,
            Scope::Namespace => workload.namespace == self.namespace,
            Scope::Selector { labels, all_namespaces } => {
                (*all_namespaces || workload.namespace == self.namespace)
                    && labels.iter().all(|(k, v)| workload.labels.get(k) == Some(v))
            }
            Scope::TargetRefs(_) => false,
        }
    }

    /// Whether the policy is bound (`targetRefs`) to what a waypoint serves: the `service` a
    /// request is for, the waypoint's own Gateway, or every waypoint through the
    /// `istio-waypoint` GatewayClass from the root namespace.
    pub fn binds_waypoint(&self, service: Option<&Service>, waypoint: &WaypointName, root_namespace: &str) -> bool {
        let Scope::TargetRefs(targets) = &self.scope else { return false };
        targets_bind_waypoint(targets, &self.namespace, service, waypoint, root_namespace)
    }

    /// Whether any rule matches. At L4 (no HTTP request) an ALLOW rule needing an HTTP
    /// attribute never matches, and a DENY rule ignores those conditions (AUTHZ-3).
    pub fn matches(&self, conn: &Connection) -> bool {
        self.rules.iter().any(|rule| rule.matches(self.action, conn))
    }
}

/// Whether `targets`, written in a resource of `namespace`, name the `service` a waypoint
/// serves, the waypoint's own Gateway, or (from the root namespace) the `istio-waypoint`
/// GatewayClass. Istio does not let a policy target another namespace's objects.
pub fn targets_bind_waypoint(
    targets: &[PolicyTargetRef],
    namespace: &str,
    service: Option<&Service>,
    waypoint: &WaypointName,
    root_namespace: &str,
) -> bool {
    targets.iter().any(|t| {
        let target_namespace = t.namespace.as_deref().unwrap_or(namespace);
        let group = t.group.as_deref().unwrap_or("");
        match t.kind.as_str() {
            "Service" if matches!(group, "" | "core") => {
                service.is_some_and(|s| s.entry.is_none() && s.name == t.name && s.namespace == target_namespace)
            }
            // An egress waypoint's ServiceEntry (SPEC GW-3).
            "ServiceEntry" if group == "networking.istio.io" => {
                service.is_some_and(|s| s.entry.is_some() && s.name == t.name && s.namespace == target_namespace)
            }
            "Gateway" if group == GATEWAY_API_GROUP => {
                t.name == waypoint.name && target_namespace == waypoint.namespace
            }
            "GatewayClass" if group == GATEWAY_API_GROUP => {
                t.name == WAYPOINT_GATEWAY_CLASS && namespace == root_namespace
            }
            _ => false,
        }
    })
}

/// `from` AND `to` AND `when`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rule {
    /// Alternatives; empty means any source.
    pub from: Vec<Vec<Predicate>>,
    /// Alternatives; empty means any operation.
    pub to: Vec<Vec<Predicate>>,
    pub when: Vec<Predicate>,
}

impl Rule {
    /// Whether any condition needs more than the connection (Istio drops such ALLOW rules at
    /// L4 as a whole, even when the HTTP part sits in one alternative of several).
    pub fn needs_http(&self) -> bool {
        self.predicates().any(|p| p.layer != Layer::L4)
    }

    /// Whether every condition needs more than the connection: at L4 such a DENY rule, its
    /// conditions dropped, matches every connection.
    pub fn only_http(&self) -> bool {
        self.predicates().all(|p| p.layer != Layer::L4) && self.predicates().next().is_some()
    }

    fn predicates(&self) -> impl Iterator<Item = &Predicate> {
        self.from.iter().flatten().chain(self.to.iter().flatten()).chain(&self.when)
    }

    fn matches(&self, action: Action, conn: &Connection) -> bool {
        if action == Action::Allow && conn.http.is_none() && self.needs_http() {
            return false;
        }
        // A condition the proxy cannot evaluate fails an ALLOW and is dropped from a DENY:
        // either way the outcome errs towards denying.
        let holds = |p: &Predicate| p.evaluate(conn).unwrap_or(action != Action::Allow);
        let any_of = |alternatives: &[Vec<Predicate>]| {
            alternatives.is_empty() || alternatives.iter().any(|all| all.iter().all(holds))
        };
        any_of(&self.from) && any_of(&self.to) && self.when.iter().all(holds)
    }
}

/// Who can evaluate a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Layer {
    /// The node proxy, from the connection alone.
    L4,
    /// Only a proxy that sees the HTTP request (waypoint, gateway).
    L7,
    /// Nobody in strait (e.g. `experimental.*` keys).
    Unsupported,
}

/// One attribute compared with a list of values: any value matching (or, negated, none).
#[derive(Debug, Clone, Serialize)]
pub struct Predicate {
    /// Where it was written (`rules[0].from[1].source.principals`), for explanations.
    pub field: String,
    pub attribute: Attribute,
    pub values: Vec<Value>,
    pub negated: bool,
    pub layer: Layer,
}

impl Predicate {
    /// `None` when this proxy cannot see the attribute.
    fn evaluate(&self, conn: &Connection) -> Option<bool> {
        if self.layer == Layer::Unsupported {
            return None;
        }
        let http = conn.http.as_ref();
        if self.layer == Layer::L7 && http.is_none() {
            return None;
        }
        let any = self.values.iter().any(|v| self.attribute.matches(v, conn, http));
        Some(any != self.negated)
    }
}

/// The attributes policies can name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Attribute {
    /// Peer identity, `td/ns/<ns>/sa/<sa>`: `principals`, `source.principal`.
    SourcePrincipal,
    /// Namespace of the peer identity: `namespaces`, `source.namespace`.
    SourceNamespace,
    /// Trust domain of the peer identity: `trustDomains`, `source.trustDomain` (Istio 1.30).
    SourceTrustDomain,
    /// Namespace and service account of the peer identity: `serviceAccounts`.
    SourceServiceAccount,
    /// Address of the connection's peer: `ipBlocks`, `source.ip`.
    SourceIp,
    /// Original client per `X-Forwarded-For`: `remoteIpBlocks`, `remote.ip`.
    RemoteIp,
    DestinationIp,
    DestinationPort,
    Host,
    Method,
    Path,
    /// `iss/sub` of the validated JWT: `requestPrincipals`, `request.auth.principal`.
    RequestPrincipal,
    RequestAudience,
    RequestPresenter,
    /// `request.headers[name]`, name lower-cased.
    RequestHeader(String),
    /// `request.auth.claims[name]`, nested claims joined with `.`.
    RequestClaim(String),
    Sni,
    /// A key strait does not evaluate.
    Unsupported(String),
}

/// A value to compare with, already parsed for its attribute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Value {
    Text(StringMatch),
    Cidr(Cidr),
    Port(u16),
    ServiceAccount { namespace: String, name: String },
}

impl Attribute {
    fn matches(&self, value: &Value, conn: &Connection, http: Option<&HttpRequest>) -> bool {
        let identity = conn.source.as_ref();
        match (self, value) {
            (Attribute::SourcePrincipal, Value::Text(m)) => identity.is_some_and(|id| m.matches(&id.principal())),
            (Attribute::SourceNamespace, Value::Text(m)) => identity.is_some_and(|id| m.matches(&id.namespace)),
            (Attribute::SourceTrustDomain, Value::Text(m)) => identity.is_some_and(|id| m.matches(&id.trust_domain)),
            (Attribute::SourceServiceAccount, Value::ServiceAccount { namespace, name }) => {
                identity.is_some_and(|id| &id.namespace == namespace && &id.service_account == name)
            }
            (Attribute::SourceIp, Value::Cidr(c)) => c.contains(conn.source_ip),
            (Attribute::RemoteIp, Value::Cidr(c)) => {
                c.contains(http.and_then(|h| h.remote_ip).unwrap_or(conn.source_ip))
            }
            (Attribute::DestinationIp, Value::Cidr(c)) => c.contains(conn.destination_ip),
            (Attribute::DestinationPort, Value::Port(p)) => conn.destination_port == *p,
            (Attribute::Host, Value::Text(m)) => {
                http.and_then(|h| h.host.as_deref()).is_some_and(|host| m.matches(&host_without_port(host)))
            }
            (attribute, Value::Text(m)) => http.is_some_and(|h| attribute.any_request_value(h, |v| m.matches(v))),
            _ => false,
        }
    }

    /// Whether any value this HTTP attribute has in `request` (several for audiences, repeated
    /// headers or list claims) satisfies `test`.
    fn any_request_value(&self, request: &HttpRequest, mut test: impl FnMut(&str) -> bool) -> bool {
        let mut one = |v: Option<&str>| v.is_some_and(&mut test);
        match self {
            Attribute::Method => one(Some(&request.method)),
            Attribute::Path => one(request.path.split('?').next()),
            Attribute::RequestPrincipal => one(request.request_principal.as_deref()),
            Attribute::RequestAudience => request.audiences.iter().any(|v| test(v)),
            Attribute::RequestPresenter => one(request.presenter.as_deref()),
            Attribute::RequestHeader(name) => {
                request.headers.iter().any(|(k, v)| k.eq_ignore_ascii_case(name) && test(v))
            }
            Attribute::RequestClaim(name) => request.claims.get(name).is_some_and(|vs| vs.iter().any(|v| test(v))),
            Attribute::Sni => one(request.sni.as_deref()),
            _ => false,
        }
    }
}

/// Hosts compare case-insensitively and whatever the port, as Istio's host matcher does.
fn host_without_port(host: &str) -> String {
    let bare = match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    bare.to_ascii_lowercase()
}

/// Istio's string matching: exact, `prefix*`, `*suffix`, or `*` for "present and non-empty".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    pub fn parse(text: &str) -> Self {
        if text == "*" {
            StringMatch::Presence
        } else if let Some(suffix) = text.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_owned())
        } else if let Some(prefix) = text.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_owned())
        } else {
            StringMatch::Exact(text.to_owned())
        }
    }

    /// The same match, case-insensitive: hosts compare that way.
    pub fn lowercase(self) -> Self {
        match self {
            StringMatch::Exact(s) => StringMatch::Exact(s.to_ascii_lowercase()),
            StringMatch::Prefix(s) => StringMatch::Prefix(s.to_ascii_lowercase()),
            StringMatch::Suffix(s) => StringMatch::Suffix(s.to_ascii_lowercase()),
            StringMatch::Presence => StringMatch::Presence,
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_matching_follows_istio() {
        let cases = [
            ("foo", "foo", true),
            ("foo", "foobar", false),
            ("foo", "", false),
            ("test.abc.*", "test.abc.com.cn", true),
            ("test.abc.*", "prod.abc.com", false),
            ("*.abc.com", "eng.abc.com", true),
            ("*.abc.com", "abc.org", false),
            ("*", "anything", true),
            ("*", "", false),
        ];
        for (pattern, value, expected) in cases {
            assert_eq!(StringMatch::parse(pattern).matches(value), expected, "{pattern} vs {value:?}");
        }
    }
}
