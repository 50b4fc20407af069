//! End to end: the kernel fast path of the node proxy (SPEC CAP-1, CAP-2, L4-4, L4-7, OBS-1,
//! OBS-2): same-node pod → pod and PERMISSIVE plaintext connections are moved with splice(2)
//! once admitted, and still arrive intact, half-close, are counted in the access lines and are
//! closed by a policy that denies them later. Needs root.

mod common;

use std::{
    io,
    time::{Duration, Instant},
};

use common::{TIMEOUT, apply, ca_dir, proxy_metric, start_node, wait_access_line};
use strait_testbed::{EchoKind, Node, Pod, Process, Topology, bin_path, k8s};

/// Bytes of the bulk transfer: big enough to take many pipe fills each way.
const BULK: u64 = 64 * 1024 * 1024;
/// Bytes the half-close client sends before it shuts its side.
const HALF_CLOSE_BYTES: &str = "4194304";
/// Port of the half-close server: it reads to end of stream, then answers.
const ANSWER_PORT: u16 = 9100;

/// Reads each connection to its end of stream, then answers `<bytes> <sha256>` and closes: it
/// can answer only if the proxy passed the client's half-close on and kept the other way open.
const ANSWER_SERVER: &str = "\
import hashlib, socket, sys
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(('0.0.0.0', int(sys.argv[1]))); l.listen(16); print('listening', flush=True)
while True:
    c, _ = l.accept(); h = hashlib.sha256(); n = 0
    while True:
        b = c.recv(65536)
        if not b: break
        h.update(b); n += len(b)
    c.sendall(f'{n} {h.hexdigest()}\\n'.encode()); c.close()
";

/// Sends random bytes, shuts its write side, reads the answer to its end; prints the answer
/// and what it sent, each as `<bytes> <sha256>`.
const HALF_CLOSE_CLIENT: &str = "\
import hashlib, os, socket, sys
data = os.urandom(int(sys.argv[3]))
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5); s.settimeout(10)
s.sendall(data); s.shutdown(socket.SHUT_WR)
answer = b''
while True:
    b = s.recv(4096)
    if not b: break
    answer += b
print(answer.decode().strip()); print(len(data), hashlib.sha256(data).hexdigest())
";

/// Node 1: `client` and `server` (mesh); node 2: `outsider` (not enrolled). The server runs a
/// TCP echo on 9000 and the half-close server on 9100; only node 1 runs a proxy.
struct Bed {
    topo: Topology,
    n1: Node,
    client: Pod,
    outsider: Pod,
    server: Pod,
    _servers: Vec<Process>,
}

fn bed(name: &str) -> io::Result<Bed> {
    let topo = Topology::new(name)?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let client = topo.add_pod(&n1, "client")?;
    let server = topo.add_pod(&n1, "server")?;
    let outsider = topo.add_pod(&n2, "outsider")?;
    let config = [
        k8s::namespace_yaml("mesh", &[("istio.io/dataplane-mode", "ambient")]),
        k8s::namespace_yaml("plain", &[]),
        k8s::pod_yaml(&client, "mesh", "client", &[("app", "client")]),
        k8s::pod_yaml(&server, "mesh", "server", &[("app", "server")]),
        k8s::pod_yaml(&outsider, "plain", "default", &[("app", "outsider")]),
    ]
    .concat();
    topo.write_config("cluster.yaml", &config)?;
    let port = ANSWER_PORT.to_string();
    let answer = server.spawn("answer", "python3", &["-c", ANSWER_SERVER, &port], &[])?;
    answer.wait_for_log("listening", TIMEOUT)?;
    let servers = vec![server.start_echo_server(EchoKind::Tcp, 9000)?, answer];
    Ok(Bed { topo, n1, client, outsider, server, _servers: servers })
}

/// `strait_fast_path_connections_total` of node 1's proxy.
fn fast_path_connections(node: &Node) -> io::Result<u64> {
    Ok(proxy_metric(node, "strait_fast_path_connections_total")?.unwrap_or(0))
}

/// The fast path's checks from `from`: a 64 MiB echo arrives intact and both access-line counts
/// are exact; a half-closed connection still gets the server's answer; the fast path was taken.
fn transfers_intact_and_counted(b: &Bed, proxy: &Process, from: &Pod) -> io::Result<()> {
    let before = fast_path_connections(&b.n1)?;
    let target = format!("{}:9000", b.server.ip());
    let bytes = BULK.to_string();
    let out = from.run_ok(bin_path("strait-echo"), &["send", &target, "--bytes", &bytes])?;
    assert!(out.contains(&format!("sent={BULK} received={BULK} ")), "{out}");
    let src = format!("src.addr={}:", from.ip());
    let line = wait_access_line(proxy, &["inbound", &src, &format!("dst.addr={target}")], TIMEOUT)?;
    assert!(line.contains(&format!(" sent={BULK} received={BULK} ")), "{line}");
    assert!(line.contains("result=ok"), "{line}");

    // Half-close: the server answers only after the client's end of stream reached it.
    let out = from.run_ok(
        "python3",
        &["-c", HALF_CLOSE_CLIENT, &b.server.ip().to_string(), &ANSWER_PORT.to_string(), HALF_CLOSE_BYTES],
    )?;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0], lines[1], "the server's count and digest of what the client sent");
    let answer_len = lines[0].len() + 1;
    let line =
        wait_access_line(proxy, &["inbound", &src, &format!("dst.addr={}:{ANSWER_PORT}", b.server.ip())], TIMEOUT)?;
    assert!(line.contains(&format!(" sent={HALF_CLOSE_BYTES} received={answer_len} ")), "{line}");

    let after = fast_path_connections(&b.n1)?;
    assert!(after >= before + 2, "the fast path was not taken: {before} then {after}");
    Ok(())
}

fn deny(name: &str, source: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: mesh\n\
         spec:\n  selector:\n    matchLabels: {{app: server}}\n  action: DENY\n  rules:\n  - from:\n    - source:\n        {source}\n"
    )
}

/// L4-7 on the fast path: a held connection is closed once a policy denies it.
fn late_rejection_closes(b: &Bed, proxy: &Process, from: &Pod, policy: &str) -> io::Result<()> {
    let target = format!("{}:9000", b.server.ip());
    let hold = from.spawn("hold", bin_path("strait-echo"), &["hold", &target, "--secs", "20"], &[])?;
    hold.wait_for_log("ok 3", TIMEOUT)?;
    let before = fast_path_connections(&b.n1)?;
    assert!(before > 0, "the held connection is on the fast path");
    let written = Instant::now();
    apply(&b.topo, &[proxy], "policy.yaml", policy)?;
    let status = hold.wait_exit(Duration::from_secs(5)).expect("the held connection is closed");
    assert!(!status.success(), "{}", hold.log_tail());
    assert!(hold.log().contains("broken after"), "{}", hold.log_tail());
    assert!(written.elapsed() < Duration::from_millis(1500), "closed {:?} after the policy", written.elapsed());
    wait_access_line(proxy, &["inbound", "late rejection", &format!("src.addr={}:", from.ip())], TIMEOUT)?;
    Ok(())
}

// CAP-1, OBS-1, OBS-2, L4-7: same-node pod → pod (no waypoint, policy allows) moves in the kernel.
#[test]
fn same_node_connections_take_the_fast_path() -> io::Result<()> {
    let b = bed("fast_path::same_node")?;
    let p1 = start_node(&b.topo, &b.n1, &ca_dir(&b.topo, "ca"), &[])?;
    transfers_intact_and_counted(&b, &p1, &b.client)?;
    let policy = deny("deny-client", "principals: [cluster.local/ns/mesh/sa/client]");
    late_rejection_closes(&b, &p1, &b.client, &policy)
}

// CAP-2, L4-4, OBS-1, OBS-2, L4-7: PERMISSIVE plaintext from outside the mesh moves in the kernel too.
#[test]
fn permissive_plaintext_takes_the_fast_path() -> io::Result<()> {
    let b = bed("fast_path::plaintext")?;
    let p1 = start_node(&b.topo, &b.n1, &ca_dir(&b.topo, "ca"), &[])?;
    transfers_intact_and_counted(&b, &p1, &b.outsider)?;
    let policy = deny("deny-outsider", &format!("ipBlocks: [\"{}/32\"]", b.outsider.ip()));
    late_rejection_closes(&b, &p1, &b.outsider, &policy)
}

// OBS-1: `--fast-path off` (the operator's escape hatch) copies in user space, counted as such.
#[test]
fn fast_path_off_copies_in_user_space() -> io::Result<()> {
    let b = bed("fast_path::off")?;
    let p1 = start_node(&b.topo, &b.n1, &ca_dir(&b.topo, "ca"), &["--fast-path", "off"])?;
    let target = format!("{}:9000", b.server.ip());
    let out = b.client.run_ok(bin_path("strait-echo"), &["send", &target, "--bytes", "1048576"])?;
    assert!(out.contains("sent=1048576 received=1048576 "), "{out}");
    let line = wait_access_line(&p1, &["inbound", &format!("dst.addr={target}")], TIMEOUT)?;
    assert!(line.contains(" sent=1048576 received=1048576 "), "{line}");
    assert_eq!(fast_path_connections(&b.n1)?, 0);
    Ok(())
}
