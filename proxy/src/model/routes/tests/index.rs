//! Which VirtualService and DestinationRule apply to a service (L7-2, L7-4): exact hosts before
//! wildcards, the first resource in file order, short names in the resource's namespace; and the
//! precedence of policy levels inside one DestinationRule.

use std::path::Path;

use super::{REVIEWS, compile_yaml, namespace, service};
use crate::{
    config::parse_file,
    model::{
        compile,
        routes::{HashKey, LoadBalancer},
    },
};

fn vs(name: &str, ns: &str, hosts: &str, gateways: &str, to: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  hosts: {hosts}\n{gateways}  http:\n  - route:\n    - destination:\n        host: {to}\n---\n"
    )
}

fn dr(name: &str, ns: &str, host: &str, lb: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  host: \"{host}\"\n  trafficPolicy:\n    loadBalancer:\n      simple: {lb}\n---\n"
    )
}

fn services() -> String {
    [
        namespace("default"),
        namespace("shop"),
        service("reviews", "default", &[(9080, "http")]),
        service("ratings", "default", &[(9080, "http")]),
        service("reviews", "shop", &[(9080, "http")]),
    ]
    .concat()
}

// L7-2: exact beats wildcard, longer wildcard beats shorter, whatever the file order.
#[test]
fn mesh_routes_prefer_the_most_specific_host() {
    let yaml = [
        services(),
        vs("everything", "default", "[\"*.svc.cluster.local\"]", "", "ratings"),
        vs("default-ns", "default", "[\"*.default.svc.cluster.local\"]", "", "ratings"),
        vs("reviews", "default", "[reviews]", "", "reviews"),
        vs("ingress-only", "default", "[reviews.shop]", "  gateways: [ingress]\n", "reviews"),
    ]
    .concat();
    let (model, d) = compile_yaml(&yaml);
    // The Gateway itself is not part of this test.
    assert!(d.iter().all(|d| d.message.starts_with("Gateway default/ingress does not exist")), "{d:?}");
    let name = |host: &str| model.routing.mesh_routes_for(host).map(|vs| vs.name.as_str());
    assert_eq!(name(REVIEWS), Some("reviews"));
    assert_eq!(name("ratings.default.svc.cluster.local"), Some("default-ns"));
    assert_eq!(
        name("reviews.shop.svc.cluster.local"),
        Some("everything"),
        "gateway-only VirtualServices skip the mesh"
    );
    assert_eq!(model.routing.virtual_services.len(), 4);
}

// L7-2, CFG-4: two mesh VirtualServices for one host: the first wins, IST0109 warns.
#[test]
fn second_virtual_service_for_a_host_warns_and_loses() {
    let yaml = [
        services(),
        vs("first", "default", "[reviews]", "", "reviews"),
        vs("second", "default", "[reviews.default.svc.cluster.local]", "", "ratings"),
    ]
    .concat();
    let (model, d) = compile_yaml(&yaml);
    assert_eq!(model.routing.mesh_routes_for(REVIEWS).map(|vs| vs.name.as_str()), Some("first"));
    assert_eq!(d.len(), 1, "{d:?}");
    let w = &d[0];
    assert!(!w.is_error() && w.field.as_deref() == Some("spec.hosts"), "{w}");
    assert!(w.message.contains("default/first") && w.message.contains("default/second"), "{w}");
    assert!(w.message.contains("IST0109") && w.message.contains(&format!("`{REVIEWS}`")), "{w}");
}

// Short names resolve in the namespace of the resource that wrote them, not of the service.
#[test]
fn short_names_resolve_per_namespace() {
    let yaml = [
        services(),
        vs("in-shop", "shop", "[reviews]", "", "reviews"),
        vs("from-default", "default", "[reviews]", "", "reviews.shop"),
    ]
    .concat();
    let (model, d) = compile_yaml(&yaml);
    assert!(d.is_empty(), "{d:?}");
    let shop = model.routing.mesh_routes_for("reviews.shop.svc.cluster.local").expect("shop routed");
    assert_eq!(shop.name, "in-shop");
    let default = model.routing.mesh_routes_for(REVIEWS).expect("default routed");
    let crate::model::routes::RouteAction::Forward(to) = &default.http[0].action else { panic!("forward") };
    assert_eq!(to[0].destination.host, "reviews.shop.svc.cluster.local");
}

// L7-4: a DestinationRule per host, first wins with a warning; wildcards apply to services.
#[test]
fn destination_rules_by_host() {
    let yaml = [
        services(),
        dr("wild", "default", "*.default.svc.cluster.local", "RANDOM"),
        dr("reviews", "default", "reviews", "LEAST_REQUEST"),
        dr("reviews-again", "shop", "reviews.default.svc.cluster.local", "ROUND_ROBIN"),
        dr("all", "default", "*.svc.cluster.local", "ROUND_ROBIN"),
    ]
    .concat();
    let (model, d) = compile_yaml(&yaml);
    let lb = |host: &str| {
        let rule = model.routing.destination_rule_for(host).expect(host);
        (rule.name.clone(), rule.policy_for(None, 9080).load_balancer)
    };
    assert_eq!(lb(REVIEWS), ("reviews".into(), Some(LoadBalancer::LeastRequest)));
    assert_eq!(lb("ratings.default.svc.cluster.local"), ("wild".into(), Some(LoadBalancer::Random)));
    assert_eq!(lb("reviews.shop.svc.cluster.local"), ("all".into(), Some(LoadBalancer::RoundRobin)));
    assert!(model.routing.destination_rule_for("*.default.svc.cluster.local").is_some(), "wildcards are kept");
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].message.contains("shop/reviews-again") && d[0].message.contains("default/reviews"), "{}", d[0]);
}

// L7-4: subset port level, subset, rule port level, rule; each part taken separately.
#[test]
fn policy_for_takes_each_part_from_the_most_specific_level() {
    let yaml = [
        services(),
        "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: default
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: RANDOM
    outlierDetection:
      consecutive5xxErrors: 7
    portLevelSettings:
    - port:
        number: 9080
      loadBalancer:
        simple: LEAST_REQUEST
  subsets:
  - name: v1
    labels:
      version: v1
    trafficPolicy:
      loadBalancer:
        simple: ROUND_ROBIN
      connectionPool:
        tcp:
          maxConnections: 0
        http:
          http2MaxRequests: 10
      portLevelSettings:
      - port:
          number: 9080
        loadBalancer:
          consistentHash:
            httpCookie:
              name: user
              ttl: 0s
  - name: v2
    labels:
      version: v2
"
        .to_owned(),
    ]
    .concat();
    let (model, d) = compile_yaml(&yaml);
    assert!(d.is_empty(), "{d:?}");
    let rule = model.routing.destination_rule_for(REVIEWS).expect("rule");
    let lb = |subset: Option<&str>, port: u16| rule.policy_for(subset, port).load_balancer;
    let cookie = HashKey::Cookie { name: "user".into(), path: None, ttl: Some(std::time::Duration::ZERO) };
    assert_eq!(lb(Some("v1"), 9080), Some(LoadBalancer::ConsistentHash(cookie)));
    assert_eq!(lb(Some("v1"), 80), Some(LoadBalancer::RoundRobin));
    assert_eq!(lb(None, 9080), Some(LoadBalancer::LeastRequest));
    assert_eq!(lb(Some("v2"), 9080), Some(LoadBalancer::LeastRequest), "a subset without policy inherits");
    assert_eq!(lb(None, 80), Some(LoadBalancer::Random));
    let v1 = rule.policy_for(Some("v1"), 9080);
    let pool = v1.connection_pool.expect("subset pool");
    assert_eq!((pool.max_connections, pool.http2_max_requests), (None, Some(10)), "0 means not set");
    let od = v1.outlier_detection.expect("inherited from the rule");
    assert_eq!((od.consecutive_5xx, od.consecutive_gateway_errors), (Some(7), None));
    assert!(rule.policy_for(None, 9080).connection_pool.is_none());
}

// CFG-1: whatever the bytes, parsing and compiling report problems and never panic.
#[test]
fn malformed_documents_never_panic() {
    let header = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: x\n";
    let dr_header = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: x\n";
    let specs = [
        "spec: []",
        "spec: 5",
        "spec:\n  http: 5",
        "spec:\n  http: [[]]",
        "spec:\n  http: [~]",
        "spec:\n  hosts: [~]\n  http:\n  - route: [~]",
        "spec:\n  hosts: [a]\n  http:\n  - route:\n    - destination: {}",
        "spec:\n  hosts: [a]\n  http:\n  - match: [{uri: {regex: \"(\"}}]",
        "spec:\n  hosts: [a]\n  http:\n  - match: [{uri: {regex: \"a{99999999}\"}}]\n    route: [{destination: {host: a}}]",
        "spec:\n  hosts: [\"\", \".\", \"*.\", \"a..b\", \"*\"]\n  tcp:\n  - route: [{destination: {host: \"\"}, weight: 4294967295}, {destination: {host: a}, weight: 4294967295}]",
        "spec:\n  hosts: [a]\n  http:\n  - fault: {delay: {fixedDelay: 99999999999h}}\n    route: [{destination: {host: a}}]",
        "spec: &a\n  hosts: *a",
        "spec:\n  hosts: [a]\n  http:\n  - route:\n    - destination:\n        host: a\n  - {{{",
    ];
    let dr_specs = [
        "spec:",
        "spec:\n  host: \"\"",
        "spec:\n  host: a\n  trafficPolicy:\n    portLevelSettings: [{port: {}}]",
        "spec:\n  host: a\n  trafficPolicy:\n    loadBalancer: {consistentHash: {}}",
        "spec:\n  host: a\n  subsets: [{name: v1, trafficPolicy: {outlierDetection: {maxEjectionPercent: 1000}}}]",
    ];
    let docs =
        specs.iter().map(|s| format!("{header}{s}\n")).chain(dr_specs.iter().map(|s| format!("{dr_header}{s}\n")));
    for doc in docs {
        for end in (0..=doc.len()).filter(|i| doc.is_char_boundary(*i)) {
            let (resources, _) = parse_file(Path::new("t.yaml"), &doc[..end]);
            let _ = compile(&resources);
        }
    }
}
