//! End to end: zero trust at L4 (SPEC AUTHZ-1, AUTHZ-2, AUTHZ-3, L4-4, L4-7, CAP-4,
//! CAP-6): AuthorizationPolicy and PeerAuthentication enforced by the node proxies and the XDP
//! guard, late rejection of open connections, and capture kept across a proxy restart.

mod common;

use std::{
    io, thread,
    time::{Duration, Instant},
};

use common::{TIMEOUT, apply, ca_dir, start_node, start_node_keeping_capture, stat, wait_access_line};
use strait_testbed::{EchoKind, Node, Pod, Process, Topology, bin_path, k8s};

/// Node 1: `client` (mesh, sa client), `other` (mesh, sa other), `outsider` (not enrolled).
/// Node 2: `server` (mesh, sa server, app=server) with HTTP on 8080 and 9090, TCP echo on 9000.
struct Bed {
    topo: Topology,
    n1: Node,
    n2: Node,
    client: Pod,
    other: Pod,
    outsider: Pod,
    server: Pod,
    _servers: Vec<Process>,
}

fn bed(name: &str) -> io::Result<Bed> {
    let topo = Topology::new(name)?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let client = topo.add_pod(&n1, "client")?;
    let other = topo.add_pod(&n1, "other")?;
    let outsider = topo.add_pod(&n1, "outsider")?;
    let server = topo.add_pod(&n2, "server")?;
    let config = [
        k8s::namespace_yaml("mesh", &[("istio.io/dataplane-mode", "ambient")]),
        k8s::namespace_yaml("plain", &[]),
        k8s::pod_yaml(&client, "mesh", "client", &[("app", "client")]),
        k8s::pod_yaml(&other, "mesh", "other", &[("app", "other")]),
        k8s::pod_yaml(&outsider, "plain", "default", &[("app", "outsider")]),
        k8s::pod_yaml(&server, "mesh", "server", &[("app", "server")]),
    ]
    .concat();
    topo.write_config("cluster.yaml", &config)?;
    let servers = vec![
        server.start_echo_server(EchoKind::Http, 8080)?,
        server.start_echo_server(EchoKind::Http, 9090)?,
        server.start_echo_server(EchoKind::Tcp, 9000)?,
    ];
    Ok(Bed { topo, n1, n2, client, other, outsider, server, _servers: servers })
}

impl Bed {
    fn proxies(&self) -> io::Result<(Process, Process)> {
        let ca = ca_dir(&self.topo, "ca");
        Ok((start_node(&self.topo, &self.n1, &ca, &[])?, start_node(&self.topo, &self.n2, &ca, &[])?))
    }

    /// Whether `from` gets an HTTP answer from the server on `port`.
    fn reaches(&self, from: &Pod, port: u16) -> io::Result<bool> {
        let reply = from.curl(&format!("http://{}:{port}/", self.server.ip()), Duration::from_secs(3))?;
        Ok(reply.ok())
    }
}

fn policy(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: mesh\nspec:\n{spec}"
    )
}

const ON_SERVER: &str = "  selector:\n    matchLabels: {app: server}\n";

// AUTHZ-1, AUTHZ-2, AUTHZ-3 at the node proxy, each decision seen from real clients.
#[test]
fn authorization_policies_decide_at_l4() -> io::Result<()> {
    let b = bed("policy::authz")?;
    let (p1, p2) = b.proxies()?;
    let proxies = [&p1, &p2];

    // No policy: allowed.
    assert!(b.reaches(&b.client, 8080)?);

    // Allow by principal: only the client's identity.
    let allow_client = policy(
        "allow-client",
        &format!(
            "{ON_SERVER}  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/mesh/sa/client]\n"
        ),
    );
    apply(&b.topo, &proxies, "policy.yaml", &allow_client)?;
    assert!(b.reaches(&b.client, 8080)?, "the allowed principal");
    assert!(!b.reaches(&b.other, 8080)?, "another principal is denied when an ALLOW exists");
    let denied = wait_access_line(&p2, &["inbound", "result=refused", "401"], TIMEOUT)?;
    assert!(denied.contains("src.identity=spiffe://cluster.local/ns/mesh/sa/other"), "{denied}");

    // A DENY by namespace beats that ALLOW.
    let deny_ns = policy(
        "deny-mesh",
        &format!("{ON_SERVER}  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [mesh]\n"),
    );
    apply(&b.topo, &proxies, "policy.yaml", &[allow_client.clone(), deny_ns].concat())?;
    assert!(!b.reaches(&b.client, 8080)?, "DENY beats ALLOW");
    wait_access_line(&p2, &["inbound", "denied by AuthorizationPolicy mesh/deny-mesh"], TIMEOUT)?;

    // Deny by ipBlock: the client's own address, while `other` still gets in.
    let deny_ip = policy(
        "deny-ip",
        &format!(
            "{ON_SERVER}  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{}/32\"]\n",
            b.client.ip()
        ),
    );
    apply(&b.topo, &proxies, "policy.yaml", &deny_ip)?;
    assert!(!b.reaches(&b.client, 8080)?, "denied by source address");
    assert!(b.reaches(&b.other, 8080)?, "other addresses pass");

    // Allow by port.
    let allow_port = policy(
        "allow-9090",
        &format!("{ON_SERVER}  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        ports: [\"9090\"]\n"),
    );
    apply(&b.topo, &proxies, "policy.yaml", &allow_port)?;
    assert!(b.reaches(&b.client, 9090)?);
    assert!(!b.reaches(&b.client, 8080)?);

    // An ALLOW rule made only of HTTP fields never matches at L4: denied.
    let l7_only = policy(
        "get-only",
        &format!("{ON_SERVER}  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        methods: [GET]\n"),
    );
    apply(&b.topo, &proxies, "policy.yaml", &l7_only)?;
    assert!(!b.reaches(&b.client, 8080)?, "L7-only ALLOW denies at the node proxy");

    // Policies gone: allowed again.
    apply(&b.topo, &proxies, "policy.yaml", "")?;
    assert!(b.reaches(&b.client, 8080)?);
    Ok(())
}

fn peer_authentication(spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: mtls\n  namespace: mesh\nspec:\n{spec}"
    )
}

// L4-4, CAP-4: STRICT refuses plaintext (dropped in XDP on the uplink, counted); PERMISSIVE
// accepts it; a port-level DISABLE opens one port; mesh clients are unaffected.
#[test]
fn peer_authentication_strict_permissive_and_port_level() -> io::Result<()> {
    let b = bed("policy::peer_authn")?;
    let (p1, p2) = b.proxies()?;
    let proxies = [&p1, &p2];

    // PERMISSIVE (the default): plaintext from outside the mesh reaches the pod through the
    // inbound plaintext listener, from the client's own address.
    let reply = b.outsider.curl(&format!("http://{}:8080/", b.server.ip()), TIMEOUT)?;
    assert!(reply.ok() && reply.body.contains(&format!("peer={}:", b.outsider.ip())), "{reply:?}");
    let line = wait_access_line(&p2, &["inbound", "security=none", "result=ok"], TIMEOUT)?;
    assert!(line.contains("dst.workload=mesh/server"), "{line}");

    // A DENY on the outsider's address needs no identity: the XDP guard drops it.
    let deny_outsider = policy(
        "deny-outsider",
        &format!(
            "{ON_SERVER}  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{}/32\"]\n",
            b.outsider.ip()
        ),
    );
    apply(&b.topo, &proxies, "policy.yaml", &deny_outsider)?;
    let dropped = || stat(&b.n2, "xdp_drop_deny_policy") + stat(&b.n2, "tc_drop_deny_policy");
    let denied_before = dropped();
    assert!(!b.reaches(&b.outsider, 8080)?, "denied by address");
    assert!(dropped() > denied_before, "dropped in the kernel (XDP guard, or TC while it attaches)");
    assert!(b.reaches(&b.client, 8080)?, "other sources pass");
    apply(&b.topo, &proxies, "policy.yaml", "")?;

    apply(&b.topo, &proxies, "pa.yaml", &peer_authentication("  mtls: {mode: STRICT}\n"))?;
    p2.wait_for_log("XDP guard attached", TIMEOUT)?;
    let drops_before = stat(&b.n2, "xdp_drop_strict_plaintext");
    assert!(!b.reaches(&b.outsider, 8080)?, "plaintext to a STRICT workload");
    assert!(stat(&b.n2, "xdp_drop_strict_plaintext") > drops_before, "dropped by the XDP guard");
    assert!(b.reaches(&b.client, 8080)?, "mesh traffic is mTLS: unaffected");

    let port_level = "  selector:\n    matchLabels: {app: server}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    9090: {mode: DISABLE}\n";
    apply(&b.topo, &proxies, "pa.yaml", &peer_authentication(port_level))?;
    assert!(b.reaches(&b.outsider, 9090)?, "port-level DISABLE on 9090");
    assert!(!b.reaches(&b.outsider, 8080)?, "still STRICT on 8080");

    apply(&b.topo, &proxies, "pa.yaml", &peer_authentication("  mtls: {mode: PERMISSIVE}\n"))?;
    assert!(b.reaches(&b.outsider, 8080)?, "PERMISSIVE again");
    Ok(())
}

// L4-7: an open connection that a new policy denies is closed within a second.
#[test]
fn open_connection_is_closed_when_policy_denies_it() -> io::Result<()> {
    let b = bed("policy::late_rejection")?;
    let (p1, p2) = b.proxies()?;
    let hold = b.client.spawn(
        "hold",
        bin_path("strait-echo"),
        &["hold", &format!("{}:9000", b.server.ip()), "--secs", "20"],
        &[],
    )?;
    hold.wait_for_log("ok 3", TIMEOUT)?;
    let deny = policy(
        "deny-client",
        &format!(
            "{ON_SERVER}  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/mesh/sa/client]\n"
        ),
    );
    let written = Instant::now();
    apply(&b.topo, &[&p1, &p2], "policy.yaml", &deny)?;
    let status = hold.wait_exit(Duration::from_secs(5)).expect("the held connection is closed");
    let closed_after = written.elapsed();
    assert!(!status.success(), "{}", hold.log_tail());
    assert!(hold.log().contains("broken after"), "{}", hold.log_tail());
    // Config polling (200 ms), the decision, and the client's next ping (every 200 ms).
    assert!(closed_after < Duration::from_millis(1500), "closed {closed_after:?} after the policy was written");
    let line = wait_access_line(&p2, &["inbound", "late rejection"], TIMEOUT)?;
    assert!(line.contains("mesh/deny-client"), "{line}");
    Ok(())
}

// CAP-6: capture survives a proxy restart. While the proxy is down a STRICT pod's new
// connections are dropped (fail closed), never sent around the mesh; the new run takes over the
// kernel state, counters included.
#[test]
fn restart_keeps_capture_and_fails_closed_meanwhile() -> io::Result<()> {
    let b = bed("policy::restart")?;
    b.topo.write_config("pa.yaml", &peer_authentication("  mtls: {mode: STRICT}\n"))?;
    let ca = ca_dir(&b.topo, "ca");
    let _p2 = start_node(&b.topo, &b.n2, &ca, &[])?;
    let p1 = start_node_keeping_capture(&b.topo, &b.n1, &ca)?;
    assert!(b.reaches(&b.client, 8080)?);
    let captured = stat(&b.n1, "outbound_new");
    assert_eq!(captured, 1);

    p1.terminate(libc_sigterm())?;
    p1.wait_exit(TIMEOUT).expect("the proxy stops");
    assert!(!b.reaches(&b.client, 8080)?, "a STRICT pod's traffic must not bypass the stopped proxy");

    let p1 = start_node(&b.topo, &b.n1, &ca, &[])?;
    p1.wait_for_log("strait node ready", TIMEOUT)?;
    thread::sleep(Duration::from_millis(300));
    assert!(b.reaches(&b.client, 8080)?, "captured again by the new run");
    assert!(stat(&b.n1, "outbound_new") > captured, "counters carried over");
    assert!(stat(&b.n1, "no_listener") >= 1, "the dropped SYNs were counted");
    Ok(())
}

fn libc_sigterm() -> i32 {
    15
}
