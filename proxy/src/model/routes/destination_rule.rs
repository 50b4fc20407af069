//! One DestinationRule resource → `DestinationRule`: host resolved, Istio's defaults applied
//! (outlier detection), Istio's quirks kept (0 means "not set" for limits, LEAST_CONN is
//! LEAST_REQUEST), and what strait cannot do yet reported.

use std::time::Duration;

use super::{
    ConnectionPool, DestinationRule, HashKey, LoadBalancer, OutlierDetection, PolicySettings, Subset, TrafficPolicy,
    UpstreamTls, UpstreamTlsMode, compile::Context,
};
use crate::config as cfg;

/// Envoy's outlier detection defaults, which Istio keeps.
const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

/// Compiles one DestinationRule; `None` when it has errors.
pub(super) fn compile(cx: &mut Context, rule: &cfg::DestinationRule) -> Option<DestinationRule> {
    let spec = &rule.spec;
    if spec.host.trim().is_empty() {
        cx.error("spec.host", "missing; a DestinationRule names the host it applies to");
    }
    let host = cx.resolve(&spec.host);
    if !host.is_empty() && !host.starts_with('*') && cx.known.service(&host).is_none() {
        cx.warning("spec.host", format!("host `{host}` is not a known service; the rule applies to nothing"));
    }
    if spec.workload_selector.is_some() {
        cx.unsupported("spec.workloadSelector", "`workloadSelector` on a DestinationRule");
    }
    let ports: Vec<u16> = cx.known.service(&host).map(|s| s.ports.iter().map(|p| p.port).collect()).unwrap_or_default();
    let traffic_policy = policy(cx, "spec.trafficPolicy", &ports, spec.traffic_policy.as_deref());
    let mut subsets: Vec<Subset> = Vec::new();
    for (i, subset) in spec.subsets.iter().enumerate() {
        let at = format!("spec.subsets[{i}]");
        if subsets.iter().any(|s| s.name == subset.name) {
            cx.warning(&format!("{at}.name"), format!("subset `{}` is defined twice; the first is used", subset.name));
        }
        subsets.push(Subset {
            name: subset.name.clone(),
            labels: subset.labels.clone(),
            traffic_policy: policy(cx, &format!("{at}.trafficPolicy"), &ports, subset.traffic_policy.as_ref()),
        });
    }
    (!cx.has_errors()).then(|| DestinationRule {
        name: rule.metadata.name.clone(),
        namespace: cx.namespace.to_owned(),
        host,
        traffic_policy,
        subsets,
        origin: cx.origin.clone(),
    })
}

/// A `trafficPolicy`; `ports` are the service's, to check `portLevelSettings` against.
fn policy(cx: &mut Context, at: &str, ports: &[u16], spec: Option<&cfg::TrafficPolicySpec>) -> TrafficPolicy {
    let Some(spec) = spec else { return TrafficPolicy::default() };
    let parts = (&spec.load_balancer, &spec.connection_pool, &spec.outlier_detection, &spec.tls);
    let rule_level = settings(cx, at, parts);
    let mut port_level: Vec<(u16, PolicySettings)> = Vec::new();
    for (i, level) in spec.port_level_settings.iter().enumerate() {
        let at = format!("{at}.portLevelSettings[{i}]");
        if port_level.iter().any(|(p, _)| *p == level.port) {
            cx.warning(&format!("{at}.port"), format!("port {} has settings twice; the first are used", level.port));
        } else if !ports.is_empty() && !ports.contains(&level.port) {
            cx.warning(
                &format!("{at}.port"),
                format!("port {} is not a port of the service; never applied", level.port),
            );
        }
        let parts = (&level.load_balancer, &level.connection_pool, &level.outlier_detection, &level.tls);
        port_level.push((level.port, settings(cx, &at, parts)));
    }
    TrafficPolicy { settings: rule_level, port_level }
}

/// The four parts of a policy, as written at one level.
type Parts<'a> = (
    &'a Option<cfg::LoadBalancerSettings>,
    &'a Option<cfg::ConnectionPoolSettings>,
    &'a Option<cfg::OutlierDetectionSettings>,
    &'a Option<cfg::ClientTlsSettings>,
);

fn settings(cx: &mut Context, at: &str, (lb, pool, outlier, tls): Parts) -> PolicySettings {
    PolicySettings {
        load_balancer: lb.as_ref().and_then(|lb| load_balancer(cx, &format!("{at}.loadBalancer"), lb)),
        connection_pool: pool.as_ref().map(|p| connection_pool(cx, &format!("{at}.connectionPool"), p)),
        outlier_detection: outlier.as_ref().map(|o| outlier_detection(cx, &format!("{at}.outlierDetection"), o)),
        tls: tls.as_ref().map(|t| upstream_tls(cx, &format!("{at}.tls"), t)),
    }
}

/// `None` when the level sets no algorithm (`simple: UNSPECIFIED` or only locality settings).
fn load_balancer(cx: &mut Context, at: &str, lb: &cfg::LoadBalancerSettings) -> Option<LoadBalancer> {
    if lb.locality_lb_setting.is_some() {
        cx.unsupported(&format!("{at}.localityLbSetting"), "locality load balancing");
    }
    if lb.warmup_duration_secs.is_some() {
        cx.unsupported(&format!("{at}.warmupDurationSecs"), "`warmupDurationSecs`");
    }
    if let Some(hash) = &lb.consistent_hash {
        let key = match (&hash.http_header_name, &hash.http_cookie, &hash.http_query_parameter_name) {
            (Some(header), _, _) => HashKey::Header(header.clone()),
            (None, Some(cookie), _) => {
                HashKey::Cookie { name: cookie.name.clone(), path: cookie.path.clone(), ttl: cookie.ttl }
            }
            (None, None, Some(param)) => HashKey::QueryParameter(param.clone()),
            // The parser makes sure there is exactly one key: here `useSourceIp: true`.
            (None, None, None) => HashKey::SourceIp,
        };
        return Some(LoadBalancer::ConsistentHash(key));
    }
    match lb.simple? {
        cfg::SimpleLb::Unspecified => None,
        cfg::SimpleLb::RoundRobin => Some(LoadBalancer::RoundRobin),
        cfg::SimpleLb::Random => Some(LoadBalancer::Random),
        cfg::SimpleLb::LeastRequest | cfg::SimpleLb::LeastConn => Some(LoadBalancer::LeastRequest),
        cfg::SimpleLb::Passthrough => {
            cx.warning(
                &format!("{at}.simple"),
                "PASSTHROUGH (original destination) is not supported by strait; ROUND_ROBIN is used",
            );
            Some(LoadBalancer::RoundRobin)
        }
    }
}

fn connection_pool(cx: &mut Context, at: &str, pool: &cfg::ConnectionPoolSettings) -> ConnectionPool {
    // Istio cannot tell 0 from "not set", so 0 means the default: no limit.
    let limit = |value: Option<u32>| value.filter(|n| *n > 0);
    let mut compiled = ConnectionPool::default();
    if let Some(tcp) = &pool.tcp {
        let ignored = [
            ("tcpKeepalive", tcp.tcp_keepalive.is_some()),
            ("maxConnectionDuration", tcp.max_connection_duration.is_some()),
            ("idleTimeout", tcp.idle_timeout.is_some()),
        ];
        for (name, _) in ignored.iter().filter(|(_, set)| *set) {
            cx.unsupported(&format!("{at}.tcp.{name}"), &format!("`{name}`"));
        }
        compiled.max_connections = limit(tcp.max_connections);
        compiled.connect_timeout = tcp.connect_timeout;
    }
    if let Some(http) = &pool.http {
        if http.max_concurrent_streams.is_some() {
            cx.unsupported(&format!("{at}.http.maxConcurrentStreams"), "`maxConcurrentStreams`");
        }
        compiled.http1_max_pending_requests = limit(http.http1_max_pending_requests);
        compiled.http2_max_requests = limit(http.http2_max_requests);
        compiled.max_requests_per_connection = limit(http.max_requests_per_connection);
        compiled.max_retries = limit(http.max_retries);
        compiled.idle_timeout = http.idle_timeout;
    }
    compiled
}

/// Istio's translation: the legacy `consecutiveErrors` counts gateway errors and turns the 5xx
/// counter off; otherwise `consecutive5xxErrors` is 5 unless written (0 turns it off), and
/// `consecutiveGatewayErrors` is off unless written.
fn outlier_detection(cx: &mut Context, at: &str, od: &cfg::OutlierDetectionSettings) -> OutlierDetection {
    if od.split_external_local_origin_errors {
        cx.unsupported(&format!("{at}.splitExternalLocalOriginErrors"), "counting local-origin failures apart");
    }
    let counter = |value: Option<u32>| value.filter(|n| *n > 0);
    let legacy = counter(od.consecutive_errors);
    let consecutive_5xx = match od.consecutive_5xx_errors {
        Some(n) => counter(Some(n)),
        None if legacy.is_some() => None,
        None => Some(DEFAULT_CONSECUTIVE_5XX),
    };
    OutlierDetection {
        consecutive_5xx,
        consecutive_gateway_errors: od.consecutive_gateway_errors.map_or(legacy, |n| counter(Some(n))),
        interval: od.interval.unwrap_or(DEFAULT_INTERVAL),
        base_ejection_time: od.base_ejection_time.unwrap_or(DEFAULT_BASE_EJECTION_TIME),
        // As for limits, Istio reads 0 as "not set".
        max_ejection_percent: counter(od.max_ejection_percent).unwrap_or(DEFAULT_MAX_EJECTION_PERCENT),
        min_health_percent: od.min_health_percent.unwrap_or(0),
    }
}

fn upstream_tls(cx: &mut Context, at: &str, tls: &cfg::ClientTlsSettings) -> UpstreamTls {
    let mode = match tls.mode {
        cfg::TlsMode::Disable => UpstreamTlsMode::Disable,
        cfg::TlsMode::Simple => UpstreamTlsMode::Simple,
        cfg::TlsMode::Mutual => UpstreamTlsMode::Mutual,
        cfg::TlsMode::IstioMutual => UpstreamTlsMode::IstioMutual,
    };
    // SIMPLE and MUTUAL originate TLS towards endpoints outside the mesh (SPEC GW-3,
    // `l7::origination`); the files are read there, so that a rotation needs no new config.
    if tls.ca_crl.is_some() {
        cx.unsupported(&format!("{at}.caCrl"), "`caCrl`");
    }
    UpstreamTls {
        mode,
        sni: tls.sni.clone(),
        client_certificate: tls.client_certificate.clone(),
        private_key: tls.private_key.clone(),
        ca_certificates: tls.ca_certificates.clone(),
        credential_name: tls.credential_name.clone(),
        subject_alt_names: tls.subject_alt_names.clone(),
        insecure_skip_verify: tls.insecure_skip_verify.unwrap_or(false),
    }
}
