//! `strait demo` (OPS-1): a live mesh on this machine. Two nodes and their pods are built out
//! of network namespaces, a node proxy runs on each, and each step shows one capability working
//! with real traffic: capture, mTLS over HBONE with both identities, the original source IP,
//! service load balancing, what stays outside the mesh, L4 policy, through a waypoint L7
//! routing, fault injection and mirroring, an ingress gateway, egress through ServiceEntries under
//! REGISTRY_ONLY, and a control plane. Everything is removed at the end, also when a step fails.

use std::{collections::BTreeMap, thread, time::Duration};

use anyhow::{Context as _, bail};
use strait_testbed::{EchoKind, Pod, Process, Topology, UnderlayCapture, bin_path, k8s, pcap};

const MESH_NS: &str = "shop";
const PLAIN_NS: &str = "legacy";
const SERVICE_VIP: &str = "10.96.0.10";
const L7_NS: &str = "bookinfo";
const REVIEWS_VIP: &str = "10.96.0.20";
const GATEWAY_NS: &str = "istio-system";
/// The ingress gateway listens on 8080 for its Gateway's port 80, as Istio's does.
const INGRESS_PORT: u16 = 8080;
const BOOKINFO_HOST: &str = "bookinfo.example.com";
const PARTNER_HOST: &str = "api.partner.example";
const UNLISTED_HOST: &str = "elsewhere.example";
const TIMEOUT: Duration = Duration::from_secs(10);

pub fn run() -> anyhow::Result<()> {
    say("building a two-node cluster out of network namespaces");
    let topo = Topology::new("demo").context("cannot build the demo topology (run as root)")?;
    let (node1, node2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let sleep = topo.add_pod(&node1, "sleep")?;
    let web_v1 = topo.add_pod(&node2, "web-v1")?;
    let web_v2 = topo.add_pod(&node1, "web-v2")?;
    let legacy = topo.add_pod(&node1, "legacy")?;
    let waypoint = topo.add_pod(&node1, "waypoint")?;
    let reviews_v1 = topo.add_pod(&node2, "reviews-v1")?;
    let reviews_v2 = topo.add_pod(&node2, "reviews-v2")?;
    let ingress = topo.add_pod(&node1, "ingress")?;
    // Outside the cluster: a node without strait, its servers named by no configuration.
    let internet = topo.add_node("internet")?;
    let partner = topo.add_pod(&internet, "partner")?;
    let elsewhere = topo.add_pod(&internet, "elsewhere")?;
    let resolver = topo.add_pod(&internet, "dns")?;
    let pods = [
        (&sleep, MESH_NS),
        (&web_v1, MESH_NS),
        (&web_v2, MESH_NS),
        (&legacy, PLAIN_NS),
        (&waypoint, L7_NS),
        (&reviews_v1, L7_NS),
        (&reviews_v2, L7_NS),
        (&ingress, GATEWAY_NS),
    ];
    for (pod, ns) in pods {
        println!("    pod {:<19} {:<12} on {}", format!("{ns}/{}", pod.name()), pod.ip().to_string(), pod.node_name());
    }
    let config = [
        k8s::namespace_yaml(MESH_NS, &[("istio.io/dataplane-mode", "ambient")]),
        k8s::namespace_yaml(PLAIN_NS, &[]),
        k8s::pod_yaml(&sleep, MESH_NS, "sleep", &[("app", "sleep")]),
        k8s::pod_yaml(&web_v1, MESH_NS, "web", &[("app", "web"), ("version", "v1")]),
        k8s::pod_yaml(&web_v2, MESH_NS, "web", &[("app", "web"), ("version", "v2")]),
        k8s::pod_yaml(&legacy, PLAIN_NS, "default", &[("app", "legacy")]),
        k8s::service_yaml("web", MESH_NS, SERVICE_VIP, &[(80, 8080)], &[("app", "web")]),
        bookinfo_config(&waypoint, &reviews_v1, &reviews_v2),
        k8s::namespace_yaml(GATEWAY_NS, &[]),
        k8s::pod_yaml(
            &ingress,
            GATEWAY_NS,
            "istio-ingressgateway",
            &[("istio", "ingressgateway"), ("strait.io/gateway", "true")],
        ),
    ]
    .concat();
    topo.write_config("cluster.yaml", &config)?;
    say(&format!("namespace `{MESH_NS}` is enrolled (istio.io/dataplane-mode=ambient); `{PLAIN_NS}` is not"));

    let _servers = [
        web_v1.start_echo_server(EchoKind::Http, 8080)?,
        web_v2.start_echo_server(EchoKind::Http, 8080)?,
        reviews_v1.echo_server(EchoKind::Http, 9080).name("reviews-v1").start()?,
    ];
    let reviews_v2_server = reviews_v2.echo_server(EchoKind::Http, 9080).name("reviews-v2").start()?;
    let _outside = [
        partner.echo_server(EchoKind::Http, 80).name("partner-api").start()?,
        elsewhere.echo_server(EchoKind::Http, 80).name("elsewhere").start()?,
        resolver
            .start_dns(&[format!("{PARTNER_HOST}={}", partner.ip()), format!("{UNLISTED_HOST}={}", elsewhere.ip())])
            .context("the demo's DNS server did not start")?,
    ];
    // The node proxy on node1 and the `sleep` pod resolve names through that resolver.
    node1.netns().use_resolver(resolver.ip())?;
    sleep.netns().use_resolver(resolver.ip())?;
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

    let waypoint = start_waypoint(&waypoint, &config_dir, &ca_dir)?;
    proxies.push(waypoint);
    l7_steps(&topo, &sleep, &proxies, &reviews_v2_server)?;
    let gateway = ingress_step(&topo, &proxies, &ingress, &legacy)?;
    egress_step(&topo, &proxies, &sleep)?;
    control_plane_step(&topo, &mut proxies, &sleep, &url)?;

    say("done; removing the namespaces and processes");
    drop(gateway);
    drop(proxies);
    drop(topo);
    Ok(())
}

/// Namespace `bookinfo` (enrolled, using waypoint `waypoint`), its waypoint's pod, and two
/// versions of `reviews` behind one service with a subset each.
fn bookinfo_config(waypoint: &Pod, v1: &Pod, v2: &Pod) -> String {
    [
        k8s::namespace_yaml(L7_NS, &[("istio.io/dataplane-mode", "ambient"), ("istio.io/use-waypoint", "waypoint")]),
        k8s::pod_yaml(waypoint, L7_NS, "waypoint", &[("gateway.networking.k8s.io/gateway-name", "waypoint")]),
        k8s::pod_yaml(v1, L7_NS, "reviews", &[("app", "reviews"), ("version", "v1")]),
        k8s::pod_yaml(v2, L7_NS, "reviews", &[("app", "reviews"), ("version", "v2")]),
        k8s::named_service_yaml("reviews", L7_NS, REVIEWS_VIP, &[("http", 9080, 9080)], &[("app", "reviews")], &[]),
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: reviews\n  namespace: {L7_NS}\n\
             spec:\n  host: reviews\n  subsets:\n  - name: v1\n    labels: {{version: v1}}\n  - name: v2\n    labels: {{version: v2}}\n"
        ),
    ]
    .concat()
}

fn start_waypoint(pod: &Pod, config_dir: &std::path::Path, ca_dir: &std::path::Path) -> anyhow::Result<Process> {
    let args = [
        "waypoint",
        "--config",
        config_dir.to_str().unwrap_or_default(),
        "--name",
        "waypoint",
        "--namespace",
        L7_NS,
        "--ca-dir",
        ca_dir.to_str().unwrap_or_default(),
    ];
    let waypoint = pod.spawn("waypoint", bin_path("strait"), &args, &[])?;
    waypoint.wait_for_log("strait waypoint ready", TIMEOUT).context("the waypoint did not start")?;
    Ok(waypoint)
}

/// Steps 6 to 8: L7 routing, fault injection and mirroring at the waypoint.
fn l7_steps(topo: &Topology, sleep: &Pod, proxies: &[Process], mirror_target: &Process) -> anyhow::Result<()> {
    let url = format!("http://{REVIEWS_VIP}:9080/reviews/0");
    let vs = |spec: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\n  namespace: {L7_NS}\nspec:\n  hosts: [reviews]\n  http:\n{spec}"
        )
    };
    let tally = |headers: &[(&str, &str)]| -> anyhow::Result<String> {
        let summary = sleep.echo_get(&url, 20, headers)?;
        let served: Vec<String> = summary
            .served_by
            .iter()
            .map(
                |(who, n)| if who == "-" { format!("{n} from the waypoint itself") } else { format!("{n} from {who}") },
            )
            .collect();
        let statuses: Vec<String> = summary.statuses.iter().map(|(s, n)| format!("{n}×{s}")).collect();
        Ok(format!("{} ({})", statuses.join(" "), served.join(", ")))
    };

    step(
        6,
        &format!("namespace `{L7_NS}` uses a waypoint: a VirtualService sends `end-user: jason` to v2, others to v1"),
    );
    let routing = vs(
        "  - match:\n    - headers:\n        end-user: {exact: jason}\n    route:\n    - destination: {host: reviews, subset: v2}\n  - route:\n    - destination: {host: reviews, subset: v1}\n",
    );
    apply(topo, proxies, "reviews-vs.yaml", &routing)?;
    println!("{}", indent(&routing));
    println!("    sleep: 20 requests as jason -> {}", tally(&[("end-user", "jason")])?);
    println!("    sleep: 20 requests as alice -> {}", tally(&[("end-user", "alice")])?);
    if let Some(waypoint) = proxies.last()
        && let Ok(line) = waypoint.wait_for_log("waypoint http", TIMEOUT)
    {
        println!("    waypoint access log: {}", line.trim());
    }

    step(7, "fault injection: jason's requests are aborted with 500 before reaching any pod");
    let abort = vs(
        "  - fault:\n      abort: {httpStatus: 500, percentage: {value: 100}}\n    match:\n    - headers:\n        end-user: {exact: jason}\n    route:\n    - destination: {host: reviews, subset: v1}\n  - route:\n    - destination: {host: reviews, subset: v1}\n",
    );
    apply(topo, proxies, "reviews-vs.yaml", &abort)?;
    println!("    sleep: 20 requests as jason -> {}", tally(&[("end-user", "jason")])?);
    println!("    sleep: 20 requests as alice -> {}", tally(&[("end-user", "alice")])?);

    step(8, "mirroring: v1 answers, v2 gets a copy of each request (Host: reviews-shadow), off the client's path");
    let mirror = vs(
        "  - route:\n    - destination: {host: reviews, subset: v1}\n    mirror: {host: reviews, subset: v2}\n    mirrorPercentage: {value: 100}\n",
    );
    apply(topo, proxies, "reviews-vs.yaml", &mirror)?;
    let before = mirror_target.count_log_lines("host=reviews-shadow");
    let summary = sleep.echo_get(&url, 20, &[("Host", "reviews:9080")])?;
    thread::sleep(Duration::from_millis(500));
    let mirrored = mirror_target.count_log_lines("host=reviews-shadow") - before;
    println!(
        "    sleep: 20 requests -> {} answered by reviews-v1; reviews-v2 received {mirrored} mirrored copies",
        summary.served("reviews-v1")
    );
    Ok(())
}

/// Step 9: `strait gateway` as the ingress gateway: a client outside the mesh reaches `reviews`
/// by Host through it; the gateway carries the request over HBONE as its own identity.
fn ingress_step(topo: &Topology, proxies: &[Process], gw_pod: &Pod, outside: &Pod) -> anyhow::Result<Process> {
    step(9, &format!("an ingress gateway: `strait gateway` serves a Gateway for {BOOKINFO_HOST} to clients outside"));
    let routing = format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: bookinfo-gateway\n  namespace: {L7_NS}\n\
         spec:\n  selector:\n    istio: ingressgateway\n  servers:\n  - port: {{number: 80, name: http, protocol: HTTP}}\n    \
         hosts: [{BOOKINFO_HOST}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  \
         name: bookinfo\n  namespace: {L7_NS}\nspec:\n  hosts: [{BOOKINFO_HOST}]\n  gateways: [bookinfo-gateway]\n  \
         http:\n  - match:\n    - uri: {{prefix: /reviews}}\n    route:\n    - destination: {{host: reviews, subset: v1, \
         port: {{number: 9080}}}}\n"
    );
    apply(topo, proxies, "ingress.yaml", &routing)?;
    println!("{}", indent(&routing));
    let (config_dir, ca_dir) = (topo.config_dir(), topo.dir().join("ca"));
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let port_map = format!("80={INGRESS_PORT}");
    let args = [
        "gateway",
        "--config",
        &path(&config_dir),
        "--labels",
        "istio=ingressgateway",
        "--namespace",
        GATEWAY_NS,
        "--port-map",
        &port_map,
        "--ca-dir",
        &path(&ca_dir),
    ];
    let gateway = gw_pod.spawn("ingressgateway", bin_path("strait"), &args, &[])?;
    gateway.wait_for_log("strait gateway ready", TIMEOUT).context("the ingress gateway did not start")?;
    println!(
        "    ingress$ strait gateway --config cluster/ --labels istio=ingressgateway --namespace {GATEWAY_NS} \
         --port-map {port_map}"
    );
    let base = format!("http://{}:{INGRESS_PORT}", gw_pod.ip());
    let mut failed = false;
    for (host, path, expected) in [
        (BOOKINFO_HOST, "/reviews/0", 200),
        (BOOKINFO_HOST, "/ratings/0", 404),
        ("other.example.com", "/reviews/0", 404),
    ] {
        let reply = outside.curl_args(&["-H", &format!("Host: {host}"), &format!("{base}{path}")])?;
        let answer = if reply.status == 200 { reply.body.trim().to_owned() } else { String::new() };
        println!("    legacy$ curl -H 'Host: {host}' {base}{path}\n    -> {} {answer}", reply.status);
        failed |= reply.status != expected;
    }
    if let Ok(line) = gateway.wait_for_log("/reviews/0", TIMEOUT) {
        println!("    gateway access log: {}", line.trim());
    }
    if let Ok(line) = gateway.wait_for_log("HBONE connection established", TIMEOUT) {
        let line = line.split_once("  INFO ").map_or(line.as_str(), |(_, l)| l).trim().to_owned();
        println!("    gateway log: {line}");
        println!(
            "    (the gateway reached the pod over HBONE as its own SPIFFE identity; reviews saw the gateway's address)"
        );
    }
    if failed {
        bail!("step 9 failed");
    }
    Ok(gateway)
}

/// Step 10: egress under REGISTRY_ONLY: a ServiceEntry lets the mesh reach one external host (its
/// name resolved through the system resolver by the node proxy too); any other is refused.
fn egress_step(topo: &Topology, proxies: &[Process], sleep: &Pod) -> anyhow::Result<()> {
    step(10, &format!("egress: the mesh is REGISTRY_ONLY, a ServiceEntry admits {PARTNER_HOST} and nothing else"));
    let unlisted = format!("http://{UNLISTED_HOST}/");
    let before = sleep.curl(&unlisted, Duration::from_secs(3))?;
    println!("    before: sleep$ curl {unlisted}  -> {} (ALLOW_ANY, Istio's default)", before.status);
    let egress = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio\n  namespace: istio-system\ndata:\n  mesh: |-\n    \
         outboundTrafficPolicy:\n      mode: REGISTRY_ONLY\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata:\n  name: partner-api\n  namespace: {MESH_NS}\nspec:\n  hosts: [{PARTNER_HOST}]\n  ports:\n  - \
         {{number: 80, name: http, protocol: HTTP}}\n  resolution: DNS\n  location: MESH_EXTERNAL\n"
    );
    apply(topo, proxies, "egress.yaml", &egress)?;
    println!("{}", indent(&egress));
    proxies[0]
        .wait_for_log("ServiceEntry host resolved", TIMEOUT)
        .context("the node proxy did not resolve the host")?;
    let partner = format!("http://{PARTNER_HOST}/v1/quote");
    let reply = sleep.curl(&partner, TIMEOUT)?;
    show_reply("sleep", &partner, &reply.status, &reply.body);
    if let Ok(line) = proxies[0].wait_for_log(&format!("dst.service={PARTNER_HOST}"), TIMEOUT) {
        println!("    node1 access log: {}", line.trim());
    }
    let refused = sleep.curl(&unlisted, Duration::from_secs(3))?;
    println!(
        "    sleep$ curl {unlisted}  -> {}",
        if refused.status == 0 { "refused (connection reset)" } else { "allowed (a bug)" }
    );
    if let Ok(line) = proxies[0].wait_for_log("REGISTRY_ONLY", TIMEOUT) {
        println!("    node1 access log: {}", line.trim());
    }
    if !reply.ok() || refused.status != 0 {
        bail!("step 10 failed");
    }
    Ok(())
}

/// Step 11: `strait control` on a node of its own; the node proxies are replaced by ones that
/// follow it (each takes the running one's listeners over, so no connection is refused), and a
/// policy written once to the directory reaches both through it.
fn control_plane_step(topo: &Topology, proxies: &mut [Process], sleep: &Pod, url: &str) -> anyhow::Result<()> {
    step(11, "one control plane: `strait control` compiles the directory once and serves the node proxies over xDS");
    let control_node = topo.add_node("control")?;
    let (config_dir, ca_dir, tokens) = (topo.config_dir(), topo.dir().join("ca"), topo.dir().join("tokens"));
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    std::fs::create_dir_all(tokens.join("nodes"))?;
    let listen = format!("{}:15012", control_node.ip());
    let args = ["control", "--config", &path(&config_dir), "--listen", &listen, "--ca-dir", &path(&ca_dir)];
    let control = control_node.spawn(
        "strait-control",
        bin_path("strait"),
        &[&args[..], &["--bootstrap-tokens", &path(&tokens)]].concat(),
        &[],
    )?;
    control.wait_for_log("strait control ready", TIMEOUT).context("the control plane did not start")?;
    println!("    control$ strait control --config cluster/ --listen {listen} --bootstrap-tokens tokens/");
    let nodes = topo.nodes();
    // The nodes of the cluster (not the control plane's, nor the one standing for the internet).
    for (slot, node) in nodes.iter().filter(|n| n.name().starts_with("node")).enumerate() {
        let token = tokens.join("nodes").join(node.name());
        std::fs::write(&token, format!("demo-token-{}-{}\n", node.name(), std::process::id()))?;
        let xds = format!("https://{listen}");
        let args = [
            "node",
            "--node",
            node.name(),
            "--xds-address",
            &xds,
            "--ca-root",
            &path(&ca_dir.join("root-cert.pem")),
            "--ca-token-file",
            &path(&token),
            "--bpf-pin-dir",
            &path(&node.bpf_pin_dir()),
            "--detach-on-exit",
        ];
        let follower = node.spawn(&format!("strait-{}-xds", node.name()), bin_path("strait"), &args, &[])?;
        follower
            .wait_for_log("strait node ready", TIMEOUT)
            .context("the node proxy following the control plane did not start")?;
        println!(
            "    {}$ strait node --xds-address {xds} ...  (takes the running proxy's listeners over)",
            node.name()
        );
        if let Some(old) = proxies.get_mut(slot) {
            *old = follower;
        }
    }
    for line in
        control.log().lines().filter(|l| l.contains("subscriber connected") || l.contains("to the node proxy of"))
    {
        println!("    control log: {}", line.split_once("  INFO ").map_or(line, |(_, l)| l).trim());
    }
    let deny_sleep = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: no-sleep\n  namespace: {MESH_NS}\n\
         spec:\n  selector:\n    matchLabels: {{app: web}}\n  action: DENY\n  rules:\n  - from:\n    - source:\n        \
         principals: [cluster.local/ns/{MESH_NS}/sa/sleep]\n"
    );
    let followers: Vec<&Process> = proxies.iter().take(2).chain([&control]).collect();
    topo.apply_config("deny-sleep.yaml", &deny_sleep, &followers).context("the policy did not reach the proxies")?;
    let reply = sleep.curl(url, Duration::from_secs(3))?;
    println!("    a DENY for `sleep` written to the directory, pushed by the control plane:");
    println!("    sleep$ curl {url}  -> {}", if reply.ok() { "allowed (a bug)" } else { "refused" });
    topo.remove_config("deny-sleep.yaml")?;
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
