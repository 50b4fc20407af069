//! End to end: the endpoints of Services (SPEC L4-3, CFG-3). A Service with a selector takes
//! the Pods it selects; one without a selector takes the endpoints of its EndpointSlices, which
//! `strait control --kubernetes` watches only where the API server serves
//! `discovery.k8s.io/v1`. The test API server is Kubernetes 1.20 (slices only at `v1beta1`):
//! there the control plane says it does not watch them, never asks for them, and the selector
//! path carries traffic while a selectorless Service with a v1beta1 slice has no endpoints. The
//! slice path itself runs here from a configuration directory with `discovery.k8s.io/v1`
//! slices, the same type the Kubernetes source converts into: a pod by `targetRef`, an address
//! no pod has (reached in plain TCP), and an endpoint not ready, which gets nothing. Needs root.

mod common;

use std::{
    collections::BTreeMap,
    io,
    time::{Duration, Instant},
};

use common::{Control, MESH, TIMEOUT, TwoNodes, wait_access_line};
use serde_json::Value;
use strait_testbed::{EchoKind, FABRIC_GATEWAY, Pod, Topology, bin_path, k8s, kube::KubeApi};

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The `hostname` service in a proxy's `/services`, once `ready` holds for it.
fn wait_service(node: &strait_testbed::Node, hostname: &str, ready: impl Fn(&Value) -> bool) -> io::Result<Value> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = node.run_ok("curl", &["-sS", "--max-time", "5", "http://127.0.0.1:15000/services"])?;
        let services = json(&text);
        let found = services.as_array().and_then(|a| a.iter().find(|s| s["hostname"] == hostname)).cloned();
        if let Some(service) = found.filter(|s| ready(s)) {
            return Ok(service);
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!("{hostname} not as expected in /services: {text}")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn endpoint_addresses(service: &Value) -> Vec<String> {
    let mut out: Vec<String> = service["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["endpoints"].as_array().cloned().unwrap_or_default())
        .map(|e| e["address"].as_str().unwrap_or("?").to_owned())
        .collect();
    out.sort();
    out
}

/// Who answered each of `n` requests to `url` from `client`.
fn answers(client: &Pod, url: &str, n: usize) -> io::Result<BTreeMap<String, usize>> {
    let mut answers = BTreeMap::new();
    for _ in 0..n {
        let reply = client.curl(url, TIMEOUT)?;
        assert!(reply.ok(), "{url}: {reply:?}");
        let who = reply.body.split_whitespace().nth(2).unwrap_or("?").to_owned();
        *answers.entry(who).or_default() += 1;
    }
    Ok(answers)
}

// L4-3, CFG-1: a Service without a selector is served by its v1 slices' ready endpoints: a pod
// named by targetRef (over HBONE, it is in the mesh) and an address that is no pod's (plain
// TCP); the endpoint marked not ready is never picked. Each takes the slice's port, not the
// Service's.
#[test]
fn a_selectorless_service_is_served_by_its_slices_ready_endpoints() -> io::Result<()> {
    let t = TwoNodes::new("eps::directory")?;
    let outside = t.topo.add_pod(&t.n2, "outside")?;
    let unready = t.topo.add_pod(&t.n2, "unready")?;
    let slice = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: db-1\n  namespace: {MESH}\n  \
         labels: {{kubernetes.io/service-name: db}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
         endpoints:\n- addresses: [\"{server}\"]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: \
         server}}\n- addresses: [\"{outside}\"]\n- addresses: [\"{unready}\"]\n  conditions: {{ready: false}}\n",
        server = t.server.ip(),
        outside = outside.ip(),
        unready = unready.ip(),
    );
    let service = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: {MESH}}}\nspec:\n  clusterIP: \
         10.96.0.40\n  ports: [{{name: http, port: 80}}]\n"
    );
    let config = [t.config("server", &[]), service, slice].concat();
    t.topo.write_config("c.yaml", &config)?;
    let _servers = [
        t.server.start_echo_server(EchoKind::Http, 8080)?,
        outside.start_echo_server(EchoKind::Http, 8080)?,
        unready.start_echo_server(EchoKind::Http, 8080)?,
    ];
    let (p1, _p2) = t.start_proxies(&[])?;

    let got = answers(&t.client, "http://10.96.0.40/", 40)?;
    assert_eq!(got.keys().map(String::as_str).collect::<Vec<_>>(), ["outside", "server"], "{got:?}");
    assert!(got.values().all(|n| *n >= 10), "round robin over both: {got:?}");
    let to_pod = wait_access_line(&p1, &["outbound", &format!("dst.addr={}:8080", t.server.ip())], TIMEOUT)?;
    assert!(to_pod.contains("security=mutual_tls"), "{to_pod}");
    let to_address = wait_access_line(&p1, &["outbound", &format!("dst.addr={}:8080", outside.ip())], TIMEOUT)?;
    assert!(to_address.contains("security=none"), "plain TCP to an address outside the mesh: {to_address}");
    Ok(())
}

// CFG-3 on Kubernetes 1.20: no discovery.k8s.io/v1, so EndpointSlices are not watched (told at
// start, never requested); the selector's pods serve their Service, and a Service without a
// selector has no endpoints even with a v1beta1 slice; the control plane keeps working.
#[test]
fn without_discovery_v1_endpoints_come_from_selectors() -> io::Result<()> {
    let topo = Topology::new("eps::kube120")?;
    let (n1, n3) = (topo.add_node("node1")?, topo.add_node("control")?);
    let client = topo.add_pod(&n1, "client")?;
    let server = topo.add_pod(&n1, "server")?;
    let api = KubeApi::start_in_netns(topo.fabric().name(), FABRIC_GATEWAY)?;
    let versions = api.kubectl(&["api-versions"])?;
    assert!(versions.contains("discovery.k8s.io/v1beta1") && !versions.contains("discovery.k8s.io/v1\n"), "{versions}");
    let pod = |p: &Pod, labels: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {MESH}, labels: {{{labels}}}}}\nspec:\n  \
             nodeName: {}\n  containers: [{{name: app, image: example.invalid/app:1}}]\n",
            p.name(),
            p.node_name()
        )
    };
    let objects = [
        k8s::namespace_yaml(MESH, &[("istio.io/dataplane-mode", "ambient")]),
        pod(&client, "app: client"),
        pod(&server, "app: server"),
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {MESH}}}\nspec:\n  selector: \
             {{app: server}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n"
        ),
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: {MESH}}}\nspec:\n  ports: [{{name: \
             http, port: 80}}]\n"
        ),
        format!(
            "---\napiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata:\n  name: db-1\n  namespace: \
             {MESH}\n  labels: {{kubernetes.io/service-name: db}}\naddressType: IPv4\nports: [{{name: http, port: \
             8080}}]\nendpoints:\n- addresses: [\"{}\"]\n",
            server.ip()
        ),
    ]
    .concat();
    api.apply(&objects)?;
    for p in [&client, &server] {
        api.set_pod_status(MESH, p.name(), &p.ip().to_string(), &p.node_ip().to_string())?;
    }
    let _echo = server.start_echo_server(EchoKind::Http, 8080)?;

    let control = Control::new(&topo, n3);
    let kubeconfig = api.kubeconfig().to_string_lossy().into_owned();
    let (ca, tokens) = (control.ca_dir.to_string_lossy(), control.tokens.to_string_lossy());
    let listen = format!("{}:15012", control.node.ip());
    let args = ["control", "--kubernetes", "--listen", &listen, "--ca-dir", &ca, "--bootstrap-tokens", &tokens];
    let env = [("STRAIT_LOG", "info"), ("KUBECONFIG", kubeconfig.as_str())];
    let strait_control = control.node.spawn("strait-control", bin_path("strait"), &args, &env)?;
    strait_control.wait_for_log("strait control ready", Duration::from_secs(30))?;
    assert_eq!(strait_control.count_log_lines("does not serve discovery.k8s.io/v1"), 1, "{}", strait_control.log());
    assert_eq!(strait_control.count_log_lines("watching EndpointSlices"), 0);
    let _node = control.start_node(&topo, &n1)?;

    let web_ip = json(&api.kubectl(&["get", "service", "-n", MESH, "web", "-o", "json"])?)["spec"]["clusterIP"]
        .as_str()
        .expect("a cluster IP")
        .to_owned();
    let web = wait_service(&n1, &format!("web.{MESH}.svc.cluster.local"), |s| !endpoint_addresses(s).is_empty())?;
    assert_eq!(endpoint_addresses(&web), [format!("{}:8080", server.ip())]);
    let db = wait_service(&n1, &format!("db.{MESH}.svc.cluster.local"), |_| true)?;
    assert_eq!(endpoint_addresses(&db), Vec::<String>::new(), "no slices read: {db}");
    let got = answers(&client, &format!("http://{web_ip}/"), 5)?;
    assert_eq!(got.get("server"), Some(&5), "{got:?}");

    // Never asked for, in either version. The audit log holds strait's requests (its watch of
    // pods is there), so the check can fail; kubectl's (the apply) and the API server's own are
    // not strait's.
    let events = api.audit_events()?;
    let not_kubectl = |e: &&Value| {
        let agent = e["userAgent"].as_str().unwrap_or_default();
        !agent.starts_with("kubectl") && !agent.starts_with("kube-apiserver")
    };
    let uris: Vec<&str> = events.iter().filter(not_kubectl).filter_map(|e| e["requestURI"].as_str()).collect();
    assert!(uris.iter().any(|u| u.starts_with("/api/v1/pods") && u.contains("watch=true")), "{uris:?}");
    let asked: Vec<&&str> = uris.iter().filter(|u| u.contains("endpointslices")).collect();
    assert!(asked.is_empty(), "{asked:?}");
    // Where v1 is served, the watch asks for slices with this selector (kubernetes.rs): the
    // server leaves out the selector-derived ones and keeps a user's, unlabelled.
    api.apply(&format!(
        "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: {MESH}\n  \
         labels: {{kubernetes.io/service-name: web, endpointslice.kubernetes.io/managed-by: \
         endpointslice-controller.k8s.io}}\naddressType: IPv4\nendpoints: []\n"
    ))?;
    let selector = "endpointslice.kubernetes.io/managed-by!=endpointslice-controller.k8s.io";
    let listed =
        api.kubectl(&["get", "endpointslices.v1beta1.discovery.k8s.io", "-n", MESH, "-l", selector, "-o", "name"])?;
    assert_eq!(listed.split_whitespace().collect::<Vec<_>>(), ["endpointslice.discovery.k8s.io/db-1"], "{listed}");
    assert!(strait_control.is_running(), "{}", strait_control.log_tail());
    Ok(())
}
