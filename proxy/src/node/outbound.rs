//! Outbound: a connection an enrolled pod opened, handed to the proxy by the capture program
//! with the pod's original destination as the socket's local address.
//!
//! The destination decides the journey: a service VIP is first resolved to one endpoint
//! (round robin, L4-3); a workload whose protocol is HBONE is reached over HBONE as the
//! source's identity (or, when this node captures it, through the inbound logic in-process with
//! the same checks); anything else is plain TCP passthrough (L4-5). A ServiceEntry host's
//! `mesh` routes may send the connection elsewhere first (GW-3: to an egress gateway over HBONE,
//! or nowhere when they name a loopback endpoint), by SNI for `tls[]` routes.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use strait_ebpf_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use tokio::net::TcpStream;
use tracing::debug;

use super::{HboneSource, NodeContext, copy, dns::DnsCache, inbound, peek};
use crate::{
    config::{OutboundMode, Resolution},
    hbone::{self, ConnectRequest},
    model::{
        Model, Service, WaypointName, Workload,
        egress_routes::{self, Connection, Landing, MeshL4},
    },
    sys,
    telemetry::{ConnectionRecord, DEFAULT_CLUSTER, Outcome, canonical_revision, canonical_service},
};

/// Ports of the proxy's own listeners; a connection to them would loop through the proxy.
pub const PROXY_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT];

/// Where the outbound connection goes, decided from the model.
enum Route {
    /// Over HBONE to a workload whose protocol is HBONE (in-process when this node captures
    /// it).
    Mesh { target: Arc<Workload>, addr: SocketAddr },
    /// Over HBONE to a waypoint pod, with the address the client dialled as the CONNECT
    /// target (L4-3): the waypoint applies L7 policy and picks the endpoint.
    Waypoint { waypoint: Arc<Workload>, authority: SocketAddr },
    /// Plain TCP to an address outside the mesh.
    Passthrough(SocketAddr),
    /// Plain TCP to an address of a ServiceEntry's DNS endpoint, resolved when the connection
    /// comes (GW-3): the name and the port to dial on it.
    Resolve { name: String, port: u16 },
    /// Nowhere: the reason is logged.
    Refuse(String),
    /// Nowhere, because REGISTRY_ONLY admits only what the registry knows (L4-5).
    Blocked(String),
    /// A `tls[]` route of the destination's host may apply: the ClientHello's SNI decides
    /// (GW-3, L7-8); routed again once it is read.
    ReadSni,
}

/// How long a client that a `tls[]` route may apply to has to send its ClientHello: clients
/// of TLS speak first, at once.
const CLIENT_HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Outbound connections refused by REGISTRY_ONLY, for `strait_outbound_refused_total`.
static REGISTRY_ONLY_REFUSED: AtomicU64 = AtomicU64::new(0);

/// `strait_outbound_refused_total{reason="registry_only"}`, read at every scrape.
pub fn refusal_counters() -> crate::telemetry::ScrapedCounters {
    crate::telemetry::ScrapedCounters::by_label(
        "strait_outbound_refused",
        "Outbound connections of enrolled pods refused by the mesh's outbound traffic policy (L4-5)",
        "reason",
        || [("registry_only", REGISTRY_ONLY_REFUSED.load(Ordering::Relaxed))],
    )
}

pub async fn handle(ctx: Arc<NodeContext>, downstream: TcpStream, peer: SocketAddr) {
    let clock = Instant::now();
    let Ok(destination) = downstream.local_addr() else {
        debug!("outbound connection from {peer} closed before it could be read");
        return;
    };
    let _ = downstream.set_nodelay(true);
    let model = ctx.model.current();
    let mut record = ConnectionRecord::start("outbound", peer, destination);
    // A node proxy sees no request, so its span starts a trace (OBS-7); the tunnel names it.
    record.trace = ctx.telemetry.trace(|| None);
    let source = model.workload_by_ip(peer.ip()).cloned();
    if let Some(source) = &source {
        record.source_workload = Some(source.clone());
        record.source_identity = Some(source.identity(&ctx.trust_domain).to_string());
    }
    let mut route = route(&model, &ctx.dns, destination, &ctx.trust_domain, &mut record, None);
    drop(model);
    if matches!(route, Route::ReadSni) {
        route = match Box::pin(peek::client_hello_sni(&downstream, CLIENT_HELLO_TIMEOUT)).await {
            Ok(sni) => {
                let model = ctx.model.current();
                let again = Some(sni.as_deref());
                self::route(&model, &ctx.dns, destination, &ctx.trust_domain, &mut record, again)
            }
            Err(e) => Route::Refuse(format!("a tls route of the destination needs its SNI: {e}")),
        };
    }
    ctx.telemetry.opened(&mut record);

    match (route, source) {
        (Route::Refuse(reason), _) => record.outcome = Outcome::Refused(reason),
        // Routed again after the SNI was read: never here.
        (Route::ReadSni, _) => record.outcome = Outcome::Refused("routing needs the SNI".into()),
        (Route::Blocked(reason), _) => {
            REGISTRY_ONLY_REFUSED.fetch_add(1, Ordering::Relaxed);
            record.outcome = Outcome::Refused(reason);
        }
        (Route::Resolve { name, port }, _) => match Box::pin(ctx.dns.pick(&name)).await {
            Ok(ip) => passthrough(&downstream, SocketAddr::new(ip, port), &mut record).await,
            Err(e) => record.outcome = Outcome::UpstreamConnectFailed(format!("cannot resolve {name}: {e}")),
        },
        (Route::Mesh { .. }, None) => {
            // Without a known source there is no identity to speak for: fail closed.
            record.outcome = Outcome::Refused("the source is not a known workload of this node".into());
        }
        (Route::Passthrough(addr), _) => passthrough(&downstream, addr, &mut record).await,
        (Route::Waypoint { .. }, None) => {
            record.outcome = Outcome::Refused("the source is not a known workload of this node".into());
        }
        (Route::Waypoint { waypoint, authority }, Some(source)) => {
            // Always over HBONE, even to a waypoint on this node: it is a peer like any other.
            over_hbone(&ctx, &downstream, peer, &source, &waypoint, authority, &mut record).await;
        }
        (Route::Mesh { target, addr }, Some(source)) => {
            if target.captured && target.node.as_deref() == Some(ctx.node_name.as_str()) {
                inbound::deliver_local(&ctx, &downstream, peer, &source, &target, addr, &mut record).await;
            } else {
                over_hbone(&ctx, &downstream, peer, &source, &target, addr, &mut record).await;
            }
        }
    }
    if matches!(record.outcome, Outcome::Refused(_) | Outcome::UpstreamConnectFailed(_)) {
        // Reset rather than close: the client must see a failed connection, not an empty reply.
        let _ = socket2::SockRef::from(&downstream).set_linger(Some(std::time::Duration::ZERO));
    }
    record.duration = clock.elapsed();
    ctx.telemetry.closed(&record);
}

/// Decides where the connection goes, noting in `record` the service and workload it reaches.
fn route(
    model: &Model,
    dns: &DnsCache,
    destination: SocketAddr,
    trust_domain: &str,
    record: &mut ConnectionRecord,
    sni: Option<Option<&str>>,
) -> Route {
    if PROXY_PORTS.contains(&destination.port()) {
        return Route::Refuse(format!("port {} is reserved for the mesh proxy", destination.port()));
    }
    let (target, addr) = if let Some(service) = model.service_by_address(destination.ip()) {
        record.destination_service = Some(service.clone());
        let Some(port) = service.port(destination.port()) else {
            return Route::Refuse(format!("service {} has no port {}", service.hostname, destination.port()));
        };
        if let Some(name) = &service.waypoint {
            return to_waypoint(model, name, destination, trust_domain, record);
        }
        if let Some(entry) = &service.entry {
            if let Some(route) = mesh_route(model, service, destination, trust_domain, record, sni) {
                return route;
            }
            match entry.resolution {
                // The address the client dialled is the endpoint.
                Resolution::None => return Route::Passthrough(destination),
                Resolution::Dns | Resolution::DnsRoundRobin => {
                    // One of the entry's names, in turn; each name spreads over its addresses.
                    let Some(endpoint) = pick_dns(service) else {
                        return Route::Refuse(format!("service {} has no endpoint to resolve", service.hostname));
                    };
                    return Route::Resolve { name: endpoint.name.clone(), port: endpoint.target(port.port) };
                }
                // Outside the mesh: plain TCP to the endpoint, whatever it is (GW-3).
                Resolution::Static if entry.external() => {
                    let Some(endpoint) = port.pick() else {
                        return Route::Refuse(format!(
                            "service {} has no endpoint for port {}",
                            service.hostname, port.port
                        ));
                    };
                    record.destination_workload = Some(endpoint.workload.clone());
                    return passthrough_to(endpoint.addr(), &service.hostname);
                }
                Resolution::Static => {}
            }
        }
        let Some(endpoint) = port.pick() else {
            return Route::Refuse(format!("service {} has no ready endpoint for port {}", service.hostname, port.port));
        };
        (Some(endpoint.workload.clone()), endpoint.addr())
    } else {
        (model.workload_by_ip(destination.ip()).cloned(), destination)
    };
    if let Some(service) = model.service_by_endpoint(addr.ip()).filter(|_| record.destination_service.is_none()) {
        record.destination_service = Some(service.clone());
    }
    let Some(target) = target else {
        return outside_the_registry(model, dns, destination, trust_domain, record, sni);
    };
    // The destination's protocol decides, not whether this proxy captures it: a pod served by
    // another HBONE proxy (Istio's ztunnel on its node) is in the mesh too.
    if let (true, Some(name)) = (target.reached_over_hbone() && addr == destination, &target.waypoint) {
        return to_waypoint(model, name, destination, trust_domain, record);
    }
    record.destination_workload = Some(target.clone());
    if target.reached_over_hbone() {
        record.destination_identity = Some(target.identity(trust_domain).to_string());
        record.security = "mutual_tls";
        Route::Mesh { target, addr }
    } else {
        Route::Passthrough(addr)
    }
}

/// A destination that is no service VIP and no workload: a ServiceEntry's when one of its DNS
/// names resolved to it, or when an entry of resolution NONE without addresses declares its port
/// (as Istio's sidecars match such entries); plain TCP in any case, unless the mesh is
/// REGISTRY_ONLY and no entry claims it (L4-5).
fn outside_the_registry(
    model: &Model,
    dns: &DnsCache,
    destination: SocketAddr,
    trust_domain: &str,
    record: &mut ConnectionRecord,
    sni: Option<Option<&str>>,
) -> Route {
    let by_name = dns.name_of(destination.ip()).and_then(|name| {
        model
            .services
            .iter()
            .filter(|s| s.port(destination.port()).is_some())
            .find(|s| s.entry.as_ref().is_some_and(|e| e.dns.iter().any(|d| d.name == name)))
    });
    if let Some(service) = by_name.or_else(|| model.service_by_port(destination.port())) {
        record.destination_service = Some(service.clone());
        // An egress waypoint (`istio.io/use-waypoint` on the entry or its namespace) applies
        // its routes, TLS origination and policy (SPEC GW-3).
        if let Some(name) = &service.waypoint {
            return to_waypoint(model, name, destination, trust_domain, record);
        }
        if let Some(route) = mesh_route(model, service, destination, trust_domain, record, sni) {
            return route;
        }
        return Route::Passthrough(destination);
    }
    if model.outbound_mode == OutboundMode::RegistryOnly {
        return Route::Blocked(format!(
            "outboundTrafficPolicy is REGISTRY_ONLY and {destination} is no service, workload or ServiceEntry of the \
             mesh"
        ));
    }
    Route::Passthrough(destination)
}

/// The `mesh` routes of a ServiceEntry host's VirtualService, where a connection can be decided
/// by them (GW-3, L7-8): to the endpoint they choose, in the mesh over HBONE (the egress
/// gateway's pod of the two-hop pattern) or in plain TCP, or to a DNS entry's name. `None`: no
/// such route, or one that needs HTTP (a waypoint's; `compile` warned), and the connection goes
/// where it was addressed.
fn mesh_route(
    model: &Model,
    service: &Service,
    destination: SocketAddr,
    trust_domain: &str,
    record: &mut ConnectionRecord,
    sni: Option<Option<&str>>,
) -> Option<Route> {
    let source = record.source_workload.clone();
    let conn = Connection { port: destination.port(), destination: destination.ip(), source: source.as_deref(), sni };
    match egress_routes::route_at_l4(model, &service.hostname, &conn) {
        MeshL4::Unrouted | MeshL4::NeedsL7 => None,
        MeshL4::NeedsSni => Some(Route::ReadSni),
        MeshL4::NoEndpoint(reason) => Some(Route::Refuse(format!("route of {}: {reason}", service.hostname))),
        MeshL4::Redirect { service: to_service, to } => {
            let sni = sni.flatten().map_or(String::new(), |s| format!(" (SNI {s})"));
            let why = format!("the mesh route of {}{sni} to {}", service.hostname, to_service.hostname);
            record.destination_service = Some(to_service);
            Some(match to {
                Landing::Resolve { name, port } => Route::Resolve { name, port },
                Landing::Endpoint(endpoint) => {
                    let target = endpoint.workload.clone();
                    record.destination_workload = Some(target.clone());
                    if target.reached_over_hbone() {
                        record.destination_identity = Some(target.identity(trust_domain).to_string());
                        record.security = "mutual_tls";
                        Route::Mesh { target, addr: endpoint.addr() }
                    } else {
                        passthrough_to(endpoint.addr(), &why)
                    }
                }
            })
        }
    }
}

/// Plain TCP to `addr` on a pod's behalf, unless it is the node's own: loopback and unspecified
/// addresses (a ServiceEntry endpoint `127.0.0.1`, as seed 000 writes to blackhole a host)
/// would reach the node proxy's host, its admin port and whatever listens there, not anything
/// of the pod's. Istio's sidecar dials the pod's own loopback; the node proxy refuses.
fn passthrough_to(addr: SocketAddr, what: &str) -> Route {
    if node_local(addr.ip()) {
        Route::Refuse(format!("{what}: {addr} is a loopback address; a node proxy never dials its own"))
    } else {
        Route::Passthrough(addr)
    }
}

/// Addresses that mean "this host" wherever they are dialled from.
fn node_local(ip: std::net::IpAddr) -> bool {
    ip.to_canonical().is_loopback() || ip.is_unspecified()
}

/// The DNS endpoint of a ServiceEntry service a new connection goes to, taking them in turn.
fn pick_dns(service: &Service) -> Option<&crate::model::DnsEndpoint> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let endpoints = &service.entry.as_ref()?.dns;
    let n = u64::try_from(endpoints.len()).ok().filter(|n| *n > 0)?;
    let i = usize::try_from(NEXT.fetch_add(1, Ordering::Relaxed) % n).ok()?;
    endpoints.get(i)
}

/// Traffic for a destination behind a waypoint: to one of the waypoint's pods. Without a
/// running waypoint the connection fails, as in Istio: the waypoint's policy is never skipped.
fn to_waypoint(
    model: &Model,
    name: &WaypointName,
    destination: SocketAddr,
    trust_domain: &str,
    record: &mut ConnectionRecord,
) -> Route {
    let Some(waypoint) = model.waypoint(name).and_then(|w| w.pick()).cloned() else {
        return Route::Refuse(format!("waypoint {name} has no running pod"));
    };
    record.destination_workload = Some(waypoint.clone());
    record.destination_identity = Some(waypoint.identity(trust_domain).to_string());
    record.security = "mutual_tls";
    Route::Waypoint { waypoint, authority: destination }
}

async fn passthrough(downstream: &TcpStream, addr: SocketAddr, record: &mut ConnectionRecord) {
    record.destination_addr = addr;
    // Whatever decided the address (a DNS answer, the address the pod dialled): never the node's.
    if node_local(addr.ip()) {
        record.outcome = Outcome::Refused(format!("{addr} is a loopback address; a node proxy never dials its own"));
        return;
    }
    match Box::pin(sys::connect_marked(addr)).await {
        Ok(upstream) => {
            let (copied, error) = copy::bidirectional(downstream, &upstream).await;
            record.bytes_sent = copied.a_to_b;
            record.bytes_received = copied.b_to_a;
            if let Some(e) = error {
                record.outcome = Outcome::Broken(e.to_string());
            }
        }
        Err(e) => record.outcome = Outcome::UpstreamConnectFailed(e.to_string()),
    }
}

async fn over_hbone(
    ctx: &NodeContext,
    downstream: &TcpStream,
    peer: SocketAddr,
    source: &Workload,
    target: &Workload,
    addr: SocketAddr,
    record: &mut ConnectionRecord,
) {
    record.destination_addr = addr;
    // The request lives only while the stream is opened: its strings (identities, baggage) are
    // not held by the connection's task while it copies (OPS-1, memory per connection).
    let tunnel = {
        let request = ConnectRequest {
            source: source.identity(&ctx.trust_domain),
            destination: target.identity(&ctx.trust_domain),
            destination_node: target.node.clone().unwrap_or_default(),
            connect_addr: SocketAddr::new(target.ip, HBONE_PORT),
            authority: addr,
            client_addr: peer,
            baggage: baggage(source),
            bind: hbone_bind(ctx.hbone_source, peer),
            traceparent: record.trace.as_ref().map(|t| t.context.header()),
        };
        // Boxed, like every step that runs once per connection before its bytes flow: a task's
        // future is allocated at its largest for the connection's whole life, and opening a
        // pooled HBONE connection (TLS and HTTP/2 handshakes) is by far the largest step;
        // measured with the task's `size_of_val`, 5,928 bytes per outbound connection before.
        Box::pin(ctx.pool.connect(&request)).await
    };
    match tunnel {
        Ok(tunnel) => {
            let (copied, error) = hbone::stream::copy(downstream, tunnel.send, tunnel.recv).await;
            record.bytes_sent = copied.a_to_b;
            record.bytes_received = copied.b_to_a;
            if let Some(e) = error {
                record.outcome = Outcome::Broken(e.to_string());
            }
        }
        Err(e) => record.outcome = Outcome::UpstreamConnectFailed(e.to_string()),
    }
}

/// The address a tunnel for a connection from `peer` leaves from: the client pod's own (L4-6:
/// peers and firewalls between nodes see the pod, as with Istio ambient) unless the node's was
/// asked for. Only IPv4: capture and the steering of replies are IPv4.
fn hbone_bind(source: HboneSource, peer: SocketAddr) -> Option<IpAddr> {
    match (source, peer.ip()) {
        (HboneSource::Pod, ip @ IpAddr::V4(_)) => Some(ip),
        _ => None,
    }
}

/// W3C baggage describing the source, as Istio's ztunnel sends it (a ztunnel at the
/// destination labels its metrics with the source's canonical service and revision from it).
fn baggage(source: &Workload) -> String {
    format!(
        "k8s.cluster.name={DEFAULT_CLUSTER},k8s.namespace.name={},k8s.pod.name={},service.name={},service.version={}",
        source.namespace,
        source.name,
        canonical_service(source),
        canonical_revision(source),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{Routing, Security, WorkloadProtocol};

    fn pod(name: &str, ip: &str, node: &str, protocol: WorkloadProtocol, captured: bool) -> Arc<Workload> {
        Arc::new(Workload {
            name: name.into(),
            namespace: "shop".into(),
            service_account: name.into(),
            node: Some(node.into()),
            ip: ip.parse().expect("ip"),
            labels: BTreeMap::new(),
            host_network: false,
            captured,
            waypoint: None,
            waypoint_role: None,
            protocol,
        })
    }

    // L4-6: tunnels leave from the client pod's IPv4 address unless the node's is asked for;
    // IPv6 clients' always leave from the node (capture and reply steering are IPv4).
    #[test]
    fn tunnels_are_bound_to_the_client_pods_ipv4_address() {
        let v4: SocketAddr = "10.1.0.10:41000".parse().expect("addr");
        let v6: SocketAddr = "[fd00::10]:41000".parse().expect("addr");
        assert_eq!(hbone_bind(HboneSource::Pod, v4), Some(v4.ip()));
        assert_eq!(hbone_bind(HboneSource::Node, v4), None);
        assert_eq!(hbone_bind(HboneSource::Pod, v6), None);
        assert_eq!(HboneSource::default(), HboneSource::Pod);
    }

    // L4-1, CFG-2: a destination whose protocol is HBONE is reached over HBONE whoever serves it (a
    // pod on a node run by Istio's ztunnel, a pod terminating HBONE itself); TCP is passthrough.
    #[test]
    fn the_destination_protocol_decides() {
        let model = Model::from_parts(
            vec![
                pod("behind-ztunnel", "10.3.0.5", "ztunnel-node", WorkloadProtocol::Hbone, true),
                pod("native", "10.3.0.6", "ztunnel-node", WorkloadProtocol::Hbone, false),
                pod("plain", "10.3.0.7", "n1", WorkloadProtocol::Tcp, false),
            ],
            Vec::new(),
            Security::default(),
            Routing::default(),
        );
        let decide = |to: &str| {
            let destination: SocketAddr = to.parse().expect("addr");
            let mut record = ConnectionRecord::start("outbound", "10.1.0.10:40000".parse().expect("addr"), destination);
            let route = route(&model, &DnsCache::default(), destination, "cluster.local", &mut record, None);
            (route, record.security)
        };
        for to in ["10.3.0.5:80", "10.3.0.6:80"] {
            let (route, security) = decide(to);
            assert!(matches!(route, Route::Mesh { .. }), "{to}");
            assert_eq!(security, "mutual_tls", "{to}");
        }
        assert!(matches!(decide("10.3.0.7:80").0, Route::Passthrough(_)));
        assert!(matches!(decide("10.9.9.9:80").0, Route::Passthrough(_)));
    }

    const EGRESS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: n1}
status: {podIP: 10.1.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: outside, namespace: plain}
spec: {nodeName: n1}
status: {podIP: 10.1.0.20}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: static, namespace: shop}
spec:
  hosts: [db.example.com]
  addresses: [240.0.0.10]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.20, ports: {tcp: 15432}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: none, namespace: shop}
spec:
  hosts: [legacy.example.com]
  addresses: [192.0.2.64/26]
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dns, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [240.0.0.11]
  ports: [{number: 443, name: tls, protocol: TLS, targetPort: 8443}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: shop}
spec:
  hosts: ["*.example.org"]
  ports: [{number: 9000, name: tcp, protocol: TCP}]
"#;

    const REGISTRY_ONLY: &str = "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |\n    outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n";

    fn decide(model: &Model, dns: &DnsCache, to: &str) -> (Route, Option<String>) {
        let destination: SocketAddr = to.parse().expect("addr");
        let mut record = ConnectionRecord::start("outbound", "10.1.0.10:40000".parse().expect("addr"), destination);
        let route = route(model, dns, destination, "cluster.local", &mut record, None);
        (route, record.destination_service.map(|s| s.hostname.clone()))
    }

    // GW-3, L4-3, L4-5: ServiceEntry destinations by VIP, CIDR, STATIC endpoint, resolved name
    // and port are known as their service and leave in plain TCP; REGISTRY_ONLY refuses the rest
    // and ALLOW_ANY passes it through.
    #[tokio::test]
    async fn service_entries_and_registry_only() {
        let dns = DnsCache::default();
        for (yaml, registry_only) in [(EGRESS.to_owned(), false), (format!("{EGRESS}{REGISTRY_ONLY}"), true)] {
            let model = crate::model::compile_clean(&yaml);
            let passthrough = |to: &str, addr: &str, host: Option<&str>| {
                let (route, service) = decide(&model, &dns, to);
                assert!(matches!(route, Route::Passthrough(a) if a.to_string() == addr), "{to}: {}", kind(&route));
                assert_eq!(service.as_deref(), host, "{to}");
            };
            passthrough("240.0.0.10:5432", "192.0.2.20:15432", Some("db.example.com"));
            passthrough("192.0.2.20:15432", "192.0.2.20:15432", Some("db.example.com"));
            passthrough("192.0.2.70:80", "192.0.2.70:80", Some("legacy.example.com"));
            passthrough("203.0.113.9:9000", "203.0.113.9:9000", Some("*.example.org"));
            passthrough("10.1.0.20:8080", "10.1.0.20:8080", None);
            let (route, service) = decide(&model, &dns, "240.0.0.11:443");
            assert!(
                matches!(&route, Route::Resolve { name, port: 8443 } if name == "api.example.com"),
                "{}",
                kind(&route)
            );
            assert_eq!(service.as_deref(), Some("api.example.com"));
            let (route, service) = decide(&model, &dns, "203.0.113.9:80");
            assert_eq!(service, None);
            if registry_only {
                assert!(matches!(&route, Route::Blocked(r) if r.contains("REGISTRY_ONLY")), "{}", kind(&route));
            } else {
                assert!(matches!(route, Route::Passthrough(_)), "{}", kind(&route));
            }
        }
        // An address a DNS entry's host resolved to is that entry's.
        let model = crate::model::compile_clean(&format!("{EGRESS}{REGISTRY_ONLY}"));
        let answers = super::super::dns::tests_support::answers(&[("api.example.com", "198.51.100.7")]);
        let (route, service) = decide(&model, &answers, "198.51.100.7:443");
        assert!(matches!(route, Route::Passthrough(_)), "{}", kind(&route));
        assert_eq!(service.as_deref(), Some("api.example.com"));
        assert!(matches!(decide(&model, &answers, "198.51.100.7:80").0, Route::Blocked(_)), "port not declared");
    }

    // GW-3: a node proxy never dials its own host on a pod's behalf, however the address is
    // written; other addresses pass.
    #[test]
    fn loopback_endpoints_are_refused() {
        for ip in ["127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1", "0.0.0.0", "::"] {
            let addr = SocketAddr::new(ip.parse().expect("ip"), 80);
            assert!(matches!(passthrough_to(addr, "route"), Route::Refuse(r) if r.contains("loopback")), "{ip}");
        }
        for ip in ["10.1.0.7", "::ffff:10.1.0.7", "2001:db8::1"] {
            let addr = SocketAddr::new(ip.parse().expect("ip"), 80);
            assert!(matches!(passthrough_to(addr, "route"), Route::Passthrough(a) if a == addr), "{ip}");
        }
    }

    fn kind(route: &Route) -> String {
        match route {
            Route::Mesh { addr, .. } => format!("mesh {addr}"),
            Route::Waypoint { authority, .. } => format!("waypoint {authority}"),
            Route::Passthrough(a) => format!("passthrough {a}"),
            Route::Resolve { name, port } => format!("resolve {name}:{port}"),
            Route::Refuse(r) => format!("refuse {r}"),
            Route::Blocked(r) => format!("blocked {r}"),
            Route::ReadSni => "read sni".into(),
        }
    }
}
