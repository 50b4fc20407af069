//! End to end: `strait gateway` as an ingress gateway (SPEC GW-1, GW-2, GW-4): real sockets
//! across network namespaces, real TLS, real curl. The gateway runs in its own pod, clients
//! and our own servers (standing in for httpbin and Bookinfo's productpage) in others. Needs
//! root.

mod common;

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{TIMEOUT, make_ca, make_leaf, start_ingress_gateway};
use strait_testbed::{EchoKind, Pod, Topology, k8s};

/// Istio's `samples/bookinfo/networking/bookinfo-gateway.yaml`, verbatim.
const BOOKINFO_GATEWAY: &str = r#"apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata:
  name: bookinfo-gateway
spec:
  # The selector matches the ingress gateway pod labels.
  # If you installed Istio using Helm following the standard documentation, this would be "istio=ingress"
  selector:
    istio: ingressgateway # use istio default controller
  servers:
  - port:
      number: 8080
      name: http
      protocol: HTTP
    hosts:
    - "*"
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: bookinfo
spec:
  hosts:
  - "*"
  gateways:
  - bookinfo-gateway
  http:
  - match:
    - uri:
        exact: /productpage
    - uri:
        prefix: /static
    - uri:
        exact: /login
    - uri:
        exact: /logout
    - uri:
        prefix: /api/v1/products
    route:
    - destination:
        host: productpage
        port:
          number: 9080
"#;

/// A plain (not enrolled) namespace with one backend pod and its service.
fn backend_config(ns: &str, pod: &Pod, service: &str, vip: &str, port: u16) -> String {
    [
        k8s::namespace_yaml(ns, &[]),
        k8s::pod_yaml(pod, ns, service, &[("app", service)]),
        k8s::named_service_yaml(service, ns, vip, &[("http", port, port)], &[("app", service)], &[]),
    ]
    .concat()
}

// GW-4, CFG: Istio's bookinfo-gateway.yaml loads without a warning and routes its paths to a
// stand-in productpage; other paths get 404 from the gateway.
#[test]
fn bookinfo_gateway_sample_verbatim() -> io::Result<()> {
    let topo = Topology::new("gwin::bookinfo")?;
    let node = topo.add_node("node1")?;
    let (gw_pod, client, productpage) =
        (topo.add_pod(&node, "ingress")?, topo.add_pod(&node, "client")?, topo.add_pod(&node, "productpage")?);
    let config =
        backend_config("default", &productpage, "productpage", "10.96.0.40", 9080) + "---\n" + BOOKINFO_GATEWAY;
    topo.write_config("c.yaml", &config)?;
    let _server = productpage.echo_server(EchoKind::Http, 9080).name("productpage").start()?;
    let gw = start_ingress_gateway(&topo, &gw_pod, &["--port-map", "8080=18080"])?;
    let base = format!("http://{}:18080", gw_pod.ip());

    for path in ["/productpage", "/static/x.css", "/login", "/logout", "/api/v1/products/1"] {
        let r = client.curl(&format!("{base}{path}"), TIMEOUT)?;
        assert_eq!(r.status, 200, "{path}: {r:?}\n{}", gw.log_tail());
        assert!(r.body.contains("hello from productpage"), "{path}: {r:?}");
    }
    let r = client.curl(&format!("{base}/reviews"), TIMEOUT)?;
    assert_eq!(r.status, 404, "{r:?}");
    let log = gw.log();
    assert!(!log.lines().any(|l| l.contains("WARN") && l.contains(".yaml")), "{log}");
    Ok(())
}

// GW-1, GW-4 (seeds 003/004, 001): httpbin by Host through the ingress: /status/200 is routed,
// /headers is not (404), a wrong Host is 404; the "*" host variant takes any Host; one host,
// two paths rewritten to two services.
#[test]
fn http_host_and_path_routing() -> io::Result<()> {
    let topo = Topology::new("gwin::http")?;
    let node = topo.add_node("node1")?;
    let (gw_pod, client) = (topo.add_pod(&node, "ingress")?, topo.add_pod(&node, "client")?);
    let (httpbin, nginx) = (topo.add_pod(&node, "httpbin")?, topo.add_pod(&node, "nginx")?);
    let istio = r#"
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {name: httpbin-gateway, namespace: web}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["httpbin.example.com", "simple.baihl.io"]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: httpbin, namespace: web}
spec:
  hosts: ["httpbin.example.com"]
  gateways: [httpbin-gateway]
  http:
  - match: [{uri: {prefix: /status}}, {uri: {prefix: /delay}}]
    route: [{destination: {host: httpbin, port: {number: 8000}}}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: simple, namespace: web}
spec:
  gateways: [httpbin-gateway]
  hosts: [simple.baihl.io]
  http:
  - match: [{uri: {exact: /simple/httpserver}}]
    rewrite: {uri: /hello}
    route: [{destination: {host: httpbin.web.svc.cluster.local, port: {number: 8000}}}]
  - match: [{uri: {prefix: /simple/nginx}}]
    rewrite: {uri: /}
    route: [{destination: {host: nginx.web.svc.cluster.local, port: {number: 80}}}]
"#;
    let config = [
        backend_config("web", &httpbin, "httpbin", "10.96.0.41", 8000),
        k8s::pod_yaml(&nginx, "web", "nginx", &[("app", "nginx")]),
        k8s::named_service_yaml("nginx", "web", "10.96.0.42", &[("http", 80, 80)], &[("app", "nginx")], &[]),
        "---\n".to_owned(),
        istio.to_owned(),
    ]
    .concat();
    topo.write_config("c.yaml", &config)?;
    let _s1 = httpbin.echo_server(EchoKind::Http, 8000).name("httpbin").start()?;
    let _s2 = nginx.echo_server(EchoKind::Http, 80).name("nginx").start()?;
    let gw = start_ingress_gateway(&topo, &gw_pod, &["--port-map", "80=18081"])?;
    let base = format!("http://{}:18081", gw_pod.ip());
    let get = |host: &str, path: &str| client.curl_args(&["-H", &format!("Host: {host}"), &format!("{base}{path}")]);

    assert_eq!(get("httpbin.example.com", "/status/200")?.status, 200);
    assert_eq!(get("httpbin.example.com", "/status/418")?.status, 418);
    assert_eq!(get("httpbin.example.com", "/headers")?.status, 404);
    assert_eq!(get("other.example.com", "/status/200")?.status, 404);
    // Seed 001: one host, two paths, each rewritten.
    let r = get("simple.baihl.io", "/simple/httpserver")?;
    assert!(r.status == 200 && r.body.contains("hello from httpbin") && r.body.contains("path=/hello"), "{r:?}");
    let r = get("simple.baihl.io", "/simple/nginx")?;
    assert!(r.status == 200 && r.body.contains("hello from nginx"), "{r:?}");
    // The access line says which route took the request.
    common::wait_log_line(&gw, &["path=\"/headers\"", "flags=NR"])?;
    let log = gw.log();
    assert!(log.lines().any(|l| l.contains("route=web/httpbin") && l.contains("status=418")), "{log}");
    assert!(log.lines().any(|l| l.contains("path=\"/headers\"") && l.contains("flags=NR")), "{log}");

    // The "*" variant of the seed: any Host.
    let star = istio
        .replace("[\"httpbin.example.com\", \"simple.baihl.io\"]", "[\"*\"]")
        .replace("hosts: [\"httpbin.example.com\"]", "hosts: [\"*\"]");
    topo.write_config("c.yaml", &config.replace(istio, &star))?;
    let deadline = Instant::now() + TIMEOUT;
    while get("anything.example.org", "/status/200")?.status != 200 {
        assert!(Instant::now() < deadline, "the \"*\" host never took effect:\n{}", gw.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get("anything.example.org", "/headers")?.status, 404);
    Ok(())
}

fn serial_of(cert_pem_path: &Path) -> io::Result<String> {
    let out = Command::new("openssl").args(["x509", "-noout", "-serial", "-in"]).arg(cert_pem_path).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

// GW-1, GW-2 (seed 003/004 HTTPS): two hosts on 443 with their own certificates and modes chosen
// by SNI: SIMPLE answers 418 over HTTP/2 to curl --cacert; MUTUAL refuses a client without a
// certificate and serves one with; a certificate rotated on disk is used by new handshakes
// within 2 s while a connection opened before keeps working.
#[test]
fn https_simple_mutual_and_rotation() -> io::Result<()> {
    let topo = Topology::new("gwin::https")?;
    let node = topo.add_node("node1")?;
    let (gw_pod, client, httpbin) =
        (topo.add_pod(&node, "ingress")?, topo.add_pod(&node, "client")?, topo.add_pod(&node, "httpbin")?);
    let pki: PathBuf = topo.dir().join("pki");
    let creds = topo.dir().join("credentials");
    fs::create_dir_all(&pki)?;
    make_ca(&pki, "ca")?;
    make_leaf(&pki, "ca", "httpbin.example.com", &creds.join("httpbin-credential"))?;
    make_leaf(&pki, "ca", "secure.example.com", &creds.join("secure-credential"))?;
    fs::create_dir_all(creds.join("secure-credential-cacert"))?;
    fs::copy(pki.join("ca.crt"), creds.join("secure-credential-cacert").join("ca.crt"))?;
    make_leaf(&pki, "ca", "client.example.com", &pki.join("client"))?;
    let istio = r#"
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: tls-gateway, namespace: web}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [httpbin.example.com]
    tls: {mode: SIMPLE, credentialName: httpbin-credential}
  - port: {number: 443, name: https-secure, protocol: HTTPS}
    hosts: [secure.example.com]
    tls: {mode: MUTUAL, credentialName: secure-credential}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: web}
spec:
  hosts: [httpbin.example.com, secure.example.com]
  gateways: [tls-gateway]
  http: [{route: [{destination: {host: httpbin, port: {number: 8000}}}]}]
"#;
    topo.write_config("c.yaml", &(backend_config("web", &httpbin, "httpbin", "10.96.0.43", 8000) + istio))?;
    let _s = httpbin.echo_server(EchoKind::Http, 8000).name("httpbin").start()?;
    let creds_arg = creds.to_string_lossy().into_owned();
    let gw = start_ingress_gateway(&topo, &gw_pod, &["--port-map", "443=18443", "--credentials", &creds_arg])?;
    let ip = gw_pod.ip();
    let cacert = pki.join("ca.crt").to_string_lossy().into_owned();
    let https = |host: &str, extra: &[&str]| {
        let resolve = format!("{host}:18443:{ip}");
        let url = format!("https://{host}:18443/status/418");
        let mut args = vec!["--resolve", &resolve, "--cacert", &cacert];
        args.extend_from_slice(extra);
        args.push(&url);
        client.curl_args(&args)
    };

    let r = https("httpbin.example.com", &["--http2"])?;
    assert_eq!(r.status, 418, "{r:?}\n{}", gw.log_tail());
    let r = client.run_ok(
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version}",
            "--resolve",
            &format!("httpbin.example.com:18443:{ip}"),
            "--cacert",
            &cacert,
            "https://httpbin.example.com:18443/status/200",
        ],
    )?;
    assert_eq!(r.trim(), "2", "ALPN h2");

    let no_cert = https("secure.example.com", &[])?;
    assert_eq!(no_cert.status, 0, "a MUTUAL server must refuse a client without a certificate: {no_cert:?}");
    let (cert, key) = (pki.join("client/tls.crt"), pki.join("client/tls.key"));
    let with_cert = https("secure.example.com", &["--cert", &cert.to_string_lossy(), "--key", &key.to_string_lossy()])?;
    assert_eq!(with_cert.status, 418, "{with_cert:?}");

    // Rotation: a connection held open before keeps working after the certificate changes;
    // new handshakes see the new certificate within 2 s.
    let held = client.spawn(
        "held",
        "sh",
        &["-c", &format!(
            "curl -sS --resolve httpbin.example.com:18443:{ip} --cacert {cacert} -o /dev/null -w '%{{http_code}}\\n' \
             https://httpbin.example.com:18443/delay/3000 https://httpbin.example.com:18443/status/200"
        )],
        &[],
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let old_serial = serial_of(&creds.join("httpbin-credential/tls.crt"))?;
    make_leaf(&pki, "ca", "httpbin.example.com", &creds.join("httpbin-credential"))?;
    let new_serial = serial_of(&creds.join("httpbin-credential/tls.crt"))?;
    assert_ne!(old_serial, new_serial);
    let rotated = Instant::now();
    let new_hex = new_serial.trim_start_matches("serial=").to_ascii_lowercase();
    loop {
        let seen = client.run_ok(
            "sh",
            &["-c", &format!(
                "echo | openssl s_client -connect {ip}:18443 -servername httpbin.example.com 2>/dev/null | openssl x509 -noout -serial"
            )],
        )?;
        if seen.to_ascii_lowercase().contains(&new_hex) {
            break;
        }
        assert!(rotated.elapsed() < Duration::from_secs(2), "new certificate not served 2 s after rotation: {seen}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = held.wait_exit(Duration::from_secs(10));
    let log = held.log();
    assert_eq!(log.lines().filter(|l| l.trim() == "200").count(), 2, "the held connection's requests: {log}");
    Ok(())
}
