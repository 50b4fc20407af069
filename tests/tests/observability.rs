//! End to end: what node proxies tell their operator (SPEC OBS-1, OBS-2, OBS-3). Istio's TCP
//! metrics are scraped from :15020 and read with Prometheus's own Python parser (the
//! `prometheus-client` package, installed with pip when missing), access lines are written as
//! JSON to a file, and the admin API on :15000 and readiness on :15021 are queried in the node's
//! namespace. Needs root.

mod common;

use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    process::{Command, Stdio},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use common::{MESH, TIMEOUT, TwoNodes, ca_dir, start_node, wait_access_line};
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
