//! End to end: mesh traffic to external hosts steered by the `mesh` routes of VirtualServices
//! (SPEC GW-3, GW-4, L4-5, L7-8): seed 002's two-hop egress through the real egress gateway
//! (`strait gateway --labels istio=egressgateway`, reached over HBONE), and seed 000's mesh
//! half, where in-mesh calls to the proxied hosts are sent to `localhost.local` (127.0.0.1),
//! i.e. blackholed. External hosts are our servers in pods no configuration names, found
//! through a resolver of ours (`strait-echo dns`). Needs root.

mod common;

use std::{fs, io, path::Path, process::Command, time::Duration};

use common::{
    Control, TIMEOUT, ca_dir, registry_only_refusals, start_egress_gateway, start_node, wait_access_line, wait_log_line,
};
use strait_testbed::{EchoKind, Process, Topology, bin_path, k8s};

/// Seed 002's resources, verbatim: the ServiceEntry, the Gateway selecting the egress gateway,
/// the DestinationRule with the `cnn` subset of the egress gateway's service, and the
/// VirtualService bound to `mesh` and the Gateway.
const SEED_002: &str = include_str!("../../proxy/tests/fixtures/samples/seed-002-egress-gateway.yaml");

// GW-3, GW-4 (seed 002), L4-5: under REGISTRY_ONLY, the sleep pod's `curl
// http://edition.cnn.com/politics` leaves its node over HBONE (mutual TLS) to the egress
// gateway's pod, which routes it by Host through the Gateway-bound route to the external host
// (resolved through DNS): the stand-in sees the gateway's address, not the pod's; the gateway's
// access line shows path and host. A host without a ServiceEntry is refused at the node.
#[test]
fn seed_002_egress_through_the_egress_gateway() -> io::Result<()> {
    seed_002("egressgw::seed002", false)
}

// GW-3, CFG-3: the same with the node proxy following `strait control`: the route and the
// subset reach it over xDS (the gateway reads the directory, with the control plane's CA).
#[test]
fn seed_002_with_the_node_following_the_control_plane() -> io::Result<()> {
    seed_002("egressgw::seed002xds", true)
}

fn seed_002(test: &str, over_xds: bool) -> io::Result<()> {
    let topo = Topology::new(test)?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let sleep = topo.add_pod(&n1, "sleep")?;
    let egress = topo.add_pod(&n2, "egressgateway")?;
    let (cnn, unlisted, resolver) =
        (topo.add_pod(&n2, "cnn")?, topo.add_pod(&n2, "unlisted")?, topo.add_pod(&n2, "resolver")?);
    let _cnn = cnn.echo_server(EchoKind::Http, 80).name("cnn-stand-in").start()?;
    let _unlisted = unlisted.echo_server(EchoKind::Http, 80).name("unlisted-server").start()?;
    let _dns = resolver
        .start_dns(&[format!("edition.cnn.com={}", cnn.ip()), format!("unlisted.example.com={}", unlisted.ip())])?;
    for netns in [n1.netns(), sleep.netns(), egress.netns()] {
        netns.use_resolver(resolver.ip())?;
    }
    let cluster = [
        k8s::namespace_yaml("akv2k8s-test", &[("istio-injection", "enabled"), ("istio.io/dataplane-mode", "ambient")]),
        k8s::namespace_yaml("istio-system", &[]),
        k8s::pod_yaml(&sleep, "akv2k8s-test", "sleep", &[("app", "sleep")]),
        k8s::pod_yaml(
            &egress,
            "istio-system",
            "istio-egressgateway",
            &[("istio", "egressgateway"), ("app", "istio-egressgateway"), ("strait.io/gateway", "true")],
        ),
        k8s::named_service_yaml(
            "istio-egressgateway",
            "istio-system",
            "10.96.0.80",
            &[("http2", 80, 8080), ("https", 443, 8443)],
            &[("istio", "egressgateway")],
            &[],
        ),
        k8s::mesh_config_yaml("REGISTRY_ONLY"),
    ]
    .concat();
    topo.write_config("cluster.yaml", &cluster)?;
    topo.write_config("seed-002.yaml", SEED_002)?;
    let (_control, p1, ca) = if over_xds {
        let control = Control::new(&topo, topo.add_node("control")?);
        let running = control.start(&topo, &[])?;
        let p1 = control.start_node(&topo, &n1)?;
        (Some(running), p1, control.ca_dir.clone())
    } else {
        let ca = ca_dir(&topo, "ca");
        (None, start_node(&topo, &n1, &ca, &[])?, ca)
    };
    let gw = start_egress_gateway(&topo, &egress, &ca, &["--port-map", "80=8080,443=8443"])?;
    p1.wait_for_log("ServiceEntry host resolved", TIMEOUT)?;
    for proxy in [&p1, &gw] {
        let log = proxy.log();
        assert!(!log.lines().any(|l| l.contains("WARN") && l.contains(".yaml")), "the seed loads cleanly:\n{log}");
    }

    let reply = sleep.curl("http://edition.cnn.com/politics", TIMEOUT)?;
    assert_eq!(reply.status, 200, "{reply:?}\n{}\n{}", p1.log_tail(), gw.log_tail());
    assert!(reply.body.contains("hello from cnn-stand-in") && reply.body.contains("path=/politics"), "{reply:?}");
    assert!(reply.body.contains(&format!("peer={}:", egress.ip())), "the stand-in sees the gateway: {reply:?}");
    assert!(!reply.body.contains(&format!("peer={}:", sleep.ip())), "never the pod: {reply:?}");

    // The source node: over mutual TLS to the gateway's pod, as the sleep pod's identity.
    let line = wait_access_line(
        &p1,
        &["outbound", "dst.service=istio-egressgateway.istio-system.svc.cluster.local"],
        TIMEOUT,
    )?;
    for want in [
        "security=mutual_tls",
        "dst.workload=istio-system/egressgateway",
        "dst.identity=spiffe://cluster.local/ns/istio-system/sa/istio-egressgateway",
        "src.identity=spiffe://cluster.local/ns/akv2k8s-test/sa/sleep",
        &format!("dst.addr={}:8080", egress.ip()),
        "result=ok",
    ] {
        assert!(line.contains(want), "{want}: {line}");
    }
    // The egress gateway: the request by path and host, from the pod's identity, to the
    // external host's service through the Gateway-bound route.
    let line = wait_log_line(&gw, &[" http ", "path=\"/politics\""])?;
    for want in [
        "authority=edition.cnn.com",
        "status=200",
        "dst.service=edition.cnn.com",
        "src.identity=spiffe://cluster.local/ns/akv2k8s-test/sa/sleep",
        "route=akv2k8s-test/direct-cnn-through-egress-gateway",
        &format!("upstream={}:80", cnn.ip()),
    ] {
        assert!(line.contains(want), "{want}: {line}");
    }

    // REGISTRY_ONLY: a host without a ServiceEntry is reset at the node, counted, and told why.
    let refused = sleep.curl("http://unlisted.example.com/", TIMEOUT)?;
    assert_eq!(refused.status, 0, "refused: {refused:?}");
    let line =
        wait_access_line(&p1, &["outbound", &format!("dst.addr={}:80", unlisted.ip()), "result=refused"], TIMEOUT)?;
    assert!(line.contains("REGISTRY_ONLY"), "{line}");
    assert_eq!(registry_only_refusals(&n1)?, 1);
    assert!(!_unlisted.log().contains("peer="), "nothing reached the unlisted server: {}", _unlisted.log());
    Ok(())
}

/// Seed 000's ServiceEntries, DestinationRule, Gateway and VirtualServices, verbatim (namespace
/// `default`, as `kubectl apply` without `-n` puts them).
const SEED_000: &str = include_str!("../../proxy/tests/fixtures/samples/seed-000-proxy-external.yaml");

/// A self-signed certificate for `host`, as `<dir>/<host>.crt|key`.
fn self_signed(dir: &Path, host: &str) -> io::Result<(String, String)> {
    fs::create_dir_all(dir)?;
    let (crt, key) = (dir.join(format!("{host}.crt")), dir.join(format!("{host}.key")));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2"])
        .args(["-subj", &format!("/CN={host}"), "-addext", &format!("subjectAltName=DNS:{host}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!("openssl: {}", String::from_utf8_lossy(&out.stderr))));
    }
    Ok((crt.to_string_lossy().into_owned(), key.to_string_lossy().into_owned()))
}

/// `strait-echo https` on `port` in `netns_of` (a pod or a node), logging each handshake.
fn start_https(
    spawn: impl Fn(&str, &[&str]) -> io::Result<Process>,
    port: &str,
    cert: &(String, String),
    name: &str,
) -> io::Result<Process> {
    let server =
        spawn(&format!("https-{name}"), &["https", port, "--cert", &cert.0, "--key", &cert.1, "--name", name])?;
    server.wait_for_log("listening on", TIMEOUT)?;
    Ok(server)
}

// GW-4 (seed 000), L7-8: with the seed's configuration, in-mesh calls to httpbin.org:80 (an
// `http[]` route by port and gateway) and to edition.cnn.com:443 (a `tls[]` route by SNI, read
// from the ClientHello without consuming it) go to localhost.local, STATIC 127.0.0.1: the node
// proxy refuses to dial its own loopback (where servers of ours listen, to catch it if it did),
// so the calls fail, nothing reaches the stand-ins, and the access lines say why. Another SNI
// to the same address is no route's and reaches the external host untouched.
#[test]
fn seed_000_mesh_calls_are_blackholed() -> io::Result<()> {
    let topo = Topology::new("egressgw::seed000")?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let sleep = topo.add_pod(&n1, "sleep")?;
    let (httpbin, cnn, resolver) =
        (topo.add_pod(&n2, "httpbin")?, topo.add_pod(&n2, "cnn")?, topo.add_pod(&n2, "resolver")?);
    let pki = topo.dir().join("pki");
    let cnn_cert = self_signed(&pki, "edition.cnn.com")?;
    let other_cert = self_signed(&pki, "other.example.com")?;
    let _httpbin = httpbin.echo_server(EchoKind::Http, 80).name("httpbin-stand-in").start()?;
    let cnn_tls = start_https(|n, a| cnn.spawn(n, bin_path("strait-echo"), a, &[]), "443", &cnn_cert, "cnn-stand-in")?;
    // Traps on node 1's own loopback: answering there would mean the node proxy dialled it.
    let trap_http = n1.spawn("trap-http", bin_path("strait-echo"), &["http", "80", "--name", "node-loopback"], &[])?;
    trap_http.wait_for_log("listening on", TIMEOUT)?;
    let trap_tls =
        start_https(|n, a| n1.spawn(n, bin_path("strait-echo"), a, &[]), "443", &other_cert, "node-loopback-tls")?;
    let _dns =
        resolver.start_dns(&[format!("httpbin.org={}", httpbin.ip()), format!("edition.cnn.com={}", cnn.ip())])?;
    for netns in [n1.netns(), sleep.netns()] {
        netns.use_resolver(resolver.ip())?;
    }
    let cluster = [
        k8s::namespace_yaml("default", &[("istio.io/dataplane-mode", "ambient")]),
        k8s::pod_yaml(&sleep, "default", "sleep", &[("app", "sleep")]),
    ]
    .concat();
    topo.write_config("cluster.yaml", &cluster)?;
    topo.write_config("seed-000.yaml", SEED_000)?;
    let p1 = start_node(&topo, &n1, &ca_dir(&topo, "ca"), &[])?;
    p1.wait_for_log("ServiceEntry host resolved", TIMEOUT)?;
    assert!(
        sleep.run_ok("curl", &["-sS", "--max-time", "5", "http://127.0.0.1:80/"]).is_err(),
        "the pod's own loopback has no server: a reply could only come from the node's"
    );

    let http = sleep.curl("http://httpbin.org/status/418", TIMEOUT)?;
    assert_eq!(http.status, 0, "blackholed: {http:?}");
    let line = wait_access_line(&p1, &["outbound", "dst.service=localhost.local", "result=refused"], TIMEOUT)?;
    assert!(line.contains("httpbin.org") && line.contains("127.0.0.1:80") && line.contains("loopback"), "{line}");

    let tls = sleep.curl_args(&["-k", "--max-time", "5", "https://edition.cnn.com/"])?;
    assert_eq!(tls.status, 0, "blackholed: {tls:?}");
    let line = wait_access_line(&p1, &["outbound", "dst.service=localhost.local", "127.0.0.1:443"], TIMEOUT)?;
    assert!(line.contains("result=refused") && line.contains("SNI edition.cnn.com"), "{line}");

    // Nothing reached the stand-ins, nor the node's loopback.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!_httpbin.log().contains("peer="), "{}", _httpbin.log());
    for server in [&cnn_tls, &trap_tls] {
        assert!(!server.log().contains("tls peer="), "{}", server.log());
    }
    assert!(!trap_http.log().contains("peer="), "{}", trap_http.log());

    // Another name on the same address is no route's: its ClientHello reaches the external
    // server as the client sent it.
    let resolve = format!("other.example.com:443:{}", cnn.ip());
    let other = sleep.curl_args(&["-k", "--resolve", &resolve, "--max-time", "5", "https://other.example.com/"])?;
    assert_eq!(other.status, 200, "{other:?}\n{}", p1.log_tail());
    assert!(
        other.body.contains("hello from cnn-stand-in") && other.body.contains("sni=other.example.com"),
        "{other:?}"
    );
    wait_access_line(
        &p1,
        &["outbound", "dst.service=edition.cnn.com", &format!("dst.addr={}:443", cnn.ip()), "result=ok"],
        TIMEOUT,
    )?;
    Ok(())
}
