//! `strait-bench control` (CFG-3): what the control plane costs. A generated mesh (10,000 pods
//! on 100 nodes, 1,000 services, 500 AuthorizationPolicies; a tenth of that with `--quick`) is
//! compiled and served by `strait control`, followed by 100 simulated node proxies, each a
//! delta-xDS client of its own from the public protos (`strait_testbed::grpc`), on loopback.
//!
//! Measured: time and memory to compile and serve the mesh; time and bytes for every subscriber
//! to get its first state; time and bytes to deliver one pod change to all of them (which must
//! grow with the change, not with the mesh); the control plane's CPU per applied change (changes
//! written 1.5 s apart, as the directory applies a change once it has been quiet for 500 ms,
//! CFG-1, the idle cost of polling the directory taken off); and cluster churn for real: 10 pod
//! changes a second, each in another namespace's file, for 30 s, with the control plane's CPU
//! over the window and each change's delivery time to every subscriber.

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use prost::Message as _;
use serde::Serialize;
use strait_proto::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse},
    },
    prost_types::{Struct, Value, value::Kind},
};
use strait_testbed::grpc;
use tokio::sync::mpsc;

use crate::scenarios::procfs;

const ADDRESS: &str = "type.googleapis.com/istio.workload.Address";
const AUTHORIZATION: &str = "type.googleapis.com/istio.security.Authorization";
const ADS: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const LISTEN: &str = "127.0.0.1:25012";
const METRICS: &str = "127.0.0.1:25014";
const WAIT: Duration = Duration::from_secs(120);

/// How big a mesh to generate.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sizes {
    pub pods: usize,
    pub nodes: usize,
    pub namespaces: usize,
    pub services: usize,
    pub policies: usize,
    pub subscribers: usize,
    /// Pod changes whose CPU is measured, 1.5 s apart.
    pub changes: usize,
    /// Churn: pod changes per second, each in the next namespace's file, for `churn_s`.
    pub churn_per_s: usize,
    pub churn_s: u64,
}

impl Sizes {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                pods: 1_000,
                nodes: 10,
                namespaces: 10,
                services: 100,
                policies: 50,
                subscribers: 20,
                changes: 3,
                churn_per_s: 10,
                churn_s: 5,
            }
        } else {
            Self {
                pods: 10_000,
                nodes: 100,
                namespaces: 100,
                services: 1_000,
                policies: 500,
                subscribers: 100,
                changes: 10,
                churn_per_s: 10,
                churn_s: 30,
            }
        }
    }
}

/// The figures, as `control.json` holds them.
#[derive(Debug, Serialize)]
pub struct ControlReport {
    pub sizes: Sizes,
    /// From start to ready: load, compile, first snapshot.
    pub startup_ms: u64,
    /// Building the first snapshot, as the control plane logs it.
    pub snapshot_ms: u64,
    pub resources: u64,
    pub rss_ready_mib: f64,
    pub rss_serving_mib: f64,
    /// After the changes, seconds later: what serving costs once the first states are sent.
    pub rss_steady_mib: f64,
    /// Until every subscriber held both types.
    pub initial_sync_ms: u64,
    pub initial_bytes_per_subscriber: u64,
    /// One pod's label changed: from the write until every subscriber had the push (the
    /// directory's 500 ms settle included).
    pub change_delivery_ms: u64,
    /// From the snapshot's publication (after settle and compile) to the last subscriber.
    pub change_fanout_ms: u64,
    pub change_bytes_per_subscriber: u64,
    pub change_resources_per_subscriber: u64,
    /// Control plane CPU seconds per applied change (compile, snapshot, pushes), idle taken off.
    pub cpu_per_change_s: f64,
    pub idle_vcpu: f64,
    pub churn: Churn,
}

/// `churn_per_s` pod changes a second for `churn_s`, each in another namespace's file.
#[derive(Debug, Serialize)]
pub struct Churn {
    pub changes: usize,
    /// The control plane's CPU over the churn, in vCPU (CPU seconds / wall seconds).
    pub vcpu: f64,
    /// Snapshots the control plane built during the churn (each one a read of the directory).
    pub snapshots: usize,
    /// From a change's write until every subscriber held it (or a later change of the same
    /// pod): percentiles over the changes, in ms.
    pub delivery_p50_ms: u64,
    pub delivery_p90_ms: u64,
    pub delivery_max_ms: u64,
    /// Changes delivered while the churn went on (the others only after it stopped).
    pub delivered_during: usize,
}

/// One response a subscriber got.
struct Receipt {
    subscriber: usize,
    type_url: String,
    resources: usize,
    /// Names of the resources it carried (not for the first state, which carries them all).
    names: Vec<String>,
    bytes: usize,
    at: Instant,
}

pub fn run(out: &Path, quick: bool) -> anyhow::Result<ControlReport> {
    let sizes = Sizes::new(quick);
    let dir = out.join("control");
    let _ = fs::remove_dir_all(&dir);
    let config = dir.join("config");
    fs::create_dir_all(&config)?;
    for ns in 0..sizes.namespaces {
        fs::write(config.join(format!("ns-{ns}.yaml")), namespace_yaml(&sizes, ns, 0))?;
    }
    let tokens = dir.join("tokens/nodes");
    fs::create_dir_all(&tokens)?;
    for node in 0..sizes.nodes {
        fs::write(tokens.join(format!("node-{node}")), token(node))?;
    }
    eprintln!("strait-bench control: {sizes:?}");

    let started = Instant::now();
    let mut control = Control::start(&dir)?;
    control.wait_for("strait control ready", 1)?;
    let startup_ms = started.elapsed().as_millis() as u64;
    let snapshot_ms = control.last_number("xDS snapshot built", "took_ms=").unwrap_or(0);
    let rss_ready = procfs::rss_bytes(control.pid());
    let resources = control.resource_count();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let root = dir.join("ca/root-cert.pem");
    let addr: SocketAddr = LISTEN.parse()?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Receipt>();
    let sync_started = Instant::now();
    for subscriber in 0..sizes.subscribers {
        let (tx, root) = (tx.clone(), root.clone());
        let node = subscriber % sizes.nodes;
        rt.spawn(async move {
            if let Err(e) = subscribe(addr, &root, subscriber, node, tx).await {
                eprintln!("strait-bench control: subscriber {subscriber}: {e}");
            }
        });
    }
    // Every subscriber gets one response per type first.
    let mut first: Vec<Receipt> = Vec::new();
    while first.len() < 2 * sizes.subscribers {
        let receipt = rt.block_on(async { tokio::time::timeout(WAIT, rx.recv()).await })?;
        first.push(receipt.context("subscribers stopped")?);
    }
    let initial_sync_ms = sync_started.elapsed().as_millis() as u64;
    let initial_bytes: usize = first.iter().map(|r| r.bytes).sum();
    let rss_serving = procfs::rss_bytes(control.pid());

    // One pod change, delivered to all.
    let written = Instant::now();
    let applied_before = control.count("xDS snapshot built");
    fs::write(config.join("ns-0.yaml"), namespace_yaml(&sizes, 0, 1))?;
    let receipts = collect(&rt, &mut rx, sizes.subscribers)?;
    let change_delivery_ms = written.elapsed().as_millis() as u64;
    control.wait_for("xDS snapshot built", applied_before + 1)?;
    let first_receipt = receipts.iter().map(|r| r.at).min().unwrap_or(written);
    let last_receipt = receipts.iter().map(|r| r.at).max().unwrap_or(written);
    let change_bytes: usize = receipts.iter().map(|r| r.bytes).sum();
    let change_resources: usize = receipts.iter().map(|r| r.resources).sum();
    let subscribers_pushed = receipts.iter().map(|r| r.subscriber).collect::<std::collections::BTreeSet<_>>().len();
    let types: std::collections::BTreeSet<&str> = receipts.iter().map(|r| r.type_url.as_str()).collect();
    eprintln!("strait-bench control: change pushed to {subscribers_pushed} subscribers as {types:?}");

    // CPU: idle first, then changes 1.5 s apart.
    let window = Duration::from_millis(1500);
    let idle_start = procfs::cpu_seconds(control.pid());
    std::thread::sleep(window * 2);
    let idle_vcpu = (procfs::cpu_seconds(control.pid()) - idle_start) / (window * 2).as_secs_f64();
    let busy_start = procfs::cpu_seconds(control.pid());
    let busy_started = Instant::now();
    for change in 0..sizes.changes {
        fs::write(config.join("ns-0.yaml"), namespace_yaml(&sizes, 0, change + 2))?;
        collect(&rt, &mut rx, sizes.subscribers)?;
        let next = busy_started + window * (change as u32 + 1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let busy = procfs::cpu_seconds(control.pid()) - busy_start;
    let busy_window = busy_started.elapsed().as_secs_f64();
    let cpu_per_change_s = (busy - idle_vcpu * busy_window).max(0.0) / sizes.changes as f64;
    let rss_steady = procfs::rss_bytes(control.pid());
    let churn = churn(&sizes, &config, &control, &rt, &mut rx)?;
    // The subscribers first, so that stopping the control plane is no error of theirs.
    drop(rt);
    control.stop();

    let subscribers = sizes.subscribers as u64;
    Ok(ControlReport {
        sizes,
        startup_ms,
        snapshot_ms,
        resources,
        rss_ready_mib: rss_ready as f64 / 1048576.0,
        rss_serving_mib: rss_serving as f64 / 1048576.0,
        rss_steady_mib: rss_steady as f64 / 1048576.0,
        initial_sync_ms,
        initial_bytes_per_subscriber: initial_bytes as u64 / subscribers,
        change_delivery_ms,
        change_fanout_ms: last_receipt.duration_since(first_receipt).as_millis() as u64,
        change_bytes_per_subscriber: change_bytes as u64 / subscribers,
        change_resources_per_subscriber: change_resources as u64 / subscribers,
        cpu_per_change_s,
        idle_vcpu,
        churn,
    })
}

/// Cluster churn: `churn_per_s` pod changes a second for `churn_s`, change `i` relabelling the
/// first pod of namespace `i % namespaces` (its own file), as a cluster's pods change here and
/// there. Measures the control plane's CPU over the whole window and, per change, how long
/// until every subscriber held that pod at that revision or later.
fn churn(
    sizes: &Sizes,
    config: &Path,
    control: &Control,
    rt: &tokio::runtime::Runtime,
    rx: &mut mpsc::UnboundedReceiver<Receipt>,
) -> anyhow::Result<Churn> {
    let count = sizes.churn_per_s * sizes.churn_s as usize;
    let interval = Duration::from_secs(1) / sizes.churn_per_s as u32;
    let pods_per_ns = sizes.pods / sizes.namespaces;
    // Revisions used so far: the earlier phases wrote up to `changes + 1` in ns-0.
    let base = sizes.changes + 10;
    let snapshots_before = control.count("xDS snapshot built");
    // Receipts are gathered by a task while the writes go on.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let gather = rt.spawn({
        let mut rx = std::mem::replace(rx, mpsc::unbounded_channel().1);
        async move {
            let mut got = Vec::new();
            tokio::pin!(done_rx);
            loop {
                tokio::select! {
                    receipt = rx.recv() => match receipt {
                        Some(receipt) => got.push(receipt),
                        None => break,
                    },
                    _ = &mut done_rx => break,
                }
            }
            (got, rx)
        }
    });
    let cpu_start = procfs::cpu_seconds(control.pid());
    let started = Instant::now();
    let mut writes: Vec<(String, Instant)> = Vec::with_capacity(count);
    for i in 0..count {
        let ns = i % sizes.namespaces;
        let at = started + interval * i as u32;
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        fs::write(config.join(format!("ns-{ns}.yaml")), namespace_yaml(sizes, ns, base + i))?;
        writes.push((format!("Kubernetes//Pod/ns-{ns}/p-{}", ns * pods_per_ns), Instant::now()));
    }
    let churn_end = started + interval * count as u32;
    std::thread::sleep(churn_end.saturating_duration_since(Instant::now()));
    let vcpu = (procfs::cpu_seconds(control.pid()) - cpu_start) / started.elapsed().as_secs_f64();
    let snapshots = control.count("xDS snapshot built") - snapshots_before;
    // Then wait for the last changes to arrive: the directory settles once the writes stop.
    std::thread::sleep(Duration::from_secs(3));
    let _ = done_tx.send(());
    let (receipts, rest) = rt.block_on(gather)?;
    *rx = rest;
    // By pod: when each subscriber got it, in order.
    let mut by_pod: std::collections::HashMap<&str, Vec<(usize, Instant)>> = std::collections::HashMap::new();
    for receipt in &receipts {
        for name in &receipt.names {
            by_pod.entry(name.as_str()).or_default().push((receipt.subscriber, receipt.at));
        }
    }
    let mut latencies: Vec<Duration> = Vec::with_capacity(count);
    let mut delivered_during = 0;
    for (pod, written) in &writes {
        let mut first_after: std::collections::HashMap<usize, Instant> = std::collections::HashMap::new();
        for (subscriber, at) in by_pod.get(pod.as_str()).map_or(&[][..], Vec::as_slice) {
            if at > written {
                first_after.entry(*subscriber).or_insert(*at);
            }
        }
        if first_after.len() < sizes.subscribers {
            bail!("churn: the change of {pod} written at +{:?} never reached every subscriber", *written - started);
        }
        let last = first_after.values().max().copied().unwrap_or(*written);
        if last <= churn_end {
            delivered_during += 1;
        }
        latencies.push(last - *written);
    }
    latencies.sort();
    let percentile = |p: usize| latencies.get((latencies.len() * p / 100).min(latencies.len().saturating_sub(1)));
    let ms = |d: Option<&Duration>| d.map_or(0, |d| d.as_millis() as u64);
    Ok(Churn {
        changes: count,
        vcpu,
        snapshots,
        delivery_p50_ms: ms(percentile(50)),
        delivery_p90_ms: ms(percentile(90)),
        delivery_max_ms: ms(latencies.last()),
        delivered_during,
    })
}

/// Waits for one push to every subscriber; returns what they got.
fn collect(
    rt: &tokio::runtime::Runtime,
    rx: &mut mpsc::UnboundedReceiver<Receipt>,
    subscribers: usize,
) -> anyhow::Result<Vec<Receipt>> {
    let mut got: Vec<Receipt> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < subscribers {
        let receipt = rt.block_on(async { tokio::time::timeout(WAIT, rx.recv()).await })?;
        let receipt = receipt.context("subscribers stopped")?;
        seen.insert(receipt.subscriber);
        got.push(receipt);
    }
    Ok(got)
}

/// One simulated node proxy: subscribes to addresses and policies, ACKs everything, reports
/// every response.
async fn subscribe(
    addr: SocketAddr,
    root: &Path,
    subscriber: usize,
    node: usize,
    tx: mpsc::UnboundedSender<Receipt>,
) -> anyhow::Result<()> {
    let mut client = grpc::connect(addr, root).await?;
    let token = token(node);
    let request = |type_url: &str| DeltaDiscoveryRequest {
        node: Some(node_of(subscriber, node)),
        type_url: type_url.to_owned(),
        ..DeltaDiscoveryRequest::default()
    };
    let mut stream = match grpc::BidiStream::open(&mut client, addr, ADS, Some(&token), &request(ADDRESS)).await? {
        Ok(stream) => stream,
        Err(e) => bail!("refused: {} {}", e.code, e.message),
    };
    stream.send(&request(AUTHORIZATION))?;
    loop {
        let response: DeltaDiscoveryResponse = match stream.recv(Duration::from_secs(3600)).await? {
            Some(Ok(response)) => response,
            Some(Err(e)) => bail!("stream ended: {} {}", e.code, e.message),
            None => continue,
        };
        let at = Instant::now();
        stream.send(&DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..DeltaDiscoveryRequest::default()
        })?;
        let receipt = Receipt {
            subscriber,
            type_url: response.type_url.clone(),
            resources: response.resources.len(),
            names: if response.resources.len() <= 100 {
                response.resources.iter().map(|r| r.name.clone()).collect()
            } else {
                Vec::new()
            },
            bytes: response.encoded_len(),
            at,
        };
        if tx.send(receipt).is_err() {
            return Ok(());
        }
    }
}

fn token(node: usize) -> String {
    format!("bench-node-{node}-token")
}

fn node_of(subscriber: usize, node: usize) -> Node {
    let string = |s: String| Value { kind: Some(Kind::StringValue(s)) };
    Node {
        id: format!("ztunnel~127.0.0.1~ztunnel-{subscriber}.istio-system~istio-system.svc.cluster.local"),
        metadata: Some(Struct { fields: [("NODE_NAME".to_owned(), string(format!("node-{node}")))].into() }),
        ..Node::default()
    }
}

/// One namespace's file: the namespace, its pods, services and policies. `revision` labels the
/// namespace's first pod, so rewriting with another revision changes that one pod.
fn namespace_yaml(sizes: &Sizes, ns: usize, revision: usize) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns-{ns}\n  labels: {{istio.io/dataplane-mode: ambient}}\n"
    );
    let pods_per_ns = sizes.pods / sizes.namespaces;
    let pods_per_service = sizes.pods / sizes.services;
    for i in ns * pods_per_ns..(ns + 1) * pods_per_ns {
        let service = i / pods_per_service;
        let revision = if i == ns * pods_per_ns { format!(", rev: r{revision}") } else { String::new() };
        let ip = format!("10.{}.{}.{}", 1 + i / 62_500, (i / 250) % 250, i % 250 + 1);
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p-{i}\n  namespace: ns-{ns}\n  labels: {{app: svc-{service}{revision}}}\n\
             spec: {{nodeName: node-{}, serviceAccountName: sa-{service}}}\nstatus: {{podIP: {ip}}}\n",
            i % sizes.nodes
        );
    }
    let services_per_ns = sizes.services / sizes.namespaces;
    for s in ns * services_per_ns..(ns + 1) * services_per_ns {
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{s}\n  namespace: ns-{ns}\n\
             spec:\n  clusterIP: 10.96.{}.{}\n  selector: {{app: svc-{s}}}\n  ports: [{{port: 80, targetPort: 8080}}]\n",
            s / 250,
            s % 250 + 1
        );
    }
    let policies_per_ns = sizes.policies / sizes.namespaces;
    for p in ns * policies_per_ns..(ns + 1) * policies_per_ns {
        let target = ns * services_per_ns + (p - ns * policies_per_ns) * services_per_ns / policies_per_ns.max(1);
        let _ = write!(
            yaml,
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-{p}\n  namespace: ns-{ns}\n\
             spec:\n  selector:\n    matchLabels: {{app: svc-{target}}}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n\
             \x20       principals: [cluster.local/ns/ns-{ns}/sa/sa-{}]\n    to:\n    - operation:\n        ports: [\"8080\"]\n",
            (target + 1) % sizes.services
        );
    }
    yaml
}

/// The `strait control` process under measurement (here and in `kube`).
pub(crate) struct Control {
    child: Child,
    log: PathBuf,
}

impl Control {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let path = |p: &str| dir.join(p).to_string_lossy().into_owned();
        Self::spawn(dir, &["--config", &path("config"), "--listen", LISTEN, "--metrics-addr", METRICS], &[])
    }

    /// `strait control` with `args` after the CA and token directories under `dir`, logging
    /// to `dir/control.log`.
    pub(crate) fn spawn(dir: &Path, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> anyhow::Result<Self> {
        let strait = strait_testbed::require_bin("strait")?;
        let log = dir.join("control.log");
        let file = fs::File::create(&log)?;
        let path = |p: &str| dir.join(p).to_string_lossy().into_owned();
        let child = Command::new(strait)
            .arg("control")
            .args(args)
            .args(["--ca-dir", &path("ca"), "--bootstrap-tokens", &path("tokens"), "--empty-config-hold", "0s"])
            .envs(env.iter().copied())
            .env("STRAIT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("cannot start strait control")?;
        Ok(Self { child, log })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }

    pub(crate) fn wait_for(&mut self, needle: &str, count: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        while self.count(needle) < count {
            if Instant::now() > deadline || self.child.try_wait()?.is_some() {
                bail!("no `{needle}` from strait control; its log ends with:\n{}", tail(&self.text()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The number after `key` on the last line containing `needle`.
    fn last_number(&self, needle: &str, key: &str) -> Option<u64> {
        let text = self.text();
        let line = text.lines().rev().find(|l| l.contains(needle))?;
        line.split(key).nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    }

    /// Resources in the first snapshot, from its log line (`Address=12 Authorization=3 ...`).
    fn resource_count(&self) -> u64 {
        let text = self.text();
        let Some(line) = text.lines().find(|l| l.contains("xDS snapshot built")) else { return 0 };
        line.split_whitespace().filter_map(|w| w.split_once('=')).filter_map(|(_, n)| n.parse::<u64>().ok()).sum()
    }

    pub(crate) fn stop(&mut self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// `control.md`.
pub fn markdown(r: &ControlReport) -> String {
    let s = &r.sizes;
    let mib = |b: u64| b as f64 / 1048576.0;
    let mut md = format!(
        "# strait control\n\n{} pods on {} nodes in {} namespaces, {} services, {} AuthorizationPolicies; {} \
         subscribers (simulated node proxies on loopback, each its own TLS connection and delta-xDS stream).\n\n",
        s.pods, s.nodes, s.namespaces, s.services, s.policies, s.subscribers
    );
    md.push_str("| Figure | Value |\n|---|---:|\n");
    let churn_label = format!("Churn: {} pod changes/s for {} s, CPU over the window", s.churn_per_s, s.churn_s);
    let rows = [
        ("Start to ready (load, compile, snapshot)", format!("{} ms", r.startup_ms)),
        ("of which building the snapshot", format!("{} ms", r.snapshot_ms)),
        ("Resources served", r.resources.to_string()),
        ("RSS when ready", format!("{:.1} MiB", r.rss_ready_mib)),
        ("RSS right after every subscriber got its first state", format!("{:.1} MiB", r.rss_serving_mib)),
        ("RSS serving them, after the changes below", format!("{:.1} MiB", r.rss_steady_mib)),
        ("First state to every subscriber", format!("{} ms", r.initial_sync_ms)),
        ("First state, per subscriber", format!("{:.2} MiB", mib(r.initial_bytes_per_subscriber))),
        ("One pod change: write to every subscriber (500 ms settle included)", format!("{} ms", r.change_delivery_ms)),
        ("One pod change: first to last subscriber", format!("{} ms", r.change_fanout_ms)),
        (
            "One pod change, per subscriber",
            format!("{} B, {} resource(s)", r.change_bytes_per_subscriber, r.change_resources_per_subscriber),
        ),
        ("CPU per applied change (read, compile, snapshot, pushes)", format!("{:.3} s", r.cpu_per_change_s)),
        ("CPU idle (directory polling)", format!("{:.3} vCPU", r.idle_vcpu)),
        (churn_label.as_str(), format!("{:.2} vCPU", r.churn.vcpu)),
        ("Churn: snapshots built during it", r.churn.snapshots.to_string()),
        (
            "Churn: change to every subscriber, p50 / p90 / max",
            format!("{} / {} / {} ms", r.churn.delivery_p50_ms, r.churn.delivery_p90_ms, r.churn.delivery_max_ms),
        ),
        ("Churn: changes delivered while it went on", format!("{} of {}", r.churn.delivered_during, r.churn.changes)),
    ];
    for (what, value) in rows {
        let _ = writeln!(md, "| {what} | {value} |");
    }
    md.push_str(
        "\nA pod change reaches each subscriber as the one resource that changed: bytes per change \
         follow the change, not the mesh. The directory source applies a change once the directory \
         has been quiet for 500 ms (OPS-5), or after 10 s of changes when it never is: under churn, \
         changes arrive in batches up to about 10 s late.\n",
    );
    md
}

pub fn write(out: &Path, report: &ControlReport) -> anyhow::Result<()> {
    fs::write(out.join("control.md"), markdown(report))?;
    fs::write(out.join("control.json"), serde_json::to_string_pretty(report)?)?;
    Ok(())
}
