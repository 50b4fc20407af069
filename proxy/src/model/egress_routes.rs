//! The `mesh` routes of a VirtualService for a ServiceEntry host, as a node proxy applies them
//! to one connection (GW-3, L7-8): matches on port, gateways, source labels and namespace,
//! destination subnets and, for `tls[]` routes, the SNI of the ClientHello; weighted
//! destinations with subsets. That is what the two-hop egress pattern needs (the `mesh` route
//! sends the host's traffic to the egress gateway's service) and the blackhole of seed 000,
//! without a waypoint. A route that needs HTTP is a waypoint's; with none, `compile` warns.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use super::{
    Endpoint, Model, Service, Workload,
    routes::{
        HttpRoute, L4Match, MESH_GATEWAY, RouteAction, RouteMatch, VirtualService, WeightedDestination, host_matches,
    },
    services::AppProtocol,
};
use crate::config::{Cidr, Diagnostic, Resolution};

/// A connection as the node proxy sees it before it is routed.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The service port it was sent to.
    pub port: u16,
    /// The address it was sent to (for `destinationSubnets`).
    pub destination: IpAddr,
    pub source: Option<&'a Workload>,
    /// The ClientHello's server name: `None` until read; `Some(None)` when it had none (or the
    /// client did not speak TLS).
    pub sni: Option<Option<&'a str>>,
}

/// What the `mesh` routes of the host say about one connection.
#[derive(Debug)]
pub enum MeshL4 {
    /// No VirtualService routes the host, or none of its routes matches: the connection goes
    /// where it was addressed.
    Unrouted,
    /// Sent to `service` instead (the route's destination).
    Redirect { service: Arc<Service>, to: Landing },
    /// A route matched but its destination cannot be reached: the reason.
    NoEndpoint(String),
    /// The first route that may apply needs HTTP (a waypoint's job): not decided here.
    NeedsL7,
    /// A `tls[]` route may apply: the ClientHello's SNI decides (`Connection::sni`).
    NeedsSni,
}

/// Where a redirected connection lands.
#[derive(Debug)]
pub enum Landing {
    /// A workload (a mesh pod, or a STATIC endpoint of a ServiceEntry).
    Endpoint(Endpoint),
    /// A name of a DNS ServiceEntry, resolved when the connection comes, and the port to dial.
    Resolve { name: String, port: u16 },
}

/// Applies the `mesh` routes of `host` (a ServiceEntry host) to `conn`. As Istio does by port
/// protocol: `http[]` for HTTP ports, `tls[]` then `tcp[]` for TLS and HTTPS ports, `tcp[]` for
/// other TCP ports, and `http[]` then `tcp[]` when the protocol is not declared.
pub fn route_at_l4(model: &Model, host: &str, conn: &Connection) -> MeshL4 {
    let Some(vs) = model.routing.mesh_routes_for(host) else { return MeshL4::Unrouted };
    let port = model.service_by_host(host).and_then(|s| s.port(conn.port));
    let (http, tls) = match port.map(|p| (p.protocol, is_tls(p.name.as_deref(), p.app_protocol.as_deref()))) {
        Some((AppProtocol::Http | AppProtocol::Http2 | AppProtocol::Grpc, _)) => (true, false),
        Some((AppProtocol::Tcp, tls)) => (false, tls),
        Some((AppProtocol::Unknown, _)) | None => (true, false),
    };
    if http {
        for route in &vs.http {
            let Some(m) = first_applying(&route.matches, |m| Conditions::of_http(m).hold(conn)) else { continue };
            if m.is_some_and(has_l7_conditions) || l7_part(route).is_some() {
                return MeshL4::NeedsL7;
            }
            let RouteAction::Forward(destinations) = &route.action else { return MeshL4::NeedsL7 };
            return forward(model, destinations, conn.port);
        }
        if port.is_some_and(|p| p.protocol != AppProtocol::Unknown) {
            return MeshL4::Unrouted;
        }
    }
    if tls {
        for route in &vs.tls {
            let mut sni_needed = false;
            let applies = first_applying(&route.matches, |m| {
                if !Conditions::of_l4(m).hold(conn) {
                    return false;
                }
                match conn.sni {
                    None => {
                        sni_needed |= !m.sni_hosts.is_empty();
                        m.sni_hosts.is_empty()
                    }
                    Some(sni) => {
                        m.sni_hosts.is_empty() || sni.is_some_and(|s| m.sni_hosts.iter().any(|h| host_matches(h, s)))
                    }
                }
            });
            if sni_needed {
                return MeshL4::NeedsSni;
            }
            if applies.is_some() {
                return forward(model, &route.destinations, conn.port);
            }
        }
    }
    for route in &vs.tcp {
        if first_applying(&route.matches, |m| Conditions::of_l4(m).hold(conn)).is_some() {
            return forward(model, &route.destinations, conn.port);
        }
    }
    MeshL4::Unrouted
}

/// Whether a port declared so carries TLS (`TLS`, `HTTPS`, or a name `tls-...`/`https-...`).
fn is_tls(name: Option<&str>, app_protocol: Option<&str>) -> bool {
    let named = |p: &str| {
        let p = p.split('-').next().unwrap_or(p).to_ascii_lowercase();
        p == "tls" || p == "https"
    };
    app_protocol.map_or_else(|| name.is_some_and(named), named)
}

/// `Some(Some(m))`: the first of `matches` that `applies`; `Some(None)`: there are none (the
/// route takes every connection); `None`: no match applies.
fn first_applying<M>(matches: &[M], mut applies: impl FnMut(&M) -> bool) -> Option<Option<&M>> {
    if matches.is_empty() {
        return Some(None);
    }
    matches.iter().find(|m| applies(m)).map(Some)
}

/// The connection-level conditions of a match (`http[]`, `tcp[]` or `tls[]`), borrowed: they
/// are checked for every connection to a routed host, so nothing is copied.
struct Conditions<'a> {
    port: Option<u16>,
    gateways: &'a [String],
    source_labels: &'a BTreeMap<String, String>,
    source_namespace: Option<&'a str>,
    destination_subnets: &'a [Cidr],
}

impl<'a> Conditions<'a> {
    fn of_http(m: &'a RouteMatch) -> Self {
        Conditions {
            port: m.port,
            gateways: &m.gateways,
            source_labels: &m.source_labels,
            source_namespace: m.source_namespace.as_deref(),
            destination_subnets: &[],
        }
    }

    fn of_l4(m: &'a L4Match) -> Self {
        Conditions {
            port: m.port,
            gateways: &m.gateways,
            source_labels: &m.source_labels,
            source_namespace: m.source_namespace.as_deref(),
            destination_subnets: &m.destination_subnets,
        }
    }

    /// Whether `conn` meets them (SNI aside). An empty `gateways` means the VirtualService's,
    /// which include `mesh` (only such are indexed for mesh traffic).
    fn hold(&self, conn: &Connection) -> bool {
        self.port.is_none_or(|p| p == conn.port)
            && (self.gateways.is_empty() || self.gateways.iter().any(|g| g == MESH_GATEWAY))
            && self.source_labels.iter().all(|(k, v)| conn.source.and_then(|s| s.labels.get(k)) == Some(v))
            && self.source_namespace.is_none_or(|ns| conn.source.is_some_and(|s| s.namespace == ns))
            && (self.destination_subnets.is_empty()
                || self.destination_subnets.iter().any(|c| c.contains(conn.destination)))
    }
}

/// The HTTP condition of a match, as its field name.
fn l7_condition(m: &RouteMatch) -> Option<&'static str> {
    [
        (m.uri.is_some(), "uri"),
        (m.scheme.is_some(), "scheme"),
        (m.method.is_some(), "method"),
        (m.authority.is_some(), "authority"),
        (!m.headers.is_empty(), "headers"),
        (!m.without_headers.is_empty(), "withoutHeaders"),
        (!m.query_params.is_empty(), "queryParams"),
    ]
    .into_iter()
    .find_map(|(set, field)| set.then_some(field))
}

fn has_l7_conditions(m: &RouteMatch) -> bool {
    l7_condition(m).is_some()
}

/// What of `route` a node proxy cannot apply per connection, as its field under the route:
/// it applies a route only whole.
fn l7_part(route: &HttpRoute) -> Option<String> {
    let destinations = match &route.action {
        RouteAction::Forward(destinations) => destinations,
        RouteAction::Redirect(_) => return Some("redirect".into()),
        RouteAction::DirectResponse { .. } => return Some("directResponse".into()),
    };
    let edits = |h: &super::routes::HeaderOps| {
        [&h.request, &h.response].iter().any(|e| !(e.set.is_empty() && e.add.is_empty() && e.remove.is_empty()))
    };
    let own = [
        (route.rewrite.is_some(), "rewrite"),
        (route.fault.is_some(), "fault"),
        (!route.mirrors.is_empty(), "mirror"),
        (route.timeout.is_some(), "timeout"),
        (route.retries.is_some(), "retries"),
        (edits(&route.headers), "headers"),
    ];
    if let Some((_, field)) = own.into_iter().find(|(set, _)| *set) {
        return Some(field.into());
    }
    destinations.iter().position(|d| edits(&d.headers)).map(|i| format!("route[{i}].headers"))
}

/// One destination by weight, then where in it: an endpoint of its subset in turn, or a DNS name.
fn forward(model: &Model, destinations: &[WeightedDestination], port: u16) -> MeshL4 {
    let Some(chosen) = crate::l7::choose_weighted(destinations) else {
        return MeshL4::NoEndpoint("every destination of the route has weight 0".into());
    };
    let d = &chosen.destination;
    let Some(service) = model.service_by_host(&d.host) else {
        return MeshL4::NoEndpoint(format!("the route's destination {} is no service", d.host));
    };
    // Without a port: the one the connection came on, or the service's only one (as the L7
    // engine does).
    let target_port = d.port.unwrap_or(port);
    let single = || (d.port.is_none() && service.ports.len() == 1).then(|| &service.ports[0]);
    let Some(service_port) = service.port(target_port).or_else(single) else {
        return MeshL4::NoEndpoint(format!("service {} has no port {target_port}", d.host));
    };
    let redirect = |to| MeshL4::Redirect { service: service.clone(), to };
    if let Some(entry) =
        service.entry.as_ref().filter(|e| matches!(e.resolution, Resolution::Dns | Resolution::DnsRoundRobin))
    {
        // DNS entries: one of the names in turn, resolved by the node proxy when dialling.
        return match pick(&entry.dns) {
            Some(dns) => redirect(Landing::Resolve { name: dns.name.clone(), port: dns.target(service_port.port) }),
            None => MeshL4::NoEndpoint(format!("{} has no name to resolve", d.host)),
        };
    }
    let labels = match &d.subset {
        None => None,
        Some(name) => match model.routing.destination_rule_for(&d.host).and_then(|r| r.subset(name)) {
            Some(subset) => Some(&subset.labels),
            None => return MeshL4::NoEndpoint(format!("no DestinationRule defines subset {name} of {}", d.host)),
        },
    };
    let eligible: Vec<&Endpoint> = service_port
        .endpoints
        .iter()
        .filter(|e| labels.is_none_or(|l| l.iter().all(|(k, v)| e.workload.labels.get(k) == Some(v))))
        .collect();
    match pick(&eligible) {
        Some(endpoint) => redirect(Landing::Endpoint((*endpoint).clone())),
        None => MeshL4::NoEndpoint(format!("{}:{} has no endpoint in the route's subset", d.host, service_port.port)),
    }
}

/// One of `items`, taken in turn across connections (one cursor for all routes: cheap, and
/// fair enough for spreading connections).
fn pick<T>(items: &[T]) -> Option<&T> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    (!items.is_empty()).then(|| &items[NEXT.fetch_add(1, Ordering::Relaxed) % items.len()])
}

/// Warns about `mesh` routes of ServiceEntry hosts that need HTTP while no waypoint serves the
/// host: node proxies cannot apply them, and the connections go where they were addressed.
pub fn warn_l7_mesh_routes(model: &Model, diagnostics: &mut Vec<Diagnostic>) {
    let mut warned: Vec<*const VirtualService> = Vec::new();
    for service in model.services.iter().filter(|s| s.entry.is_some() && s.waypoint.is_none()) {
        let Some(vs) = model.routing.mesh_routes_for(&service.hostname) else { continue };
        if warned.contains(&Arc::as_ptr(vs)) {
            continue;
        }
        let Some((field, what)) = l7_route(vs) else { continue };
        warned.push(Arc::as_ptr(vs));
        diagnostics.push(Diagnostic::warning(
            vs.origin.clone(),
            Some(&field),
            format!(
                "this `mesh` route for ServiceEntry host {} needs HTTP ({what}) and no waypoint serves the host: \
                 node proxies cannot apply it (they apply routes that match on port, gateways, source and SNI, \
                 without rewrites, redirects, faults, mirrors, header edits, timeouts or retries) and send its \
                 connections where they were addressed; label the ServiceEntry `istio.io/use-waypoint` or drop \
                 the HTTP part",
                service.hostname
            ),
        ));
    }
}

/// The first `mesh` route of `vs` that needs HTTP: the field that does, and what it is.
fn l7_route(vs: &VirtualService) -> Option<(String, String)> {
    let mesh_bound = |gateways: &[String]| gateways.is_empty() || gateways.iter().any(|g| g == MESH_GATEWAY);
    for (i, route) in vs.http.iter().enumerate() {
        if !route.matches.is_empty() && !route.matches.iter().any(|m| mesh_bound(&m.gateways)) {
            continue;
        }
        let condition = route.matches.iter().enumerate().filter(|(_, m)| mesh_bound(&m.gateways)).find_map(|(j, m)| {
            l7_condition(m).map(|f| (format!("spec.http[{i}].match[{j}].{f}"), format!("a match on {f}")))
        });
        if let Some(found) = condition {
            return Some(found);
        }
        if let Some(part) = l7_part(route) {
            return Some((format!("spec.http[{i}].{part}"), format!("`{part}`")));
        }
    }
    None
}

#[cfg(test)]
mod tests;
