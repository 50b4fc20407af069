//! End to end: who the destination takes an HBONE client for (SPEC L4-1, L4-2, L4-6). Policy
//! by source address tells pods of one identity apart, and a firewall on the underlay that
//! keys on pod addresses sees the client pod's own address on port 15008.

mod common;

use std::{
    io,
    time::{Duration, Instant},
};

use common::{TIMEOUT, apply, ca_dir, start_node, wait_access_line};
use strait_testbed::{EchoKind, Node, Pod, Process, Topology, k8s};

/// Node 1: `p11` and `p12` (namespace `a`, both service account `client`), `pb` (namespace `b`,
/// service account `client`). Node 2: `server` (namespace `a`, sa `server`, `app=server`) with
/// HTTP on 8080.
struct Bed {
    topo: Topology,
    n1: Node,
    n2: Node,
    p11: Pod,
    p12: Pod,
    pb: Pod,
    server: Pod,
    _servers: Vec<Process>,
}

fn bed(name: &str) -> io::Result<Bed> {
    let topo = Topology::new(name)?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let p11 = topo.add_pod(&n1, "p11")?;
    let p12 = topo.add_pod(&n1, "p12")?;
    let pb = topo.add_pod(&n1, "pb")?;
    let server = topo.add_pod(&n2, "server")?;
    let ambient = [("istio.io/dataplane-mode", "ambient")];
    let config = [
        k8s::namespace_yaml("a", &ambient),
        k8s::namespace_yaml("b", &ambient),
        k8s::pod_yaml(&p11, "a", "client", &[("app", "client")]),
        k8s::pod_yaml(&p12, "a", "client", &[("app", "client")]),
        k8s::pod_yaml(&pb, "b", "client", &[("app", "client")]),
        k8s::pod_yaml(&server, "a", "server", &[("app", "server")]),
    ]
    .concat();
    topo.write_config("cluster.yaml", &config)?;
    let servers = vec![server.start_echo_server(EchoKind::Http, 8080)?];
    Ok(Bed { topo, n1, n2, p11, p12, pb, server, _servers: servers })
}

impl Bed {
    fn proxies(&self) -> io::Result<(Process, Process)> {
        let ca = ca_dir(&self.topo, "ca");
        Ok((start_node(&self.topo, &self.n1, &ca, &[])?, start_node(&self.topo, &self.n2, &ca, &[])?))
    }

    /// Whether `from` gets an HTTP answer from the server, and how long it took to find out.
    fn reaches(&self, from: &Pod) -> io::Result<(bool, Duration)> {
        let started = Instant::now();
        let reply = from.curl(&format!("http://{}:8080/", self.server.ip()), Duration::from_secs(8))?;
        Ok((reply.ok(), started.elapsed()))
    }
}

// L4-6 with AUTHZ-1 `ipBlocks`: the server's node proxy takes the client for the pod it is, not
// for its node nor for another pod of the same identity; the access line names that pod. It also
// guards the pool key (L4-2): were p12's stream to ride p11's pooled connection, its TCP source
// would be p11's address and it would be taken for p11.
#[test]
fn ip_blocks_at_the_destination_tell_pods_of_one_identity_apart() -> io::Result<()> {
    let b = bed("hbsrc::ipblocks")?;
    let (p1, p2) = b.proxies()?;
    let allow_p11 = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p11-only\n  namespace: a\nspec:\n  \
         selector:\n    matchLabels: {{app: server}}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        \
         ipBlocks: [\"{}/32\"]\n",
        b.p11.ip()
    );
    apply(&b.topo, &[&p1, &p2], "policy.yaml", &allow_p11)?;

    assert!(b.reaches(&b.p11)?.0, "p11 is the address the policy allows");
    let admitted = wait_access_line(&p2, &["inbound", &format!("src.addr={}:", b.p11.ip()), "result=ok"], TIMEOUT)?;
    assert!(admitted.contains(&format!("src.workload=a/{}", b.p11.name())), "{admitted}");
    assert!(admitted.contains("src.identity=spiffe://cluster.local/ns/a/sa/client"), "{admitted}");

    assert!(!b.reaches(&b.p12)?.0, "p12 has p11's identity and node, not its address");
    let refused = wait_access_line(&p2, &["inbound", &format!("src.addr={}:", b.p12.ip()), "401"], TIMEOUT)?;
    assert!(refused.contains(&format!("src.workload=a/{}", b.p12.name())), "{refused}");
    assert!(refused.contains("result=refused"), "{refused}");
    Ok(())
}

/// The packets the rule named `comment` has counted, from `nft list table` output.
fn counted(ruleset: &str, comment: &str) -> u64 {
    ruleset
        .lines()
        .find(|l| l.contains(&format!("comment \"{comment}\"")))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "packets").nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

// L4-6, L4-1: a network policy on the underlay that admits only namespace `a`'s pod addresses to
// HBONE on node 2 lets p11 through and turns pb (namespace `b`, same node) away at once. The
// node proxy's own address is not in the set: tunnels from it would be refused too.
#[test]
fn an_underlay_firewall_sees_pod_addresses() -> io::Result<()> {
    let b = bed("hbsrc::nft")?;
    // `nft` is a system tool (package nftables, `cargo xtask setup`).
    b.n2.run_ok("nft", &["--version"])
        .map_err(|e| io::Error::other(format!("nft is not installed: run `cargo xtask setup` ({e})")))?;
    let (p1, p2) = b.proxies()?;
    // Steered HBONE SYNs are delivered locally (the TC program assigns them to the listener),
    // so the input hook sees them. `reject with tcp reset` fails a refused tunnel at once
    // where `drop` would wait out the connect timeout.
    let rules = format!(
        "table inet strait_test_fw {{\n\
           set ok {{ type ipv4_addr; elements = {{ {}, {} }} }}\n\
           chain input {{\n\
             type filter hook input priority 0; policy accept;\n\
             tcp dport 15008 ip saddr {} counter comment \"from node 1\"\n\
             tcp dport 15008 ip saddr @ok counter accept comment \"admitted\"\n\
             tcp dport 15008 counter reject with tcp reset comment \"refused\"\n\
           }}\n\
         }}\n",
        b.p11.ip(),
        b.p12.ip(),
        b.n1.ip()
    );
    let file = b.n2.netns().dir().join("firewall.nft");
    std::fs::write(&file, rules)?;
    b.n2.run_ok("nft", &["-f", &file.to_string_lossy()])?;
    let ruleset = || b.n2.run_ok("nft", &["list", "table", "inet", "strait_test_fw"]);

    let (ok, took) = b.reaches(&b.p11)?;
    let after_p11 = ruleset()?;
    assert_eq!(counted(&after_p11, "from node 1"), 0, "tunnels leave from node 1's address:\n{after_p11}");
    assert!(ok, "p11 (namespace a) is let through in {took:?}; firewall:\n{after_p11}\nnode 1:\n{}", p1.log_tail());
    assert!(counted(&after_p11, "admitted") > 0, "the input hook saw p11's tunnel:\n{after_p11}");
    assert_eq!(counted(&after_p11, "refused"), 0, "nothing was refused:\n{after_p11}");
    wait_access_line(&p2, &["inbound", &format!("src.addr={}:", b.p11.ip()), "result=ok"], TIMEOUT)?;

    let (ok, took) = b.reaches(&b.pb)?;
    let after_pb = ruleset()?;
    assert!(!ok, "pb (namespace b) is not in the set");
    assert!(took < Duration::from_secs(3), "the refusal is fast (a reset), took {took:?}");
    assert!(counted(&after_pb, "refused") > 0, "the firewall refused pb's tunnel:\n{after_pb}");
    let failed = wait_access_line(&p1, &["outbound", &format!("src.addr={}:", b.pb.ip())], TIMEOUT)?;
    assert!(failed.contains("result=upstream_connect_failed"), "{failed}");
    assert!(failed.contains(&format!("dst.workload=a/{}", b.server.name())), "{failed}");
    Ok(())
}
