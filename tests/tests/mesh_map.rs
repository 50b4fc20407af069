//! End to end: the live mesh map (SPEC OBS-6). Node proxies and a waypoint follow `strait
//! control`; traffic crosses them, and an L7 policy refuses one client. Each proxy's
//! `/map.json` shows what it reported; the control plane merges them on its monitoring port,
//! and its `/map` page, loaded in headless Chromium (Debian's `chromium`), draws the expected
//! workloads and edges, the refused one marked as denied. The screenshot is kept in
//! `target/test-output/mesh_map/`. Needs root.

mod common;

use std::{
    io,
    path::PathBuf,
    time::{Duration, Instant},
};

use common::{APP_NS, Control, WAYPOINT_POD_LABEL};
use serde_json::Value;
use strait_testbed::{EchoKind, Node, Topology, k8s};

const REVIEWS: &str = "http://10.96.0.30:9080";
const CLIENT_EDGE: &str = "shop/client->shop/reviews-v1";
const DENIED_EDGE: &str = "shop/intruder->shop/reviews.shop.svc.cluster.local";
const WAYPOINT_EDGE: &str = "shop/waypoint->shop/reviews-v1";

/// The namespace behind the waypoint with `pods` (their YAML), the `reviews` service, and a
/// policy refusing the intruder.
fn config(pods: &[String]) -> String {
    let mut yaml =
        k8s::namespace_yaml(APP_NS, &[("istio.io/dataplane-mode", "ambient"), ("istio.io/use-waypoint", "waypoint")]);
    yaml.push_str(&pods.concat());
    yaml.push_str(&k8s::named_service_yaml(
        "reviews",
        APP_NS,
        "10.96.0.30",
        &[("http", 9080, 9080)],
        &[("app", "reviews")],
        &[],
    ));
    // AUTHZ-4: the intruder's requests are refused at the waypoint (403).
    yaml.push_str(&format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-intruder\n  \
         namespace: {APP_NS}\nspec:\n  targetRefs:\n  - kind: Service\n    group: \"\"\n    name: reviews\n  \
         action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/intruder]\n"
    ));
    yaml
}

/// GETs `url` with curl in `node`'s namespace and parses the JSON answer.
fn get_json(node: &Node, url: &str) -> io::Result<Value> {
    let text = node.run_ok("curl", &["-sS", "--max-time", "5", url])?;
    serde_json::from_str(&text).map_err(|e| io::Error::other(format!("{url}: not JSON ({e}): {text}")))
}

fn edge<'a>(map: &'a Value, id: &str) -> Option<&'a Value> {
    map["edges"].as_array()?.iter().find(|e| e["id"] == id)
}

/// Polls `url` until `ready` holds for the map it serves.
fn wait_map(node: &Node, url: &str, ready: impl Fn(&Value) -> bool) -> io::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let map = get_json(node, url)?;
        if ready(&map) {
            return Ok(map);
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!("{url} never showed the expected edges: {map:#}")));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Where the test keeps what it leaves for people to look at.
fn output_dir() -> io::Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-output/mesh_map");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

// OBS-6: the map of every proxy, merged by the control plane, drawn by the page in a real
// browser: workloads as nodes, traffic as edges with rate, success, p99 and mTLS, the policy's
// refusals in red.
#[test]
fn control_plane_map_shows_workloads_edges_and_denials_in_chromium() -> io::Result<()> {
    let topo = Topology::new("map::control")?;
    let (n1, n2, n3) = (topo.add_node("node1")?, topo.add_node("node2")?, topo.add_node("control")?);
    let client = topo.add_pod(&n1, "client")?;
    let intruder = topo.add_pod(&n1, "intruder")?;
    let waypoint_pod = topo.add_pod(&n1, "waypoint")?;
    let reviews = topo.add_pod(&n2, "reviews-v1")?;
    let yaml = config(&[
        k8s::pod_yaml(&client, APP_NS, "client", &[("app", "client")]),
        k8s::pod_yaml(&intruder, APP_NS, "intruder", &[("app", "intruder")]),
        k8s::pod_yaml(&waypoint_pod, APP_NS, "waypoint", &[(WAYPOINT_POD_LABEL, "waypoint")]),
        k8s::pod_yaml(&reviews, APP_NS, "reviews", &[("app", "reviews"), ("version", "v1")]),
    ]);
    topo.write_config("c.yaml", &yaml)?;
    let _server = reviews.echo_server(EchoKind::Http, 9080).name("reviews-v1").start()?;
    let control = Control::new(&topo, n3);
    let _control = control.start(&topo, &[])?;
    let _p1 = control.start_node(&topo, &n1)?;
    let _p2 = control.start_node(&topo, &n2)?;
    let _wp = control.start_waypoint(&waypoint_pod, "waypoint", APP_NS)?;

    let ok = client.echo_get(&format!("{REVIEWS}/reviews/1?user=secret"), 20, &[])?;
    assert_eq!(ok.status(200), 20, "{ok:?}");
    let refused = intruder.echo_get(&format!("{REVIEWS}/reviews/1"), 5, &[])?;
    assert_eq!(refused.status(403), 5, "{refused:?}");

    // Each proxy's own view, on its admin port: node 2 saw the waypoint's connections arrive.
    let own = wait_map(&n2, "http://127.0.0.1:15000/map.json", |m| edge(m, WAYPOINT_EDGE).is_some())?;
    let waypoint_leg = edge(&own, WAYPOINT_EDGE).expect("edge");
    assert_eq!(waypoint_leg["reporter"], "destination", "{waypoint_leg:#}");
    assert_eq!(waypoint_leg["protocol"], "tcp", "{waypoint_leg:#}");
    assert_eq!(waypoint_leg["security"], "mutual_tls", "{waypoint_leg:#}");
    assert_eq!(own["proxies"], serde_json::json!(["node node2"]), "{own:#}");

    // The control plane's map, merged from all three proxies.
    let url = "http://127.0.0.1:15014/map.json";
    let map = wait_map(&control.node, url, |m| {
        edge(m, CLIENT_EDGE).is_some_and(|e| e["recent"].as_array().is_some_and(|r| r.len() >= 16))
            && edge(m, DENIED_EDGE).is_some_and(|e| e["denied"].as_u64() >= Some(5))
            && edge(m, WAYPOINT_EDGE).is_some()
    })?;
    let proxies = map["proxies"].as_array().expect("proxies");
    for proxy in ["node node1", "node node2", "waypoint shop/waypoint"] {
        assert!(proxies.iter().any(|p| p == proxy), "{proxy} in {proxies:?}");
    }
    let http = edge(&map, CLIENT_EDGE).expect("client edge");
    assert_eq!((http["protocol"].as_str(), http["reporter"].as_str()), (Some("http"), Some("waypoint")), "{http:#}");
    assert_eq!(http["success"].as_f64(), Some(1.0), "{http:#}");
    assert!(http["rate"].as_f64() > Some(0.0), "{http:#}");
    assert!(http["p99_ms"].as_f64().is_some_and(|p| p > 0.0), "{http:#}");
    assert_eq!(http["security"], "mutual_tls", "{http:#}");
    assert_eq!(http["denied"], 0, "{http:#}");
    let line = &http["recent"][0];
    assert_eq!((line["status"].as_u64(), line["method"].as_str()), (Some(200), Some("GET")), "{line:#}");
    assert_eq!(line["path"], "/reviews/1", "the query stays out of the map: {line:#}");
    let denied = edge(&map, DENIED_EDGE).expect("denied edge");
    assert_eq!(denied["success"].as_f64(), Some(0.0), "{denied:#}");
    assert_eq!(denied["recent"][0]["status"], 403, "{denied:#}");
    assert!(denied["recent"][0]["reason"].as_str().is_some_and(|r| r.contains("deny-intruder")), "{denied:#}");
    // The tunnel from the client's node to the waypoint: both node proxies reported it, the
    // destination's figures win.
    let tunnel = edge(&map, "shop/client->shop/waypoint").expect("tunnel edge");
    assert_eq!(tunnel["reports"].as_array().map(Vec::len), Some(1), "only node 1 sees it: {tunnel:#}");

    // The page, in a real browser, in the control plane's namespace.
    let out = output_dir()?;
    let profile = topo.dir().join("chromium-profile");
    let profile_arg = format!("--user-data-dir={}", profile.display());
    // Linked to the denied edge, so its recent requests are listed beside the map as a click
    // would list them.
    let page = "http://127.0.0.1:15014/map#edge=shop%2Fintruder-%3Eshop%2Freviews.shop.svc.cluster.local";
    let chromium = |extra: &[&str]| -> io::Result<std::process::Output> {
        let mut args = vec![
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            profile_arg.as_str(),
            // Long enough for the first poll's answer and a redraw; the page's timers run on.
            "--virtual-time-budget=5000",
        ];
        args.extend_from_slice(extra);
        args.push(page);
        control.node.run("chromium", &args)
    };
    let dom = chromium(&["--dump-dom"])?;
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    for node in ["shop/client", "shop/intruder", "shop/waypoint", "shop/reviews-v1"] {
        assert!(dom.contains(&format!("data-node=\"{node}\"")), "node {node} in the page:\n{dom}");
    }
    let edge_tag = |id: &str| {
        // Serializers differ on whether `>` is escaped in attribute values.
        let needles = [format!("data-edge=\"{id}\""), format!("data-edge=\"{}\"", id.replace('>', "&gt;"))];
        let start = needles
            .iter()
            .find_map(|n| dom.find(n.as_str()))
            .unwrap_or_else(|| panic!("edge {id} in the page:\n{dom}"));
        let end = dom[start..].find('>').map_or(dom.len(), |e| start + e);
        dom[start..end].to_owned()
    };
    let ok_tag = edge_tag(CLIENT_EDGE);
    assert!(ok_tag.contains("data-denied=\"false\"") && ok_tag.contains("data-protocol=\"http\""), "{ok_tag}");
    assert!(ok_tag.contains("data-security=\"mutual_tls\""), "{ok_tag}");
    assert!(edge_tag(DENIED_EDGE).contains("data-denied=\"true\""), "{}", edge_tag(DENIED_EDGE));
    assert!(edge_tag(WAYPOINT_EDGE).contains("data-protocol=\"tcp\""), "{}", edge_tag(WAYPOINT_EDGE));
    assert!(dom.contains("DENIED 5"), "the denial is written on the edge:\n{dom}");
    assert!(dom.contains("100%") && dom.contains("mTLS"), "success and mTLS on the labels:\n{dom}");
    assert!(dom.contains("from 3 proxies"), "the status line counts the proxies:\n{dom}");
    let panel = dom.split("id=\"recent\"").nth(1).unwrap_or_else(|| panic!("the recent lines:\n{dom}"));
    assert!(panel.contains("403 GET /reviews/1") && panel.contains("deny-intruder"), "{panel}");

    let screenshot = out.join("mesh-map.png");
    let _ = std::fs::remove_file(&screenshot);
    let shot_arg = format!("--screenshot={}", screenshot.display());
    let shot = chromium(&[&shot_arg, "--window-size=1400,900", "--hide-scrollbars"])?;
    let png = std::fs::read(&screenshot).map_err(|e| {
        io::Error::other(format!(
            "no screenshot at {} ({e}); chromium said: {}",
            screenshot.display(),
            String::from_utf8_lossy(&shot.stderr)
        ))
    })?;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(png.len() > 20_000, "a drawn page, not a blank one: {} bytes", png.len());
    println!("mesh map screenshot: {}", screenshot.display());
    Ok(())
}
