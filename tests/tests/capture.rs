//! End to end: eBPF capture of enrolled pods' traffic by the node proxy (SPEC CAP-1,
//! CAP-3, CAP-5, CFG-1). Real kernel, real namespaces, real curl. Needs root.

mod common;

use std::{io, thread, time::Duration};

use common::{TIMEOUT, access_lines, ca_dir, start_node, stat, wait_access_line, wait_access_lines};
use strait_testbed::{EchoKind, Topology, bin_path, k8s};

const MESH: &str = "mesh";
const PLAIN: &str = "plain";

fn base_namespaces() -> String {
    [k8s::namespace_yaml(MESH, &[("istio.io/dataplane-mode", "ambient")]), k8s::namespace_yaml(PLAIN, &[])].concat()
}

// CAP-1: an unmodified curl in an enrolled pod reaches a pod on another node through the proxy.
#[test]
fn curl_from_enrolled_pod_is_captured_and_answered() -> io::Result<()> {
    let topo = Topology::new("capture::enrolled")?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let client = topo.add_pod(&n1, "client")?;
    let server = topo.add_pod(&n2, "server")?;
    topo.write_config(
        "c.yaml",
        &[
            base_namespaces(),
            k8s::pod_yaml(&client, MESH, "client", &[("app", "client")]),
            k8s::pod_yaml(&server, PLAIN, "server", &[("app", "server")]),
        ]
        .concat(),
    )?;
    let _http = server.start_echo_server(EchoKind::Http, 8080)?;
    let proxy = start_node(&topo, &n1, &ca_dir(&topo, "ca"), &[])?;

    let reply = client.curl(&format!("http://{}:8080/", server.ip()), TIMEOUT)?;
    assert!(reply.ok(), "{reply:?}");
    assert!(reply.body.starts_with("hello from server"), "{reply:?}");
    let line = wait_access_line(
        &proxy,
        &["outbound", &format!("src.addr={}:", client.ip()), &format!("dst.addr={}:8080", server.ip())],
        TIMEOUT,
    )?;
    assert!(line.contains("src.workload=mesh/client") && line.contains("result=ok"), "{line}");
    assert!(line.contains("received=") && !line.contains("received=0 "), "bytes counted: {line}");
    assert_eq!(stat(&n1, "outbound_new"), 1);
    Ok(())
}

// CAP-3: a pod of a non-enrolled namespace, an opted-out pod and a hostNetwork pod are never
// captured; the proxy neither logs nor counts their connections.
#[test]
fn non_enrolled_opted_out_and_host_network_pods_are_not_captured() -> io::Result<()> {
    let topo = Topology::new("capture::not_captured")?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let plain = topo.add_pod(&n1, "plain")?;
    let opted_out = topo.add_pod(&n1, "optout")?;
    let host = topo.add_host_network_pod(&n1, "agent")?;
    let enrolled = topo.add_pod(&n1, "enrolled")?;
    let server = topo.add_pod(&n2, "server")?;
    topo.write_config(
        "c.yaml",
        &[
            base_namespaces(),
            k8s::pod_yaml(&plain, PLAIN, "default", &[]),
            k8s::pod_yaml(&opted_out, MESH, "default", &[("istio.io/dataplane-mode", "none")]),
            k8s::pod_yaml(&host, MESH, "default", &[]),
            k8s::pod_yaml(&enrolled, MESH, "default", &[]),
            k8s::pod_yaml(&server, PLAIN, "default", &[]),
        ]
        .concat(),
    )?;
    let http = server.start_echo_server(EchoKind::Http, 8080)?;
    let proxy = start_node(&topo, &n1, &ca_dir(&topo, "ca"), &[])?;
    let url = format!("http://{}:8080/", server.ip());

    for pod in [&plain, &opted_out, &host] {
        let reply = pod.curl(&url, TIMEOUT)?;
        assert!(reply.ok(), "{}: {reply:?}", pod.name());
        // Not proxied: the server sees the pod's own connection (for hostNetwork, the node's).
        assert!(reply.body.contains(&format!("peer={}:", pod.ip())), "{}: {}", pod.name(), reply.body);
    }
    assert_eq!(stat(&n1, "outbound_new"), 0, "nothing captured");
    assert!(access_lines(&proxy, &["outbound"]).is_empty(), "{}", proxy.log());

    // The control: the enrolled pod next to them is captured.
    assert!(enrolled.curl(&url, TIMEOUT)?.ok());
    wait_access_line(&proxy, &["outbound", &format!("src.addr={}:", enrolled.ip())], TIMEOUT)?;
    assert_eq!(stat(&n1, "outbound_new"), 1);
    assert_eq!(http.count_log_lines("request peer="), 4);
    Ok(())
}

// CAP-5: un-enrolling at run time stops capture of new connections within 1 s while an open
// connection survives; enrolling again captures again, without restarting anything.
#[test]
fn unenrolling_at_run_time_keeps_open_connections() -> io::Result<()> {
    let topo = Topology::new("capture::unenroll")?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let client = topo.add_pod(&n1, "client")?;
    let server = topo.add_pod(&n2, "server")?;
    let config = |client_labels: &[(&str, &str)]| {
        [
            base_namespaces(),
            k8s::pod_yaml(&client, MESH, "client", client_labels),
            k8s::pod_yaml(&server, PLAIN, "server", &[]),
        ]
        .concat()
    };
    topo.write_config("c.yaml", &config(&[]))?;
    let _tcp = server.start_echo_server(EchoKind::Tcp, 9000)?;
    let _http = server.start_echo_server(EchoKind::Http, 8080)?;
    let proxy = start_node(&topo, &n1, &ca_dir(&topo, "ca"), &[])?;

    let echo = bin_path("strait-echo");
    let target = format!("{}:9000", server.ip());
    let hold = client.spawn("hold", &echo, &["hold", &target, "--secs", "5"], &[])?;
    hold.wait_for_log("ok 3", TIMEOUT)?;
    assert_eq!(access_lines(&proxy, &["outbound"]).len(), 0, "the held connection is still open");
    assert_eq!(stat(&n1, "outbound_new"), 1, "the held connection was captured");

    topo.write_config("c.yaml", &config(&[("istio.io/dataplane-mode", "none")]))?;
    thread::sleep(Duration::from_secs(1));
    let url = format!("http://{}:8080/", server.ip());
    let reply = client.curl(&url, TIMEOUT)?;
    assert!(reply.ok(), "{reply:?}");
    assert!(reply.body.contains(&format!("peer={}:", client.ip())), "direct, not proxied: {}", reply.body);
    assert_eq!(stat(&n1, "outbound_new"), 1, "no new capture after un-enrolling");
    assert!(stat(&n1, "draining_passed") >= 1);

    let status = hold.wait_exit(Duration::from_secs(15)).expect("hold finishes");
    assert!(status.success(), "the open connection broke: {}", hold.log());
    let line = wait_access_line(&proxy, &["outbound", &format!("dst.addr={target}")], TIMEOUT)?;
    assert!(line.contains("result=ok"), "{line}");

    topo.write_config("c.yaml", &config(&[]))?;
    thread::sleep(Duration::from_secs(1));
    assert!(client.curl(&url, TIMEOUT)?.ok());
    wait_access_line(&proxy, &["outbound", &format!("dst.addr={}:8080", server.ip())], TIMEOUT)?;
    assert_eq!(stat(&n1, "outbound_new"), 2, "captured again after re-enrolling");
    Ok(())
}

// CAP-3: the proxy's own upstream connections are never captured again. Client and server are
// both enrolled on one node, the case where a loop would show: the eBPF counters must count
// exactly one new captured connection per client connection.
#[test]
fn proxy_upstream_connections_are_not_captured_again() -> io::Result<()> {
    let topo = Topology::new("capture::no_loop")?;
    let n1 = topo.add_node("node1")?;
    let client = topo.add_pod(&n1, "client")?;
    let server = topo.add_pod(&n1, "server")?;
    topo.write_config(
        "c.yaml",
        &[base_namespaces(), k8s::pod_yaml(&client, MESH, "client", &[]), k8s::pod_yaml(&server, MESH, "server", &[])]
            .concat(),
    )?;
    let _http = server.start_echo_server(EchoKind::Http, 8080)?;
    let proxy = start_node(&topo, &n1, &ca_dir(&topo, "ca"), &[])?;
    for _ in 0..5 {
        let reply = client.curl(&format!("http://{}:8080/", server.ip()), TIMEOUT)?;
        assert!(reply.ok(), "{reply:?}");
    }
    wait_access_lines(&proxy, &["outbound"], 5, TIMEOUT)?;
    assert_eq!(access_lines(&proxy, &["outbound"]).len(), 5);
    assert_eq!(stat(&n1, "outbound_new"), 5, "one capture per client connection, none for the proxy's own");
    assert!(stat(&n1, "established") > 0, "replies reached the proxy's sockets");
    assert_eq!(stat(&n1, "assign_errors"), 0);
    Ok(())
}

// `strait node` needs root and BPF, and says so.
#[test]
fn node_without_root_or_bpf_exits_with_a_clear_error() -> io::Result<()> {
    let topo = Topology::new("capture::privileges")?;
    let n1 = topo.add_node("node1")?;
    topo.write_config("c.yaml", &base_namespaces())?;
    let strait = bin_path("strait").to_string_lossy().into_owned();
    let config = topo.config_dir().to_string_lossy().into_owned();
    let ca = ca_dir(&topo, "ca").to_string_lossy().into_owned();
    let node_args = ["node", "--config", &config, "--node", "node1", "--ca-dir", &ca];

    let mut as_nobody = vec!["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", &strait];
    as_nobody.extend_from_slice(&node_args);
    let out = n1.run("setpriv", &as_nobody)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("must run as root"), "{stderr}");

    // In a user namespace the process looks like root but the kernel refuses bpf().
    let mut in_userns = vec!["--user", "--map-root-user", &strait];
    in_userns.extend_from_slice(&node_args);
    let out = n1.run("unshare", &in_userns)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("eBPF") && stderr.contains("kernel"), "{stderr}");
    Ok(())
}

// CFG-1: bad YAML names file and line; traffic keeps flowing under the previous configuration.
#[test]
fn bad_yaml_is_reported_and_the_last_good_config_stays() -> io::Result<()> {
    let topo = Topology::new("capture::bad_yaml")?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let client = topo.add_pod(&n1, "client")?;
    let server = topo.add_pod(&n2, "server")?;
    topo.write_config(
        "c.yaml",
        &[base_namespaces(), k8s::pod_yaml(&client, MESH, "client", &[]), k8s::pod_yaml(&server, PLAIN, "server", &[])]
            .concat(),
    )?;
    let _http = server.start_echo_server(EchoKind::Http, 8080)?;
    let proxy = start_node(&topo, &n1, &ca_dir(&topo, "ca"), &[])?;
    let url = format!("http://{}:8080/", server.ip());
    assert!(client.curl(&url, TIMEOUT)?.ok());

    // A broken file, and in the same change the client opted out: nothing of it may apply.
    topo.write_config("broken.yaml", "apiVersion: v1\nkind: Pod\nmetadata:\n  name: x\nstatus:\n  podIP: [oops\n")?;
    topo.write_config(
        "c.yaml",
        &[
            base_namespaces(),
            k8s::pod_yaml(&client, MESH, "client", &[("istio.io/dataplane-mode", "none")]),
            k8s::pod_yaml(&server, PLAIN, "server", &[]),
        ]
        .concat(),
    )?;
    let error = proxy.wait_for_log("broken.yaml:", TIMEOUT)?;
    assert!(error.contains("broken.yaml:6") || error.contains("broken.yaml:7"), "file and line: {error}");
    proxy.wait_for_log("previous configuration stays in force", TIMEOUT)?;

    thread::sleep(Duration::from_millis(500));
    assert!(client.curl(&url, TIMEOUT)?.ok());
    // Still captured under the last good config.
    wait_access_lines(&proxy, &["outbound"], 2, TIMEOUT)?;
    assert_eq!(stat(&n1, "outbound_new"), 2);

    topo.remove_config("broken.yaml")?;
    proxy.wait_for_log("configuration applied", TIMEOUT)?;
    Ok(())
}

// L4-6, L4-1, CAP-4: a STRICT client pod's HBONE connections leave from its own address, so the
// peer's answers (from port 15008, to an ephemeral port of the pod) arrive on the uplink
// addressed to a STRICT pod. The XDP guard lets them through to the proxy's socket, even with a
// DENY policy naming the peer's address, while it still drops plaintext sent to the pod.
#[test]
fn strict_client_pods_get_their_tunnel_replies_past_the_xdp_guard() -> io::Result<()> {
    let t = common::TwoNodes::new("capture::strict_client")?;
    let outsider = t.topo.add_pod(&t.n2, "outsider")?;
    let strict = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: mtls\n  namespace: mesh\nspec:\n  mtls: {mode: STRICT}\n";
    // The client refuses anything from the server's address (a DENY the guard enforces too).
    let deny_server = format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-server\n  namespace: mesh\nspec:\n  selector:\n    matchLabels: {{app: client}}\n  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{}/32\"]\n",
        t.server.ip()
    );
    let config =
        [t.config("server", &[]), k8s::pod_yaml(&outsider, PLAIN, "outsider", &[]), strict.into(), deny_server]
            .concat();
    t.topo.write_config("c.yaml", &config)?;
    let _http = t.server.start_echo_server(EchoKind::Http, 8080)?;
    let _client_http = t.client.start_echo_server(EchoKind::Http, 8080)?;
    let (p1, _p2) = t.start_proxies(&[])?;
    p1.wait_for_log("XDP guard attached", TIMEOUT)?;

    let (drops, replies) = (stat(&t.n1, "xdp_drop_strict_plaintext"), stat(&t.n1, "hbone_client_reply"));
    for _ in 0..3 {
        let reply = t.client.curl(&format!("http://{}:8080/", t.server.ip()), TIMEOUT)?;
        assert!(reply.ok() && reply.body.starts_with("hello from server"), "{reply:?}");
    }
    wait_access_lines(&p1, &["outbound", &format!("dst.addr={}:8080", t.server.ip()), "result=ok"], 3, TIMEOUT)?;
    assert_eq!(stat(&t.n1, "xdp_drop_strict_plaintext"), drops, "no tunnel reply was taken for plaintext");
    assert_eq!(stat(&t.n1, "xdp_drop_deny_policy"), 0, "nor for the denied source");
    assert!(stat(&t.n1, "hbone_client_reply") > replies, "the replies went to the proxy's socket");

    // The guard still does its job for the STRICT pod.
    let plaintext = outsider.curl(&format!("http://{}:8080/", t.client.ip()), Duration::from_secs(2))?;
    assert_eq!(plaintext.status, 0, "plaintext to a STRICT pod: {plaintext:?}");
    assert!(stat(&t.n1, "xdp_drop_strict_plaintext") > drops, "dropped by the XDP guard");
    Ok(())
}
