//! End to end: `strait gateway` following `strait control` over delta xDS (GW-1, CFG-2): the
//! Istio Gateway and the VirtualServices bound to it reach the gateway through the control
//! plane, the gateway's certificate comes from the control plane's CA, and a change written to
//! the control plane's directory reaches the gateway without a restart. Needs root.

mod common;

use std::{
    io,
    time::{Duration, Instant},
};

use common::{Control, TIMEOUT, spawn_gateway};
use strait_testbed::{EchoKind, Pod, Process, Topology, k8s};

const ROUTES: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: web-gateway, namespace: web}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [web.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: web}
spec:
  hosts: [web.example.com]
  gateways: [web-gateway]
  http:
  - match: [{uri: {prefix: /status}}]
    route: [{destination: {host: backend, port: {number: 8000}}}]
"#;

fn start_gateway(control: &Control, pod: &Pod) -> io::Result<Process> {
    let token = control.token("serviceaccounts/istio-system/istio-ingressgateway")?;
    let follow = control.follow_args(&token);
    let mut args: Vec<&str> = vec!["--labels", "istio=ingressgateway", "--port-map", "80=18080"];
    args.extend(follow.iter().map(String::as_str));
    spawn_gateway(pod, "gateway", &args)
}

// GW-1, CFG-2: the gateway gets its Gateways and routes from the control plane; a Gateway
// applied after the gateway started opens its port; a route changed in the control plane's
// directory is served within seconds; a Gateway whose selector names other pods is not served,
// and its port closes.
#[test]
fn gateway_follows_the_control_plane() -> io::Result<()> {
    let topo = Topology::new("gwxds::follow")?;
    let n1 = topo.add_node("node1")?;
    let control = Control::new(&topo, topo.add_node("control")?);
    let (gw_pod, client, backend) =
        (topo.add_pod(&n1, "ingress")?, topo.add_pod(&n1, "client")?, topo.add_pod(&n1, "backend")?);
    let base = [
        k8s::namespace_yaml("istio-system", &[]),
        k8s::namespace_yaml("web", &[]),
        k8s::pod_yaml(
            &gw_pod,
            "istio-system",
            "istio-ingressgateway",
            &[("istio", "ingressgateway"), ("strait.io/gateway", "true")],
        ),
        k8s::pod_yaml(&backend, "web", "backend", &[("app", "backend")]),
        k8s::named_service_yaml("backend", "web", "10.96.0.51", &[("http", 8000, 8000)], &[("app", "backend")], &[]),
    ]
    .concat();
    // The gateway starts before any Gateway exists, as a Deployment often does.
    topo.write_config("c.yaml", &base)?;
    let _server = backend.echo_server(EchoKind::Http, 8000).name("backend").start()?;
    let ctl = control.start(&topo, &[])?;
    let gw = start_gateway(&control, &gw_pod)?;
    let url = format!("http://{}:18080", gw_pod.ip());
    let get = |host: &str, path: &str| client.curl_args(&["-H", &format!("Host: {host}"), &format!("{url}{path}")]);
    assert_eq!(get("web.example.com", "/status/418")?.status, 0, "nothing listens before a Gateway selects it");

    topo.write_config("c.yaml", &(base.clone() + ROUTES))?;
    gw.wait_for_log("gateway listener", TIMEOUT)?;
    let r = get("web.example.com", "/status/418")?;
    assert_eq!(r.status, 418, "{r:?}\n{}", gw.log_tail());
    assert!(get("web.example.com", "/status/200")?.body.contains("hello from backend"));
    assert_eq!(get("web.example.com", "/other")?.status, 404);
    assert_eq!(get("elsewhere.example.com", "/status/200")?.status, 404);
    let ctl_log = ctl.log();
    assert!(
        ctl_log.contains("spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway"),
        "the gateway's certificate came from the control plane's CA:\n{ctl_log}"
    );

    // A route changed in the control plane's directory: served without a restart.
    topo.write_config("c.yaml", &(base.clone() + &ROUTES.replace("prefix: /status", "prefix: /other")))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while get("web.example.com", "/other")?.status != 200 {
        assert!(Instant::now() < deadline, "the changed route never reached the gateway:\n{}", gw.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get("web.example.com", "/status/200")?.status, 404);

    // A Gateway for other pods' labels is not served by this one: its port closes.
    topo.write_config("c.yaml", &(base + &ROUTES.replace("istio: ingressgateway", "istio: other")))?;
    gw.wait_for_log("gateway listener closed", Duration::from_secs(15))?;
    let r = get("web.example.com", "/other")?;
    assert_eq!(r.status, 0, "the port no Gateway serves is closed: {r:?}");
    assert!(gw.is_running(), "{}", gw.log_tail());
    Ok(())
}
