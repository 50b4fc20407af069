//! The node proxy's view of `mesh` routes for ServiceEntry hosts, over models built from the
//! seeds' YAML (GW-3, GW-4, L7-8).

use super::*;
use crate::model::compile;

/// Seed 002's resources (ServiceEntry, Gateway, DestinationRule, VirtualService verbatim), with
/// the sleep pod, the egress gateway's pod and Service.
const SEED_002: &str = concat!(
    r#"
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: akv2k8s-test, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: akv2k8s-test, labels: {app: sleep}}
spec: {nodeName: n1}
status: {podIP: 10.1.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: egressgateway-0, namespace: istio-system, labels: {istio: egressgateway, strait.io/gateway: "true"}}
spec: {nodeName: n2}
status: {podIP: 10.2.0.30}
---
apiVersion: v1
kind: Service
metadata: {name: istio-egressgateway, namespace: istio-system}
spec:
  clusterIP: 10.96.0.80
  selector: {istio: egressgateway}
  ports: [{name: http2, port: 80, targetPort: 8080}, {name: https, port: 443, targetPort: 8443}]
---
"#,
    include_str!("../../../tests/fixtures/samples/seed-002-egress-gateway.yaml")
);

/// Seed 000's entries, DestinationRule and VirtualServices (verbatim, in namespace `default`),
/// with a mesh pod.
const SEED_000: &str = concat!(
    r#"
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: default}
spec: {nodeName: n1}
status: {podIP: 10.1.0.11}
---
"#,
    include_str!("../../../tests/fixtures/samples/seed-000-proxy-external.yaml")
);

fn model(yaml: &str) -> (Model, Vec<Diagnostic>) {
    let (resources, d) = crate::config::parse_file(std::path::Path::new("seed.yaml"), yaml);
    assert!(d.iter().all(|d| !d.is_error()), "{d:?}");
    compile(&resources)
}

fn conn<'a>(port: u16, source: Option<&'a Workload>, sni: Option<Option<&'a str>>) -> Connection<'a> {
    Connection { port, destination: "203.0.113.7".parse().expect("ip"), source, sni }
}

fn endpoint_of(decision: MeshL4) -> (String, String) {
    match decision {
        MeshL4::Redirect { service, to: Landing::Endpoint(endpoint) } => {
            (service.hostname.clone(), endpoint.addr().to_string())
        }
        other => panic!("{other:?}"),
    }
}

// GW-3: seed 002's mesh route sends port 80 of the external host to the egress gateway's pod
// (its subset, its target port); port 443 has no mesh route and goes where addressed; nothing
// is warned about.
#[test]
fn the_seed_mesh_route_goes_to_the_egress_gateway() {
    let (m, d) = model(SEED_002);
    assert!(d.iter().all(|d| !d.is_error()), "{d:?}");
    assert!(!d.iter().any(|d| d.message.contains("needs HTTP")), "{d:?}");
    let sleep = m.workload_by_ip("10.1.0.10".parse().expect("ip")).cloned();
    let (host, addr) = endpoint_of(route_at_l4(&m, "edition.cnn.com", &conn(80, sleep.as_deref(), None)));
    assert_eq!(
        (host.as_str(), addr.as_str()),
        ("istio-egressgateway.istio-system.svc.cluster.local", "10.2.0.30:8080")
    );
    assert!(matches!(route_at_l4(&m, "edition.cnn.com", &conn(443, sleep.as_deref(), None)), MeshL4::Unrouted));
}

// GW-3, L7-2: matches on source labels and namespace are checked per connection; a subset
// takes only the endpoints with its labels; a subset no DestinationRule defines is told.
#[test]
fn sources_and_subsets() {
    let by_label = SEED_002
        .replace("      - mesh\n      port: 80\n", "      - mesh\n      port: 80\n      sourceLabels: {app: sleep}\n");
    let (m, _) = model(&by_label);
    let sleep = m.workload_by_ip("10.1.0.10".parse().expect("ip")).cloned();
    assert!(matches!(route_at_l4(&m, "edition.cnn.com", &conn(80, sleep.as_deref(), None)), MeshL4::Redirect { .. }));
    assert!(matches!(route_at_l4(&m, "edition.cnn.com", &conn(80, None, None)), MeshL4::Unrouted), "unknown source");

    let labelled = SEED_002.replace("  - name: cnn\n", "  - name: cnn\n    labels: {version: v2}\n");
    let (m, _) = model(&labelled);
    assert!(
        matches!(route_at_l4(&m, "edition.cnn.com", &conn(80, None, None)), MeshL4::NoEndpoint(r) if r.contains("subset")),
        "no gateway pod carries version=v2"
    );
    let missing = SEED_002.replace("subset: cnn\n", "subset: nope\n");
    let (m, _) = model(&missing);
    assert!(
        matches!(route_at_l4(&m, "edition.cnn.com", &conn(80, None, None)), MeshL4::NoEndpoint(r) if r.contains("nope"))
    );
}

// GW-3: a mesh route matching on a path needs HTTP: not applied per connection, and warned
// about once, at the field, when no waypoint serves the host. A route with a rewrite too.
#[test]
fn routes_that_need_http_are_warned_about() {
    let l7 = SEED_002
        .replace("      - mesh\n      port: 80\n", "      - mesh\n      port: 80\n      uri: {prefix: /politics}\n");
    let (m, d) = model(&l7);
    assert!(matches!(route_at_l4(&m, "edition.cnn.com", &conn(80, None, None)), MeshL4::NeedsL7));
    let warnings: Vec<&Diagnostic> = d.iter().filter(|d| d.message.contains("needs HTTP")).collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].field.as_deref(), Some("spec.http[0].match[0].uri"), "{}", warnings[0]);
    assert!(warnings[0].message.contains("edition.cnn.com") && warnings[0].origin.file.ends_with("seed.yaml"));
    // As printed: the file, the line of the `uri` condition, the field.
    let mut located = vec![(*warnings[0]).clone()];
    crate::config::locate(&mut located, std::path::Path::new("seed.yaml"), &l7);
    let line = l7.lines().position(|l| l.contains("uri: {prefix: /politics}")).expect("line") + 1;
    let printed = located[0].to_string();
    assert!(
        printed.starts_with(&format!("seed.yaml:{line}: warning: field `spec.http[0].match[0].uri`: ")),
        "{printed}"
    );

    let rewrite = SEED_002.replace(
        "    route:\n    - destination:\n        host: istio-egressgateway",
        "    rewrite: {uri: /}\n    route:\n    - destination:\n        host: istio-egressgateway",
    );
    let (m, d) = model(&rewrite);
    assert!(matches!(route_at_l4(&m, "edition.cnn.com", &conn(80, None, None)), MeshL4::NeedsL7));
    let warning = d.iter().find(|d| d.message.contains("needs HTTP")).expect("warned");
    assert_eq!(warning.field.as_deref(), Some("spec.http[0].rewrite"));

    // With an egress waypoint serving the host, the waypoint applies it: no warning.
    let with_waypoint = l7.replace(
        "  name: cnn\n  namespace: akv2k8s-test\n",
        "  name: cnn\n  namespace: akv2k8s-test\n  labels: {istio.io/use-waypoint: egress}\n",
    );
    let (_, d) = model(&with_waypoint);
    assert!(!d.iter().any(|d| d.message.contains("needs HTTP")), "{d:?}");
}

// L7-3: weights spread connections over both destinations.
#[test]
fn weights_spread_connections() {
    let split = SEED_002.replace(
        "        subset: cnn\n        port:\n          number: 80\n      weight: 100\n",
        "        port:\n          number: 80\n      weight: 50\n    - destination:\n        host: istio-egressgateway.istio-system.svc.cluster.local\n        port:\n          number: 443\n      weight: 50\n",
    );
    let (m, _) = model(&split);
    let mut ports: Vec<String> =
        (0..200).map(|_| endpoint_of(route_at_l4(&m, "edition.cnn.com", &conn(80, None, None))).1).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports, ["10.2.0.30:8080", "10.2.0.30:8443"], "both destinations get connections");
}

// GW-4 (seed 000), L7-8: the mesh routes blackhole both hosts to localhost.local: HTTP port 80
// by port and gateway; TLS port 443 only once the SNI is known, and only for the SNI the route
// names. The landing is the loopback endpoint (which the node proxy refuses to dial).
#[test]
fn seed_000_routes_mesh_traffic_to_localhost() {
    let (m, d) = model(SEED_000);
    assert!(!d.iter().any(|d| d.message.contains("needs HTTP")), "{d:?}");
    let sleep = m.workload_by_ip("10.1.0.11".parse().expect("ip")).cloned();
    let (host, addr) = endpoint_of(route_at_l4(&m, "httpbin.org", &conn(80, sleep.as_deref(), None)));
    assert_eq!((host.as_str(), addr.as_str()), ("localhost.local", "127.0.0.1:80"));

    assert!(matches!(route_at_l4(&m, "edition.cnn.com", &conn(443, sleep.as_deref(), None)), MeshL4::NeedsSni));
    let (host, addr) =
        endpoint_of(route_at_l4(&m, "edition.cnn.com", &conn(443, sleep.as_deref(), Some(Some("edition.cnn.com")))));
    assert_eq!((host.as_str(), addr.as_str()), ("localhost.local", "127.0.0.1:443"));
    for other in [Some("other.example.com"), None] {
        let decision = route_at_l4(&m, "edition.cnn.com", &conn(443, sleep.as_deref(), Some(other)));
        assert!(matches!(decision, MeshL4::Unrouted), "{other:?}: {decision:?}");
    }
}

// GW-3: a mesh route to a DNS ServiceEntry lands on one of its names, resolved when dialling.
#[test]
fn a_route_to_a_dns_entry_resolves_its_name() {
    let to_dns = SEED_000.replace(
        "        host: localhost.local\n        port:\n          number: 80\n",
        "        host: edition.cnn.com\n        port:\n          number: 443\n",
    );
    let (m, _) = model(&to_dns);
    match route_at_l4(&m, "httpbin.org", &conn(80, None, None)) {
        MeshL4::Redirect { service, to: Landing::Resolve { name, port } } => {
            assert_eq!((service.hostname.as_str(), name.as_str(), port), ("edition.cnn.com", "edition.cnn.com", 443));
        }
        other => panic!("{other:?}"),
    }
}

// L7-8: `tcp[]` routes of a TCP entry by destination subnet; a destination port the service
// lacks is told, not guessed.
#[test]
fn tcp_routes_by_subnet_and_missing_ports() {
    let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: shop}
spec:
  hosts: [db.example.com]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: replica, namespace: shop}
spec:
  hosts: [replica.example.com]
  ports: [{number: 5433, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.50}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: shop}
spec:
  hosts: [db.example.com]
  tcp:
  - match: [{destinationSubnets: [203.0.113.0/24]}]
    route: [{destination: {host: replica.example.com, port: {number: 5433}}}]
  - match: [{destinationSubnets: [198.51.100.0/24]}]
    route: [{destination: {host: replica.example.com, port: {number: 6000}}}]
"#;
    let (m, d) = model(yaml);
    assert!(!d.iter().any(|d| d.message.contains("needs HTTP")), "{d:?}");
    let to = |ip: &str| Connection { port: 5432, destination: ip.parse().expect("ip"), source: None, sni: None };
    let (host, addr) = endpoint_of(route_at_l4(&m, "db.example.com", &to("203.0.113.9")));
    assert_eq!((host.as_str(), addr.as_str()), ("replica.example.com", "192.0.2.50:5433"));
    assert!(matches!(route_at_l4(&m, "db.example.com", &to("192.0.2.1")), MeshL4::Unrouted));
    let missing = route_at_l4(&m, "db.example.com", &to("198.51.100.4"));
    assert!(matches!(&missing, MeshL4::NoEndpoint(r) if r.contains("no port 6000")), "{missing:?}");
}
