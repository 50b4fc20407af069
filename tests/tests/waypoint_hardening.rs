//! End to end: one hostile client must not degrade anybody else's traffic through a waypoint
//! (SPEC OPS-4, L7-4, L7-11): broken and abandoned request bodies, HTTP/2 rapid reset,
//! slowloris heads and stalled bodies, buffered-body memory, and hop-by-hop hygiene towards
//! clients of old upstreams. Each test runs the attack while a legitimate client measures its
//! success rate. Needs root.

mod common;

use std::{
    io, thread,
    time::{Duration, Instant},
};

use common::{APP_NS, REVIEWS_VIP, WaypointMesh, request_lines, reviews_config, start_backends, wait_request_lines};
use strait_testbed::{EchoKind, Process, k8s};

const REVIEWS: &str = "http://10.96.0.30:9080";
const REVIEWS_TARGET: &str = "10.96.0.30:9080";

/// The reviews DestinationRule with a traffic policy: replaces the plain one of `reviews_config`.
fn with_policy(m: &WaypointMesh, policy: &str) -> String {
    reviews_config(m)
        .replace("spec:\n  host: reviews\n", &format!("spec:\n  host: reviews\n  trafficPolicy:\n{policy}"))
}

fn vs(spec: &str) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata:\n  name: reviews\n  namespace: {APP_NS}\nspec:\n  hosts: [reviews]\n{spec}"
    )
}

/// The service-wide cluster of reviews (no subset) on the waypoint's `/clusters` admin page,
/// as JSON text. The page lists the DestinationRule's subset clusters too, each with its own
/// outlier state.
fn clusters(m: &WaypointMesh) -> io::Result<String> {
    let page = m.waypoint_pod.run_ok("curl", &["-sS", "--max-time", "5", "http://127.0.0.1:15000/clusters"])?;
    let all: serde_json::Value = serde_json::from_str(&page).map_err(|e| io::Error::other(format!("{e}: {page}")))?;
    let cluster = all
        .as_array()
        .and_then(|clusters| clusters.iter().find(|c| c["subset"].is_null() && c["port"] == 9080))
        .ok_or_else(|| io::Error::other(format!("no cluster for reviews:9080 in {page}")))?;
    Ok(cluster.to_string())
}

/// Lines of a node proxy's log that show it treated the waypoint's HBONE connection as
/// abusive or closed it.
fn abuse_verdicts(node: &Process) -> Vec<String> {
    node.log()
        .lines()
        .filter(|l| {
            ["too_many_resets", "too_many_internal_resets", "reached limit", "GOAWAY"].iter().any(|n| l.contains(n))
        })
        .map(str::to_owned)
        .collect()
}

// OPS-4, L7-4: invalid chunked bodies and aborted uploads are the client's fault: answered 400
// `DPE` (or logged `DC`), never counted by outlier detection and never retried, so dozens of
// them eject nothing and everybody else is served. A real upstream failure still ejects.
#[test]
fn client_body_errors_never_eject_endpoints() -> io::Result<()> {
    let m = WaypointMesh::new("wph::bodies", &["reviews-v1", "reviews-v2"])?;
    let policy = "    outlierDetection:\n      consecutive5xxErrors: 2\n      interval: 1s\n      baseEjectionTime: 30s\n      maxEjectionPercent: 100\n";
    let retried = "  http:\n  - match:\n    - uri: {prefix: /retried}\n    route:\n    - destination: {host: reviews}\n    retries:\n      attempts: 3\n      retryOn: 5xx,reset,connect-failure\n  - route:\n    - destination: {host: reviews}\n";
    m.topo.write_config("c.yaml", &(with_policy(&m, policy) + &vs(retried)))?;
    let mut servers = start_backends(&m, 9080)?;
    let (_p1, _p2, wp) = m.start()?;
    assert_eq!(m.client.echo_get(&format!("{REVIEWS}/warm"), 4, &[])?.status(200), 4);

    // Streamed to the upstream (no retries), and buffered for retries (`/retried`).
    for path in ["/upload", "/retried"] {
        let invalid = m.client.echo_abuse(
            REVIEWS_TARGET,
            &["--mode", "invalid-chunked", "--connections", "12", "--path", path, "--hold-secs", "5"],
        )?;
        assert_eq!(invalid.status(400), 12, "malformed bodies are the client's fault: {invalid:?}");
        let aborted = m.client.echo_abuse(
            REVIEWS_TARGET,
            &["--mode", "abort-upload", "--connections", "12", "--bytes", "20000", "--path", path],
        )?;
        assert_eq!(aborted.opened, 12, "{aborted:?}");
    }

    let legit = m.client.echo_get(&format!("{REVIEWS}/after"), 40, &[])?;
    assert_eq!(legit.status(200), 40, "{legit:?}");
    assert!(legit.served("reviews-v1") > 0 && legit.served("reviews-v2") > 0, "both endpoints serve: {legit:?}");
    let view = clusters(&m)?;
    assert!(!view.contains("EJECTED") && view.matches("\"HEALTHY\"").count() == 2, "{view}");
    for path in ["path=\"/upload\"", "path=\"/retried\""] {
        wait_request_lines(&wp, &[path, "status=400", "flags=DPE"], 12)?;
        wait_request_lines(&wp, &[path, "flags=DC"], 12)?;
        assert!(request_lines(&wp, &[path, "status=503"]).is_empty(), "{}", wp.log_tail());
    }
    let retried = request_lines(&wp, &["path=\"/retried\""]);
    assert!(retried.iter().all(|l| l.contains("attempts=0")), "never sent, let alone retried: {retried:?}");

    // A real upstream failure: v2's server goes away, its connections are refused.
    drop(servers.remove(1));
    let during = m.client.echo_get(&format!("{REVIEWS}/outage"), 20, &[])?;
    assert!(during.status(503) <= 2, "ejected after two failures: {during:?}");
    let view = clusters(&m)?;
    assert_eq!(view.matches("\"EJECTED\"").count(), 1, "{view}");
    Ok(())
}

/// Runs `strait-echo abuse` from the client pod in a thread.
fn abuse_in_background(
    m: &WaypointMesh,
    args: &[&str],
) -> thread::JoinHandle<io::Result<strait_testbed::echo::abuse::AbuseReport>> {
    let client = m.client.clone();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    thread::spawn(move || client.echo_abuse(REVIEWS_TARGET, &args.iter().map(String::as_str).collect::<Vec<_>>()))
}

fn joined<T>(handle: thread::JoinHandle<io::Result<T>>) -> io::Result<T> {
    handle.join().map_err(|_| io::Error::other("client thread panicked"))?
}

// OPS-4: slow clients are cut off by the waypoint's client-side timeouts while everybody else
// is served: 300 slowloris heads close within the header timeout (counted from their first
// byte), silent and idle keep-alive connections (HTTP/1.1 and HTTP/2) within the idle timeout,
// and stalled request bodies get 408 within the body idle timeout without counting against
// the endpoint (outlier detection ejects on one error here).
#[test]
fn slow_clients_are_timed_out() -> io::Result<()> {
    let m = WaypointMesh::new("wph::slow", &["reviews-v1"])?;
    let policy = "    outlierDetection:\n      consecutive5xxErrors: 1\n      interval: 1s\n      baseEjectionTime: 30s\n      maxEjectionPercent: 100\n";
    m.topo.write_config("c.yaml", &with_policy(&m, policy))?;
    let _servers = start_backends(&m, 9080)?;
    let limits = ["--header-timeout", "2s", "--idle-timeout", "3s", "--body-idle-timeout", "2s"];
    let (_p1, _p2, wp) = m.start_with(&limits)?;
    assert_eq!(m.client.echo_get(&format!("{REVIEWS}/warm"), 2, &[])?.status(200), 2);

    let hold = ["--hold-secs", "12"];
    let heads = abuse_in_background(&m, &[&["--mode", "partial-head", "--connections", "300"][..], &hold].concat());
    let bodies = abuse_in_background(
        &m,
        &[&["--mode", "stalled-body", "--connections", "20", "--bytes", "1000", "--path", "/upload"][..], &hold]
            .concat(),
    );
    let silent = abuse_in_background(&m, &[&["--mode", "silent", "--connections", "20"][..], &hold].concat());
    let idle = abuse_in_background(&m, &[&["--mode", "idle-keepalive", "--connections", "20"][..], &hold].concat());
    let h2_idle = abuse_in_background(&m, &[&["--mode", "h2-idle", "--connections", "20"][..], &hold].concat());
    let legit = m.client.echo_get_args(&format!("{REVIEWS}/legit"), &["--count", "400", "--concurrency", "2"])?;
    assert_eq!(legit.status(200), 400, "{legit:?}");

    let closed_in = |report: &strait_testbed::echo::abuse::AbuseReport, n: u64, from_ms: u64, to_ms: u64| {
        assert_eq!((report.opened, report.closed_by_peer, report.errors), (n, n, 0), "{report:?}");
        assert!((from_ms..to_ms).contains(&report.max_close_ms), "closed after {} ms: {report:?}", report.max_close_ms);
    };
    closed_in(&joined(heads)?, 300, 1_900, 4_000);
    let bodies = joined(bodies)?;
    closed_in(&bodies, 20, 1_900, 4_000);
    assert_eq!(bodies.status(408), 20, "{bodies:?}");
    closed_in(&joined(silent)?, 20, 2_900, 5_000);
    let idle = joined(idle)?;
    closed_in(&idle, 20, 2_900, 5_000);
    assert_eq!(idle.status(200), 20, "{idle:?}");
    // HTTP/2: GOAWAY at the idle timeout, closed when the client does not acknowledge it.
    closed_in(&joined(h2_idle)?, 20, 2_900, 7_500);

    wait_request_lines(&wp, &["status=408", "flags=SI", "path=\"/upload\""], 20)?;
    // A request head beyond 60 KiB (Envoy's limit) is refused.
    let big = format!("x-big: {}", "b".repeat(70_000));
    let refused = m.client.curl_args(&["-H", &big, &format!("{REVIEWS}/big")])?;
    assert_eq!(refused.status, 431, "{refused:?}");
    let view = clusters(&m)?;
    assert!(!view.contains("EJECTED"), "{view}");
    Ok(())
}

/// The resident set of a process, from /proc.
fn rss_mib(process: &Process) -> io::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", process.pid()))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| io::Error::other("no VmRSS"))?;
    Ok(kib / 1024.0)
}

// OPS-4: 200 clients each hold an unfinished 1 MB body on a route with retries. The waypoint
// buffers bodies for retries only up to its budget (16 MiB here) and streams the others
// without retries, so its memory stays within the budget plus what 200 connections cost; it
// serves everybody else meanwhile, and gives the memory back once the clients are gone.
#[test]
fn buffered_bodies_are_capped_and_memory_returns() -> io::Result<()> {
    let m = WaypointMesh::new("wph::budget", &["reviews-v1"])?;
    let spec = "  http:\n  - route:\n    - destination: {host: reviews}\n    retries:\n      attempts: 2\n      retryOn: 5xx\n";
    m.topo.write_config("c.yaml", &(reviews_config(&m) + &vs(spec)))?;
    let _servers = start_backends(&m, 9080)?;
    let (_p1, _p2, wp) = m.start_with(&["--body-buffer-budget", "16Mi"])?;
    let warm = m.client.echo_get_args(&format!("{REVIEWS}/warm"), &["--count", "200", "--concurrency", "2"])?;
    assert_eq!(warm.status(200), 200, "{warm:?}");
    let before = rss_mib(&wp)?;

    let bodies = abuse_in_background(
        &m,
        &[
            "--mode",
            "stalled-body",
            "--connections",
            "200",
            "--bytes",
            "1000000",
            "--path",
            "/upload",
            "--hold-secs",
            "6",
        ],
    );
    let mut peak = before;
    let mut posted = None;
    let started = Instant::now();
    while !bodies.is_finished() {
        peak = peak.max(rss_mib(&wp)?);
        if posted.is_none() && started.elapsed() > Duration::from_secs(4) {
            // The budget is spent: a request with a body is still served, streamed.
            let body = "x".repeat(20_000);
            posted = Some(m.client.curl_args(&["-X", "POST", "--data-binary", &body, &format!("{REVIEWS}/post")])?);
        }
        thread::sleep(Duration::from_millis(100));
    }
    let bodies = joined(bodies)?;
    assert_eq!(bodies.opened, 200, "{bodies:?}");
    let posted = posted.ok_or_else(|| io::Error::other("the clients left before the POST"))?;
    assert_eq!((posted.status, posted.body.starts_with("received 20000 bytes")), (200, true), "{posted:?}");
    let legit = m.client.echo_get(&format!("{REVIEWS}/after"), 50, &[])?;
    assert_eq!(legit.status(200), 50, "{legit:?}");
    // The heap is trimmed a second after the last buffered body is freed, and again two
    // seconds later for what ended after that.
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut after = rss_mib(&wp)?;
    while after - before >= 8.0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        after = rss_mib(&wp)?;
    }
    eprintln!("waypoint RSS: {before:.1} MiB before, {peak:.1} MiB peak, {after:.1} MiB after");
    // Without the budget, 200 bodies of 1 MB took 200 MiB more; the connections themselves
    // (read buffers, HTTP/2 windows, tasks) measured 50-60 MiB at 200.
    assert!(peak - before < 16.0 + 64.0, "budget 16 MiB: {before:.1} → {peak:.1} MiB");
    assert!(after - before < 8.0, "memory returns: {before:.1} → {peak:.1} → {after:.1} MiB");
    Ok(())
}

const GREETER_VIP: &str = "10.96.0.40";

// OPS-4: HTTP/2 rapid reset (HEADERS then RST_STREAM, thousands of streams) against a `grpc`
// port and an `http` port through the waypoint, while legitimate gRPC and HTTP clients run:
// every legitimate request succeeds, and the destination node proxy never sees the waypoint's
// shared HBONE connection as abusive (no `too_many_resets`, no GOAWAY).
#[test]
fn rapid_reset_is_absorbed_by_the_waypoint() -> io::Result<()> {
    let m = WaypointMesh::new("wph::rapid", &["reviews-v1", "greeter-v1"])?;
    let greeter = &m.backends[1];
    let mut config = reviews_config(&m)
        .replace(&k8s::pod_yaml(greeter, APP_NS, "reviews", &[("app", "reviews"), ("version", "v1")]), "");
    config.push_str(&k8s::pod_yaml(greeter, APP_NS, "greeter", &[("app", "greeter"), ("version", "v1")]));
    config.push_str(&k8s::named_service_yaml(
        "greeter",
        APP_NS,
        GREETER_VIP,
        &[("grpc", 9090, 9090)],
        &[("app", "greeter")],
        &[],
    ));
    m.topo.write_config("c.yaml", &config)?;
    let _reviews = m.backends[0].echo_server(EchoKind::Http, 9080).name("reviews-v1").start()?;
    let greeter_server = greeter.echo_server(EchoKind::Grpc, 9090).name("greeter-v1").start()?;
    let (_p1, p2, wp) = m.start()?;
    let grpc_target = format!("{GREETER_VIP}:9090");
    assert_eq!(m.client.grpc_call(&grpc_target, "warm", &[])?.grpc_status, Some(0));

    let attack = |target: String, end_stream: &'static str| {
        let client = m.client.clone();
        thread::spawn(move || {
            client.rapid_reset(target, 20_000, &["--burst", "50", "--gap-ms", "5", "--end-stream", end_stream])
        })
    };
    let attacks = [
        attack(grpc_target.clone(), "true"),
        attack(grpc_target.clone(), "false"),
        attack(REVIEWS_TARGET.to_owned(), "true"),
    ];
    let http_client = m.client.clone();
    let http = thread::spawn(move || {
        http_client.echo_get_args(&format!("{REVIEWS}/legit"), &["--count", "300", "--concurrency", "2"])
    });
    let mut grpc_failures = Vec::new();
    let started = Instant::now();
    let mut calls = 0;
    while calls < 40 || (started.elapsed() < Duration::from_secs(20) && !attacks.iter().all(|a| a.is_finished())) {
        let reply = m.client.grpc_call(&grpc_target, "legit", &[])?;
        if reply.grpc_status != Some(0) {
            grpc_failures.push(reply);
        }
        calls += 1;
    }
    let http = http.join().map_err(|_| io::Error::other("client thread panicked"))??;
    for attack in attacks {
        let report = attack.join().map_err(|_| io::Error::other("attack thread panicked"))??;
        eprintln!("attack: {report:?}");
        assert_eq!(report.streams, 20_000, "the attack ran: {report:?}");
    }
    eprintln!("legitimate: {calls} gRPC calls, {} failed; HTTP {:?}", grpc_failures.len(), http.statuses);
    assert!(grpc_failures.is_empty(), "{} of {calls} gRPC calls failed: {grpc_failures:?}", grpc_failures.len());
    assert_eq!(http.status(200), 300, "{http:?}");
    let verdicts = abuse_verdicts(&p2);
    assert!(verdicts.is_empty(), "node2 closed the waypoint's connection: {verdicts:?}");
    // Nor did the gRPC server close the waypoint's shared HTTP/2 connection as abusive.
    assert_eq!(greeter_server.count_log_lines("connection error"), 0, "{}", greeter_server.log_tail());
    assert!(abuse_verdicts(&wp).iter().all(|l| !l.contains("HBONE")), "{}", wp.log_tail());
    Ok(())
}

// L7-1: an HTTP/1.0 upstream that closes every connection is answered to HTTP/1.1 clients in
// HTTP/1.1, without its hop-by-hop `connection: close`, and the client's connection stays open.
#[test]
fn http10_upstream_is_answered_in_the_clients_version() -> io::Result<()> {
    let m = WaypointMesh::new("wph::http10", &["reviews-v1"])?;
    m.topo.write_config("c.yaml", &reviews_config(&m))?;
    let _server = m.backends[0].echo_server(EchoKind::Http, 9080).name("reviews-v1").http10().start()?;
    let (_p1, _p2, _wp) = m.start()?;

    let url = format!("http://{REVIEWS_VIP}:9080/old");
    let output = m.client.run("curl", &["-sS", "-v", "--max-time", "10", &url, &url])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.matches("hello from reviews-v1").count(), 2, "{stdout}\n{stderr}");
    let status_lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("< HTTP/")).collect();
    assert_eq!(status_lines.len(), 2, "{stderr}");
    assert!(status_lines.iter().all(|l| l.starts_with("< HTTP/1.1 200")), "{status_lines:?}");
    assert!(!stderr.to_ascii_lowercase().contains("< connection: close"), "{stderr}");
    assert!(stderr.contains("Re-using existing connection") || stderr.contains("Reusing existing"), "{stderr}");
    Ok(())
}
