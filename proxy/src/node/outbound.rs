//! Outbound: a connection an enrolled pod opened, handed to the proxy by the capture program
//! with the pod's original destination as the socket's local address.
//!
//! The destination decides the journey: a service VIP is first resolved to one endpoint
//! (round robin, L4-3); a workload whose protocol is HBONE is reached over HBONE as the
//! source's identity (or, when this node captures it, through the inbound logic in-process with
//! the same checks); anything else is plain TCP passthrough (L4-5).

use std::{net::SocketAddr, sync::Arc, time::Instant};

use strait_ebpf_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use tokio::net::TcpStream;
use tracing::debug;

use super::{NodeContext, copy, inbound};
use crate::{
    hbone::{self, ConnectRequest},
    model::{Model, WaypointName, Workload},
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
    /// Nowhere: the reason is logged.
    Refuse(String),
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
    let source = model.workload_by_ip(peer.ip()).cloned();
    if let Some(source) = &source {
        record.source_workload = Some(source.clone());
        record.source_identity = Some(source.identity(&ctx.trust_domain).to_string());
    }
    let route = route(&model, destination, &ctx.trust_domain, &mut record);
    drop(model);
    ctx.telemetry.opened(&mut record);

    match (route, source) {
        (Route::Refuse(reason), _) => record.outcome = Outcome::Refused(reason),
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
fn route(model: &Model, destination: SocketAddr, trust_domain: &str, record: &mut ConnectionRecord) -> Route {
    if PROXY_PORTS.contains(&destination.port()) {
        return Route::Refuse(format!("port {} is reserved for the mesh proxy", destination.port()));
    }
    let (target, addr) = if let Some(service) = model.service_by_vip(destination.ip()) {
        record.destination_service = Some(service.clone());
        let Some(port) = service.port(destination.port()) else {
            return Route::Refuse(format!("service {} has no port {}", service.hostname, destination.port()));
        };
        if let Some(name) = &service.waypoint {
            return to_waypoint(model, name, destination, trust_domain, record);
        }
        let Some(endpoint) = port.pick() else {
            return Route::Refuse(format!("service {} has no ready endpoint for port {}", service.hostname, port.port));
        };
        (Some(endpoint.workload.clone()), endpoint.addr())
    } else {
        (model.workload_by_ip(destination.ip()).cloned(), destination)
    };
    let Some(target) = target else { return Route::Passthrough(addr) };
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
    match sys::connect_marked(addr).await {
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
    let request = ConnectRequest {
        source: source.identity(&ctx.trust_domain),
        destination: target.identity(&ctx.trust_domain),
        destination_node: target.node.clone().unwrap_or_default(),
        connect_addr: SocketAddr::new(target.ip, HBONE_PORT),
        authority: addr,
        client_addr: peer,
        baggage: baggage(source),
    };
    match ctx.pool.connect(&request).await {
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
            let route = route(&model, destination, "cluster.local", &mut record);
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
}
