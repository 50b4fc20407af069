//! End to end: capture on nodes whose CNI is a bridge (SPEC CAP-1, CAP-2, L4-1, L4-4, L4-6):
//! every pod's veth is a port of `cni0` and the node has no route per pod, as with flannel or
//! the reference `bridge` plugin. The node proxy finds the pods' ports from the neighbour table
//! and the bridge's forwarding database, and traffic between pods of one bridge, which the
//! bridge would otherwise switch past the node's stack, still goes through the proxy. Needs
//! root.

mod common;

use std::{io, thread, time::Duration};

use common::{APP_NS, MESH, PLAIN, TIMEOUT, WaypointMesh, ca_dir, start_node, wait_access_line, wait_request_lines};
use strait_testbed::{EchoKind, Pod, Process, Topology, k8s};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/mesh/sa/client";

/// Waits until `proxy` has attached capture to the bridge port of each of `pods`.
fn wait_captured(proxy: &Process, pods: &[&Pod]) -> io::Result<()> {
    for pod in pods {
        let veth = pod.host_veth().unwrap_or_default();
        proxy.wait_for_log(&format!("capture attached (TC ingress) interface={veth}"), TIMEOUT)?;
    }
    Ok(())
}

// CAP-1, CAP-2, L4-1, L4-6: on bridge nodes, pod -> pod across nodes and between two pods of
// the same bridge both travel in mutual TLS with both identities, and the server sees the
// client's own address (its reply, switched towards the client by the bridge, is taken back to
// the proxy).
#[test]
fn bridged_pods_are_captured_across_nodes_and_on_one_bridge() -> io::Result<()> {
    let topo = Topology::new("bridge::mtls")?;
    let (n1, n2) = (topo.add_bridge_node("node1")?, topo.add_bridge_node("node2")?);
    let client = topo.add_pod(&n1, "client")?;
    let neighbour = topo.add_pod(&n1, "neighbour")?;
    let remote = topo.add_pod(&n2, "remote")?;
    topo.write_config(
        "c.yaml",
        &[
            k8s::namespace_yaml(MESH, &[("istio.io/dataplane-mode", "ambient")]),
            k8s::pod_yaml(&client, MESH, "client", &[("app", "client")]),
            k8s::pod_yaml(&neighbour, MESH, "neighbour", &[("app", "neighbour")]),
            k8s::pod_yaml(&remote, MESH, "remote", &[("app", "remote")]),
        ]
        .concat(),
    )?;
    let _servers =
        [neighbour.start_echo_server(EchoKind::Http, 8080)?, remote.start_echo_server(EchoKind::Http, 8080)?];
    let ca = ca_dir(&topo, "ca");
    let (p1, p2) = (start_node(&topo, &n1, &ca, &[])?, start_node(&topo, &n2, &ca, &[])?);
    // Nothing has sent a packet yet: the proxies find the ports by probing the pods.
    wait_captured(&p1, &[&client, &neighbour])?;
    wait_captured(&p2, &[&remote])?;

    for (server, proxy_in, sa) in [(&remote, &p2, "remote"), (&neighbour, &p1, "neighbour")] {
        let reply = client.curl(&format!("http://{}:8080/", server.ip()), TIMEOUT)?;
        assert!(reply.ok(), "{}: {reply:?}", server.name());
        assert!(
            reply.body.contains(&format!("peer={}:", client.ip())),
            "{}: source address kept: {}",
            server.name(),
            reply.body
        );
        let server_id = format!("spiffe://cluster.local/ns/mesh/sa/{sa}");
        for (proxy, direction) in [(&p1, "outbound"), (proxy_in, "inbound")] {
            let line = wait_access_line(proxy, &[direction, &format!("dst.addr={}:8080", server.ip())], TIMEOUT)?;
            assert!(line.contains(&format!("src.identity={CLIENT_ID}")), "{line}");
            assert!(line.contains(&format!("dst.identity={server_id}")), "{line}");
            assert!(line.contains("security=mutual_tls") && line.contains("result=ok"), "{line}");
        }
    }

    // The tables forget quiet pods (the bridge after 300 s, the neighbour table sooner); the
    // ports stay captured while they exist.
    // Ageing time in centiseconds: the bridge forgets learned MACs after 1 s.
    n1.run_ok("ip", &["link", "set", "cni0", "type", "bridge", "ageing_time", "100"])?;
    n1.run_ok("ip", &["neigh", "flush", "dev", "cni0"])?;
    thread::sleep(Duration::from_secs(3));
    let client_mac = client.run_ok("ip", &["-br", "link", "show", "eth0"])?;
    let client_mac = client_mac.split_whitespace().nth(2).unwrap_or_default().to_owned();
    let fdb = n1.run_ok("bridge", &["fdb", "show", "br", "cni0"])?;
    assert!(client_mac.len() == 17 && !fdb.contains(&client_mac), "the bridge forgot {client_mac}: {fdb}");
    assert!(!p1.log().contains("capture detached"), "{}", p1.log_tail());
    let reply = client.curl(&format!("http://{}:8080/", neighbour.ip()), TIMEOUT)?;
    assert!(reply.ok(), "after the tables forgot the pods: {reply:?}");
    let needles = ["outbound", "security=mutual_tls"];
    common::wait_access_lines(&p1, &needles, 3, TIMEOUT)?;
    thread::sleep(Duration::from_millis(300));
    assert_eq!(common::access_lines(&p1, &needles).len(), 3, "{}", p1.log_tail());
    Ok(())
}

// L4-4, CAP-2: a pod outside the mesh on the same bridge as a STRICT pod cannot reach it in
// plaintext (the bridge would deliver its packets port to port; the proxy takes them and
// refuses), while a pod of the mesh still can.
#[test]
fn plaintext_to_a_strict_pod_on_the_same_bridge_is_refused() -> io::Result<()> {
    let topo = Topology::new("bridge::strict")?;
    let node = topo.add_bridge_node("node1")?;
    let (client, outsider, server) =
        (topo.add_pod(&node, "client")?, topo.add_pod(&node, "outsider")?, topo.add_pod(&node, "server")?);
    topo.write_config(
        "c.yaml",
        &[
            k8s::namespace_yaml(MESH, &[("istio.io/dataplane-mode", "ambient")]),
            k8s::namespace_yaml(PLAIN, &[]),
            k8s::pod_yaml(&client, MESH, "client", &[]),
            k8s::pod_yaml(&outsider, PLAIN, "outsider", &[]),
            k8s::pod_yaml(&server, MESH, "server", &[]),
            "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: mesh\nspec:\n  mtls:\n    mode: STRICT\n".to_string(),
        ]
        .concat(),
    )?;
    let _http = server.start_echo_server(EchoKind::Http, 8080)?;
    let url = format!("http://{}:8080/", server.ip());
    // Without a proxy the bridge connects them: the refusal below is the proxy's doing.
    let before = outsider.curl(&url, TIMEOUT)?;
    assert!(before.ok(), "plain bridge before the proxy: {before:?}");

    let proxy = start_node(&topo, &node, &ca_dir(&topo, "ca"), &[])?;
    wait_captured(&proxy, &[&client, &outsider, &server])?;
    let refused = outsider.curl(&url, TIMEOUT)?;
    assert!(!refused.ok(), "plaintext reached a STRICT pod: {refused:?}");
    let reply = client.curl(&url, TIMEOUT)?;
    assert!(reply.ok(), "mesh client: {reply:?}");
    let line = wait_access_line(
        &proxy,
        &["inbound", "src.workload=mesh/client", &format!("dst.addr={}:8080", server.ip())],
        TIMEOUT,
    )?;
    assert!(line.contains(&format!("src.identity={CLIENT_ID}")) && line.contains("security=mutual_tls"), "{line}");
    let refusal = wait_access_line(&proxy, &["inbound", "src.workload=plain/outsider"], TIMEOUT)?;
    assert!(refusal.contains("result=refused"), "{refusal}");
    Ok(())
}

// L4-6, L4-1, CAP-2: on bridge nodes the client pod's tunnels leave from its own address, and
// their answers reach the node proxy's socket: from a pod of the other node (over the uplink),
// and from a waypoint on the client's own bridge, which answers the client's MAC directly (the
// bridge would switch that frame to the client's port; the capture program takes it up to the
// proxy instead).
#[test]
fn tunnel_replies_reach_the_proxy_on_bridge_nodes() -> io::Result<()> {
    let topo = Topology::new("bridge::tunnel_replies")?;
    let (n1, n2) = (topo.add_bridge_node("node1")?, topo.add_bridge_node("node2")?);
    let client = topo.add_pod(&n1, "client")?;
    let waypoint_pod = topo.add_pod(&n1, "waypoint")?;
    let backends = vec![topo.add_pod(&n2, "web-1")?];
    // Outside the waypoint's namespace: reached straight over HBONE.
    let remote = topo.add_pod(&n2, "remote")?;
    let ca = ca_dir(&topo, "ca");
    let m = WaypointMesh { topo, n1, n2, client, waypoint_pod, backends, ca };
    let web = &m.backends[0];
    let config = [
        m.base_config(),
        k8s::namespace_yaml(MESH, &[("istio.io/dataplane-mode", "ambient")]),
        k8s::pod_yaml(&remote, MESH, "remote", &[("app", "remote")]),
        k8s::pod_yaml(web, APP_NS, "web", &[("app", "web")]),
        k8s::named_service_yaml("web", APP_NS, "10.96.0.20", &[("http", 80, 8080)], &[("app", "web")], &[]),
    ]
    .concat();
    m.topo.write_config("c.yaml", &config)?;
    let _servers = [web.start_echo_server(EchoKind::Http, 8080)?, remote.start_echo_server(EchoKind::Http, 8080)?];
    let (p1, p2, wp) = m.start()?;
    wait_captured(&p1, &[&m.client, &m.waypoint_pod])?;
    wait_captured(&p2, &[web, &remote])?;

    // Pod to pod across nodes: the answers come in over the uplink.
    let replies = common::stat(&m.n1, "hbone_client_reply");
    let reply = m.client.curl(&format!("http://{}:8080/", remote.ip()), TIMEOUT)?;
    assert!(reply.ok() && reply.body.contains(&format!("peer={}:", m.client.ip())), "{reply:?}");
    assert!(common::stat(&m.n1, "hbone_client_reply") > replies, "answers from the other node");

    // Pod to the waypoint on the same bridge: the waypoint holds a tunnel from the client's
    // address, and its answers went to the proxy.
    let replies = common::stat(&m.n1, "hbone_client_reply");
    let reply = m.client.curl("http://10.96.0.20/", TIMEOUT)?;
    assert!(reply.ok(), "{reply:?}");
    wait_request_lines(&wp, &["status=200"], 1)?;
    assert!(common::stat(&m.n1, "hbone_client_reply") > replies, "answers from the waypoint's bridge port");
    let tunnels = m.waypoint_pod.run_ok("ss", &["-Htn", "state", "established", "( sport = :15008 )"])?;
    assert!(tunnels.contains(&format!(" {}:", m.client.ip())), "the waypoint's peer is the client pod: {tunnels}");
    Ok(())
}
