//! Services (L4-3): a virtual IP and ports in front of the pods its selector matches, or, for a
//! Service without a selector, of the endpoints its EndpointSlices list.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use serde::Serialize;

use super::{
    Workload, WorkloadProtocol,
    waypoints::{self, WaypointName},
};
use crate::config::{
    Diagnostic, EndpointSlice, Located, Origin, PortRef, Resource, SERVICE_NAME_LABEL, Service as ServiceResource,
};

/// The application protocol of a service port, as Istio selects it (L7-1): `appProtocol` first,
/// then the port name's prefix (`http`, `http-web`, `grpc`, `tcp-db`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum AppProtocol {
    /// HTTP/1.1 (HTTP/2 from clients is accepted and forwarded as HTTP/1.1).
    Http,
    /// HTTP/2 end to end (`http2`, `kubernetes.io/h2c`).
    Http2,
    /// gRPC: HTTP/2 end to end, with gRPC statuses in telemetry.
    Grpc,
    /// Opaque TCP (`tcp`, `tls`, `https`, `mongo`, `mysql`, `redis`, ...).
    Tcp,
    /// Not declared: detected from the first bytes the client sends.
    Unknown,
}

impl AppProtocol {
    /// Selects the protocol from a port's `appProtocol` and `name`.
    pub fn select(app_protocol: Option<&str>, name: Option<&str>) -> AppProtocol {
        if let Some(p) = app_protocol.and_then(Self::parse) {
            return p;
        }
        let prefix = name.map(|n| n.split('-').next().unwrap_or(n));
        prefix.and_then(Self::parse).unwrap_or(AppProtocol::Unknown)
    }

    fn parse(text: &str) -> Option<AppProtocol> {
        Some(match text.to_ascii_lowercase().as_str() {
            "http" => AppProtocol::Http,
            "http2" | "kubernetes.io/h2c" => AppProtocol::Http2,
            "grpc" | "grpc-web" => AppProtocol::Grpc,
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "kubernetes.io/ws" | "kubernetes.io/wss" => {
                AppProtocol::Tcp
            }
            _ => return None,
        })
    }
}

/// One ready backend of a service port: a pod and the port to reach it on.
#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    pub port: u16,
}

impl Endpoint {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.workload.ip, self.port)
    }
}

/// A service port and its endpoints, with the round-robin cursor that spreads connections.
#[derive(Debug, Serialize)]
pub struct ServicePort {
    pub port: u16,
    pub name: Option<String>,
    pub app_protocol: Option<String>,
    /// What the port carries, from `appProtocol` or the name.
    pub protocol: AppProtocol,
    pub endpoints: Vec<Endpoint>,
    #[serde(skip)]
    next: AtomicUsize,
}

impl ServicePort {
    pub fn new(port: u16, name: Option<String>, app_protocol: Option<String>, endpoints: Vec<Endpoint>) -> ServicePort {
        let protocol = AppProtocol::select(app_protocol.as_deref(), name.as_deref());
        ServicePort { port, name, app_protocol, protocol, endpoints, next: AtomicUsize::new(0) }
    }

    /// The next endpoint in round-robin order, if the port has any.
    pub fn pick(&self) -> Option<&Endpoint> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        self.endpoints.get(i)
    }
}

#[derive(Debug, Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `name.namespace.svc.cluster.local`.
    pub hostname: String,
    pub vip: Option<IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
    /// The waypoint traffic to the service's VIP goes through (`istio.io/use-waypoint` on the
    /// service, else on its namespace).
    pub waypoint: Option<WaypointName>,
    /// Where the Service was written, for diagnostics.
    #[serde(skip)]
    pub origin: Origin,
    /// Set for a service made from a ServiceEntry host (GW-3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<super::ServiceEntryInfo>,
}

impl Service {
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

/// Builds services and their endpoints from the resources and the compiled workloads. Returns
/// the services, and the workloads made for EndpointSlice addresses that are not pods (to add
/// to the model's workloads, so that they reach proxies as every endpoint does).
pub fn compile_services(
    resources: &[Located<Resource>],
    workloads: &[Arc<Workload>],
    pod_ports: &BTreeMap<(String, String), BTreeMap<String, u16>>,
    namespaces: &HashMap<&str, &BTreeMap<String, String>>,
    declared: &HashMap<waypoints::WaypointName, waypoints::WaypointFor>,
    diagnostics: &mut Vec<Diagnostic>,
) -> (Vec<Arc<Service>>, Vec<Arc<Workload>>) {
    let mut services = Vec::new();
    let by_namespace = by_namespace(workloads);
    let mut sliced = Sliced::new(resources, workloads, diagnostics);
    for located in resources {
        let Resource::Service(svc) = &located.resource else { continue };
        let in_namespace = by_namespace.get(svc.metadata.namespace_or_default()).map_or(&[][..], Vec::as_slice);
        let mut service = compile_one(located, svc, in_namespace, pod_ports, diagnostics);
        if svc.spec.selector.is_empty() {
            sliced.fill(&mut service, svc);
        }
        // The service in front of a waypoint's own pods never routes through a waypoint.
        let fronts_waypoint =
            service.ports.iter().flat_map(|p| &p.endpoints).any(|e| e.workload.waypoint_role.is_some());
        if !fronts_waypoint {
            let ns_labels = namespaces.get(service.namespace.as_str()).copied();
            service.waypoint = waypoints::waypoint_for(&service.namespace, &svc.metadata.labels, ns_labels)
                .filter(|w| declared.get(w).is_none_or(|takes| takes.services()));
        }
        services.push(Arc::new(service));
    }
    (services, sliced.made)
}

/// One ready endpoint of a slice: which Service port (by name) it serves, and where.
struct SliceBackend {
    port_name: String,
    port: u16,
    workload: Arc<Workload>,
}

/// The endpoints of EndpointSlices, by the Service they belong to (namespace and name), and the
/// workloads made for addresses that are not pods.
struct Sliced {
    by_service: HashMap<(String, String), Vec<SliceBackend>>,
    made: Vec<Arc<Workload>>,
}

impl Sliced {
    /// Reads every EndpointSlice. An endpoint whose `targetRef` is a Pod is that pod's workload
    /// (left out while strait does not know the pod, or it has no IP); an address that is a
    /// known pod's is that pod's workload; any other address becomes a workload of its own, one
    /// per namespace and address, reached over plain TCP (not captured, no identity: nothing
    /// strait knows runs a mesh proxy for it), as Istio makes workloads of such endpoints.
    /// `conditions.ready: false` leaves an endpoint out; unset means ready.
    fn new(resources: &[Located<Resource>], workloads: &[Arc<Workload>], diagnostics: &mut Vec<Diagnostic>) -> Self {
        let mut sliced = Sliced { by_service: HashMap::new(), made: Vec::new() };
        let slices: Vec<(&Origin, &EndpointSlice)> = resources
            .iter()
            .filter_map(|r| match &r.resource {
                Resource::EndpointSlice(slice) => Some((&r.origin, slice)),
                _ => None,
            })
            .collect();
        if slices.is_empty() {
            // Indexes built only when there are slices: a cluster serving only
            // discovery.k8s.io/v1beta1 (or a directory without slices) pays nothing.
            return sliced;
        }
        // Only the slices of Services without a selector are read: those of a Service with one
        // list its pods, and a slice of no Service (yet) serves nothing.
        let selectorless: BTreeSet<(&str, &str)> = resources
            .iter()
            .filter_map(|r| match &r.resource {
                Resource::Service(s) if s.spec.selector.is_empty() => {
                    Some((s.metadata.namespace_or_default(), s.metadata.name.as_str()))
                }
                _ => None,
            })
            .collect();
        let by_name: HashMap<(&str, &str), &Arc<Workload>> =
            workloads.iter().map(|w| ((w.namespace.as_str(), w.name.as_str()), w)).collect();
        let by_ip: HashMap<IpAddr, &Arc<Workload>> =
            workloads.iter().filter(|w| !w.host_network).map(|w| (w.ip, w)).collect();
        let mut made: HashMap<(String, IpAddr), Arc<Workload>> = HashMap::new();
        for (origin, slice) in slices {
            let namespace = slice.metadata.namespace_or_default();
            let Some(service) = slice.service_name() else {
                diagnostics.push(Diagnostic::warning(
                    origin.clone(),
                    Some("metadata.labels"),
                    format!("no `{SERVICE_NAME_LABEL}` label: the slice belongs to no Service; ignored"),
                ));
                continue;
            };
            if !selectorless.contains(&(namespace, service)) {
                continue;
            }
            if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
                diagnostics.push(Diagnostic::warning(
                    origin.clone(),
                    Some("addressType"),
                    format!("`{}` addresses are not supported (only IPv4 and IPv6); ignored", slice.address_type),
                ));
                continue;
            }
            let ports: Vec<(String, u16)> =
                slice.ports.iter().filter_map(|p| Some((p.name.clone().unwrap_or_default(), p.port?))).collect();
            let backends = sliced.by_service.entry((namespace.to_owned(), service.to_owned())).or_default();
            for (i, endpoint) in slice.endpoints.iter().enumerate() {
                if endpoint.conditions.ready == Some(false) {
                    continue;
                }
                let pod = endpoint.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod"));
                let workloads: Vec<Arc<Workload>> = match pod {
                    Some(target) => {
                        let pod_namespace = target.namespace.as_deref().unwrap_or(namespace);
                        let name = target.name.as_deref().unwrap_or_default();
                        by_name.get(&(pod_namespace, name)).map(|w| (*w).clone()).into_iter().collect()
                    }
                    None => endpoint
                        .addresses
                        .iter()
                        .enumerate()
                        .filter_map(|(j, text)| match text.parse::<IpAddr>() {
                            Ok(ip) => Some(match by_ip.get(&ip) {
                                Some(w) => (*w).clone(),
                                None => made
                                    .entry((namespace.to_owned(), ip))
                                    .or_insert_with(|| Arc::new(address_workload(namespace, ip)))
                                    .clone(),
                            }),
                            Err(_) => {
                                diagnostics.push(Diagnostic::warning(
                                    origin.clone(),
                                    Some(&format!("endpoints[{i}].addresses[{j}]")),
                                    format!("`{text}` is not an IP address; the endpoint is left out"),
                                ));
                                None
                            }
                        })
                        // A Kubernetes endpoint has one address in use (the API's rule).
                        .take(1)
                        .collect(),
                };
                for workload in workloads {
                    for (port_name, port) in &ports {
                        backends.push(SliceBackend {
                            port_name: port_name.clone(),
                            port: *port,
                            workload: workload.clone(),
                        });
                    }
                }
            }
        }
        let mut made: Vec<Arc<Workload>> = made.into_values().collect();
        // In a stable order: the model's workloads are listed and sent in it.
        made.sort_by(|a, b| (&a.namespace, a.ip).cmp(&(&b.namespace, b.ip)));
        sliced.made = made;
        sliced
    }

    /// Endpoints of a Service without a selector, from its slices: a slice port serves the
    /// Service port of the same name (both unnamed for a Service's only port).
    fn fill(&mut self, service: &mut Service, svc: &ServiceResource) {
        let Some(backends) = self.by_service.get(&(service.namespace.clone(), svc.metadata.name.clone())) else {
            return;
        };
        for port in &mut service.ports {
            let name = port.name.as_deref().unwrap_or_default();
            for backend in backends.iter().filter(|b| b.port_name == name) {
                let duplicate = port
                    .endpoints
                    .iter()
                    .any(|e| e.port == backend.port && Arc::ptr_eq(&e.workload, &backend.workload));
                if !duplicate {
                    port.endpoints.push(Endpoint { workload: backend.workload.clone(), port: backend.port });
                }
            }
        }
    }
}

/// The workload of an EndpointSlice address that is no pod strait knows. Its name cannot be a
/// pod's (a pod's name has no `/`), so it never collides with one.
fn address_workload(namespace: &str, ip: IpAddr) -> Workload {
    Workload {
        name: format!("endpointslice/{ip}"),
        namespace: namespace.to_owned(),
        service_account: "default".to_owned(),
        // Not on any node: no node proxy captures or serves it as a local pod.
        node: None,
        ip,
        labels: BTreeMap::new(),
        host_network: false,
        captured: false,
        waypoint: None,
        waypoint_role: None,
        protocol: WorkloadProtocol::Tcp,
    }
}

/// The workloads of each namespace, in their order. A selector only ever matches workloads of
/// its own namespace: looking through all of them for each Service or policy made compiling
/// 10,000 pods with 1,000 Services and 500 policies take 15 million comparisons, most of a
/// change's CPU on the control plane (`perf`, `cargo xtask bench control`).
pub fn by_namespace(workloads: &[Arc<Workload>]) -> HashMap<&str, Vec<&Arc<Workload>>> {
    let mut index: HashMap<&str, Vec<&Arc<Workload>>> = HashMap::new();
    for w in workloads {
        index.entry(w.namespace.as_str()).or_default().push(w);
    }
    index
}

fn compile_one(
    located: &Located<Resource>,
    svc: &ServiceResource,
    workloads: &[&Arc<Workload>],
    pod_ports: &BTreeMap<(String, String), BTreeMap<String, u16>>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Service {
    let namespace = svc.metadata.namespace_or_default().to_owned();
    let vip = match svc.spec.cluster_ip.as_deref() {
        None | Some("None") | Some("") => None,
        Some(text) => match text.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                diagnostics.push(Diagnostic::error(
                    located.origin.clone(),
                    Some("spec.clusterIP"),
                    format!("`{text}` is not an IP address (or `None` for a headless service)"),
                ));
                None
            }
        },
    };
    let selected: Vec<&Arc<Workload>> = if svc.spec.selector.is_empty() {
        Vec::new()
    } else {
        workloads
            .iter()
            .copied()
            .filter(|w| w.namespace == namespace && svc.spec.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            .collect()
    };
    let ports = svc
        .spec
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut missing = Vec::new();
            let endpoints: Vec<Endpoint> = selected
                .iter()
                .filter_map(|w| {
                    let port = match &p.target_port {
                        None => p.port,
                        Some(PortRef::Number(n)) => *n,
                        Some(PortRef::Name(name)) => {
                            let found =
                                pod_ports.get(&(w.namespace.clone(), w.name.clone())).and_then(|ports| ports.get(name));
                            match found {
                                Some(port) => *port,
                                None => {
                                    missing.push(w.display_name());
                                    return None;
                                }
                            }
                        }
                    };
                    Some(Endpoint { workload: (*w).clone(), port })
                })
                .collect();
            if let (Some(PortRef::Name(name)), false) = (&p.target_port, missing.is_empty()) {
                let field = format!("spec.ports[{i}].targetPort");
                let message = if endpoints.is_empty() {
                    format!(
                        "no pod selected by the service has a container port named `{name}`; the port has no endpoints"
                    )
                } else {
                    format!(
                        "pods {} have no container port named `{name}`; they are not endpoints of this port",
                        missing.join(", ")
                    )
                };
                diagnostics.push(Diagnostic::warning(located.origin.clone(), Some(&field), message));
            }
            ServicePort::new(p.port, p.name.clone(), p.app_protocol.clone(), endpoints)
        })
        .collect();
    Service {
        hostname: format!("{}.{namespace}.svc.cluster.local", svc.metadata.name),
        name: svc.metadata.name.clone(),
        namespace,
        vip,
        labels: svc.metadata.labels.clone(),
        ports,
        waypoint: None,
        origin: located.origin.clone(),
        entry: None,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::parse_file;
    use crate::model::{Model, compile};

    const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}}
spec: {nodeName: n1, serviceAccountName: db}
status: {podIP: 10.1.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop, labels: {app: db}}
spec: {nodeName: n2, serviceAccountName: db}
status: {podIP: 10.1.0.6}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}}
spec:
  nodeName: n1
  containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.1.0.7}
---
# No selector: endpoints from the slices below.
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: sql, port: 5432}, {name: admin, port: 9000}]
---
# A selector: its pods, whatever its slices say.
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.21
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-abcde, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: sql, port: 15432, protocol: TCP}, {name: admin, port: 19000}]
endpoints:
- addresses: [10.1.0.5]
  conditions: {ready: true}
  targetRef: {kind: Pod, namespace: shop, name: db-0}
- addresses: [10.1.0.6]
  conditions: {ready: false}
  targetRef: {kind: Pod, namespace: shop, name: db-1}
- addresses: [192.0.2.10]
- addresses: [192.0.2.11]
  conditions: {ready: false}
- addresses: [10.1.0.7]
---
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata: {name: db-fghij, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: sql, port: 15432}]
endpoints:
- addresses: [192.0.2.10]
- addresses: [192.0.2.12]
  conditions: {}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-xyz, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 80}]
endpoints:
- addresses: [192.0.2.99]
"#;

    fn compiled(yaml: &str) -> (Model, Vec<Diagnostic>) {
        let (resources, d) = parse_file(Path::new("mesh.yaml"), yaml);
        assert!(d.is_empty(), "{d:?}");
        compile(&resources)
    }

    fn endpoints(model: &Model, host: &str, port: u16) -> Vec<String> {
        let service = model.service_by_host(host).expect("service");
        let port = service.port(port).expect("port");
        port.endpoints.iter().map(|e| format!("{} {}", e.workload.display_name(), e.addr())).collect()
    }

    // L4-3: a Service without a selector takes its endpoints from its slices: a Pod targetRef
    // is that pod's workload, an address of a known pod is that pod, any other address a
    // workload of its own (one per address, however many slices list it); ready false is left
    // out, unset ready is in; each Service port takes the slice port of its name.
    #[test]
    fn a_service_without_a_selector_takes_its_slices() {
        let (model, d) = compiled(MESH);
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(
            endpoints(&model, "db.shop.svc.cluster.local", 5432),
            [
                "shop/db-0 10.1.0.5:15432",
                "shop/endpointslice/192.0.2.10 192.0.2.10:15432",
                "shop/web-0 10.1.0.7:15432",
                "shop/endpointslice/192.0.2.12 192.0.2.12:15432",
            ]
        );
        assert_eq!(
            endpoints(&model, "db.shop.svc.cluster.local", 9000),
            ["shop/db-0 10.1.0.5:19000", "shop/endpointslice/192.0.2.10 192.0.2.10:19000", "shop/web-0 10.1.0.7:19000"]
        );
        // Addresses that are no pod's are workloads: plain TCP, not captured, on no node,
        // indexed by address; pods keep theirs.
        let made: Vec<&Arc<Workload>> =
            model.workloads.iter().filter(|w| w.name.starts_with("endpointslice/")).collect();
        assert_eq!(made.len(), 2, "{made:?}");
        for w in made {
            assert!(!w.captured && w.node.is_none() && w.protocol == WorkloadProtocol::Tcp, "{w:?}");
            assert_eq!(model.workload_by_ip(w.ip).map(|x| x.name.as_str()), Some(w.name.as_str()));
        }
        assert_eq!(model.workload_by_ip("10.1.0.7".parse().expect("ip")).map(|w| w.name.as_str()), Some("web-0"));
        assert!(model.workloads.iter().all(|w| w.ip.to_string() != "192.0.2.11"), "not ready: no workload");
    }

    // A Service with a selector keeps its pods (the slice controller derives its slices from
    // the same pods): a stray slice address is no endpoint and no workload.
    #[test]
    fn a_service_with_a_selector_ignores_its_slices() {
        let (model, _) = compiled(MESH);
        assert_eq!(endpoints(&model, "web.shop.svc.cluster.local", 80), ["shop/web-0 10.1.0.7:8080"]);
        assert!(model.workload_by_ip("192.0.2.99".parse().expect("ip")).is_none());
    }

    // Slices strait cannot use are told, naming the field, and skipped; never an error.
    #[test]
    fn unusable_slices_warn_and_are_skipped() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec: {clusterIP: 10.96.0.30, ports: [{port: 443}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-1, namespace: shop, labels: {kubernetes.io/service-name: ext}}
addressType: IPv4
ports: [{port: 8443}]
endpoints:
- addresses: [not-an-ip]
- addresses: [192.0.2.40]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-2, namespace: shop, labels: {kubernetes.io/service-name: ext}}
addressType: FQDN
ports: [{port: 443}]
endpoints: [{addresses: [db.example.com]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: orphan, namespace: shop}
addressType: IPv4
endpoints: null
ports: null
"#;
        let (model, d) = compiled(yaml);
        assert!(d.iter().all(|d| !d.is_error()), "{d:?}");
        let fields: Vec<Option<&str>> = d.iter().map(|d| d.field.as_deref()).collect();
        assert_eq!(fields, [Some("endpoints[0].addresses[0]"), Some("addressType"), Some("metadata.labels")], "{d:?}");
        assert!(d[0].message.contains("not-an-ip") && d[0].origin.line > 1, "{d:?}");
        assert_eq!(
            endpoints(&model, "ext.shop.svc.cluster.local", 443),
            ["shop/endpointslice/192.0.2.40 192.0.2.40:8443"]
        );
    }
}
