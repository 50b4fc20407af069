//! `/routes` at a waypoint (OBS-3, CFG-4): for every port of every service that sends its
//! traffic through this waypoint, the routes a request meets there, in order, as `istioctl
//! proxy-config routes` lists Envoy's. Conditions are described in words here, once, so tools
//! need not know the model's types.

use std::time::Duration;

use serde::Serialize;

use crate::model::{
    AppProtocol, Model, Service, WaypointName,
    routes::{
        AbortStatus, Destination, HttpRoute, L4Match, MESH_GATEWAY, RouteAction, RouteMatch, StringMatcher, TcpRoute,
        VirtualService, WeightedDestination,
    },
};

#[derive(Serialize)]
struct RouteTable<'a> {
    /// Envoy's route configuration name for in-mesh traffic: the port.
    name: String,
    service: &'a str,
    namespace: &'a str,
    port: u16,
    /// `namespace/name` of the VirtualService in force; `None`: straight to the service.
    virtual_service: Option<String>,
    http: Vec<HttpRouteView>,
    tcp: Vec<TcpRouteView>,
}

#[derive(Serialize)]
struct HttpRouteView {
    name: Option<String>,
    /// Alternatives, any of which selects the route, each in words (`/reviews*`,
    /// `header end-user=jason`); empty: every request.
    #[serde(rename = "match")]
    matches: Vec<String>,
    /// Where a forwarded request goes, by weight (empty for a redirect or direct response).
    destinations: Vec<DestinationView>,
    /// `redirect ...` or `direct_response ...` when the route answers by itself.
    answer: Option<String>,
    /// What else the route does: timeout, retries, faults, mirrors, rewrites, header edits.
    options: Vec<String>,
}

#[derive(Serialize)]
struct TcpRouteView {
    #[serde(rename = "match")]
    matches: Vec<String>,
    destinations: Vec<DestinationView>,
}

#[derive(Serialize)]
struct DestinationView {
    host: String,
    subset: Option<String>,
    /// The port as written; `None` takes the request's port.
    port: Option<u16>,
    weight: u32,
}

/// `/routes`: the route tables of the services behind `waypoint`, by service and port.
pub(super) fn routes(model: &Model, waypoint: &WaypointName) -> String {
    let mut services: Vec<&Service> =
        model.services.iter().filter(|s| s.waypoint.as_ref() == Some(waypoint)).map(AsRef::as_ref).collect();
    services.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    let mut tables = Vec::new();
    for service in services {
        let vs = model.routing.mesh_routes_for(&service.hostname);
        for port in &service.ports {
            tables.push(route_table(service, port.port, port.protocol, vs.map(AsRef::as_ref)));
        }
    }
    serde_json::to_string_pretty(&tables).unwrap_or_else(|e| super::views::error_json(&e))
}

fn route_table<'a>(
    service: &'a Service,
    port: u16,
    protocol: AppProtocol,
    vs: Option<&VirtualService>,
) -> RouteTable<'a> {
    let mut table = RouteTable {
        name: port.to_string(),
        service: &service.hostname,
        namespace: &service.namespace,
        port,
        virtual_service: vs.map(VirtualService::key),
        http: Vec::new(),
        tcp: Vec::new(),
    };
    let Some(vs) = vs else {
        // Without a VirtualService the waypoint sends to the service's own endpoints.
        let itself = DestinationView { host: service.hostname.clone(), subset: None, port: Some(port), weight: 100 };
        if protocol == AppProtocol::Tcp {
            table.tcp.push(TcpRouteView { matches: Vec::new(), destinations: vec![itself] });
        } else {
            table.http.push(HttpRouteView {
                name: None,
                matches: Vec::new(),
                destinations: vec![itself],
                answer: None,
                options: Vec::new(),
            });
        }
        return table;
    };
    if protocol != AppProtocol::Tcp {
        table.http = vs.http.iter().filter_map(|r| http_route(r, port)).collect();
    }
    table.tcp = vs.tcp.iter().filter_map(|r| tcp_route(r, port)).collect();
    table
}

/// The route as it applies to requests on `port`; `None` when none of its matches can.
fn http_route(route: &HttpRoute, port: u16) -> Option<HttpRouteView> {
    let relevant: Vec<&RouteMatch> = route.matches.iter().filter(|m| applies(m.port, &m.gateways, port)).collect();
    if !route.matches.is_empty() && relevant.is_empty() {
        return None;
    }
    let (destinations, answer) = match &route.action {
        RouteAction::Forward(destinations) => (destinations.iter().map(destination).collect(), None),
        RouteAction::Redirect(r) => {
            let mut parts = vec![format!("redirect {}", r.status)];
            parts.extend(r.scheme.as_ref().map(|s| format!("scheme={s}")));
            parts.extend(r.authority.as_ref().map(|a| format!("authority={a}")));
            parts.extend(r.port.map(|p| format!("port={p}")));
            parts.extend(r.uri.as_ref().map(|u| format!("uri={u}")));
            (Vec::new(), Some(parts.join(" ")))
        }
        RouteAction::DirectResponse { status, body } => {
            let body = body.as_ref().map_or(String::new(), |b| format!(" body={b:?}"));
            (Vec::new(), Some(format!("direct_response {status}{body}")))
        }
    };
    Some(HttpRouteView {
        name: route.name.clone(),
        matches: relevant.into_iter().map(describe_match).collect(),
        destinations,
        answer,
        options: options(route),
    })
}

fn tcp_route(route: &TcpRoute, port: u16) -> Option<TcpRouteView> {
    let relevant: Vec<&L4Match> = route.matches.iter().filter(|m| applies(m.port, &m.gateways, port)).collect();
    if !route.matches.is_empty() && relevant.is_empty() {
        return None;
    }
    Some(TcpRouteView {
        matches: relevant.into_iter().map(describe_l4_match).collect(),
        destinations: route.destinations.iter().map(destination).collect(),
    })
}

/// Whether a match restricted to `match_port` and `gateways` can see in-mesh traffic on `port`.
fn applies(match_port: Option<u16>, gateways: &[String], port: u16) -> bool {
    match_port.is_none_or(|p| p == port) && (gateways.is_empty() || gateways.iter().any(|g| g == MESH_GATEWAY))
}

fn destination(d: &WeightedDestination) -> DestinationView {
    let Destination { host, subset, port } = &d.destination;
    DestinationView { host: host.clone(), subset: subset.clone(), port: *port, weight: d.weight }
}

/// One match block in words: its conditions, separated by spaces (all must hold).
fn describe_match(m: &RouteMatch) -> String {
    let mut parts = Vec::new();
    if let Some(uri) = &m.uri {
        let uri = describe_string("", uri);
        parts.push(if m.ignore_uri_case { format!("{uri} (any case)") } else { uri });
    }
    let mut field = |name: &str, matcher: &Option<StringMatcher>| {
        if let Some(matcher) = matcher {
            parts.push(describe_string(name, matcher));
        }
    };
    field("method", &m.method);
    field("authority", &m.authority);
    field("scheme", &m.scheme);
    for (name, matcher) in &m.headers {
        parts.push(format!("header {}", describe_string(name, matcher)));
    }
    for (name, matcher) in &m.without_headers {
        parts.push(format!("without header {}", describe_string(name, matcher)));
    }
    for (name, matcher) in &m.query_params {
        parts.push(format!("query {}", describe_string(name, matcher)));
    }
    if let Some(port) = m.port {
        parts.push(format!("port={port}"));
    }
    if !m.source_labels.is_empty() {
        let labels: Vec<String> = m.source_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        parts.push(format!("from labels {}", labels.join(",")));
    }
    if let Some(ns) = &m.source_namespace {
        parts.push(format!("from namespace {ns}"));
    }
    if parts.is_empty() { "/*".to_owned() } else { parts.join(" ") }
}

fn describe_l4_match(m: &L4Match) -> String {
    let mut parts = Vec::new();
    if let Some(port) = m.port {
        parts.push(format!("port={port}"));
    }
    if !m.destination_subnets.is_empty() {
        let subnets: Vec<String> = m.destination_subnets.iter().map(ToString::to_string).collect();
        parts.push(format!("to {}", subnets.join(",")));
    }
    if !m.source_labels.is_empty() {
        let labels: Vec<String> = m.source_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        parts.push(format!("from labels {}", labels.join(",")));
    }
    if let Some(ns) = &m.source_namespace {
        parts.push(format!("from namespace {ns}"));
    }
    if parts.is_empty() { "*".to_owned() } else { parts.join(" ") }
}

/// `name=value` for exact, `name=value*` for a prefix, `name~regex` for a regex, `name` alone
/// for presence; for the path (no name), the value alone.
fn describe_string(name: &str, matcher: &StringMatcher) -> String {
    match (name.is_empty(), matcher) {
        (true, StringMatcher::Exact(v)) => v.clone(),
        (true, StringMatcher::Prefix(v)) => format!("{v}*"),
        (true, StringMatcher::Regex(r)) => format!("~{}", r.as_str()),
        (true, StringMatcher::Presence) => "*".to_owned(),
        (false, StringMatcher::Exact(v)) => format!("{name}={v}"),
        (false, StringMatcher::Prefix(v)) => format!("{name}={v}*"),
        (false, StringMatcher::Regex(r)) => format!("{name}~{}", r.as_str()),
        (false, StringMatcher::Presence) => name.to_owned(),
    }
}

/// What the route does beyond choosing a destination, in words.
fn options(route: &HttpRoute) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(timeout) = route.timeout {
        out.push(format!("timeout {}", duration(timeout)));
    }
    if let Some(retries) = &route.retries {
        let per_try = retries.per_try_timeout.map_or(String::new(), |t| format!(", {} per try", duration(t)));
        out.push(format!("retries {}{per_try}", retries.attempts));
    }
    if let Some(fault) = &route.fault {
        if let Some(delay) = &fault.delay {
            out.push(format!("fault delay {} to {}%", duration(delay.fixed_delay), delay.percentage.0));
        }
        if let Some(abort) = &fault.abort {
            let status = match abort.status {
                AbortStatus::Http(s) => s.to_string(),
                AbortStatus::Grpc(s) => format!("grpc-status {s}"),
            };
            out.push(format!("fault abort {status} to {}%", abort.percentage.0));
        }
    }
    for mirror in &route.mirrors {
        let d = &mirror.destination;
        let subset = d.subset.as_ref().map_or(String::new(), |s| format!("|{s}"));
        out.push(format!("mirror {}{subset} {}%", d.host, mirror.percentage.0));
    }
    if let Some(rewrite) = &route.rewrite {
        if let Some(uri) = &rewrite.uri {
            out.push(format!("rewrite uri {uri}"));
        }
        if let Some(authority) = &rewrite.authority {
            out.push(format!("rewrite authority {authority}"));
        }
    }
    let edits = &route.headers;
    let count = |e: &crate::model::routes::HeaderEdits| e.set.len() + e.add.len() + e.remove.len();
    if count(&edits.request) + count(&edits.response) > 0 {
        out.push(format!("header edits {} request, {} response", count(&edits.request), count(&edits.response)));
    }
    out
}

/// `500ms`, `7s`, `1.5s`, `3m`.
fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::config::parse_file;

    const MESH: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: reviews-v1, namespace: shop, labels: {app: reviews, version: v1}}\n\
        spec: {nodeName: node2}\nstatus: {podIP: 10.2.0.10}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: reviews-v2, namespace: shop, labels: {app: reviews, version: v2}}\n\
        spec: {nodeName: node2}\nstatus: {podIP: 10.2.0.11}\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\n\
        spec: {clusterIP: 10.96.0.30, selector: {app: reviews}, ports: [{name: http, port: 9080}]}\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\n\
        spec: {clusterIP: 10.96.0.31, selector: {app: reviews}, ports: [{name: tcp, port: 5432}]}\n---\n\
        apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: shop}\n\
        spec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}\n---\n\
        apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\n\
        spec:\n  hosts: [reviews]\n  http:\n  - name: jason\n    match:\n    - headers: {end-user: {exact: jason}}\n      uri: {prefix: /reviews}\n    - port: 9999\n\
        \x20   route: [{destination: {host: reviews, subset: v2}}]\n    fault: {delay: {fixedDelay: 7s, percentage: {value: 100}}}\n\
        \x20 - route:\n    - {destination: {host: reviews, subset: v1}, weight: 90}\n    - {destination: {host: reviews, subset: v2}, weight: 10}\n\
        \x20   timeout: 0.5s\n    retries: {attempts: 3, perTryTimeout: 1s}\n";

    fn tables() -> Value {
        let (resources, diagnostics) = parse_file(std::path::Path::new("t.yaml"), MESH);
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        let (model, diagnostics) = crate::model::compile(&resources);
        assert!(!diagnostics.iter().any(|d| d.is_error()), "{diagnostics:?}");
        let waypoint = WaypointName { namespace: "shop".into(), name: "waypoint".into() };
        serde_json::from_str(&routes(&model, &waypoint)).expect("JSON")
    }

    #[test]
    fn a_virtual_service_is_listed_route_by_route_with_its_matches_in_words() {
        let tables = tables();
        let reviews = &tables[1];
        assert_eq!(
            (reviews["name"].as_str(), reviews["service"].as_str()),
            (Some("9080"), Some("reviews.shop.svc.cluster.local"))
        );
        assert_eq!(reviews["virtual_service"], "shop/reviews");
        let jason = &reviews["http"][0];
        assert_eq!(
            jason["match"],
            json!(["/reviews* header end-user=jason"]),
            "the port-9999 block cannot match on 9080"
        );
        assert_eq!(jason["destinations"][0]["subset"], "v2");
        assert_eq!(jason["options"], json!(["fault delay 7s to 100%"]));
        let split = &reviews["http"][1];
        assert_eq!(split["match"], json!([]));
        let weights: Vec<u64> =
            split["destinations"].as_array().expect("list").iter().filter_map(|d| d["weight"].as_u64()).collect();
        assert_eq!(weights, [90, 10]);
        assert_eq!(split["options"], json!(["timeout 500ms", "retries 3, 1s per try"]));
    }

    #[test]
    fn without_a_virtual_service_the_route_is_the_service_itself() {
        let tables = tables();
        let db = &tables[0];
        assert_eq!((db["service"].as_str(), db["virtual_service"].as_str()), (Some("db.shop.svc.cluster.local"), None));
        assert_eq!(db["http"], json!([]), "a TCP port has no HTTP routes");
        assert_eq!(
            db["tcp"][0]["destinations"][0],
            json!({"host": "db.shop.svc.cluster.local", "subset": null, "port": 5432, "weight": 100})
        );
    }
}
