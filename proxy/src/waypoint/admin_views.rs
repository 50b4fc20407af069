//! `/clusters` at a waypoint (OBS-3, CFG-4): every destination of the services behind it, with
//! each endpoint's health and outlier-detection state, as `istioctl proxy-config clusters` and
//! `endpoints` show Envoy's.
//!
//! The L7 engine builds destinations when a request first needs one; the view builds those the
//! configuration declares too (each service port, each DestinationRule subset, each route's
//! destinations), the way Envoy lists every cluster it was sent, so a fresh waypoint shows its
//! whole table. Building one opens no connection.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    l7::{
        L7Context,
        upstream::{Cluster, ClusterKey},
    },
    model::{
        Model,
        routes::{HashKey, LoadBalancer},
    },
};

#[derive(Serialize)]
struct ClusterView {
    /// Envoy's name: `outbound|<port>|<subset>|<host>`.
    name: String,
    host: String,
    port: u16,
    subset: Option<String>,
    /// The namespace of the service behind it, when it is a service.
    namespace: Option<String>,
    protocol: String,
    /// `namespace/name` of the DestinationRule whose policy applies.
    destination_rule: Option<String>,
    load_balancer: String,
    /// Whether the policy has `outlierDetection`.
    outlier_detection: bool,
    connections: u32,
    pending: u32,
    active_requests: u32,
    endpoints: Vec<EndpointView>,
    /// Why a destination the configuration names cannot be used (no such service, port or
    /// subset): requests routed to it get 503 `NC`.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct EndpointView {
    address: SocketAddr,
    workload: String,
    /// `HEALTHY`, or `EJECTED` while outlier detection keeps it out.
    health: &'static str,
    active_requests: u32,
    idle_connections: usize,
    outlier: OutlierView,
}

#[derive(Serialize)]
struct OutlierView {
    /// How much longer the endpoint stays ejected.
    ejected_for_ms: Option<u64>,
    /// Ejections that still lengthen the next one.
    ejections: u32,
    consecutive_5xx: u32,
    consecutive_gateway_errors: u32,
}

/// `/clusters`: the destinations of the services behind this waypoint and every other one the
/// engine has used, by host, port, then subset (the whole service first).
pub(super) fn clusters(l7: &L7Context) -> String {
    let model = l7.model.current();
    let now = Instant::now();
    let order = |k: &ClusterKey| (k.host.clone(), k.port, k.subset.clone());
    let mut views: BTreeMap<(String, u16, Option<String>), ClusterView> = BTreeMap::new();
    for key in declared(&model, l7) {
        let view = match l7.upstreams.cluster(&model, &key) {
            Ok(cluster) => cluster_view(&model, &cluster, now),
            Err(e) => unusable(&model, &key, e.to_string()),
        };
        views.insert(order(&key), view);
    }
    for cluster in l7.upstreams.snapshot() {
        views.entry(order(&cluster.key)).or_insert_with(|| cluster_view(&model, &cluster, now));
    }
    let views: Vec<ClusterView> = views.into_values().collect();
    serde_json::to_string_pretty(&views).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// The destinations the configuration gives the services behind this waypoint.
fn declared(model: &Model, l7: &L7Context) -> Vec<ClusterKey> {
    let mut keys = Vec::new();
    for service in model.services.iter().filter(|s| s.waypoint.as_ref() == Some(&l7.waypoint)) {
        let rule = model.routing.destination_rule_for(&service.hostname);
        let vs = model.routing.mesh_routes_for(&service.hostname);
        for port in &service.ports {
            let key = |subset: Option<&str>| ClusterKey {
                host: service.hostname.clone(),
                subset: subset.map(str::to_owned),
                port: port.port,
            };
            keys.push(key(None));
            keys.extend(rule.iter().flat_map(|r| &r.subsets).map(|s| key(Some(&s.name))));
            let Some(vs) = vs else { continue };
            let routed = vs.http.iter().flat_map(|r| {
                let forwards = match &r.action {
                    crate::model::routes::RouteAction::Forward(d) => d.as_slice(),
                    _ => &[],
                };
                forwards.iter().map(|d| &d.destination).chain(r.mirrors.iter().map(|m| &m.destination))
            });
            let tcp = vs.tcp.iter().flat_map(|r| r.destinations.iter().map(|d| &d.destination));
            keys.extend(routed.chain(tcp).map(|d| ClusterKey::of(model, d, port.port)));
        }
    }
    keys
}

fn cluster_view(model: &Model, c: &Cluster, now: Instant) -> ClusterView {
    ClusterView {
        name: c.key.name(),
        host: c.key.host.clone(),
        port: c.key.port,
        subset: c.key.subset.clone(),
        namespace: c.service.as_ref().map(|s| s.namespace.clone()),
        protocol: format!("{:?}", c.protocol),
        destination_rule: c
            .service
            .as_ref()
            .and_then(|_| model.routing.destination_rule_for(&c.key.host))
            .map(|r| r.key()),
        load_balancer: load_balancer(c.policy.load_balancer.as_ref()),
        outlier_detection: c.policy.outlier_detection.is_some(),
        connections: c.limits.connections.load(Relaxed),
        pending: c.limits.pending.load(Relaxed),
        active_requests: c.limits.active_requests.load(Relaxed),
        endpoints: c
            .endpoints
            .iter()
            .map(|e| {
                let status = e.health.status(now);
                EndpointView {
                    address: e.addr,
                    workload: e.workload.display_name(),
                    health: if status.ejected_for.is_some() { "EJECTED" } else { "HEALTHY" },
                    active_requests: e.active.load(Relaxed),
                    idle_connections: e.pool.idle_count(),
                    outlier: OutlierView {
                        ejected_for_ms: status.ejected_for.map(millis),
                        ejections: status.ejections,
                        consecutive_5xx: status.consecutive_5xx,
                        consecutive_gateway_errors: status.consecutive_gateway_errors,
                    },
                }
            })
            .collect(),
        error: None,
    }
}

fn unusable(model: &Model, key: &ClusterKey, error: String) -> ClusterView {
    ClusterView {
        name: key.name(),
        host: key.host.clone(),
        port: key.port,
        subset: key.subset.clone(),
        namespace: model.service_by_host(&key.host).map(|s| s.namespace.clone()),
        protocol: "-".to_owned(),
        destination_rule: model.routing.destination_rule_for(&key.host).map(|r| r.key()),
        load_balancer: "-".to_owned(),
        outlier_detection: false,
        connections: 0,
        pending: 0,
        active_requests: 0,
        endpoints: Vec::new(),
        error: Some(error),
    }
}

/// Istio's names for the policy: `ROUND_ROBIN` (the default), `RANDOM`, `LEAST_REQUEST`,
/// `CONSISTENT_HASH(...)`.
fn load_balancer(lb: Option<&LoadBalancer>) -> String {
    match lb {
        None | Some(LoadBalancer::RoundRobin) => "ROUND_ROBIN".to_owned(),
        Some(LoadBalancer::Random) => "RANDOM".to_owned(),
        Some(LoadBalancer::LeastRequest) => "LEAST_REQUEST".to_owned(),
        Some(LoadBalancer::ConsistentHash(key)) => match key {
            HashKey::Header(h) => format!("CONSISTENT_HASH(header {h})"),
            HashKey::Cookie { name, .. } => format!("CONSISTENT_HASH(cookie {name})"),
            HashKey::SourceIp => "CONSISTENT_HASH(source ip)".to_owned(),
            HashKey::QueryParameter(q) => format!("CONSISTENT_HASH(query {q})"),
        },
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
