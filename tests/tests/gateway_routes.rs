//! End to end: what `strait gateway` routes besides HTTP by Host (SPEC GW-1, GW-4, L7-8): TLS
//! PASSTHROUGH by SNI to backends that terminate TLS themselves, TCP listeners, mesh backends
//! reached over HBONE as the gateway's own identity beside plain pods, Istio's "ingress gateway
//! as a proxy to external services" (seed 000) with our own servers standing in for httpbin.org
//! and edition.cnn.com, and wildcard server hosts. Real sockets across network namespaces, real
//! TLS, real curl. Needs root.

mod common;

use std::{
    fs, io,
    path::PathBuf,
    time::{Duration, Instant},
};

use common::{TIMEOUT, ca_dir, start_ingress_gateway, start_node, wait_access_line};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use strait_testbed::{CurlResult, EchoKind, Pod, Process, Topology, UnderlayCapture, bin_path, k8s, pcap};

/// Warnings about configuration files in a proxy's log (a document that loads cleanly has none).
fn config_warnings(proxy: &Process) -> Vec<String> {
    proxy.log().lines().filter(|l| l.contains("WARN") && l.contains(".yaml")).map(str::to_owned).collect()
}

/// The gateway's connection lines (`gateway tcp ...`: passthrough and TCP) with all `needles`.
fn gateway_line(gw: &Process, needles: &[&str]) -> io::Result<String> {
    let mut all = vec!["gateway tcp"];
    all.extend_from_slice(needles);
    wait_access_line(gw, &all, TIMEOUT)
}

/// Waits for a request line of the gateway (`source http ...`) with all `needles`.
fn request_line(gw: &Process, needles: &[&str]) -> io::Result<String> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let log = gw.log();
        if let Some(line) = log.lines().find(|l| l.contains(" source http ") && needles.iter().all(|n| l.contains(n))) {
            return Ok(line.to_owned());
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "no request line with {needles:?}; log ends with:\n{}",
                gw.log_tail()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Test certificates made with rcgen: a CA and leaves it signs, in the topology's directory.
struct Pki {
    dir: PathBuf,
    ca: Issuer<'static, KeyPair>,
}

impl Pki {
    /// A CA with common name `ca_name`, written to `<dir>/ca.pem`.
    fn new(topo: &Topology, dir_name: &str, ca_name: &str) -> io::Result<Pki> {
        let dir = topo.dir().join(dir_name);
        fs::create_dir_all(&dir)?;
        let key = KeyPair::generate().map_err(io::Error::other)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(io::Error::other)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, ca_name);
        let cert = params.self_signed(&key).map_err(io::Error::other)?;
        fs::write(dir.join("ca.pem"), cert.pem())?;
        Ok(Pki { dir, ca: Issuer::new(params, key) })
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// `<name>.pem` and `<name>-key.pem`: a certificate for `hosts` (the first is its common
    /// name) signed by the CA.
    fn leaf(&self, name: &str, hosts: &[&str]) -> io::Result<()> {
        let key = KeyPair::generate().map_err(io::Error::other)?;
        let names: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
        let mut params = CertificateParams::new(names).map_err(io::Error::other)?;
        params.distinguished_name.push(DnType::CommonName, hosts[0]);
        let cert = params.signed_by(&key, &self.ca).map_err(io::Error::other)?;
        fs::write(self.dir.join(format!("{name}-key.pem")), key.serialize_pem())?;
        fs::write(self.dir.join(format!("{name}.pem")), cert.pem())
    }
}

/// `strait-echo https PORT` in `pod` with the certificate `<cert>.pem` of `pki`, answering
/// `hello from <name> sni=... path=...`.
fn start_https(pod: &Pod, pki: &Pki, cert: &str, name: &str, port: u16) -> io::Result<Process> {
    let (crt, key, port) = (pki.path(&format!("{cert}.pem")), pki.path(&format!("{cert}-key.pem")), port.to_string());
    let server = pod.spawn(
        &format!("https-{name}"),
        bin_path("strait-echo"),
        &["https", &port, "--cert", &crt, "--key", &key, "--name", name],
        &[],
    )?;
    server.wait_for_log("listening on", TIMEOUT)?;
    Ok(server)
}

/// `curl -v https://<host>:<port><path>` from `client`, resolving `host` to `ip` and trusting
/// `cacert`: curl's `-v` output (in `stderr`) names the certificate the client saw.
fn curl_tls(client: &Pod, host: &str, ip: impl std::fmt::Display, port: u16, path: &str, cacert: &str) -> CurlResult {
    let resolve = format!("{host}:{port}:{ip}");
    let url = format!("https://{host}:{port}{path}");
    client.curl_args(&["-v", "--max-time", "5", "--resolve", &resolve, "--cacert", cacert, &url]).expect("curl runs")
}

/// What `openssl s_client` reports for a handshake with `sni` at `target`: with nothing routed,
/// the gateway closes without a byte (`SSL handshake has read 0 bytes`).
fn s_client(client: &Pod, target: &str, sni: &str) -> io::Result<String> {
    let out = client
        .run("sh", &["-c", &format!("echo | timeout 5 openssl s_client -connect {target} -servername {sni} 2>&1")])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Connections a `strait-echo https` server accepted (one `tls peer=` line each).
fn tls_connections(server: &Process) -> usize {
    server.count_log_lines("tls peer=")
}

/// A plain (not enrolled) namespace's pod and its service, named `name`, with `ports`
/// `(name, port, targetPort)`.
fn plain_backend(ns: &str, pod: &Pod, name: &str, vip: &str, ports: &[(&str, u16, u16)]) -> String {
    [
        k8s::pod_yaml(pod, ns, name, &[("app", name)]),
        k8s::named_service_yaml(name, ns, vip, ports, &[("app", name)], &[]),
    ]
    .concat()
}

// GW-1, L7-8: a TLS PASSTHROUGH server routes by SNI through `tls[].match[].sniHosts` (and the
// snake_case `sni_hosts`) to backends that terminate TLS themselves: the client sees the
// backend's own certificate (issuer: the backend's CA, which the gateway never had) and the
// backend sees the client's SNI. An SNI that no server names, or that a server names but no
// route matches, is closed before any backend is dialled: the client reads no byte.
#[test]
fn tls_passthrough_routes_by_sni() -> io::Result<()> {
    let topo = Topology::new("gwroutes::passthrough")?;
    let node = topo.add_node("node1")?;
    let (gw_pod, client) = (topo.add_pod(&node, "ingress")?, topo.add_pod(&node, "client")?);
    let (secure, legacy) = (topo.add_pod(&node, "secure")?, topo.add_pod(&node, "legacy")?);
    let pki = Pki::new(&topo, "backend-pki", "backend ca")?;
    pki.leaf("secure", &["secure.example.com"])?;
    pki.leaf("legacy", &["legacy.example.com"])?;
    let istio = r#"
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: passthrough, namespace: web}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: tls, protocol: TLS}
    tls: {mode: PASSTHROUGH}
    hosts: [secure.example.com, legacy.example.com, "*.unrouted.example"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: secure, namespace: web}
spec:
  hosts: [secure.example.com]
  gateways: [passthrough]
  tls:
  - match: [{port: 443, sniHosts: [secure.example.com]}]
    route: [{destination: {host: secure.web.svc.cluster.local, port: {number: 443}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: legacy, namespace: web}
spec:
  hosts: [legacy.example.com]
  gateways: [web/passthrough]
  tls:
  - match:
    - sni_hosts: [legacy.example.com]
    route:
    - destination: {host: legacy, port: {number: 443}}
"#;
    let config = [
        k8s::namespace_yaml("web", &[]),
        plain_backend("web", &secure, "secure", "10.96.0.51", &[("tls", 443, 8443)]),
        plain_backend("web", &legacy, "legacy", "10.96.0.52", &[("tls", 443, 9443)]),
        istio.to_owned(),
    ]
    .concat();
    topo.write_config("c.yaml", &config)?;
    let s1 = start_https(&secure, &pki, "secure", "secure-backend", 8443)?;
    let s2 = start_https(&legacy, &pki, "legacy", "legacy-backend", 9443)?;
    // No --credentials and no certificate in any Gateway: the gateway holds no key for these
    // hosts, so a handshake that completes was the backend's.
    let gw = start_ingress_gateway(&topo, &gw_pod, &["--port-map", "443=18443"])?;
    let ip = gw_pod.ip();
    let cacert = pki.path("ca.pem");

    let r = curl_tls(&client, "secure.example.com", ip, 18443, "/status/200", &cacert);
    assert_eq!(r.status, 200, "{r:?}\n{}", gw.log_tail());
    assert!(r.body.contains("hello from secure-backend sni=secure.example.com"), "{}", r.body);
    assert!(r.stderr.contains("issuer: CN=backend ca"), "curl saw another certificate:\n{}", r.stderr);
    assert!(r.stderr.contains("subject: CN=secure.example.com"), "{}", r.stderr);
    let r = curl_tls(&client, "legacy.example.com", ip, 18443, "/", &cacert);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("hello from legacy-backend sni=legacy.example.com"), "sni_hosts: {}", r.body);
    assert!(r.stderr.contains("subject: CN=legacy.example.com"), "{}", r.stderr);
    let line = gateway_line(&gw, &[&format!("dst.addr={}:8443", secure.ip()), "result=ok"])?;
    assert!(
        line.contains("dst.service=secure.web.svc.cluster.local") && line.contains(" sni=secure.example.com"),
        "{line}"
    );
    gateway_line(&gw, &[&format!("dst.addr={}:9443", legacy.ip()), "result=ok"])?;

    let before = (tls_connections(&s1), tls_connections(&s2));
    let target = format!("{ip}:18443");
    for sni in ["nothing.example.org", "x.unrouted.example"] {
        let out = s_client(&client, &target, sni)?;
        assert!(out.contains("SSL handshake has read 0 bytes"), "{sni}: the gateway must close unanswered:\n{out}");
        let r = curl_tls(&client, sni, ip, 18443, "/", &cacert);
        assert_eq!(r.status, 0, "{sni}: {r:?}");
    }
    assert_eq!((tls_connections(&s1), tls_connections(&s2)), before, "no backend was dialled for unrouted SNIs");
    assert!(config_warnings(&gw).is_empty(), "{:?}", config_warnings(&gw));
    Ok(())
}

// GW-1, L7-8: a TCP server splices every connection to its `tcp[]` route's destination: bytes
// sent come back from a TCP echo server behind the gateway, and the gateway writes an access
// line naming the destination service with the byte counts.
#[test]
fn tcp_listener_splices_to_its_route() -> io::Result<()> {
    let topo = Topology::new("gwroutes::tcp")?;
    let node = topo.add_node("node1")?;
    let (gw_pod, client, db) =
        (topo.add_pod(&node, "ingress")?, topo.add_pod(&node, "client")?, topo.add_pod(&node, "db")?);
    let istio = r#"
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: tcp-gateway, namespace: data}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 31400, name: tcp, protocol: TCP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: data}
spec:
  hosts: ["*"]
  gateways: [tcp-gateway]
  tcp:
  - match: [{port: 31400}]
    route: [{destination: {host: db.data.svc.cluster.local, port: {number: 5432}}}]
"#;
    let config = [
        k8s::namespace_yaml("data", &[]),
        plain_backend("data", &db, "db", "10.96.0.53", &[("tcp", 5432, 9000)]),
        istio.to_owned(),
    ]
    .concat();
    topo.write_config("c.yaml", &config)?;
    let _echo = db.start_echo_server(EchoKind::Tcp, 9000)?;
    let gw = start_ingress_gateway(&topo, &gw_pod, &[])?;

    let target = format!("{}:31400", gw_pod.ip());
    let out = client.run(bin_path("strait-echo"), &["send", &target, "--bytes", "100000", "--timeout-secs", "5"])?;
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "round trip through the gateway: {report}\n{}", gw.log_tail());
    let line = gateway_line(&gw, &[&format!("src.addr={}:", client.ip()), &format!("dst.addr={}:9000", db.ip())])?;
    assert!(line.contains("result=ok") && line.contains("sent=100000") && line.contains("received=100000"), "{line}");
    assert!(line.contains("dst.service=db.data.svc.cluster.local"), "{line}");
    assert!(config_warnings(&gw).is_empty(), "{:?}", config_warnings(&gw));
    Ok(())
}

/// Istio's PeerAuthentication STRICT for namespace `ns`.
fn strict(ns: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: {ns}}}\n\
         spec:\n  mtls: {{mode: STRICT}}\n"
    )
}

// GW-1 (backends), L4-1, L4-4: the gateway reaches a service whose pod is in the mesh over
// HBONE as its own identity (the destination's node proxy reports
// `src.identity=spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway` and mutual TLS;
// only TLS to 15008 crosses the underlay) and a pod outside the mesh in plaintext. With
// PeerAuthentication STRICT on the mesh namespace the gateway's requests still pass (they are
// HBONE) while a plaintext client is refused.
#[test]
fn mesh_backends_over_hbone_plain_pods_in_plaintext() -> io::Result<()> {
    let topo = Topology::new("gwroutes::hbone")?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let (gw_pod, client) = (topo.add_pod(&n1, "ingress")?, topo.add_pod(&n1, "client")?);
    let (ratings, legacy) = (topo.add_pod(&n2, "ratings")?, topo.add_pod(&n2, "legacy")?);
    let istio = r#"
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: web-gateway, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [ratings.example.com, legacy.example.com]
  - port: {number: 31400, name: tcp, protocol: TCP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings-tcp, namespace: shop}
spec:
  hosts: ["*"]
  gateways: [istio-system/web-gateway]
  tcp: [{route: [{destination: {host: ratings, port: {number: 9000}}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings.example.com]
  gateways: [istio-system/web-gateway]
  http: [{route: [{destination: {host: ratings, port: {number: 9080}}}]}]
---
# One request per upstream connection: each HBONE stream ends with its request, so the
# destination's node proxy writes its access line then (a pooled stream would write it later).
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: shop}
spec:
  host: ratings.shop.svc.cluster.local
  trafficPolicy: {connectionPool: {http: {maxRequestsPerConnection: 1}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: legacy, namespace: plain}
spec:
  hosts: [legacy.example.com]
  gateways: [istio-system/web-gateway]
  http: [{route: [{destination: {host: legacy, port: {number: 80}}}]}]
"#;
    let config = [
        k8s::namespace_yaml("istio-system", &[]),
        k8s::namespace_yaml("shop", &[("istio.io/dataplane-mode", "ambient")]),
        k8s::namespace_yaml("plain", &[]),
        k8s::pod_yaml(&gw_pod, "istio-system", "istio-ingressgateway", &[("istio", "ingressgateway")]),
        plain_backend("shop", &ratings, "ratings", "10.96.0.54", &[("http", 9080, 9080), ("tcp", 9000, 9000)]),
        plain_backend("plain", &legacy, "legacy", "10.96.0.55", &[("http", 80, 80)]),
        istio.to_owned(),
    ]
    .concat();
    topo.write_config("c.yaml", &config)?;
    let _s1 = ratings.echo_server(EchoKind::Http, 9080).name("ratings").start()?;
    let _s2 = legacy.echo_server(EchoKind::Http, 80).name("legacy").start()?;
    let _s3 = ratings.start_echo_server(EchoKind::Tcp, 9000)?;
    let p2 = start_node(&topo, &n2, &ca_dir(&topo, "ca"), &[])?;
    let gw = start_ingress_gateway(&topo, &gw_pod, &["--namespace", "istio-system"])?;
    let base = format!("http://{}", gw_pod.ip());
    let get = |host: &str, path: &str| {
        client.curl_args(&["--max-time", "5", "-H", &format!("Host: {host}"), &format!("{base}{path}")])
    };
    let gateway_id = "src.identity=spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway";

    let capture = UnderlayCapture::start(&topo)?;
    let mesh = get("ratings.example.com", "/ratings/1")?;
    let plain = get("legacy.example.com", "/legacy/1")?;
    let segments = capture.finish()?;
    assert!(mesh.status == 200 && mesh.body.contains("hello from ratings"), "{mesh:?}\n{}", gw.log_tail());
    assert!(plain.status == 200 && plain.body.contains("hello from legacy"), "{plain:?}\n{}", gw.log_tail());
    let ratings_addr = format!("dst.addr={}:9080", ratings.ip());
    let line = wait_access_line(&p2, &["inbound", &ratings_addr, gateway_id], TIMEOUT)?;
    assert!(line.contains("security=mutual_tls") && line.contains("result=ok"), "{line}");
    assert!(line.contains("dst.workload=shop/ratings"), "{line}");
    // On the wire: the mesh request only inside TLS to 15008, the plain one in clear to port 80.
    let to = |ip: std::net::Ipv4Addr, port: u16| -> Vec<&pcap::Segment> {
        segments.iter().filter(|s| *s.dst.ip() == ip && s.dst.port() == port).collect()
    };
    assert!(!to(ratings.ip(), 15008).is_empty(), "HBONE to the mesh pod");
    assert!(to(ratings.ip(), 9080).is_empty(), "nothing in plaintext to the mesh pod's port");
    let all_payload: Vec<u8> = segments.iter().flat_map(|s| s.payload.clone()).collect();
    assert!(!pcap::contains(&all_payload, b"/ratings/1"), "the mesh request never in clear");
    assert!(
        to(legacy.ip(), 80).iter().any(|s| pcap::contains(&s.payload, b"GET /legacy/1")),
        "the plain pod is reached in plaintext"
    );
    assert!(
        !p2.log().lines().any(|l| l.contains(&format!("dst.addr={}:80", legacy.ip()))),
        "no proxy handles the pod outside the mesh"
    );

    // A TCP route to the mesh pod: spliced into an HBONE stream, reported so on both sides.
    let target = format!("{}:31400", gw_pod.ip());
    let out = client.run(bin_path("strait-echo"), &["send", &target, "--bytes", "50000", "--timeout-secs", "5"])?;
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}\n{}", gw.log_tail());
    let tcp_addr = format!("dst.addr={}:9000", ratings.ip());
    let line = gateway_line(&gw, &[&tcp_addr, "result=ok"])?;
    assert!(line.contains("security=mutual_tls"), "{line}");
    assert!(line.contains("dst.identity=spiffe://cluster.local/ns/shop/sa/ratings"), "{line}");
    assert!(line.contains("dst.service=ratings.shop.svc.cluster.local") && line.contains("sent=50000"), "{line}");
    let line = wait_access_line(&p2, &["inbound", &tcp_addr, gateway_id], TIMEOUT)?;
    assert!(line.contains("security=mutual_tls") && line.contains("received=50000"), "{line}");

    // STRICT at the destination: the gateway's HBONE still passes, a plaintext client does not.
    common::apply(&topo, &[&p2, &gw], "strict.yaml", &strict("shop"))?;
    let mesh = get("ratings.example.com", "/strict")?;
    assert!(mesh.status == 200 && mesh.body.contains("hello from ratings"), "{mesh:?}\n{}", gw.log_tail());
    common::wait_access_lines(
        &p2,
        &["inbound", &ratings_addr, gateway_id, "security=mutual_tls", "result=ok"],
        2,
        TIMEOUT,
    )?;
    let direct = client.curl(&format!("http://{}:9080/direct", ratings.ip()), Duration::from_secs(3))?;
    assert_eq!(direct.status, 0, "STRICT refuses plaintext to the mesh pod: {direct:?}");
    assert!(get("legacy.example.com", "/after")?.ok(), "the plain pod is unaffected");
    assert!(config_warnings(&gw).is_empty(), "{:?}", config_warnings(&gw));
    Ok(())
}

/// Seed 000 ("Istio as a proxy to external services"), its YAML verbatim: the `proxy` Gateway
/// (HTTP 80 for httpbin.org, TLS PASSTHROUGH 443 for edition.cnn.com), the ServiceEntries of
/// both hosts (resolution DNS) and of `localhost.local`, its DestinationRule, and the two
/// VirtualServices bound to `proxy` and `mesh`.
const SEED_000: &str = include_str!("../../proxy/tests/fixtures/samples/seed-000-proxy-external.yaml");

// GW-4 (seed 000), GW-1, GW-3: the ingress gateway as a proxy to external services, the seed's
// YAML verbatim, with our servers standing in for httpbin.org (HTTP) and edition.cnn.com (TLS,
// its own certificate), both found through DNS by the gateway itself (a resolver of ours).
// `curl -H Host:httpbin.org gw/status/418` gets the stand-in's 418 and the gateway's request
// line names `outbound|80||httpbin.org`; a path only the `mesh` rule matches is 404 at the
// gateway (`match[].gateways`); `curl --resolve edition.cnn.com:443:<gw>` sees the stand-in's own
// certificate (PASSTHROUGH) and the gateway's connection line names the host. Nothing warns.
#[test]
fn seed_000_ingress_as_a_proxy_to_external_services() -> io::Result<()> {
    let topo = Topology::new("gwroutes::seed000")?;
    let node = topo.add_node("node1")?;
    let (gw_pod, client, resolver) =
        (topo.add_pod(&node, "ingress")?, topo.add_pod(&node, "client")?, topo.add_pod(&node, "resolver")?);
    // The "external" hosts: pods no configuration names.
    let (httpbin, cnn) = (topo.add_pod(&node, "httpbin-org")?, topo.add_pod(&node, "cnn")?);
    let pki = Pki::new(&topo, "cnn-pki", "cnn stand-in ca")?;
    pki.leaf("cnn", &["edition.cnn.com"])?;
    let _httpbin = httpbin.echo_server(EchoKind::Http, 80).name("httpbin-stand-in").start()?;
    let cnn_server = start_https(&cnn, &pki, "cnn", "cnn-stand-in", 443)?;
    let records =
        [("httpbin.org", &httpbin), ("edition.cnn.com", &cnn)].map(|(host, pod)| format!("{host}={}", pod.ip()));
    let dns = resolver.start_dns(&records)?;
    gw_pod.netns().use_resolver(resolver.ip())?;
    topo.write_config("seed-000.yaml", SEED_000)?;
    let gw = start_ingress_gateway(&topo, &gw_pod, &[])?;
    gw.wait_for_log("ServiceEntry host resolved", TIMEOUT)?;
    let ip = gw_pod.ip();

    let teapot =
        client.curl_args(&["--max-time", "5", "-H", "Host:httpbin.org", &format!("http://{ip}/status/418")])?;
    assert_eq!(teapot.status, 418, "{teapot:?}\n{}", gw.log_tail());
    assert_eq!(teapot.header("x-served-by"), Some("httpbin-stand-in"), "{teapot:?}");
    let line = request_line(&gw, &["path=\"/status/418\"", "status=418"])?;
    assert!(line.contains("authority=httpbin.org") && line.contains("cluster=outbound|80||httpbin.org"), "{line}");
    assert!(
        line.contains(&format!("upstream={}:80", httpbin.ip())) && line.contains("route=default/httpbin"),
        "{line}"
    );
    // Only the `mesh` rule would take this path: at the gateway no route matches.
    let other = client.curl_args(&["--max-time", "5", "-H", "Host:httpbin.org", &format!("http://{ip}/headers")])?;
    assert_eq!(other.status, 404, "{other:?}");

    let cacert = pki.path("ca.pem");
    let r = curl_tls(&client, "edition.cnn.com", ip, 443, "/", &cacert);
    assert_eq!(r.status, 200, "{r:?}\n{}", gw.log_tail());
    assert!(r.body.contains("hello from cnn-stand-in sni=edition.cnn.com"), "{}", r.body);
    assert!(r.stderr.contains("issuer: CN=cnn stand-in ca"), "the stand-in's own certificate:\n{}", r.stderr);
    assert_eq!(tls_connections(&cnn_server), 1);
    let line = gateway_line(&gw, &[&format!("dst.addr={}:443", cnn.ip())])?;
    assert!(line.contains("dst.service=edition.cnn.com") && line.contains("result=ok sni=edition.cnn.com"), "{line}");
    // The gateway asked our resolver itself (the client dialled addresses only).
    let asked = dns.log();
    for host in ["httpbin.org", "edition.cnn.com"] {
        assert!(
            asked.lines().any(|l| l.contains(&format!("{host} type 1")) && l.contains(&ip.to_string())),
            "{host}: {asked}"
        );
    }
    assert!(config_warnings(&gw).is_empty(), "the seed loads without warnings: {:?}", config_warnings(&gw));
    // As node proxies load it too (the VirtualServices' `mesh` half).
    let dir = topo.config_dir().to_string_lossy().into_owned();
    let out = std::process::Command::new(bin_path("strait")).args(["ctl", "validate", &dir]).output()?;
    let report = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && report.contains("7 resource(s), 0 error(s), 0 warning(s)"), "{report}");
    Ok(())
}

// GW-1, GW-2, L7-9: wildcard server hosts. On HTTP, a server for `*.example.com` takes any name
// under it (several labels too), the VirtualService naming a host exactly wins over the wildcard
// one, and a Host the server does not serve (the bare domain, another domain) is 404; the
// backend reads `x-forwarded-proto: http` even when the client claimed https. On HTTPS, a
// `*.secure.example` server with its certificate given as file paths (`serverCertificate`,
// `privateKey`) answers any SNI under it with that wildcard certificate; an SNI outside it gets
// no handshake; plain HTTP for those hosts gets a 301 to https (`tls.httpsRedirect`).
#[test]
fn wildcard_server_hosts_and_unmatched_host() -> io::Result<()> {
    let topo = Topology::new("gwroutes::wildcard")?;
    let node = topo.add_node("node1")?;
    let (gw_pod, client) = (topo.add_pod(&node, "ingress")?, topo.add_pod(&node, "client")?);
    let (api, wild) = (topo.add_pod(&node, "api")?, topo.add_pod(&node, "wild")?);
    let pki = Pki::new(&topo, "pki", "gateway ca")?;
    pki.leaf("wildcard", &["*.secure.example"])?;
    let istio = format!(
        r#"
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: wildcard, namespace: web}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: ["*.example.com"]
  - port: {{number: 80, name: http-redirect, protocol: HTTP}}
    hosts: ["*.secure.example"]
    tls: {{httpsRedirect: true}}
  - port: {{number: 443, name: https, protocol: HTTPS}}
    hosts: ["web/*.secure.example"]
    tls: {{mode: SIMPLE, serverCertificate: {cert}, privateKey: {key}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: wild, namespace: web}}
spec:
  hosts: ["*.example.com", "*.secure.example"]
  gateways: [wildcard]
  http: [{{route: [{{destination: {{host: wild, port: {{number: 80}}}}}}]}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api, namespace: web}}
spec:
  hosts: [api.example.com]
  gateways: [wildcard]
  http: [{{match: [{{port: 80}}], route: [{{destination: {{host: api, port: {{number: 80}}}}}}]}}]
"#,
        cert = pki.path("wildcard.pem"),
        key = pki.path("wildcard-key.pem"),
    );
    let config = [
        k8s::namespace_yaml("web", &[]),
        plain_backend("web", &api, "api", "10.96.0.56", &[("http", 80, 80)]),
        plain_backend("web", &wild, "wild", "10.96.0.57", &[("http", 80, 80)]),
        istio,
    ]
    .concat();
    topo.write_config("c.yaml", &config)?;
    let _s1 = api.echo_server(EchoKind::Http, 80).name("api").start()?;
    let _s2 = wild.echo_server(EchoKind::Http, 80).name("wild").start()?;
    let gw = start_ingress_gateway(&topo, &gw_pod, &["--port-map", "80=18080,443=18443"])?;
    let ip = gw_pod.ip();
    let get = |host: &str| {
        client.curl_args(&["--max-time", "5", "-H", &format!("Host: {host}"), &format!("http://{ip}:18080/x")])
    };

    for (host, served_by) in [
        ("api.example.com", "api"),
        ("www.example.com", "wild"),
        ("a.b.example.com", "wild"),
        ("API.Example.com", "api"),
    ] {
        let r = get(host)?;
        assert_eq!((r.status, r.header("x-served-by")), (200, Some(served_by)), "{host}: {r:?}\n{}", gw.log_tail());
    }
    for host in ["example.com", "www.example.org"] {
        let r = get(host)?;
        assert_eq!(r.status, 404, "{host} is no host of the HTTP server: {r:?}");
    }
    request_line(&gw, &["authority=www.example.org", "status=404", "flags=NR"])?;
    // L7-9: the gateway says the client spoke http, whatever the client claimed.
    let r = client.curl_args(&[
        "--max-time",
        "5",
        "-H",
        "Host: www.example.com",
        "-H",
        "x-forwarded-proto: https",
        &format!("http://{ip}:18080/headers"),
    ])?;
    assert!(r.status == 200 && r.body.contains("x-forwarded-proto: http\n"), "{r:?}");
    assert!(!r.body.contains("x-forwarded-proto: https"), "{r:?}");
    // `httpsRedirect`: plain HTTP for the secure hosts is sent to https, never served.
    let r =
        client.curl_args(&["--max-time", "5", "-H", "Host: x.secure.example", &format!("http://{ip}:18080/a?b=1")])?;
    assert_eq!((r.status, r.header("location")), (301, Some("https://x.secure.example/a?b=1")), "{r:?}");
    assert_ne!(r.header("x-served-by"), Some("wild"), "{r:?}");

    let cacert = pki.path("ca.pem");
    let r = curl_tls(&client, "shop.secure.example", ip, 18443, "/", &cacert);
    assert_eq!((r.status, r.header("x-served-by")), (200, Some("wild")), "{r:?}\n{}", gw.log_tail());
    assert!(r.stderr.contains("subject: CN=*.secure.example"), "{}", r.stderr);
    let out = s_client(&client, &format!("{ip}:18443"), "secure.example")?;
    assert!(out.contains("SSL handshake has read 0 bytes"), "the bare domain has no server:\n{out}");
    assert!(config_warnings(&gw).is_empty(), "{:?}", config_warnings(&gw));
    Ok(())
}

// GW-1, GW-2, L7-9: on a TLS port, the server the SNI chose is the only one whose VirtualServices
// route the connection's requests: a client that opens TLS to the SIMPLE server without a
// certificate and then asks for the MUTUAL server's host in its Host header (or its HTTP/2
// :authority) gets 404, never the backend the MUTUAL server protects. Its own host is served,
// as scheme https: a route matching `scheme: {exact: https}` takes it and the backend reads
// `x-forwarded-proto: https`.
#[test]
fn sni_server_bounds_the_hosts_of_its_connection() -> io::Result<()> {
    let topo = Topology::new("gwroutes::fronting")?;
    let node = topo.add_node("node1")?;
    let (gw_pod, client) = (topo.add_pod(&node, "ingress")?, topo.add_pod(&node, "client")?);
    let (open, secure) = (topo.add_pod(&node, "open")?, topo.add_pod(&node, "secure")?);
    let pki = Pki::new(&topo, "pki", "gateway ca")?;
    pki.leaf("open", &["open.example.com"])?;
    pki.leaf("secure", &["secure.example.com"])?;
    let istio = format!(
        r#"
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: two, namespace: web}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: https-open, protocol: HTTPS}}
    hosts: [open.example.com]
    tls: {{mode: SIMPLE, serverCertificate: {open_crt}, privateKey: {open_key}}}
  - port: {{number: 443, name: https-secure, protocol: HTTPS}}
    hosts: [secure.example.com]
    tls: {{mode: MUTUAL, serverCertificate: {secure_crt}, privateKey: {secure_key}, caCertificates: {ca}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: open, namespace: web}}
spec:
  hosts: [open.example.com]
  gateways: [two]
  http:
  - match: [{{scheme: {{exact: https}}}}]
    route: [{{destination: {{host: open, port: {{number: 80}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: secure, namespace: web}}
spec:
  hosts: [secure.example.com]
  gateways: [two]
  http: [{{route: [{{destination: {{host: secure, port: {{number: 80}}}}}}]}}]
"#,
        open_crt = pki.path("open.pem"),
        open_key = pki.path("open-key.pem"),
        secure_crt = pki.path("secure.pem"),
        secure_key = pki.path("secure-key.pem"),
        ca = pki.path("ca.pem"),
    );
    let config = [
        k8s::namespace_yaml("web", &[]),
        plain_backend("web", &open, "open", "10.96.0.58", &[("http", 80, 80)]),
        plain_backend("web", &secure, "secure", "10.96.0.59", &[("http", 80, 80)]),
        istio,
    ]
    .concat();
    topo.write_config("c.yaml", &config)?;
    let _s1 = open.echo_server(EchoKind::Http, 80).name("open").start()?;
    let _s2 = secure.echo_server(EchoKind::Http, 80).name("secure").start()?;
    let gw = start_ingress_gateway(&topo, &gw_pod, &["--port-map", "443=18443"])?;
    let (ip, cacert) = (gw_pod.ip(), pki.path("ca.pem"));
    let resolve = format!("open.example.com:18443:{ip}");
    let fronted = |version: &str, host: &str| {
        client.curl_args(&[
            version,
            "--max-time",
            "5",
            "--resolve",
            &resolve,
            "--cacert",
            &cacert,
            "-H",
            &format!("Host: {host}"),
            "https://open.example.com:18443/x",
        ])
    };

    for version in ["--http1.1", "--http2"] {
        let own = fronted(version, "open.example.com:18443")?;
        assert_eq!((own.status, own.header("x-served-by")), (200, Some("open")), "{version}: {own:?}");
        let other = fronted(version, "secure.example.com")?;
        assert_eq!(other.status, 404, "{version}: the MUTUAL server's host through the SIMPLE one: {other:?}");
        assert_ne!(other.header("x-served-by"), Some("secure"), "{other:?}");
    }
    request_line(&gw, &["authority=secure.example.com", "status=404", "flags=NR"])?;
    // L7-9: the backend learns the client used HTTPS (the route above matched on the scheme).
    let r = client.curl_args(&[
        "--max-time",
        "5",
        "--resolve",
        &resolve,
        "--cacert",
        &cacert,
        "https://open.example.com:18443/headers",
    ])?;
    assert!(r.status == 200 && r.body.contains("x-forwarded-proto: https\n"), "{r:?}");
    assert!(config_warnings(&gw).is_empty(), "{:?}", config_warnings(&gw));
    Ok(())
}
