//! End to end: request routing through a waypoint (issue 6; SPEC L4-3, L7-2, L7-3): node
//! proxies send a service's traffic to the namespace's waypoint over HBONE, and the waypoint
//! routes each request by the VirtualService in force. Needs root.

mod common;

use std::io;

use common::{APP_NS, WaypointMesh, wait_request_lines};
use strait_testbed::{EchoKind, k8s};

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
