//! The compiled model: what the data path needs to know, derived from the resources by a pure
//! function so that every decision it encodes is testable without sockets.
//!
//! A `Model` is immutable; a new configuration produces a new one that replaces the old
//! atomically (see `ModelHandle`), and a configuration with errors never replaces a good one.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use serde::Serialize;
use tokio::sync::watch;

use crate::{
    authz::{self, peer_authn::PeerAuthnChain},
    config::{Cidr, Diagnostic, Located, Origin, OutboundMode, Resource},
    identity::Identity,
};

pub mod egress_routes;
pub mod gateways;
pub mod reload;
pub mod routes;
mod security;
mod service_entries;
mod services;
pub mod waypoints;

pub use routes::Routing;
pub use security::{RequestAuthn, Security, SecurityParts, compile_security};
pub(crate) use service_entries::entry_workload;
pub use service_entries::{DnsEndpoint, ServiceEntryInfo};
pub use services::{AppProtocol, Endpoint, Service, ServicePort};
pub use waypoints::{Waypoint, WaypointName};

/// Istio's default root namespace: policies there apply mesh-wide (AUTHZ-1, L4-4).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// Settings of compilation that come from the mesh, not from the resources.
#[derive(Debug, Clone)]
pub struct CompileOptions {
    /// The namespace whose policies apply to the whole mesh (Istio's `rootNamespace`).
    pub root_namespace: String,
}

impl Default for CompileOptions {
    fn default() -> Self {
        Self { root_namespace: DEFAULT_ROOT_NAMESPACE.to_owned() }
    }
}

/// Label that enrols a namespace (or a pod) in the mesh, and its values.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
pub const DATAPLANE_MODE_NONE: &str = "none";

/// A workload: one pod, as the mesh sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// The node the pod runs on (`spec.nodeName`).
    pub node: Option<String>,
    pub ip: IpAddr,
    pub labels: BTreeMap<String, String>,
    pub host_network: bool,
    /// Captured by the mesh: enrolled namespace or pod, not opted out, not hostNetwork, not a
    /// waypoint.
    pub captured: bool,
    /// The waypoint traffic addressed to this pod's IP goes through (`istio.io/use-waypoint`).
    pub waypoint: Option<WaypointName>,
    /// Set when this pod runs a waypoint: the waypoint's name.
    pub waypoint_role: Option<WaypointName>,
    /// How the pod's own address is reached (Istio's tunnel protocol): HBONE when a mesh proxy
    /// (strait or another HBONE proxy such as Istio's ztunnel) or the pod itself terminates
    /// HBONE for it, plain TCP otherwise.
    pub protocol: WorkloadProtocol,
}

/// How traffic to a workload's address travels (Istio's `TunnelProtocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum WorkloadProtocol {
    /// HTTP/2 CONNECT inside mTLS to the pod's address on port 15008 (L4-1).
    Hbone,
    /// Plain TCP to the pod (L4-5).
    Tcp,
}

impl Workload {
    /// `namespace/name`, the way access logs name a workload.
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The SPIFFE identity the pod's service account gives it.
    pub fn identity(&self, trust_domain: &str) -> Identity {
        Identity::new(trust_domain, &self.namespace, &self.service_account)
    }

    /// Whether a connection to this pod's own address goes over HBONE: its protocol says so
    /// and it is not a waypoint (a waypoint is reached as one, never as a destination).
    pub fn reached_over_hbone(&self) -> bool {
        self.protocol == WorkloadProtocol::Hbone && self.waypoint_role.is_none()
    }
}

/// Everything the data path reads, derived from one consistent set of resources.
#[derive(Debug, Default, Serialize)]
pub struct Model {
    pub workloads: Vec<Arc<Workload>>,
    pub services: Vec<Arc<Service>>,
    /// AuthorizationPolicies, PeerAuthentications and RequestAuthentications, scoped.
    pub security: Security,
    /// VirtualServices and DestinationRules.
    pub routing: Routing,
    /// Istio Gateways (`networking.istio.io`), in file order (GW-1).
    pub gateways: Vec<Arc<gateways::Gateway>>,
    /// Waypoints and their pods, by name.
    #[serde(serialize_with = "waypoint_list")]
    pub waypoints: HashMap<WaypointName, Arc<Waypoint>>,
    /// Workloads by IP. hostNetwork pods share their node's IP and are not indexed.
    #[serde(skip)]
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    #[serde(skip)]
    services_by_vip: HashMap<IpAddr, Arc<Service>>,
    #[serde(skip)]
    services_by_host: HashMap<String, Arc<Service>>,
    /// ServiceEntry addresses that are CIDR blocks, with their service (few: scanned).
    #[serde(skip)]
    entry_blocks: Vec<(Cidr, Arc<Service>)>,
    /// ServiceEntry STATIC endpoint addresses, to name the service a connection to one reaches.
    #[serde(skip)]
    entries_by_endpoint: HashMap<IpAddr, Arc<Service>>,
    /// ServiceEntries of resolution NONE without addresses, by port: as in Istio's sidecars,
    /// any destination on the port that nothing else claims is that service.
    #[serde(skip)]
    entries_by_port: HashMap<u16, Arc<Service>>,
    /// `outboundTrafficPolicy.mode` of the mesh config (L4-5).
    pub outbound_mode: OutboundMode,
    /// Counts published models: state derived from a model (the L7 engine's destinations)
    /// compares it to know when to rebuild.
    pub generation: u64,
}

impl Model {
    /// The workload owning `ip`, if the mesh knows one.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// The service whose virtual IP is `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.services_by_vip.get(&ip)
    }

    /// The service named `host` (`name.namespace.svc.cluster.local`).
    pub fn service_by_host(&self, host: &str) -> Option<&Arc<Service>> {
        self.services_by_host.get(host)
    }

    /// The service whose virtual IP is `ip`, or whose ServiceEntry addresses cover it.
    pub fn service_by_address(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.services_by_vip.get(&ip).or_else(|| self.entry_blocks.iter().find(|(c, _)| c.contains(ip)).map(|(_, s)| s))
    }

    /// The ServiceEntry service one of whose STATIC endpoints is `ip`.
    pub fn service_by_endpoint(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.entries_by_endpoint.get(&ip)
    }

    /// The ServiceEntry of resolution NONE without addresses that declares `port`.
    pub fn service_by_port(&self, port: u16) -> Option<&Arc<Service>> {
        self.entries_by_port.get(&port)
    }

    /// The names a node proxy resolves through DNS for ServiceEntries (sorted, no duplicates,
    /// no IP addresses).
    pub fn dns_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .services
            .iter()
            .filter_map(|s| s.entry.as_ref())
            .flat_map(|e| &e.dns)
            .filter(|d| d.name.parse::<IpAddr>().is_err())
            .map(|d| d.name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Indexes the ServiceEntry services' addresses, endpoints and ports; the first service
    /// wins each key. Returns the services whose address was already taken, with the address.
    fn index_entries(&mut self) -> Vec<(Arc<Service>, IpAddr)> {
        let mut clashes = Vec::new();
        for service in &self.services {
            let Some(entry) = &service.entry else { continue };
            for block in &entry.addresses {
                let single = block.prefix() == if block.addr().is_ipv4() { 32 } else { 128 };
                if !single {
                    self.entry_blocks.push((*block, service.clone()));
                    continue;
                }
                match self.services_by_vip.get(&block.addr()) {
                    Some(other)
                        if !Arc::ptr_eq(other, service)
                            && other.entry.as_ref().is_none_or(|o| o.entry != entry.entry) =>
                    {
                        clashes.push((service.clone(), block.addr()));
                    }
                    Some(_) => {}
                    None => {
                        self.services_by_vip.insert(block.addr(), service.clone());
                    }
                }
            }
            for endpoint in service.ports.iter().flat_map(|p| &p.endpoints) {
                self.entries_by_endpoint.entry(endpoint.workload.ip).or_insert_with(|| service.clone());
            }
            if entry.resolution == crate::config::Resolution::None && entry.addresses.is_empty() {
                for port in &service.ports {
                    self.entries_by_port.entry(port.port).or_insert_with(|| service.clone());
                }
            }
        }
        clashes
    }

    /// The AuthorizationPolicies applying to `workload` at the node proxy (AUTHZ-1), ready for
    /// `authz::evaluate`.
    pub fn authorization_for<'a>(&'a self, workload: &Workload) -> impl Iterator<Item = &'a authz::Policy> + 'a {
        self.security.authorization_for(workload).iter().map(Arc::as_ref)
    }

    /// The PeerAuthentications in force for `workload`, one per level (see
    /// `authz::peer_authn::mode_for`).
    pub fn peer_authn_for(&self, workload: &Workload) -> PeerAuthnChain<'_> {
        self.security.peer_authn_for(workload)
    }

    /// The waypoint named `name`, if any pod runs it.
    pub fn waypoint(&self, name: &WaypointName) -> Option<&Arc<Waypoint>> {
        self.waypoints.get(name)
    }

    /// Builds a model from parts compiled elsewhere (a control plane's xDS resources, CFG-2),
    /// with the indexes `compile` builds: workloads by IP (hostNetwork pods are not indexed),
    /// services by VIP and by hostname (the first of each wins), waypoints from their pods.
    pub fn from_parts(
        workloads: Vec<Arc<Workload>>,
        services: Vec<Arc<Service>>,
        security: Security,
        routing: Routing,
    ) -> Model {
        let mut model = Model { security, routing, ..Model::default() };
        for w in workloads.iter().filter(|w| !w.host_network) {
            model.by_ip.entry(w.ip).or_insert_with(|| w.clone());
        }
        for service in services.iter().filter(|s| s.entry.is_none()) {
            model.services_by_host.entry(service.hostname.clone()).or_insert_with(|| service.clone());
            if let Some(vip) = service.vip {
                model.services_by_vip.entry(vip).or_insert_with(|| service.clone());
            }
        }
        for service in services.iter().filter(|s| s.entry.is_some()) {
            model.services_by_host.entry(service.hostname.clone()).or_insert_with(|| service.clone());
        }
        model.waypoints = waypoints::collect_waypoints(&workloads);
        model.workloads = workloads;
        model.services = services;
        model.index_entries();
        model
    }

    /// Workloads scheduled on `node`.
    pub fn workloads_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        self.workloads.iter().filter(move |w| w.node.as_deref() == Some(node))
    }
}

/// Compiles resources into a model with the default options. Diagnostics with errors mean the
/// model must not be used.
pub fn compile(resources: &[Located<Resource>]) -> (Model, Vec<Diagnostic>) {
    compile_with(resources, &CompileOptions::default())
}

/// Compiles resources into a model. Diagnostics with errors mean the model must not be used.
pub fn compile_with(resources: &[Located<Resource>], options: &CompileOptions) -> (Model, Vec<Diagnostic>) {
    let mut diagnostics = Vec::new();
    check_duplicates(resources, &mut diagnostics);
    let mut namespaces: HashMap<&str, &BTreeMap<String, String>> = HashMap::new();
    for located in resources {
        if let Resource::Namespace(ns) = &located.resource {
            namespaces.insert(ns.metadata.name.as_str(), &ns.metadata.labels);
        }
    }

    let declared = waypoints::declared_waypoints(resources, &mut diagnostics);
    let mut model = Model::default();
    let mut pod_ports: BTreeMap<(String, String), BTreeMap<String, u16>> = BTreeMap::new();
    let mut first_owner: HashMap<IpAddr, &Origin> = HashMap::new();
    for located in resources {
        let Resource::Pod(pod) = &located.resource else {
            continue;
        };
        let Some(ip) = pod.status.pod_ip else {
            // A pod without an IP is not running yet; nothing can talk to it.
            continue;
        };
        let namespace = pod.metadata.namespace_or_default();
        let ns_labels = namespaces.get(namespace).copied();
        if ns_labels.is_none() {
            diagnostics.push(Diagnostic::warning(
                located.origin.clone(),
                Some("metadata.namespace"),
                format!("namespace `{namespace}` is not declared; the pod is treated as not enrolled"),
            ));
        }
        let host_network = pod.spec.host_network;
        let named_ports = pod
            .spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .filter_map(|p| Some((p.name.clone()?, p.container_port)))
            .collect();
        pod_ports.insert((namespace.to_owned(), pod.metadata.name.clone()), named_ports);
        let waypoint_role = waypoints::waypoint_of_pod(namespace, &pod.metadata.labels);
        // A strait gateway terminates HBONE itself, like a waypoint (GW-3: the two-hop egress).
        let gateway_role = pod.metadata.labels.get(gateways::GATEWAY_POD_LABEL).is_some_and(|v| !v.is_empty());
        // A waypoint speaks HBONE itself; capturing it would loop its traffic (as in Istio).
        let captured =
            !host_network && waypoint_role.is_none() && !gateway_role && is_enrolled(&pod.metadata.labels, ns_labels);
        let workload = Workload {
            name: pod.metadata.name.clone(),
            namespace: namespace.to_owned(),
            service_account: pod.spec.service_account_name.clone().unwrap_or_else(|| "default".into()),
            node: pod.spec.node_name.clone(),
            ip,
            labels: pod.metadata.labels.clone(),
            host_network,
            captured,
            // Captured pods are reached over HBONE through their node's proxy; waypoints
            // terminate HBONE themselves.
            protocol: if captured || waypoint_role.is_some() || gateway_role {
                WorkloadProtocol::Hbone
            } else {
                WorkloadProtocol::Tcp
            },
            waypoint: waypoint_role
                .is_none()
                .then(|| waypoints::waypoint_for(namespace, &pod.metadata.labels, ns_labels))
                .flatten()
                .filter(|w| declared.get(w).is_none_or(|takes| takes.workloads())),
            waypoint_role,
        };
        if !host_network {
            if let Some(previous) = first_owner.get(&ip) {
                diagnostics.push(Diagnostic::error(
                    located.origin.clone(),
                    Some("status.podIP"),
                    format!("address {ip} is already used by the pod at {previous}"),
                ));
                continue;
            }
            first_owner.insert(ip, &located.origin);
        }
        let workload = Arc::new(workload);
        if !host_network {
            model.by_ip.insert(ip, workload.clone());
        }
        model.workloads.push(workload);
    }
    model.waypoints = waypoints::collect_waypoints(&model.workloads);
    let (services, addresses) =
        services::compile_services(resources, &model.workloads, &pod_ports, &namespaces, &declared, &mut diagnostics);
    // EndpointSlice addresses that are no pod's: workloads too, so that proxies learn them as
    // every endpoint (no pod has their address, so the index keeps pods first).
    for workload in addresses {
        model.by_ip.entry(workload.ip).or_insert_with(|| workload.clone());
        model.workloads.push(workload);
    }
    let taken: HashMap<String, Origin> = services.iter().map(|s| (s.hostname.clone(), s.origin.clone())).collect();
    let (entries, entry_workloads) = service_entries::compile_service_entries(
        resources,
        &model.workloads,
        &taken,
        &namespaces,
        &declared,
        &mut diagnostics,
    );
    for workload in entry_workloads {
        model.by_ip.entry(workload.ip).or_insert_with(|| workload.clone());
        model.workloads.push(workload);
    }
    model.services = services;
    model.services.extend(entries);
    model.outbound_mode = mesh_outbound_mode(resources);
    model.routing = routes::compile_routing(resources, &model.services, &mut diagnostics);
    model.gateways = gateways::compile_gateways(resources, &model.routing.virtual_services, &mut diagnostics);
    egress_routes::warn_l7_mesh_routes(&model, &mut diagnostics);
    model.security = security::compile_security(resources, &model.workloads, &options.root_namespace, &mut diagnostics);
    for service in &model.services {
        model.services_by_host.insert(service.hostname.clone(), service.clone());
        if service.entry.is_some() {
            continue;
        }
        let Some(vip) = service.vip else { continue };
        if let Some(previous) = model.services_by_vip.insert(vip, service.clone()) {
            diagnostics.push(Diagnostic::error(
                service.origin.clone(),
                Some("spec.clusterIP"),
                format!("cluster IP {vip} is already used by service {} at {}", previous.hostname, previous.origin),
            ));
        }
    }
    for (service, address) in model.index_entries() {
        let previous = model.services_by_vip.get(&address).map(|p| format!("{} at {}", p.hostname, p.origin));
        diagnostics.push(Diagnostic::error(
            service.origin.clone(),
            Some("spec.addresses"),
            format!("address {address} is already used by service {}", previous.unwrap_or_default()),
        ));
    }
    (model, diagnostics)
}

/// `outboundTrafficPolicy.mode` from the mesh config, ALLOW_ANY without one (Istio's default).
pub(crate) fn mesh_outbound_mode(resources: &[Located<Resource>]) -> OutboundMode {
    resources
        .iter()
        .find_map(|r| match &r.resource {
            Resource::MeshConfig(mesh) => Some(mesh.outbound_mode),
            _ => None,
        })
        .unwrap_or_default()
}

/// Tests: the model of one YAML text that must parse without diagnostics and compile without
/// errors.
#[cfg(test)]
pub(crate) fn compile_clean(yaml: &str) -> Model {
    let (resources, diagnostics) = crate::config::parse_file(std::path::Path::new("test.yaml"), yaml);
    assert!(diagnostics.is_empty(), "{diagnostics:?}");
    let (model, diagnostics) = compile(&resources);
    assert!(!diagnostics.iter().any(|d| d.is_error()), "{diagnostics:?}");
    model
}

fn waypoint_list<S: serde::Serializer>(
    waypoints: &HashMap<WaypointName, Arc<Waypoint>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let sorted: BTreeMap<String, &Arc<Waypoint>> = waypoints.iter().map(|(k, v)| (k.to_string(), v)).collect();
    serde::Serialize::serialize(&sorted, s)
}

/// Two resources of one kind, namespace and name: the API server would keep only the last
/// applied, so which one the user meant is unknowable.
fn check_duplicates(resources: &[Located<Resource>], diagnostics: &mut Vec<Diagnostic>) {
    let mut seen: HashMap<(&str, &str, &str), &Origin> = HashMap::new();
    for located in resources {
        let Some(key @ (kind, namespace, name)) = located.resource.key() else { continue };
        if let Some(first) = seen.get(&key) {
            let what = if namespace.is_empty() { name.to_owned() } else { format!("{namespace}/{name}") };
            diagnostics.push(Diagnostic::error(
                located.origin.clone(),
                Some("metadata.name"),
                format!("duplicate {kind} {what}: already defined at {first}"),
            ));
        } else {
            seen.insert(key, &located.origin);
        }
    }
}

/// Istio ambient's enrolment rule: a pod label wins (`none` opts out, `ambient` opts in),
/// otherwise the namespace label decides.
fn is_enrolled(pod_labels: &BTreeMap<String, String>, ns_labels: Option<&BTreeMap<String, String>>) -> bool {
    match pod_labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
        Some(DATAPLANE_MODE_NONE) => false,
        Some(DATAPLANE_MODE_AMBIENT) => true,
        _ => ns_labels.and_then(|l| l.get(DATAPLANE_MODE_LABEL)).is_some_and(|v| v == DATAPLANE_MODE_AMBIENT),
    }
}

/// The current model, shared by every consumer; replaced atomically on reload.
#[derive(Clone)]
pub struct ModelHandle {
    rx: watch::Receiver<Arc<Model>>,
}

/// The writing side of a `ModelHandle`, held by the configuration source.
pub struct ModelPublisher {
    tx: watch::Sender<Arc<Model>>,
    generation: u64,
}

pub fn channel(initial: Model) -> (ModelPublisher, ModelHandle) {
    let initial = Model { generation: 1, ..initial };
    let (tx, rx) = watch::channel(Arc::new(initial));
    (ModelPublisher { tx, generation: 1 }, ModelHandle { rx })
}

impl ModelPublisher {
    pub fn publish(&mut self, model: Model) {
        self.generation += 1;
        self.tx.send_replace(Arc::new(Model { generation: self.generation, ..model }));
    }
}

impl ModelHandle {
    /// The model in force now. Cheap: one reference-count increment.
    pub fn current(&self) -> Arc<Model> {
        self.rx.borrow().clone()
    }

    /// Waits until a new model is published; `false` when the publisher is gone.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::parse_file;

    fn model(yaml: &str) -> (Model, Vec<Diagnostic>) {
        let (resources, d) = parse_file(Path::new("t.yaml"), yaml);
        assert!(d.is_empty(), "{d:?}");
        compile(&resources)
    }

    fn ns(name: &str, label: Option<&str>) -> String {
        let labels = label.map_or(String::new(), |v| format!("\n  labels:\n    istio.io/dataplane-mode: {v}"));
        format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n---\n")
    }

    fn pod(name: &str, ns: &str, ip: &str, extra_labels: &str, host_network: bool) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{app: {name}{extra_labels}}}\nspec:\n  nodeName: n1\n  serviceAccountName: sa-{name}\n  hostNetwork: {host_network}\nstatus:\n  podIP: {ip}\n---\n"
        )
    }

    // CAP-1, CAP-3: who is captured.
    #[test]
    fn enrolment_follows_namespace_and_pod_labels() {
        let yaml = [
            ns("mesh", Some("ambient")),
            ns("plain", None),
            pod("a", "mesh", "10.1.0.10", "", false),
            pod("optout", "mesh", "10.1.0.11", ", istio.io/dataplane-mode: none", false),
            pod("hostnet", "mesh", "10.255.0.1", "", true),
            pod("b", "plain", "10.1.0.12", "", false),
            pod("optin", "plain", "10.1.0.13", ", istio.io/dataplane-mode: ambient", false),
        ]
        .concat();
        let (m, d) = model(&yaml);
        assert!(d.is_empty(), "{d:?}");
        let captured: Vec<&str> = m.workloads.iter().filter(|w| w.captured).map(|w| w.name.as_str()).collect();
        assert_eq!(captured, ["a", "optin"]);
        let a = m.workload_by_ip("10.1.0.10".parse().expect("ip")).expect("a");
        assert_eq!(a.service_account, "sa-a");
        assert!(m.workload_by_ip("10.255.0.1".parse().expect("ip")).is_none(), "hostNetwork not indexed");
    }

    // L4-1, CFG-2: a workload's protocol. Captured pods and waypoints are HBONE, the rest TCP.
    #[test]
    fn protocol_follows_capture_and_waypoints() {
        let waypoint = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: wp\n  namespace: mesh\n  labels: {gateway.networking.k8s.io/gateway-name: wp}\nstatus:\n  podIP: 10.1.0.20\n---\n";
        let yaml = [
            ns("mesh", Some("ambient")),
            ns("plain", None),
            pod("a", "mesh", "10.1.0.10", "", false),
            pod("hostnet", "mesh", "10.255.0.1", "", true),
            pod("b", "plain", "10.1.0.12", "", false),
            waypoint.to_owned(),
        ]
        .concat();
        let (m, d) = model(&yaml);
        assert!(d.is_empty(), "{d:?}");
        let protocol =
            |name: &str| m.workloads.iter().find(|w| w.name == name).map(|w| (w.protocol, w.reached_over_hbone()));
        assert_eq!(protocol("a"), Some((WorkloadProtocol::Hbone, true)));
        assert_eq!(protocol("wp"), Some((WorkloadProtocol::Hbone, false)), "a waypoint is reached as one");
        assert_eq!(protocol("hostnet"), Some((WorkloadProtocol::Tcp, false)));
        assert_eq!(protocol("b"), Some((WorkloadProtocol::Tcp, false)));
    }

    // L4-3: selector, targetPort by number and by name, round robin.
    #[test]
    fn services_select_pods_and_spread_round_robin() {
        let pod_with_port = |name: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: mesh\n  labels: {{app: web}}\nspec:\n  nodeName: n1\n  containers:\n  - name: c\n    ports:\n    - name: http\n      containerPort: 8080\nstatus:\n  podIP: {ip}\n---\n"
            )
        };
        let svc = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: mesh\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports:\n  - port: 80\n    targetPort: http\n  - port: 81\n    targetPort: 9000\n";
        let yaml = [
            ns("mesh", Some("ambient")),
            pod_with_port("w1", "10.1.0.10"),
            pod_with_port("w2", "10.2.0.10"),
            pod("other", "mesh", "10.1.0.11", "", false),
            svc.to_owned(),
        ]
        .concat();
        let (m, d) = model(&yaml);
        assert!(d.iter().all(|d| !d.is_error()), "{d:?}");
        let s = m.service_by_vip("10.96.0.10".parse().expect("ip")).expect("service");
        assert_eq!(s.hostname, "web.mesh.svc.cluster.local");
        let p80 = s.port(80).expect("port 80");
        let picks: Vec<String> = (0..4).map(|_| p80.pick().expect("endpoint").addr().to_string()).collect();
        assert_eq!(picks, ["10.1.0.10:8080", "10.2.0.10:8080", "10.1.0.10:8080", "10.2.0.10:8080"]);
        assert_eq!(s.port(81).expect("port 81").pick().expect("endpoint").port, 9000);
    }

    #[test]
    fn duplicate_pod_ip_is_an_error() {
        let yaml = [
            ns("mesh", Some("ambient")),
            pod("a", "mesh", "10.1.0.10", "", false),
            pod("b", "mesh", "10.1.0.10", "", false),
        ]
        .concat();
        let (_, d) = model(&yaml);
        assert!(d.iter().any(|d| d.is_error() && d.field.as_deref() == Some("status.podIP")), "{d:?}");
    }

    #[test]
    fn undeclared_namespace_warns_and_does_not_enrol() {
        let (m, d) = model(&pod("a", "ghost", "10.1.0.10", "", false));
        assert!(!m.workloads[0].captured);
        assert!(d.iter().all(|d| !d.is_error()) && !d.is_empty());
    }
}
