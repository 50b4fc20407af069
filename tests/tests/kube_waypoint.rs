//! End to end: waypoints the Istio way (SPEC L4-3, CFG-3) on a real kube-apiserver and etcd.
//! `strait ctl waypoint apply` writes the Gateway istioctl would; `strait control --kubernetes`
//! reconciles it into the waypoint's Deployment, Service, ServiceAccount and ConfigMap, owned
//! by the Gateway, and reports Programmed with the Service's address once the Deployment is
//! ready; a `strait waypoint` run for it routes a VirtualService applied with kubectl for
//! traffic from a pod on a node; deleting the Gateway ends the reconciling. There is no
//! controller-manager here: Deployment status is written as its controller would, the
//! waypoint's pod created as its ReplicaSet would, and the garbage collector's part is checked
//! through the owner references it acts on. Needs root.

mod common;

use std::{
    io, thread,
    time::{Duration, Instant},
};

use common::{Control, TIMEOUT, wait_request_lines};
use serde_json::Value;
use strait_testbed::kube::KubeApi;
use strait_testbed::{EchoKind, FABRIC_GATEWAY, Node, Pod, Process, Topology, bin_path};

const REVIEWS_VIP: &str = "10.96.0.30";

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// `strait control --kubernetes` that also runs the waypoint reconciler.
fn start_control(topo: &Topology, control: &Control, api: &KubeApi) -> io::Result<Process> {
    let xds = control.address();
    let extra = ["--waypoint-image", "example.invalid/strait:test", "--waypoint-xds-address", &xds];
    let process = control.start_kubernetes(topo, api, &extra)?;
    process.wait_for_log("waypoints: reconciling Gateways", TIMEOUT)?;
    Ok(process)
}

/// `strait ctl <args>` on `node` against the API server; its stdout, or an error with stderr.
fn ctl(node: &Node, api: &KubeApi, args: &[&str]) -> io::Result<String> {
    let kubeconfig = format!("KUBECONFIG={}", api.kubeconfig().display());
    let strait = bin_path("strait").to_string_lossy().into_owned();
    let mut full = vec![kubeconfig.as_str(), strait.as_str(), "ctl"];
    full.extend_from_slice(args);
    node.run_ok("env", &full)
}

/// `strait waypoint` in `pod` with the arguments of the reconciler's Deployment, the files a
/// kubelet would mount given from the test: the root certificate of the reconciler's ConfigMap,
/// and a token of the waypoint's service account.
fn start_waypoint_as_deployed(topo: &Topology, control: &Control, api: &KubeApi, pod: &Pod) -> io::Result<Process> {
    let deployment = json(&api.kubectl(&["get", "deployment", "-n", "shop", "waypoint", "-o", "json"])?);
    let spec = &deployment["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    assert_eq!(container["image"], "example.invalid/strait:test");
    let mounts = container["volumeMounts"].as_array().expect("mounts");
    let mounted = |volume: &str| mounts.iter().find(|m| m["name"] == volume).and_then(|m| m["mountPath"].as_str());
    assert_eq!(mounted("strait-root"), Some("/etc/strait/root"));
    assert_eq!(mounted("istio-token"), Some("/var/run/secrets/tokens"));
    let volumes = spec["volumes"].as_array().expect("volumes");
    let token = volumes.iter().find(|v| v["name"] == "istio-token").expect("the token volume");
    let projected = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!((projected["audience"].as_str(), projected["path"].as_str()), (Some("istio-ca"), Some("istio-token")));

    let config_map = json(&api.kubectl(&["get", "configmap", "-n", "shop", "waypoint-strait-root", "-o", "json"])?);
    let root = topo.dir().join("waypoint-root-cert.pem");
    std::fs::write(&root, config_map["data"]["root-cert.pem"].as_str().expect("a root certificate"))?;
    let token = control.token("serviceaccounts/shop/waypoint")?;
    let mut replaced = 0;
    let args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| {
            let a = a.as_str().expect("a string");
            let local = match a {
                "--ca-root=/etc/strait/root/root-cert.pem" => format!("--ca-root={}", root.display()),
                "--ca-token-file=/var/run/secrets/tokens/istio-token" => format!("--ca-token-file={}", token.display()),
                other => return other.to_owned(),
            };
            replaced += 1;
            local
        })
        .collect();
    assert_eq!(replaced, 2, "{args:?}");
    assert!(args.contains(&format!("--xds-address={}", control.address())), "{args:?}");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let waypoint = pod.spawn("waypoint-waypoint", bin_path("strait"), &args, &[("STRAIT_LOG", "info")])?;
    waypoint.wait_for_log("strait waypoint ready", TIMEOUT)?;
    Ok(waypoint)
}

fn condition<'a>(gateway: &'a Value, type_: &str) -> Option<&'a Value> {
    gateway["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)
}

fn setup(api: &KubeApi, client: &Pod, reviews_v1: &Pod, reviews_v2: &Pod) -> io::Result<()> {
    api.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: client, namespace: mesh}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: reviews, namespace: shop}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\nspec:\n  clusterIP: 10.96.0.30\n  \
         selector: {app: reviews}\n  ports: [{name: http, port: 9080, targetPort: 9080}]\n---\n\
         apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: shop}\n\
         spec:\n  host: reviews\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n",
    )?;
    common::create_kube_pod(api, client, "client", "mesh", "client", &[("app", "client")])?;
    common::create_kube_pod(
        api,
        reviews_v1,
        "reviews-v1",
        "shop",
        "reviews",
        &[("app", "reviews"), ("version", "v1")],
    )?;
    common::create_kube_pod(api, reviews_v2, "reviews-v2", "shop", "reviews", &[("app", "reviews"), ("version", "v2")])
}

// L4-3, CFG-3: ctl waypoint apply -> Gateway -> the reconciler's objects, owned by it -> ready
// Deployment -> Programmed with the Service's address -> a waypoint following the control plane
// routes a VirtualService applied with kubectl -> delete -> no longer reconciled.
#[test]
fn a_gateway_becomes_a_waypoint_that_routes() -> io::Result<()> {
    let topo = Topology::new("kube_waypoint::routes")?;
    let (n1, n2, n3) = (topo.add_node("node1")?, topo.add_node("node2")?, topo.add_node("control")?);
    let client = topo.add_pod(&n1, "client")?;
    let waypoint_pod = topo.add_pod(&n1, "waypoint")?;
    let reviews_v1 = topo.add_pod(&n2, "reviews-v1")?;
    let reviews_v2 = topo.add_pod(&n2, "reviews-v2")?;
    let api = KubeApi::start_in_netns(topo.fabric().name(), FABRIC_GATEWAY)?;
    setup(&api, &client, &reviews_v1, &reviews_v2)?;
    let _servers = [
        reviews_v1.echo_server(EchoKind::Http, 9080).name("reviews-v1").start()?,
        reviews_v2.echo_server(EchoKind::Http, 9080).name("reviews-v2").start()?,
    ];
    let control = Control::new(&topo, n3);
    let control_process = start_control(&topo, &control, &api)?;

    // istioctl's Gateway, and the namespace enrolled.
    let applied = Instant::now();
    let out = ctl(&control.node, &api, &["waypoint", "apply", "-n", "shop", "--enroll-namespace"])?;
    assert!(out.contains("waypoint shop/waypoint applied"), "{out}");
    let gateway =
        json(&api.kubectl(&["get", "gateway.gateway.networking.k8s.io", "-n", "shop", "waypoint", "-o", "json"])?);
    assert_eq!(gateway["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(gateway["spec"]["gatewayClassName"], "istio-waypoint");
    assert_eq!(gateway["metadata"]["labels"]["istio.io/waypoint-for"], "service");
    let listeners = &gateway["spec"]["listeners"];
    assert_eq!(
        (listeners[0]["name"].as_str(), listeners[0]["port"].as_u64()),
        (Some("mesh"), Some(15008)),
        "{listeners}"
    );
    assert_eq!(listeners[0]["protocol"], "HBONE");
    let ns = json(&api.kubectl(&["get", "namespace", "shop", "-o", "json"])?);
    assert_eq!(ns["metadata"]["labels"]["istio.io/use-waypoint"], "waypoint");
    let uid = gateway["metadata"]["uid"].as_str().expect("a uid").to_owned();

    // The reconciler's objects, each owned by the Gateway (what the garbage collector follows).
    let mut created_after = None;
    for kind in ["deployment", "service", "serviceaccount", "configmap"] {
        let name = if kind == "configmap" { "waypoint-strait-root" } else { "waypoint" };
        let object = api.wait_json(&["get", kind, "-n", "shop", name, "-o", "json"], kind, TIMEOUT, |_| true)?;
        created_after.get_or_insert_with(|| applied.elapsed());
        let owners = object["metadata"]["ownerReferences"].as_array().cloned().unwrap_or_default();
        assert_eq!(owners.len(), 1, "{kind}: {owners:?}");
        let owner = &owners[0];
        assert_eq!(owner["apiVersion"], "gateway.networking.k8s.io/v1", "{kind}: {owner}");
        assert_eq!((owner["kind"].as_str(), owner["name"].as_str()), (Some("Gateway"), Some("waypoint")), "{kind}");
        assert_eq!(owner["uid"].as_str(), Some(uid.as_str()), "{kind}: owned by this very Gateway");
        assert_eq!(owner["controller"], true, "{kind}");
    }
    let service = json(&api.kubectl(&["get", "service", "-n", "shop", "waypoint", "-o", "json"])?);
    let cluster_ip = service["spec"]["clusterIP"].as_str().expect("a cluster IP").to_owned();
    let ports: Vec<u64> =
        service["spec"]["ports"].as_array().expect("ports").iter().filter_map(|p| p["port"].as_u64()).collect();
    assert_eq!(ports, [15021, 15008]);
    let deployment = json(&api.kubectl(&["get", "deployment", "-n", "shop", "waypoint", "-o", "json"])?);
    let template = &deployment["spec"]["template"];
    assert_eq!(template["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"], "waypoint");
    assert_eq!(template["spec"]["serviceAccountName"], "waypoint");

    // Not ready yet: Accepted, not Programmed.
    let get_gateway = ["get", "gateway.gateway.networking.k8s.io", "-n", "shop", "waypoint", "-o", "json"];
    let pending = api.wait_json(&get_gateway, "Accepted", TIMEOUT, |g| {
        condition(g, "Accepted").is_some_and(|c| c["status"] == "True")
    })?;
    let programmed = condition(&pending, "Programmed").expect("Programmed told");
    assert_eq!(
        (programmed["status"].as_str(), programmed["reason"].as_str()),
        (Some("False"), Some("Pending")),
        "{programmed}"
    );

    let e = ctl(&control.node, &api, &["waypoint", "apply", "-n", "shop", "--wait", "--timeout", "1s"])
        .expect_err("not ready yet");
    assert!(
        e.to_string()
            .contains("waypoint shop/waypoint not ready after 1s: waiting for the waypoint's Deployment: 0 of 1"),
        "{e}"
    );

    // What the Deployment controller and the ReplicaSet's pod would do.
    let status = r#"{"status":{"observedGeneration":1,"replicas":1,"updatedReplicas":1,"readyReplicas":1,"availableReplicas":1}}"#;
    api.kubectl(&[
        "patch",
        "deployment",
        "-n",
        "shop",
        "waypoint",
        "--subresource=status",
        "--type=merge",
        "-p",
        status,
    ])?;
    let deployment_ready = Instant::now();
    common::create_kube_pod(
        &api,
        &waypoint_pod,
        "waypoint-5d8f7-abcde",
        "shop",
        "waypoint",
        &[("gateway.networking.k8s.io/gateway-name", "waypoint")],
    )?;
    let ready = api.wait_json(&get_gateway, "Programmed", TIMEOUT, |g| {
        condition(g, "Programmed").is_some_and(|c| c["status"] == "True")
    })?;
    eprintln!(
        "ctl waypoint apply -> waypoint Deployment seen after {:?} (incl. strait ctl and kubectl); Deployment ready -> \
         Gateway Programmed seen after {:?} (incl. creating the pod and kubectl)",
        created_after.unwrap_or_default(),
        deployment_ready.elapsed()
    );
    assert_eq!(ready["status"]["addresses"], serde_json::json!([{"type": "IPAddress", "value": cluster_ip}]));
    let accepted = condition(&ready, "Accepted").expect("Accepted");
    assert_eq!(
        accepted["lastTransitionTime"],
        condition(&pending, "Accepted").expect("Accepted")["lastTransitionTime"]
    );
    let listed = ctl(&control.node, &api, &["waypoint", "list", "-n", "shop"])?;
    let row: Vec<&str> = listed.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    assert_eq!(row, ["waypoint", "istio-waypoint", "True", cluster_ip.as_str()], "{listed}");
    control_process.wait_for_log("waypoints: Gateway shop/waypoint programmed", TIMEOUT)?;
    let out = ctl(&control.node, &api, &["waypoint", "apply", "-n", "shop", "--wait"])?;
    assert!(out.contains("waypoint shop/waypoint is ready"), "{out}");

    // The data path: node proxies and the waypoint follow the control plane.
    let _p1 = control.start_node(&topo, &n1)?;
    let p2 = control.start_node(&topo, &n2)?;
    let waypoint = start_waypoint_as_deployed(&topo, &control, &api, &waypoint_pod)?;
    let vs = "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\n\
              spec:\n  hosts: [reviews]\n  http:\n  - match:\n    - headers:\n        x-version: {exact: v2}\n    \
              route:\n    - destination: {host: reviews, subset: v2}\n  - route:\n    - destination: {host: reviews, subset: v1}\n";
    api.apply(vs)?;
    let url = format!("http://{REVIEWS_VIP}:9080/reviews");
    // Until the VirtualService has reached the waypoint (its request lines name the route).
    let deadline = Instant::now() + TIMEOUT;
    while common::request_lines(&waypoint, &["route=shop/reviews"]).is_empty() {
        assert!(Instant::now() < deadline, "the VirtualService never reached the waypoint:\n{}", waypoint.log_tail());
        client.echo_get(&url, 1, &[])?;
        thread::sleep(Duration::from_millis(100));
    }
    // The lines of the probes above are written within the access log's flush interval.
    thread::sleep(Duration::from_millis(300));
    let before = common::request_lines(&waypoint, &["route=shop/reviews"]).len();
    let routed = client.echo_get(&url, 10, &[("x-version", "v2")])?;
    assert_eq!(routed.served("reviews-v2"), 10, "{routed:?}\n{}", waypoint.log_tail());
    let plain = client.echo_get(&url, 10, &[])?;
    assert_eq!(plain.served("reviews-v1"), 10, "{plain:?}");
    wait_request_lines(&waypoint, &["route=shop/reviews"], before + 20)?;

    // The Gateway says istio.io/waypoint-for: service (istioctl's): traffic to a pod's own IP
    // goes straight to it, the client's identity reaching the pod's node.
    let direct = client.echo_get(&format!("http://{}:9080/direct", reviews_v1.ip()), 3, &[])?;
    assert_eq!(direct.served("reviews-v1"), 3, "{direct:?}");
    let dst = format!("dst.addr={}:9080", reviews_v1.ip());
    let line = common::wait_access_line(
        &p2,
        &["inbound", &dst, "src.identity=spiffe://cluster.local/ns/mesh/sa/client"],
        TIMEOUT,
    )?;
    assert!(line.contains("security=mutual_tls"), "{line}");
    thread::sleep(Duration::from_millis(300));
    assert!(common::request_lines(&waypoint, &["path=\"/direct\""]).is_empty(), "{}", waypoint.log_tail());

    // Deleted: no longer reconciled. The garbage collector would delete its objects (their owner
    // references name it); here the Deployment is deleted as it would, and stays deleted.
    let out = ctl(&control.node, &api, &["waypoint", "delete", "-n", "shop"])?;
    assert!(out.contains("waypoint shop/waypoint deleted"), "{out}");
    control_process.wait_for_log("waypoints: Gateway shop/waypoint deleted: no longer served", TIMEOUT)?;
    api.kubectl(&["delete", "deployment", "-n", "shop", "waypoint"])?;
    thread::sleep(Duration::from_secs(2));
    let left = api.kubectl(&["get", "deployments", "-n", "shop", "-o", "name"])?;
    assert!(left.trim().is_empty(), "recreated after its Gateway was deleted: {left}");
    let listed = ctl(&control.node, &api, &["waypoint", "list", "-n", "shop"])?;
    assert!(listed.contains("no waypoints in namespace shop"), "{listed}");
    Ok(())
}

// L4-3: a waypoint Gateway the reconciler cannot run is refused in its status, naming the field;
// a Gateway of another class is left alone; ctl refuses a namespace that does not exist.
#[test]
fn gateways_it_cannot_run_are_told_and_others_left_alone() -> io::Result<()> {
    let topo = Topology::new("kube_waypoint::invalid")?;
    let node = topo.add_node("control")?;
    let api = KubeApi::start_in_netns(topo.fabric().name(), FABRIC_GATEWAY)?;
    let control = Control::new(&topo, node);
    let control_process = start_control(&topo, &control, &api)?;
    api.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1beta1\nkind: Gateway\nmetadata: {name: my.waypoint, namespace: shop}\n\
         spec:\n  gatewayClassName: strait-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: ingress, namespace: shop}\n\
         spec:\n  gatewayClassName: nginx\n  listeners: [{name: http, port: 80, protocol: HTTP}]\n",
    )?;
    let get = ["get", "gateway.gateway.networking.k8s.io", "-n", "shop", "my.waypoint", "-o", "json"];
    let refused = api.wait_json(&get, "Accepted", TIMEOUT, |g| condition(g, "Accepted").is_some())?;
    let accepted = condition(&refused, "Accepted").expect("Accepted");
    assert_eq!((accepted["status"].as_str(), accepted["reason"].as_str()), (Some("False"), Some("Invalid")));
    assert!(accepted["message"].as_str().is_some_and(|m| m.starts_with("metadata.name: `my.waypoint`")), "{accepted}");
    control_process.wait_for_log("waypoints: Gateway shop/my.waypoint refused: metadata.name", TIMEOUT)?;
    let deployments = api.kubectl(&["get", "deployments,services", "-n", "shop", "-o", "name"])?;
    assert!(deployments.trim().is_empty(), "{deployments}");
    let ingress =
        json(&api.kubectl(&["get", "gateway.gateway.networking.k8s.io", "-n", "shop", "ingress", "-o", "json"])?);
    assert!(ingress.get("status").is_none_or(|s| s.get("conditions").is_none()), "another class: {ingress}");

    let e = ctl(&control.node, &api, &["waypoint", "apply", "-n", "nowhere"]).expect_err("no such namespace");
    assert!(e.to_string().contains("namespace nowhere does not exist"), "{e}");
    Ok(())
}
