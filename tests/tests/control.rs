//! End to end: proxies following `strait control` (SPEC CFG-2, CFG-3, ID-2). Two node proxies
//! and a waypoint get their configuration over delta xDS and their certificates over the CA API
//! from a control plane on a node of its own, which compiles the topology's configuration
//! directory: the core cases of the mesh pass, a policy written to the directory reaches the
//! data path within a second, the mesh keeps working while the control plane is away and
//! resyncs without resending what did not change, the CA gives each caller what istiod would,
//! and a delta-xDS client written here from the public protos sees Istio's protocol. Needs root.

mod common;

use std::{
    io,
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use common::{Control, TIMEOUT, apply, certificate_text, csr, impersonating, wait_access_line, wait_request_lines};
use strait_proto::{
    envoy::{
        config::core::v3::Node as XdsNode,
        service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse},
    },
    google::rpc::Status as RpcStatus,
    istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse},
    prost_types::{Struct, Value, value::Kind},
};
use strait_testbed::{EchoKind, Node, Pod, Process, Topology, bin_path, grpc as raw, k8s};

const ADDRESS: &str = "type.googleapis.com/istio.workload.Address";
const AUTHORIZATION: &str = "type.googleapis.com/istio.security.Authorization";
const ADS: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const CA: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
const SERVER_VIP: &str = "10.96.0.10";
const REVIEWS_VIP: &str = "10.96.0.30";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/mesh/sa/client";

/// Node 1: `client` (mesh), `outsider` (not enrolled), the waypoint's pod (namespace shop).
/// Node 2: `server-a` and `server-b` (mesh, sa server, behind the `server` VIP), `reviews-v1`
/// and `reviews-v2` (shop, behind `reviews`, which uses the waypoint). Node 3 runs the control
/// plane.
struct Bed {
    topo: Topology,
    n1: Node,
    n2: Node,
    control: Control,
    client: Pod,
    outsider: Pod,
    server_a: Pod,
    waypoint_pod: Pod,
    _servers: Vec<Process>,
}

fn bed(name: &str) -> io::Result<Bed> {
    let topo = Topology::new(name)?;
    let (n1, n2, n3) = (topo.add_node("node1")?, topo.add_node("node2")?, topo.add_node("control")?);
    let client = topo.add_pod(&n1, "client")?;
    let outsider = topo.add_pod(&n1, "outsider")?;
    let waypoint_pod = topo.add_pod(&n1, "waypoint")?;
    let server_a = topo.add_pod(&n2, "server-a")?;
    let server_b = topo.add_pod(&n2, "server-b")?;
    let reviews_v1 = topo.add_pod(&n2, "reviews-v1")?;
    let reviews_v2 = topo.add_pod(&n2, "reviews-v2")?;
    let config = [
        k8s::namespace_yaml("mesh", &[("istio.io/dataplane-mode", "ambient")]),
        k8s::namespace_yaml("plain", &[]),
        k8s::namespace_yaml("shop", &[("istio.io/dataplane-mode", "ambient"), ("istio.io/use-waypoint", "waypoint")]),
        k8s::pod_yaml(&client, "mesh", "client", &[("app", "client")]),
        k8s::pod_yaml(&outsider, "plain", "default", &[("app", "outsider")]),
        k8s::pod_yaml(&waypoint_pod, "shop", "waypoint", &[("gateway.networking.k8s.io/gateway-name", "waypoint")]),
        k8s::pod_yaml(&server_a, "mesh", "server", &[("app", "server")]),
        k8s::pod_yaml(&server_b, "mesh", "server", &[("app", "server")]),
        k8s::pod_yaml(&reviews_v1, "shop", "reviews", &[("app", "reviews"), ("version", "v1")]),
        k8s::pod_yaml(&reviews_v2, "shop", "reviews", &[("app", "reviews"), ("version", "v2")]),
        k8s::service_yaml("server", "mesh", SERVER_VIP, &[(80, 8080)], &[("app", "server")]),
        k8s::named_service_yaml("reviews", "shop", REVIEWS_VIP, &[("http", 9080, 9080)], &[("app", "reviews")], &[]),
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: reviews\n  namespace: shop\n\
         spec:\n  host: reviews\n  subsets:\n  - name: v1\n    labels: {version: v1}\n  - name: v2\n    labels: {version: v2}\n"
            .to_owned(),
    ]
    .concat();
    topo.write_config("cluster.yaml", &config)?;
    let servers = vec![
        server_a.echo_server(EchoKind::Http, 8080).name("server-a").start()?,
        server_b.echo_server(EchoKind::Http, 8080).name("server-b").start()?,
        server_a.start_echo_server(EchoKind::Tcp, 9000)?,
        reviews_v1.echo_server(EchoKind::Http, 9080).name("reviews-v1").start()?,
        reviews_v2.echo_server(EchoKind::Http, 9080).name("reviews-v2").start()?,
    ];
    let control = Control::new(&topo, n3);
    Ok(Bed { topo, n1, n2, control, client, outsider, server_a, waypoint_pod, _servers: servers })
}

/// The control plane, both node proxies and the waypoint, all following it.
struct Running {
    control: Process,
    p1: Process,
    p2: Process,
    waypoint: Process,
}

impl Bed {
    fn start(&self) -> io::Result<Running> {
        let control = self.control.start(&self.topo, &[])?;
        let p1 = self.control.start_node(&self.topo, &self.n1)?;
        let p2 = self.control.start_node(&self.topo, &self.n2)?;
        let waypoint = self.control.start_waypoint(&self.waypoint_pod, "waypoint", "shop")?;
        Ok(Running { control, p1, p2, waypoint })
    }

    fn reaches(&self, from: &Pod, url: &str) -> io::Result<bool> {
        Ok(from.curl(url, Duration::from_secs(3))?.ok())
    }

    fn server_url(&self) -> String {
        format!("http://{}:8080/", self.server_a.ip())
    }
}

fn policy(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: mesh\nspec:\n  selector:\n    matchLabels: {{app: server}}\n{spec}"
    )
}

fn deny_client() -> String {
    policy(
        "deny-client",
        "  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/mesh/sa/client]\n",
    )
}

// CFG-2, CFG-3: the existing suites' core cases, on configuration and certificates that came
// from the control plane: mTLS pod to pod, VIP load balancing, STRICT, ALLOW/DENY, waypoint
// routing. Each proxy bootstrapped with its token and follows with a certificate of its own.
#[test]
fn proxies_following_the_control_plane_pass_the_core_cases() -> io::Result<()> {
    let b = bed("control::core")?;
    let r = b.start()?;
    let all = [&r.control, &r.p1, &r.p2];

    // Bootstrapped by token, then authenticated by their own certificates.
    for p in [&r.p1, &r.p2] {
        p.wait_for_log("own certificate issued", TIMEOUT)?;
        p.wait_for_log("xDS stream open address=", TIMEOUT)?;
    }
    let control_log = r.control.log();
    assert!(control_log.contains("CA API: issued spiffe://cluster.local/ns/istio-system/sa/ztunnel"), "{control_log}");
    assert!(
        control_log.contains("the node proxy of node1 (by client certificate)"),
        "ADS by certificate: {control_log}"
    );
    assert!(
        control_log.contains("spiffe://cluster.local/ns/shop/sa/waypoint (by client certificate)"),
        "{control_log}"
    );
    // Workload certificates too are asked for over mutual TLS once the node holds its own.
    let client_cert = r.control.wait_for_log(&format!("issued {CLIENT_ID} for"), TIMEOUT)?;
    assert!(client_cert.contains("to the node proxy of node1 (by client certificate)"), "{client_cert}");

    // The admin API shows what the proxy follows.
    let dump = b.n1.run_ok("curl", &["-sS", "--max-time", "5", "http://127.0.0.1:15000/config_dump"])?;
    let dump: serde_json::Value = serde_json::from_str(&dump).map_err(io::Error::other)?;
    assert_eq!(dump["xds"]["connected"], true, "{}", dump["xds"]);
    assert_eq!(dump["xds"]["address"], b.control.address());
    assert!(dump["xds"]["types"][ADDRESS]["resources"].as_u64().is_some_and(|n| n >= 7), "{}", dump["xds"]);

    // mTLS pod to pod, both identities in the access lines.
    assert!(b.reaches(&b.client, &b.server_url())?, "{}", r.p1.log_tail());
    let line = wait_access_line(&r.p2, &["inbound", &format!("dst.addr={}:8080", b.server_a.ip())], TIMEOUT)?;
    assert!(line.contains(&format!("src.identity={CLIENT_ID}")) && line.contains("security=mutual_tls"), "{line}");

    // The VIP spreads connections over both endpoints, round robin.
    let mut served = Vec::new();
    for _ in 0..4 {
        let reply = b.client.curl(&format!("http://{SERVER_VIP}/"), TIMEOUT)?;
        assert!(reply.ok(), "{reply:?}");
        served.push(reply.body.split_whitespace().nth(2).unwrap_or("?").to_owned());
    }
    served.sort();
    assert_eq!(served, ["server-a", "server-a", "server-b", "server-b"], "round robin over the VIP's endpoints");

    // STRICT: plaintext from outside the mesh is refused, mesh traffic still flows.
    assert!(b.reaches(&b.outsider, &b.server_url())?, "PERMISSIVE by default");
    let strict = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: mesh\nspec:\n  mtls: {mode: STRICT}\n";
    apply(&b.topo, &all, "pa.yaml", strict)?;
    assert!(!b.reaches(&b.outsider, &b.server_url())?, "STRICT refuses plaintext");
    assert!(b.reaches(&b.client, &b.server_url())?);

    // ALLOW for another namespace only: the client is denied; DENY beats an ALLOW that matches.
    let allow_other =
        policy("allow", "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        namespaces: [elsewhere]\n");
    apply(&b.topo, &all, "policy.yaml", &allow_other)?;
    assert!(!b.reaches(&b.client, &b.server_url())?, "no ALLOW matches");
    let allow_mesh =
        policy("allow", "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        namespaces: [mesh]\n");
    apply(&b.topo, &all, "policy.yaml", &allow_mesh)?;
    assert!(b.reaches(&b.client, &b.server_url())?, "the ALLOW matches");
    apply(&b.topo, &all, "policy.yaml", &[allow_mesh, deny_client()].concat())?;
    assert!(!b.reaches(&b.client, &b.server_url())?, "DENY beats ALLOW");
    wait_access_line(&r.p2, &["inbound", "denied by AuthorizationPolicy mesh/deny-client"], TIMEOUT)?;

    // Waypoint routing: the VirtualService reaches the waypoint over xDS.
    let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\n  namespace: shop\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v2}\n";
    // Only the waypoint hears of it: the node proxies' resources did not change.
    apply(&b.topo, &[&r.control, &r.waypoint], "vs.yaml", vs)?;
    let routed = b.client.echo_get(&format!("http://{REVIEWS_VIP}:9080/reviews"), 10, &[])?;
    assert_eq!(routed.served("reviews-v2"), 10, "{routed:?}");
    wait_request_lines(&r.waypoint, &["route=shop/reviews"], 10)?;
    Ok(())
}

// CFG-3, CFG-1: a policy written to the control plane's directory closes an open connection it
// denies and refuses new ones within a second of the write.
#[test]
fn a_policy_change_reaches_the_data_path_within_a_second() -> io::Result<()> {
    let b = bed("control::latency")?;
    let r = b.start()?;
    let hold = b.client.spawn(
        "hold",
        bin_path("strait-echo"),
        &["hold", &format!("{}:9000", b.server_a.ip()), "--secs", "30"],
        &[],
    )?;
    hold.wait_for_log("ok 3", TIMEOUT)?;
    let written = Instant::now();
    b.topo.write_config("policy.yaml", &deny_client())?;
    let mut refused_after = None;
    while written.elapsed() < Duration::from_secs(5) {
        if !b.client.curl(&b.server_url(), Duration::from_secs(1))?.ok() {
            refused_after = Some(written.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let status = hold.wait_exit(Duration::from_secs(5)).expect("the held connection is closed");
    let closed_after = written.elapsed();
    assert!(!status.success(), "{}", hold.log_tail());
    let refused_after = refused_after.expect("new connections refused");
    eprintln!("policy written -> new connections refused after {refused_after:?}, open one closed by {closed_after:?}");
    assert!(refused_after < Duration::from_secs(1), "refused {refused_after:?} after the write");
    wait_access_line(&r.p2, &["inbound", "late rejection"], TIMEOUT)?;
    Ok(())
}

// CFG-2: with the control plane killed, open connections and new ones keep working on the last
// configuration and certificates; after its restart the proxies resync, and only what changed
// meanwhile is sent again.
#[test]
fn the_mesh_outlives_the_control_plane_and_resyncs_without_resending() -> io::Result<()> {
    let b = bed("control::outage")?;
    let r = b.start()?;
    assert!(b.reaches(&b.client, &b.server_url())?);
    let hold = b.client.spawn(
        "hold",
        bin_path("strait-echo"),
        &["hold", &format!("{}:9000", b.server_a.ip()), "--secs", "12"],
        &[],
    )?;
    hold.wait_for_log("ok 3", TIMEOUT)?;
    let opened = |p: &Process| p.count_log_lines("xDS stream open");
    let streams_before = [opened(&r.p1), opened(&r.p2), opened(&r.waypoint)];

    r.control.terminate(libc::SIGKILL)?;
    r.control.wait_exit(TIMEOUT).expect("control plane stopped");
    r.p1.wait_for_log("xDS stream lost", TIMEOUT)?;
    for i in 0..10 {
        assert!(b.reaches(&b.client, &b.server_url())?, "new connection {i} while the control plane is away");
        let routed = b.client.echo_get(&format!("http://{REVIEWS_VIP}:9080/"), 1, &[])?;
        assert_eq!(routed.status(200), 1, "through the waypoint while the control plane is away: {routed:?}");
        thread::sleep(Duration::from_millis(200));
    }
    // A change made while it is away: one namespace-wide policy (no selector, so no workload's
    // Address lists it), which is all that must be sent when it is back.
    let namespace_wide = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-nowhere\n  namespace: mesh\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [nowhere]\n";
    b.topo.write_config("policy.yaml", namespace_wide)?;
    // Let the (stopped) control plane's directory settle before it starts again.
    thread::sleep(Duration::from_millis(600));

    let control = b.control.start(&b.topo, &[])?;
    for (p, before) in [&r.p1, &r.p2, &r.waypoint].into_iter().zip(streams_before) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while opened(p) <= before {
            assert!(Instant::now() < deadline, "no new xDS stream:\n{}", p.log_tail());
            thread::sleep(Duration::from_millis(50));
        }
    }
    let status = hold.wait_exit(Duration::from_secs(15)).expect("hold ends");
    assert!(status.success(), "the open connection lived through the outage: {}", hold.log_tail());
    // Let the three subscribers' resync responses go out.
    thread::sleep(Duration::from_secs(1));
    let addresses = b.control.metric("strait_xds_resources_sent_total", "type=\"Address\"")?;
    let policies = b.control.metric("strait_xds_resources_sent_total", "type=\"Authorization\"")?;
    let responses = b.control.metric("strait_xds_responses_total", "type=\"Address\"")?;
    eprintln!(
        "after the restart: {responses} Address responses, {addresses} Address and {policies} Authorization resources sent"
    );
    assert!(responses >= 3, "every subscriber was answered: {}", control.log_tail());
    assert_eq!(addresses, 0, "no unchanged Address resent:\n{}", control.log_tail());
    assert!((1..=3).contains(&policies), "only the new policy, once per subscriber: {policies}");
    assert!(b.reaches(&b.client, &b.server_url())?, "after the resync");
    Ok(())
}

// ID-2: the CA gives what istiod would: a node proxy gets the identities of the pods on its own
// node and is refused those of another node's pods; a proxy asking for itself, without
// ImpersonatedIdentity, gets its own identity; a workload token gets only its own identity.
#[test]
fn the_ca_gives_each_caller_what_istiod_would() -> io::Result<()> {
    let b = bed("control::ca")?;
    let _control = b.control.start(&b.topo, &[])?;
    let node1 = std::fs::read_to_string(b.control.token("nodes/node1")?)?;
    let waypoint = std::fs::read_to_string(b.control.token("serviceaccounts/shop/waypoint")?)?;
    let addr: SocketAddr = format!("{}:15012", b.control.node.ip()).parse().map_err(io::Error::other)?;
    let root = b.control.ca_dir.join("root-cert.pem");
    let results = b.n1.netns().run_in(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let mut grpc = raw::connect(addr, &root).await?;
            let mut ask = async |token: &str, identity: Option<&str>| -> io::Result<Result<String, String>> {
                let request = IstioCertificateRequest {
                    csr: csr(),
                    validity_duration: 3600,
                    metadata: identity.and_then(impersonating),
                };
                let reply: Result<IstioCertificateResponse, raw::GrpcError> =
                    raw::unary(&mut grpc, addr, CA, Some(token.trim()), &request).await?;
                Ok(reply.map(|r| r.cert_chain.join("")).map_err(|e| format!("{} {}", e.code, e.message)))
            };
            Ok::<_, io::Error>(vec![
                ask(&node1, Some(CLIENT_ID)).await?,
                ask(&node1, Some("spiffe://cluster.local/ns/mesh/sa/server")).await?,
                ask(&node1, None).await?,
                ask(&waypoint, None).await?,
                ask(&waypoint, Some(CLIENT_ID)).await?,
            ])
        })
    })??;
    let san = |pem: &str| certificate_text(pem);
    let [pod_here, pod_elsewhere, node_itself, waypoint_itself, waypoint_other] = &results[..] else {
        panic!("five answers: {results:?}");
    };
    assert!(san(pod_here.as_ref().expect("a pod on its node")).contains(CLIENT_ID));
    let refused = pod_elsewhere.as_ref().expect_err("a pod on node2");
    assert!(refused.starts_with("7 ") && refused.contains("node1"), "PERMISSION_DENIED: {refused}");
    let own = san(node_itself.as_ref().expect("its own identity"));
    assert!(
        own.contains("spiffe://cluster.local/ns/istio-system/sa/ztunnel") && own.contains("system:node:node1"),
        "{own}"
    );
    assert!(san(waypoint_itself.as_ref().expect("own")).contains("spiffe://cluster.local/ns/shop/sa/waypoint"));
    assert!(waypoint_other.as_ref().is_err_and(|e| e.starts_with("7 ")), "{waypoint_other:?}");
    Ok(())
}

fn node_metadata(node: &str) -> XdsNode {
    let string = |s: &str| Value { kind: Some(Kind::StringValue(s.to_owned())) };
    XdsNode {
        id: "ztunnel~10.255.0.1~ztunnel-test.istio-system~istio-system.svc.cluster.local".to_owned(),
        metadata: Some(Struct {
            fields: [("NODE_NAME".to_owned(), string(node)), ("NAMESPACE".to_owned(), string("istio-system"))].into(),
        }),
        ..XdsNode::default()
    }
}

// CFG-3: a delta-xDS client written here from the public protos subscribes (wildcard, as
// ztunnel), ACKs the addresses and NACKs the policies on purpose; the control plane logs the
// NACK with its text and keeps its state: nothing is resent, and the next change brings only
// the changed resource.
#[test]
fn a_client_from_the_public_protos_subscribes_acks_and_nacks() -> io::Result<()> {
    let b = bed("control::protocol")?;
    b.topo.write_config("policy.yaml", &deny_client())?;
    let control = b.control.start(&b.topo, &[])?;
    let token = std::fs::read_to_string(b.control.token("nodes/node1")?)?;
    let addr: SocketAddr = format!("{}:15012", b.control.node.ip()).parse().map_err(io::Error::other)?;
    let root = b.control.ca_dir.join("root-cert.pem");
    let topo = &b.topo;
    let server_a = b.server_a.ip();
    let (first, after_change) = b.n1.netns().run_in(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let mut grpc = raw::connect(addr, &root).await?;
            let subscribe = |type_url: &str| DeltaDiscoveryRequest {
                node: Some(node_metadata("node1")),
                type_url: type_url.to_owned(),
                ..DeltaDiscoveryRequest::default()
            };
            let mut stream = raw::BidiStream::open(&mut grpc, addr, ADS, Some(token.trim()), &subscribe(ADDRESS))
                .await?
                .map_err(|e| io::Error::other(format!("stream refused: {} {}", e.code, e.message)))?;
            stream.send(&subscribe(AUTHORIZATION))?;
            let mut first = Vec::new();
            for _ in 0..2 {
                let response: DeltaDiscoveryResponse = stream
                    .recv(TIMEOUT)
                    .await?
                    .ok_or_else(|| io::Error::other("no initial response"))?
                    .map_err(|e| io::Error::other(e.message))?;
                let reply = DeltaDiscoveryRequest {
                    type_url: response.type_url.clone(),
                    response_nonce: response.nonce.clone(),
                    error_detail: (response.type_url == AUTHORIZATION).then(|| RpcStatus {
                        code: 3,
                        message: "rejected on purpose by the e2e client".into(),
                        details: Vec::new(),
                    }),
                    ..DeltaDiscoveryRequest::default()
                };
                stream.send(&reply)?;
                first.push(response);
            }
            // Nothing is resent after the NACK...
            let quiet: Option<Result<DeltaDiscoveryResponse, _>> = stream.recv(Duration::from_secs(2)).await?;
            if let Some(unexpected) = quiet {
                return Err(io::Error::other(format!("resent after a NACK: {unexpected:?}")));
            }
            // ...until something changes: one pod more, which alone is sent.
            let newcomer = "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: newcomer\n  namespace: extra\nspec:\n  nodeName: node2\nstatus:\n  podIP: 10.2.0.99\n";
            let extra = [k8s::namespace_yaml("extra", &[("istio.io/dataplane-mode", "ambient")]), newcomer.to_owned()]
            .concat();
            topo.write_config("extra.yaml", &extra)?;
            let change: DeltaDiscoveryResponse = stream
                .recv(TIMEOUT)
                .await?
                .ok_or_else(|| io::Error::other("no push after the change"))?
                .map_err(|e| io::Error::other(e.message))?;
            Ok::<_, io::Error>((first, change))
        })
    })??;
    let by_type = |t: &str| first.iter().find(|r| r.type_url == t).expect("a response per type");
    let addresses = by_type(ADDRESS);
    assert!(addresses.resources.len() >= 7, "every workload and service: {}", addresses.resources.len());
    assert!(
        addresses.resources.iter().any(|r| r.aliases.iter().any(|a| a.ends_with(&format!("/{server_a}")))),
        "workloads are also named network/ip"
    );
    assert!(addresses.resources.iter().all(|r| !r.version.is_empty() && r.resource.is_some()));
    assert!(!by_type(AUTHORIZATION).resources.is_empty(), "the policy");
    assert_eq!(after_change.type_url, ADDRESS);
    assert_eq!(after_change.resources.len(), 1, "only the new pod: {:?}", after_change.resources);
    assert!(after_change.resources[0].name.contains("newcomer"), "{:?}", after_change.resources[0].name);

    let nack = control.wait_for_log("ADS: NACK", TIMEOUT)?;
    assert!(nack.contains("rejected on purpose by the e2e client") && nack.contains("ztunnel~"), "{nack}");
    assert_eq!(b.control.metric("strait_xds_nacks_total", "type=\"Authorization\"")?, 1);
    Ok(())
}
