//! End to end: the mesh data path between node proxies (SPEC ID-1, ID-3, L4-1, L4-2,
//! L4-3, L4-5, L4-6, CAP-2): HBONE in mutual TLS, identities, source IP, services, passthrough,
//! certificate rotation and refusal of anything that is not a valid peer. Needs root.

mod common;

use std::{collections::BTreeMap, fs, io, path::Path, process::Command, thread, time::Duration};

use common::{
    MESH, PLAIN, TIMEOUT, TwoNodes, access_lines, ca_dir, start_node, start_node_with_config, wait_access_line,
};
use strait_testbed::{EchoKind, Process, UnderlayCapture, bin_path, k8s, pcap};

const HBONE_PORT: u16 = 15008;

fn namespaces() -> String {
    [k8s::namespace_yaml(MESH, &[("istio.io/dataplane-mode", "ambient")]), k8s::namespace_yaml(PLAIN, &[])].concat()
}

fn two_nodes(name: &str) -> io::Result<TwoNodes> {
    TwoNodes::new(name)
}

// L4-1, ID-3: across nodes the request travels only inside TLS 1.3 on port 15008; the server
// sees the client's own IP (L4-6); both access lines name both SPIFFE identities.
#[test]
fn cross_node_traffic_is_tls13_hbone_with_identities_and_source_ip() -> io::Result<()> {
    let t = two_nodes("mesh::hbone")?;
    t.topo.write_config("c.yaml", &t.config("server", &[]))?;
    let _http = t.server.start_echo_server(EchoKind::Http, 8080)?;
    let (p1, p2) = t.start_proxies(&[])?;

    let marker = "x-marker: never-in-clear-7f3a9c";
    let capture = UnderlayCapture::start(&t.topo)?;
    let url = format!("http://{}:8080/", t.server.ip());
    let reply = t.client.curl_args(&["-H", marker, &url])?;
    let segments = capture.finish()?;

    assert!(reply.ok(), "{reply:?}");
    assert!(reply.body.contains(&format!("peer={}:", t.client.ip())), "source IP preserved: {}", reply.body);
    let (client_id, server_id) =
        ("spiffe://cluster.local/ns/mesh/sa/client", "spiffe://cluster.local/ns/mesh/sa/server");
    for (proxy, direction) in [(&p1, "outbound"), (&p2, "inbound")] {
        let line = wait_access_line(proxy, &[direction, &format!("dst.addr={}:8080", t.server.ip())], TIMEOUT)?;
        assert!(line.contains(&format!("src.identity={client_id}")), "{line}");
        assert!(line.contains(&format!("dst.identity={server_id}")), "{line}");
        assert!(line.contains("security=mutual_tls") && line.contains("result=ok"), "{line}");
    }

    let with_payload: Vec<&pcap::Segment> = segments.iter().filter(|s| !s.payload.is_empty()).collect();
    assert!(!with_payload.is_empty(), "the capture saw the traffic");
    for s in &with_payload {
        assert!(s.src.port() == HBONE_PORT || s.dst.port() == HBONE_PORT, "only HBONE crosses the underlay: {s:?}");
        assert!(!pcap::contains(&s.payload, b"never-in-clear"), "request header in clear: {s:?}");
        assert!(!pcap::contains(&s.payload, b"hello from"), "response body in clear: {s:?}");
    }
    let client_hello = with_payload.iter().find(|s| s.dst.port() == HBONE_PORT).expect("a ClientHello");
    assert_eq!(&client_hello.payload[..1], [0x16], "a TLS handshake record");
    assert!(pcap::contains(&client_hello.payload, b"\x02h2"), "ALPN h2 offered");
    let server_hello = with_payload.iter().find(|s| s.src.port() == HBONE_PORT).expect("a ServerHello");
    assert_eq!(server_hello.payload.get(5), Some(&0x02), "ServerHello (segments seen: {:?})", summary(&segments));
    // supported_versions (43) = TLS 1.3 (0x0304) in the ServerHello: the negotiated version.
    assert!(pcap::contains(&server_hello.payload, &[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04]), "TLS 1.3 negotiated");
    Ok(())
}

// L4-6, L4-1: the HBONE connection of a p11 -> p21 request leaves node 1 from p11's own address,
// as Istio ambient's do: on the underlay every segment to port 15008 goes from p11 to p21, every
// answer from p21:15008 goes back to p11, and nothing of it carries node 1's address.
#[test]
fn hbone_connections_leave_from_the_client_pods_address() -> io::Result<()> {
    let t = two_nodes("mesh::hbone_source")?;
    t.topo.write_config("c.yaml", &t.config("server", &[]))?;
    let _http = t.server.start_echo_server(EchoKind::Http, 8080)?;
    let (p1, _p2) = t.start_proxies(&[])?;

    let capture = UnderlayCapture::start(&t.topo)?;
    let reply = t.client.curl(&format!("http://{}:8080/", t.server.ip()), TIMEOUT)?;
    let segments = capture.finish()?;
    assert!(reply.ok(), "{reply:?}");
    wait_access_line(&p1, &["outbound", &format!("dst.addr={}:8080", t.server.ip()), "result=ok"], TIMEOUT)?;

    let (p11, p21, node1) = (t.client.ip(), t.server.ip(), t.n1.ip());
    common::assert_tunnels_between(&segments, p11, p21);
    assert!(
        segments.iter().all(|s| *s.src.ip() != node1 && *s.dst.ip() != node1),
        "nothing on the underlay names node 1 ({node1}): {:?}",
        segments.iter().filter(|s| *s.src.ip() == node1 || *s.dst.ip() == node1).collect::<Vec<_>>()
    );
    // The peer's answers reached the proxy's socket through the capture program.
    assert!(common::stat(&t.n1, "hbone_client_reply") > 0, "{:?}", common::capture_stats(&t.n1)?);
    Ok(())
}

// L4-6: `--hbone-source node` keeps the tunnels on the node's address (for platforms that drop
// host-sent packets with a pod's source); the server still sees the client's own address,
// which travels in `forwarded`.
#[test]
fn hbone_source_node_keeps_the_old_behaviour() -> io::Result<()> {
    let t = two_nodes("mesh::hbone_source_node")?;
    t.topo.write_config("c.yaml", &t.config("server", &[]))?;
    let _http = t.server.start_echo_server(EchoKind::Http, 8080)?;
    let (_p1, _p2) = t.start_proxies(&["--hbone-source", "node"])?;

    let capture = UnderlayCapture::start(&t.topo)?;
    let reply = t.client.curl(&format!("http://{}:8080/", t.server.ip()), TIMEOUT)?;
    let segments = capture.finish()?;
    assert!(reply.ok(), "{reply:?}");
    assert!(reply.body.contains(&format!("peer={}:", t.client.ip())), "source IP preserved: {}", reply.body);

    common::assert_tunnels_between(&segments, t.n1.ip(), t.server.ip());
    assert_eq!(common::stat(&t.n1, "hbone_client_reply"), 0);
    Ok(())
}

/// Each segment's addresses, payload length and first bytes, for failure messages.
fn summary(segments: &[pcap::Segment]) -> Vec<String> {
    segments
        .iter()
        .map(|s| format!("{} > {} {}B {:02x?}", s.src, s.dst, s.payload.len(), &s.payload[..s.payload.len().min(6)]))
        .collect()
}

// ID-3 (secure naming): a server presenting another identity than the destination's is refused
// by the client, and nothing reaches the server pod.
#[test]
fn server_with_another_identity_is_refused() -> io::Result<()> {
    let t = two_nodes("mesh::wrong_identity")?;
    t.topo.write_config("c.yaml", &t.config("server", &[]))?;
    // Node 2 believes the server pod runs as `impostor`, so it proves that identity.
    let node2_config = t.topo.dir().join("node2-config");
    fs::create_dir_all(&node2_config)?;
    fs::write(node2_config.join("c.yaml"), t.config("impostor", &[]))?;
    let ca = ca_dir(&t.topo, "ca");
    let p1 = start_node(&t.topo, &t.n1, &ca, &[])?;
    let _p2 = start_node_with_config(&t.topo, &t.n2, &node2_config, &ca, &[])?;
    let http = t.server.start_echo_server(EchoKind::Http, 8080)?;

    let reply = t.client.curl(&format!("http://{}:8080/", t.server.ip()), TIMEOUT)?;
    assert_eq!(reply.status, 0, "no response may come back: {reply:?}");
    let line = wait_access_line(&p1, &["outbound", "result=upstream_connect_failed"], TIMEOUT)?;
    assert!(line.contains("sa/impostor") && line.contains("sa/server was expected"), "{line}");
    assert_eq!(http.count_log_lines("request peer="), 0);
    Ok(())
}

// ID-3: a client whose certificate chains to another root is refused by the server. Node 1
// trusts node 2's root (its root bundle holds both) but signs with its own; node 2 trusts only
// its own.
#[test]
fn client_signed_by_another_root_is_refused_by_the_server() -> io::Result<()> {
    let t = two_nodes("mesh::foreign_root")?;
    t.topo.write_config("c.yaml", &t.config("server", &[]))?;
    let _http = t.server.start_echo_server(EchoKind::Http, 8080)?;
    let (ca1, ca2) = (ca_dir(&t.topo, "ca1"), ca_dir(&t.topo, "ca2"));
    let p2 = start_node(&t.topo, &t.n2, &ca2, &[])?;
    // Create node 1's CA, then add node 2's root to what node 1 trusts.
    drop(start_node(&t.topo, &t.n1, &ca1, &[])?);
    let bundle =
        [fs::read_to_string(ca1.join("root-cert.pem"))?, fs::read_to_string(ca2.join("root-cert.pem"))?].concat();
    fs::write(ca1.join("root-cert.pem"), bundle)?;
    let p1 = start_node(&t.topo, &t.n1, &ca1, &[])?;

    let reply = t.client.curl(&format!("http://{}:8080/", t.server.ip()), TIMEOUT)?;
    assert_eq!(reply.status, 0, "{reply:?}");
    // A peer that proves no identity gets no access line (OPS-4: a flood of them would be the
    // log); it is counted, and a warning says why.
    let refused = p2.wait_for_log("HBONE handshake failed", TIMEOUT)?;
    assert!(refused.contains("invalid peer certificate"), "{refused}");
    assert!(handshake_failures(&t.n2, "tls") >= 1);
    // The client only learns of the refusal when it next uses the connection (TLS 1.3 finishes
    // on the client side first): an alert, or a broken pipe, either way no tunnel.
    wait_access_line(&p1, &["outbound", "result=upstream_connect_failed"], TIMEOUT)?;
    Ok(())
}

// L4-3: a Service with one endpoint on each node gets about half of 200 connections each.
#[test]
fn service_connections_spread_over_endpoints_on_two_nodes() -> io::Result<()> {
    let t = two_nodes("mesh::service")?;
    let local = t.topo.add_pod(&t.n1, "server-b")?;
    let config = [
        namespaces(),
        k8s::pod_yaml(&t.client, MESH, "client", &[("app", "client")]),
        k8s::pod_yaml(&t.server, MESH, "server", &[("app", "server")]),
        k8s::pod_yaml(&local, MESH, "server", &[("app", "server")]),
        k8s::service_yaml("server", MESH, "10.96.0.20", &[(80, 8080)], &[("app", "server")]),
    ]
    .concat();
    t.topo.write_config("c.yaml", &config)?;
    let _servers = [t.server.start_echo_server(EchoKind::Http, 8080)?, local.start_echo_server(EchoKind::Http, 8080)?];
    let (p1, _p2) = t.start_proxies(&[])?;

    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..200 {
        let reply = t.client.curl("http://10.96.0.20/", TIMEOUT)?;
        assert!(reply.ok(), "{reply:?}");
        let who = reply.body.split_whitespace().nth(2).unwrap_or("?").to_owned();
        *answers.entry(who).or_default() += 1;
    }
    let (remote, near) = (answers.get("server").copied().unwrap_or(0), answers.get("server-b").copied().unwrap_or(0));
    assert_eq!(remote + near, 200, "{answers:?}");
    assert!((70..=130).contains(&remote), "about half each: {answers:?}");
    let line = wait_access_line(&p1, &["outbound", "dst.service=server.mesh.svc.cluster.local"], TIMEOUT)?;
    assert!(line.contains(":8080") && line.contains("security=mutual_tls"), "targetPort applied: {line}");
    Ok(())
}

// L4-5: a destination outside the mesh is reached in plain TCP.
#[test]
fn destination_outside_the_mesh_gets_plain_tcp() -> io::Result<()> {
    let t = two_nodes("mesh::passthrough")?;
    let config =
        [namespaces(), k8s::pod_yaml(&t.client, MESH, "client", &[]), k8s::pod_yaml(&t.server, PLAIN, "server", &[])]
            .concat();
    t.topo.write_config("c.yaml", &config)?;
    let _http = t.server.start_echo_server(EchoKind::Http, 8080)?;
    let (p1, _p2) = t.start_proxies(&[])?;
    let capture = UnderlayCapture::start(&t.topo)?;
    let reply = t.client.curl(&format!("http://{}:8080/", t.server.ip()), TIMEOUT)?;
    let segments = capture.finish()?;
    assert!(reply.ok(), "{reply:?}");
    let line = wait_access_line(&p1, &["outbound", &format!("dst.addr={}:8080", t.server.ip())], TIMEOUT)?;
    assert!(line.contains("security=none") && line.contains("result=ok"), "{line}");
    assert!(
        segments.iter().any(|s| s.dst.port() == 8080 && pcap::contains(&s.payload, b"GET / HTTP/1.1")),
        "plain TCP"
    );
    assert!(segments.iter().all(|s| s.dst.port() != HBONE_PORT), "no HBONE for a non-mesh destination");
    Ok(())
}

// ID-1: certificates with a 10 s lifetime are renewed at half life during a 30 s connection,
// which completes intact; new connections afterwards use the new certificates.
#[test]
fn certificates_rotate_during_a_long_transfer() -> io::Result<()> {
    let t = two_nodes("mesh::rotation")?;
    t.topo.write_config("c.yaml", &t.config("server", &[]))?;
    let _tcp = t.server.start_echo_server(EchoKind::Tcp, 9000)?;
    let _http = t.server.start_echo_server(EchoKind::Http, 8080)?;
    let (p1, p2) = t.start_proxies(&["--cert-ttl", "10s"])?;
    let echo = bin_path("strait-echo");
    let target = format!("{}:9000", t.server.ip());
    let hold = t.client.spawn("hold", &echo, &["hold", &target, "--secs", "30"], &[])?;
    let status = hold.wait_exit(Duration::from_secs(45)).expect("the transfer finishes");
    assert!(status.success(), "the connection broke during rotation: {}", hold.log_tail());
    assert!(hold.count_log_lines("ok ") >= 100, "{}", hold.log_tail());

    let issued = |p: &Process, sa: &str| {
        p.count_log_lines(&format!("certificate issued identity=spiffe://cluster.local/ns/mesh/sa/{sa}"))
    };
    assert!(issued(&p1, "client") >= 5, "client certificate renewed every ~5 s:\n{}", p1.log_tail());
    assert!(issued(&p2, "server") >= 5, "server certificate renewed every ~5 s:\n{}", p2.log_tail());
    let line = wait_access_line(&p1, &["outbound", &format!("dst.addr={target}")], TIMEOUT)?;
    assert!(line.contains("result=ok"), "{line}");
    let reply = t.client.curl(&format!("http://{}:8080/", t.server.ip()), TIMEOUT)?;
    assert!(reply.ok(), "a new connection after rotation: {reply:?}");
    Ok(())
}

/// Writes a client certificate for `identity` signed by the CA in `ca`, with openssl, the way
/// any foreign HBONE client would hold one.
fn openssl_client_cert(ca: &Path, dir: &Path, identity: &str) -> io::Result<(String, String)> {
    let (key, csr, cert, ext) = (dir.join("k.pem"), dir.join("r.csr"), dir.join("c.pem"), dir.join("ext.cnf"));
    fs::write(
        &ext,
        format!("subjectAltName=URI:{identity}\nextendedKeyUsage=clientAuth,serverAuth\nkeyUsage=digitalSignature\n"),
    )?;
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let steps: [Vec<String>; 3] = [
        vec![
            "ecparam".into(),
            "-name".into(),
            "prime256v1".into(),
            "-genkey".into(),
            "-noout".into(),
            "-out".into(),
            s(&key),
        ],
        vec![
            "req".into(),
            "-new".into(),
            "-key".into(),
            s(&key),
            "-subj".into(),
            "/O=test".into(),
            "-out".into(),
            s(&csr),
        ],
        vec![
            "x509".into(),
            "-req".into(),
            "-in".into(),
            s(&csr),
            "-CA".into(),
            s(&ca.join("ca-cert.pem")),
            "-CAkey".into(),
            s(&ca.join("ca-key.pem")),
            "-CAcreateserial".into(),
            "-days".into(),
            "1".into(),
            "-extfile".into(),
            s(&ext),
            "-out".into(),
            s(&cert),
        ],
    ];
    for args in steps {
        let out = Command::new("openssl").args(&args).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr))));
        }
    }
    Ok((s(&cert), s(&key)))
}

/// `strait_hbone_handshake_failures_total{reason}` on a node proxy's `/metrics`.
fn handshake_failures(node: &strait_testbed::Node, reason: &str) -> u64 {
    let series = format!("strait_hbone_handshake_failures_total{{reason=\"{reason}\"}} ");
    node.run_ok("curl", &["-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"])
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

// L4-1: garbage on 15008 (not TLS, TLS without a client certificate, HTTP/2 without CONNECT) is
// refused, and an open mesh connection is not disturbed.
#[test]
fn garbage_on_the_hbone_port_is_refused_without_harm() -> io::Result<()> {
    let t = two_nodes("mesh::garbage")?;
    let outsider = t.topo.add_pod(&t.n1, "outsider")?;
    let config = [t.config("server", &[]), k8s::pod_yaml(&outsider, PLAIN, "default", &[])].concat();
    t.topo.write_config("c.yaml", &config)?;
    let _tcp = t.server.start_echo_server(EchoKind::Tcp, 9000)?;
    let (_p1, p2) = t.start_proxies(&[])?;
    let echo = bin_path("strait-echo");
    let hold = t.client.spawn("hold", &echo, &["hold", &format!("{}:9000", t.server.ip()), "--secs", "6"], &[])?;
    hold.wait_for_log("ok 2", TIMEOUT)?;

    let hbone = format!("{}:{HBONE_PORT}", t.server.ip());
    // Plain HTTP where TLS is expected.
    let reply = outsider.curl(&format!("http://{hbone}/"), TIMEOUT)?;
    assert_eq!(reply.status, 0, "{reply:?}");
    // TLS without a client certificate.
    let reply = outsider.curl_args(&["-k", "--http2", &format!("https://{hbone}/")])?;
    assert_eq!(reply.status, 0, "{reply:?}");
    // A valid mesh certificate, but HTTP/2 GET instead of CONNECT.
    let (cert, key) =
        openssl_client_cert(&ca_dir(&t.topo, "ca"), t.topo.dir(), "spiffe://cluster.local/ns/plain/sa/default")?;
    let reply = outsider.curl_args(&["-k", "--http2", "--cert", &cert, "--key", &key, &format!("https://{hbone}/")])?;
    assert_eq!(reply.status, 400, "{reply:?}");

    wait_access_line(&p2, &["inbound", "result=refused", "is not CONNECT"], TIMEOUT)?;
    let refusals = access_lines(&p2, &["inbound", "result=refused"]);
    assert!(handshake_failures(&t.n2, "tls") >= 2, "{}", p2.log_tail());
    assert!(refusals.iter().any(|l| l.contains("is not CONNECT")), "{refusals:#?}");
    let status = hold.wait_exit(TIMEOUT).expect("hold finishes");
    assert!(status.success(), "the mesh connection was disturbed: {}", hold.log_tail());
    assert!(p2.is_running());
    thread::sleep(Duration::from_millis(10));
    Ok(())
}

// ID-2: a second node proxy obtains its certificates from the first one's CA, over Istio's CA
// API, and the two interoperate.
#[test]
fn second_proxy_gets_certificates_from_the_first_ones_ca_api() -> io::Result<()> {
    let t = two_nodes("mesh::ca_api")?;
    t.topo.write_config("c.yaml", &t.config("server", &[]))?;
    let _http = t.server.start_echo_server(EchoKind::Http, 8080)?;
    let token = t.topo.dir().join("ca-token");
    fs::write(&token, "s3cret-bootstrap-token\n")?;
    let token = token.to_string_lossy().into_owned();
    let ca1 = ca_dir(&t.topo, "ca1");
    let p1 = start_node(&t.topo, &t.n1, &ca1, &["--ca-listen", "0.0.0.0:15012", "--ca-token-file", &token])?;
    let root = ca1.join("root-cert.pem").to_string_lossy().into_owned();
    let address = format!("https://{}:15012", t.n1.ip());
    let unused = ca_dir(&t.topo, "never-created");
    let remote =
        ["--ca-address", &address, "--ca-root", &root, "--ca-token-file", &token, "--ca-server-name", "strait-ca"];
    let p2 = start_node(&t.topo, &t.n2, &unused, &remote)?;

    let reply = t.client.curl(&format!("http://{}:8080/", t.server.ip()), TIMEOUT)?;
    assert!(reply.ok(), "{reply:?}");
    p2.wait_for_log("certificate issued identity=spiffe://cluster.local/ns/mesh/sa/server", TIMEOUT)?;
    let inbound = wait_access_line(&p2, &["inbound", "result=ok"], TIMEOUT)?;
    assert!(inbound.contains("src.identity=spiffe://cluster.local/ns/mesh/sa/client"), "{inbound}");
    wait_access_line(&p1, &["outbound", "result=ok", "security=mutual_tls"], TIMEOUT)?;
    assert!(!unused.exists(), "node 2 must not have made a CA of its own");

    // A proxy with the wrong token gets nothing.
    fs::write(t.topo.dir().join("bad-token"), "wrong\n")?;
    let bad = t.topo.dir().join("bad-token").to_string_lossy().into_owned();
    let n3 = t.topo.add_node("node3")?;
    let lonely = t.topo.add_pod(&n3, "lonely")?;
    t.topo.write_config("c3.yaml", &k8s::pod_yaml(&lonely, MESH, "lonely", &[]))?;
    let refused =
        ["--ca-address", &address, "--ca-root", &root, "--ca-token-file", &bad, "--ca-server-name", "strait-ca"];
    let p3 = start_node(&t.topo, &n3, &unused, &refused)?;
    let line = p3.wait_for_log("cannot obtain a certificate", TIMEOUT)?;
    assert!(line.to_lowercase().contains("unauthenticated") || line.contains("token"), "{line}");
    Ok(())
}

/// Node 1's pooled outbound HBONE connections, from the admin API's `/hbone`.
fn pooled_hbone(node: &strait_testbed::Node) -> io::Result<Vec<serde_json::Value>> {
    let body = node.run_ok("curl", &["-sS", "--max-time", "5", "http://127.0.0.1:15000/hbone"])?;
    let list: serde_json::Value = serde_json::from_str(&body).map_err(|e| io::Error::other(format!("{e}: {body}")))?;
    list.as_array().cloned().ok_or_else(|| io::Error::other(format!("not a list: {body}")))
}

/// The established connections to port 15008 in a node's namespace, as `ss` sees them.
fn hbone_sockets(node: &strait_testbed::Node) -> io::Result<Vec<String>> {
    let out = node.run_ok("ss", &["-Htn", "state", "established", "( dport = :15008 )"])?;
    Ok(out.lines().filter(|l| !l.trim().is_empty()).map(str::to_owned).collect())
}

/// The IP of an `ip:port`.
fn ip_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(ip, _)| ip)
}

fn field<'a>(c: &'a serde_json::Value, key: &str) -> &'a str {
    c.get(key).and_then(serde_json::Value::as_str).unwrap_or_default()
}

/// The `strait_hbone_pool_connections` gauge of a node proxy.
fn pool_gauge(node: &strait_testbed::Node) -> io::Result<Option<u64>> {
    common::proxy_metric(node, "strait_hbone_pool_connections")
}

// L4-1, L4-6: two client pods of one identity on one node each get their own pooled HBONE
// connection to the same server pod; the admin API, the gauge and the kernel agree on two.
#[test]
fn client_pods_of_one_identity_never_share_an_hbone_connection() -> io::Result<()> {
    let t = two_nodes("mesh::pool_per_pod")?;
    let other = t.topo.add_pod(&t.n1, "client2")?;
    let config = [t.config("server", &[]), k8s::pod_yaml(&other, MESH, "client", &[("app", "client")])].concat();
    t.topo.write_config("c.yaml", &config)?;
    let _http = t.server.start_echo_server(EchoKind::Http, 8080)?;
    let (_p1, _p2) = t.start_proxies(&[])?;

    let url = format!("http://{}:8080/", t.server.ip());
    // Two requests each: the second of a pod reuses its connection, never the other pod's.
    for pod in [&t.client, &other, &t.client, &other] {
        let reply = pod.curl(&url, TIMEOUT)?;
        assert!(reply.ok(), "{reply:?}");
        assert!(reply.body.contains(&format!("peer={}:", pod.ip())), "source IP preserved: {}", reply.body);
    }

    let pooled = pooled_hbone(&t.n1)?;
    assert_eq!(pooled.len(), 2, "one pooled connection per client pod: {pooled:#?}");
    let peer = format!("{}:{HBONE_PORT}", t.server.ip());
    for c in &pooled {
        assert_eq!(field(c, "source_identity"), "spiffe://cluster.local/ns/mesh/sa/client", "{c}");
        assert_eq!(field(c, "destination_identity"), "spiffe://cluster.local/ns/mesh/sa/server", "{c}");
        assert_eq!(field(c, "peer"), peer, "{c}");
        assert_eq!(c.get("streams").and_then(serde_json::Value::as_u64), Some(0), "requests done: {c}");
        assert!(c.get("idle_s").and_then(serde_json::Value::as_u64).is_some_and(|s| s < 60), "{c}");
    }
    let mut binds: Vec<&str> = pooled.iter().map(|c| field(c, "bind")).collect();
    binds.sort_unstable();
    let mut pods = vec![t.client.ip().to_string(), other.ip().to_string()];
    pods.sort();
    assert_eq!(binds, pods, "keyed on each client pod's address: {pooled:#?}");
    let locals: Vec<&str> = pooled.iter().map(|c| field(c, "local")).collect();
    assert_ne!(locals[0], locals[1], "two sockets: {pooled:#?}");
    let mut local_ips: Vec<&str> = locals.iter().map(|l| ip_of(l)).collect();
    local_ips.sort_unstable();
    assert_eq!(local_ips, pods, "each connection leaves from its pod's own address: {pooled:#?}");

    // The kernel's view in node 1's namespace: exactly those two connections.
    let sockets = hbone_sockets(&t.n1)?;
    assert_eq!(sockets.len(), 2, "{sockets:#?}");
    for local in &locals {
        assert!(sockets.iter().any(|s| s.contains(local)), "{local} not in {sockets:#?}");
    }
    assert_eq!(pool_gauge(&t.n1)?, Some(2));
    Ok(())
}

// L4-1, L4-2: a connection dialled to one server pod never carries streams for another pod of
// the same identity on the same node (a peer may check the tunnel's address against the
// CONNECT target): one client talking to both gets two connections, one per address.
#[test]
fn a_connection_to_one_pod_is_not_reused_for_another_pod_of_the_same_identity() -> io::Result<()> {
    let t = two_nodes("mesh::pool_per_dest")?;
    let server2 = t.topo.add_pod(&t.n2, "server2")?;
    let config = [t.config("server", &[]), k8s::pod_yaml(&server2, MESH, "server", &[("app", "server")])].concat();
    t.topo.write_config("c.yaml", &config)?;
    let _http = t.server.start_echo_server(EchoKind::Http, 8080)?;
    let _http2 = server2.start_echo_server(EchoKind::Http, 8080)?;
    let (_p1, _p2) = t.start_proxies(&[])?;

    for server in [&t.server, &server2, &t.server, &server2] {
        let reply = t.client.curl(&format!("http://{}:8080/", server.ip()), TIMEOUT)?;
        assert!(reply.ok(), "{reply:?}");
    }

    let pooled = pooled_hbone(&t.n1)?;
    assert_eq!(pooled.len(), 2, "one pooled connection per destination pod: {pooled:#?}");
    let mut peers: Vec<&str> = pooled.iter().map(|c| field(c, "peer")).collect();
    peers.sort_unstable();
    let mut expected = vec![format!("{}:{HBONE_PORT}", t.server.ip()), format!("{}:{HBONE_PORT}", server2.ip())];
    expected.sort();
    assert_eq!(peers, expected, "{pooled:#?}");
    for c in &pooled {
        assert_eq!(field(c, "bind"), t.client.ip().to_string(), "{c}");
        assert_eq!(ip_of(field(c, "local")), t.client.ip().to_string(), "from the client pod's address: {c}");
        assert_eq!(field(c, "destination_identity"), "spiffe://cluster.local/ns/mesh/sa/server", "{c}");
    }
    let sockets = hbone_sockets(&t.n1)?;
    assert_eq!(sockets.len(), 2, "{sockets:#?}");
    for peer in &expected {
        assert!(sockets.iter().any(|s| s.contains(peer.as_str())), "{peer} not in {sockets:#?}");
    }
    Ok(())
}
