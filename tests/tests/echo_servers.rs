//! `strait-echo`'s servers and clients across pods, without a mesh: what the waypoint tests will
//! rely on (names, delays, flaky upstreams, request logs, tallies, WebSocket, gRPC) must work
//! on a plain network first. Needs root; run with `cargo test -p strait-testbed`.

use std::collections::HashSet;
use std::io;
use std::time::{Duration, Instant};

use strait_testbed::{EchoKind, Pod, Topology};

const TIMEOUT: Duration = Duration::from_secs(5);

/// A client pod on node1 and a server pod on node2, so traffic crosses the underlay.
fn client_and_server(test: &str) -> io::Result<(Topology, Pod, Pod)> {
    let topo = Topology::new(test)?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let client = topo.add_pod(&n1, "client")?;
    let server = topo.add_pod(&n2, "server")?;
    Ok((topo, client, server))
}

#[test]
fn http_server_names_itself_and_logs_each_request() -> io::Result<()> {
    let (_topo, client, server) = client_and_server("echo::named")?;
    let http = server.echo_server(EchoKind::Http, 9080).name("reviews-v2").start()?;
    let url = format!("http://{}:9080/reviews/0?u=1", server.ip());

    let summary = client.echo_get(&url, 3, &[("end-user", "jason"), ("x-request-id", "r-1")])?;
    assert_eq!((summary.requests, summary.status(200), summary.served("reviews-v2")), (3, 3, 3), "{summary:?}");
    assert_eq!(summary.errors, 0, "{summary:?}");
    let line = http.wait_for_log(&format!("request peer={}:", client.ip()), TIMEOUT)?;
    let expected = format!("GET /reviews/0?u=1 200 host={}:9080 request_id=r-1 user=jason", server.ip());
    assert!(line.ends_with(&expected), "{line}");

    let summary = client.echo_get(&url, 1, &[("Host", "reviews.default.svc.cluster.local")])?;
    assert_eq!(summary.served("reviews-v2"), 1, "{summary:?}");
    let line = http.wait_for_log("host=reviews.default.svc.cluster.local request_id=- user=-", TIMEOUT)?;
    assert!(line.contains(" GET /reviews/0?u=1 200 "), "{line}");

    let reply = client.curl(&format!("http://{}:9080/", server.ip()), TIMEOUT)?;
    assert!(reply.body.starts_with(&format!("hello from reviews-v2 peer={}:", client.ip())), "{reply:?}");
    Ok(())
}

#[test]
fn delay_ms_slows_every_response() -> io::Result<()> {
    let (_topo, client, server) = client_and_server("echo::delay")?;
    let _slow = server.echo_server(EchoKind::Http, 9080).name("slow").delay(Duration::from_millis(300)).start()?;
    let _fast = server.echo_server(EchoKind::Http, 9081).name("fast").start()?;

    let slow = client.echo_get(&format!("http://{}:9080/", server.ip()), 2, &[])?;
    assert_eq!(slow.status(200), 2, "{slow:?}");
    assert!(slow.max_latency_ms >= 300 && slow.elapsed_ms >= 600, "{slow:?}");
    let fast = client.echo_get(&format!("http://{}:9081/", server.ip()), 2, &[])?;
    assert!(fast.status(200) == 2 && fast.max_latency_ms < 200, "{fast:?}");

    let timed_out = client.echo_get_args(&format!("http://{}:9080/", server.ip()), &["--timeout-ms", "100"])?;
    assert_eq!((timed_out.errors, timed_out.statuses.len()), (1, 0), "{timed_out:?}");
    assert!(timed_out.error_samples.iter().any(|e| e.contains("timed out after 100 ms")), "{timed_out:?}");
    Ok(())
}

#[test]
fn flaky_path_fails_twice_then_succeeds() -> io::Result<()> {
    let (_topo, client, server) = client_and_server("echo::flaky")?;
    let http = server.echo_server(EchoKind::Http, 9080).name("ratings-v1").start()?;
    let base = format!("http://{}:9080", server.ip());

    let statuses: Vec<u16> = (0..4)
        .map(|_| client.curl(&format!("{base}/flaky/2/ratings?attempt=x"), TIMEOUT).map(|r| r.status))
        .collect::<io::Result<_>>()?;
    assert_eq!(statuses, [503, 503, 200, 200]);
    // Another key counts on its own.
    assert_eq!(client.curl(&format!("{base}/flaky/2/other"), TIMEOUT)?.status, 503);

    let summary = client.echo_get(&format!("{base}/flaky/3/bulk"), 5, &[])?;
    assert_eq!((summary.status(503), summary.status(200), summary.served("ratings-v1")), (3, 2, 5), "{summary:?}");
    assert_eq!(http.count_log_lines("GET /flaky/2/ratings?attempt=x 503 "), 2);
    assert_eq!(http.count_log_lines("GET /flaky/2/ratings?attempt=x 200 "), 2);
    Ok(())
}

#[test]
fn get_tallies_many_requests_over_few_connections() -> io::Result<()> {
    let (_topo, client, server) = client_and_server("echo::tally")?;
    let http = server.echo_server(EchoKind::Http, 9080).name("v1").start()?;
    let url = format!("http://{}:9080/", server.ip());

    let started = Instant::now();
    let summary = client.echo_get_args(&url, &["--count", "200", "--concurrency", "4"])?;
    assert_eq!((summary.requests, summary.status(200), summary.served("v1"), summary.errors), (200, 200, 200, 0));
    assert!(started.elapsed() < Duration::from_secs(3), "200 requests took {:?}", started.elapsed());
    // Keep-alive: 200 requests, at most 4 client ports.
    let peer = format!("request peer={}:", client.ip());
    let log = http.log();
    let ports: HashSet<&str> =
        log.lines().filter_map(|l| l.strip_prefix(peer.as_str())).filter_map(|l| l.split(' ').next()).collect();
    assert!(!ports.is_empty() && ports.len() <= 4, "{ports:?}");

    let errors = client.echo_get(&format!("{url}status/503"), 10, &[])?;
    assert_eq!((errors.status(503), errors.served("v1"), errors.errors), (10, 10, 0), "{errors:?}");

    let refused = client.echo_get(&format!("http://{}:9999/", server.ip()), 3, &[])?;
    assert_eq!((refused.requests, refused.errors, refused.statuses.len()), (3, 3, 0), "{refused:?}");
    assert!(refused.error_samples.iter().any(|e| e.contains("refused")), "{refused:?}");
    Ok(())
}

#[test]
fn websocket_upgrade_echoes_a_message() -> io::Result<()> {
    let (_topo, client, server) = client_and_server("echo::websocket")?;
    let http = server.echo_server(EchoKind::Http, 9080).name("chat-v1").start()?;

    let message = "hello \"mesh\" ✓";
    let report = client.echo_ws(&format!("ws://{}:9080/chat", server.ip()), message)?;
    assert_eq!((report.upgraded, report.echo.as_deref(), report.error), (true, Some(message), None));
    let line = http.wait_for_log(&format!("websocket peer={}:", client.ip()), TIMEOUT)?;
    assert!(line.ends_with(" echoed=1"), "{line}");
    assert_eq!(http.count_log_lines(" GET /chat 101 "), 1);

    // A server that does not speak WebSocket (the TCP echo sends the request back): the check
    // fails, and says why.
    let _tcp = server.echo_server(EchoKind::Tcp, 9000).start()?;
    let report = client.echo_ws(&format!("http://{}:9000/", server.ip()), message)?;
    assert!(!report.upgraded && report.error.is_some(), "{report:?}");
    Ok(())
}

#[test]
fn grpc_call_gets_ok_and_requested_statuses() -> io::Result<()> {
    let (_topo, client, server) = client_and_server("echo::grpc")?;
    let grpc = server.echo_server(EchoKind::Grpc, 50051).name("ratings-v1").start()?;
    let target = format!("{}:50051", server.ip());

    let reply = client.grpc_call(&target, "hello", &[])?;
    assert_eq!(
        (reply.grpc_status, reply.message.as_deref(), reply.http_status),
        (Some(0), Some("ratings-v1: hello"), Some(200))
    );
    let line = grpc.wait_for_log(&format!("grpc peer={}:", client.ip()), TIMEOUT)?;
    assert!(line.ends_with(&format!(" /strait.test.Echo/Say status=0 authority={target}")), "{line}");

    let reply = client.grpc_call(&target, "hello", &["--status", "14", "--authority", "ratings:9080"])?;
    assert_eq!((reply.grpc_status, reply.message, reply.grpc_message.as_deref()), (Some(14), None, Some("requested")));
    grpc.wait_for_log("/strait.test.Echo/Say status=14 authority=ratings:9080", TIMEOUT)?;

    let refused = client.grpc_call(format!("{}:50052", server.ip()), "hello", &["--timeout-ms", "1000"])?;
    assert_eq!((refused.grpc_status, refused.http_status), (None, None), "{refused:?}");
    assert!(refused.error.is_some_and(|e| e.contains("refused")));
    Ok(())
}
