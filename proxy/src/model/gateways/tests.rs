use std::collections::BTreeMap;

use super::*;
use crate::{config::parse_file, model::compile};

const SERVICES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: web}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: web}
spec: {clusterIP: 10.96.0.20, ports: [{port: 8000}]}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: web}
spec: {clusterIP: 10.96.0.21, ports: [{port: 80}]}
"#;

fn model_of(yaml: &str) -> (Model, Vec<String>) {
    let text = format!("{SERVICES}---\n{yaml}");
    let (resources, diagnostics) = parse_file(std::path::Path::new("gw.yaml"), &text);
    assert!(diagnostics.is_empty(), "{diagnostics:?}");
    let (model, diagnostics) = compile(&resources);
    assert!(!diagnostics.iter().any(Diagnostic::is_error), "{diagnostics:?}");
    (model, diagnostics.iter().map(ToString::to_string).collect())
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

const INGRESS: &str = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ingress, namespace: web}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*.example.com", "exact.example.com"]
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [a.example.com]
    tls: {mode: SIMPLE, credentialName: a}
  - port: {number: 443, name: https-b, protocol: HTTPS}
    hosts: ["*.example.com"]
    tls: {mode: MUTUAL, credentialName: b}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: wild, namespace: web}
spec:
  hosts: ["*.example.com"]
  gateways: [ingress]
  http: [{route: [{destination: {host: other}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: exact, namespace: web}
spec:
  hosts: [exact.example.com]
  gateways: [web/ingress, mesh]
  http: [{match: [{uri: {prefix: /status}, gateways: [web/ingress]}], route: [{destination: {host: httpbin}}]}]
"#;

// GW-1: Gateways are served by the gateways whose labels their selector matches; the most
// specific VirtualService host comes first.
#[test]
fn view_selects_by_labels_and_orders_hosts() {
    let (model, warnings) = model_of(INGRESS);
    assert!(warnings.is_empty(), "{warnings:?}");
    let other = GatewayView::build(&model, &labels(&[("istio", "egressgateway")]));
    assert!(other.ports.is_empty());
    let view = GatewayView::build(&model, &labels(&[("istio", "ingressgateway"), ("app", "x")]));
    assert_eq!(view.ports.keys().copied().collect::<Vec<_>>(), [80, 443]);
    assert_eq!(view.ports[&443].kind, PortKind::Tls);
    let names =
        |host| view.http_candidates(80, host, None).iter().map(|c| c.virtual_service.name.clone()).collect::<Vec<_>>();
    assert_eq!(names("exact.example.com"), ["exact", "wild"]);
    assert_eq!(names("b.example.com"), ["wild"]);
    assert!(names("example.org").is_empty());
    assert!(view.http_candidates(81, "exact.example.com", None).is_empty());
    assert_eq!(view.http_candidates(80, "b.example.com", None)[0].gateway, "web/ingress");
}

// GW-2: several servers on one port: the certificate and mode are chosen by SNI, the most
// specific host winning.
#[test]
fn tls_server_by_sni() {
    let (model, _) = model_of(INGRESS);
    let view = GatewayView::build(&model, &labels(&[("istio", "ingressgateway")]));
    let mode = |sni| view.tls_server(443, sni).and_then(|s| s.server().tls.as_ref()).map(|t| t.mode);
    assert_eq!(mode(Some("a.example.com")), Some(ServerTlsMode::Simple));
    assert_eq!(mode(Some("z.example.com")), Some(ServerTlsMode::Mutual));
    assert_eq!(mode(Some("example.org")), None);
    assert_eq!(mode(None), None);
}

// GW-2: on a connection whose TLS a server terminated, only that server's VirtualServices route:
// the SIMPLE server of a.example.com cannot be used to reach hosts of the MUTUAL one.
#[test]
fn sni_server_bounds_http_candidates() {
    let (model, _) = model_of(INGRESS);
    let view = GatewayView::build(&model, &labels(&[("istio", "ingressgateway")]));
    let simple = view.tls_server(443, Some("a.example.com")).map(BoundServer::id).expect("simple server");
    let mutual = view.tls_server(443, Some("z.example.com")).map(BoundServer::id).expect("mutual server");
    let names = |host, only| {
        view.http_candidates(443, host, only).iter().map(|c| c.virtual_service.name.clone()).collect::<Vec<_>>()
    };
    assert_eq!(names("z.example.com", None), ["wild"], "any server of the port");
    assert!(names("z.example.com", Some(&simple)).is_empty(), "not through the SIMPLE server");
    assert_eq!(names("a.example.com", Some(&simple)), ["wild"]);
    assert_eq!(names("z.example.com", Some(&mutual)), ["wild"]);
    let gone = ServerId { gateway: "web/removed".into(), index: 0 };
    assert!(names("a.example.com", Some(&gone)).is_empty(), "a server no longer served routes nothing");
}

// GW-1: what Istio would reject or ignore is reported, naming the resource and field.
#[test]
fn warns_about_bindings_and_conflicts() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: g, namespace: web}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["other/a.example.com"]
  - port: {number: 80, name: http2, protocol: HTTP}
    hosts: ["other/a.example.com"]
  - port: {number: 80, name: tls, protocol: TLS}
    hosts: ["other/*"]
    tls: {mode: PASSTHROUGH}
  - port: {number: 15443, name: tls-east-west, protocol: TLS}
    hosts: ["*.local"]
    tls: {mode: AUTO_PASSTHROUGH}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: web}
spec:
  hosts: [a.example.com]
  gateways: [g, missing]
  http: [{route: [{destination: {host: httpbin}}]}]
"#;
    let (model, warnings) = model_of(yaml);
    let expect = [
        ("spec.servers[1]", "already served by web/g"),
        ("spec.servers[2]", "already served as Http"),
        ("spec.servers[3].tls.mode", "AUTO_PASSTHROUGH"),
        ("spec.gateways[0]", "no server of Gateway web/g"),
        ("spec.gateways[1]", "Gateway web/missing does not exist"),
    ];
    assert_eq!(warnings.len(), expect.len(), "{warnings:#?}");
    for (field, text) in expect {
        assert!(warnings.iter().any(|w| w.contains(field) && w.contains(text)), "{field} {text}: {warnings:#?}");
    }
    // The VirtualService of another namespace's host is not bound.
    let view = GatewayView::build(&model, &labels(&[("istio", "ingressgateway")]));
    assert!(view.http_candidates(80, "a.example.com", None).is_empty());
}

// GW-1: passthrough routes by `sniHosts`, TCP servers by `tcp[]`, each honouring
// `match.gateways` and `match.port`.
#[test]
fn tls_and_tcp_routes() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: g, namespace: web}
spec:
  servers:
  - port: {number: 443, name: tls, protocol: TLS}
    hosts: ["*.example.com"]
    tls: {mode: PASSTHROUGH}
  - port: {number: 31400, name: tcp, protocol: TCP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: web}
spec:
  hosts: ["*.example.com"]
  gateways: [g]
  tls:
  - match: [{sniHosts: [a.example.com], port: 443}]
    route: [{destination: {host: httpbin}}]
  - match: [{sniHosts: ["*.example.com"], gateways: [web/other]}]
    route: [{destination: {host: other}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp, namespace: web}
spec:
  hosts: ["*"]
  gateways: [g]
  tcp: [{match: [{port: 31400}], route: [{destination: {host: other, port: {number: 80}}}]}]
"#;
    let (model, warnings) = model_of(yaml);
    assert!(warnings.is_empty(), "{warnings:?}");
    let view = GatewayView::build(&model, &BTreeMap::new());
    let server = view.tls_server(443, Some("a.example.com")).expect("server");
    assert_eq!(
        view.tls_route(server, 443, "a.example.com").map(|(vs, i)| (vs.name.clone(), i)),
        Some(("vs".into(), 0))
    );
    let server = view.tls_server(443, Some("b.example.com")).expect("server");
    assert!(view.tls_route(server, 443, "b.example.com").is_none());
    assert_eq!(
        view.tcp_route(31400).map(|(g, vs, i)| (g, vs.name.clone(), i)),
        Some(("web/g".into(), "tcp".into(), 0))
    );
    assert!(view.tcp_route(443).is_none());
}

// The HBONE contract with node proxies: a pod labelled as a strait gateway is never captured
// and is reached over HBONE.
#[test]
fn gateway_pods_speak_hbone() {
    let yaml = r#"
apiVersion: v1
kind: Pod
metadata: {name: ingress-1, namespace: web, labels: {istio: ingressgateway, strait.io/gateway: "true", istio.io/dataplane-mode: ambient}}
spec: {nodeName: n1}
status: {podIP: 10.1.0.9}
"#;
    let (model, _) = model_of(yaml);
    let pod = model.workloads.iter().find(|w| w.name == "ingress-1").expect("pod");
    assert!(!pod.captured);
    assert!(pod.reached_over_hbone());
}

// GW-1: `tls.httpsRedirect` on an HTTP server redirects the hosts it names most specifically;
// a more specific server without it, another port, or a TLS port do not.
#[test]
fn https_redirect_by_most_specific_server() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: redirect, namespace: web}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*.example.com"]
    tls: {httpsRedirect: true}
  - port: {number: 80, name: http-plain, protocol: HTTP}
    hosts: [plain.example.com]
  - port: {number: 8080, name: http-alt, protocol: HTTP}
    hosts: ["*"]
"#;
    let (model, _) = model_of(yaml);
    let view = GatewayView::build(&model, &labels(&[("istio", "ingressgateway")]));
    assert!(view.redirects_to_https(80, "shop.example.com"));
    assert!(!view.redirects_to_https(80, "plain.example.com"), "the exact server has no redirect");
    assert!(!view.redirects_to_https(80, "example.org"), "no server names it");
    assert!(!view.redirects_to_https(8080, "shop.example.com"));
    assert!(!view.redirects_to_https(443, "shop.example.com"));
}
