//! The VirtualServices and DestinationRules of the seed docs' traffic-management tasks (request
//! routing, fault injection, traffic shifting, TCP shifting, timeouts, circuit breaking,
//! mirroring), compiled to the values the waypoint will act on.

use std::time::Duration;

use super::{RATINGS, REVIEWS, bookinfo, compile_clean, namespace, service, subsets};
use crate::model::routes::{
    AbortStatus, Destination, HttpRoute, LoadBalancer, Percentage, RetryOn, RouteAction, StringMatcher,
    UpstreamTlsMode, VirtualService,
};

/// `samples/bookinfo/networking/virtual-service-all-v1.yaml`.
const ALL_V1: &str = "\
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: productpage
spec:
  hosts:
  - productpage
  gateways:
  - bookinfo-gateway
  - mesh
  http:
  - route:
    - destination:
        host: productpage
        subset: v1
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - route:
    - destination:
        host: ratings
        subset: v1
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: details
spec:
  hosts:
  - details
  http:
  - route:
    - destination:
        host: details
        subset: v1
---
";

fn vs(yaml: &str) -> (crate::model::Model, std::sync::Arc<VirtualService>) {
    let model = compile_clean(&[bookinfo(), yaml.to_owned()].concat());
    let vs = model.routing.virtual_services.last().expect("a VirtualService").clone();
    (model, vs)
}

fn forward(route: &HttpRoute) -> Vec<(String, Option<String>, u32)> {
    let RouteAction::Forward(destinations) = &route.action else { panic!("not a forward: {:?}", route.action) };
    destinations.iter().map(|d| (d.destination.host.clone(), d.destination.subset.clone(), d.weight)).collect()
}

fn to(host: &str, subset: &str, weight: u32) -> (String, Option<String>, u32) {
    (host.to_owned(), Some(subset.to_owned()), weight)
}

// L7-2, L7-3: every service to v1; productpage also at its gateway; defaults filled in.
#[test]
fn virtual_service_all_v1() {
    let model = compile_clean(&[bookinfo(), ALL_V1.to_owned()].concat());
    let routing = &model.routing;
    assert_eq!(routing.virtual_services.len(), 4);
    let productpage = &routing.virtual_services[0];
    assert_eq!(productpage.hosts, ["productpage.default.svc.cluster.local"]);
    assert_eq!(productpage.gateways, ["default/bookinfo-gateway", "mesh"]);
    let reviews = routing.mesh_routes_for(REVIEWS).expect("reviews routed");
    assert_eq!(reviews.name, "reviews");
    assert_eq!(reviews.gateways, ["mesh"], "no gateways means the mesh");
    let route = &reviews.http[0];
    assert!(route.matches.is_empty() && route.retries.is_none() && route.timeout.is_none() && route.fault.is_none());
    assert_eq!(forward(route), [to(REVIEWS, "v1", 100)], "a lone destination weighs 100");
    for host in ["productpage", "reviews", "ratings", "details"] {
        let fqdn = format!("{host}.default.svc.cluster.local");
        assert!(routing.mesh_routes_for(&fqdn).is_some(), "{host}");
        assert_eq!(
            routing.destination_rule_for(&fqdn).expect("rule").subset("v1").expect("v1").labels["version"],
            "v1"
        );
    }
}

// L7-2: `virtual-service-reviews-test-v2.yaml`, jason to v2, everyone else to v1.
#[test]
fn reviews_test_v2_matches_end_user_header() {
    let (_, vs) = vs("\
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews
        subset: v2
  - route:
    - destination:
        host: reviews
        subset: v1
");
    assert_eq!(vs.http.len(), 2);
    let m = &vs.http[0].matches[0];
    assert!(matches!(&m.headers[..], [(name, StringMatcher::Exact(v))] if name == "end-user" && v == "jason"));
    assert_eq!(forward(&vs.http[0]), [to(REVIEWS, "v2", 100)]);
    assert!(vs.http[1].matches.is_empty());
    assert_eq!(forward(&vs.http[1]), [to(REVIEWS, "v1", 100)]);
}

// L7-3: `virtual-service-reviews-50-v3.yaml`, weights as written.
#[test]
fn reviews_50_v3_splits_by_weight() {
    let (_, vs) = vs("\
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 50
    - destination:
        host: reviews
        subset: v3
      weight: 50
");
    assert_eq!(forward(&vs.http[0]), [to(REVIEWS, "v1", 50), to(REVIEWS, "v3", 50)]);
}

// L7-6: `virtual-service-ratings-test-delay.yaml` and `-abort.yaml`: faults for jason only.
#[test]
fn ratings_delay_and_abort_for_jason() {
    let delay = "\
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - fault:
      FAULT
    match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: ratings
        subset: v1
  - route:
    - destination:
        host: ratings
        subset: v1
";
    let (_, vs) =
        self::vs(&delay.replace("FAULT", "delay:\n        fixedDelay: 7s\n        percentage:\n          value: 100"));
    let fault = vs.http[0].fault.as_ref().expect("fault");
    let d = fault.delay.as_ref().expect("delay");
    assert_eq!((d.fixed_delay, d.percentage), (Duration::from_secs(7), Percentage(100.0)));
    assert!(fault.abort.is_none() && vs.http[1].fault.is_none());
    assert_eq!(forward(&vs.http[0]), [to(RATINGS, "v1", 100)]);

    let (_, vs) =
        self::vs(&delay.replace("FAULT", "abort:\n        httpStatus: 500\n        percentage:\n          value: 100"));
    let a = vs.http[0].fault.as_ref().and_then(|f| f.abort.as_ref()).expect("abort");
    assert_eq!((a.status, a.percentage), (AbortStatus::Http(500), Percentage::ALL));
}

// L7-5, L7-6: the timeout task: a legacy `percent: 100` delay on ratings, 0.5 s on reviews.
#[test]
fn timeout_task_with_legacy_percent() {
    let (_, ratings) = vs("\
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - fault:
      delay:
        percent: 100
        fixedDelay: 2s
    route:
    - destination:
        host: ratings
        subset: v1
");
    let d = ratings.http[0].fault.as_ref().and_then(|f| f.delay.as_ref()).expect("delay");
    assert_eq!((d.fixed_delay, d.percentage), (Duration::from_secs(2), Percentage(100.0)));

    let (_, reviews) = vs("\
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v2
    timeout: 0.5s
");
    assert_eq!(reviews.http[0].timeout, Some(Duration::from_millis(500)));
    assert!(reviews.http[0].retries.is_none(), "L7-5: no default retry");
}

// L7-8: `tcp-echo-20-v2.yaml`: 80/20 on the gateway's port 31400 to service port 9000.
#[test]
fn tcp_echo_shifts_twenty_percent() {
    let ns = "istio-io-tcp-traffic-shifting";
    let yaml = [
        namespace(ns),
        service("tcp-echo", ns, &[(9000, "tcp"), (9001, "tcp-other")]),
        subsets("tcp-echo", ns, &["v1", "v2"]),
        format!(
            "\
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: tcp-echo
  namespace: {ns}
spec:
  hosts:
  - \"*\"
  gateways:
  - tcp-echo-gateway
  tcp:
  - match:
    - port: 31400
    route:
    - destination:
        host: tcp-echo
        port:
          number: 9000
        subset: v1
      weight: 80
    - destination:
        host: tcp-echo
        port:
          number: 9000
        subset: v2
      weight: 20
"
        ),
    ]
    .concat();
    let model = compile_clean(&yaml);
    let vs = &model.routing.virtual_services[0];
    assert_eq!(vs.gateways, [format!("{ns}/tcp-echo-gateway")]);
    assert!(model.routing.mesh_routes.is_empty(), "a gateway-only VirtualService does not route the mesh");
    let tcp = &vs.tcp[0];
    assert_eq!(tcp.matches[0].port, Some(31400));
    let host = format!("tcp-echo.{ns}.svc.cluster.local");
    let weights: Vec<(Destination, u32)> = tcp.destinations.iter().map(|d| (d.destination.clone(), d.weight)).collect();
    let at = |subset: &str| Destination { host: host.clone(), subset: Some(subset.into()), port: Some(9000) };
    assert_eq!(weights, [(at("v1"), 80), (at("v2"), 20)]);
}

// L7-4: the circuit-breaking task's DestinationRule, with Istio's defaults for the rest.
#[test]
fn httpbin_circuit_breaker() {
    let yaml = [
        namespace("default"),
        service("httpbin", "default", &[(8000, "http")]),
        "\
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
        maxRequestsPerConnection: 1
    outlierDetection:
      consecutiveErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
"
        .to_owned(),
    ]
    .concat();
    let model = compile_clean(&yaml);
    let rule = model.routing.destination_rule_for("httpbin.default.svc.cluster.local").expect("rule");
    let policy = rule.policy_for(None, 8000);
    let pool = policy.connection_pool.expect("pool");
    assert_eq!(
        (pool.max_connections, pool.http1_max_pending_requests, pool.max_requests_per_connection),
        (Some(1), Some(1), Some(1))
    );
    assert_eq!((pool.http2_max_requests, pool.connect_timeout), (None, None));
    let od = policy.outlier_detection.expect("outlier detection");
    assert_eq!(od.consecutive_gateway_errors, Some(1), "legacy consecutiveErrors counts gateway errors");
    assert_eq!(od.consecutive_5xx, None, "and turns the 5xx counter off, as Istio does");
    assert_eq!((od.interval, od.base_ejection_time), (Duration::from_secs(1), Duration::from_secs(180)));
    assert_eq!((od.max_ejection_percent, od.min_health_percent), (100, 0));
    assert!(policy.load_balancer.is_none() && policy.tls.is_none(), "unset: the engine's defaults");
}

// L7-7: the mirroring task: v1 serves, v2 gets a copy (`mirror_percent`, then `mirrorPercentage`).
#[test]
fn httpbin_mirror() {
    let setup = [
        namespace("default"),
        service("httpbin", "default", &[(8000, "http")]),
        "\
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
---
"
        .to_owned(),
    ]
    .concat();
    let mirror = "\
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts:
    - httpbin
  http:
  - route:
    - destination:
        host: httpbin
        subset: v1
      weight: 100
    mirror:
      host: httpbin
      subset: v2
    SHARE
";
    let host = "httpbin.default.svc.cluster.local";
    let shares =
        [("mirror_percent: 100", 100.0), ("mirrorPercent: 30", 30.0), ("mirrorPercentage:\n      value: 50.5", 50.5)];
    for (share, expected) in shares {
        let model = compile_clean(&[setup.clone(), mirror.replace("SHARE", share)].concat());
        let vs = model.routing.mesh_routes_for(host).expect("routed");
        let route = &vs.http[0];
        assert_eq!(forward(route), [to(host, "v1", 100)]);
        assert_eq!(route.mirrors.len(), 1);
        let m = &route.mirrors[0];
        assert_eq!(m.destination, Destination { host: host.into(), subset: Some("v2".into()), port: None });
        assert_eq!(m.percentage, Percentage(expected), "{share}");
        let rule = model.routing.destination_rule_for(host).expect("rule");
        assert_eq!(rule.subset("v2").expect("v2").labels["version"], "v2");
    }
    let model = compile_clean(&[setup, mirror.replace("SHARE", "")].concat());
    assert_eq!(model.routing.virtual_services[0].http[0].mirrors[0].percentage, Percentage::ALL, "absent = 100 %");
}

// L7-4: a rule using every part of a traffic policy, in the spellings older docs use.
#[test]
fn lower_case_enums_and_tls_modes() {
    let yaml = [
        bookinfo(),
        "\
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: ratings-tls
  namespace: other
spec:
  host: ratings.default.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      simple: least_conn
    tls:
      mode: istio_mutual
"
        .to_owned(),
    ]
    .concat();
    let (model, d) = super::compile_yaml(&yaml);
    // The bookinfo rule for ratings comes first and wins (with a warning for this one).
    assert!(d.iter().all(|d| !d.is_error()), "{d:?}");
    let rule = &model.routing.destination_rules[4];
    let policy = rule.policy_for(None, 9080);
    assert_eq!(policy.load_balancer, Some(LoadBalancer::LeastRequest), "LEAST_CONN is LEAST_REQUEST");
    assert_eq!(policy.tls.map(|t| t.mode), Some(UpstreamTlsMode::IstioMutual));
}

// L7-8, GW-4: the ingress gateway as a proxy for external services (seed 000): match-level
// gateways, `sni_hosts`, and hosts that are not services of the model.
#[test]
fn ingress_proxy_for_external_services() {
    let yaml = "\
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: cnn
spec:
  hosts:
  - edition.cnn.com
  gateways:
  - proxy
  - mesh
  tls:
  - match:
    - gateways:
      - proxy
      port: 443
      sni_hosts:
      - edition.cnn.com
    route:
    - destination:
        host: edition.cnn.com
        port:
          number: 443
  - match:
    - gateways:
      - mesh
      port: 443
      sni_hosts:
      - edition.cnn.com
    route:
    - destination:
        host: localhost.local
        port:
          number: 443
";
    let (model, d) = super::compile_yaml(&[namespace("default"), yaml.to_owned()].concat());
    let hosts: Vec<&str> =
        d.iter().map(|d| d.message.as_str()).filter(|m| !m.starts_with("Gateway default/proxy")).collect();
    assert_eq!(
        hosts,
        [
            "referenced host `edition.cnn.com` is not a known service",
            "referenced host `localhost.local` is not a known service"
        ],
        "only warnings: strait has no ServiceEntry yet"
    );
    let vs = &model.routing.virtual_services[0];
    assert_eq!(vs.gateways, ["default/proxy", "mesh"]);
    let first = &vs.tls[0].matches[0];
    assert_eq!((first.gateways.as_slice(), first.port), (["default/proxy".to_owned()].as_slice(), Some(443)));
    assert_eq!(first.sni_hosts, ["edition.cnn.com"]);
    assert_eq!(vs.tls[1].destinations[0].destination.host, "localhost.local");
}

// L7-3, GW-4: one host, two paths, each rewritten (seed 001).
#[test]
fn gateway_paths_with_rewrite() {
    let yaml = [
        namespace("simple"),
        service("simple", "simple", &[(80, "http")]),
        service("nginx", "simple", &[(80, "http")]),
        "\
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata:
  name: simple
  namespace: simple
spec:
  selector:
    istio: ingressgateway
  servers:
    - hosts:
        - simple.baihl.io
      port:
        name: http-simple
        number: 80
        protocol: HTTP
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: simple
  namespace: simple
spec:
  gateways:
    - simple
  hosts:
    - simple.baihl.io
  http:
  - match:
    - uri:
        exact: \"/simple/httpserver\"
    rewrite:
      uri: \"/hello\"
    route:
      - destination:
          host: simple.simple.svc.cluster.local
          port:
            number: 80
  - match:
    - uri:
        prefix: \"/simple/nginx\"
    rewrite:
      uri: \"/\"
    route:
      - destination:
          host: nginx.simple.svc.cluster.local
          port:
            number: 80
"
        .to_owned(),
    ]
    .concat();
    let model = compile_clean(&yaml);
    let vs = &model.routing.virtual_services[0];
    assert_eq!(
        (vs.hosts.as_slice(), vs.gateways.as_slice()),
        (["simple.baihl.io".to_owned()].as_slice(), ["simple/simple".to_owned()].as_slice())
    );
    let uri = |i: usize| vs.http[i].matches[0].uri.as_ref().expect("uri");
    assert!(matches!(uri(0), StringMatcher::Exact(p) if p == "/simple/httpserver"));
    assert!(matches!(uri(1), StringMatcher::Prefix(p) if p == "/simple/nginx"));
    let rewrites: Vec<Option<&str>> =
        vs.http.iter().map(|r| r.rewrite.as_ref().and_then(|r| r.uri.as_deref())).collect();
    assert_eq!(rewrites, [Some("/hello"), Some("/")]);
    let RouteAction::Forward(to) = &vs.http[1].action else { panic!("forward") };
    assert_eq!(to[0].destination.port, Some(80));
}

// L7-5: the concepts page's `retries: {attempts: 3, perTryTimeout: 2s}` gets Istio's default
// conditions; written conditions replace them; `attempts: 0` means no retries.
#[test]
fn retries_follow_istio_defaults() {
    let ratings = |retries: &str| {
        let (_, vs) = vs(&format!(
            "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata:\n  name: ratings\nspec:\n  hosts:\n  - ratings\n  http:\n  - route:\n    - destination:\n        host: ratings\n        subset: v1\n    retries:\n{retries}\n"
        ));
        vs.http[0].retries.as_ref().map(|r| (r.attempts, r.per_try_timeout, r.retry_on.clone()))
    };
    let default = RetryOn {
        connect_failure: true,
        refused_stream: true,
        status_codes: vec![503],
        grpc_statuses: vec![1, 14],
        ..RetryOn::default()
    };
    assert_eq!(ratings("      attempts: 3\n      perTryTimeout: 2s"), Some((3, Some(Duration::from_secs(2)), default)));
    let written = RetryOn {
        gateway_error: true,
        connect_failure: true,
        refused_stream: true,
        status_codes: vec![503, 409],
        grpc_statuses: vec![14],
        ..RetryOn::default()
    };
    let conditions =
        "      attempts: 2\n      retryOn: gateway-error,connect-failure,refused-stream,503,409,unavailable,503";
    assert_eq!(ratings(conditions), Some((2, None, written)));
    assert_eq!(ratings("      attempts: 0"), None);
}

// L7-3: redirects default to 301; direct responses; header edits keep YAML scalars as text.
#[test]
fn route_actions_and_header_edits() {
    let (_, vs) = vs("\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - match:
    - uri:
        prefix: /old
    redirect:
      uri: /new
      authority: reviews.example.com
  - match:
    - uri:
        regex: /health(z)?
    directResponse:
      status: 204
  - headers:
      request:
        set:
          test: true
          :authority: reviews.internal
        add:
          X-Version: 2
      response:
        remove: [X-Debug]
    route:
    - destination:
        host: reviews
        subset: v2
      headers:
        response:
          set:
            served-by: v2
");
    let RouteAction::Redirect(redirect) = &vs.http[0].action else { panic!("redirect") };
    assert_eq!((redirect.uri.as_deref(), redirect.status), (Some("/new"), 301));
    assert_eq!(redirect.authority.as_deref(), Some("reviews.example.com"));
    assert!(matches!(vs.http[1].action, RouteAction::DirectResponse { status: 204, body: None }));
    let Some(StringMatcher::Regex(re)) = &vs.http[1].matches[0].uri else { panic!("regex") };
    assert!(re.is_match("/healthz") && re.is_match("/health") && !re.is_match("/healthy"), "anchored: {re}");
    let edits = &vs.http[2].headers;
    let pairs = |v: &[(String, String)]| v.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>();
    assert_eq!(pairs(&edits.request.set), ["host=reviews.internal", "test=true"]);
    assert_eq!(pairs(&edits.request.add), ["x-version=2"]);
    assert_eq!(edits.response.remove, ["x-debug"]);
    let RouteAction::Forward(to) = &vs.http[2].action else { panic!("forward") };
    assert_eq!(pairs(&to[0].headers.response.set), ["served-by=v2"]);
}
