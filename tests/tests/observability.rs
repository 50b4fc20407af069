//! End to end: what node proxies tell their operator (SPEC OBS-1, OBS-2, OBS-3). Istio's TCP
//! metrics are scraped from :15020 and read with Prometheus's own Python parser (the
//! `prometheus-client` package, installed with pip when missing), access lines are written as
//! JSON to a file, or in Envoy's and Istio's default text formats and read back with a parser
//! driven by those documented format strings, and the admin API on :15000 and readiness on
//! :15021 are queried in the node's namespace. Needs root.

mod common;

use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    process::{Command, Stdio},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use common::{
    MESH, REVIEWS_VIP, TIMEOUT, TwoNodes, WaypointMesh, apply, ca_dir, reviews_config, start_backends, start_node,
    start_waypoint_with, wait_access_line,
};
use serde_json::Value;
use strait_testbed::{EchoKind, Node};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/mesh/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/mesh/sa/server";
const TCP_FAMILIES: [&str; 4] = [
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_received_bytes_total",
    "istio_tcp_sent_bytes_total",
];

fn two_nodes(name: &str) -> io::Result<TwoNodes> {
    let t = TwoNodes::new(name)?;
    t.topo.write_config("c.yaml", &t.config("server", &[("version", "v2")]))?;
    Ok(t)
}

/// One sample as Prometheus's parser read it.
#[derive(Debug)]
struct Sample {
    name: String,
    /// The type of the family the sample belongs to (`counter`, `gauge`, ... `unknown`).
    kind: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

// OBS-1, OBS-2: a request across nodes shows up in both proxies' Istio metrics, with the
// reporter, workloads and SPIFFE principals as Istio labels them and bytes counted, and in the
// destination's JSON access log file.
#[test]
fn istio_tcp_metrics_and_json_access_lines_describe_a_mesh_connection() -> io::Result<()> {
    ensure_prometheus_parser()?;
    let t = two_nodes("obs::metrics")?;
    let _http = t.server.start_echo_server(EchoKind::Http, 8080)?;
    let ca = ca_dir(&t.topo, "ca");
    let access_file = t.topo.dir().join("node2-access.json");
    let access_arg = access_file.to_string_lossy().into_owned();
    let p1 = start_node(&t.topo, &t.n1, &ca, &[])?;
    let _p2 = start_node(&t.topo, &t.n2, &ca, &["--access-log-format", "json", "--access-log", &access_arg])?;

    let reply = t.client.curl(&format!("http://{}:8080/", t.server.ip()), TIMEOUT)?;
    assert!(reply.ok(), "{reply:?}");
    wait_access_line(&p1, &["outbound", &format!("dst.addr={}:8080", t.server.ip())], TIMEOUT)?;

    for (node, reporter) in [(&t.n1, "source"), (&t.n2, "destination")] {
        let samples = scrape_until(node, |s| {
            TCP_FAMILIES.iter().all(|family| connection_sample(s, family, reporter).is_some_and(|x| x.value > 0.0))
        })?;
        // Prometheus itself asks for OpenMetrics: the same samples, in the stricter format.
        let openmetrics =
            parse_with_prometheus(&scrape(node, Some("application/openmetrics-text;version=1.0.0"))?, true)?;
        for family in TCP_FAMILIES {
            let sample = connection_sample(&samples, family, reporter)
                .unwrap_or_else(|| panic!("no {family} with reporter={reporter} in {samples:#?}"));
            assert!(sample.value >= 1.0, "{sample:?}");
            assert_eq!(sample.kind, "counter", "{sample:?}");
            assert!(connection_sample(&openmetrics, family, reporter).is_some_and(|s| s.kind == "counter"), "{family}");
            let label = |k: &str| sample.labels.get(k).map(String::as_str);
            assert_eq!(label("source_workload"), Some("client"), "{sample:?}");
            assert_eq!(label("source_workload_namespace"), Some(MESH), "{sample:?}");
            assert_eq!(label("destination_workload"), Some("server"), "{sample:?}");
            assert_eq!(label("destination_workload_namespace"), Some(MESH), "{sample:?}");
            assert_eq!(label("destination_canonical_revision"), Some("v2"), "{sample:?}");
            assert_eq!(label("connection_security_policy"), Some("mutual_tls"), "{sample:?}");
            assert_eq!(label("response_flags"), Some("-"), "{sample:?}");
            assert_eq!(label("request_protocol"), Some("tcp"), "{sample:?}");
        }
        // An HTTP request and its answer: the answer is the bigger one.
        let request = connection_sample(&samples, "istio_tcp_received_bytes_total", reporter).map_or(0.0, |s| s.value);
        let response = connection_sample(&samples, "istio_tcp_sent_bytes_total", reporter).map_or(0.0, |s| s.value);
        assert!(request > 50.0 && response > request, "request {request} B, response {response} B on {reporter}");
        if reporter == "source" {
            assert!(samples.iter().any(|s| s.name.starts_with("strait_capture_")), "capture counters: {samples:#?}");
        }
    }

    let lines = wait_json_lines(&access_file, |l| l["direction"] == "inbound" && l["result"] == "ok")?;
    let inbound = lines.iter().find(|l| l["direction"] == "inbound" && l["result"] == "ok").expect("an inbound line");
    assert_eq!(inbound["src"]["identity"], CLIENT_ID, "{inbound}");
    assert_eq!(inbound["dst"]["identity"], SERVER_ID, "{inbound}");
    assert_eq!(inbound["dst"]["addr"], format!("{}:8080", t.server.ip()), "{inbound}");
    assert_eq!(inbound["dst"]["workload"], "mesh/server", "{inbound}");
    assert_eq!(inbound["security"], "mutual_tls", "{inbound}");
    assert!(
        inbound["sent"].as_u64() > Some(50) && inbound["received"].as_u64() > inbound["sent"].as_u64(),
        "{inbound}"
    );
    assert!(inbound["duration_ms"].is_u64() && inbound["start_time"].is_string(), "{inbound}");
    assert!(inbound["reason"].is_null() && inbound["response_flags"] == "-", "{inbound}");
    Ok(())
}

// OBS-3: the admin API shows certificates and workloads, changes the log level at run time,
// answers unknown paths with the list of endpoints; readiness answers on :15021.
#[test]
fn admin_api_shows_certs_and_workloads_and_changes_the_log_level() -> io::Result<()> {
    let t = two_nodes("obs::admin")?;
    let p1 = start_node(&t.topo, &t.n1, &ca_dir(&t.topo, "ca"), &[])?;
    let admin = |path: &str| format!("http://127.0.0.1:15000{path}");

    let (status, body) = http(&t.n1, "GET", "http://127.0.0.1:15021/healthz/ready")?;
    assert_eq!((status, body.trim()), (200, "ready"));
    let (status, _) = http(&t.n1, "GET", &format!("http://{}:15021/healthz/ready", t.n1.ip()))?;
    assert_eq!(status, 200, "readiness listens on every address");
    assert_eq!(http(&t.n1, "GET", &admin("/healthz/ready"))?.0, 200);

    // Certificates of local workloads are fetched ahead of their first connection.
    let deadline = Instant::now() + TIMEOUT;
    let certs = loop {
        let certs = json(&http(&t.n1, "GET", &admin("/certs"))?.1)?;
        if certs.as_array().is_some_and(|c| c.iter().any(|c| c["identity"] == CLIENT_ID)) || Instant::now() > deadline {
            break certs;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let cert = certs.as_array().and_then(|c| c.iter().find(|c| c["identity"] == CLIENT_ID)).expect("client cert");
    assert!(cert["serial"].as_str().is_some_and(|s| !s.is_empty()), "{cert}");
    assert_eq!(cert["state"], "valid", "{cert}");
    assert!(cert["not_before"].as_str() < cert["not_after"].as_str(), "{cert}");

    let workloads = json(&http(&t.n1, "GET", &admin("/workloads"))?.1)?;
    let find = |name: &str| workloads.as_array().and_then(|w| w.iter().find(|w| w["name"] == name)).cloned();
    let client = find("client").expect("client listed");
    assert_eq!((client["identity"].as_str(), client["capture"].as_str()), (Some(CLIENT_ID), Some("captured")));
    assert_eq!((client["local"].as_bool(), client["ip"].as_str()), (Some(true), Some(&*t.client.ip().to_string())));
    let server = find("server").expect("server listed");
    assert_eq!((server["identity"].as_str(), server["local"].as_bool()), (Some(SERVER_ID), Some(false)));

    assert!(json(&http(&t.n1, "GET", &admin("/config_dump"))?.1)?["workloads"].is_array());
    assert!(http(&t.n1, "GET", &admin("/stats"))?.1.contains("strait.capture."));
    let (status, body) = http(&t.n1, "GET", &admin("/nonsense"))?;
    assert_eq!(status, 404);
    assert!(["/certs", "/config_dump", "/logging", "/stats", "/workloads"].iter().all(|p| body.contains(p)), "{body}");
    assert_eq!(http(&t.n1, "POST", &admin("/certs"))?.0, 405);

    // Run-time log level: debug lines appear only once it is turned on.
    assert_eq!(http(&t.n1, "GET", &admin("/logging"))?, (200, "info\n".to_owned()));
    assert_eq!(p1.count_log_lines(" DEBUG "), 0, "no debug lines at info");
    assert_eq!(http(&t.n1, "POST", &admin("/logging?level=debug"))?, (200, "debug\n".to_owned()));
    http(&t.n1, "GET", &admin("/stats"))?;
    let line = p1.wait_for_log(" DEBUG ", TIMEOUT)?;
    assert!(line.contains("request"), "{line}");
    let (status, body) = http(&t.n1, "GET", &admin("/logging?level=info%2Cstrait%3Dnot-a-level"))?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(http(&t.n1, "GET", &admin("/logging?level=info"))?, (200, "info\n".to_owned()));
    assert_eq!(http(&t.n1, "GET", &admin("/logging"))?.1, "info\n");
    Ok(())
}

/// Envoy's default access-log format string, as Envoy's documentation gives it.
const ENVOY_DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";
/// Istio's default text format (mesh config `accessLogFormat` unset), as Istio documents it.
const ISTIO_DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

// OBS-2: `--access-log-format envoy` writes Envoy's default format and `istio` Istio's, for
// requests (the waypoint) and connections (node proxies, `- - -` and code 0 as Envoy's TCP
// proxy writes them): every line parses with a parser driven by the documented format string,
// and the fields hold what happened (codes, flags, bytes, durations, addresses).
#[test]
fn envoy_and_istio_format_lines_parse_with_the_documented_format_strings() -> io::Result<()> {
    let m = WaypointMesh::new("obs::envoy-format", &["reviews-v1"])?;
    let spec = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\nspec:\n  hosts: [reviews]\n  http:\n  - match:\n    - headers:\n        x-fail: {exact: \"yes\"}\n    fault:\n      abort:\n        httpStatus: 503\n        percentage: {value: 100}\n    route:\n    - destination: {host: reviews}\n  - route:\n    - destination: {host: reviews}\n";
    // `db`, in an ambient namespace without a waypoint: connections to it close at once, so
    // both node proxies write their lines (the waypoint's upstream connections stay pooled).
    let db = m.topo.add_pod(&m.n2, "db")?;
    let db_config = [
        strait_testbed::k8s::namespace_yaml("data", &[("istio.io/dataplane-mode", "ambient")]),
        strait_testbed::k8s::pod_yaml(&db, "data", "db", &[("app", "db")]),
    ]
    .concat();
    m.topo.write_config("c.yaml", &(reviews_config(&m) + &db_config))?;
    let _servers = start_backends(&m, 9080)?;
    let _db = db.echo_server(EchoKind::Http, 8080).name("db").start()?;
    let file = |name: &str| m.topo.dir().join(name);
    let (n1_log, n2_log, wp_log) = (file("node1.log"), file("node2.log"), file("waypoint.log"));
    let arg = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let p1 = start_node(&m.topo, &m.n1, &m.ca, &["--access-log-format", "istio", "--access-log", &arg(&n1_log)])?;
    let p2 = start_node(&m.topo, &m.n2, &m.ca, &["--access-log-format", "envoy", "--access-log", &arg(&n2_log)])?;
    let wp = start_waypoint_with(
        &m.topo,
        &m.waypoint_pod,
        &m.ca,
        "waypoint",
        common::APP_NS,
        &["--access-log-format", "envoy", "--access-log", &arg(&wp_log)],
    )?;
    apply(&m.topo, &[&p1, &p2, &wp], "vs.yaml", spec)?;

    let url = format!("http://{REVIEWS_VIP}:9080/reviews/1?q=a");
    let ok = m.client.curl_args(&["-H", "x-forwarded-for: 192.0.2.7", "-A", "strait test/1.0", &url])?;
    assert_eq!(ok.status, 200, "{ok:?}");
    let aborted = m.client.curl_args(&["-H", "x-fail: yes", &url])?;
    assert_eq!(aborted.status, 503, "{aborted:?}");
    let direct = m.client.curl(&format!("http://{}:8080/", db.ip()), TIMEOUT)?;
    assert_eq!(direct.status, 200, "{direct:?}");
    let backend = format!("{}:9080", m.backends[0].ip());

    // The waypoint's request lines, in Envoy's format.
    let requests = wait_parsed_lines(&wp_log, ENVOY_DEFAULT_FORMAT, 2)?;
    for (name, path) in [("waypoint, envoy", &wp_log), ("node 1, istio", &n1_log), ("node 2, envoy", &n2_log)] {
        eprintln!("observability: {name}:\n{}", std::fs::read_to_string(path).unwrap_or_default().trim_end());
    }
    let served = requests.iter().find(|f| f["RESPONSE_CODE"] == "200").expect("the 200's line");
    assert_eq!(served["REQ(:METHOD)"], "GET", "{served:?}");
    assert_eq!(served["REQ(X-ENVOY-ORIGINAL-PATH?:PATH)"], "/reviews/1?q=a", "{served:?}");
    assert_eq!(served["PROTOCOL"], "HTTP/1.1", "{served:?}");
    assert_eq!(served["RESPONSE_FLAGS"], "-", "{served:?}");
    assert_eq!(served["BYTES_RECEIVED"], "0", "a GET has no body: {served:?}");
    assert_eq!(served["BYTES_SENT"].parse::<usize>().ok(), Some(ok.body_bytes.len()), "{served:?}");
    let duration = number(served, "DURATION");
    let upstream_time = number(served, "RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)");
    assert!(upstream_time <= duration && duration < 5_000, "{served:?}");
    assert_eq!(served["REQ(X-FORWARDED-FOR)"], "192.0.2.7", "{served:?}");
    assert_eq!(served["REQ(USER-AGENT)"], "strait test/1.0", "{served:?}");
    assert!(served["REQ(X-REQUEST-ID)"].len() >= 16, "{served:?}");
    assert_eq!(served["REQ(:AUTHORITY)"], format!("{REVIEWS_VIP}:9080"), "{served:?}");
    assert_eq!(served["UPSTREAM_HOST"], backend, "{served:?}");
    let fault = requests.iter().find(|f| f["RESPONSE_CODE"] == "503").expect("the abort's line");
    assert_eq!(fault["RESPONSE_FLAGS"], "FI", "{fault:?}");
    assert_eq!(fault["RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)"], "-", "never sent upstream: {fault:?}");
    assert_eq!(fault["UPSTREAM_HOST"], "-", "{fault:?}");
    assert!(fault["REQ(USER-AGENT)"].starts_with("curl/"), "{fault:?}");

    // Node 2's line for the connection to db, in Envoy's format: a TCP proxy's line.
    let db_addr = format!("{}:8080", db.ip());
    let connections = wait_parsed_lines(&n2_log, ENVOY_DEFAULT_FORMAT, 1)?;
    let inbound = connections.iter().find(|f| f["UPSTREAM_HOST"] == db_addr).expect("a line to db");
    for (field, tcp) in [("REQ(:METHOD)", "-"), ("PROTOCOL", "-"), ("RESPONSE_CODE", "0"), ("RESPONSE_FLAGS", "-")] {
        assert_eq!(inbound[field], tcp, "{inbound:?}");
    }
    assert!(number(inbound, "BYTES_RECEIVED") > 50, "the request: {inbound:?}");
    let sent = usize::try_from(number(inbound, "BYTES_SENT")).unwrap_or(usize::MAX);
    assert!(sent > direct.body_bytes.len(), "the response, head and body: {inbound:?}");
    assert!(number(inbound, "DURATION") < 5_000, "{inbound:?}");

    // Node 1's lines (the client to the service's VIP, and to db), in Istio's format.
    let outbound = wait_parsed_lines(&n1_log, ISTIO_DEFAULT_FORMAT, 3)?;
    let vip = format!("{REVIEWS_VIP}:9080");
    let to_vip = outbound.iter().filter(|f| f["DOWNSTREAM_LOCAL_ADDRESS"] == vip).count();
    assert_eq!(to_vip, 2, "one per curl: {outbound:?}");
    let client = outbound.iter().find(|f| f["DOWNSTREAM_LOCAL_ADDRESS"] == db_addr).expect("a line to db");
    assert!(client["DOWNSTREAM_REMOTE_ADDRESS"].starts_with(&format!("{}:", m.client.ip())), "{client:?}");
    assert_eq!((client["RESPONSE_CODE"].as_str(), client["RESPONSE_FLAGS"].as_str()), ("0", "-"), "{client:?}");
    assert_eq!(client["CONNECTION_TERMINATION_DETAILS"], "-", "{client:?}");
    assert_eq!(client["UPSTREAM_HOST"], db_addr, "{client:?}");
    assert_eq!(
        (number(client, "BYTES_RECEIVED"), number(client, "BYTES_SENT")),
        (number(inbound, "BYTES_RECEIVED"), number(inbound, "BYTES_SENT")),
        "both ends counted the same bytes"
    );
    Ok(())
}

/// A numeric field of a parsed line (fails the test otherwise).
fn number(fields: &BTreeMap<String, String>, name: &str) -> u64 {
    fields[name].parse().unwrap_or_else(|_| panic!("{name} is not a number: {fields:?}"))
}

/// Reads an access-log file until it has `count` lines; every line must parse with `format`.
fn wait_parsed_lines(path: &std::path::Path, format: &str, count: usize) -> io::Result<Vec<BTreeMap<String, String>>> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines = text
            .split_inclusive('\n')
            // A line being written has no end yet.
            .filter(|line| line.ends_with('\n'))
            .map(|line| {
                parse_access_line(format, line)
                    .ok_or_else(|| io::Error::other(format!("{} does not parse with {format:?}", line.trim_end())))
            })
            .collect::<io::Result<Vec<_>>>()?;
        if lines.len() >= count || Instant::now() > deadline {
            return Ok(lines);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Reads `line` with an Envoy format string: text outside `%OPERATOR%` must appear as written,
/// and each operator's value runs up to the text that follows it (Envoy writes no escapes, so
/// that text must not occur inside the value). `None` when the line does not fit the format.
fn parse_access_line(format: &str, line: &str) -> Option<BTreeMap<String, String>> {
    let mut fields = BTreeMap::new();
    let mut rest = line;
    let mut parts = format.split('%').enumerate().peekable();
    while let Some((i, part)) = parts.next() {
        if i % 2 == 0 {
            rest = rest.strip_prefix(part)?;
            continue;
        }
        // An operator: its value ends where the next literal text begins.
        let next = parts.peek().map_or("", |(_, text)| *text);
        let end = if next.is_empty() { rest.len() } else { rest.find(next)? };
        let value = &rest[..end];
        if value.is_empty() {
            return None;
        }
        fields.insert(part.to_owned(), value.to_owned());
        rest = &rest[end..];
    }
    rest.is_empty().then_some(fields)
}

#[test]
fn the_format_parser_reads_envoys_documented_example_and_refuses_others() {
    // Envoy's documentation's example of its default format.
    let example = "[2016-04-15T20:17:00.310Z] \"POST /api/v1/locations HTTP/2\" 204 - 154 0 226 100 \"10.0.35.28\" \"nsq2http\" \"cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2\" \"locations\" \"tcp://10.0.2.1:80\"\n";
    let fields = parse_access_line(ENVOY_DEFAULT_FORMAT, example).expect("parses");
    assert_eq!(fields["REQ(:METHOD)"], "POST");
    assert_eq!(fields["RESPONSE_CODE"], "204");
    assert_eq!(fields["RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)"], "100");
    assert_eq!(fields["UPSTREAM_HOST"], "tcp://10.0.2.1:80");
    assert!(parse_access_line(ENVOY_DEFAULT_FORMAT, "[x] outbound tcp src.addr=1\n").is_none());
    assert!(parse_access_line(ISTIO_DEFAULT_FORMAT, example).is_none(), "Istio's has more fields");
}

/// `curl` in the node's namespace: (status, body).
fn http(node: &Node, method: &str, url: &str) -> io::Result<(u16, String)> {
    let out = node.run_ok("curl", &["-sS", "--max-time", "5", "-X", method, "-w", "\n%{http_code}", url])?;
    let (body, status) = out.rsplit_once('\n').unwrap_or(("", &out));
    Ok((status.trim().parse().unwrap_or(0), body.to_owned()))
}

fn json(text: &str) -> io::Result<Value> {
    serde_json::from_str(text).map_err(|e| io::Error::other(format!("not JSON ({e}): {text}")))
}

/// The sample of `family` for the client → server connection as `reporter` saw it.
fn connection_sample<'a>(samples: &'a [Sample], family: &str, reporter: &str) -> Option<&'a Sample> {
    samples.iter().find(|s| {
        let label = |k: &str| s.labels.get(k).map(String::as_str);
        s.name == family
            && label("reporter") == Some(reporter)
            && label("source_principal") == Some(CLIENT_ID)
            && label("destination_principal") == Some(SERVER_ID)
    })
}

/// The node's `/metrics`, asking for a format with `accept`.
fn scrape(node: &Node, accept: Option<&str>) -> io::Result<String> {
    let header = format!("accept: {}", accept.unwrap_or("*/*"));
    node.run_ok("curl", &["-sS", "--max-time", "5", "-H", &header, "http://127.0.0.1:15020/metrics"])
}

/// Scrapes the node's `/metrics` in Prometheus text until `done` holds (counters are updated
/// as connections close), returning the last scrape.
fn scrape_until(node: &Node, done: impl Fn(&[Sample]) -> bool) -> io::Result<Vec<Sample>> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let samples = parse_with_prometheus(&scrape(node, None)?, false)?;
        if done(&samples) || Instant::now() > deadline {
            return Ok(samples);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Parses an exposition with `prometheus_client`'s parser for the Prometheus text format, or
/// for OpenMetrics.
fn parse_with_prometheus(text: &str, openmetrics: bool) -> io::Result<Vec<Sample>> {
    const SCRIPT: &str = r#"
import json, sys
if sys.argv[1] == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    from prometheus_client.parser import text_string_to_metric_families
out = [{"name": s.name, "kind": family.type, "labels": s.labels, "value": s.value}
       for family in text_string_to_metric_families(sys.stdin.read()) for s in family.samples]
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT, if openmetrics { "openmetrics" } else { "prometheus" }])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().ok_or_else(|| io::Error::other("no stdin"))?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "Prometheus's parser rejected the exposition: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let parsed = json(&String::from_utf8_lossy(&out.stdout))?;
    Ok(parsed
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| Sample {
            name: s["name"].as_str().unwrap_or_default().to_owned(),
            kind: s["kind"].as_str().unwrap_or_default().to_owned(),
            labels: s["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect(),
            value: s["value"].as_f64().unwrap_or(f64::NAN),
        })
        .collect())
}

/// Installs Python's `prometheus_client` with pip when it is missing (once per test binary).
fn ensure_prometheus_parser() -> io::Result<()> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let imports =
        || Command::new("python3").args(["-c", "import prometheus_client"]).output().is_ok_and(|o| o.status.success());
    READY
        .get_or_init(|| {
            if imports() {
                return Ok(());
            }
            let pip = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "prometheus-client"])
                .output()
                .map_err(|e| format!("cannot run pip: {e}"))?;
            if imports() {
                Ok(())
            } else {
                Err(format!(
                    "python3 cannot import prometheus_client and `pip install prometheus-client` failed: {}",
                    String::from_utf8_lossy(&pip.stderr)
                ))
            }
        })
        .clone()
        .map_err(io::Error::other)
}

/// Waits until the JSON access log file has a line matching `wanted`; every line must parse.
fn wait_json_lines(path: &std::path::Path, wanted: impl Fn(&Value) -> bool) -> io::Result<Vec<Value>> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines = text.lines().map(json).collect::<io::Result<Vec<Value>>>()?;
        if lines.iter().any(&wanted) || Instant::now() > deadline {
            return Ok(lines);
        }
        thread::sleep(Duration::from_millis(50));
    }
}
