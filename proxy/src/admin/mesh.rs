//! `/services` and `/policies` (OBS-3, CFG-4): the mesh as this proxy sees it, in the shape
//! `istioctl ztunnel-config services|policies` shows Istio's, plus where each thing applies
//! here, which is what an operator asks when a policy seems to do nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use serde::Serialize;

use super::views::workload_protocol;
use crate::{
    authz::{
        Action, Scope,
        peer_authn::{MtlsMode, PeerAuthnScope},
    },
    config::PolicyTargetRef,
    model::{AppProtocol, Model, Service, WaypointName, Workload},
};

/// Where this proxy enforces policy: a node proxy for the workloads of its node, a waypoint for
/// the services that send their traffic through it.
#[derive(Debug, Clone, Copy)]
pub enum Place<'a> {
    Node(&'a str),
    Waypoint(&'a WaypointName),
}

#[derive(Serialize)]
struct ServiceView<'a> {
    name: &'a str,
    namespace: &'a str,
    hostname: &'a str,
    vip: Option<IpAddr>,
    /// `namespace/name` of the waypoint traffic to the VIP goes through.
    waypoint: Option<String>,
    ports: Vec<PortView<'a>>,
    /// Pods behind the service (each counted once, whatever its ports).
    endpoints: usize,
    labels: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
struct PortView<'a> {
    port: u16,
    name: Option<&'a str>,
    /// `HTTP`, `HTTP2`, `GRPC`, `TCP`, or `UNDECLARED` (detected from the client's first bytes).
    protocol: &'static str,
    endpoints: Vec<EndpointView>,
}

#[derive(Serialize)]
struct EndpointView {
    /// `namespace/name` of the pod.
    workload: String,
    address: SocketAddr,
    node: Option<String>,
    identity: String,
    /// `HBONE` or `TCP`, as for `/workloads`.
    protocol: &'static str,
}

fn protocol_name(protocol: AppProtocol) -> &'static str {
    match protocol {
        AppProtocol::Http => "HTTP",
        AppProtocol::Http2 => "HTTP2",
        AppProtocol::Grpc => "GRPC",
        AppProtocol::Tcp => "TCP",
        AppProtocol::Unknown => "UNDECLARED",
    }
}

/// `/services`: every service, by namespace and name.
pub(super) fn services(model: &Model, trust_domain: &str) -> String {
    let mut views: Vec<ServiceView> = model.services.iter().map(|s| service_view(s, trust_domain)).collect();
    views.sort_by(|a, b| (a.namespace, a.name).cmp(&(b.namespace, b.name)));
    serde_json::to_string_pretty(&views).unwrap_or_else(|e| super::views::error_json(&e))
}

fn service_view<'a>(service: &'a Service, trust_domain: &str) -> ServiceView<'a> {
    let pods: BTreeSet<(&str, &str)> = service
        .ports
        .iter()
        .flat_map(|p| &p.endpoints)
        .map(|e| (e.workload.namespace.as_str(), e.workload.name.as_str()))
        .collect();
    ServiceView {
        name: &service.name,
        namespace: &service.namespace,
        hostname: &service.hostname,
        vip: service.vip,
        waypoint: service.waypoint.as_ref().map(ToString::to_string),
        ports: service
            .ports
            .iter()
            .map(|p| PortView {
                port: p.port,
                name: p.name.as_deref(),
                protocol: protocol_name(p.protocol),
                endpoints: p
                    .endpoints
                    .iter()
                    .map(|e| EndpointView {
                        workload: e.workload.display_name(),
                        address: e.addr(),
                        node: e.workload.node.clone(),
                        identity: e.workload.identity(trust_domain).to_string(),
                        protocol: workload_protocol(&e.workload),
                    })
                    .collect(),
            })
            .collect(),
        endpoints: pods.len(),
        labels: &service.labels,
    }
}

#[derive(Serialize)]
struct PolicyView<'a> {
    /// `AuthorizationPolicy`, `PeerAuthentication` or `RequestAuthentication`.
    kind: &'static str,
    namespace: &'a str,
    name: &'a str,
    /// AuthorizationPolicy: `Allow`, `Deny`, `Audit`, `Custom` (as istioctl prints them);
    /// PeerAuthentication: the mTLS mode (`STRICT`, `PERMISSIVE`, `DISABLE`, `UNSET`);
    /// RequestAuthentication: `JWT`.
    action: &'static str,
    /// `istio.io/dry-run`: evaluated and logged, never enforced.
    dry_run: bool,
    /// `Global` (root namespace), `Namespace`, `WorkloadSelector` or `TargetRefs`.
    scope: &'static str,
    selector: BTreeMap<String, String>,
    /// `Kind/name` or `Kind/namespace/name` of the `targetRefs`.
    target_refs: Vec<String>,
    /// AuthorizationPolicy rules; PeerAuthentication port-level modes (`port=MODE`);
    /// RequestAuthentication issuers.
    details: Vec<String>,
    /// What the policy applies to at this proxy: `namespace/name` of the pods a node proxy
    /// captures, service hostnames at a waypoint. Empty: the policy does nothing here.
    applies_to: Vec<String>,
}

/// `/policies`: AuthorizationPolicies, PeerAuthentications and RequestAuthentications, in the
/// order written, each with what it applies to at `place`.
pub(super) fn policies(model: &Model, place: &Place) -> String {
    let security = &model.security;
    let root = security.root_namespace.as_str();
    let local: Vec<&Workload> = match place {
        // Policy at a node proxy is for the pods it captures.
        Place::Node(node) => model.workloads_on(node).filter(|w| w.captured).map(AsRef::as_ref).collect(),
        Place::Waypoint(_) => Vec::new(),
    };
    let served: Vec<&Service> = match place {
        Place::Node(_) => Vec::new(),
        Place::Waypoint(waypoint) => {
            model.services.iter().filter(|s| s.waypoint.as_ref() == Some(*waypoint)).map(AsRef::as_ref).collect()
        }
    };
    let mut views = Vec::new();
    for policy in &security.authorization_policies {
        let applies_to = match place {
            Place::Node(_) => local
                .iter()
                .filter(|w| security.authorization_for(w).iter().any(|p| std::ptr::eq(p.as_ref(), policy.as_ref())))
                .map(|w| w.display_name())
                .collect(),
            Place::Waypoint(waypoint) => served
                .iter()
                .filter(|s| policy.binds_waypoint(Some(*s), waypoint, root))
                .map(|s| s.hostname.clone())
                .collect(),
        };
        let (scope, selector, target_refs) = match &policy.scope {
            Scope::Mesh => ("Global", BTreeMap::new(), Vec::new()),
            Scope::Namespace => ("Namespace", BTreeMap::new(), Vec::new()),
            Scope::Selector { labels, .. } => ("WorkloadSelector", labels.clone(), Vec::new()),
            Scope::TargetRefs(refs) => ("TargetRefs", BTreeMap::new(), refs.iter().map(target_ref).collect()),
        };
        views.push(PolicyView {
            kind: "AuthorizationPolicy",
            namespace: &policy.namespace,
            name: &policy.name,
            action: match policy.action {
                Action::Allow => "Allow",
                Action::Deny => "Deny",
                Action::Audit => "Audit",
                Action::Custom => "Custom",
            },
            dry_run: policy.dry_run,
            scope,
            selector,
            target_refs,
            details: vec![format!("{} rule(s)", policy.rules.len())],
            applies_to,
        });
    }
    for pa in &security.peer_authentications {
        let applies_to = local
            .iter()
            .filter(|w| {
                let chain = security.peer_authn_for(w);
                [chain.mesh, chain.namespace, chain.workload]
                    .into_iter()
                    .flatten()
                    .any(|p| std::ptr::eq(p, pa.as_ref()))
            })
            .map(|w| w.display_name())
            .collect();
        let (scope, selector) = match &pa.scope {
            PeerAuthnScope::Mesh => ("Global", BTreeMap::new()),
            PeerAuthnScope::Namespace => ("Namespace", BTreeMap::new()),
            PeerAuthnScope::Selector(labels) => ("WorkloadSelector", labels.clone()),
        };
        views.push(PolicyView {
            kind: "PeerAuthentication",
            namespace: &pa.namespace,
            name: &pa.name,
            action: mtls_name(pa.mode),
            dry_run: false,
            scope,
            selector,
            target_refs: Vec::new(),
            details: pa.port_level.iter().map(|(port, mode)| format!("{port}={}", mtls_name(Some(*mode)))).collect(),
            applies_to,
        });
    }
    for ra in &security.request_authentications {
        let applies_to = match place {
            // The node proxy never checks JWTs (L7-10 is the waypoint's).
            Place::Node(_) => Vec::new(),
            Place::Waypoint(waypoint) => served
                .iter()
                .filter(|s| security.request_authn_at_waypoint(Some(*s), waypoint).any(|r| std::ptr::eq(r, ra)))
                .map(|s| s.hostname.clone())
                .collect(),
        };
        let scope = match (ra.target_refs.is_empty(), ra.selector.is_empty()) {
            (false, _) => "TargetRefs",
            (true, false) => "WorkloadSelector",
            (true, true) if ra.namespace == root => "Global",
            (true, true) => "Namespace",
        };
        views.push(PolicyView {
            kind: "RequestAuthentication",
            namespace: &ra.namespace,
            name: &ra.name,
            action: "JWT",
            dry_run: false,
            scope,
            selector: ra.selector.clone(),
            target_refs: ra.target_refs.iter().map(target_ref).collect(),
            details: ra.jwt_rules.iter().map(|r| format!("issuer {}", r.issuer)).collect(),
            applies_to,
        });
    }
    serde_json::to_string_pretty(&views).unwrap_or_else(|e| super::views::error_json(&e))
}

fn mtls_name(mode: Option<MtlsMode>) -> &'static str {
    match mode {
        None => "UNSET",
        Some(MtlsMode::Strict) => "STRICT",
        Some(MtlsMode::Permissive) => "PERMISSIVE",
        Some(MtlsMode::Disable) => "DISABLE",
    }
}

fn target_ref(r: &PolicyTargetRef) -> String {
    match &r.namespace {
        Some(ns) => format!("{}/{ns}/{}", r.kind, r.name),
        None => format!("{}/{}", r.kind, r.name),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn model(yaml: &str) -> Model {
        crate::model::compile_clean(yaml)
    }

    const MESH: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: shop, labels: {app: web}}\n\
        spec: {nodeName: node1, serviceAccountName: web}\nstatus: {podIP: 10.1.0.10}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: web-2, namespace: shop, labels: {app: web}}\n\
        spec: {nodeName: node2, serviceAccountName: web}\nstatus: {podIP: 10.2.0.10}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: wp, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}\n\
        spec: {nodeName: node1, serviceAccountName: waypoint}\nstatus: {podIP: 10.1.0.20}\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}\n\
        spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}, {name: tcp-admin, port: 9000}]}\n---\n\
        apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-web, namespace: shop}\n\
        spec: {selector: {matchLabels: {app: web}}, action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/waypoint]}}]}]}\n---\n\
        apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: get-only, namespace: shop}\n\
        spec: {targetRefs: [{kind: Service, group: '', name: web}], rules: [{to: [{operation: {methods: [GET]}}]}]}\n---\n\
        apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: shop}\n\
        spec: {mtls: {mode: STRICT}}\n";

    fn json(text: &str) -> Value {
        serde_json::from_str(text).expect("JSON")
    }

    #[test]
    fn services_show_vip_waypoint_ports_and_endpoints() {
        let list = json(&services(&model(MESH), "cluster.local"));
        let web = &list[0];
        assert_eq!(web["hostname"], "web.shop.svc.cluster.local");
        assert_eq!((web["vip"].as_str(), web["waypoint"].as_str()), (Some("10.96.0.10"), Some("shop/waypoint")));
        assert_eq!(web["endpoints"], 2, "two pods, counted once over two ports");
        let http = &web["ports"][0];
        assert_eq!((http["port"].as_u64(), http["protocol"].as_str()), (Some(80), Some("HTTP")));
        assert_eq!(http["endpoints"][0]["address"], "10.1.0.10:8080");
        assert_eq!(http["endpoints"][0]["identity"], "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(http["endpoints"][1]["node"], "node2");
        assert_eq!(web["ports"][1]["protocol"], "TCP");
    }

    #[test]
    fn policies_say_what_they_apply_to_at_a_node_and_at_a_waypoint() {
        let model = model(MESH);
        let at_node = json(&policies(&model, &Place::Node("node1")));
        let names: Vec<&str> = at_node.as_array().expect("list").iter().filter_map(|p| p["name"].as_str()).collect();
        assert_eq!(names, ["allow-web", "get-only", "strict"]);
        let allow = &at_node[0];
        assert_eq!((allow["action"].as_str(), allow["scope"].as_str()), (Some("Allow"), Some("WorkloadSelector")));
        assert_eq!(allow["selector"]["app"], "web");
        assert_eq!(allow["applies_to"], serde_json::json!(["shop/web-1"]), "only this node's pods");
        assert_eq!(at_node[1]["scope"], "TargetRefs");
        assert_eq!(at_node[1]["target_refs"], serde_json::json!(["Service/web"]));
        assert_eq!(at_node[1]["applies_to"], serde_json::json!([]), "a node proxy does not enforce it");
        let strict = &at_node[2];
        assert_eq!((strict["kind"].as_str(), strict["action"].as_str()), (Some("PeerAuthentication"), Some("STRICT")));
        assert_eq!(strict["applies_to"], serde_json::json!(["shop/web-1"]), "the waypoint's pod is not captured");

        let waypoint = WaypointName { namespace: "shop".into(), name: "waypoint".into() };
        let at_waypoint = json(&policies(&model, &Place::Waypoint(&waypoint)));
        assert_eq!(at_waypoint[0]["applies_to"], serde_json::json!([]));
        assert_eq!(at_waypoint[1]["applies_to"], serde_json::json!(["web.shop.svc.cluster.local"]));
    }
}
