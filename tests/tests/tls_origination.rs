//! End to end: TLS origination by the waypoint (SPEC GW-3). A mesh client speaks plain HTTP to
//! a service whose endpoint is a pod outside the mesh running an HTTPS server
//! (`strait-echo https`, standing in for an external host); the DestinationRule's
//! `trafficPolicy.tls` makes the waypoint open TLS to it: SIMPLE verified against a test CA, the
//! SNI and `subjectAltNames`; MUTUAL with a client certificate, rotated on disk; DISABLE.
//! The HTTPS server reports the SNI, the ALPN offer and a digest of the client certificate it
//! saw. Needs root.

mod common;

use std::{
    fs, io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use common::{APP_NS, TIMEOUT, WaypointMesh, apply, start_node, wait_request_lines};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use strait_testbed::{EchoKind, Pod, Process, Topology, UnderlayCapture, bin_path, k8s, pcap, require_bin};

const EXT_VIP: &str = "10.96.0.41";
const HTTPS_PORT: u16 = 8443;

/// Test certificates in the topology's directory: two unrelated CAs, a server certificate for
/// `api.external.test` signed by `ca`, and client certificates.
struct Pki {
    dir: PathBuf,
    ca: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(topo: &Topology) -> io::Result<Pki> {
        let dir = topo.dir().join("pki");
        fs::create_dir_all(&dir)?;
        let ca = make_ca(&dir, "ca")?;
        make_ca(&dir, "other-ca")?;
        let pki = Pki { dir, ca };
        pki.leaf("server", "api.external.test")?;
        pki.leaf("client", "client.test")?;
        Ok(pki)
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// Writes `<name>.pem` and `<name>-key.pem`, a certificate for `dns` signed by the CA.
    /// Written to a temporary file and renamed, as a secret mounted from Kubernetes changes.
    fn leaf(&self, name: &str, dns: &str) -> io::Result<()> {
        let key = KeyPair::generate().map_err(io::Error::other)?;
        let mut params = CertificateParams::new(vec![dns.to_owned()]).map_err(io::Error::other)?;
        params.distinguished_name.push(DnType::CommonName, dns);
        let cert = params.signed_by(&key, &self.ca).map_err(io::Error::other)?;
        write_atomic(&self.dir.join(format!("{name}-key.pem")), &key.serialize_pem())?;
        write_atomic(&self.dir.join(format!("{name}.pem")), &cert.pem())
    }
}

fn make_ca(dir: &Path, name: &str) -> io::Result<Issuer<'static, KeyPair>> {
    let key = KeyPair::generate().map_err(io::Error::other)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(io::Error::other)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, format!("strait test {name}"));
    let cert = params.self_signed(&key).map_err(io::Error::other)?;
    fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
    Ok(Issuer::new(params, key))
}

fn write_atomic(path: &Path, contents: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, contents)?;
    fs::rename(tmp, path)
}

/// `strait-echo https` in `pod`, with the server certificate; `client_ca` requires client
/// certificates signed by it.
fn start_https(pod: &Pod, pki: &Pki, name: &str, client_ca: Option<&str>) -> io::Result<Process> {
    let (cert, key, port) = (pki.path("server.pem"), pki.path("server-key.pem"), HTTPS_PORT.to_string());
    let mut args = vec!["https", &port, "--cert", &cert, "--key", &key, "--name", name];
    let ca = client_ca.map(|c| pki.path(c));
    if let Some(ca) = &ca {
        args.extend(["--client-ca", ca]);
    }
    let server = pod.spawn(&format!("https-{name}"), &require_bin("strait-echo")?, &args, &[])?;
    server.wait_for_log("listening on", TIMEOUT)?;
    Ok(server)
}

/// The base configuration plus pod `ext` outside the mesh (`istio.io/dataplane-mode: none`)
/// behind service `ext` (port 443, named `http`: the client speaks HTTP to it) and `extra`.
fn config(m: &WaypointMesh, extra: &str) -> String {
    let ext = &m.backends[0];
    [
        m.base_config(),
        k8s::pod_yaml(ext, APP_NS, "ext", &[("app", "ext"), ("istio.io/dataplane-mode", "none")]),
        k8s::named_service_yaml("ext", APP_NS, EXT_VIP, &[("http", 443, HTTPS_PORT)], &[("app", "ext")], &[]),
        extra.to_owned(),
    ]
    .concat()
}

/// A DestinationRule for `ext` with `tls` (YAML lines indented for `trafficPolicy.tls`).
fn rule(tls: &str) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: ext\n  namespace: {APP_NS}\nspec:\n  host: ext.{APP_NS}.svc.cluster.local\n  trafficPolicy:\n    tls:\n{tls}"
    )
}

fn url(path: &str) -> String {
    format!("http://{EXT_VIP}:443{path}")
}

/// Curls `path` until the answer's status is `status` (a configuration change is applied by
/// every proxy when `apply` returns, but connections opened before may still be in the pool
/// of the client's node proxy for a moment).
fn curl_until(m: &WaypointMesh, path: &str, status: u16) -> io::Result<strait_testbed::CurlResult> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let reply = m.client.curl(&url(path), TIMEOUT)?;
        if reply.status == status || Instant::now() > deadline {
            return Ok(reply);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

// GW-3: SIMPLE originates TLS with the configured SNI, verified against `caCertificates`: the
// mesh client speaks plain HTTP, only TLS crosses the underlay to the external server. A wrong
// CA or a certificate not valid for the SNI is refused (503, the reason in the access line);
// `subjectAltNames` replaces the check against the SNI.
#[test]
fn simple_originates_verified_tls() -> io::Result<()> {
    let m = WaypointMesh::new("tls::simple", &["ext"])?;
    let pki = Pki::new(&m.topo)?;
    let simple =
        |ca: &str, extra: &str| rule(&format!("      mode: SIMPLE\n      caCertificates: {}\n{extra}", pki.path(ca)));
    let with_sni = simple("ca.pem", "      sni: api.external.test\n");
    m.topo.write_config("c.yaml", &config(&m, &with_sni))?;
    let _server = start_https(&m.backends[0], &pki, "external", None)?;
    let (p1, p2, wp) = m.start()?;

    let capture = UnderlayCapture::start(&m.topo)?;
    let ok = m.client.curl(&url("/hello"), TIMEOUT)?;
    let segments = capture.finish()?;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert!(ok.body.contains("hello from external sni=api.external.test alpn=http/1.1 client_cert=-"), "{}", ok.body);
    assert!(ok.body.contains("path=/hello"), "{}", ok.body);
    let to_server: Vec<_> = segments.iter().filter(|s| s.dst.port() == HTTPS_PORT).collect();
    assert!(!to_server.is_empty(), "the waypoint reached the external server over the underlay");
    assert!(to_server.iter().all(|s| !pcap::contains(&s.payload, b"GET /hello")), "no plaintext to the server");
    assert!(to_server.iter().any(|s| pcap::contains(&s.payload, b"api.external.test")), "SNI in the ClientHello");
    wait_request_lines(&wp, &["path=\"/hello\"", "status=200", "cluster=outbound|443||ext.shop.svc.cluster.local"], 1)?;

    // An unknown issuer: 503, and why.
    apply(&m.topo, &[&p1, &p2, &wp], "c.yaml", &config(&m, &simple("other-ca.pem", "      sni: api.external.test\n")))?;
    let refused = curl_until(&m, "/wrong-ca", 503)?;
    assert_eq!(refused.status, 503, "{refused:?}");
    let line = wait_request_lines(&wp, &["path=\"/wrong-ca\"", "status=503"], 1)?.remove(0);
    assert!(line.contains("UF") && line.contains("UnknownIssuer") && line.contains("sni api.external.test"), "{line}");

    // The default SNI is the host, for which the server's certificate is not valid.
    apply(&m.topo, &[&p1, &p2, &wp], "c.yaml", &config(&m, &simple("ca.pem", "")))?;
    let refused = curl_until(&m, "/wrong-name", 503)?;
    assert_eq!(refused.status, 503, "{refused:?}");
    let line = wait_request_lines(&wp, &["path=\"/wrong-name\"", "status=503"], 1)?.remove(0);
    assert!(line.contains("not valid for name") && line.contains("ext.shop.svc.cluster.local"), "{line}");

    // subjectAltNames: the certificate must name one of them, whatever the SNI.
    let by_san = simple("ca.pem", "      subjectAltNames: [api.external.test]\n");
    apply(&m.topo, &[&p1, &p2, &wp], "c.yaml", &config(&m, &by_san))?;
    let ok = curl_until(&m, "/by-san", 200)?;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert!(ok.body.contains("sni=ext.shop.svc.cluster.local"), "{}", ok.body);
    let other_san = simple("ca.pem", "      subjectAltNames: [other.external.test]\n");
    apply(&m.topo, &[&p1, &p2, &wp], "c.yaml", &config(&m, &other_san))?;
    let refused = curl_until(&m, "/other-san", 503)?;
    assert_eq!(refused.status, 503, "{refused:?}");
    let line = wait_request_lines(&wp, &["path=\"/other-san\"", "status=503"], 1)?.remove(0);
    assert!(line.contains("subjectAltNames asks for other.external.test"), "{line}");
    Ok(())
}

// GW-3: MUTUAL presents the client certificate to a server that requires one; without it
// (SIMPLE) the server refuses. A client certificate replaced on disk is presented on the next
// requests, without a restart or a configuration change. A missing file is a 503 with the
// file named, not a crash.
#[test]
fn mutual_presents_a_rotated_client_certificate() -> io::Result<()> {
    let m = WaypointMesh::new("tls::mutual", &["ext"])?;
    let pki = Pki::new(&m.topo)?;
    let tls = |mode: &str, cert: &str| {
        rule(&format!(
            "      mode: {mode}\n      caCertificates: {}\n      clientCertificate: {}\n      privateKey: {}\n      sni: api.external.test\n",
            pki.path("ca.pem"),
            pki.path(cert),
            pki.path("client-key.pem")
        ))
    };
    m.topo.write_config("c.yaml", &config(&m, &tls("MUTUAL", "client.pem")))?;
    let server = start_https(&m.backends[0], &pki, "external", Some("ca.pem"))?;
    let (p1, p2, wp) = m.start()?;

    let first = m.client.curl(&url("/first"), TIMEOUT)?;
    assert_eq!(first.status, 200, "{first:?}");
    let digest = |body: &str| body.split("client_cert=").nth(1).and_then(|s| s.split(' ').next()).map(str::to_owned);
    let before = digest(&first.body).filter(|d| d != "-").expect("a client certificate was presented");

    // Rotated on disk: the next requests present the new certificate (within the 500 ms the
    // waypoint takes to look at the files again, and on a new connection).
    pki.leaf("client", "client.test")?;
    let deadline = Instant::now() + Duration::from_secs(3);
    let rotated = loop {
        let reply = m.client.curl(&url("/rotated"), TIMEOUT)?;
        assert_eq!(reply.status, 200, "{reply:?}");
        let now = digest(&reply.body).expect("digest");
        if now != before || Instant::now() > deadline {
            break now;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert_ne!(rotated, before, "the rotated certificate is presented within 3 s");
    assert!(server.log().contains(&format!("client_cert={rotated}")), "{}", server.log());

    // Without a client certificate the server refuses the connection.
    let simple = rule(&format!(
        "      mode: SIMPLE\n      caCertificates: {}\n      sni: api.external.test\n",
        pki.path("ca.pem")
    ));
    apply(&m.topo, &[&p1, &p2, &wp], "c.yaml", &config(&m, &simple))?;
    let refused = curl_until(&m, "/no-cert", 503)?;
    assert_eq!(refused.status, 503, "{refused:?}");
    wait_request_lines(&wp, &["path=\"/no-cert\"", "status=503"], 1)?;

    // A client certificate file that does not exist: 503 naming it.
    apply(&m.topo, &[&p1, &p2, &wp], "c.yaml", &config(&m, &tls("MUTUAL", "absent.pem")))?;
    let missing = curl_until(&m, "/missing", 503)?;
    assert_eq!(missing.status, 503, "{missing:?}");
    let line = wait_request_lines(&wp, &["path=\"/missing\"", "status=503"], 1)?.remove(0);
    assert!(line.contains(&format!("clientCertificate {}", pki.path("absent.pem"))), "{line}");
    assert!(wp.is_running(), "the waypoint is still up");
    Ok(())
}

// GW-3: DISABLE sends plaintext to a plain HTTP server outside the mesh, as without a rule.
#[test]
fn disable_sends_plaintext() -> io::Result<()> {
    let m = WaypointMesh::new("tls::disable", &["ext"])?;
    m.topo.write_config("c.yaml", &config(&m, &rule("      mode: DISABLE\n")))?;
    let _server = m.backends[0].echo_server(EchoKind::Http, HTTPS_PORT).name("plain-ext").start()?;
    let (_p1, _p2, wp) = m.start()?;
    let capture = UnderlayCapture::start(&m.topo)?;
    let reply = m.client.curl(&url("/plain"), TIMEOUT)?;
    let segments = capture.finish()?;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.contains("hello from plain-ext"), "{}", reply.body);
    assert!(
        segments.iter().any(|s| s.dst.port() == HTTPS_PORT && pcap::contains(&s.payload, b"GET /plain")),
        "plaintext to the server"
    );
    wait_request_lines(&wp, &["path=\"/plain\"", "status=200"], 1)?;
    Ok(())
}

// GW-3: a DestinationRule without `caCertificates` (as Istio's samples write them) verifies
// the server against the system's CA bundle, which `SSL_CERT_FILE` replaces: here the test CA.
#[test]
fn simple_without_ca_trusts_the_system_bundle() -> io::Result<()> {
    let m = WaypointMesh::new("tls::system", &["ext"])?;
    let pki = Pki::new(&m.topo)?;
    m.topo.write_config("c.yaml", &config(&m, &rule("      mode: SIMPLE\n      sni: api.external.test\n")))?;
    let _server = start_https(&m.backends[0], &pki, "external", None)?;
    let _p1 = start_node(&m.topo, &m.n1, &m.ca, &[])?;
    let _p2 = start_node(&m.topo, &m.n2, &m.ca, &[])?;
    let (config_dir, ca_dir) = (m.topo.config_dir(), m.ca.to_string_lossy().into_owned());
    let config_dir = config_dir.to_string_lossy().into_owned();
    let bundle = pki.path("ca.pem");
    let args = ["waypoint", "--name", "waypoint", "--namespace", APP_NS, "--config", &config_dir, "--ca-dir", &ca_dir];
    let env = [("STRAIT_LOG", "info"), ("SSL_CERT_FILE", bundle.as_str())];
    let wp = m.waypoint_pod.spawn("waypoint-system-roots", bin_path("strait"), &args, &env)?;
    wp.wait_for_log("strait waypoint ready", TIMEOUT)?;
    let reply = m.client.curl(&url("/system"), TIMEOUT)?;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.contains("sni=api.external.test"), "{}", reply.body);
    wait_request_lines(&wp, &["path=\"/system\"", "status=200"], 1)?;
    Ok(())
}

/// Istio's `samples/bookinfo/networking/egress-rule-google-apis.yaml`, verbatim: a DNS
/// ServiceEntry for www.googleapis.com (ports 80 HTTP and 443 HTTPS), a VirtualService sending
/// port 80 to port 443, and a DestinationRule originating TLS (SIMPLE) on port 443.
const GOOGLE_APIS_SAMPLE: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: googleapis
spec:
  hosts:
  - www.googleapis.com
  ports:
  - number: 80
    name: http
    protocol: HTTP
  - number: 443
    name: https
    protocol: HTTPS
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: rewrite-port-for-googleapis
spec:
  hosts:
  - www.googleapis.com
  http:
  - match:
    - port: 80
    route:
    - destination:
        host: www.googleapis.com
        port:
          number: 443
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: originate-tls-for-googleapis
spec:
  host: www.googleapis.com
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
    portLevelSettings:
    - port:
        number: 443
      tls:
        mode: SIMPLE # initiates HTTPS when accessing www.googleapis.com
";

// GW-3, GW-4, the egress waypoint: Istio's egress-rule-google-apis sample, loaded verbatim (no
// diagnostic at all) into namespace `default`, whose label `istio.io/use-waypoint` makes the
// ServiceEntry's traffic go through the waypoint. The client's `http://www.googleapis.com/...`
// resolves (through a resolver of ours) to a stand-in HTTPS server; the node proxy sends the
// connection to the waypoint, which routes port 80 to 443 and originates TLS with SNI
// www.googleapis.com, verified against the system bundle (`SSL_CERT_FILE`: the test CA).
#[test]
fn google_apis_sample_through_the_egress_waypoint() -> io::Result<()> {
    const NS: &str = "default";
    let m = WaypointMesh::new("tls::googleapis", &["google", "resolver"])?;
    let (google, resolver) = (&m.backends[0], &m.backends[1]);
    let pki = Pki::new(&m.topo)?;
    pki.leaf("googleapis", "www.googleapis.com")?;
    let base = [
        k8s::namespace_yaml(NS, &[("istio.io/dataplane-mode", "ambient"), ("istio.io/use-waypoint", "waypoint")]),
        k8s::pod_yaml(&m.client, NS, "client", &[("app", "client")]),
        k8s::pod_yaml(&m.waypoint_pod, NS, "waypoint", &[(common::WAYPOINT_POD_LABEL, "waypoint")]),
    ]
    .concat();
    m.topo.write_config("base.yaml", &base)?;
    m.topo.write_config("googleapis.yaml", GOOGLE_APIS_SAMPLE)?;

    let _dns = resolver.start_dns(&[format!("www.googleapis.com={}", google.ip())])?;
    for netns in [m.n1.netns(), m.client.netns(), m.waypoint_pod.netns()] {
        netns.use_resolver(resolver.ip())?;
    }
    let (cert, key) = (pki.path("googleapis.pem"), pki.path("googleapis-key.pem"));
    let https = google.spawn(
        "https-googleapis",
        &require_bin("strait-echo")?,
        &["https", "443", "--cert", &cert, "--key", &key, "--name", "googleapis-stand-in"],
        &[],
    )?;
    https.wait_for_log("listening on", TIMEOUT)?;
    let p1 = start_node(&m.topo, &m.n1, &m.ca, &[])?;
    let p2 = start_node(&m.topo, &m.n2, &m.ca, &[])?;
    let (config_dir, ca_dir) = (m.topo.config_dir(), m.ca.to_string_lossy().into_owned());
    let config_dir = config_dir.to_string_lossy().into_owned();
    let bundle = pki.path("ca.pem");
    let args = ["waypoint", "--name", "waypoint", "--namespace", NS, "--config", &config_dir, "--ca-dir", &ca_dir];
    let env = [("STRAIT_LOG", "info"), ("SSL_CERT_FILE", bundle.as_str())];
    let wp = m.waypoint_pod.spawn("waypoint-googleapis", bin_path("strait"), &args, &env)?;
    wp.wait_for_log("strait waypoint ready", TIMEOUT)?;

    // The node proxy resolves the entry's host every 5 s; the first round runs at start.
    let deadline = Instant::now() + TIMEOUT;
    let reply = loop {
        let reply = m.client.curl("http://www.googleapis.com/books/v1/volumes?q=isbn:0486424618", TIMEOUT)?;
        if reply.status == 200 || Instant::now() > deadline {
            break reply;
        }
        thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(reply.status, 200, "{reply:?}\nwaypoint:\n{}", wp.log_tail());
    assert!(
        reply.body.contains("hello from googleapis-stand-in sni=www.googleapis.com alpn=http/1.1 client_cert=-"),
        "{}",
        reply.body
    );
    assert!(reply.body.contains("path=/books/v1/volumes"), "{}", reply.body);
    let line = wait_request_lines(&wp, &["path=\"/books/v1/volumes?q=isbn:0486424618\"", "status=200"], 1)?.remove(0);
    assert!(line.contains("cluster=outbound|443||www.googleapis.com"), "{line}");
    assert!(line.contains(&format!("upstream={}:443", google.ip())), "{line}");
    assert!(line.contains("src.identity=spiffe://cluster.local/ns/default/sa/client"), "{line}");
    // Loaded verbatim: not one diagnostic about the sample's file, from any proxy.
    for proxy in [&p1, &p2, &wp] {
        let log = proxy.log();
        let noted: Vec<&str> = log.lines().filter(|l| l.contains("googleapis.yaml:")).collect();
        assert!(noted.is_empty(), "diagnostics on the sample: {noted:?}");
    }
    Ok(())
}

// GW-3, the egress waypoint: a ServiceEntry labelled `istio.io/use-waypoint` (in a namespace
// without the label) sends the mesh's traffic for its host through that waypoint, which applies
// the host's VirtualService (a rewrite), DestinationRule (MUTUAL TLS origination to the STATIC
// endpoint) and an L7 AuthorizationPolicy bound to the ServiceEntry by `targetRefs`.
#[test]
fn labelled_service_entry_goes_through_the_egress_waypoint() -> io::Result<()> {
    const VIP: &str = "240.240.0.10";
    let m = WaypointMesh::new("tls::egresswp", &["ext"])?;
    let ext = &m.backends[0];
    let pki = Pki::new(&m.topo)?;
    let entry = format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: external-api
  namespace: {APP_NS}
  labels:
    istio.io/use-waypoint: waypoint
spec:
  hosts: [api.external.test]
  addresses: [{VIP}]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  endpoints:
  - address: {ip}
    ports: {{http: {HTTPS_PORT}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: external-api
  namespace: {APP_NS}
spec:
  hosts: [api.external.test]
  http:
  - match:
    - uri: {{prefix: /api/}}
    rewrite: {{uri: /v2/}}
    route:
    - destination: {{host: api.external.test}}
  - route:
    - destination: {{host: api.external.test}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: external-api
  namespace: {APP_NS}
spec:
  host: api.external.test
  trafficPolicy:
    tls:
      mode: MUTUAL
      caCertificates: {ca}
      clientCertificate: {cert}
      privateKey: {key}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: no-admin
  namespace: {APP_NS}
spec:
  targetRefs:
  - {{kind: ServiceEntry, group: networking.istio.io, name: external-api}}
  action: DENY
  rules:
  - to:
    - operation:
        paths: [/admin*]
",
        ip = ext.ip(),
        ca = pki.path("ca.pem"),
        cert = pki.path("client.pem"),
        key = pki.path("client-key.pem"),
    );
    let base = [
        k8s::namespace_yaml(APP_NS, &[("istio.io/dataplane-mode", "ambient")]),
        k8s::pod_yaml(&m.client, APP_NS, "client", &[("app", "client")]),
        k8s::pod_yaml(&m.waypoint_pod, APP_NS, "waypoint", &[(common::WAYPOINT_POD_LABEL, "waypoint")]),
    ]
    .concat();
    m.topo.write_config("c.yaml", &(base + &entry))?;
    let server = start_https(ext, &pki, "external-api", Some("ca.pem"))?;
    let (p1, _p2, wp) = m.start()?;

    let ok = m.client.curl(&format!("http://{VIP}/api/books"), TIMEOUT)?;
    assert_eq!(ok.status, 200, "{ok:?}\nwaypoint:\n{}", wp.log_tail());
    assert!(ok.body.contains("hello from external-api sni=api.external.test alpn=http/1.1"), "{}", ok.body);
    assert!(ok.body.contains("path=/v2/books") && !ok.body.contains("client_cert=-"), "{}", ok.body);
    let line = wait_request_lines(&wp, &["path=\"/api/books\"", "status=200"], 1)?.remove(0);
    assert!(line.contains("cluster=outbound|80||api.external.test"), "{line}");
    assert!(line.contains(&format!("upstream={}:{HTTPS_PORT}", ext.ip())), "{line}");
    // The node proxy sent it to the waypoint over mTLS, never to the external address itself.
    let outbound = common::wait_access_line(&p1, &["outbound", "dst.service=api.external.test"], TIMEOUT)?;
    assert!(outbound.contains(&format!("dst.workload={APP_NS}/waypoint")), "{outbound}");
    assert!(outbound.contains("security=mutual_tls"), "{outbound}");

    let denied = m.client.curl(&format!("http://{VIP}/admin/users"), TIMEOUT)?;
    assert_eq!(denied.status, 403, "{denied:?}");
    assert!(!server.log().contains("/admin/users"), "the denied request never left the waypoint");
    Ok(())
}
