//! The delta ADS server and client together over real TLS sockets, with synthetic resources:
//! the transport moves resources without knowing what they mean.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use strait_proto::{
    envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse,
        aggregated_discovery_service_server::{AggregatedDiscoveryService, AggregatedDiscoveryServiceServer},
    },
    prost_types::Any,
};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use tonic::{Request, Response, Status, Streaming, codegen::tokio_stream::wrappers::ReceiverStream};

use super::*;
use crate::{
    control::listener::{GrpcService, serve, server_tls},
    identity::{CallerAuthenticator, ClientCertSlot, LocalCa, node_proxy_identity},
    xds::{
        AUTHORIZATION_TYPE_URL, Received,
        client::{XdsClient, XdsClientOptions, proxy_node},
        resources::WAYPOINT_METADATA,
    },
};

const TOKEN: &str = "node1-token";
const WAIT: Duration = Duration::from_secs(10);

fn resource(name: &str, content: &str) -> Arc<XdsResource> {
    Arc::new(XdsResource {
        name: name.to_owned(),
        version: format!("v-{content}"),
        aliases: vec![format!("/alias-{name}")],
        body: Any { type_url: ADDRESS_TYPE_URL.into(), value: content.as_bytes().to_vec() },
    })
}

fn snapshot(addresses: &[(&str, &str)], policies: &[(&str, &str)]) -> Arc<Snapshot> {
    let map = |list: &[(&str, &str)]| list.iter().map(|(n, c)| ((*n).to_owned(), resource(n, c))).collect();
    Arc::new(Snapshot::from([
        (ADDRESS_TYPE_URL.to_owned(), map(addresses)),
        (AUTHORIZATION_TYPE_URL.to_owned(), map(policies)),
    ]))
}

/// A test directory (CA, tokens), removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Fixture {
    ca: Arc<LocalCa>,
    addr: SocketAddr,
    snapshots: tokio::sync::watch::Sender<Arc<Snapshot>>,
    metrics: Arc<AdsMetrics>,
    task: JoinHandle<()>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn setup(tag: &str) -> (TempDir, Arc<LocalCa>) {
    let dir = std::env::temp_dir().join(format!("strait-ads-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("tokens/nodes")).expect("mkdir");
    std::fs::write(dir.join("tokens/nodes/node1"), TOKEN).expect("token");
    let ca = Arc::new(LocalCa::load_or_create(&dir.join("ca"), "cluster.local").expect("ca"));
    (TempDir(dir), ca)
}

/// A control plane serving `initial` on `addr` (any port when `None`).
async fn start(dir: &TempDir, ca: Arc<LocalCa>, initial: Arc<Snapshot>, addr: Option<SocketAddr>) -> Fixture {
    let listener = TcpListener::bind(addr.unwrap_or_else(|| "127.0.0.1:0".parse().expect("addr"))).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (snapshots, rx) = tokio::sync::watch::channel(initial);
    let metrics = Arc::new(AdsMetrics::default());
    let authenticator = Arc::new(CallerAuthenticator::new("cluster.local", Some(&dir.0.join("tokens"))));
    // Policies named `secret-*` are for node2 only.
    let visible: Visibility = Arc::new(|s: &Subscriber, _t: &str, r: &XdsResource| {
        !r.name.starts_with("secret") || s.node_name.as_deref() == Some("node2")
    });
    let ads = AdsServer::new(rx, visible, authenticator, metrics.clone());
    let routes =
        vec![("/envoy.service.discovery.v3.AggregatedDiscoveryService/", GrpcService::new(ads.into_service()))];
    let tls = server_tls(ca.clone(), vec!["127.0.0.1".parse().expect("ip")]).expect("tls");
    let task = tokio::spawn(serve(listener, tls, routes, crate::identity::NodeAccounts::default()));
    Fixture { ca, addr, snapshots, metrics, task }
}

fn options(fixture: &Fixture, token: Option<&str>, node: &str) -> XdsClientOptions {
    XdsClientOptions {
        address: format!("https://{}", fixture.addr),
        root: fixture.ca.root_cert_path(),
        server_name: None,
        token: token.map(crate::identity::BearerToken::from),
        client_cert: None,
        node: proxy_node("ztunnel", "10.0.0.1", "ztunnel-x", "istio-system", Some(node), &[]),
        type_urls: vec![ADDRESS_TYPE_URL.to_owned(), AUTHORIZATION_TYPE_URL.to_owned()],
        optional_type_urls: Vec::new(),
    }
}

/// Starts a client whose sink reports every state it is handed; `reject` names a resource the
/// sink refuses.
async fn follow(
    options: XdsClientOptions,
    reject: Option<&'static str>,
) -> (mpsc::UnboundedReceiver<Received>, crate::xds::client::SharedStatus, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = XdsClient::new(options).expect("client");
    let status = client.status();
    let sink = Box::new(move |received: &Received| {
        let _ = tx.send(received.clone());
        match reject {
            Some(bad) if received.values().any(|m| m.contains_key(bad)) => {
                Err(vec![format!("{bad}: refused by the test")])
            }
            _ => Ok(()),
        }
    });
    let (synced, _) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(client.run(sink, synced));
    (rx, status, task)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(WAIT, rx.recv()).await.expect("a sink call in time").expect("sink alive")
}

fn names(received: &Received, type_url: &str) -> Vec<String> {
    received.get(type_url).map(|m| m.keys().cloned().collect()).unwrap_or_default()
}

fn content(received: &Received, name: &str) -> String {
    let body = received.get(ADDRESS_TYPE_URL).and_then(|m| m.get(name)).expect("held");
    String::from_utf8_lossy(&body.value).into_owned()
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// CFG-2, CFG-3: the first state comes whole, once every type answered; then only changes,
// removals included; per-subscriber visibility holds.
#[tokio::test]
async fn initial_state_then_only_changes() {
    let (dir, ca) = setup("changes");
    let fixture = start(&dir, ca, snapshot(&[("a", "1"), ("b", "1")], &[("p", "1"), ("secret-p", "1")]), None).await;
    let (mut rx, _, task) = follow(options(&fixture, Some(TOKEN), "node1"), None).await;
    let first = next(&mut rx).await;
    assert_eq!(names(&first, ADDRESS_TYPE_URL), ["a", "b"]);
    assert_eq!(names(&first, AUTHORIZATION_TYPE_URL), ["p"], "secret-p is for node2 only");
    assert_eq!(fixture.metrics.resources_sent(ADDRESS_TYPE_URL), 2);

    fixture.snapshots.send_replace(snapshot(&[("a", "2"), ("c", "1")], &[("p", "1"), ("secret-p", "2")]));
    let second = next(&mut rx).await;
    assert_eq!(names(&second, ADDRESS_TYPE_URL), ["a", "c"]);
    assert_eq!(content(&second, "a"), "2");
    assert_eq!(fixture.metrics.resources_sent(ADDRESS_TYPE_URL), 4, "a and c only");
    assert_eq!(fixture.metrics.resources_sent(AUTHORIZATION_TYPE_URL), 1, "nothing visible changed");
    task.abort();
}

// A rejected state is NACKed with its text; the server keeps its state and resends nothing
// until the next change.
#[tokio::test]
async fn nack_keeps_state_and_resends_nothing() {
    let (dir, ca) = setup("nack");
    let fixture = start(&dir, ca, snapshot(&[("a", "1")], &[]), None).await;
    let (mut rx, status, task) = follow(options(&fixture, Some(TOKEN), "node1"), Some("bad")).await;
    next(&mut rx).await;
    fixture.snapshots.send_replace(snapshot(&[("a", "1"), ("bad", "1")], &[]));
    next(&mut rx).await;
    let nacked = || fixture.metrics.by_type.lock().expect("lock").get(ADDRESS_TYPE_URL).map_or(0, |c| c.nacks);
    wait_for("the NACK", || nacked() == 1).await;
    let rejected = status.lock().expect("lock").types.get(ADDRESS_TYPE_URL).and_then(|t| t.rejected.clone());
    assert!(rejected.is_some_and(|r| r.contains("refused by the test")));
    let sent = fixture.metrics.resources_sent(ADDRESS_TYPE_URL);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fixture.metrics.resources_sent(ADDRESS_TYPE_URL), sent, "nothing resent after a NACK");

    // Fixing the resource sends it alone, and the state is accepted again.
    fixture.snapshots.send_replace(snapshot(&[("a", "1")], &[]));
    let fixed = next(&mut rx).await;
    assert_eq!(names(&fixed, ADDRESS_TYPE_URL), ["a"]);
    wait_for("in sync", || status.lock().expect("lock").in_sync).await;
    task.abort();
}

// A restarted control plane gets the versions the client holds and sends only what changed.
#[tokio::test]
async fn reconnect_resends_only_changes() {
    let (dir, ca) = setup("reconnect");
    let initial = snapshot(&[("a", "1"), ("b", "1"), ("c", "1")], &[("p", "1")]);
    let fixture = start(&dir, ca.clone(), initial, None).await;
    let addr = fixture.addr;
    let (mut rx, status, task) = follow(options(&fixture, Some(TOKEN), "node1"), None).await;
    next(&mut rx).await;
    // Without snapshots the streams end, as the process's would with it.
    drop(fixture);
    wait_for("the stream to drop", || !status.lock().expect("lock").connected).await;

    let restarted = start(&dir, ca, snapshot(&[("a", "1"), ("b", "2")], &[("p", "1")]), Some(addr)).await;
    let resynced = next(&mut rx).await;
    assert_eq!(names(&resynced, ADDRESS_TYPE_URL), ["a", "b"]);
    assert_eq!(content(&resynced, "b"), "2");
    assert_eq!(restarted.metrics.resources_sent(ADDRESS_TYPE_URL), 1, "only b is resent");
    assert_eq!(restarted.metrics.resources_sent(AUTHORIZATION_TYPE_URL), 0);
    task.abort();
}

// No credential, a wrong token, or a node proxy claiming another node: refused, with a reason
// the client reports.
#[tokio::test]
async fn callers_are_authenticated() {
    let (dir, ca) = setup("auth");
    let fixture = start(&dir, ca, snapshot(&[("a", "1")], &[]), None).await;
    for (token, node, expected) in [
        (None, "node1", "Unauthenticated"),
        (Some("wrong"), "node1", "Unauthenticated"),
        (Some(TOKEN), "node2", "PermissionDenied"),
    ] {
        let (_rx, status, task) = follow(options(&fixture, token, node), None).await;
        wait_for("the refusal", || status.lock().expect("lock").last_error.is_some()).await;
        let error = status.lock().expect("lock").last_error.clone().unwrap_or_default();
        assert!(error.contains(expected), "{token:?} {node}: {error}");
        task.abort();
    }
}

// A node proxy presenting its node certificate needs no token.
#[tokio::test]
async fn node_certificate_authenticates() {
    let (dir, ca) = setup("cert");
    let fixture = start(&dir, ca.clone(), snapshot(&[("a", "1")], &[("secret-p", "1")]), None).await;
    let slot = Arc::new(ClientCertSlot::default());
    let cert =
        ca.issue_for_node(&node_proxy_identity("cluster.local"), "node2", Duration::from_secs(600)).expect("cert");
    slot.set(&cert).expect("slot");
    let mut options = options(&fixture, None, "node2");
    options.client_cert = Some(slot);
    let (mut rx, _, task) = follow(options, None).await;
    let first = next(&mut rx).await;
    assert_eq!(names(&first, AUTHORIZATION_TYPE_URL), ["secret-p"], "authenticated as node2");
    task.abort();
}

#[test]
fn node_ids_and_metadata_describe_the_subscriber() {
    let node = proxy_node("ztunnel", "10.0.0.1", "ztunnel-abc", "istio-system", Some("node1"), &[]);
    let s = subscriber_of(Some(&node), Some("node1"), None).expect("ok");
    assert_eq!((s.node_name.as_deref(), s.namespace.as_deref()), (Some("node1"), Some("istio-system")));
    let bare = Node { id: "router~10.0.0.2~wp.shop~shop.svc.cluster.local".into(), ..Node::default() };
    let s = subscriber_of(Some(&bare), None, None).expect("ok");
    assert_eq!((s.node_name, s.namespace.as_deref()), (None, Some("shop")));
    assert!(subscriber_of(None, None, None).is_err());

    // Claiming a waypoint takes an identity of its namespace.
    let waypoint = proxy_node("waypoint", "10.0.0.3", "wp", "shop", None, &[(WAYPOINT_METADATA, "shop/wp".to_owned())]);
    let shop = Some(crate::identity::Identity::new("cluster.local", "shop", "wp"));
    let other = Some(crate::identity::Identity::new("cluster.local", "mesh", "client"));
    assert!(subscriber_of(Some(&waypoint), None, shop).is_ok());
    let refused = subscriber_of(Some(&waypoint), None, other).expect_err("another namespace");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
}

/// A control plane that, like istiod with strait's own types, answers the types it knows and
/// never the others.
struct KnowsOnly(&'static [&'static str]);

#[tonic::async_trait]
impl AggregatedDiscoveryService for KnowsOnly {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(8);
        let known = self.0;
        let mut requests = request.into_inner();
        tokio::spawn(async move {
            while let Ok(Some(request)) = requests.message().await {
                if request.response_nonce.is_empty() && known.contains(&request.type_url.as_str()) {
                    let response = DeltaDiscoveryResponse {
                        type_url: request.type_url.clone(),
                        nonce: format!("n-{}", request.type_url),
                        ..DeltaDiscoveryResponse::default()
                    };
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

// CFG-2: a type subscribed to as optional (strait's L7 resources, for node proxies) is not
// waited for: against a control plane that never answers it, the client syncs on the others.
#[tokio::test]
async fn optional_types_are_not_waited_for() {
    let (dir, ca) = setup("optional");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let ads = KnowsOnly(&[ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL]);
    let routes = vec![(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/",
        GrpcService::new(AggregatedDiscoveryServiceServer::new(ads)),
    )];
    let tls = server_tls(ca.clone(), vec!["127.0.0.1".parse().expect("ip")]).expect("tls");
    let server = tokio::spawn(serve(listener, tls, routes, crate::identity::NodeAccounts::default()));
    let fixture = Fixture {
        ca,
        addr,
        snapshots: tokio::sync::watch::channel(snapshot(&[], &[])).0,
        metrics: Arc::default(),
        task: server,
    };
    let mut options = options(&fixture, Some(TOKEN), "node1");
    options.optional_type_urls = vec![crate::xds::L7_TYPE_URL.to_owned()];
    let (mut rx, status, task) = follow(options, None).await;
    let first = next(&mut rx).await;
    assert!(first.contains_key(ADDRESS_TYPE_URL) && first.contains_key(AUTHORIZATION_TYPE_URL), "{first:?}");
    assert!(!status.lock().expect("status").types.contains_key(crate::xds::L7_TYPE_URL), "never answered");
    task.abort();
    drop(dir);
}
