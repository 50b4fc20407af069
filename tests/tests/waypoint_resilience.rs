//! End to end: resilience features of the waypoint (SPEC L7-4 to L7-7, L7-11), the
//! seed's fault-injection, timeout, circuit-breaking and mirroring tasks with our own servers
//! standing in for Bookinfo and httpbin. Needs root.

mod common;

use std::{
    io,
    time::{Duration, Instant},
};

use common::{APP_NS, WaypointMesh, reviews_config, start_backends, wait_request_lines};
use strait_testbed::EchoKind;

const REVIEWS: &str = "http://10.96.0.30:9080";

fn vs(spec: &str) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata:\n  name: reviews\n  namespace: {APP_NS}\nspec:\n  hosts: [reviews]\n{spec}"
    )
}

/// The reviews DestinationRule with a traffic policy: replaces the plain one of `reviews_config`.
fn with_policy(m: &WaypointMesh, policy: &str) -> String {
    reviews_config(m)
        .replace("spec:\n  host: reviews\n", &format!("spec:\n  host: reviews\n  trafficPolicy:\n{policy}"))
}

// L7-6, seed "fault injection": a 7 s delay for jason only; a client with a 3 s timeout gets
// its error, everyone else is served at once.
#[test]
fn delay_fault_for_one_user() -> io::Result<()> {
    let m = WaypointMesh::new("wp::delay", &["reviews-v1"])?;
    let spec = "  http:\n  - fault:\n      delay:\n        fixedDelay: 7s\n        percentage: {value: 100}\n    match:\n    - headers:\n        end-user: {exact: jason}\n    route:\n    - destination: {host: reviews, subset: v1}\n  - route:\n    - destination: {host: reviews, subset: v1}\n";
    m.topo.write_config("c.yaml", &(reviews_config(&m) + &vs(spec)))?;
    let _servers = start_backends(&m, 9080)?;
    let (_p1, _p2, _wp) = m.start()?;

    let started = Instant::now();
    let other = m.client.curl_args(&["--max-time", "3", "-H", "end-user: alice", &format!("{REVIEWS}/reviews/0")])?;
    assert_eq!(other.status, 200, "{other:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "not delayed: {:?}", started.elapsed());
    let started = Instant::now();
    let jason = m.client.curl_args(&["--max-time", "3", "-H", "end-user: jason", &format!("{REVIEWS}/reviews/0")])?;
    assert_eq!((jason.status, jason.exit_code), (0, Some(28)), "the client timed out: {jason:?}");
    assert!(started.elapsed() >= Duration::from_millis(2900), "{:?}", started.elapsed());
    Ok(())
}

// L7-6: an abort answers 500 for jason without calling the upstream; others get through.
#[test]
fn abort_fault_never_calls_the_upstream() -> io::Result<()> {
    let m = WaypointMesh::new("wp::abort", &["reviews-v1"])?;
    let spec = "  http:\n  - fault:\n      abort:\n        httpStatus: 500\n        percentage: {value: 100}\n    match:\n    - headers:\n        end-user: {exact: jason}\n    route:\n    - destination: {host: reviews, subset: v1}\n  - route:\n    - destination: {host: reviews, subset: v1}\n";
    m.topo.write_config("c.yaml", &(reviews_config(&m) + &vs(spec)))?;
    let servers = start_backends(&m, 9080)?;
    let (_p1, _p2, wp) = m.start()?;

    let jason = m.client.echo_get(&format!("{REVIEWS}/ratings"), 10, &[("end-user", "jason")])?;
    assert_eq!(jason.status(500), 10, "{jason:?}");
    let fault = m.client.curl_args(&["-H", "end-user: jason", &format!("{REVIEWS}/ratings")])?;
    assert_eq!((fault.status, fault.body.as_str()), (500, "fault filter abort"), "{fault:?}");
    assert_eq!(servers[0].count_log_lines("request peer="), 0, "the upstream was never called");
    let others = m.client.echo_get(&format!("{REVIEWS}/ratings"), 5, &[])?;
    assert_eq!(others.status(200), 5, "{others:?}");
    let lines = wait_request_lines(&wp, &["status=500", "flags=FI"], 11)?;
    assert!(lines[0].contains("upstream=-"), "{}", lines[0]);
    Ok(())
}

// L7-5, seed "request timeouts": a 0.5 s route timeout against a 2 s upstream answers 504 in
// about half a second; `x-envoy-upstream-rq-timeout-ms` overrides it per request.
#[test]
fn route_timeout_cuts_a_slow_upstream() -> io::Result<()> {
    let m = WaypointMesh::new("wp::timeout", &["reviews-v1"])?;
    let spec = "  http:\n  - route:\n    - destination: {host: reviews, subset: v1}\n    timeout: 0.5s\n";
    m.topo.write_config("c.yaml", &(reviews_config(&m) + &vs(spec)))?;
    let _servers = start_backends(&m, 9080)?;
    let (_p1, _p2, wp) = m.start()?;

    let started = Instant::now();
    let slow = m.client.curl(&format!("{REVIEWS}/delay/2000"), Duration::from_secs(5))?;
    let took = started.elapsed();
    assert_eq!((slow.status, slow.body.as_str()), (504, "upstream request timeout"), "{slow:?}");
    assert!(took >= Duration::from_millis(450) && took < Duration::from_millis(1500), "{took:?}");
    let overridden =
        m.client.curl_args(&["-H", "x-envoy-upstream-rq-timeout-ms: 3000", &format!("{REVIEWS}/delay/1000")])?;
    assert_eq!(overridden.status, 200, "{overridden:?}");
    wait_request_lines(&wp, &["status=504", "flags=UT"], 1)?;
    Ok(())
}

// L7-5: three retries with a per-try timeout get through an upstream that fails twice; without
// retries the first failure is the answer.
#[test]
fn retries_get_through_a_flaky_upstream() -> io::Result<()> {
    let m = WaypointMesh::new("wp::retries", &["reviews-v1"])?;
    let spec = "  http:\n  - match:\n    - uri: {prefix: /flaky/2/retried}\n    - uri: {prefix: /flaky/9/exhausted}\n    route:\n    - destination: {host: reviews}\n    retries:\n      attempts: 3\n      perTryTimeout: 1s\n      retryOn: 5xx\n  - route:\n    - destination: {host: reviews}\n";
    m.topo.write_config("c.yaml", &(reviews_config(&m) + &vs(spec)))?;
    let servers = start_backends(&m, 9080)?;
    let (_p1, _p2, wp) = m.start()?;

    let retried = m.client.curl(&format!("{REVIEWS}/flaky/2/retried"), common::TIMEOUT)?;
    assert_eq!(retried.status, 200, "{retried:?}");
    assert_eq!(servers[0].count_log_lines("/flaky/2/retried 503"), 2, "{}", servers[0].log());
    let line = wait_request_lines(&wp, &["path=\"/flaky/2/retried\""], 1)?.remove(0);
    assert!(line.contains("status=200") && line.contains("attempts=3") && line.contains("flags=-"), "{line}");
    let once = m.client.curl(&format!("{REVIEWS}/flaky/2/single"), common::TIMEOUT)?;
    assert_eq!(once.status, 503, "no retry without a retry policy: {once:?}");
    let exhausted = m.client.curl(&format!("{REVIEWS}/flaky/9/exhausted"), common::TIMEOUT)?;
    assert_eq!(exhausted.status, 503, "{exhausted:?}");
    let line = wait_request_lines(&wp, &["path=\"/flaky/9/exhausted\""], 1)?.remove(0);
    assert!(line.contains("attempts=4") && line.contains("flags=URX"), "{line}");
    let single = wait_request_lines(&wp, &["path=\"/flaky/2/single\""], 1)?.remove(0);
    assert!(single.contains("attempts=1") && single.contains("flags=-"), "{single}");
    Ok(())
}

// L7-4, seed "circuit breaking": maxConnections 1 and http1MaxPendingRequests 1 under three
// concurrent clients: some requests overflow (503, flag UO), the others are served.
#[test]
fn connection_pool_limits_overflow() -> io::Result<()> {
    let m = WaypointMesh::new("wp::breaker", &["reviews-v1"])?;
    let policy = "    connectionPool:\n      tcp: {maxConnections: 1}\n      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}\n";
    m.topo.write_config("c.yaml", &with_policy(&m, policy))?;
    let _servers = start_backends(&m, 9080)?;
    let (_p1, _p2, wp) = m.start()?;

    let summary = m.client.echo_get_args(&format!("{REVIEWS}/delay/50"), &["--count", "30", "--concurrency", "3"])?;
    assert_eq!(summary.status(200) + summary.status(503), 30, "{summary:?}");
    assert!(summary.status(503) > 0, "some requests overflow: {summary:?}");
    // The first request holds the one connection and the second waits as the one pending
    // request: both are served, while overflowing requests answer at once.
    assert!(summary.status(200) >= 2, "the connection's and the pending request are served: {summary:?}");
    let overflowed = wait_request_lines(&wp, &["status=503", "flags=UO"], 1)?;
    assert!(overflowed[0].contains("circuit breaker"), "{}", overflowed[0]);
    Ok(())
}

// L7-4: outlier detection ejects an endpoint that fails, keeps traffic on the healthy one,
// and brings the endpoint back after baseEjectionTime.
#[test]
fn outlier_detection_ejects_and_restores() -> io::Result<()> {
    let m = WaypointMesh::new("wp::outlier", &["reviews-v1", "reviews-v2"])?;
    let policy = "    outlierDetection:\n      consecutive5xxErrors: 1\n      interval: 1s\n      baseEjectionTime: 2s\n      maxEjectionPercent: 100\n";
    m.topo.write_config("c.yaml", &with_policy(&m, policy))?;
    // Only v1 runs: v2's connections are refused until it starts.
    let _v1 = m.backends[0].echo_server(EchoKind::Http, 9080).name("reviews-v1").start()?;
    let (_p1, _p2, wp) = m.start()?;
    let url = format!("{REVIEWS}/reviews/0");

    let first = m.client.echo_get(&url, 10, &[])?;
    assert!(first.status(503) <= 2, "at most the tries before the ejection fail: {first:?}");
    let ejected = m.client.echo_get(&url, 20, &[])?;
    assert_eq!(ejected.served("reviews-v1"), 20, "all traffic on the healthy endpoint: {ejected:?}");
    let clusters = m.waypoint_pod.run_ok("curl", &["-sS", "--max-time", "5", "http://127.0.0.1:15000/clusters"])?;
    assert!(clusters.contains("\"health\": \"EJECTED\""), "{clusters}");

    let _v2 = m.backends[1].echo_server(EchoKind::Http, 9080).name("reviews-v2").start()?;
    std::thread::sleep(Duration::from_millis(2300));
    let back = m.client.echo_get(&url, 20, &[])?;
    assert_eq!(back.status(200), 20, "{back:?}");
    assert!(back.served("reviews-v2") > 0, "the endpoint is back after baseEjectionTime: {back:?}");
    wait_request_lines(&wp, &["status=503", "flags=UF"], 1)?;
    Ok(())
}

// L7-7, seed "mirroring": v1 answers, v2 receives a copy of every request with Host
// `<host>-shadow`, and a slow mirror does not slow the client down.
#[test]
fn mirror_copies_requests_off_the_critical_path() -> io::Result<()> {
    let m = WaypointMesh::new("wp::mirror", &["reviews-v1", "reviews-v2"])?;
    let spec = "  http:\n  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 100\n    mirror: {host: reviews, subset: v2}\n    mirror_percent: 100\n";
    m.topo.write_config("c.yaml", &(reviews_config(&m) + &vs(spec)))?;
    let _v1 = m.backends[0].echo_server(EchoKind::Http, 9080).name("reviews-v1").start()?;
    let v2 =
        m.backends[1].echo_server(EchoKind::Http, 9080).name("reviews-v2").delay(Duration::from_secs(1)).start()?;
    let (_p1, _p2, _wp) = m.start()?;

    let summary = m.client.echo_get(&format!("{REVIEWS}/headers"), 10, &[("Host", "reviews:9080")])?;
    assert_eq!(summary.served("reviews-v1"), 10, "the client only sees v1: {summary:?}");
    assert!(summary.elapsed_ms < 1000, "ten requests, each mirrored to a 1 s server: {summary:?}");
    let deadline = Instant::now() + common::TIMEOUT;
    while v2.count_log_lines("host=reviews-shadow:9080") < 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(v2.count_log_lines("host=reviews-shadow:9080"), 10, "{}", v2.log());
    Ok(())
}

// SIGTERM drains the waypoint (a request in flight completes, the process then exits), and
// while no waypoint runs, traffic to its services fails instead of skipping it (Istio's
// behaviour, documented in the README).
#[test]
fn waypoint_drains_and_its_absence_fails_closed() -> io::Result<()> {
    let m = WaypointMesh::new("wp::drain", &["reviews-v1"])?;
    m.topo.write_config("c.yaml", &reviews_config(&m))?;
    let _servers = start_backends(&m, 9080)?;
    let (p1, _p2, wp) = m.start()?;
    assert_eq!(m.client.curl(&format!("{REVIEWS}/warm"), common::TIMEOUT)?.status, 200);

    let client = m.client.clone();
    let slow = std::thread::spawn(move || client.curl(&format!("{REVIEWS}/delay/1500"), common::TIMEOUT));
    std::thread::sleep(Duration::from_millis(500));
    wp.terminate(libc::SIGTERM)?;
    let status = wp.wait_exit(common::TIMEOUT).ok_or_else(|| io::Error::other("the waypoint did not exit"))?;
    let slow = slow.join().map_err(|_| io::Error::other("client thread panicked"))??;
    assert_eq!(slow.status, 200, "the request in flight finished: {slow:?}");
    assert!(status.success(), "{status:?}: {}", wp.log_tail());
    assert!(wp.log().contains("draining"), "{}", wp.log_tail());

    let refused = m.client.curl(&format!("{REVIEWS}/after"), Duration::from_secs(5))?;
    assert_eq!(refused.status, 0, "no answer without the waypoint: {refused:?}");
    common::wait_access_line(
        &p1,
        &["outbound", "result=upstream_connect_failed", "dst.addr=10.96.0.30:9080"],
        common::TIMEOUT,
    )?;
    Ok(())
}
