//! Services (L4-3): a virtual IP and ports in front of the pods its selector matches.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use serde::Serialize;

use super::{
    Workload,
    waypoints::{self, WaypointName},
};
use crate::config::{Diagnostic, Located, Origin, PortRef, Resource, Service as ServiceResource};

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
}

impl Service {
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

/// Builds services and their endpoints from the resources and the compiled workloads.
pub fn compile_services(
    resources: &[Located<Resource>],
    workloads: &[Arc<Workload>],
    pod_ports: &BTreeMap<(String, String), BTreeMap<String, u16>>,
    namespaces: &HashMap<&str, &BTreeMap<String, String>>,
    declared: &HashMap<waypoints::WaypointName, waypoints::WaypointFor>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<Arc<Service>> {
    let mut services = Vec::new();
    let by_namespace = by_namespace(workloads);
    for located in resources {
        let Resource::Service(svc) = &located.resource else { continue };
        let in_namespace = by_namespace.get(svc.metadata.namespace_or_default()).map_or(&[][..], Vec::as_slice);
        let mut service = compile_one(located, svc, in_namespace, pod_ports, diagnostics);
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
    services
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
    }
}
