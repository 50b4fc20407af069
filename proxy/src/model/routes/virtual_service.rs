//! One VirtualService resource → `VirtualService`: hosts and destinations resolved, Istio's
//! defaults applied (gateway `mesh`, weight 100, redirect 301, retry conditions), and references
//! to services, ports and subsets checked.

use std::{collections::HashMap, sync::Arc};

use super::{
    AbortStatus, Destination, DestinationRule, Fault, FaultAbort, FaultDelay, HeaderEdits, HeaderOps, HttpRoute,
    L4Match, MESH_GATEWAY, Mirror, Percentage, Redirect, RetryOn, RetryPolicy, Rewrite, RouteAction, RouteMatch,
    StringMatcher, TcpRoute, TlsRoute, VirtualService, WeightedDestination,
    compile::Context,
    hosts::{covers, gateway_name},
};
use crate::{config as cfg, model::Service};

/// gRPC status codes in Istio's default `retryOn`.
const GRPC_CANCELLED: u32 = 1;
const GRPC_UNAVAILABLE: u32 = 14;

/// Compiles one VirtualService; `None` when it has errors.
pub(super) fn compile(
    cx: &mut Context,
    rules: &HashMap<String, Arc<DestinationRule>>,
    vs: &cfg::VirtualService,
) -> Option<VirtualService> {
    let spec = &vs.spec;
    let hosts: Vec<String> = spec.hosts.iter().map(|h| cx.resolve(h)).collect();
    if hosts.is_empty() {
        cx.error("spec.hosts", "must name at least one host (delegate VirtualServices are not supported)");
    }
    for (i, host) in hosts.iter().enumerate() {
        if hosts[..i].contains(host) {
            cx.error(&format!("spec.hosts[{i}]"), format!("host `{host}` is listed twice"));
        }
    }
    let gateways: Vec<String> = if spec.gateways.is_empty() {
        vec![MESH_GATEWAY.to_owned()]
    } else {
        spec.gateways.iter().map(|g| gateway_name(g, cx.namespace)).collect()
    };
    if gateways.iter().any(|g| g == MESH_GATEWAY) && hosts.iter().any(|h| h == "*") {
        cx.error("spec.hosts", "the host `*` is not allowed for VirtualServices bound to the mesh");
    }
    if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        cx.error("spec", "a VirtualService needs at least one `http`, `tcp` or `tls` route");
    }
    let scope = Scope {
        rules,
        services: hosts.iter().filter_map(|h| cx.known.service(h)).collect(),
        gateways: &gateways,
        hosts: &hosts,
    };
    let http = spec.http.iter().enumerate().filter_map(|(i, r)| http_route(cx, &scope, i, r)).collect();
    let tcp = spec.tcp.iter().enumerate().map(|(i, r)| {
        let (matches, destinations) = l4_route(cx, &scope, &format!("spec.tcp[{i}]"), &r.matches, &r.route);
        TcpRoute { matches, destinations }
    });
    let tcp = tcp.collect();
    let tls = spec.tls.iter().enumerate().map(|(i, r)| {
        let (matches, destinations) = l4_route(cx, &scope, &format!("spec.tls[{i}]"), &r.matches, &r.route);
        TlsRoute { matches, destinations }
    });
    let tls = tls.collect();
    if cx.has_errors() {
        return None;
    }
    Some(VirtualService {
        name: vs.metadata.name.clone(),
        namespace: cx.namespace.to_owned(),
        hosts,
        gateways,
        http,
        tcp,
        tls,
        origin: cx.origin.clone(),
    })
}

/// What every route of one VirtualService is checked against.
struct Scope<'a> {
    rules: &'a HashMap<String, Arc<DestinationRule>>,
    /// The services among the VirtualService's hosts.
    services: Vec<&'a Arc<Service>>,
    gateways: &'a [String],
    hosts: &'a [String],
}

impl Scope<'_> {
    /// A `match.port` only names a service port for mesh traffic; at a gateway it is the
    /// gateway's port (the seeds' tcp-echo matches 31400 on the ingress).
    fn check_port(&self, cx: &mut Context, field: &str, port: Option<u16>, match_gateways: &[String]) {
        let gateways = if match_gateways.is_empty() { self.gateways } else { match_gateways };
        let (Some(port), [only]) = (port, gateways) else { return };
        if only != MESH_GATEWAY || self.services.is_empty() {
            return;
        }
        if !self.services.iter().any(|s| s.port(port).is_some()) {
            let names: Vec<&str> = self.services.iter().map(|s| s.hostname.as_str()).collect();
            cx.warning(field, format!("port {port} is not a port of {}; this match never applies", names.join(", ")));
        }
    }
}

fn http_route(cx: &mut Context, scope: &Scope, index: usize, route: &cfg::HttpRoute) -> Option<HttpRoute> {
    let at = format!("spec.http[{index}]");
    if route.delegate.is_some() {
        cx.unsupported(&format!("{at}.delegate"), "delegating a route to another VirtualService");
        return None;
    }
    if route.cors_policy.is_some() {
        cx.unsupported(&format!("{at}.corsPolicy"), "`corsPolicy`");
    }
    let matches = route.matches.iter().enumerate().map(|(j, m)| http_match(cx, scope, &format!("{at}.match[{j}]"), m));
    let matches = matches.collect();
    let action = if let Some(redirect) = &route.redirect {
        if redirect.derive_port.is_some() {
            cx.unsupported(&format!("{at}.redirect.derivePort"), "`derivePort`");
        }
        RouteAction::Redirect(Redirect {
            uri: redirect.uri.clone(),
            authority: redirect.authority.clone(),
            port: redirect.port,
            scheme: redirect.scheme.clone(),
            status: redirect.redirect_code.unwrap_or(301),
        })
    } else if let Some(direct) = &route.direct_response {
        RouteAction::DirectResponse { status: direct.status, body: direct.body.as_ref().map(|b| b.string.clone()) }
    } else {
        let weights: Vec<Option<u32>> = route.route.iter().map(|d| d.weight).collect();
        let weights = weights_of(cx, &format!("{at}.route"), &weights);
        let destinations = route.route.iter().zip(weights).enumerate().map(|(j, (d, weight))| {
            let field = format!("{at}.route[{j}]");
            WeightedDestination {
                destination: destination(cx, scope, &format!("{field}.destination"), &d.destination),
                weight,
                headers: header_ops(cx, &format!("{field}.headers"), &d.headers),
            }
        });
        RouteAction::Forward(destinations.collect())
    };
    let retries = route.retries.as_ref().and_then(|r| {
        if r.retry_remote_localities.is_some() {
            cx.unsupported(&format!("{at}.retries.retryRemoteLocalities"), "`retryRemoteLocalities`");
        }
        retry_policy(r)
    });
    let fault = route.fault.as_ref().map(|f| Fault {
        delay: f.delay.as_ref().map(|d| FaultDelay {
            fixed_delay: d.fixed_delay,
            percentage: share(cx, &format!("{at}.fault.delay"), FAULT_SHARE, d.percentage, d.percent),
        }),
        // The parser makes sure an abort has one of the two statuses.
        abort: f.abort.as_ref().and_then(|a| {
            let status = a.http_status.map(AbortStatus::Http).or(a.grpc_status.map(|g| AbortStatus::Grpc(g.0)))?;
            let percentage = share(cx, &format!("{at}.fault.abort"), FAULT_SHARE, a.percentage, a.percent);
            Some(FaultAbort { status, percentage })
        }),
    });
    Some(HttpRoute {
        name: route.name.clone(),
        matches,
        action,
        headers: header_ops(cx, &format!("{at}.headers"), &route.headers),
        rewrite: route.rewrite.as_ref().map(|r| Rewrite { uri: r.uri.clone(), authority: r.authority.clone() }),
        timeout: route.timeout,
        retries,
        fault,
        mirrors: mirrors(cx, scope, &at, route),
    })
}

fn http_match(cx: &mut Context, scope: &Scope, at: &str, m: &cfg::HttpMatch) -> RouteMatch {
    let gateways: Vec<String> = m.gateways.iter().map(|g| gateway_name(g, cx.namespace)).collect();
    scope.check_port(cx, &format!("{at}.port"), m.port, &gateways);
    let by_name = |map: &std::collections::BTreeMap<String, cfg::StringMatch>| {
        map.iter().map(|(name, value)| (name.clone(), matcher(value))).collect()
    };
    RouteMatch {
        name: m.name.clone(),
        uri: m.uri.as_ref().map(matcher),
        scheme: m.scheme.as_ref().map(matcher),
        method: m.method.as_ref().map(matcher),
        authority: m.authority.as_ref().map(matcher),
        headers: by_name(&m.headers),
        without_headers: by_name(&m.without_headers),
        query_params: by_name(&m.query_params),
        port: m.port,
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone(),
        gateways,
        ignore_uri_case: m.ignore_uri_case,
    }
}

fn matcher(m: &cfg::StringMatch) -> StringMatcher {
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(exact), _, _) => StringMatcher::Exact(exact.clone()),
        (None, Some(prefix), _) => StringMatcher::Prefix(prefix.clone()),
        (None, None, Some(regex)) => StringMatcher::Regex(regex.clone()),
        (None, None, None) => StringMatcher::Presence,
    }
}

fn l4_match(cx: &mut Context, scope: &Scope, at: &str, m: &cfg::L4MatchAttributes) -> L4Match {
    let gateways: Vec<String> = m.gateways.iter().map(|g| gateway_name(g, cx.namespace)).collect();
    scope.check_port(cx, &format!("{at}.port"), m.port, &gateways);
    let sni_hosts: Vec<String> = m.sni_hosts.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
    for (k, sni) in sni_hosts.iter().enumerate() {
        if !scope.hosts.iter().any(|h| covers(h, sni)) {
            cx.error(
                &format!("{at}.sniHosts[{k}]"),
                format!("SNI host `{sni}` is not within the VirtualService's hosts ({})", scope.hosts.join(", ")),
            );
        }
    }
    L4Match {
        port: m.port,
        destination_subnets: m.destination_subnets.clone(),
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone(),
        gateways,
        sni_hosts,
    }
}

/// The matches and destinations of a `tcp[]` or `tls[]` entry at `at`.
fn l4_route(
    cx: &mut Context,
    scope: &Scope,
    at: &str,
    matches: &[cfg::L4MatchAttributes],
    route: &[cfg::RouteDestination],
) -> (Vec<L4Match>, Vec<WeightedDestination>) {
    let matches = matches.iter().enumerate().map(|(j, m)| l4_match(cx, scope, &format!("{at}.match[{j}]"), m));
    let matches = matches.collect();
    let weights: Vec<Option<u32>> = route.iter().map(|d| d.weight).collect();
    let weights = weights_of(cx, &format!("{at}.route"), &weights);
    let destinations = route.iter().zip(weights).enumerate().map(|(j, (d, weight))| WeightedDestination {
        destination: destination(cx, scope, &format!("{at}.route[{j}].destination"), &d.destination),
        weight,
        headers: HeaderOps::default(),
    });
    (matches, destinations.collect())
}

/// Weights as Istio reads them: a lone destination gets 100; otherwise a missing weight is 0, and
/// the weights are relative shares (Istio wants them to add up to 100).
fn weights_of(cx: &mut Context, at: &str, weights: &[Option<u32>]) -> Vec<u32> {
    if weights.len() <= 1 {
        return vec![100; weights.len()];
    }
    let weights: Vec<u32> = weights.iter().map(|w| w.unwrap_or(0)).collect();
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        cx.error(at, "the destinations' weights add up to 0, so no traffic could go anywhere; give each a `weight`");
    } else if total != 100 {
        cx.warning(at, format!("the destinations' weights add up to {total}, not 100; strait treats them as shares"));
    }
    weights
}

/// A destination with its host resolved, checked against services and DestinationRules.
fn destination(cx: &mut Context, scope: &Scope, at: &str, spec: &cfg::DestinationSpec) -> Destination {
    let host = cx.resolve(&spec.host);
    match cx.known.service(&host) {
        None => cx.warning(&format!("{at}.host"), format!("referenced host `{host}` is not a known service")),
        Some(service) => {
            if let Some(port) = spec.port.filter(|p| service.port(*p).is_none()) {
                let ports: Vec<String> = service.ports.iter().map(|p| p.port.to_string()).collect();
                cx.warning(
                    &format!("{at}.port.number"),
                    format!("port {port} is not a port of service `{host}` (it has {})", ports.join(", ")),
                );
            }
        }
    }
    if let Some(subset) = &spec.subset {
        let field = format!("{at}.subset");
        match scope.rules.get(&host) {
            None => cx.warning(
                &field,
                format!("subset `{subset}` is referenced but no DestinationRule defines subsets for host `{host}`"),
            ),
            Some(rule) if rule.subset(subset).is_none() => {
                let names: Vec<&str> = rule.subsets.iter().map(|s| s.name.as_str()).collect();
                let known = if names.is_empty() { "none".to_owned() } else { names.join(", ") };
                cx.warning(
                    &field,
                    format!("DestinationRule {} for `{host}` has no subset `{subset}` (it has {known})", rule.key()),
                );
            }
            Some(_) => {}
        }
    }
    Destination { host, subset: spec.subset.clone(), port: spec.port }
}

fn header_ops(cx: &mut Context, at: &str, headers: &cfg::Headers) -> HeaderOps {
    HeaderOps {
        request: header_edits(cx, &format!("{at}.request"), &headers.request, true),
        response: header_edits(cx, &format!("{at}.response"), &headers.response, false),
    }
}

/// The Host header (`:authority`) may be set or added on requests, nowhere else (as in Istio).
fn header_edits(cx: &mut Context, at: &str, ops: &cfg::HeaderOperations, request: bool) -> HeaderEdits {
    let edits = HeaderEdits {
        set: ops.set.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        add: ops.add.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        remove: ops.remove.clone(),
    };
    let touches_host = [
        ("set", edits.set.iter().any(|(k, _)| k == "host") && !request),
        ("add", edits.add.iter().any(|(k, _)| k == "host") && !request),
        ("remove", edits.remove.iter().any(|k| k == "host")),
    ];
    for (op, _) in touches_host.iter().filter(|(_, touches)| *touches) {
        cx.error(&format!("{at}.{op}"), "the Host header can only be set or added on requests");
    }
    edits
}

/// Istio's semantics: no policy without attempts; without `retryOn`, Istio's default conditions.
fn retry_policy(retries: &cfg::HttpRetry) -> Option<RetryPolicy> {
    let attempts = retries.attempts.filter(|a| *a > 0)?;
    let retry_on = match &retries.retry_on {
        None => RetryOn {
            connect_failure: true,
            refused_stream: true,
            status_codes: vec![503],
            grpc_statuses: vec![GRPC_CANCELLED, GRPC_UNAVAILABLE],
            ..RetryOn::default()
        },
        Some(tokens) => {
            let mut on = RetryOn::default();
            for token in tokens {
                match *token {
                    cfg::RetryOnToken::ServerError => on.server_error = true,
                    cfg::RetryOnToken::GatewayError => on.gateway_error = true,
                    cfg::RetryOnToken::Reset => on.reset = true,
                    cfg::RetryOnToken::ConnectFailure => on.connect_failure = true,
                    cfg::RetryOnToken::Retriable4xx => on.retriable_4xx = true,
                    cfg::RetryOnToken::RefusedStream => on.refused_stream = true,
                    // The codes themselves are the bare numbers of the list.
                    cfg::RetryOnToken::RetriableStatusCodes => {}
                    cfg::RetryOnToken::Status(code) if !on.status_codes.contains(&code) => on.status_codes.push(code),
                    cfg::RetryOnToken::Grpc(code) if !on.grpc_statuses.contains(&code) => on.grpc_statuses.push(code),
                    cfg::RetryOnToken::Status(_) | cfg::RetryOnToken::Grpc(_) => {}
                }
            }
            on
        }
    };
    Some(RetryPolicy { attempts, per_try_timeout: retries.per_try_timeout, retry_on })
}

/// The names of a share's field and of its legacy integer form.
const FAULT_SHARE: (&str, &str) = ("percentage", "percent");
const MIRROR_SHARE: (&str, &str) = ("mirrorPercentage", "mirror_percent");

/// A share of requests: the percentage, else the legacy integer percent, else all.
fn share(
    cx: &mut Context,
    at: &str,
    (name, legacy): (&str, &str),
    percentage: Option<cfg::Percent>,
    percent: Option<u32>,
) -> Percentage {
    if percentage.is_some() && percent.is_some() {
        cx.warning(
            &format!("{at}.{legacy}"),
            format!("both `{name}` and the legacy `{legacy}` are set; `{name}` is used"),
        );
    }
    match (percentage, percent) {
        (Some(p), _) => Percentage(p.value),
        (None, Some(p)) => Percentage(f64::from(p)),
        (None, None) => Percentage::ALL,
    }
}

/// `mirror` (with `mirrorPercentage` or the legacy `mirror_percent`) and `mirrors`.
fn mirrors(cx: &mut Context, scope: &Scope, at: &str, route: &cfg::HttpRoute) -> Vec<Mirror> {
    let mut mirrors = Vec::new();
    match &route.mirror {
        Some(mirror) => {
            let percentage = share(cx, at, MIRROR_SHARE, route.mirror_percentage, route.mirror_percent);
            mirrors.push(Mirror { destination: destination(cx, scope, &format!("{at}.mirror"), mirror), percentage });
        }
        None if route.mirror_percentage.is_some() || route.mirror_percent.is_some() => {
            cx.warning(&format!("{at}.mirrorPercentage"), "has no effect without `mirror`");
        }
        None => {}
    }
    for (j, mirror) in route.mirrors.iter().enumerate() {
        let destination = destination(cx, scope, &format!("{at}.mirrors[{j}].destination"), &mirror.destination);
        let percentage = mirror.percentage.map_or(Percentage::ALL, |p| Percentage(p.value));
        mirrors.push(Mirror { destination, percentage });
    }
    mirrors
}
