//! A directory compiled, served, sent as bytes and rebuilt gives the same decisions.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::*;
use crate::{
    authz::{Connection, HttpRequest, evaluate},
    identity::Identity,
    model::{Service, WaypointName, Workload, WorkloadProtocol},
    node::policy::{authorize, kernel_policy, plaintext_allowed},
    xds::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, L7_TYPE_URL},
};

fn rebuilt(subscriber: &Subscriber) -> (Model, Model, Vec<Located<Resource>>) {
    let (resources, model) = directory();
    let served = snapshot(&model, &resources, "cluster.local");
    let decoded = model_from_xds(&received_by(&served, subscriber), "cluster.local").expect("decodes");
    (model, decoded, resources)
}

fn by_name<'a>(model: &'a Model, namespace: &str, name: &str) -> &'a Arc<Workload> {
    let found = model.workloads.iter().find(|w| w.namespace == namespace && w.name == name);
    found.unwrap_or_else(|| panic!("no workload {namespace}/{name}"))
}

// Everything a node proxy decides a workload by survives: address, node, identity, capture,
// protocol (L4-1), waypoints and labels.
#[test]
fn workloads_survive_the_round_trip() {
    let (model, decoded, _) = rebuilt(&node_proxy("n1"));
    assert_eq!(decoded.workloads.len(), model.workloads.len());
    for w in &model.workloads {
        let d = by_name(&decoded, &w.namespace, &w.name);
        assert_eq!(**d, **w, "{}", w.display_name());
        assert_eq!(decoded.workload_by_ip(w.ip).is_some(), !w.host_network, "{}", w.display_name());
    }
    let waypoint = WaypointName { namespace: "shop".into(), name: "waypoint".into() };
    let pods: Vec<&str> = decoded.waypoint(&waypoint).expect("waypoint").pods.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(pods, ["waypoint-0"]);
    let protocol = |name: &str| decoded.workloads.iter().find(|w| w.name == name).map(|w| w.protocol);
    assert_eq!((protocol("web-2"), protocol("old")), (Some(WorkloadProtocol::Hbone), Some(WorkloadProtocol::Tcp)));
}

// L4-3: the same VIPs, ports, protocols, endpoints (named target ports resolved per pod) and
// waypoints. The waypoint's own Service, synthesized as istiod would have it, comes on top.
#[test]
fn services_and_endpoints_survive_the_round_trip() {
    let (model, decoded, _) = rebuilt(&node_proxy("n2"));
    for s in &model.services {
        let d = decoded.service_by_host(&s.hostname).expect("service");
        assert_eq!(
            (d.vip, &d.name, &d.namespace, &d.labels, &d.waypoint),
            (s.vip, &s.name, &s.namespace, &s.labels, &s.waypoint)
        );
        assert_eq!(d.ports.len(), s.ports.len(), "{}", s.hostname);
        for (dp, sp) in d.ports.iter().zip(&s.ports) {
            assert_eq!(
                (dp.port, &dp.name, &dp.app_protocol, dp.protocol),
                (sp.port, &sp.name, &sp.app_protocol, sp.protocol)
            );
            let endpoints = |p: &crate::model::ServicePort| -> BTreeSet<String> {
                p.endpoints.iter().map(|e| format!("{}={}", e.workload.display_name(), e.addr())).collect()
            };
            assert_eq!(endpoints(dp), endpoints(sp), "{}:{}", s.hostname, sp.port);
        }
    }
    let web = decoded.service_by_vip("10.96.0.10".parse().expect("ip")).expect("web");
    let ports: BTreeSet<u16> = web.ports[0].endpoints.iter().map(|e| e.port).collect();
    assert_eq!(ports, BTreeSet::from([8080, 8081]), "targetPort `http` differs per pod");
    let synthesized = decoded.service_by_host("waypoint.shop.svc.cluster.local").expect("waypoint service");
    assert_eq!((synthesized.vip, synthesized.waypoint.as_ref()), (None, None));
    assert_eq!(decoded.services.len(), model.services.len() + 1);
}

/// Identities a connection can come from, and plaintext.
fn sources() -> Vec<Option<Identity>> {
    let id = |ns: &str, sa: &str| Some(Identity::new("cluster.local", ns, sa));
    vec![None, id("shop", "web"), id("shop", "client"), id("shop", "waypoint"), id("bank", "ledger"), id("other", "x")]
}

// AUTHZ-1/2, L4-4: every connection to every workload is decided the same, policy and mTLS;
// the kernel gets the same STRICT pods and port modes, and at least the same DENY sources.
#[test]
fn decisions_are_the_same() {
    let (model, decoded, _) = rebuilt(&node_proxy("n1"));
    let source_ips: [IpAddr; 4] = ["10.1.0.12", "10.66.1.1", "10.1.0.99", "10.2.0.5"].map(|ip| ip.parse().expect("ip"));
    let ports = [80, 1234, 8080, 8081, 9000, 9100];
    let mut checked = 0;
    for w in &model.workloads {
        let d = by_name(&decoded, &w.namespace, &w.name);
        for port in ports {
            let at = SocketAddr::new(w.ip, port);
            assert_eq!(
                plaintext_allowed(&decoded, d, port),
                plaintext_allowed(&model, w, port),
                "mTLS mode of {} on {port}",
                w.display_name()
            );
            for source in sources() {
                for ip in source_ips {
                    let want = authorize(&model, w, source.as_ref(), ip, at);
                    let got = authorize(&decoded, d, source.as_ref(), ip, at);
                    let what = format!("{source:?} from {ip} to {} on {port}: {want:?} vs {got:?}", w.display_name());
                    assert_eq!(got.allowed, want.allowed, "{what}");
                    assert_eq!(got.policy.is_some(), want.policy.is_some(), "{what}");
                    let dry = |d: &crate::authz::Decision| d.dry_run.iter().cloned().collect::<BTreeSet<_>>();
                    assert_eq!(dry(&got), dry(&want), "{what}");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 1000, "{checked}");
    for node in ["n1", "n2"] {
        let (want, got) = (kernel_policy(&model, node), kernel_policy(&decoded, node));
        assert_eq!((&got.strict, &got.port_modes), (&want.strict, &want.port_modes), "{node}");
        assert!(got.deny_sources.is_superset(&want.deny_sources), "{node}: {got:?} vs {want:?}");
    }
}

// The decisions above are not vacuous: each policy level decides something.
#[test]
fn the_directory_exercises_every_level() {
    let (model, decoded, _) = rebuilt(&node_proxy("n1"));
    let ledger = by_name(&decoded, "bank", "ledger-1");
    let at = |port| SocketAddr::new(ledger.ip, port);
    let id = |ns: &str, sa: &str| Identity::new("cluster.local", ns, sa);
    let client: IpAddr = "10.1.0.12".parse().expect("ip");
    assert!(authorize(&decoded, ledger, Some(&id("shop", "client")), client, at(9000)).allowed, "selector ALLOW");
    assert!(!authorize(&decoded, ledger, Some(&id("shop", "client")), client, at(9200)).allowed, "no ALLOW matches");
    assert!(
        !authorize(&decoded, ledger, Some(&id("shop", "web")), "10.1.0.99".parse().expect("ip"), at(9000)).allowed,
        "when DENY"
    );
    assert!(
        !authorize(&decoded, ledger, Some(&id("shop", "waypoint")), "10.66.0.1".parse().expect("ip"), at(9000)).allowed,
        "mesh DENY"
    );
    assert!(
        !authorize(&decoded, ledger, Some(&id("other", "x")), client, at(9100)).allowed,
        "DENY without its HTTP part"
    );
    assert!(
        authorize(&decoded, ledger, None, "10.2.0.5".parse().expect("ip"), at(9000)).allowed,
        "plaintext from an ipBlock"
    );
    let dry = authorize(&decoded, ledger, Some(&id("shop", "client")), client, at(9000)).dry_run;
    assert_eq!(dry, [("bank/dry".to_owned(), true)]);
    assert!(
        !plaintext_allowed(&decoded, ledger, 9000) && plaintext_allowed(&decoded, ledger, 9100),
        "mesh STRICT, port PERMISSIVE"
    );
    let web = by_name(&decoded, "shop", "web-2");
    assert!(
        plaintext_allowed(&decoded, web, 80) && !plaintext_allowed(&decoded, web, 8081),
        "workload DISABLE, port STRICT"
    );
    assert!(plaintext_allowed(&decoded, by_name(&decoded, "shop", "client"), 80), "namespace PERMISSIVE");
    assert!(!plaintext_allowed(&model, by_name(&model, "bank", "ledger-2"), 9000));
}

// A node proxy gets workloads, services and L4 policies, never the waypoints' L7 resources.
#[test]
fn node_proxies_get_no_l7_resources() {
    let (resources, model) = directory();
    let served = snapshot(&model, &resources, "cluster.local");
    let received = received_by(&served, &node_proxy("n1"));
    assert_eq!(received[ADDRESS_TYPE_URL].len(), served[ADDRESS_TYPE_URL].len());
    assert_eq!(received[AUTHORIZATION_TYPE_URL].len(), served[AUTHORIZATION_TYPE_URL].len());
    assert!(received[L7_TYPE_URL].is_empty());
    let decoded = model_from_xds(&received, "cluster.local").expect("decodes");
    assert!(decoded.routing.virtual_services.is_empty() && decoded.security.request_authentications.is_empty());
}

// L7: the waypoint gets its namespace's VirtualService, DestinationRule, policy and JWT rules
// (not another namespace's DestinationRule) and routes and authorizes as from the directory.
#[test]
fn the_waypoint_routes_and_authorizes_the_same() {
    let (model, decoded, _) = rebuilt(&waypoint_proxy("shop", "waypoint"));
    let names: Vec<String> = decoded.routing.destination_rules.iter().map(|r| r.key()).collect();
    assert_eq!(names, ["shop/web"]);
    let host = "web.shop.svc.cluster.local";
    let json = |v: &dyn erased::Json| v.json();
    let (want_vs, got_vs) =
        (model.routing.mesh_routes_for(host).expect("vs"), decoded.routing.mesh_routes_for(host).expect("vs"));
    assert_eq!(json(got_vs.as_ref()), json(want_vs.as_ref()));
    assert_eq!(got_vs.origin, want_vs.origin, "diagnostics point at the user's file and line");
    let (want_dr, got_dr) = (
        model.routing.destination_rule_for(host).expect("dr"),
        decoded.routing.destination_rule_for(host).expect("dr"),
    );
    assert_eq!(json(got_dr.as_ref()), json(want_dr.as_ref()));

    let waypoint = WaypointName { namespace: "shop".into(), name: "waypoint".into() };
    let (want_svc, got_svc) =
        (model.service_by_host(host).map(Arc::as_ref), decoded.service_by_host(host).map(Arc::as_ref));
    let keys = |m: &Model, s| m.security.authorization_at_waypoint(s, &waypoint).map(|p| p.key()).collect::<Vec<_>>();
    assert_eq!(keys(&decoded, got_svc), keys(&model, want_svc));
    let authn =
        |m: &Model, s| m.security.request_authn_at_waypoint(s, &waypoint).map(|r| r.name.clone()).collect::<Vec<_>>();
    assert_eq!(authn(&decoded, got_svc), ["jwt"]);
    assert_eq!(authn(&decoded, got_svc), authn(&model, want_svc));
    for method in ["GET", "POST"] {
        let conn = Connection {
            source: Some(Identity::new("cluster.local", "shop", "client")),
            source_ip: "10.1.0.12".parse().expect("ip"),
            destination_ip: "10.96.0.10".parse().expect("ip"),
            destination_port: 80,
            http: Some(HttpRequest { method: method.into(), path: "/".into(), ..HttpRequest::default() }),
        };
        let want = evaluate(model.security.authorization_at_waypoint(want_svc, &waypoint), &conn);
        let got = evaluate(decoded.security.authorization_at_waypoint(got_svc, &waypoint), &conn);
        assert_eq!(got.allowed, want.allowed, "{method}");
        assert_eq!(got.allowed, method == "GET");
    }
}

// A waypoint of another namespace, and an unnamed subscriber, get none of shop's L7 resources;
// a waypoint named without its namespace uses the NAMESPACE metadata.
#[test]
fn l7_resources_go_only_where_relevant() {
    let (resources, model) = directory();
    let served = snapshot(&model, &resources, "cluster.local");
    let l7 = &served[L7_TYPE_URL];
    let names: Vec<&str> = l7.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "AuthorizationPolicy/shop/web-get-only",
            "DestinationRule/bank/ledger",
            "DestinationRule/shop/web",
            "RequestAuthentication/shop/jwt",
            "VirtualService/shop/web"
        ]
    );
    let count = |s: &Subscriber| l7.values().filter(|r| visible(s, L7_TYPE_URL, r)).count();
    assert_eq!(count(&waypoint_proxy("shop", "waypoint")), 4);
    assert_eq!(count(&waypoint_proxy("bank", "waypoint")), 0);
    assert_eq!(count(&Subscriber::default()), 0);
    let short = Subscriber {
        namespace: Some("shop".into()),
        metadata: HashMap::from([(WAYPOINT_METADATA.to_owned(), "waypoint".to_owned())]),
        ..Subscriber::default()
    };
    assert_eq!(subscriber_waypoint(&short), Some(WaypointName { namespace: "shop".into(), name: "waypoint".into() }));
    assert_eq!(count(&short), 4);
}

/// Serializes compiled routing for comparison (origins are left out by the model's serde).
mod erased {
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).expect("serializes")
        }
    }
}

// L4-3, CFG-2: a Service without a selector, backed by an EndpointSlice (a pod by targetRef,
// an address that is no pod), reaches a node proxy with the same endpoints and workloads.
#[test]
fn endpoint_slice_endpoints_survive_the_round_trip() {
    let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop}
spec: {nodeName: n1, serviceAccountName: db}
status: {podIP: 10.1.0.5}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: 10.96.0.20, ports: [{name: sql, port: 5432}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: sql, port: 15432}]
endpoints:
- addresses: [10.1.0.5]
  targetRef: {kind: Pod, name: db-0}
- addresses: [192.0.2.10]
"#;
    let (resources, model) = directory_from(yaml);
    let served = snapshot(&model, &resources, "cluster.local");
    let decoded = model_from_xds(&received_by(&served, &node_proxy("n2")), "cluster.local").expect("decodes");
    let endpoints = |m: &Model| -> BTreeSet<String> {
        let service = m.service_by_vip("10.96.0.20".parse().expect("ip")).expect("db");
        service.ports[0].endpoints.iter().map(|e| format!("{}={}", e.workload.display_name(), e.addr())).collect()
    };
    let want = BTreeSet::from([
        "shop/db-0=10.1.0.5:15432".to_owned(),
        "shop/endpointslice/192.0.2.10=192.0.2.10:15432".to_owned(),
    ]);
    assert_eq!(endpoints(&model), want);
    assert_eq!(endpoints(&decoded), want);
    for w in &model.workloads {
        assert_eq!(**by_name(&decoded, &w.namespace, &w.name), **w, "{}", w.display_name());
    }
}

// GW-3, CFG-2: ServiceEntry hosts reach a node proxy whole: VIPs and CIDR blocks, location,
// resolution, DNS names with their target ports, STATIC endpoints as workloads.
#[test]
fn service_entries_survive_the_round_trip() {
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
  addresses: [240.0.0.10, 240.0.0.11, 240.1.0.0/16]
  ports: [{number: 5432, name: tcp, protocol: TCP, targetPort: 15432}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{address: 192.0.2.20}, {address: 192.0.2.21, ports: {tcp: 25432}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https, protocol: HTTPS, targetPort: 8443}]
  resolution: DNS
  endpoints: [{address: eu.api.example.com}, {address: us.api.example.com, ports: {https: 9443}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: shop}
spec:
  hosts: ["*.example.org"]
  ports: [{number: 9000, name: tcp}]
"#;
    let (resources, model) = directory_from(yaml);
    let served = snapshot(&model, &resources, "cluster.local");
    let decoded = model_from_xds(&received_by(&served, &node_proxy("n1")), "cluster.local").expect("decodes");
    for host in ["db.example.com", "api.example.com", "*.example.org"] {
        let (s, d) = (model.service_by_host(host).expect(host), decoded.service_by_host(host).expect(host));
        assert_eq!((&d.entry, d.vip), (&s.entry, s.vip), "{host}");
        let endpoints = |s: &Service| -> Vec<String> {
            s.ports
                .iter()
                .flat_map(|p| &p.endpoints)
                .map(|e| format!("{}={}", e.workload.display_name(), e.addr()))
                .collect()
        };
        assert_eq!(endpoints(d), endpoints(s), "{host}");
    }
    for ip in ["240.0.0.11", "240.1.2.3", "192.0.2.21"] {
        let ip: IpAddr = ip.parse().expect("ip");
        let known = decoded.service_by_address(ip).or_else(|| decoded.service_by_endpoint(ip));
        assert_eq!(known.map(|s| s.hostname.as_str()), Some("db.example.com"), "{ip}");
    }
    assert_eq!(decoded.service_by_port(9000).map(|s| s.hostname.as_str()), Some("*.example.org"));
    assert_eq!(decoded.dns_names(), model.dns_names());
}

// GW-3, L4-5, CFG-3: node proxies get the `mesh` VirtualService of a ServiceEntry host no
// waypoint serves, the DestinationRule of its destination's subset (seed 002's two-hop route)
// and the mesh's REGISTRY_ONLY, and decide as from the directory; routes of mesh services stay
// the waypoints'.
#[test]
fn mesh_routes_of_service_entry_hosts_reach_node_proxies() {
    let yaml = r#"
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
spec: {nodeName: n2, serviceAccountName: istio-egressgateway}
status: {podIP: 10.2.0.30}
---
apiVersion: v1
kind: Service
metadata: {name: istio-egressgateway, namespace: istio-system}
spec:
  clusterIP: 10.96.0.80
  selector: {istio: egressgateway}
  ports: [{name: http2, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: akv2k8s-test}
spec: {clusterIP: 10.96.0.81, selector: {app: sleep}, ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cnn, namespace: akv2k8s-test}
spec:
  hosts: [edition.cnn.com]
  ports: [{number: 80, name: http-port, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: egressgateway-for-cnn, namespace: akv2k8s-test}
spec:
  host: istio-egressgateway.istio-system.svc.cluster.local
  subsets: [{name: cnn}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: direct-cnn-through-egress-gateway, namespace: akv2k8s-test}
spec:
  hosts: [edition.cnn.com]
  gateways: [istio-egressgateway, mesh]
  http:
  - match: [{gateways: [mesh], port: 80}]
    route: [{destination: {host: istio-egressgateway.istio-system.svc.cluster.local, subset: cnn, port: {number: 80}}}]
  - match: [{gateways: [istio-egressgateway], port: 80}]
    route: [{destination: {host: edition.cnn.com, port: {number: 80}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: akv2k8s-test}
spec:
  hosts: [web]
  http: [{route: [{destination: {host: web}}], timeout: 1s}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |-
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
"#;
    use crate::model::egress_routes::{Connection, Landing, MeshL4, route_at_l4};
    let (resources, model) = directory_from(yaml);
    let served = snapshot(&model, &resources, "cluster.local");
    let received = received_by(&served, &node_proxy("n1"));
    let names: Vec<&str> = received[L7_TYPE_URL].keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "ConfigMap/istio-system/istio",
            "DestinationRule/akv2k8s-test/egressgateway-for-cnn",
            "VirtualService/akv2k8s-test/direct-cnn-through-egress-gateway"
        ]
    );
    assert!(received_by(&served, &waypoint_proxy("akv2k8s-test", "waypoint"))[L7_TYPE_URL].is_empty());
    assert!(received_by(&served, &Subscriber::default())[L7_TYPE_URL].is_empty(), "only node proxies");
    let decoded = model_from_xds(&received, "cluster.local").expect("decodes");
    assert_eq!(decoded.outbound_mode, crate::config::OutboundMode::RegistryOnly);
    for m in [&model, &decoded] {
        let sleep = m.workload_by_ip("10.1.0.10".parse().expect("ip")).cloned();
        let conn = Connection {
            port: 80,
            destination: "203.0.113.7".parse().expect("ip"),
            source: sleep.as_deref(),
            sni: None,
        };
        match route_at_l4(m, "edition.cnn.com", &conn) {
            MeshL4::Redirect { service, to: Landing::Endpoint(endpoint) } => {
                assert_eq!(service.hostname, "istio-egressgateway.istio-system.svc.cluster.local");
                assert_eq!(endpoint.addr(), SocketAddr::from(([10, 2, 0, 30], 8080)));
                assert!(endpoint.workload.reached_over_hbone(), "the gateway's pod terminates HBONE");
            }
            other => panic!("{other:?}"),
        }
    }
}

/// A gateway's subscriber, as `strait gateway` names itself.
fn gateway_proxy(namespace: &str, name: &str) -> Subscriber {
    let metadata = HashMap::from([(GATEWAY_METADATA.to_owned(), format!("{namespace}/{name}"))]);
    Subscriber { id: format!("router~10.1.0.30~{name}.{namespace}"), metadata, ..Subscriber::default() }
}

// L4-5, GW-1, GW-3, CFG-2: over xDS a node proxy gets the mesh config (REGISTRY_ONLY) and the
// routes of ServiceEntry hosts with the DestinationRules they send to, and nothing else of L7; a
// gateway gets every L7 resource and the Istio Gateways, and builds the same gateways as from the
// directory; a waypoint gets no Istio Gateway and no mesh config.
#[test]
fn mesh_config_entry_routes_and_gateways_go_where_they_are_used() {
    let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |-
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
---
apiVersion: v1
kind: Service
metadata: {name: istio-egressgateway, namespace: istio-system}
spec:
  clusterIP: 10.96.9.9
  selector: {istio: egressgateway}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cnn, namespace: shop}
spec:
  hosts: [edition.cnn.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: egress, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [edition.cnn.com]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: egress-for-cnn, namespace: shop}
spec:
  host: istio-egressgateway.istio-system.svc.cluster.local
  subsets: [{name: cnn}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: unrelated, namespace: shop}
spec:
  host: reviews.shop.svc.cluster.local
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: cnn, namespace: shop}
spec:
  hosts: [edition.cnn.com]
  gateways: [istio-system/egress, mesh]
  http:
  - match: [{gateways: [mesh], port: 80}]
    route: [{destination: {host: istio-egressgateway.istio-system.svc.cluster.local, subset: cnn, port: {number: 80}}}]
  - match: [{gateways: [istio-system/egress], port: 80}]
    route: [{destination: {host: edition.cnn.com, port: {number: 80}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  http: [{route: [{destination: {host: reviews.shop.svc.cluster.local}}]}]
"#;
    let (resources, model) = directory_from(yaml);
    assert_eq!(model.outbound_mode, crate::config::OutboundMode::RegistryOnly);
    assert_eq!(model.gateways.len(), 1);
    let served = snapshot(&model, &resources, "cluster.local");
    let names = |received: &Received| -> BTreeSet<String> { received[L7_TYPE_URL].keys().cloned().collect() };

    let node = received_by(&served, &node_proxy("n1"));
    let expected = ["ConfigMap/istio-system/istio", "DestinationRule/shop/egress-for-cnn", "VirtualService/shop/cnn"];
    assert_eq!(names(&node), expected.iter().map(|s| s.to_string()).collect());
    let decoded = model_from_xds(&node, "cluster.local").expect("decodes");
    assert_eq!(decoded.outbound_mode, crate::config::OutboundMode::RegistryOnly);
    let routes: Vec<&str> = decoded.routing.virtual_services.iter().map(|vs| vs.name.as_str()).collect();
    assert_eq!(routes, ["cnn"], "the routes of the entry's host");

    let gateway = received_by(&served, &gateway_proxy("istio-system", "egressgateway"));
    assert_eq!(gateway[L7_TYPE_URL].len(), served[L7_TYPE_URL].len(), "a gateway gets every L7 resource");
    let decoded = model_from_xds(&gateway, "cluster.local").expect("decodes");
    assert_eq!(decoded.gateways.len(), 1);
    assert_eq!(format!("{:?}", decoded.gateways[0]), format!("{:?}", model.gateways[0]));

    let waypoint = received_by(&served, &waypoint_proxy("shop", "waypoint"));
    assert!(
        names(&waypoint).iter().all(|n| !n.starts_with("networking.istio.io/Gateway/") && !n.starts_with("ConfigMap/"))
    );
}
