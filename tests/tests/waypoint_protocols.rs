//! End to end: what a waypoint carries besides HTTP/1.1 (SPEC L7-1, L7-8): HTTP/2
//! from the client, gRPC with its trailers, WebSocket upgrades, and TCP routed by weight
//! (the seed's TCP traffic shifting). Needs root.

mod common;

use std::io;

use common::{APP_NS, REVIEWS_VIP, WaypointMesh, reviews_config, start_backends, wait_request_lines};
use strait_testbed::{EchoKind, bin_path, k8s};

// L7-1: a client speaking HTTP/2 with prior knowledge is served (and forwarded as HTTP/1.1 to
// an `http` port); a WebSocket upgrade passes through and carries frames both ways.
#[test]
fn http2_clients_and_websocket_upgrades() -> io::Result<()> {
    let m = WaypointMesh::new("wp::h2ws", &["reviews-v1"])?;
    m.topo.write_config("c.yaml", &reviews_config(&m))?;
    let _servers = start_backends(&m, 9080)?;
    let (_p1, _p2, wp) = m.start()?;

    let h2 = m.client.curl_args(&["--http2-prior-knowledge", &format!("http://{REVIEWS_VIP}:9080/h2")])?;
    assert_eq!(h2.status, 200, "{h2:?}");
    assert!(h2.body.contains("hello from reviews-v1"), "{h2:?}");
    let line = wait_request_lines(&wp, &["path=\"/h2\""], 1)?.remove(0);
    assert!(line.contains("protocol=HTTP/2") && line.contains("status=200"), "{line}");

    let ws = m.client.echo_ws(&format!("ws://{REVIEWS_VIP}:9080/chat"), "hello over the waypoint")?;
    assert!(ws.upgraded, "{ws:?}");
    assert_eq!(ws.echo.as_deref(), Some("hello over the waypoint"), "{ws:?}");
    assert_eq!(ws.error, None, "{ws:?}");
    Ok(())
}

// L7-1: gRPC over HTTP/2 end to end (a port named `grpc`): the answer and the `grpc-status`
// trailer pass through, and telemetry records the gRPC status.
#[test]
fn grpc_passes_through() -> io::Result<()> {
    let m = WaypointMesh::new("wp::grpc", &["greeter-v1"])?;
    let pod = &m.backends[0];
    let config = [
        m.base_config(),
        k8s::pod_yaml(pod, APP_NS, "greeter", &[("app", "greeter"), ("version", "v1")]),
        k8s::named_service_yaml("greeter", APP_NS, "10.96.0.40", &[("grpc", 9090, 9090)], &[("app", "greeter")], &[]),
    ]
    .concat();
    m.topo.write_config("c.yaml", &config)?;
    let _server = pod.echo_server(EchoKind::Grpc, 9090).name("greeter-v1").start()?;
    let (_p1, _p2, wp) = m.start()?;

    let reply = m.client.grpc_call("10.96.0.40:9090", "hi", &[])?;
    assert_eq!(reply.grpc_status, Some(0), "{reply:?}");
    assert_eq!(reply.message.as_deref(), Some("greeter-v1: hi"), "{reply:?}");
    let failed = m.client.grpc_call("10.96.0.40:9090", "hi", &["--status", "14"])?;
    assert_eq!((failed.grpc_status, failed.grpc_message.as_deref()), (Some(14), Some("requested")), "{failed:?}");
    let line = wait_request_lines(&wp, &["grpc_status=14"], 1)?.remove(0);
    assert!(line.contains("path=\"/strait.test.Echo/Say\"") && line.contains("protocol=HTTP/2"), "{line}");
    let metrics = m.waypoint_pod.run_ok("curl", &["-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"])?;
    assert!(
        metrics.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("request_protocol=\"grpc\"")
            && l.contains("grpc_response_status=\"14\"")),
        "{metrics}"
    );
    Ok(())
}

// L7-8, seed "TCP traffic shifting": a `tcp` route by port sends about 80 % of connections to
// v1 and 20 % to v2.
#[test]
fn tcp_routes_shift_connections_by_weight() -> io::Result<()> {
    let m = WaypointMesh::new("wp::tcp", &["tcp-echo-v1", "tcp-echo-v2"])?;
    let mut config = m.base_config();
    for (pod, version) in m.backends.iter().zip(["v1", "v2"]) {
        config.push_str(&k8s::pod_yaml(pod, APP_NS, "tcp-echo", &[("app", "tcp-echo"), ("version", version)]));
    }
    config.push_str(&k8s::named_service_yaml(
        "tcp-echo",
        APP_NS,
        "10.96.0.50",
        &[("tcp", 9000, 9000)],
        &[("app", "tcp-echo")],
        &[],
    ));
    config.push_str(&format!(
        "---\napiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\nmetadata:\n  name: tcp-echo\n  namespace: {APP_NS}\nspec:\n  host: tcp-echo\n  subsets:\n  - name: v1\n    labels: {{version: v1}}\n  - name: v2\n    labels: {{version: v2}}\n---\napiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata:\n  name: tcp-echo\n  namespace: {APP_NS}\nspec:\n  hosts: [tcp-echo]\n  tcp:\n  - match:\n    - port: 9000\n    route:\n    - destination:\n        host: tcp-echo\n        port: {{number: 9000}}\n        subset: v1\n      weight: 80\n    - destination:\n        host: tcp-echo\n        port: {{number: 9000}}\n        subset: v2\n      weight: 20\n"
    ));
    m.topo.write_config("c.yaml", &config)?;
    let servers: Vec<_> =
        m.backends.iter().map(|p| p.start_echo_server(EchoKind::Tcp, 9000)).collect::<io::Result<_>>()?;
    let (_p1, _p2, wp) = m.start()?;
    // Starting a server probes its port once: count from here.
    let before: Vec<usize> = servers.iter().map(|s| s.count_log_lines("accepted peer=")).collect();

    let echo = bin_path("strait-echo");
    for _ in 0..100 {
        let out = m.client.run(&echo, &["send", "10.96.0.50:9000", "--bytes", "64", "--timeout-secs", "5"])?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    }
    let accepted = |i: usize| servers[i].count_log_lines("accepted peer=") - before[i];
    let (v1, v2) = (accepted(0), accepted(1));
    assert_eq!(v1 + v2, 100, "v1 {v1}, v2 {v2}");
    assert!((62..=95).contains(&v1), "about 80 % to v1: v1 {v1}, v2 {v2}");
    common::wait_access_lines(
        &wp,
        &["waypoint tcp", "dst.service=tcp-echo.shop.svc.cluster.local"],
        100,
        common::TIMEOUT,
    )?;
    Ok(())
}
