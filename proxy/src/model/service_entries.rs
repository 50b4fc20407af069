//! ServiceEntries in the model (GW-3, L4-3, L4-5): one service per host, with the entry's ports,
//! its addresses as virtual IPs, and endpoints by resolution: STATIC endpoints become workloads
//! (the pod of that address when strait knows one, else a workload of the address, reached in
//! plain TCP), DNS endpoints are names the node proxy resolves (`ServiceEntryInfo::dns`), NONE
//! has none (the address the client dialled is the endpoint). VirtualServices and
//! DestinationRules name these hosts as they name Kubernetes services.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use serde::Serialize;

use super::{
    Endpoint, Service, ServicePort, Workload, WorkloadProtocol,
    waypoints::{self, WaypointFor, WaypointName},
};
use crate::config::{
    Cidr, Diagnostic, Located, Location, Origin, Resolution, Resource, ServiceEntry, ServiceEntryPort,
};

/// What a service has when it comes from a ServiceEntry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceEntryInfo {
    /// `namespace/name` of the entry, for messages.
    pub entry: String,
    pub location: Location,
    pub resolution: Resolution,
    /// Every address of `addresses` (single IPs are also indexed as VIPs).
    pub addresses: Vec<Cidr>,
    /// For resolution DNS: the names to resolve, each with the port its endpoints listen on
    /// per service port. Empty for other resolutions.
    pub dns: Vec<DnsEndpoint>,
}

impl ServiceEntryInfo {
    /// Whether connections go out in plaintext (or the application's own TLS), never HBONE.
    pub fn external(&self) -> bool {
        self.location == Location::MeshExternal
    }
}

/// A DNS name whose addresses are endpoints of the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsEndpoint {
    pub name: String,
    /// Service port → port the endpoint listens on.
    pub ports: BTreeMap<u16, u16>,
}

impl DnsEndpoint {
    /// The port to dial on this endpoint for `service_port`.
    pub fn target(&self, service_port: u16) -> u16 {
        self.ports.get(&service_port).copied().unwrap_or(service_port)
    }
}

/// Builds the services of every ServiceEntry, and the workloads made for their STATIC endpoint
/// addresses that are no known workload's. `known` holds the workloads compiled so far (pods,
/// EndpointSlice addresses); `taken_hosts` the hostnames of Kubernetes services.
pub fn compile_service_entries(
    resources: &[Located<Resource>],
    known: &[Arc<Workload>],
    taken_hosts: &HashMap<String, Origin>,
    namespaces: &HashMap<&str, &BTreeMap<String, String>>,
    declared: &HashMap<WaypointName, WaypointFor>,
    diagnostics: &mut Vec<Diagnostic>,
) -> (Vec<Arc<Service>>, Vec<Arc<Workload>>) {
    let by_ip: HashMap<IpAddr, &Arc<Workload>> = known.iter().filter(|w| !w.host_network).map(|w| (w.ip, w)).collect();
    let mut made: BTreeMap<(String, IpAddr), Arc<Workload>> = BTreeMap::new();
    let mut hosts: HashMap<String, Origin> = taken_hosts.clone();
    let mut services = Vec::new();
    for located in resources {
        let Resource::ServiceEntry(entry) = &located.resource else { continue };
        let namespace = entry.metadata.namespace_or_default();
        warn_unsupported(located, entry, diagnostics);
        let endpoints: Vec<Arc<Workload>> = match entry.spec.resolution {
            Resolution::Static => entry
                .spec
                .endpoints
                .iter()
                .filter_map(|e| e.address.parse::<IpAddr>().ok().map(|ip| (e, ip)))
                .map(|(e, ip)| match by_ip.get(&ip) {
                    Some(w) => (*w).clone(),
                    None => made
                        .entry((namespace.to_owned(), ip))
                        .or_insert_with(|| {
                            Arc::new(entry_workload(namespace, ip, e.labels.clone(), e.service_account.clone()))
                        })
                        .clone(),
                })
                .collect(),
            _ => Vec::new(),
        };
        let dns = match entry.spec.resolution {
            Resolution::Dns | Resolution::DnsRoundRobin => dns_endpoints(entry),
            _ => Vec::new(),
        };
        let vip = entry.spec.addresses.iter().find(|c| c.prefix() == max_prefix(c.addr())).map(Cidr::addr);
        let ns_labels = namespaces.get(namespace).copied();
        let waypoint = waypoints::waypoint_for(namespace, &entry.metadata.labels, ns_labels)
            .filter(|w| declared.get(w).is_none_or(|takes| takes.services()));
        for (h, host) in entry.spec.hosts.iter().enumerate() {
            let hostname = host.to_ascii_lowercase();
            if let Some(first) = hosts.get(&hostname) {
                diagnostics.push(Diagnostic::warning(
                    located.origin.clone(),
                    Some(&format!("spec.hosts[{h}]")),
                    format!(
                        "host `{hostname}` is already a service (defined at {first}); this entry does not change it"
                    ),
                ));
                continue;
            }
            hosts.insert(hostname.clone(), located.origin.clone());
            let ports = entry
                .spec
                .ports
                .iter()
                .map(|p| {
                    let endpoints =
                        endpoints.iter().map(|w| Endpoint { workload: w.clone(), port: static_target(entry, p, w.ip) });
                    ServicePort::new(p.number, Some(p.name.clone()), p.protocol.clone(), endpoints.collect())
                })
                .collect();
            let info = ServiceEntryInfo {
                entry: format!("{namespace}/{}", entry.metadata.name),
                location: entry.spec.location,
                resolution: entry.spec.resolution,
                addresses: entry.spec.addresses.clone(),
                dns: dns.clone(),
            };
            services.push(Arc::new(Service {
                name: entry.metadata.name.clone(),
                namespace: namespace.to_owned(),
                hostname,
                vip,
                labels: entry.metadata.labels.clone(),
                ports,
                waypoint: waypoint.clone(),
                origin: located.origin.clone(),
                entry: Some(info),
            }));
        }
    }
    (services, made.into_values().collect())
}

fn max_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// The port a STATIC endpoint listens on for a service port: the endpoint's own (by the port's
/// name), else the port's `targetPort`, else its number.
fn static_target(entry: &ServiceEntry, port: &ServiceEntryPort, ip: IpAddr) -> u16 {
    let own = entry.spec.endpoints.iter().find(|e| e.address.parse::<IpAddr>().ok() == Some(ip));
    own.and_then(|e| e.ports.get(&port.name).copied()).or(port.target_port).unwrap_or(port.number)
}

/// The names resolution DNS resolves: each endpoint's address, or, without endpoints, the hosts
/// themselves (Istio's rule). An endpoint written as an IP is a name that resolves to itself.
fn dns_endpoints(entry: &ServiceEntry) -> Vec<DnsEndpoint> {
    let ports_for = |own: Option<&BTreeMap<String, u16>>| -> BTreeMap<u16, u16> {
        entry
            .spec
            .ports
            .iter()
            .map(|p| {
                let target = own.and_then(|o| o.get(&p.name).copied()).or(p.target_port).unwrap_or(p.number);
                (p.number, target)
            })
            .collect()
    };
    if entry.spec.endpoints.is_empty() {
        return entry
            .spec
            .hosts
            .iter()
            .map(|h| DnsEndpoint { name: h.to_ascii_lowercase(), ports: ports_for(None) })
            .collect();
    }
    entry
        .spec
        .endpoints
        .iter()
        .map(|e| DnsEndpoint { name: e.address.to_ascii_lowercase(), ports: ports_for(Some(&e.ports)) })
        .collect()
}

/// The workload of a STATIC endpoint address that is no workload strait knows. Its name cannot
/// be a pod's (a pod's name has no `/`).
pub(crate) fn entry_workload(
    namespace: &str,
    ip: IpAddr,
    labels: BTreeMap<String, String>,
    service_account: Option<String>,
) -> Workload {
    Workload {
        name: format!("serviceentry/{ip}"),
        namespace: namespace.to_owned(),
        service_account: service_account.unwrap_or_else(|| "default".to_owned()),
        // On no node: no node proxy captures or serves it as a local pod.
        node: None,
        ip,
        labels,
        host_network: false,
        captured: false,
        waypoint: None,
        waypoint_role: None,
        // Nothing strait knows terminates HBONE for it: plaintext (or the app's own TLS).
        protocol: WorkloadProtocol::Tcp,
    }
}

/// What strait accepts and does not use, said once per entry, at the field.
fn warn_unsupported(located: &Located<Resource>, entry: &ServiceEntry, diagnostics: &mut Vec<Diagnostic>) {
    let warn = |field: &str, message: &str| Diagnostic::warning(located.origin.clone(), Some(field), message);
    if entry.spec.workload_selector.is_some() {
        diagnostics.push(warn(
            "spec.workloadSelector",
            "selecting pods or WorkloadEntries as endpoints is not supported by strait; the entry has no endpoints \
             (list them in `endpoints`)",
        ));
    }
    if entry.spec.ports.is_empty() {
        diagnostics.push(warn("spec.ports", "no ports: no connection is known as this service"));
    }
    if entry.spec.ports.iter().any(|p| p.protocol.as_deref() == Some("UDP")) {
        diagnostics.push(warn("spec.ports", "UDP ports are not proxied by strait (its capture is TCP only)"));
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::model::{Model, compile};

    fn compiled(yaml: &str) -> (Model, Vec<Diagnostic>) {
        let (resources, d) = crate::config::parse_file(std::path::Path::new("se.yaml"), yaml);
        assert!(d.is_empty(), "{d:?}");
        compile(&resources)
    }

    const ENTRIES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: vm-like, namespace: shop}
spec: {nodeName: n1}
status: {podIP: 10.1.0.9}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: static, namespace: shop}
spec:
  hosts: [db.example.com]
  addresses: [240.0.0.10]
  ports: [{number: 5432, name: tcp-sql, protocol: TCP, targetPort: 15432}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints:
  - address: 192.0.2.20
  - address: 192.0.2.21
    ports: {tcp-sql: 25432}
  - address: 10.1.0.9
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: dns, namespace: shop}
spec:
  hosts: [api.example.com, www.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 443, name: https, protocol: HTTPS, targetPort: 8443}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: wild, namespace: shop}
spec:
  hosts: ["*.example.org"]
  ports: [{number: 9000, name: tcp, protocol: TCP}]
  resolution: NONE
"#;

    // GW-3, L4-3: hosts become services with the entry's ports, VIPs and endpoints.
    #[test]
    fn entries_become_services() {
        let (model, d) = compiled(ENTRIES);
        assert!(d.is_empty(), "{d:?}");
        let db = model.service_by_vip("240.0.0.10".parse().expect("ip")).expect("by VIP");
        assert_eq!(db.hostname, "db.example.com");
        let picks: Vec<SocketAddr> = db.port(5432).expect("port").endpoints.iter().map(Endpoint::addr).collect();
        assert_eq!(
            picks,
            ["192.0.2.20:15432", "192.0.2.21:25432", "10.1.0.9:15432"].map(|a| a.parse::<SocketAddr>().expect("addr"))
        );
        let made = model.workload_by_ip("192.0.2.20".parse().expect("ip")).expect("made workload");
        assert_eq!(
            (made.name.as_str(), made.protocol, made.captured),
            ("serviceentry/192.0.2.20", WorkloadProtocol::Tcp, false)
        );
        assert_eq!(model.workload_by_ip("10.1.0.9".parse().expect("ip")).map(|w| w.name.as_str()), Some("vm-like"));
        assert_eq!(
            model.service_by_endpoint("192.0.2.21".parse().expect("ip")).map(|s| s.hostname.as_str()),
            Some("db.example.com")
        );

        for host in ["api.example.com", "www.example.com"] {
            let s = model.service_by_host(host).expect(host);
            let info = s.entry.as_ref().expect("entry");
            assert_eq!(info.resolution, Resolution::Dns);
            assert_eq!(
                info.dns.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
                ["api.example.com", "www.example.com"]
            );
            assert_eq!(info.dns[0].target(443), 8443);
            assert!(s.vip.is_none());
        }
        assert_eq!(
            model.dns_names(),
            ["api.example.com", "www.example.com"].map(str::to_owned).into_iter().collect::<Vec<_>>()
        );
        let wild = model.service_by_port(9000).expect("NONE without addresses: by port");
        assert_eq!(wild.hostname, "*.example.org");
        assert!(model.service_by_port(80).is_none(), "DNS entries are matched by address, not port");
    }

    // GW-3: a host already a Kubernetes service is not redefined; unsupported fields warn.
    #[test]
    fn conflicts_and_unsupported_fields_warn() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dup, namespace: shop}
spec:
  hosts: [web.shop.svc.cluster.local]
  ports: [{number: 80, name: http}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: sel, namespace: shop}
spec:
  hosts: [sel.example.com]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  workloadSelector: {labels: {app: vm}}
"#;
        let (model, d) = compiled(yaml);
        assert!(d.iter().all(|d| !d.is_error()), "{d:?}");
        let fields: Vec<&str> = d.iter().filter_map(|d| d.field.as_deref()).collect();
        assert_eq!(fields, ["spec.hosts[0]", "spec.workloadSelector"], "{d:?}");
        assert!(model.service_by_host("web.shop.svc.cluster.local").is_some_and(|s| s.entry.is_none()));
        assert!(model.service_by_host("sel.example.com").is_some());
    }
}
