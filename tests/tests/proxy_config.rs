//! End to end: `strait ctl proxy-config` (SPEC CFG-4, OBS-3) against real proxies. Two node
//! proxies and a waypoint run on network namespaces; the command runs in a node's or the
//! waypoint pod's namespace, as an operator would `kubectl exec` into them, reads the admin API
//! on 127.0.0.1:15000, and its tables and JSON are checked against what the configuration
//! declares: workloads with node, waypoint and protocol, services, policies and where they
//! apply, listeners, certificates with identity, chain and expiry, routes, and the waypoint's endpoints
//! with health and outlier status after one endpoint failed. Needs root.

mod common;

use std::{
    collections::BTreeMap,
    io,
    process::Output,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{APP_NS, WaypointMesh, reviews_config};
use serde_json::Value;
use strait_testbed::{EchoKind, bin_path};

const REVIEWS: &str = "http://10.96.0.30:9080";

/// Outlier detection on reviews (one failure ejects, for a minute), a route for jason and a
/// default one, an L4 policy on the reviews pods, an L7 one bound to the service, STRICT mTLS.
fn config(m: &WaypointMesh) -> String {
    let policy = "  trafficPolicy:\n    outlierDetection:\n      consecutive5xxErrors: 1\n      interval: 1s\n      baseEjectionTime: 60s\n      maxEjectionPercent: 100\n";
    let mut yaml = reviews_config(m).replace("spec:\n  host: reviews\n", &format!("spec:\n  host: reviews\n{policy}"));
    yaml.push_str(&format!(
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\n  namespace: {APP_NS}\n\
         spec:\n  hosts: [reviews]\n  http:\n  - match:\n    - headers:\n        end-user: {{exact: jason}}\n    route:\n    \
         - destination: {{host: reviews, subset: v1}}\n    timeout: 2s\n  - route:\n    - destination: {{host: reviews}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: reviews-from-waypoint\n  namespace: {APP_NS}\n\
         spec:\n  selector:\n    matchLabels: {{app: reviews}}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        \
         principals: [cluster.local/ns/{APP_NS}/sa/waypoint]\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: get-only\n  namespace: {APP_NS}\n\
         spec:\n  targetRefs:\n  - {{kind: Service, group: \"\", name: reviews}}\n  action: ALLOW\n  rules:\n  - to:\n    \
         - operation:\n        methods: [GET]\n\
         ---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: {APP_NS}\n\
         spec:\n  mtls: {{mode: STRICT}}\n"
    ));
    yaml
}

// CFG-4: every view, as a table and as JSON, against a node proxy and a waypoint.
#[test]
fn proxy_config_shows_what_a_node_and_a_waypoint_hold() -> io::Result<()> {
    let m = WaypointMesh::new("ctl::proxy_config", &["reviews-v1", "reviews-v2"])?;
    m.topo.write_config("c.yaml", &config(&m))?;
    // v2 does not run: its connections are refused, and outlier detection ejects it.
    let _v1 = m.backends[0].echo_server(EchoKind::Http, 9080).name("reviews-v1").start()?;
    let started = unix_now();
    let (_p1, _p2, _wp) = m.start()?;
    let summary = m.client.echo_get(&format!("{REVIEWS}/reviews/0"), 10, &[])?;
    assert!(summary.status(200) >= 8, "v1 serves once v2 is ejected: {summary:?}");

    let node1 = |args: &[&str]| ctl(&m.n1, args);
    let v1_ip = m.backends[0].ip().to_string();
    let v2_ip = m.backends[1].ip().to_string();

    // Workloads: what the configuration declares, with node, waypoint and protocol.
    let rows = table(&node1(&["workloads"])?, &["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"]);
    let row = |name: &str| rows.iter().find(|r| r["POD NAME"] == name).cloned().unwrap_or_default();
    assert_eq!(rows.len(), 4, "{rows:#?}");
    let client = row("client");
    assert_eq!((client["ADDRESS"].as_str(), client["NODE"].as_str()), (&*m.client.ip().to_string(), "node1"));
    assert_eq!((client["WAYPOINT"].as_str(), client["PROTOCOL"].as_str()), ("waypoint", "HBONE"));
    let waypoint = row("waypoint");
    assert_eq!((waypoint["WAYPOINT"].as_str(), waypoint["PROTOCOL"].as_str()), ("None", "TCP"), "{waypoint:?}");
    assert_eq!((row("reviews-v2")["ADDRESS"].as_str(), row("reviews-v2")["NODE"].as_str()), (&*v2_ip, "node2"));
    let on_node2 = table(&node1(&["workloads", "--node", "node2"])?, &["NAMESPACE", "POD NAME"]);
    let names: Vec<&str> = on_node2.iter().map(|r| r["POD NAME"].as_str()).collect();
    assert_eq!(names, ["reviews-v1", "reviews-v2"]);
    let listed = json(&node1(&["workloads", "-o", "json", "-n", APP_NS])?)?;
    let client = items(&listed).iter().find(|w| w["name"] == "client").cloned().unwrap_or_default();
    assert_eq!(client["identity"], format!("spiffe://cluster.local/ns/{APP_NS}/sa/client"), "{listed}");
    assert_eq!(client["waypoint"], format!("{APP_NS}/waypoint"));
    assert_eq!(table(&node1(&["workloads", "-n", "elsewhere"])?, &["NAMESPACE"]).len(), 0);

    // Services.
    let services =
        table(&node1(&["services"])?, &["NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS", "PORTS"]);
    assert_eq!(services.len(), 1, "{services:#?}");
    let reviews = &services[0];
    assert_eq!((reviews["SERVICE NAME"].as_str(), reviews["SERVICE VIP"].as_str()), ("reviews", "10.96.0.30"));
    assert_eq!((reviews["WAYPOINT"].as_str(), reviews["ENDPOINTS"].as_str()), ("waypoint", "2"));
    assert_eq!(reviews["PORTS"], "9080/HTTP");

    // Policies, and where each applies: the L4 policy on node 2's pods, the L7 one at the
    // waypoint, STRICT on every pod of the namespace.
    let columns = ["NAMESPACE", "POLICY NAME", "KIND", "ACTION", "SCOPE", "APPLIES TO"];
    let at = |rows: &[BTreeMap<String, String>], name: &str| {
        rows.iter().find(|r| r["POLICY NAME"] == name).cloned().unwrap_or_default()
    };
    let node1_policies = table(&node1(&["policies"])?, &columns);
    let node2_policies = table(&ctl(&m.n2, &["policies"])?, &columns);
    let waypoint_policies = table(&ctl(&m.waypoint_pod, &["policies"])?, &columns);
    let l4 = at(&node2_policies, "reviews-from-waypoint");
    assert_eq!((l4["KIND"].as_str(), l4["ACTION"].as_str()), ("AuthorizationPolicy", "Allow"));
    assert_eq!(
        (l4["SCOPE"].as_str(), l4["APPLIES TO"].as_str()),
        ("WorkloadSelector", "shop/reviews-v1,shop/reviews-v2")
    );
    assert_eq!(at(&node1_policies, "reviews-from-waypoint")["APPLIES TO"], "None", "no reviews pod on node 1");
    assert_eq!(at(&node1_policies, "get-only")["APPLIES TO"], "None", "node proxies do not enforce L7 policies");
    let l7 = at(&waypoint_policies, "get-only");
    assert_eq!((l7["SCOPE"].as_str(), l7["APPLIES TO"].as_str()), ("TargetRefs", "reviews.shop.svc.cluster.local"));
    let strict = at(&node1_policies, "strict");
    assert_eq!((strict["KIND"].as_str(), strict["ACTION"].as_str()), ("PeerAuthentication", "STRICT"));
    assert_eq!(strict["APPLIES TO"], "shop/client", "the waypoint's pod is not captured");

    // Listeners: the node proxy's three data-path ports, the waypoint's HBONE port only.
    let ports = |rows: Vec<BTreeMap<String, String>>| -> Vec<String> {
        rows.iter().map(|r| format!("{}:{} {}", r["ADDRESSES"], r["PORT"], r["NAME"])).collect()
    };
    let columns = ["ADDRESSES", "PORT", "NAME", "PURPOSE"];
    assert_eq!(
        ports(table(&node1(&["listeners"])?, &columns)),
        [
            "0.0.0.0:15001 outbound",
            "0.0.0.0:15006 inbound_plaintext",
            "0.0.0.0:15008 hbone",
            "127.0.0.1:15000 admin",
            "0.0.0.0:15020 metrics",
            "0.0.0.0:15021 readiness"
        ]
    );
    let waypoint_listeners = ports(table(&ctl(&m.waypoint_pod, &["listeners"])?, &columns));
    assert_eq!(waypoint_listeners[..2], ["0.0.0.0:15008 hbone", "127.0.0.1:15000 admin"]);

    // Certificates: the node's pods' and the waypoint's identities, issued just now for 24 h,
    // chained to the CA directory's root.
    let cert_columns = ["CERTIFICATE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE"];
    let root_serial = root_serial(&m)?;
    for (output, identity) in [
        (node1(&["certs"])?, "client"),
        (ctl(&m.n2, &["certs"])?, "reviews"),
        (ctl(&m.waypoint_pod, &["certs"])?, "waypoint"),
    ] {
        let identity = format!("spiffe://cluster.local/ns/{APP_NS}/sa/{identity}");
        let rows = table(&output, &cert_columns);
        let leaf = rows.iter().find(|r| r["CERTIFICATE NAME"] == identity && r["TYPE"] == "Leaf");
        let leaf = leaf.unwrap_or_else(|| panic!("no leaf for {identity}:\n{output}"));
        assert_eq!((leaf["STATUS"].as_str(), leaf["VALID CERT"].as_str()), ("Available", "true"), "{leaf:?}");
        let expires = unix_secs(&leaf["NOT AFTER"]).unwrap_or_else(|| panic!("not a time: {leaf:?}"));
        let day = 24 * 3600;
        assert!(expires >= started + day - 60 && expires <= unix_now() + day + 5, "24 h from issue: {leaf:?}");
        assert!(unix_secs(&leaf["NOT BEFORE"]).is_some_and(|t| t <= unix_now()), "{leaf:?}");
        let root = rows.iter().find(|r| r["CERTIFICATE NAME"] == identity && r["TYPE"] == "Root");
        let root = root.unwrap_or_else(|| panic!("no root for {identity}:\n{output}"));
        assert_eq!((root["SERIAL NUMBER"].as_str(), root["VALID CERT"].as_str()), (&*root_serial, "true"));
    }
    let certs = json(&ctl(&m.waypoint_pod, &["certs", "-o", "json"])?)?;
    let waypoint_cert = &items(&certs)[0];
    assert_eq!(waypoint_cert["chain"][0]["serial"], waypoint_cert["serial"], "{certs}");

    // Routes at the waypoint: the VirtualService's two routes, in order.
    let routes = table(
        &ctl(&m.waypoint_pod, &["routes"])?,
        &["NAME", "SERVICE", "MATCH", "DESTINATION", "VIRTUAL SERVICE", "OPTIONS"],
    );
    let summary: Vec<[&str; 4]> = routes
        .iter()
        .map(|r| [r["NAME"].as_str(), r["MATCH"].as_str(), r["DESTINATION"].as_str(), r["OPTIONS"].as_str()])
        .collect();
    assert_eq!(
        summary,
        [["9080", "header end-user=jason", "reviews.shop|v1", "timeout 2s"], ["9080", "/*", "reviews.shop", "-"]]
    );
    assert!(routes.iter().all(|r| r["VIRTUAL SERVICE"] == "reviews.shop" && r["SERVICE"] == "reviews.shop"));

    // Clusters and endpoints at the waypoint: v2 ejected from the service's cluster, the
    // subsets' own clusters untouched.
    let clusters = table(
        &ctl(&m.waypoint_pod, &["clusters"])?,
        &["SERVICE FQDN", "PORT", "SUBSET", "DESTINATION RULE", "LOAD BALANCER", "HEALTHY"],
    );
    let health: Vec<[&str; 3]> = clusters
        .iter()
        .map(|c| [c["SUBSET"].as_str(), c["DESTINATION RULE"].as_str(), c["HEALTHY"].as_str()])
        .collect();
    assert_eq!(health, [["-", "reviews.shop", "1/2"], ["v1", "reviews.shop", "1/1"], ["v2", "reviews.shop", "1/1"]]);
    let endpoints = table(
        &ctl(&m.waypoint_pod, &["endpoints", "-n", APP_NS])?,
        &["ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER", "WORKLOAD"],
    );
    let all = "outbound|9080||reviews.shop.svc.cluster.local";
    let ejected = endpoints.iter().find(|e| e["CLUSTER"] == all && e["ENDPOINT"] == format!("{v2_ip}:9080"));
    let ejected = ejected.unwrap_or_else(|| panic!("{endpoints:#?}"));
    assert_eq!((ejected["STATUS"].as_str(), ejected["WORKLOAD"].as_str()), ("EJECTED", "shop/reviews-v2"));
    assert!(ejected["OUTLIER CHECK"].starts_with("FAILED (ejected 1×, back in 5"), "{ejected:?}");
    let healthy = endpoints.iter().find(|e| e["CLUSTER"] == all && e["ENDPOINT"] == format!("{v1_ip}:9080"));
    assert_eq!(healthy.map(|e| (e["STATUS"].as_str(), e["OUTLIER CHECK"].as_str())), Some(("HEALTHY", "OK")));
    let dump = json(&ctl(&m.waypoint_pod, &["clusters", "-o", "json"])?)?;
    let cluster = items(&dump).iter().find(|c| c["name"] == all).cloned().unwrap_or_default();
    assert_eq!(
        (cluster["outlier_detection"].as_bool(), cluster["load_balancer"].as_str()),
        (Some(true), Some("ROUND_ROBIN"))
    );
    let v2 =
        items(&cluster["endpoints"]).iter().find(|e| e["workload"] == "shop/reviews-v2").cloned().unwrap_or_default();
    assert_eq!(v2["outlier"]["ejections"], 1, "{cluster}");
    assert!(v2["outlier"]["ejected_for_ms"].as_u64().is_some_and(|ms| ms > 50_000 && ms <= 60_000), "{v2}");
    Ok(())
}

// CFG-4: what goes wrong says what to check.
#[test]
fn proxy_config_errors_say_what_to_check() -> io::Result<()> {
    let m = WaypointMesh::new("ctl::errors", &[])?;
    m.topo.write_config("c.yaml", &m.base_config())?;
    let _p1 = common::start_node(&m.topo, &m.n1, &m.ca, &[])?;

    // Nothing listening: another port, or the proxy's namespace is not this one.
    let failure = fails(ctl_output(&m.n1, &["workloads", "--addr", "127.0.0.1:15999"])?);
    assert!(failure.contains("nothing answers on 127.0.0.1:15999 (Connection refused"), "{failure}");
    assert!(failure.contains("network namespace"), "{failure}");
    let failure = fails(ctl_output(&m.client, &["services"])?);
    assert!(failure.contains("nothing answers on 127.0.0.1:15000"), "{failure}");

    // Something else answering HTTP.
    let _echo = m.waypoint_pod.start_echo_server(EchoKind::Http, 8080)?;
    let failure = fails(ctl_output(&m.waypoint_pod, &["workloads", "--addr", "127.0.0.1:8080"])?);
    assert!(failure.contains("127.0.0.1:8080 is not the admin API of a strait proxy"), "{failure}");

    // A waypoint's view asked of a node proxy.
    let failure = fails(ctl_output(&m.n1, &["routes"])?);
    assert!(failure.contains("routes are a waypoint's"), "{failure}");
    assert!(failure.contains("strait node `node1` answers on 127.0.0.1:15000"), "{failure}");
    Ok(())
}

/// `strait ctl proxy-config ARGS` in `netns` (a node or a pod), which must succeed: its stdout.
fn ctl(netns: &impl Runs, args: &[&str]) -> io::Result<String> {
    let out = ctl_output(netns, args)?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "strait ctl proxy-config {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ctl_output(netns: &impl Runs, args: &[&str]) -> io::Result<Output> {
    let mut all = vec!["ctl", "proxy-config"];
    all.extend_from_slice(args);
    netns.run_in(&bin_path("strait").to_string_lossy(), &all)
}

/// The error a failed command printed; panics if it succeeded.
fn fails(out: Output) -> String {
    assert!(!out.status.success(), "expected a failure: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Nodes and pods both run commands in their namespace.
trait Runs {
    fn run_in(&self, program: &str, args: &[&str]) -> io::Result<Output>;
}

impl Runs for strait_testbed::Node {
    fn run_in(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        self.run(program, args)
    }
}

impl Runs for strait_testbed::Pod {
    fn run_in(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        self.run(program, args)
    }
}

/// Reads a table whose header has `columns` (in order, as the first ones): one map per row.
/// Cells are cut at the header's column positions, so they may contain spaces.
fn table(text: &str, columns: &[&str]) -> Vec<BTreeMap<String, String>> {
    let mut lines = text.lines();
    let header: Vec<char> = lines.next().unwrap_or_default().chars().collect();
    let header_text: String = header.iter().collect();
    let mut starts = Vec::new();
    let mut from = 0;
    for column in columns {
        let at = header_text[from..].find(column).map(|i| from + i);
        let at = at.unwrap_or_else(|| panic!("no column {column} in {header_text:?}"));
        starts.push(header_text[..at].chars().count());
        from = at + column.len();
    }
    // The last column asked for ends where the header's next one starts, if any.
    let rest = &header_text[from..];
    let end = rest.find(|c: char| c != ' ').map_or(usize::MAX, |i| header_text[..from + i].chars().count());
    starts.push(end);
    lines
        .map(|line| {
            let chars: Vec<char> = line.chars().collect();
            columns
                .iter()
                .enumerate()
                .map(|(i, column)| {
                    let end = starts[i + 1].min(chars.len());
                    let cell: String = chars.get(starts[i].min(chars.len())..end).unwrap_or_default().iter().collect();
                    ((*column).to_owned(), cell.trim().to_owned())
                })
                .collect()
        })
        .collect()
}

fn json(text: &str) -> io::Result<Value> {
    serde_json::from_str(text).map_err(|e| io::Error::other(format!("not JSON ({e}): {text}")))
}

fn items(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

/// The serial of the CA directory's root certificate, as the proxies print serials.
fn root_serial(m: &WaypointMesh) -> io::Result<String> {
    let root = m.ca.join("root-cert.pem");
    let out = m.n1.run_ok("openssl", &["x509", "-noout", "-serial", "-in", &root.to_string_lossy()])?;
    let serial = out.trim().strip_prefix("serial=").unwrap_or(out.trim());
    Ok(serial.to_ascii_lowercase())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
fn unix_secs(text: &str) -> Option<u64> {
    let (date, time) = text.strip_suffix('Z')?.split_once('T')?;
    let mut date = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, mo, d) = (date.next()??, date.next()??, date.next()??);
    let mut time = time.split(':');
    let (h, mi) = (time.next()?.parse::<i64>().ok()?, time.next()?.parse::<i64>().ok()?);
    let s = time.next()?.split('.').next()?.parse::<i64>().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + s).ok()
}

#[test]
fn dates_are_read_as_the_proxy_writes_them() {
    assert_eq!(unix_secs("1970-01-01T00:00:00.000Z"), Some(0));
    assert_eq!(unix_secs("2026-03-01T12:30:05.250Z"), Some(1_772_368_205));
}
