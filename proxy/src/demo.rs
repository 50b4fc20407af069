//! `strait demo` (OPS-1): a live mesh on this machine. Two nodes and their pods are built out
//! of network namespaces, a node proxy runs on each, and each step shows one capability working
//! with real traffic: capture, mTLS over HBONE with both identities, the original source IP,
//! service load balancing, and what stays outside the mesh. Everything is removed at the end,
//! also when a step fails.

use std::{collections::BTreeMap, thread, time::Duration};

use anyhow::{Context as _, bail};
use strait_testbed::{EchoKind, Process, Topology, UnderlayCapture, bin_path, k8s, pcap};

const MESH_NS: &str = "shop";
const PLAIN_NS: &str = "legacy";
const SERVICE_VIP: &str = "10.96.0.10";
const TIMEOUT: Duration = Duration::from_secs(10);

pub fn run() -> anyhow::Result<()> {
    say("building a two-node cluster out of network namespaces");
    let topo = Topology::new("demo").context("cannot build the demo topology (run as root)")?;
    let (node1, node2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let sleep = topo.add_pod(&node1, "sleep")?;
    let web_v1 = topo.add_pod(&node2, "web-v1")?;
    let web_v2 = topo.add_pod(&node1, "web-v2")?;
    let legacy = topo.add_pod(&node1, "legacy")?;
    for (pod, ns) in [(&sleep, MESH_NS), (&web_v1, MESH_NS), (&web_v2, MESH_NS), (&legacy, PLAIN_NS)] {
        println!("    pod {ns}/{:<7} {:<12} on {}", pod.name(), pod.ip().to_string(), pod.node_name());
    }
    let config = [
        k8s::namespace_yaml(MESH_NS, &[("istio.io/dataplane-mode", "ambient")]),
        k8s::namespace_yaml(PLAIN_NS, &[]),
        k8s::pod_yaml(&sleep, MESH_NS, "sleep", &[("app", "sleep")]),
        k8s::pod_yaml(&web_v1, MESH_NS, "web", &[("app", "web"), ("version", "v1")]),
        k8s::pod_yaml(&web_v2, MESH_NS, "web", &[("app", "web"), ("version", "v2")]),
        k8s::pod_yaml(&legacy, PLAIN_NS, "default", &[("app", "legacy")]),
        k8s::service_yaml("web", MESH_NS, SERVICE_VIP, &[(80, 8080)], &[("app", "web")]),
    ]
    .concat();
    topo.write_config("cluster.yaml", &config)?;
    say(&format!("namespace `{MESH_NS}` is enrolled (istio.io/dataplane-mode=ambient); `{PLAIN_NS}` is not"));

    let _servers = [web_v1.start_echo_server(EchoKind::Http, 8080)?, web_v2.start_echo_server(EchoKind::Http, 8080)?];
    let strait = bin_path("strait");
    let ca_dir = topo.dir().join("ca");
    let config_dir = topo.config_dir();
    let mut proxies = Vec::new();
    for node in [&node1, &node2] {
        let pins = node.bpf_pin_dir();
        let args = [
            "node",
            "--config",
            config_dir.to_str().unwrap_or_default(),
            "--node",
            node.name(),
            "--ca-dir",
            ca_dir.to_str().unwrap_or_default(),
            "--bpf-pin-dir",
            pins.to_str().unwrap_or_default(),
            "--detach-on-exit",
        ];
        let proxy = node.spawn(&format!("strait-{}", node.name()), &strait, &args, &[])?;
        proxy.wait_for_log("strait node ready", TIMEOUT).context("the node proxy did not start")?;
        proxies.push(proxy);
    }
    say("started `strait node` on both nodes: eBPF capture loaded, a built-in CA shared through one directory");

    step(1, "an enrolled pod calls a pod on the other node: captured by eBPF, carried over HBONE (mTLS)");
    let url = format!("http://{}:8080/", web_v1.ip());
    let capture = UnderlayCapture::start(&topo)?;
    let reply = sleep.curl(&url, TIMEOUT)?;
    let segments = capture.finish()?;
    let hbone_packets = segments.iter().filter(|s| s.src.port() == 15008 || s.dst.port() == 15008).count();
    let plaintext_seen = segments.iter().any(|s| pcap::contains(&s.payload, b"GET / HTTP"));
    show_reply("sleep", &url, &reply.status, &reply.body);
    let outbound = proxies[0].wait_for_log(&format!("dst.addr={}:8080", web_v1.ip()), TIMEOUT)?;
    let inbound = proxies[1].wait_for_log("inbound tcp", TIMEOUT)?;
    println!("    node1 access log: {}", outbound.trim());
    println!("    node2 access log: {}", inbound.trim());
    println!(
        "    the server saw the client's own address ({}), and both proxies name both SPIFFE identities",
        sleep.ip()
    );
    println!(
        "    on the wire between the nodes: {} TLS packets on port 15008, request in clear text: {}",
        hbone_packets,
        if plaintext_seen { "SEEN (this is a bug)" } else { "never" }
    );
    if !reply.ok() || plaintext_seen {
        bail!("step 1 failed");
    }

    step(2, "a pod in a namespace outside the mesh is not captured");
    let before = proxies[0].count_log_lines("outbound tcp");
    let reply = legacy.curl(&url, TIMEOUT)?;
    show_reply("legacy", &url, &reply.status, &reply.body);
    thread::sleep(Duration::from_millis(300));
    let after = proxies[0].count_log_lines("outbound tcp");
    println!("    node1 proxy access lines before and after: {before} -> {after} (untouched, plain TCP)");

    step(3, &format!("calls to the service web.{MESH_NS} ({SERVICE_VIP}:80) spread over its two pods"));
    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..10 {
        let reply = sleep.curl(&format!("http://{SERVICE_VIP}/"), TIMEOUT)?;
        let who = reply.body.split_whitespace().nth(2).unwrap_or("no answer").to_owned();
        *spread.entry(who).or_default() += 1;
    }
    for (who, n) in &spread {
        println!("    {n:>2} answers from {who}");
    }
    println!("    (web-v2 runs on the same node as the client: that hop stays inside the node proxy)");

    step(4, "an AuthorizationPolicy lets only the `sleep` identity call `web`");
    let allow_sleep = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: web-callers\n  namespace: {MESH_NS}\n\
         spec:\n  selector:\n    matchLabels: {{app: web}}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        \
         principals: [cluster.local/ns/{MESH_NS}/sa/sleep]\n"
    );
    apply(&topo, &proxies, "policy.yaml", &allow_sleep)?;
    println!("{}", indent(&allow_sleep));
    for (name, pod) in [("sleep", &sleep), ("legacy", &legacy)] {
        let reply = pod.curl(&url, Duration::from_secs(3))?;
        let outcome = if reply.ok() { "allowed".to_owned() } else { "refused (connection reset)".to_owned() };
        println!("    {name}$ curl {url}  -> {outcome}");
    }
    if let Ok(line) = proxies[1].wait_for_log("denied", Duration::from_secs(2)) {
        println!("    node2 access log: {}", line.trim());
    }

    step(5, &format!("PeerAuthentication STRICT for namespace `{MESH_NS}`: no plaintext may reach its pods"));
    let strict = format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: {MESH_NS}\nspec:\n  mtls: {{mode: STRICT}}\n"
    );
    apply(&topo, &proxies, "policy.yaml", &[allow_sleep, "---\n".to_owned(), strict].concat())?;
    proxies[1].wait_for_log("XDP guard attached", TIMEOUT)?;
    let reply = legacy.curl(&url, Duration::from_secs(3))?;
    println!("    legacy$ curl {url}  -> {}", if reply.ok() { "allowed (a bug)" } else { "refused" });
    let reply = sleep.curl(&url, Duration::from_secs(3))?;
    println!("    sleep$  curl {url}  -> {} (mTLS over HBONE)", if reply.ok() { "allowed" } else { "refused (a bug)" });
    let drops = topo.nodes()[1].run_ok("curl", &["-s", "http://127.0.0.1:15020/metrics"])?;
    for line in drops.lines().filter(|l| l.starts_with("strait_xdp_drops_total")) {
        println!("    node2 metrics: {line}");
    }

    say("done; removing the namespaces and processes");
    drop(proxies);
    drop(topo);
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("      {l}")).collect::<Vec<_>>().join("\n")
}

fn say(text: &str) {
    println!("\n== {text}");
}

fn step(n: u32, text: &str) {
    println!("\n-- step {n}: {text}");
}

fn show_reply(from: &str, url: &str, status: &u16, body: &str) {
    println!("    {from}$ curl {url}\n    -> {status} {}", body.trim());
}

/// Writes a configuration file and waits until both proxies applied it.
fn apply(topo: &Topology, proxies: &[Process], file: &str, yaml: &str) -> anyhow::Result<()> {
    let proxies: Vec<&Process> = proxies.iter().collect();
    topo.apply_config(file, yaml, &proxies).context("the proxies did not apply the configuration")
}
