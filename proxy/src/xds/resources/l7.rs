//! strait's own resource type for waypoints (`strait.config.v1.L7Resource`): VirtualServices,
//! DestinationRules, AuthorizationPolicies bound with `targetRefs` and RequestAuthentications,
//! each carried as its user wrote it (a JSON document and its `file:line`), so a waypoint
//! following the control plane parses and compiles exactly what a waypoint reading the
//! directory would, and its diagnostics point at the same lines.
//!
//! A resource goes only to the waypoints it is relevant to: those of its namespace, of the
//! namespaces whose services or pods use the waypoint, every waypoint for the root namespace,
//! plus the waypoints whose services it names (a VirtualService's hosts, a DestinationRule's host
//! when a relevant route sends traffic there, a policy's `targetRefs`). The snapshot records the
//! list in the resource, so `visible` needs nothing but the resource.
//!
//! A waypoint says which one it is with the node metadata `STRAIT_WAYPOINT=<namespace>/<name>`
//! (or `<name>`, with the namespace from the `NAMESPACE` metadata). An ingress or egress gateway
//! says `STRAIT_GATEWAY=<namespace>/<name>` and gets every L7 resource and every Istio
//! `networking.istio.io` Gateway (GW-1): which Gateways it serves depends on its pods' labels,
//! which it knows and the control plane does not, so it chooses as it does from a directory.
//!
//! Node proxies get the `mesh` VirtualService of each ServiceEntry host no waypoint serves, and
//! the DestinationRules of its destinations (subsets): they apply those routes per connection
//! (GW-3, the two-hop egress pattern); and the mesh's ConfigMap, for REGISTRY_ONLY (L4-5).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
};

use strait_proto::{prost::Message, strait::L7Resource};

use super::resource;
use crate::{
    authz::policy::targets_bind_waypoint,
    config::{Located, Origin, PolicyTargetRef, Resource, parse_file},
    model::{
        Model, Service, WaypointName,
        routes::{Destination, RouteAction},
    },
    xds::{L7_TYPE_URL, Subscriber, XdsResource},
};

/// The node metadata a waypoint names itself with.
pub const WAYPOINT_METADATA: &str = "STRAIT_WAYPOINT";
/// The node metadata an ingress or egress gateway names itself with.
pub const GATEWAY_METADATA: &str = "STRAIT_GATEWAY";
/// The relevance entry meaning every waypoint.
const EVERY_WAYPOINT: &str = "*";
/// The relevance entry meaning every node proxy (waypoint names hold a `/`: no clash).
const NODE_PROXIES: &str = "node-proxies";

/// The waypoint a subscriber runs, from its `STRAIT_WAYPOINT` metadata; `None` for node proxies
/// and any other subscriber.
pub fn subscriber_waypoint(subscriber: &Subscriber) -> Option<WaypointName> {
    named_in_metadata(subscriber, WAYPOINT_METADATA)
}

/// The gateway a subscriber runs, from its `STRAIT_GATEWAY` metadata (`<namespace>/<name>`, or
/// `<name>` in the `NAMESPACE` metadata's namespace).
pub fn subscriber_gateway(subscriber: &Subscriber) -> Option<WaypointName> {
    named_in_metadata(subscriber, GATEWAY_METADATA)
}

/// `<namespace>/<name>` (or `<name>` in the subscriber's namespace) from metadata `key`.
fn named_in_metadata(subscriber: &Subscriber, key: &str) -> Option<WaypointName> {
    let value = subscriber.metadata.get(key).filter(|v| !v.is_empty())?;
    let (namespace, name) = match value.split_once('/') {
        Some((namespace, name)) => (namespace.to_owned(), name.to_owned()),
        None => (subscriber.namespace.clone()?, value.clone()),
    };
    (!namespace.is_empty() && !name.is_empty()).then_some(WaypointName { namespace, name })
}

/// Whether an L7 resource goes to node proxies too.
pub(super) fn relevant_to_node_proxies(resource: &XdsResource) -> bool {
    L7Resource::decode(resource.body.value.as_slice()).is_ok_and(|l7| l7.waypoints.iter().any(|w| w == NODE_PROXIES))
}

/// Whether an L7 resource's relevance list names `waypoint` (or every waypoint).
pub(super) fn relevant_to(resource: &XdsResource, waypoint: &WaypointName) -> bool {
    let Ok(l7) = L7Resource::decode(resource.body.value.as_slice()) else { return false };
    let name = waypoint.to_string();
    l7.waypoints.iter().any(|w| w == EVERY_WAYPOINT || *w == name)
}

/// The xDS name of an L7 resource: `Kind/namespace/name`.
fn l7_name(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind}/{namespace}/{name}")
}

/// What each waypoint serves: the namespaces whose resources apply to it and its services.
struct Waypoints<'a> {
    root: &'a str,
    served: BTreeMap<WaypointName, Served<'a>>,
}

#[derive(Default)]
struct Served<'a> {
    namespaces: HashSet<&'a str>,
    services: Vec<&'a Arc<Service>>,
    /// Hosts its routes can send to: its services, and destinations of its VirtualServices.
    hosts: HashSet<String>,
}

impl<'a> Waypoints<'a> {
    fn new(model: &'a Model) -> Self {
        let root = model.security.root_namespace.as_str();
        let mut served: BTreeMap<WaypointName, Served> = BTreeMap::new();
        for name in model.waypoints.keys() {
            served.entry(name.clone()).or_default().namespaces.insert(&name.namespace);
        }
        for w in &model.workloads {
            if let Some(name) = &w.waypoint {
                let entry = served.entry(name.clone()).or_default();
                entry.namespaces.extend([name.namespace.as_str(), w.namespace.as_str()]);
            }
        }
        for s in &model.services {
            if let Some(name) = &s.waypoint {
                let entry = served.entry(name.clone()).or_default();
                entry.namespaces.extend([name.namespace.as_str(), s.namespace.as_str()]);
                entry.services.push(s);
                entry.hosts.insert(s.hostname.clone());
            }
        }
        let mut waypoints = Waypoints { root, served };
        // Routes of the VirtualServices a waypoint applies can send anywhere: the
        // DestinationRules of those destinations apply at the waypoint too.
        for vs in &model.routing.virtual_services {
            for served in waypoints.served.values_mut() {
                if served.namespaces.contains(vs.namespace.as_str()) || vs.hosts.iter().any(|h| served.covers(h)) {
                    served.hosts.extend(destinations(vs).map(|d| d.host.clone()));
                }
            }
        }
        waypoints
    }

    /// `["*"]` for the root namespace, else the waypoints for which `applies` holds, sorted.
    fn relevance(&self, namespace: &str, applies: impl Fn(&WaypointName, &Served) -> bool) -> Vec<String> {
        if namespace == self.root {
            return vec![EVERY_WAYPOINT.to_owned()];
        }
        self.served
            .iter()
            .filter(|(name, served)| served.namespaces.contains(namespace) || applies(name, served))
            .map(|(name, _)| name.to_string())
            .collect()
    }
}

impl Served<'_> {
    /// Whether a host pattern (FQDN or `*.suffix`) covers one of the hosts this waypoint serves.
    fn covers(&self, pattern: &str) -> bool {
        self.hosts.iter().any(|h| host_matches(pattern, h))
    }
}

fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix),
        None => pattern == host,
    }
}

fn destinations(vs: &crate::model::routes::VirtualService) -> impl Iterator<Item = &Destination> {
    let http = vs.http.iter().flat_map(|r| {
        let forward = match &r.action {
            RouteAction::Forward(to) => to.as_slice(),
            _ => &[],
        };
        forward.iter().map(|w| &w.destination).chain(r.mirrors.iter().map(|m| &m.destination))
    });
    let tcp = vs.tcp.iter().flat_map(|r| r.destinations.iter().map(|w| &w.destination));
    let tls = vs.tls.iter().flat_map(|r| r.destinations.iter().map(|w| &w.destination));
    http.chain(tcp).chain(tls)
}

/// What node proxies apply (GW-3): the `mesh` VirtualService of each ServiceEntry host that no
/// waypoint serves, and the DestinationRules its destinations use, by `(namespace, name)`.
struct NodeRoutes<'a> {
    virtual_services: HashSet<(&'a str, &'a str)>,
    destination_rules: HashSet<(&'a str, &'a str)>,
}

impl<'a> NodeRoutes<'a> {
    fn new(model: &'a Model) -> Self {
        let mut virtual_services = HashSet::new();
        let mut destination_rules = HashSet::new();
        for service in model.services.iter().filter(|s| s.entry.is_some() && s.waypoint.is_none()) {
            let Some(vs) = model.routing.mesh_routes_for(&service.hostname) else { continue };
            virtual_services.insert((vs.namespace.as_str(), vs.name.as_str()));
            for destination in destinations(vs) {
                if let Some(rule) = model.routing.destination_rule_for(&destination.host) {
                    destination_rules.insert((rule.namespace.as_str(), rule.name.as_str()));
                }
            }
        }
        NodeRoutes { virtual_services, destination_rules }
    }
}

/// Whether `targets` (written in `namespace`) bind one of the waypoint's services or itself.
fn binds(targets: &[PolicyTargetRef], namespace: &str, waypoint: &WaypointName, served: &Served, root: &str) -> bool {
    targets_bind_waypoint(targets, namespace, None, waypoint, root)
        || served.services.iter().any(|s| targets_bind_waypoint(targets, namespace, Some(s), waypoint, root))
}

/// Every L7 resource of `resources`, by xDS name, with the waypoints it is relevant to.
pub(super) fn encode(model: &Model, resources: &[Located<Resource>]) -> BTreeMap<String, Arc<XdsResource>> {
    let waypoints = Waypoints::new(model);
    let root = waypoints.root;
    let for_nodes = NodeRoutes::new(model);
    let mut out = BTreeMap::new();
    for located in resources {
        let Some(document) = &located.document else { continue };
        let (kind, meta, relevance) = match &located.resource {
            Resource::VirtualService(vs) => {
                let namespace = vs.metadata.namespace_or_default();
                let compiled = model
                    .routing
                    .virtual_services
                    .iter()
                    .find(|c| c.name == vs.metadata.name && c.namespace == namespace);
                let hosts = compiled.map(|c| c.hosts.as_slice()).unwrap_or_default();
                let mut relevance = waypoints.relevance(namespace, |_, served| hosts.iter().any(|h| served.covers(h)));
                if for_nodes.virtual_services.contains(&(namespace, vs.metadata.name.as_str())) {
                    relevance.push(NODE_PROXIES.to_owned());
                }
                ("VirtualService", &vs.metadata, relevance)
            }
            Resource::DestinationRule(dr) => {
                let namespace = dr.metadata.namespace_or_default();
                let compiled = model
                    .routing
                    .destination_rules
                    .iter()
                    .find(|c| c.name == dr.metadata.name && c.namespace == namespace);
                let mut relevance =
                    waypoints.relevance(namespace, |_, served| compiled.is_some_and(|c| served.covers(&c.host)));
                if compiled
                    .is_some_and(|c| for_nodes.destination_rules.contains(&(c.namespace.as_str(), c.name.as_str())))
                {
                    relevance.push(NODE_PROXIES.to_owned());
                }
                ("DestinationRule", &dr.metadata, relevance)
            }
            Resource::AuthorizationPolicy(ap) => {
                let mut targets = ap.spec.target_refs.clone();
                targets.extend(ap.spec.target_ref.clone());
                if targets.is_empty() {
                    // Bound by selector or namespace: the node proxy's, served as Authorization.
                    continue;
                }
                let namespace = ap.metadata.namespace_or_default();
                let relevance =
                    waypoints.relevance(namespace, |name, served| binds(&targets, namespace, name, served, root));
                ("AuthorizationPolicy", &ap.metadata, relevance)
            }
            // The mesh's outbound traffic policy, which node proxies enforce (L4-5).
            Resource::MeshConfig(mesh) => ("ConfigMap", &mesh.metadata, vec![NODE_PROXIES.to_owned()]),
            Resource::RequestAuthentication(ra) => {
                let mut targets = ra.spec.target_refs.clone();
                targets.extend(ra.spec.target_ref.clone());
                let namespace = ra.metadata.namespace_or_default();
                let relevance =
                    waypoints.relevance(namespace, |name, served| binds(&targets, namespace, name, served, root));
                ("RequestAuthentication", &ra.metadata, relevance)
            }
            // Only gateways read them (and they see every L7 resource): no waypoint.
            Resource::IstioGateway(gw) => ("networking.istio.io/Gateway", &gw.metadata, Vec::new()),
            _ => continue,
        };
        let l7 = L7Resource { origin: located.origin.to_string(), document: as_json(document), waypoints: relevance };
        let name = l7_name(kind, meta.namespace_or_default(), &meta.name);
        out.extend([resource(name, Vec::new(), L7_TYPE_URL, &l7)]);
    }
    out
}

/// The document as JSON (which the YAML parser reads too). A document JSON cannot hold (a
/// non-string key) stays YAML.
fn as_json(yaml: &str) -> String {
    serde_yaml_ng::from_str::<serde_json::Value>(yaml)
        .ok()
        .and_then(|value| serde_json::to_string(&value).ok())
        .unwrap_or_else(|| yaml.to_owned())
}

/// The xDS names of L7 resources by their origin (file, line), for messages about them.
pub(super) type NamesByOrigin = HashMap<(PathBuf, usize), String>;

/// The L7 resources a waypoint received, parsed, with their origins restored.
pub(super) fn decode(
    resources: &BTreeMap<String, strait_proto::prost_types::Any>,
    errors: &mut Vec<String>,
) -> (Vec<Located<Resource>>, NamesByOrigin) {
    let mut parsed = Vec::new();
    let mut names = HashMap::new();
    for (name, any) in resources {
        let what = format!("L7Resource {name}");
        if any.type_url != L7_TYPE_URL {
            errors.push(format!("{what}: field `type_url`: `{}` is not {L7_TYPE_URL}", any.type_url));
            continue;
        }
        let l7 = match L7Resource::decode(any.value.as_slice()) {
            Ok(l7) => l7,
            Err(e) => {
                errors.push(format!("{what}: cannot decode: {e}"));
                continue;
            }
        };
        let origin = parse_origin(&l7.origin);
        let (mut resources, diagnostics) = parse_file(&origin.file, &l7.document);
        let problems: Vec<String> =
            diagnostics.iter().filter(|d| d.is_error()).map(|d| relocated(d, &origin)).collect();
        if !problems.is_empty() {
            errors.push(format!("{what}: {}", problems.join("; ")));
            continue;
        }
        let Some(mut located) = resources.pop().filter(|_| resources.is_empty()) else {
            errors.push(format!("{what}: field `document`: must hold exactly one resource"));
            continue;
        };
        if !located.resource.forwarded_as_written() {
            errors.push(format!(
                "{what}: field `document`: a {} is not an L7 resource (VirtualService, DestinationRule, \
                 AuthorizationPolicy, RequestAuthentication, networking.istio.io Gateway, the mesh's ConfigMap)",
                located.resource.key().map_or("resource of another kind", |k| k.0)
            ));
            continue;
        }
        located.origin = origin;
        names.insert((located.origin.file.clone(), located.origin.line), name.clone());
        parsed.push(located);
    }
    (parsed, names)
}

/// `file:line` back into an origin; a text without a line number is all file.
fn parse_origin(text: &str) -> Origin {
    match text.rsplit_once(':').and_then(|(file, line)| Some((file, line.parse::<usize>().ok()?))) {
        Some((file, line)) => Origin::new(Path::new(file), line),
        None => Origin::new(Path::new(text), 0),
    }
}

/// A parse diagnostic about the JSON text, told at the resource's own origin.
fn relocated(d: &crate::config::Diagnostic, origin: &Origin) -> String {
    crate::config::Diagnostic { origin: origin.clone(), ..d.clone() }.to_string()
}

/// Names every namespace a compiled model knows, so host resolution expands `svc.ns` as it does
/// with the directory's Namespace resources.
pub(super) fn namespaces(names: impl IntoIterator<Item = String>) -> Vec<Located<Resource>> {
    let unique: BTreeSet<String> = names.into_iter().collect();
    unique
        .into_iter()
        .map(|name| {
            let metadata = crate::config::ObjectMeta { name, ..Default::default() };
            Located::new(Origin::new(Path::new("xds"), 0), Resource::Namespace(crate::config::Namespace { metadata }))
        })
        .collect()
}
