//! End to end: request routing through a waypoint (SPEC L4-3, L7-2, L7-3, CFG-1):
//! node proxies send a service's traffic to the namespace's waypoint over HBONE, and the
//! waypoint routes each request by the VirtualService in force; both legs' tunnels leave from
//! their pods' own addresses (L4-6). The scenarios are the seed's
//! traffic-management tasks with our own servers standing in for Bookinfo. Needs root.

mod common;

use std::{io, thread, time::Duration};

use common::{APP_NS, WaypointMesh, apply, reviews_config, start_backends, wait_request_lines};
use strait_testbed::{EchoKind, Topology, UnderlayCapture, k8s};

const REVIEWS: &str = "http://10.96.0.30:9080";

fn vs(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata:\n  name: {name}\n  namespace: {APP_NS}\nspec:\n{spec}"
    )
}

const ALL_V1: &str = "  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v1}\n";
const JASON_V2: &str = "  hosts: [reviews]\n  http:\n  - match:\n    - headers:\n        end-user:\n          exact: jason\n    route:\n    - destination: {host: reviews, subset: v2}\n  - route:\n    - destination: {host: reviews, subset: v1}\n";

// L4-3: without any VirtualService, service traffic goes through the waypoint to the endpoints,
// and the endpoint's node proxy sees the waypoint's identity.
#[test]
fn service_traffic_goes_through_the_waypoint() -> io::Result<()> {
    let m = WaypointMesh::new("wp::default", &["web-1"])?;
    let web = &m.backends[0];
    let config = [
        m.base_config(),
        k8s::pod_yaml(web, APP_NS, "web", &[("app", "web"), ("version", "v1")]),
        k8s::named_service_yaml("web", APP_NS, "10.96.0.20", &[("http", 80, 8080)], &[("app", "web")], &[]),
    ]
    .concat();
    m.topo.write_config("c.yaml", &config)?;
    let server = web.echo_server(EchoKind::Http, 8080).name("web-v1").start()?;
    let (_p1, _p2, wp) = m.start()?;

    let summary = m.client.echo_get("http://10.96.0.20/hello", 5, &[])?;
    assert_eq!(summary.status(200), 5, "{summary:?}");
    assert_eq!(summary.served("web-v1"), 5, "{summary:?}");
    let lines = wait_request_lines(&wp, &["path=\"/hello\"", "status=200"], 5)?;
    assert!(lines[0].contains("src.identity=spiffe://cluster.local/ns/shop/sa/client"), "{}", lines[0]);
    assert!(lines[0].contains("dst.service=web.shop.svc.cluster.local"), "{}", lines[0]);
    // The destination node saw the waypoint's identity, and dialled the pod from its address.
    let metrics = m.n2.run_ok("curl", &["-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"])?;
    let opened = metrics
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_opened_total{") && l.contains("reporter=\"destination\""))
        .unwrap_or_default();
    assert!(opened.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/waypoint\""), "{metrics}");
    assert!(server.log().contains(&format!("request peer={}:", m.waypoint_pod.ip())), "{}", server.log());
    Ok(())
}

// L7-2, seed "request routing": all traffic to v1, then `end-user: jason` to v2 and everyone
// else to v1.
#[test]
fn routes_by_header_to_subsets() -> io::Result<()> {
    let m = WaypointMesh::new("wp::routing", &["reviews-v1", "reviews-v2", "reviews-v3"])?;
    m.topo.write_config("c.yaml", &reviews_config(&m))?;
    let _servers = start_backends(&m, 9080)?;
    let (p1, p2, wp) = m.start()?;
    let url = format!("{REVIEWS}/reviews/0");

    let spread = m.client.echo_get(&url, 30, &[])?;
    assert_eq!(spread.status(200), 30, "{spread:?}");
    assert!(spread.served_by.len() == 3, "round robin over three versions without a route: {spread:?}");

    apply(&m.topo, &[&p1, &p2, &wp], "vs.yaml", &vs("reviews", ALL_V1))?;
    let v1 = m.client.echo_get(&url, 30, &[])?;
    assert_eq!(v1.served("reviews-v1"), 30, "{v1:?}");

    apply(&m.topo, &[&p1, &p2, &wp], "vs.yaml", &vs("reviews", JASON_V2))?;
    let jason = m.client.echo_get(&url, 30, &[("end-user", "jason")])?;
    assert_eq!(jason.served("reviews-v2"), 30, "{jason:?}");
    let others = m.client.echo_get(&url, 30, &[("end-user", "alice")])?;
    assert_eq!(others.served("reviews-v1"), 30, "{others:?}");
    let lines = wait_request_lines(&wp, &["route=shop/reviews"], 60)?;
    assert!(lines.iter().any(|l| l.contains("cluster=outbound|9080|v2|reviews.shop.svc.cluster.local")), "{lines:?}");
    Ok(())
}

// L7-3, seed "traffic shifting": weighted routes split 1,000 requests 50/50 and 80/20 within
// statistical tolerance (more than five standard deviations of slack).
#[test]
fn weighted_routes_shift_traffic() -> io::Result<()> {
    let m = WaypointMesh::new("wp::weights", &["reviews-v1", "reviews-v3"])?;
    m.topo.write_config("c.yaml", &reviews_config(&m))?;
    let _servers = start_backends(&m, 9080)?;
    let (p1, p2, wp) = m.start()?;
    let url = format!("{REVIEWS}/reviews/0");
    for (v1, v3, range) in [(50, 50, 420..=580), (80, 20, 730..=870)] {
        let spec = format!(
            "  hosts: [reviews]\n  http:\n  - route:\n    - destination: {{host: reviews, subset: v1}}\n      weight: {v1}\n    - destination: {{host: reviews, subset: v3}}\n      weight: {v3}\n"
        );
        apply(&m.topo, &[&p1, &p2, &wp], "vs.yaml", &vs("reviews", &spec))?;
        let summary = m.client.echo_get_args(&url, &["--count", "1000", "--concurrency", "4"])?;
        assert_eq!(summary.status(200), 1000, "{summary:?}");
        assert!(range.contains(&summary.served("reviews-v1")), "{v1}/{v3}: {summary:?}");
        assert_eq!(summary.served("reviews-v1") + summary.served("reviews-v3"), 1000, "{summary:?}");
    }
    Ok(())
}

// L7-3: a prefix rewrite replaces the matched prefix, an exact-match rewrite the whole path;
// request headers are set and removed, response headers added; a redirect answers itself.
#[test]
fn rewrites_and_header_edits() -> io::Result<()> {
    let m = WaypointMesh::new("wp::rewrite", &["reviews-v1"])?;
    let spec = "  hosts: [reviews]\n  http:\n  - match:\n    - uri: {prefix: /simple/httpserver}\n    rewrite: {uri: /hello}\n    route:\n    - destination: {host: reviews}\n  - match:\n    - uri: {exact: /whole}\n    rewrite: {uri: /headers}\n    headers:\n      request:\n        set: {x-set: by-waypoint}\n        remove: [x-secret]\n      response:\n        add: {x-added: by-waypoint}\n        remove: [x-served-by]\n    route:\n    - destination: {host: reviews}\n  - match:\n    - uri: {prefix: /old}\n    redirect: {uri: /new}\n  - route:\n    - destination: {host: reviews}\n";
    m.topo.write_config("c.yaml", &(reviews_config(&m) + "---\n" + &vs("reviews", spec)))?;
    let _servers = start_backends(&m, 9080)?;
    let (_p1, _p2, _wp) = m.start()?;

    let prefixed = m.client.curl(&format!("{REVIEWS}/simple/httpserver/x?q=1"), common::TIMEOUT)?;
    assert!(prefixed.body.contains("path=/hello/x"), "{prefixed:?}");
    let edited = m.client.curl_args(&["-H", "x-secret: 1", "-H", "x-set: client", &format!("{REVIEWS}/whole")])?;
    assert_eq!(edited.status, 200, "{edited:?}");
    assert!(edited.body.contains("x-set: by-waypoint") && !edited.body.contains("x-set: client"), "{}", edited.body);
    assert!(!edited.body.contains("x-secret"), "{}", edited.body);
    assert!(edited.body.contains("x-request-id: ") && edited.body.contains("traceparent: "), "{}", edited.body);
    assert!(edited.body.contains(&format!("x-forwarded-for: {}", m.client.ip())), "{}", edited.body);
    assert_eq!(edited.header("x-added"), Some("by-waypoint"), "{edited:?}");
    assert_eq!(edited.header("x-served-by"), None, "{edited:?}");
    assert!(edited.header("x-envoy-upstream-service-time").is_some(), "{edited:?}");
    let moved = m.client.curl(&format!("{REVIEWS}/old/page"), common::TIMEOUT)?;
    assert_eq!(moved.status, 301, "{moved:?}");
    assert_eq!(moved.header("location"), Some("http://10.96.0.30:9080/new/page"), "{moved:?}");
    Ok(())
}

// CFG-1: a VirtualService change applies within a second, and requests in flight while it
// changes all complete.
#[test]
fn route_change_applies_quickly_without_dropping_requests() -> io::Result<()> {
    let m = WaypointMesh::new("wp::reload", &["reviews-v1", "reviews-v2"])?;
    m.topo.write_config("c.yaml", &(reviews_config(&m) + "---\n" + &vs("reviews", ALL_V1)))?;
    let _servers = start_backends(&m, 9080)?;
    let (_p1, _p2, _wp) = m.start()?;
    let url = format!("{REVIEWS}/reviews/0");
    let client = m.client.clone();
    let load = thread::spawn(move || client.echo_get_args(&url, &["--count", "3000", "--concurrency", "4"]));
    thread::sleep(Duration::from_millis(300));
    let all_v2 = ALL_V1.replace("subset: v1", "subset: v2");
    m.topo.write_config("c.yaml", &(reviews_config(&m) + "---\n" + &vs("reviews", &all_v2)))?;
    let changed = std::time::Instant::now();
    let mut switched = None;
    while changed.elapsed() < Duration::from_secs(3) {
        if m.client.echo_get(&format!("{REVIEWS}/probe"), 1, &[])?.served("reviews-v2") == 1 {
            switched = Some(changed.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let during = load.join().map_err(|_| io::Error::other("load thread panicked"))??;
    let switched = switched.ok_or_else(|| io::Error::other("the route change never took effect"))?;
    assert!(switched < Duration::from_millis(1200), "applied after {switched:?}");
    assert_eq!(during.errors, 0, "no request failed while the route changed: {during:?}");
    assert_eq!(during.status(200), 3000, "{during:?}");
    assert!(during.served("reviews-v1") > 0 && during.served("reviews-v2") > 0, "{during:?}");
    Ok(())
}

/// The `web` service (VIP 10.96.0.20, port 80 -> 8080) on `m`'s first backend, behind the
/// namespace's waypoint.
fn web_config(m: &WaypointMesh) -> String {
    [
        m.base_config(),
        k8s::pod_yaml(&m.backends[0], APP_NS, "web", &[("app", "web"), ("version", "v1")]),
        k8s::named_service_yaml("web", APP_NS, "10.96.0.20", &[("http", 80, 8080)], &[("app", "web")], &[]),
    ]
    .concat()
}

/// The HBONE connections the waypoint's pod holds on port 15008: (peer, local) addresses.
fn waypoint_tunnels(m: &WaypointMesh) -> io::Result<Vec<(String, String)>> {
    let out = m.waypoint_pod.run_ok("ss", &["-Htn", "state", "established", "( sport = :15008 )"])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut cols = l.split_whitespace().rev();
            let peer = cols.next()?.to_owned();
            Some((peer, cols.next()?.to_owned()))
        })
        .collect())
}

// L4-6, L4-1: with the waypoint on the client's node, the client's tunnel to it leaves from the
// client pod's address (its answers come back over the waypoint's veth to the proxy's socket),
// and the waypoint's tunnel to the backend on the other node leaves from the waypoint pod's own
// address: the underlay sees only waypoint -> backend, never node 1.
#[test]
fn pod_to_waypoint_on_the_same_node_and_waypoint_to_pod_leave_from_the_pods() -> io::Result<()> {
    let m = WaypointMesh::new("wp::src_same_node", &["web-1"])?;
    m.topo.write_config("c.yaml", &web_config(&m))?;
    let server = m.backends[0].echo_server(EchoKind::Http, 8080).name("web-v1").start()?;
    let (_p1, _p2, wp) = m.start()?;

    let capture = UnderlayCapture::start(&m.topo)?;
    let reply = m.client.curl("http://10.96.0.20/hello", Duration::from_secs(10))?;
    let segments = capture.finish()?;
    assert!(reply.ok(), "{reply:?}");
    wait_request_lines(&wp, &["path=\"/hello\"", "status=200"], 1)?;

    let (client, waypoint, web) = (m.client.ip(), m.waypoint_pod.ip(), m.backends[0].ip());
    let tunnels = waypoint_tunnels(&m)?;
    assert!(!tunnels.is_empty(), "the client's tunnel is open at the waypoint");
    for (peer, local) in &tunnels {
        assert!(peer.starts_with(&format!("{client}:")), "the waypoint's peer is the client pod: {tunnels:?}");
        assert_eq!(local, &format!("{waypoint}:15008"), "{tunnels:?}");
    }
    assert!(common::stat(&m.n1, "hbone_client_reply") > 0, "answers over the waypoint's veth reached the proxy");

    common::assert_tunnels_between(&segments, waypoint, web);
    let node1 = m.n1.ip();
    assert!(segments.iter().all(|s| *s.src.ip() != node1 && *s.dst.ip() != node1), "{segments:?}");
    assert!(server.log().contains(&format!("request peer={waypoint}:")), "{}", server.log());
    Ok(())
}

// L4-6, L4-1: with the waypoint on the other node, the client's tunnel to it crosses the
// underlay from the client pod's address to the waypoint's, and nothing names node 1.
#[test]
fn pod_to_waypoint_on_another_node_leaves_from_the_pod() -> io::Result<()> {
    let topo = Topology::new("wp::src_other_node")?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let client = topo.add_pod(&n1, "client")?;
    let waypoint_pod = topo.add_pod(&n2, "waypoint")?;
    let backends = vec![topo.add_pod(&n2, "web-1")?];
    let ca = common::ca_dir(&topo, "ca");
    let m = WaypointMesh { topo, n1, n2, client, waypoint_pod, backends, ca };
    m.topo.write_config("c.yaml", &web_config(&m))?;
    let _server = m.backends[0].echo_server(EchoKind::Http, 8080).name("web-v1").start()?;
    let (_p1, _p2, wp) = m.start()?;

    let capture = UnderlayCapture::start(&m.topo)?;
    let reply = m.client.curl("http://10.96.0.20/hello", Duration::from_secs(10))?;
    let segments = capture.finish()?;
    assert!(reply.ok(), "{reply:?}");
    wait_request_lines(&wp, &["path=\"/hello\"", "status=200"], 1)?;

    let (client, waypoint, node1) = (m.client.ip(), m.waypoint_pod.ip(), m.n1.ip());
    common::assert_tunnels_between(&segments, client, waypoint);
    assert!(segments.iter().all(|s| *s.src.ip() != node1 && *s.dst.ip() != node1), "{segments:?}");
    assert!(common::stat(&m.n1, "hbone_client_reply") > 0);
    Ok(())
}
