//! End to end: a real Prometheus scrapes strait (SPEC OBS-1, OBS-5). Debian's `prometheus`
//! server runs in node 1's network namespace and scrapes both node proxies and the waypoint on
//! :15020 every second; the test sends known traffic through the waypoint (some of it aborted
//! with 503 by a fault, some of it slow) and plain TCP between two pods, then asks Prometheus's
//! HTTP API the PromQL of Istio's Service, Workload and Mesh dashboards, and every expression of
//! strait's own dashboard (`deploy/observability/grafana-dashboard.json`). Needs root.

mod common;

use std::{
    collections::BTreeMap,
    io, thread,
    time::{Duration, Instant},
};

use common::{APP_NS, TIMEOUT, WaypointMesh, apply, start_backends};
use serde_json::Value;
use strait_testbed::{EchoKind, Node, Process, k8s};

const REVIEWS_VIP: &str = "10.96.0.30";
const RATINGS_VIP: &str = "10.96.0.31";
const REVIEWS: &str = "reviews.shop.svc.cluster.local";
const RATINGS: &str = "ratings.shop.svc.cluster.local";
/// Where Prometheus listens, inside node 1's namespace (so tests never share a port).
const PROMETHEUS: &str = "http://127.0.0.1:9090";
/// How long a scrape result may take to show up (1 s scrapes, a loaded machine).
const SCRAPE_WAIT: Duration = Duration::from_secs(30);
/// How long the measured counters must have been scraped before `rate(...[1m])` is read:
/// Prometheus extrapolates a window's increase by up to half a scrape interval at its start
/// and up to one at its end, which is at most 1.5 s / 15 s = 10 % of the counted requests.
const SAMPLED_FOR: Duration = Duration::from_secs(15);

/// Requests of the measured traffic, after the warm-up (`WARM` of each kind).
const REVIEWS_OK: u64 = 60;
const REVIEWS_ABORTED: u64 = 30;
const RATINGS_SLOW: u64 = 10;
const WARM: u64 = 2;
/// Each ratings answer waits this long: its duration lands in Istio's (250, 500] ms bucket.
const RATINGS_DELAY_MS: u64 = 300;
/// Plain TCP connections from the client to the `db` pod, outside any waypoint.
const DB_CONNECTIONS: u64 = 3;

// OBS-1, OBS-5: the PromQL of Istio's dashboards, run by a real Prometheus over strait's
// series, answers what the traffic was: request rates by service and code, success rate per
// service, p99 by service, TCP connections by workloads with mutual_tls; the dashboards' own
// label matchers find strait's series; and every expression of strait's dashboard returns data.
#[test]
fn a_real_prometheus_answers_istios_dashboards_and_straits_own() -> io::Result<()> {
    let m = WaypointMesh::new("prom::dashboards", &["reviews-v1", "ratings-v1"])?;
    let db = m.topo.add_pod(&m.n2, "db")?;
    m.topo.write_config("c.yaml", &config(&m, &db))?;
    let _backends = start_backends(&m, 9080)?;
    let _db = db.echo_server(EchoKind::Http, 8080).name("db").start()?;
    let (p1, p2, wp) = m.start()?;
    apply(&m.topo, &[&p1, &p2, &wp], "vs.yaml", ABORT_ON_HEADER)?;

    let targets = [
        ("strait-node", vec![format!("{}:15020", m.n1.ip()), format!("{}:15020", m.n2.ip())]),
        ("strait-waypoint", vec![format!("{}:15020", m.waypoint_pod.ip())]),
    ];
    let prom = Prometheus::start(&m, &targets)?;

    // Warm-up: every series the checks read exists and has been scraped before the measured
    // traffic, so the window's increase is the measured traffic.
    send(&m, WARM, WARM, WARM)?;
    prom.wait_until("sum(istio_requests_total) by (destination_service, response_code)", |r| {
        r.len() >= 3 && r.iter().all(|(_, v)| *v >= WARM as f64)
    })?;
    let sampled_since = Instant::now();

    send(&m, REVIEWS_OK, REVIEWS_ABORTED, RATINGS_SLOW)?;
    for _ in 0..DB_CONNECTIONS {
        let reply = m.client.curl(&format!("http://{}:8080/", db.ip()), TIMEOUT)?;
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    let total = |service: &str, code: &str| -> f64 {
        match (service, code) {
            (REVIEWS, "200") => (WARM + REVIEWS_OK) as f64,
            (REVIEWS, "503") => (WARM + REVIEWS_ABORTED) as f64,
            (RATINGS, "200") => (WARM + RATINGS_SLOW) as f64,
            _ => 0.0,
        }
    };
    prom.wait_until("sum(istio_requests_total{reporter=\"waypoint\"}) by (destination_service, response_code)", |r| {
        r.iter().all(|(l, v)| *v >= total(label(l, "destination_service"), label(l, "response_code"))) && r.len() == 3
    })?;
    prom.wait_until("sum(istio_tcp_connections_opened_total{destination_workload=\"db\"})", |r| {
        r.first().is_some_and(|(_, v)| *v >= 2.0 * DB_CONNECTIONS as f64)
    })?;
    thread::sleep(SAMPLED_FOR.saturating_sub(sampled_since.elapsed()));

    check_istio_queries(&prom)?;
    check_istio_dashboards(&prom)?;
    check_straits_dashboard(&prom)?;
    Ok(())
}

/// The brief's own list: rates by service and code, success rate, p99, TCP connections.
fn check_istio_queries(prom: &Prometheus) -> io::Result<()> {
    // Requests per second over the last minute, times 60: the requests of that minute.
    let rates = prom
        .query("sum(rate(istio_requests_total{reporter=\"waypoint\"}[1m])) by (destination_service, response_code)")?;
    for (service, code, measured) in
        [(REVIEWS, "200", REVIEWS_OK), (REVIEWS, "503", REVIEWS_ABORTED), (RATINGS, "200", RATINGS_SLOW)]
    {
        let per_minute = value(&rates, &[("destination_service", service), ("response_code", code)])? * 60.0;
        // At least the measured requests (warm-ups scraped earlier are outside the increase),
        // at most all of them plus the extrapolation of SAMPLED_FOR.
        let (low, high) = (measured as f64 * 0.97, (measured + WARM) as f64 * 1.12);
        assert!(
            (low..=high).contains(&per_minute),
            "{service} {code}: rate × 60 = {per_minute:.1}, expected {measured} requests ({low:.1}..{high:.1}): {rates:?}"
        );
    }
    assert_eq!(rates.len(), 3, "one series per service and code: {rates:?}");
    eprintln!("prometheus: requests per second by service and code over 1m: {rates:?}");

    // Success rate (non-5xx) per service, as the dashboards compute it.
    let success = prom.query(
        "sum(rate(istio_requests_total{reporter=\"waypoint\",response_code!~\"5.*\"}[1m])) by (destination_service) \
         / sum(rate(istio_requests_total{reporter=\"waypoint\"}[1m])) by (destination_service)",
    )?;
    let expected = REVIEWS_OK as f64 / (REVIEWS_OK + REVIEWS_ABORTED) as f64;
    let reviews = value(&success, &[("destination_service", REVIEWS)])?;
    assert!((reviews - expected).abs() < 0.05, "reviews success rate {reviews:.3}, expected {expected:.3}");
    assert_eq!(value(&success, &[("destination_service", RATINGS)])?, 1.0, "{success:?}");

    // p99 by service: every ratings request took 300 ms and more, which Istio's buckets put in
    // (250, 500] (or the next bucket up on a loaded machine); reviews answers at once.
    let p99 = prom.query(
        "histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket[1m])) by (le, destination_service))",
    )?;
    let ratings = value(&p99, &[("destination_service", RATINGS)])?;
    assert!((250.0..=1000.0).contains(&ratings), "ratings p99 {ratings} ms: {p99:?}");
    let reviews = value(&p99, &[("destination_service", REVIEWS)])?;
    eprintln!("prometheus: success rate {success:?}; p99 ratings {ratings:.1} ms, reviews {reviews:.1} ms");
    assert!(reviews < ratings, "reviews p99 {reviews} ms is not below ratings' {ratings} ms: {p99:?}");

    // TCP connections by workloads, in mutual TLS: each counted by both node proxies.
    let tcp = prom.query(
        "sum(istio_tcp_connections_opened_total) by (source_workload, destination_workload, connection_security_policy)",
    )?;
    let db = value(
        &tcp,
        &[("source_workload", "client"), ("destination_workload", "db"), ("connection_security_policy", "mutual_tls")],
    )?;
    assert_eq!(db, 2.0 * DB_CONNECTIONS as f64, "reported by the source and the destination proxy: {tcp:?}");
    assert!(
        !tcp.iter().any(|(l, _)| label(l, "connection_security_policy") == "none"),
        "no connection of the mesh left it in plaintext: {tcp:?}"
    );
    Ok(())
}

/// A representative set of the exact expressions of Istio's dashboards, their Grafana variables
/// filled as a user picking this mesh's service and workload would: their matchers and
/// groupings find strait's series with the labels their legends print.
fn check_istio_dashboards(prom: &Prometheus) -> io::Result<()> {
    let service = |expr: &str| {
        expr.replace("$qrep", "waypoint")
            .replace("$service", REVIEWS)
            .replace("$srcwl", ".*")
            .replace("$srcns", ".*")
            .replace("$__rate_interval", "1m")
    };
    // Istio Service Dashboard: its Service variable, then the panels.
    let services = prom.query(
        "sum(istio_requests_total{}) by (destination_service) or sum(istio_tcp_sent_bytes_total{}) by (destination_service)",
    )?;
    for name in [REVIEWS, RATINGS] {
        assert!(services.iter().any(|(l, _)| label(l, "destination_service") == name), "{name} listed: {services:?}");
    }
    let namespaces = prom.query(&service(
        "sum(istio_requests_total{reporter=~\"$qrep\", destination_service=\"$service\"}) by (source_workload_namespace) \
         or sum(istio_tcp_sent_bytes_total{reporter=~\"$qrep\", destination_service=\"$service\"}) by (source_workload_namespace)",
    ))?;
    assert_eq!(labels_of(&namespaces, "source_workload_namespace"), [APP_NS], "Client Workload Namespace variable");
    for panel in [
        "round(sum(irate(istio_requests_total{reporter=~\"$qrep\",destination_service=\"$service\"}[$__rate_interval])), 0.001)",
        "sum(irate(istio_requests_total{reporter=~\"$qrep\",destination_service=\"$service\",response_code!~\"5.*\"}[$__rate_interval])) / (sum(irate(istio_requests_total{reporter=~\"$qrep\",destination_service=\"$service\"}[$__rate_interval])) or on () vector(1))",
        "(histogram_quantile(0.99, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~\"$qrep\",destination_service=\"$service\"}[$__rate_interval])) by (le)) / 1000) or histogram_quantile(0.99, sum(irate(istio_request_duration_seconds_bucket{reporter=~\"$qrep\",destination_service=\"$service\"}[$__rate_interval])) by (le))",
    ] {
        assert!(!prom.query(&service(panel))?.is_empty(), "no data for {panel}");
    }
    // "Incoming Requests By Source And Response Code", mTLS series: one per code, from the client.
    let by_source = prom.query(&service(
        "round(sum(irate(istio_requests_total{connection_security_policy=\"mutual_tls\",destination_service=\"$service\",reporter=~\"$qrep\",source_workload=~\"$srcwl\",source_workload_namespace=~\"$srcns\"}[$__rate_interval])) by (source_workload, source_workload_namespace, response_code), 0.001)",
    ))?;
    assert_eq!(labels_of(&by_source, "response_code"), ["200", "503"], "{by_source:?}");
    assert!(
        by_source
            .iter()
            .all(|(l, _)| label(l, "source_workload") == "client" && label(l, "source_workload_namespace") == APP_NS),
        "{by_source:?}"
    );
    // Istio Workload Dashboard for reviews-v1: requests seen by the waypoint, TCP by its node.
    let workload = |expr: &str| expr.replace("$namespace", APP_NS).replace("$workload", "reviews-v1");
    for (reporter, panel) in [
        (
            "waypoint",
            "round(sum(irate(istio_requests_total{reporter=\"$qrep\",destination_workload_namespace=~\"$namespace\",destination_workload=~\"$workload\"}[5m])), 0.001)",
        ),
        (
            "destination",
            "sum(irate(istio_tcp_sent_bytes_total{reporter=\"$qrep\", destination_workload_namespace=~\"$namespace\", destination_workload=~\"$workload\"}[1m])) + sum(irate(istio_tcp_received_bytes_total{reporter=\"$qrep\", destination_workload_namespace=~\"$namespace\", destination_workload=~\"$workload\"}[1m]))",
        ),
    ] {
        let expr = workload(panel).replace("$qrep", reporter);
        assert!(!prom.query(&expr)?.is_empty(), "no data for {expr}");
    }
    // Istio Mesh Dashboard: global success rate and the workloads table's p99.
    let global = prom.query(
        "sum(rate(istio_requests_total{reporter=~\"source|waypoint\",response_code!~\"5..\"}[1m])) / sum(rate(istio_requests_total{reporter=~\"source|waypoint\"}[1m]))",
    )?;
    let ok = (REVIEWS_OK + RATINGS_SLOW) as f64;
    let expected = ok / (ok + REVIEWS_ABORTED as f64);
    let global = global.first().map_or(f64::NAN, |(_, v)| *v);
    assert!((global - expected).abs() < 0.05, "mesh success rate {global:.3}, expected {expected:.3}");
    let table = prom.query(
        "label_join(histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{reporter=~\"source|waypoint\"}[1m])) by (le, destination_workload, destination_workload_namespace)), \"destination_workload_var\", \".\", \"destination_workload\", \"destination_workload_namespace\")",
    )?;
    let ratings = value(&table, &[("destination_workload_var", "ratings-v1.shop")])?;
    assert!((250.0..=1000.0).contains(&ratings), "ratings-v1 p99 {ratings} ms: {table:?}");
    Ok(())
}

/// Every expression of `deploy/observability/grafana-dashboard.json` parses and returns data,
/// with its variables as "All" would fill them; the certificates it shows expire in about the
/// 24 h a workload certificate lives.
fn check_straits_dashboard(prom: &Prometheus) -> io::Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability/grafana-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
    let exprs: Vec<&str> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|panel| panel["targets"].as_array().into_iter().flatten())
        .filter_map(|target| target["expr"].as_str())
        .collect();
    assert!(exprs.len() >= 10, "the dashboard's expressions: {exprs:?}");
    for expr in exprs {
        let filled = expr.replace("$instance", ".*").replace("$__rate_interval", "1m");
        assert!(!prom.query(&filled)?.is_empty(), "no data for the dashboard's `{expr}`");
    }
    // Its Proxy variable lists the two node proxies and the waypoint.
    let instances = prom.query("count by (instance) (strait_certificate_expiry_timestamp_seconds)")?;
    assert_eq!(instances.len(), 3, "{instances:?}");
    let left = prom.query("min(strait_certificate_expiry_timestamp_seconds) - time()")?;
    let left = left.first().map_or(f64::NAN, |(_, v)| *v);
    assert!((23.0 * 3600.0..=24.5 * 3600.0).contains(&left), "soonest expiry in {left} s");
    Ok(())
}

/// `reviews` aborts with 503 when asked to (`x-fail: yes`), else routes as usual.
const ABORT_ON_HEADER: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\nspec:\n  hosts: [reviews]\n  http:\n  - match:\n    - headers:\n        x-fail: {exact: \"yes\"}\n    fault:\n      abort:\n        httpStatus: 503\n        percentage: {value: 100}\n    route:\n    - destination: {host: reviews}\n  - route:\n    - destination: {host: reviews}\n";

/// `reviews` and `ratings` behind the waypoint in `shop`, and `db` in the ambient namespace
/// `data`, which has no waypoint.
fn config(m: &WaypointMesh, db: &strait_testbed::Pod) -> String {
    let (reviews, ratings) = (&m.backends[0], &m.backends[1]);
    [
        m.base_config(),
        k8s::pod_yaml(reviews, APP_NS, "reviews", &[("app", "reviews"), ("version", "v1")]),
        k8s::pod_yaml(ratings, APP_NS, "ratings", &[("app", "ratings"), ("version", "v1")]),
        k8s::named_service_yaml("reviews", APP_NS, REVIEWS_VIP, &[("http", 9080, 9080)], &[("app", "reviews")], &[]),
        k8s::named_service_yaml("ratings", APP_NS, RATINGS_VIP, &[("http", 9080, 9080)], &[("app", "ratings")], &[]),
        k8s::namespace_yaml("data", &[("istio.io/dataplane-mode", "ambient")]),
        k8s::pod_yaml(db, "data", "db", &[("app", "db")]),
    ]
    .concat()
}

/// Requests through the waypoint: `ok` to reviews, `aborted` to reviews with `x-fail`, `slow`
/// to ratings; every answer must be the expected one.
fn send(m: &WaypointMesh, ok: u64, aborted: u64, slow: u64) -> io::Result<()> {
    let reviews = format!("http://{REVIEWS_VIP}:9080/reviews");
    let served = m.client.echo_get(&reviews, ok, &[])?;
    assert_eq!(served.status(200), ok, "{served:?}");
    let failed = m.client.echo_get(&reviews, aborted, &[("x-fail", "yes")])?;
    assert_eq!(failed.status(503), aborted, "{failed:?}");
    let ratings = format!("http://{RATINGS_VIP}:9080/delay/{RATINGS_DELAY_MS}");
    let slow_ones = m.client.echo_get(&ratings, slow, &[])?;
    assert_eq!(slow_ones.status(200), slow, "{slow_ones:?}");
    Ok(())
}

/// One series of a query's result: its labels and value.
type Series = (BTreeMap<String, String>, f64);

fn label<'a>(labels: &'a BTreeMap<String, String>, name: &str) -> &'a str {
    labels.get(name).map_or("", String::as_str)
}

/// The sorted values of `name` across the result.
fn labels_of(result: &[Series], name: &str) -> Vec<String> {
    let mut values: Vec<String> = result.iter().map(|(l, _)| label(l, name).to_owned()).collect();
    values.sort();
    values.dedup();
    values
}

/// The value of the one series whose labels include `wanted`.
fn value(result: &[Series], wanted: &[(&str, &str)]) -> io::Result<f64> {
    let mut found = result.iter().filter(|(l, _)| wanted.iter().all(|(k, v)| label(l, k) == *v));
    match (found.next(), found.next()) {
        (Some((_, v)), None) => Ok(*v),
        _ => Err(io::Error::other(format!("not exactly one series with {wanted:?} in {result:?}"))),
    }
}

/// Debian's Prometheus server in node 1's namespace, with its own configuration and storage in
/// the topology's directory; stopped with the test.
struct Prometheus {
    node: Node,
    process: Process,
}

impl Prometheus {
    /// Scrapes `targets` (job name, `host:port` list) every second; returns once every target
    /// has been scraped successfully.
    fn start(m: &WaypointMesh, targets: &[(&str, Vec<String>)]) -> io::Result<Prometheus> {
        let binary = "/usr/bin/prometheus";
        if !std::path::Path::new(binary).exists() {
            return Err(io::Error::other(format!(
                "{binary} is missing: run `cargo xtask setup` (Debian's prometheus)"
            )));
        }
        let dir = m.topo.dir().join("prometheus");
        std::fs::create_dir_all(dir.join("data"))?;
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, hosts) in targets {
            let hosts: Vec<String> = hosts.iter().map(|h| format!("'{h}'")).collect();
            config.push_str(&format!("- job_name: {job}\n  static_configs:\n  - targets: [{}]\n", hosts.join(", ")));
        }
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config)?;
        let args = [
            format!("--config.file={}", config_file.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={}", PROMETHEUS.trim_start_matches("http://")),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = m.n1.spawn("prometheus", binary, &args, &[])?;
        let prom = Prometheus { node: m.n1.clone(), process };
        let count: usize = targets.iter().map(|(_, hosts)| hosts.len()).sum();
        prom.wait_until("up == 1", |r| r.len() == count)
            .map_err(|e| io::Error::other(format!("{e}\nprometheus log:\n{}", prom.process.log_tail())))?;
        Ok(prom)
    }

    /// An instant query over the HTTP API: the series of a vector, or the one value of a scalar.
    fn query(&self, expr: &str) -> io::Result<Vec<Series>> {
        let url = format!("{PROMETHEUS}/api/v1/query");
        let query = format!("query={expr}");
        let out = self.node.run_ok("curl", &["-sS", "--max-time", "5", "--get", "--data-urlencode", &query, &url])?;
        let reply: Value =
            serde_json::from_str(&out).map_err(|e| io::Error::other(format!("not JSON ({e}) for {expr}: {out}")))?;
        if reply["status"] != "success" {
            return Err(io::Error::other(format!("Prometheus refused `{expr}`: {}", reply["error"])));
        }
        let number = |v: &Value| v[1].as_str().and_then(|s| s.parse::<f64>().ok()).unwrap_or(f64::NAN);
        let data = &reply["data"];
        Ok(match data["resultType"].as_str() {
            Some("scalar") => vec![(BTreeMap::new(), number(&data["result"]))],
            _ => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|series| {
                    let labels = series["metric"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect();
                    (labels, number(&series["value"]))
                })
                .collect(),
        })
    }

    /// Queries `expr` until `done` holds of its result.
    fn wait_until(&self, expr: &str, done: impl Fn(&[Series]) -> bool) -> io::Result<Vec<Series>> {
        let deadline = Instant::now() + SCRAPE_WAIT;
        loop {
            // Until its first scrape the server may answer errors (or not at all): keep asking.
            let result = self.query(expr);
            if let Ok(series) = &result
                && done(series)
            {
                return result;
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!("`{expr}` never gave the expected answer; last: {result:?}")));
            }
            thread::sleep(Duration::from_millis(250));
        }
    }
}
