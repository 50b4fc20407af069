//! End to end: the CA API of `strait control --kubernetes` authorizes callers by their
//! Kubernetes service-account tokens (SPEC ID-2, CFG-3), as istiod does. A real kube-apiserver on
//! a real etcd issues pod-bound tokens (TokenRequest) and verifies them (TokenReview); the test
//! asks for certificates over gRPC on TLS with a client written from the public protos:
//! - a node proxy's token gets the identity of a pod on its node, not of a pod on another node,
//!   and its own identity naming its node;
//! - a pod's token gets its own identity only;
//! - a token for a deleted pod, for another audience, of another cluster, or not a token at all
//!   is refused, and so is any token not reviewed yet while the API server is down; a token of
//!   an unrelated service account, or a node proxy's token bound to no pod, cannot impersonate;
//! - a burst of requests with one token makes one TokenReview; the ADS port takes the tokens too;
//! - a node proxy bootstraps with its projected token, then follows over mutual TLS.
//!
//! Needs root and `cargo xtask setup` (kube-apiserver, etcd).

mod common;

use std::{
    io,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::{certificate_text, csr, impersonating};
use strait_proto::{
    envoy::{
        config::core::v3::Node as XdsNode,
        service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse},
    },
    istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse},
};
use strait_testbed::{FABRIC_GATEWAY, Node, Process, Topology, bin_path, grpc as raw, kube::KubeApi};

const CA: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
const ADS: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const TIMEOUT: Duration = Duration::from_secs(20);
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";
const STRAIT_NODE: &str = "spiffe://cluster.local/ns/strait-system/sa/strait-node";
/// gRPC status codes.
const UNAUTHENTICATED: u32 = 16;
const PERMISSION_DENIED: u32 = 7;
const UNAVAILABLE: u32 = 14;
/// Requests sent at once with one token.
const BURST: usize = 20;

/// The node proxies (strait's DaemonSet: one pod per node, service account strait-node) and
/// the workloads: web-0 on node-a, db-0 on node-b, gone-0 (deleted during the test) on node-a.
const OBJECTS: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: strait-system}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: strait-node, namespace: strait-system}
---
apiVersion: v1
kind: Pod
metadata: {name: strait-node-a, namespace: strait-system}
spec: {nodeName: node-a, serviceAccountName: strait-node, containers: [{name: node, image: example.invalid/strait:1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: strait-node-b, namespace: strait-system}
spec: {nodeName: node-b, serviceAccountName: strait-node, containers: [{name: node, image: example.invalid/strait:1}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: db, namespace: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: other, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: web, image: example.invalid/web:1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop}
spec: {nodeName: node-b, serviceAccountName: db, containers: [{name: db, image: example.invalid/db:1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: gone-0, namespace: shop}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: web, image: example.invalid/web:1}]}
";

/// `strait control --kubernetes` on `node`, with the API server's kubeconfig; waits until ready.
fn start_control(topo: &Topology, node: &Node, api: &KubeApi) -> io::Result<Process> {
    let (listen, metrics) = (format!("{}:15012", node.ip()), format!("{}:15014", node.ip()));
    let ca = topo.dir().join("control-ca").to_string_lossy().into_owned();
    let kubeconfig = api.kubeconfig().to_string_lossy().into_owned();
    let args = ["control", "--kubernetes", "--listen", &listen, "--metrics-addr", &metrics, "--ca-dir", &ca];
    let envs = [("KUBECONFIG", kubeconfig.as_str()), ("STRAIT_LOG", "info,strait::identity=debug")];
    let control = node.spawn("strait-control", bin_path("strait"), &args, &envs)?;
    control.wait_for_log("strait control ready", TIMEOUT)?;
    Ok(control)
}

/// `token` (the API server's) with `exp` moved to `seconds` from now (`iat` and `nbf` an hour
/// before that), signed again with the API server's service-account key (ES256), as the API
/// server would have issued it.
fn resign(api: &KubeApi, token: &str, seconds: i64) -> io::Result<String> {
    let bad = |what: &str| io::Error::other(format!("{what} in token {token}"));
    let mut parts = token.split('.');
    let (header, payload) =
        (parts.next().ok_or_else(|| bad("no header"))?, parts.next().ok_or_else(|| bad("no claims"))?);
    let mut claims: serde_json::Value =
        serde_json::from_slice(&base64url_decode(payload).ok_or_else(|| bad("bad base64"))?)
            .map_err(io::Error::other)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(io::Error::other)?.as_secs() as i64;
    claims["exp"] = (now + seconds).into();
    claims["iat"] = (now + seconds - 3600).into();
    claims["nbf"] = (now + seconds - 3600).into();
    let signed = format!("{header}.{}", base64url_encode(&serde_json::to_vec(&claims).map_err(io::Error::other)?));
    let message = api.dir().join(format!("resign-{seconds}.msg"));
    std::fs::write(&message, &signed)?;
    let key = api.dir().join("pki/sa.key");
    let out = std::process::Command::new("openssl")
        .arg("dgst")
        .arg("-sha256")
        .arg("-sign")
        .arg(&key)
        .arg(&message)
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!("openssl dgst: {}", String::from_utf8_lossy(&out.stderr))));
    }
    let signature = jose_signature(&out.stdout).ok_or_else(|| bad("openssl's signature not DER"))?;
    Ok(format!("{signed}.{}", base64url_encode(&signature)))
}

/// An ECDSA P-256 signature as JWS wants it (r and s, 32 bytes each) from DER
/// (`SEQUENCE { INTEGER r, INTEGER s }`).
fn jose_signature(der: &[u8]) -> Option<Vec<u8>> {
    let body = der.strip_prefix(&[0x30])?;
    let (&len, mut rest) = body.split_first()?;
    if usize::from(len) != rest.len() {
        return None;
    }
    let mut out = Vec::with_capacity(64);
    for _ in 0..2 {
        let (&tag, after) = rest.split_first()?;
        let (&n, after) = after.split_first()?;
        if tag != 0x02 || after.len() < usize::from(n) {
            return None;
        }
        let (int, after) = after.split_at(usize::from(n));
        let int = &int[int.iter().take_while(|&&b| b == 0).count()..];
        if int.len() > 32 {
            return None;
        }
        out.extend(std::iter::repeat_n(0, 32 - int.len()));
        out.extend_from_slice(int);
        rest = after;
    }
    Some(out)
}

const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64url_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(BASE64URL[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let (mut out, mut n, mut bits) = (Vec::new(), 0u32, 0);
    for c in text.trim_end_matches('=').bytes() {
        n = n << 6 | BASE64URL.iter().position(|&b| b == c)? as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((n >> bits) as u8);
            n &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The answer to one certificate request: the chain, or `<code> <message>`.
type Answer = Result<String, (u32, String)>;

/// Asks the CA at `addr` (from `node`) for a certificate, with `token` and, if given, the
/// identity to impersonate and a `ClusterID`.
fn ask(
    node: &Node,
    addr: SocketAddr,
    root: &Path,
    token: &str,
    identity: Option<&str>,
    cluster: Option<&str>,
) -> io::Result<Answer> {
    node.netns().run_in(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let mut grpc = raw::connect(addr, root).await?;
            let request = IstioCertificateRequest {
                csr: csr(),
                validity_duration: 3600,
                metadata: identity.and_then(impersonating),
            };
            // Istio's proxies name their cluster in a gRPC header.
            let headers: Vec<(&str, &str)> = cluster.map(|c| ("ClusterID", c)).into_iter().collect();
            let reply: Result<IstioCertificateResponse, raw::GrpcError> =
                raw::unary_with_headers(&mut grpc, addr, CA, Some(token), &headers, &request).await?;
            Ok(reply.map(|r| r.cert_chain.join("")).map_err(|e| (e.code, e.message)))
        })
    })?
}

/// Opens a delta ADS stream with `token`, as web-0 would, and waits for the first response:
/// `Ok(())`, or the refusal.
fn subscribe(node: &Node, addr: SocketAddr, root: &Path, token: &str) -> io::Result<Result<(), (u32, String)>> {
    node.netns().run_in(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let mut grpc = raw::connect(addr, root).await?;
            let first = DeltaDiscoveryRequest {
                node: Some(XdsNode {
                    id: "sidecar~10.244.1.10~web-0.shop~shop.svc.cluster.local".into(),
                    ..XdsNode::default()
                }),
                type_url: "type.googleapis.com/istio.workload.Address".into(),
                ..DeltaDiscoveryRequest::default()
            };
            let mut stream = match raw::BidiStream::open(&mut grpc, addr, ADS, Some(token), &first).await? {
                Ok(stream) => stream,
                Err(e) => return Ok(Err((e.code, e.message))),
            };
            match stream.recv::<DeltaDiscoveryResponse>(TIMEOUT).await? {
                Some(Ok(_)) => Ok(Ok(())),
                Some(Err(e)) => Ok(Err((e.code, e.message))),
                None => Err(io::Error::other("no response on the ADS stream")),
            }
        })
    })?
}

/// `count` requests for the token's own identity at once, on one connection.
fn ask_many(node: &Node, addr: SocketAddr, root: &Path, token: &str, count: usize) -> io::Result<Vec<Answer>> {
    node.netns().run_in(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let grpc = raw::connect(addr, root).await?;
            let calls = (0..count).map(|_| {
                let (mut grpc, token) = (grpc.clone(), token.to_owned());
                let request = IstioCertificateRequest { csr: csr(), validity_duration: 3600, metadata: None };
                tokio::spawn(async move {
                    let reply: Result<IstioCertificateResponse, raw::GrpcError> =
                        raw::unary(&mut grpc, addr, CA, Some(&token), &request).await?;
                    Ok::<_, io::Error>(reply.map(|r| r.cert_chain.join("")).map_err(|e| (e.code, e.message)))
                })
            });
            let mut answers = Vec::new();
            for call in calls.collect::<Vec<_>>() {
                answers.push(call.await.map_err(io::Error::other)??);
            }
            Ok(answers)
        })
    })?
}

fn granted(answer: &Answer, what: &str) -> String {
    match answer {
        Ok(chain) => certificate_text(chain),
        Err((code, message)) => panic!("{what}: refused with {code} {message}"),
    }
}

fn refused(answer: &Answer, code: u32, needle: &str, what: &str) {
    match answer {
        Err((c, message)) => {
            assert_eq!(*c, code, "{what}: {message}");
            assert!(message.contains(needle), "{what}: `{needle}` not in: {message}");
        }
        Ok(chain) => panic!("{what}: granted {}", certificate_text(chain)),
    }
}

// ID-2: what istiod grants to Kubernetes tokens, and nothing else.
#[test]
fn kubernetes_tokens_get_what_istiod_grants() -> io::Result<()> {
    let topo = Topology::new("kube_ca::tokens")?;
    let node = topo.add_node("control")?;
    let mut api = KubeApi::start_in_netns(topo.fabric().name(), FABRIC_GATEWAY)?;
    api.apply(OBJECTS)?;
    for (ns, pod, ip) in
        [("shop", "web-0", "10.244.1.10"), ("shop", "db-0", "10.244.2.10"), ("shop", "gone-0", "10.244.1.11")]
    {
        api.set_pod_status(ns, pod, ip, "10.0.0.1")?;
    }
    let token =
        |ns: &str, sa: &str, audience: &str, pod: Option<&str>| api.service_account_token(ns, sa, audience, pod, 3600);
    let node_a = token("strait-system", "strait-node", "istio-ca", Some("strait-node-a"))?;
    let node_unbound = token("strait-system", "strait-node", "istio-ca", None)?;
    let web = token("shop", "web", "istio-ca", Some("web-0"))?;
    let other = token("shop", "other", "istio-ca", None)?;
    let wrong_audience = token("shop", "web", "someone-else", Some("web-0"))?;
    let gone = token("shop", "web", "istio-ca", Some("gone-0"))?;
    let db = token("shop", "db", "istio-ca", Some("db-0"))?;
    let unasked = token("shop", "db", "istio-ca", None)?;
    // The API server's own token for web-0, signed again with its key: once valid for another
    // hour (accepted: the copy is sound), once expired an hour ago.
    let resigned = resign(&api, &web, 3600)?;
    let expired = resign(&api, &web, -3600)?;

    let control = start_control(&topo, &node, &api)?;
    let addr: SocketAddr = format!("{}:15012", node.ip()).parse().map_err(io::Error::other)?;
    let root = topo.dir().join("control-ca/root-cert.pem");
    let ask = |token: &str, identity: Option<&str>| ask(&node, addr, &root, token, identity, None);

    // The node proxy of node-a gets web (on node-a) once the control plane has read the pods.
    let deadline = Instant::now() + TIMEOUT;
    let started = Instant::now();
    let mut first = ask(&node_a, Some(WEB))?;
    while first.is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        first = ask(&node_a, Some(WEB))?;
    }
    let until_pods = started.elapsed();
    assert!(granted(&first, "node-a's proxy, pod on node-a").contains(WEB));
    refused(&ask(&node_a, Some(DB))?, PERMISSION_DENIED, "node-a", "node-a's proxy, pod on node-b");
    let own = granted(&ask(&node_a, None)?, "node-a's proxy, its own identity");
    assert!(own.contains(STRAIT_NODE) && own.contains("system:node:node-a"), "{own}");

    // A pod's token: its own identity, nothing else.
    let started = Instant::now();
    let web_own = ask(&web, None)?;
    let reviewed = started.elapsed();
    let started = Instant::now();
    let web_again = ask(&web, Some(WEB))?;
    let cached = started.elapsed();
    let web_own = granted(&web_own, "web, its own identity");
    assert!(web_own.contains(WEB) && !web_own.contains("system:node"), "{web_own}");
    assert!(granted(&web_again, "web, naming itself").contains(WEB));
    refused(&ask(&web, Some(DB))?, PERMISSION_DENIED, "only", "web asking for db");

    // A burst of requests with one new token (a node agent asking for its pods at once) makes
    // one TokenReview, not one each.
    let burst = ask_many(&node, addr, &root, &db, BURST)?;
    assert_eq!(burst.len(), BURST);
    for answer in &burst {
        assert!(granted(answer, "db, a burst").contains(DB));
    }
    let reviews = control.log().lines().filter(|l| l.contains("Kubernetes token reviewed") && l.contains(DB)).count();
    assert_eq!(reviews, 1, "one review for {BURST} requests with one token");

    // No impersonation without a node proxy's account and a bound pod.
    refused(&ask(&other, Some(WEB))?, PERMISSION_DENIED, "ns/shop/sa/other", "an unrelated service account");
    assert!(granted(&ask(&other, None)?, "other, itself").contains("spiffe://cluster.local/ns/shop/sa/other"));
    refused(&ask(&node_unbound, Some(WEB))?, PERMISSION_DENIED, "only", "a node proxy's token bound to no pod");

    // Refused outright: another audience, another cluster, not a token, a deleted pod's token.
    refused(&ask(&wrong_audience, None)?, UNAUTHENTICATED, "Kubernetes token refused", "wrong audience");
    let other_cluster = self::ask(&node, addr, &root, &web, None, Some("cluster-2"))?;
    refused(&other_cluster, UNAUTHENTICATED, "cluster-2", "another cluster");
    assert!(granted(&self::ask(&node, addr, &root, &web, None, Some("Kubernetes"))?, "our cluster").contains(WEB));
    refused(&ask("not-a-token", None)?, UNAUTHENTICATED, "Kubernetes token refused", "garbage");
    assert!(granted(&ask(&resigned, None)?, "web's token, signed again").contains(WEB));
    refused(&ask(&expired, None)?, UNAUTHENTICATED, "expired", "an expired token");
    api.kubectl(&["delete", "pod", "-n", "shop", "gone-0", "--grace-period=0", "--force"])?;
    let deadline = Instant::now() + TIMEOUT;
    while api.kubectl(&["get", "pod", "-n", "shop", "gone-0", "--ignore-not-found", "-o", "name"])?.trim() != "" {
        assert!(Instant::now() < deadline, "gone-0 was not deleted");
        std::thread::sleep(Duration::from_millis(50));
    }
    refused(&ask(&gone, None)?, UNAUTHENTICATED, "Kubernetes token refused", "a deleted pod's token");

    // The same tokens on the ADS port.
    subscribe(&node, addr, &root, &web)?.map_err(|e| io::Error::other(format!("ADS refused web's token: {e:?}")))?;
    let line = control.wait_for_log("ADS: subscriber connected", TIMEOUT)?;
    assert!(line.contains(&format!("{WEB} (by Kubernetes token)")), "{line}");
    let refused_stream = subscribe(&node, addr, &root, &wrong_audience)?;
    assert!(refused_stream.as_ref().is_err_and(|(code, _)| *code == UNAUTHENTICATED), "{refused_stream:?}");

    // No API server to ask: a token not reviewed yet is refused, not waved through.
    api.stop_apiserver();
    refused(&ask(&unasked, None)?, UNAVAILABLE, "TokenReview failed", "the API server is down");

    let log = control.log();
    assert!(log.contains("CA API: refused"), "refusals are logged:\n{log}");
    // The control plane's own measure of each review (TokenReview, and the pod's GET for a node
    // proxy), from its debug lines.
    let mut reviews: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("Kubernetes token reviewed"))
        .filter_map(|l| l.split("took_us=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    reviews.sort_unstable();
    assert!(!reviews.is_empty(), "reviews are logged with their time");
    eprintln!(
        "kube_ca: pods readable by the CA {:.0} ms after start; {} reviews, median {:.1} ms; a CSR with a new \
         token (TokenReview) {:.1} ms, with a reviewed one (cached) {:.1} ms",
        until_pods.as_secs_f64() * 1e3,
        reviews.len(),
        reviews[reviews.len() / 2] as f64 / 1e3,
        reviewed.as_secs_f64() * 1e3,
        cached.as_secs_f64() * 1e3
    );
    Ok(())
}

// ID-2, CFG-3: a node proxy deployed as strait's DaemonSet bootstraps with its projected token
// alone: it gets its own certificate (its service account, naming its node) with the token,
// then follows the control plane over mutual TLS with that certificate, and gets the
// certificates of the pods on its node with it.
#[test]
fn a_node_proxy_bootstraps_with_its_kubernetes_token() -> io::Result<()> {
    let topo = Topology::new("kube_ca::node")?;
    let (control_node, node_a) = (topo.add_node("control")?, topo.add_node("node-a")?);
    let api = KubeApi::start_in_netns(topo.fabric().name(), FABRIC_GATEWAY)?;
    api.apply(OBJECTS)?;
    api.set_pod_status("shop", "web-0", "10.244.1.10", &node_a.ip().to_string())?;
    let token_file = topo.dir().join("strait-node-a.token");
    // What the kubelet writes in the pod's projected volume.
    let token = api.service_account_token("strait-system", "strait-node", "istio-ca", Some("strait-node-a"), 3600)?;
    std::fs::write(&token_file, format!("{token}\n"))?;
    let control = start_control(&topo, &control_node, &api)?;

    let pins = node_a.bpf_pin_dir().to_string_lossy().into_owned();
    let (root, token_file) = (topo.dir().join("control-ca/root-cert.pem"), token_file.to_string_lossy().into_owned());
    let (root, address) = (root.to_string_lossy().into_owned(), format!("https://{}:15012", control_node.ip()));
    let args = [
        "node",
        "--node",
        "node-a",
        "--bpf-pin-dir",
        &pins,
        "--xds-address",
        &address,
        "--ca-root",
        &root,
        "--ca-token-file",
        &token_file,
        "--detach-on-exit",
    ];
    // The downward API's variables of strait's DaemonSet.
    let envs = [("POD_NAMESPACE", "strait-system"), ("SERVICE_ACCOUNT", "strait-node"), ("STRAIT_LOG", "info")];
    let proxy = node_a.spawn("strait-node-a", bin_path("strait"), &args, &envs)?;
    proxy.wait_for_log("strait node ready", TIMEOUT)?;

    let own = format!("issued {STRAIT_NODE} for");
    let line = control.wait_for_log(&own, TIMEOUT)?;
    assert!(line.contains("the node proxy of node-a (by Kubernetes token)"), "{line}");
    let line = control.wait_for_log("ADS: subscriber connected", TIMEOUT)?;
    assert!(line.contains("the node proxy of node-a (by client certificate)"), "{line}");
    let line = control.wait_for_log(&format!("issued {WEB} for"), TIMEOUT)?;
    assert!(line.contains("the node proxy of node-a (by client certificate)"), "{line}");
    Ok(())
}
