//! Shared pieces of strait's end-to-end tests: starting node proxies in a topology and reading
//! what they report.

#![allow(dead_code)] // each test file uses a different subset

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use strait_proto::prost_types::{Struct, Value, value::Kind};
use strait_testbed::{Node, Pod, Process, Topology, bin_path, k8s};

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Starts `strait node` on `node` with the topology's config directory and a CA directory, and
/// waits until it is ready.
pub fn start_node(topo: &Topology, node: &Node, ca_dir: &Path, extra: &[&str]) -> io::Result<Process> {
    start_node_with_config(topo, node, &topo.config_dir(), ca_dir, extra)
}

pub fn start_node_with_config(
    topo: &Topology,
    node: &Node,
    config_dir: &Path,
    ca_dir: &Path,
    extra: &[&str],
) -> io::Result<Process> {
    let mut extra = extra.to_vec();
    extra.push("--detach-on-exit");
    start_node_raw(topo, node, config_dir, ca_dir, &extra)
}

/// Like `start_node`, but capture stays in place when the proxy stops (the production default),
/// for restart tests.
pub fn start_node_keeping_capture(topo: &Topology, node: &Node, ca_dir: &Path) -> io::Result<Process> {
    start_node_raw(topo, node, &topo.config_dir(), ca_dir, &[])
}

fn start_node_raw(
    topo: &Topology,
    node: &Node,
    config_dir: &Path,
    ca_dir: &Path,
    extra: &[&str],
) -> io::Result<Process> {
    let (config, ca) = (config_dir.to_string_lossy(), ca_dir.to_string_lossy());
    let mut args = vec!["--config", &config, "--ca-dir", &ca];
    args.extend_from_slice(extra);
    spawn_node(topo, node, &args)
}

/// Starts `strait node --node <node> --bpf-pin-dir <its pins> ARGS` and waits until it is ready.
pub fn spawn_node(topo: &Topology, node: &Node, extra: &[&str]) -> io::Result<Process> {
    let strait = bin_path("strait");
    let pins = node.bpf_pin_dir().to_string_lossy().into_owned();
    let mut args = vec!["node", "--node", node.name(), "--bpf-pin-dir", &pins];
    args.extend_from_slice(extra);
    // A restarted proxy appends to the same log: wait for a new "ready" line, not an old one.
    let log_name = format!("strait-{}", node.name());
    let earlier = std::fs::read_to_string(topo.dir().join(format!("{log_name}.log")))
        .map(|l| l.matches("strait node ready").count())
        .unwrap_or(0);
    let proxy = node.spawn(&log_name, &strait, &args, &[("STRAIT_LOG", "info")])?;
    let deadline = Instant::now() + TIMEOUT;
    while proxy.count_log_lines("strait node ready") <= earlier {
        if Instant::now() > deadline || !proxy.is_running() {
            return Err(io::Error::other(format!("strait node did not become ready:\n{}", proxy.log_tail())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(proxy)
}

/// A fresh CA directory inside the topology's directory.
pub fn ca_dir(topo: &Topology, name: &str) -> PathBuf {
    topo.dir().join(name)
}

/// The capture counters a node proxy reports on its admin endpoint.
pub fn capture_stats(node: &Node) -> io::Result<HashMap<String, u64>> {
    let text = node.run_ok("curl", &["-sS", "--max-time", "5", "http://127.0.0.1:15000/stats"])?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(": "))
        .filter_map(|(k, v)| Some((k.strip_prefix("strait.capture.")?.to_owned(), v.trim().parse().ok()?)))
        .collect())
}

pub fn stat(node: &Node, name: &str) -> u64 {
    capture_stats(node).ok().and_then(|s| s.get(name).copied()).unwrap_or(0)
}

/// Access lines (`outbound tcp ...` / `inbound tcp ...`) of a proxy containing all `needles`.
pub fn access_lines(proxy: &Process, needles: &[&str]) -> Vec<String> {
    proxy
        .log()
        .lines()
        .filter(|l| l.contains(" tcp src.addr=") && needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

/// Waits until a proxy wrote `count` access lines containing all `needles` (a line is written
/// when its connection has closed on both sides, a moment after the client has its answer).
pub fn wait_access_lines(proxy: &Process, needles: &[&str], count: usize, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    while access_lines(proxy, needles).len() < count {
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "fewer than {count} access lines with {needles:?} within {timeout:?}; log ends with:\n{}",
                proxy.log_tail()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Waits for an access line containing all `needles`.
pub fn wait_access_line(proxy: &Process, needles: &[&str], timeout: Duration) -> io::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(line) = access_lines(proxy, needles).into_iter().next() {
            return Ok(line);
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "no access line with {needles:?} within {timeout:?}; log ends with:\n{}",
                proxy.log_tail()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes `file` into the topology's config directory and waits until every proxy applied it.
pub fn apply(topo: &Topology, proxies: &[&Process], file: &str, yaml: &str) -> io::Result<()> {
    topo.apply_config(file, yaml, proxies)
}

pub const MESH: &str = "mesh";
pub const PLAIN: &str = "plain";

/// Two nodes, an enrolled client pod on node 1 and a server pod on node 2.
pub struct TwoNodes {
    pub topo: Topology,
    pub n1: Node,
    pub n2: Node,
    pub client: Pod,
    pub server: Pod,
}

impl TwoNodes {
    pub fn new(name: &str) -> io::Result<TwoNodes> {
        let topo = Topology::new(name)?;
        let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
        let client = topo.add_pod(&n1, "client")?;
        let server = topo.add_pod(&n2, "server")?;
        Ok(TwoNodes { topo, n1, n2, client, server })
    }

    /// The `mesh` (enrolled) and `plain` namespaces, the client as `mesh/client`, and the server
    /// in the mesh with service account `server_sa` and `app=server` plus `server_labels`.
    pub fn config(&self, server_sa: &str, server_labels: &[(&str, &str)]) -> String {
        let mut labels = vec![("app", "server")];
        labels.extend_from_slice(server_labels);
        [
            k8s::namespace_yaml(MESH, &[("istio.io/dataplane-mode", "ambient")]),
            k8s::namespace_yaml(PLAIN, &[]),
            k8s::pod_yaml(&self.client, MESH, "client", &[("app", "client")]),
            k8s::pod_yaml(&self.server, MESH, server_sa, &labels),
        ]
        .concat()
    }

    /// Node proxies on both nodes, sharing one CA directory.
    pub fn start_proxies(&self, extra: &[&str]) -> io::Result<(Process, Process)> {
        let ca = ca_dir(&self.topo, "ca");
        Ok((start_node(&self.topo, &self.n1, &ca, extra)?, start_node(&self.topo, &self.n2, &ca, extra)?))
    }
}

/// The label Istio puts on a waypoint's pods, naming their waypoint.
pub const WAYPOINT_POD_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// Starts `strait waypoint` named `name` in namespace `namespace` in `pod` (a pod of the
/// topology that nothing captures) and waits until it is ready.
pub fn start_waypoint(topo: &Topology, pod: &Pod, ca_dir: &Path, name: &str, namespace: &str) -> io::Result<Process> {
    start_waypoint_with(topo, pod, ca_dir, name, namespace, &[])
}

/// Like `start_waypoint`, with `extra` arguments (limits, timeouts).
pub fn start_waypoint_with(
    topo: &Topology,
    pod: &Pod,
    ca_dir: &Path,
    name: &str,
    namespace: &str,
    extra: &[&str],
) -> io::Result<Process> {
    let (config, ca) = (topo.config_dir(), ca_dir.to_string_lossy().into_owned());
    let config = config.to_string_lossy().into_owned();
    let mut args = vec!["--config", &config, "--ca-dir", &ca];
    args.extend_from_slice(extra);
    spawn_waypoint(pod, name, namespace, &args)
}

/// Starts `strait waypoint --name <name> --namespace <namespace> ARGS` in `pod` and waits until
/// it is ready.
pub fn spawn_waypoint(pod: &Pod, name: &str, namespace: &str, extra: &[&str]) -> io::Result<Process> {
    let strait = bin_path("strait");
    let mut args = vec!["waypoint", "--name", name, "--namespace", namespace];
    args.extend_from_slice(extra);
    let proxy = pod.spawn(&format!("waypoint-{name}"), &strait, &args, &[("STRAIT_LOG", "info")])?;
    let deadline = Instant::now() + TIMEOUT;
    while proxy.count_log_lines("strait waypoint ready") == 0 {
        if Instant::now() > deadline || !proxy.is_running() {
            return Err(io::Error::other(format!("strait waypoint did not become ready:\n{}", proxy.log_tail())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(proxy)
}

/// HTTP request lines (`waypoint http ...`) of a waypoint containing all `needles`.
pub fn request_lines(proxy: &Process, needles: &[&str]) -> Vec<String> {
    proxy
        .log()
        .lines()
        .filter(|l| l.contains(" waypoint http ") && needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

/// Waits until a waypoint logged `count` request lines containing all `needles`.
pub fn wait_request_lines(proxy: &Process, needles: &[&str], count: usize) -> io::Result<Vec<String>> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let lines = request_lines(proxy, needles);
        if lines.len() >= count {
            return Ok(lines);
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "fewer than {count} request lines with {needles:?}; waypoint log ends with:\n{}",
                proxy.log_tail()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A namespace in the mesh whose services go through a waypoint: a client and the waypoint's
/// pod on node 1, backends on node 2, node proxies on both, the waypoint running.
pub struct WaypointMesh {
    pub topo: Topology,
    pub n1: Node,
    pub n2: Node,
    pub client: Pod,
    pub waypoint_pod: Pod,
    pub backends: Vec<Pod>,
    pub ca: PathBuf,
}

/// The namespace of `WaypointMesh`.
pub const APP_NS: &str = "shop";

impl WaypointMesh {
    /// Builds the topology with one backend pod per name (not started, not configured).
    pub fn new(test: &str, backends: &[&str]) -> io::Result<WaypointMesh> {
        let topo = Topology::new(test)?;
        let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
        let client = topo.add_pod(&n1, "client")?;
        let waypoint_pod = topo.add_pod(&n1, "waypoint")?;
        let backends = backends.iter().map(|b| topo.add_pod(&n2, b)).collect::<io::Result<Vec<_>>>()?;
        let ca = ca_dir(&topo, "ca");
        Ok(WaypointMesh { topo, n1, n2, client, waypoint_pod, backends, ca })
    }

    /// The namespace (ambient, using waypoint `waypoint`), the client and the waypoint's pod.
    pub fn base_config(&self) -> String {
        [
            k8s::namespace_yaml(
                APP_NS,
                &[("istio.io/dataplane-mode", "ambient"), ("istio.io/use-waypoint", "waypoint")],
            ),
            k8s::pod_yaml(&self.client, APP_NS, "client", &[("app", "client")]),
            k8s::pod_yaml(&self.waypoint_pod, APP_NS, "waypoint", &[(WAYPOINT_POD_LABEL, "waypoint")]),
        ]
        .concat()
    }

    /// Starts both node proxies and the waypoint.
    pub fn start(&self) -> io::Result<(Process, Process, Process)> {
        self.start_with(&[])
    }

    /// Starts both node proxies and the waypoint, the waypoint with `waypoint_args`.
    pub fn start_with(&self, waypoint_args: &[&str]) -> io::Result<(Process, Process, Process)> {
        let p1 = start_node(&self.topo, &self.n1, &self.ca, &[])?;
        let p2 = start_node(&self.topo, &self.n2, &self.ca, &[])?;
        let wp = start_waypoint_with(&self.topo, &self.waypoint_pod, &self.ca, "waypoint", APP_NS, waypoint_args)?;
        Ok((p1, p2, wp))
    }
}

/// The `reviews` service's VIP in `WaypointMesh` tests.
pub const REVIEWS_VIP: &str = "10.96.0.30";

/// Backends `reviews-v1`, `reviews-v2`, ... (pods named so, labelled `app=reviews,
/// version=vN`), the `reviews` service on port 9080 (named `http`), and a DestinationRule with
/// a subset per version: Bookinfo's reviews, as the seed tasks use it.
pub fn reviews_config(m: &WaypointMesh) -> String {
    let mut yaml = m.base_config();
    let mut subsets = String::new();
    for pod in &m.backends {
        let version = pod.name().rsplit('-').next().unwrap_or("v1");
        yaml.push_str(&k8s::pod_yaml(pod, APP_NS, "reviews", &[("app", "reviews"), ("version", version)]));
        subsets.push_str(&format!("  - name: {version}\n    labels:\n      version: {version}\n"));
    }
    yaml.push_str(&k8s::named_service_yaml(
        "reviews",
        APP_NS,
        REVIEWS_VIP,
        &[("http", 9080, 9080)],
        &[("app", "reviews")],
        &[],
    ));
    yaml.push_str(&format!(
        "---\napiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\nmetadata:\n  name: reviews\n  namespace: {APP_NS}\nspec:\n  host: reviews\n  subsets:\n{subsets}"
    ));
    yaml
}

/// Starts one HTTP echo server per backend on `port`, named after its pod.
pub fn start_backends(m: &WaypointMesh, port: u16) -> io::Result<Vec<Process>> {
    m.backends
        .iter()
        .map(|pod| pod.echo_server(strait_testbed::EchoKind::Http, port).name(pod.name()).start())
        .collect()
}

/// `strait control` on a node of its own (reachable from every node over the underlay),
/// serving the topology's configuration directory, with its CA and bootstrap tokens in the
/// topology's directory.
pub struct Control {
    pub node: Node,
    pub ca_dir: PathBuf,
    pub tokens: PathBuf,
}

impl Control {
    pub fn new(topo: &Topology, node: Node) -> Control {
        Control { node, ca_dir: topo.dir().join("control-ca"), tokens: topo.dir().join("tokens") }
    }

    /// The address proxies follow: the node's IP, which the control plane's certificate names.
    pub fn address(&self) -> String {
        format!("https://{}:15012", self.node.ip())
    }

    /// Starts `strait control` (again, after a stop) and waits until it is ready.
    pub fn start(&self, topo: &Topology, extra: &[&str]) -> io::Result<Process> {
        let (config, ca, tokens) = (topo.config_dir(), self.ca_dir.to_string_lossy(), self.tokens.to_string_lossy());
        let config = config.to_string_lossy();
        let listen = format!("{}:15012", self.node.ip());
        let mut args =
            vec!["control", "--config", &config, "--listen", &listen, "--ca-dir", &ca, "--bootstrap-tokens", &tokens];
        args.extend_from_slice(extra);
        let earlier = std::fs::read_to_string(topo.dir().join("strait-control.log"))
            .map(|l| l.matches("strait control ready").count())
            .unwrap_or(0);
        let control = self.node.spawn("strait-control", bin_path("strait"), &args, &[("STRAIT_LOG", "info")])?;
        let deadline = Instant::now() + TIMEOUT;
        while control.count_log_lines("strait control ready") <= earlier {
            if Instant::now() > deadline || !control.is_running() {
                return Err(io::Error::other(format!("strait control did not become ready:\n{}", control.log_tail())));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(control)
    }

    /// Starts `strait control --kubernetes` against `api` (its admin kubeconfig) with `extra`
    /// arguments, the Lease in namespace `default`, and waits until it is ready and leads.
    pub fn start_kubernetes(
        &self,
        topo: &Topology,
        api: &strait_testbed::kube::KubeApi,
        extra: &[&str],
    ) -> io::Result<Process> {
        let (ca, tokens) = (self.ca_dir.to_string_lossy(), self.tokens.to_string_lossy());
        let listen = format!("{}:15012", self.node.ip());
        let mut args =
            vec!["control", "--kubernetes", "--listen", &listen, "--ca-dir", &ca, "--bootstrap-tokens", &tokens];
        // Only the leader writes: the Lease goes in a namespace that exists here, as the pod's
        // own does in a cluster.
        args.extend_from_slice(&["--leader-election-namespace", "default"]);
        args.extend_from_slice(extra);
        let kubeconfig = api.kubeconfig().to_string_lossy().into_owned();
        let env = [("STRAIT_LOG", "info"), ("KUBECONFIG", kubeconfig.as_str())];
        let process = self.node.spawn("strait-control", bin_path("strait"), &args, &env)?;
        process
            .wait_for_log("strait control ready", TIMEOUT)
            .map_err(|e| io::Error::other(format!("{e}: {}\n{}", process.log_tail(), topo.dir().display())))?;
        process.wait_for_log("leader election: leading", TIMEOUT)?;
        Ok(process)
    }

    /// Writes a bootstrap token for `holder` (`nodes/<node>` or `serviceaccounts/<ns>/<sa>`);
    /// returns the file, which the proxy reads too (--ca-token-file).
    pub fn token(&self, holder: &str) -> io::Result<PathBuf> {
        let path = self.tokens.join(holder);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        std::fs::write(&path, format!("{}-{}-{nanos}\n", holder.replace('/', "-"), std::process::id()))?;
        // The control plane re-reads its token directory on a miss at most every 100 ms
        // (`TOKENS_REFRESH_ON_MISS`): a token presented sooner after another proxy's lookup is
        // refused, and a waypoint refused its first certificate exits.
        std::thread::sleep(Duration::from_millis(150));
        Ok(path)
    }

    /// The arguments that make a proxy follow this control plane with `token`.
    pub fn follow_args(&self, token: &Path) -> Vec<String> {
        vec![
            "--xds-address".into(),
            self.address(),
            "--ca-root".into(),
            self.ca_dir.join("root-cert.pem").to_string_lossy().into_owned(),
            "--ca-token-file".into(),
            token.to_string_lossy().into_owned(),
        ]
    }

    /// `strait node` on `node`, following this control plane with the node's token.
    pub fn start_node(&self, topo: &Topology, node: &Node) -> io::Result<Process> {
        let token = self.token(&format!("nodes/{}", node.name()))?;
        let args = self.follow_args(&token);
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.push("--detach-on-exit");
        spawn_node(topo, node, &args)
    }

    /// `strait waypoint` in `pod`, following this control plane with its service account's
    /// token.
    pub fn start_waypoint(&self, pod: &Pod, name: &str, namespace: &str) -> io::Result<Process> {
        let token = self.token(&format!("serviceaccounts/{namespace}/{name}"))?;
        let args = self.follow_args(&token);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn_waypoint(pod, name, namespace, &args)
    }

    /// A counter of the control plane's `/metrics` (0 when absent).
    pub fn metric(&self, name: &str, labels: &str) -> io::Result<u64> {
        let text = self.node.run_ok("curl", &["-sS", "--max-time", "5", "http://127.0.0.1:15014/metrics"])?;
        let prefix = format!("{name}{{{labels}}} ");
        Ok(text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0))
    }
}

/// A certificate signing request for a fresh P-256 key, as a CA API request carries it.
pub fn csr() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.serialize_request(&key).and_then(|c| c.pem()).expect("csr")
}

/// The CA API metadata asking for `identity` (node mode).
pub fn impersonating(identity: &str) -> Option<Struct> {
    let value = Value { kind: Some(Kind::StringValue(identity.to_owned())) };
    Some(Struct { fields: [("ImpersonatedIdentity".to_owned(), value)].into() })
}

/// The subject and subjectAltName of the first certificate of a PEM chain, as openssl prints
/// them.
pub fn certificate_text(pem: &str) -> String {
    let path = std::env::temp_dir().join(format!("strait-control-test-{}-{}.pem", std::process::id(), pem.len()));
    std::fs::write(&path, pem).expect("write");
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-ext", "subjectAltName", "-in"])
        .arg(&path)
        .output()
        .expect("openssl");
    let _ = std::fs::remove_file(&path);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts `strait gateway` in `pod` as process `name`, with `args` (after `gateway`), and waits
/// until it is ready.
pub fn spawn_gateway(pod: &Pod, name: &str, args: &[&str]) -> io::Result<Process> {
    let mut all = vec!["gateway"];
    all.extend_from_slice(args);
    let gw = pod.spawn(name, bin_path("strait"), &all, &[("STRAIT_LOG", "info")])?;
    let deadline = Instant::now() + TIMEOUT;
    while gw.count_log_lines("strait gateway ready") == 0 {
        if Instant::now() > deadline || !gw.is_running() {
            return Err(io::Error::other(format!("strait gateway did not become ready:\n{}", gw.log_tail())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(gw)
}

/// `strait gateway --labels istio=ingressgateway` reading the topology's directory, with the CA
/// of `ca_dir(topo, "ca")` and `extra` arguments.
pub fn start_ingress_gateway(topo: &Topology, pod: &Pod, extra: &[&str]) -> io::Result<Process> {
    let config = topo.config_dir().to_string_lossy().into_owned();
    let ca = ca_dir(topo, "ca").to_string_lossy().into_owned();
    let mut args = vec!["--config", &config, "--ca-dir", &ca, "--labels", "istio=ingressgateway"];
    args.extend_from_slice(extra);
    spawn_gateway(pod, "gateway", &args)
}

/// The value of one sample of a node proxy's `/metrics`, `sample` being its name and labels as
/// written (`strait_hbone_pool_connections`, `name_total{reason="x"}`); `None` when absent.
pub fn proxy_metric(node: &Node, sample: &str) -> io::Result<Option<u64>> {
    let text = node.run_ok("curl", &["-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"])?;
    let prefix = format!("{sample} ");
    Ok(text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()))
}

/// Connections a node proxy refused under REGISTRY_ONLY (`strait_outbound_refused_total`).
pub fn registry_only_refusals(node: &Node) -> io::Result<u64> {
    Ok(proxy_metric(node, "strait_outbound_refused_total{reason=\"registry_only\"}")?.unwrap_or(0))
}

/// Starts `strait gateway --labels istio=egressgateway --namespace istio-system --hbone` in
/// `pod` reading the topology's directory, with the mesh's CA (directory `ca`) and `extra`
/// arguments.
pub fn start_egress_gateway(topo: &Topology, pod: &Pod, ca: &Path, extra: &[&str]) -> io::Result<Process> {
    let config = topo.config_dir().to_string_lossy().into_owned();
    let ca = ca.to_string_lossy().into_owned();
    let mut args = vec![
        "--config",
        &config,
        "--ca-dir",
        &ca,
        "--labels",
        "istio=egressgateway",
        "--namespace",
        "istio-system",
        "--hbone",
    ];
    args.extend_from_slice(extra);
    spawn_gateway(pod, "egressgateway", &args)
}

/// Waits for a line of `process`'s log containing all `needles` (any line, not only access lines).
pub fn wait_log_line(process: &Process, needles: &[&str]) -> io::Result<String> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(line) = process.log().lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return Ok(line.to_owned());
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!("no line with {needles:?}; log ends with:\n{}", process.log_tail())));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// openssl, run in `dir`; fails the test when it fails.
pub fn openssl(dir: &Path, args: &[&str]) -> io::Result<()> {
    let out = Command::new("openssl").args(args).current_dir(dir).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr))));
    }
    Ok(())
}

/// A test CA `<name>.crt|key` in `dir`.
pub fn make_ca(dir: &Path, name: &str) -> io::Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
    )
}

/// A leaf for `host` signed by CA `ca`, written to `out_dir/tls.crt|tls.key`.
pub fn make_leaf(dir: &Path, ca: &str, host: &str, out_dir: &Path) -> io::Result<()> {
    fs::create_dir_all(out_dir)?;
    let (key, csr, crt, ext) =
        (format!("{host}.key"), format!("{host}.csr"), format!("{host}.crt"), format!("{host}.ext"));
    fs::write(dir.join(&ext), format!("subjectAltName=DNS:{host}\nextendedKeyUsage=serverAuth,clientAuth\n"))?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={host}"),
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ],
    )?;
    // Written whole then renamed, as a secret volume swaps its files.
    for (from, to) in [(&crt, "tls.crt"), (&key, "tls.key")] {
        let tmp = out_dir.join(format!(".{to}.tmp"));
        fs::copy(dir.join(from), &tmp)?;
        fs::rename(&tmp, out_dir.join(to))?;
    }
    Ok(())
}

/// Checks the HBONE tunnels a capture of the underlay saw (L4-6): at least one segment to port
/// 15008 carries data, every segment to port 15008 goes from `from` to `to`, and every answer
/// from port 15008 from `to` back to `from`.
pub fn assert_tunnels_between(
    segments: &[strait_testbed::pcap::Segment],
    from: std::net::Ipv4Addr,
    to: std::net::Ipv4Addr,
) {
    let to_hbone: Vec<_> = segments.iter().filter(|s| s.dst.port() == 15008).collect();
    assert!(to_hbone.iter().any(|s| !s.payload.is_empty()), "no tunnel crossed the underlay: {segments:?}");
    for s in &to_hbone {
        assert_eq!((*s.src.ip(), *s.dst.ip()), (from, to), "a tunnel segment from {from} to {to}:15008: {s:?}");
        assert_ne!(s.src.port(), 15008, "{s:?}");
    }
    let answers: Vec<_> = segments.iter().filter(|s| s.src.port() == 15008).collect();
    assert!(!answers.is_empty(), "no answer from {to}:15008 crossed the underlay: {segments:?}");
    for s in &answers {
        assert_eq!((*s.src.ip(), *s.dst.ip()), (to, from), "answers go back to {from}: {s:?}");
    }
}

/// A pod for the API server: created on `pod`'s node with `labels` and service account `sa`,
/// then given `pod`'s IP as a kubelet would.
pub fn create_kube_pod(
    api: &strait_testbed::kube::KubeApi,
    pod: &Pod,
    name: &str,
    ns: &str,
    sa: &str,
    labels: &[(impl AsRef<str>, impl AsRef<str>)],
) -> io::Result<()> {
    let labels: String = labels.iter().map(|(k, v)| format!("\n    {}: \"{}\"", k.as_ref(), v.as_ref())).collect();
    api.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:{labels}\nspec:\n  \
         nodeName: {}\n  serviceAccountName: {sa}\n  containers:\n  - name: app\n    image: example.invalid/app:1\n",
        pod.node_name()
    ))?;
    api.set_pod_status(ns, name, &pod.ip().to_string(), &pod.node_ip().to_string())
}
