//! `strait-bench gateway` (GW-1, GW-2, GW-3, OPS-1): what an ingress `strait gateway` costs an
//! HTTPS client, beside the same server reached directly over TLS, in the same run.
//!
//! Two nodes. Node 1: the gateway pod (istio-system, labelled `istio: ingressgateway` and
//! `strait.io/gateway`) running `strait gateway`, and a client pod outside the mesh running
//! `strait-load`. Node 2: a backend pod outside the mesh with two `strait-load server`s, plain
//! HTTP for the gateway and HTTPS (the server terminating TLS itself) for the direct baseline,
//! and a backend pod in an ambient namespace behind `strait node`, reached by the gateway over
//! HBONE as its own identity. The paths:
//!
//! - direct: client → backend, TLS end to end;
//! - gateway → plain: client → gateway (TLS SIMPLE, terminated there) → backend in plain HTTP;
//! - gateway → mesh: client → gateway → HBONE (mutual TLS) → node proxy → mesh backend.
//!
//! Every path uses the same certificates (ECDSA P-256 from one test CA, made here with rcgen),
//! the same client (rustls with ring, ALPN http/1.1, no session resumption, so each new
//! connection is a full handshake) and the same server process kind. Measured: latency at a
//! fixed 1,000 req/s with 8 keep-alive connections and the gateway's CPU over it; the highest
//! rate whose p99 stays under 10 ms; new TLS handshakes per second; the gateway's RSS idle and
//! with 1,000 open client TLS connections. Benchmarks, not tests: a path that fails is a note in
//! the report, the other paths are still measured.

use std::{
    fmt::Write as _,
    fs,
    path::{Path as FsPath, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use serde::Serialize;
use serde_json::Value;
use strait_testbed::{Pod, Process, Topology, bin_path, k8s};

use crate::report::{cell, mib};
use crate::scenarios::{procfs, run_load, start_proxy};

/// The gateway's HTTPS server port (listened on as is: the pod has its own namespace).
const GATEWAY_PORT: u16 = 443;
const PLAIN_PORT: u16 = 8080;
const TLS_PORT: u16 = 8443;
/// The names clients ask for: SNI, certificate SAN and Host.
const HOST_DIRECT: &str = "backend.bench.example";
const HOST_PLAIN: &str = "plain.bench.example";
const HOST_MESH: &str = "mesh.bench.example";
const GATEWAY_NS: &str = "istio-system";
const OUTSIDE_NS: &str = "outside";
const MESH_NS: &str = "mesh";
const CREDENTIAL: &str = "bench-gateway-cert";
const TIMEOUT: Duration = Duration::from_secs(20);
/// Idle client connections held against the gateway for its memory figure.
const HELD: u64 = 1000;
/// Rates tried in turn, up to the first that misses (p99 ≥ 10 ms, under 95 % achieved, or an
/// error). Finer than the mesh ladder at the bottom: TLS on both sides of a 2-core box.
const LADDER: [u32; 16] =
    [1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 10000, 12500, 15000, 17500, 20000, 25000, 30000, 40000];

/// Which way a client request goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    GatewayPlain,
    GatewayMesh,
}

const ROUTES: [Route; 3] = [Route::Direct, Route::GatewayPlain, Route::GatewayMesh];

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::Direct => "direct TLS",
            Route::GatewayPlain => "gateway → plain backend",
            Route::GatewayMesh => "gateway → mesh backend (HBONE)",
        }
    }

    fn host(self) -> &'static str {
        match self {
            Route::Direct => HOST_DIRECT,
            Route::GatewayPlain => HOST_PLAIN,
            Route::GatewayMesh => HOST_MESH,
        }
    }

    fn through_gateway(self) -> bool {
        self != Route::Direct
    }
}

/// The figures of one route.
#[derive(Debug, Serialize)]
pub struct RouteFigures {
    pub route: &'static str,
    pub target: String,
    /// At 1,000 req/s, 8 keep-alive connections, 1 KiB bodies.
    pub p50_us: Option<f64>,
    pub p90_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    pub achieved_rps: Option<f64>,
    pub errors: Option<u64>,
    /// The gateway's utime+stime over the fixed-rate run, vCPU per 1,000 req/s.
    pub gateway_cpu_per_krps: Option<f64>,
    /// The node proxy in front of the mesh backend, over the same run (mesh route only).
    pub node_proxy_cpu_per_krps: Option<f64>,
    /// The highest rate whose p99 stayed under 10 ms, all of it achieved, without errors.
    pub max_rps: Option<f64>,
    /// What went wrong at the first rate above `max_rps`.
    pub max_rps_stopped: Option<String>,
    /// New connections per second, each a full TLS handshake and one small request.
    pub handshakes_per_s: Option<f64>,
    pub handshake_p50_us: Option<f64>,
    pub handshake_p99_us: Option<f64>,
    /// Why a figure is missing, and failed requests.
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct GatewayMemory {
    /// After start and one request through each route.
    pub rss_idle_mib: f64,
    pub anonymous_idle_mib: f64,
    pub held: u64,
    /// Held connections the gateway had closed by the time the hold ended.
    pub closed_by_peer: Option<u64>,
    pub rss_held_mib: Option<f64>,
    pub per_connection_kib: Option<f64>,
    /// After every load run, for comparison with idle.
    pub rss_after_runs_mib: f64,
    pub note: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct GatewayReport {
    pub quick: bool,
    pub fixed_rate_s: u64,
    pub handshakes_s: u64,
    pub ladder_step_s: u64,
    pub routes: Vec<RouteFigures>,
    pub memory: GatewayMemory,
}

/// The topology and its processes; dropping it stops them and removes the namespaces.
struct Bed {
    topo: Topology,
    client: Pod,
    gateway_pod: Pod,
    backend: Pod,
    gateway: Process,
    node_proxy: Process,
    _servers: Vec<Process>,
    ca_file: PathBuf,
}

impl Bed {
    fn target(&self, route: Route) -> String {
        match route {
            Route::Direct => format!("{}:{TLS_PORT}", self.backend.ip()),
            Route::GatewayPlain | Route::GatewayMesh => format!("{}:{GATEWAY_PORT}", self.gateway_pod.ip()),
        }
    }

    /// The `--tls-*` and `--host` arguments of a route.
    fn tls_args(&self, route: Route) -> Vec<String> {
        let ca = self.ca_file.to_string_lossy().into_owned();
        let host = route.host().to_owned();
        vec!["--tls-ca".into(), ca, "--tls-sni".into(), host.clone(), "--host".into(), host]
    }

    /// `strait-load <args> <tls args> --target <route's target>` in the client pod.
    fn load(&self, route: Route, args: &[&str]) -> anyhow::Result<Value> {
        let tls = self.tls_args(route);
        let mut full: Vec<&str> = args.to_vec();
        full.extend(tls.iter().map(String::as_str));
        let value = run_load(&self.client, &self.target(route), &full)?;
        if route.through_gateway()
            && let Some(status) = self.gateway.wait_exit(Duration::ZERO)
        {
            bail!("the gateway has exited ({status}); its log ends with:\n{}", self.gateway.log_tail());
        }
        Ok(value)
    }
}

pub fn run(out: &FsPath, quick: bool) -> anyhow::Result<GatewayReport> {
    let (fixed_rate_s, handshakes_s, ladder_step_s) = if quick { (5, 3, 2) } else { (30, 10, 5) };
    let bed = build(out)?;
    let mut routes: Vec<RouteFigures> = ROUTES
        .iter()
        .map(|&route| RouteFigures {
            route: route.label(),
            target: bed.target(route),
            p50_us: None,
            p90_us: None,
            p99_us: None,
            p999_us: None,
            achieved_rps: None,
            errors: None,
            gateway_cpu_per_krps: None,
            node_proxy_cpu_per_krps: None,
            max_rps: None,
            max_rps_stopped: None,
            handshakes_per_s: None,
            handshake_p50_us: None,
            handshake_p99_us: None,
            notes: Vec::new(),
        })
        .collect();

    let gateway_pid = bed.gateway.pid();
    // Memory first, while nothing but the warm-up has gone through the gateway.
    let mut memory = hold(&bed)?;

    eprintln!("strait-bench gateway: 1,000 req/s for {fixed_rate_s} s on each route");
    for (route, figures) in ROUTES.iter().zip(&mut routes) {
        fixed_rate(&bed, *route, fixed_rate_s, figures);
    }
    eprintln!("strait-bench gateway: new TLS handshakes for {handshakes_s} s on each route");
    for (route, figures) in ROUTES.iter().zip(&mut routes) {
        let args = ["connections", "--duration", &handshakes_s.to_string(), "--concurrency", "8"];
        match bed.load(*route, &args) {
            Ok(v) => {
                figures.handshakes_per_s = number(&v, "per_second");
                figures.handshake_p50_us = number(&v, "p50_us");
                figures.handshake_p99_us = number(&v, "p99_us");
                if let Some(note) = errors_note(&v, "connections") {
                    figures.notes.push(format!("handshakes: {note}"));
                }
            }
            Err(e) => figures.notes.push(format!("handshakes not measured: {e:#}")),
        }
    }
    eprintln!("strait-bench gateway: highest rate with p99 < 10 ms, {ladder_step_s} s a step");
    for (route, figures) in ROUTES.iter().zip(&mut routes) {
        let (best, stopped) = climb(&bed, *route, ladder_step_s);
        figures.max_rps = best;
        figures.max_rps_stopped = stopped;
    }
    memory.rss_after_runs_mib = mib(procfs::rss_bytes(gateway_pid));
    Ok(GatewayReport { quick, fixed_rate_s, handshakes_s, ladder_step_s, routes, memory })
}

/// Builds the topology, the certificates and the configuration, starts the servers, the node
/// proxy and the gateway, and sends one request through each route.
fn build(out: &FsPath) -> anyhow::Result<Bed> {
    let topo = Topology::new("gwbench").context("cannot build the gateway bench topology (run as root)")?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let gateway_pod = topo.add_pod(&n1, "ingress")?;
    let client = topo.add_pod(&n1, "client")?;
    let backend = topo.add_pod(&n2, "backend")?;
    let backend_mesh = topo.add_pod(&n2, "backend-mesh")?;

    let pki = topo.dir().join("pki");
    let credentials = topo.dir().join("credentials");
    make_certificates(&pki, &credentials.join(CREDENTIAL))?;
    // The CA for clients, also kept beside the report so a run can be repeated by hand.
    let ca_file = pki.join("ca.crt");
    let _ = fs::copy(&ca_file, out.join("gateway-ca.crt"));

    topo.write_config("bench.yaml", &config(&gateway_pod, &client, &backend, &backend_mesh))?;
    let load = bin_path("strait-load");
    let mut servers = Vec::new();
    let port = |p: u16| p.to_string();
    let (cert, key) = (pki.join("backend.crt"), pki.join("backend.key"));
    let (cert, key) = (cert.to_string_lossy().into_owned(), key.to_string_lossy().into_owned());
    let plain_port = port(PLAIN_PORT);
    let tls_port = port(TLS_PORT);
    let backends: [(&Pod, &str, Vec<&str>); 3] = [
        (&backend, "plain", vec!["server", "--port", &plain_port]),
        (&backend, "tls", vec!["server", "--port", &tls_port, "--tls-cert", &cert, "--tls-key", &key]),
        (&backend_mesh, "mesh", vec!["server", "--port", &plain_port]),
    ];
    for (pod, what, args) in backends {
        let process = pod.spawn(&format!("load-server-{what}"), &load, &args, &[])?;
        process.wait_for_log("listening on", TIMEOUT)?;
        servers.push(process);
    }

    let ca_dir = topo.dir().join("ca");
    // Before the gateway: it creates the mesh CA the gateway then shares.
    let node_proxy = start_proxy(&topo, &n2, &ca_dir)?;
    let gateway = start_gateway(&topo, &gateway_pod, &credentials, &ca_dir)?;
    let bed = Bed { topo, client, gateway_pod, backend, gateway, node_proxy, _servers: servers, ca_file };
    for route in ROUTES {
        warm_up(&bed, route).with_context(|| format!("{}: no request got through", route.label()))?;
    }
    thread::sleep(Duration::from_millis(500));
    Ok(bed)
}

/// The namespaces, pods, Services, the Gateway and its VirtualServices.
fn config(gateway: &Pod, client: &Pod, backend: &Pod, backend_mesh: &Pod) -> String {
    let istio = format!(
        r#"---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: bench-gateway, namespace: {GATEWAY_NS}}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {GATEWAY_PORT}, name: https, protocol: HTTPS}}
    hosts: [{HOST_PLAIN}, {HOST_MESH}]
    tls: {{mode: SIMPLE, credentialName: {CREDENTIAL}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: plain, namespace: {GATEWAY_NS}}}
spec:
  hosts: [{HOST_PLAIN}]
  gateways: [bench-gateway]
  http: [{{route: [{{destination: {{host: backend.{OUTSIDE_NS}.svc.cluster.local, port: {{number: {PLAIN_PORT}}}}}}}]}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: mesh, namespace: {GATEWAY_NS}}}
spec:
  hosts: [{HOST_MESH}]
  gateways: [bench-gateway]
  http: [{{route: [{{destination: {{host: backend.{MESH_NS}.svc.cluster.local, port: {{number: {PLAIN_PORT}}}}}}}]}}]
"#
    );
    let selector = [("app", "backend")];
    [
        k8s::namespace_yaml(GATEWAY_NS, &[]),
        k8s::namespace_yaml(OUTSIDE_NS, &[]),
        k8s::namespace_yaml(MESH_NS, &[("istio.io/dataplane-mode", "ambient")]),
        k8s::pod_yaml(
            gateway,
            GATEWAY_NS,
            "istio-ingressgateway",
            &[("istio", "ingressgateway"), ("strait.io/gateway", "true")],
        ),
        k8s::pod_yaml(client, OUTSIDE_NS, "client", &[("app", "client")]),
        k8s::pod_yaml(backend, OUTSIDE_NS, "backend", &selector),
        k8s::pod_yaml(backend_mesh, MESH_NS, "backend", &selector),
        k8s::named_service_yaml(
            "backend",
            OUTSIDE_NS,
            "10.96.0.60",
            &[("http", PLAIN_PORT, PLAIN_PORT)],
            &selector,
            &[],
        ),
        k8s::named_service_yaml("backend", MESH_NS, "10.96.0.61", &[("http", PLAIN_PORT, PLAIN_PORT)], &selector, &[]),
        istio,
    ]
    .concat()
}

/// A test CA (`ca.crt`), a leaf for the direct backend (`backend.crt|key`) and the gateway's
/// credential (`tls.crt|key` in `credential`, as Istio's secret lays it out), all ECDSA P-256
/// so both ends of every path pay for the same handshake.
fn make_certificates(pki: &FsPath, credential: &FsPath) -> anyhow::Result<()> {
    fs::create_dir_all(pki)?;
    fs::create_dir_all(credential)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "strait bench gateway CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    fs::write(pki.join("ca.crt"), ca.pem())?;
    let leaf = |names: &[&str]| -> anyhow::Result<(String, String)> {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (cert, key) = leaf(&[HOST_DIRECT])?;
    fs::write(pki.join("backend.crt"), cert)?;
    fs::write(pki.join("backend.key"), key)?;
    let (cert, key) = leaf(&[HOST_PLAIN, HOST_MESH])?;
    fs::write(credential.join("tls.crt"), cert)?;
    fs::write(credential.join("tls.key"), key)?;
    Ok(())
}

/// `strait gateway` in its pod, at warn level like the other proxies of the bench (its access
/// lines, one per request, still go to its log: a gateway keeps them); ready when its
/// readiness endpoint says so.
fn start_gateway(topo: &Topology, pod: &Pod, credentials: &FsPath, ca_dir: &FsPath) -> anyhow::Result<Process> {
    let config = topo.config_dir();
    let args = [
        "gateway",
        "--config",
        config.to_str().unwrap_or_default(),
        "--labels",
        "istio=ingressgateway",
        "--namespace",
        GATEWAY_NS,
        "--credentials",
        credentials.to_str().unwrap_or_default(),
        "--ca-dir",
        ca_dir.to_str().unwrap_or_default(),
    ];
    let gateway = pod.spawn("gateway", bin_path("strait"), &args, &[("STRAIT_LOG", "warn")])?;
    let deadline = Instant::now() + TIMEOUT;
    while !pod.run("curl", &["-sf", "--max-time", "1", "http://127.0.0.1:15021/healthz/ready"])?.status.success() {
        if Instant::now() > deadline || !gateway.is_running() {
            bail!(
                "strait gateway did not start; its log {} ends with:\n{}",
                gateway.log_path().display(),
                gateway.log_tail()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(gateway)
}

/// A few requests on one connection; retried, since a first request may race the proxies'
/// view of the configuration and a failure here costs every figure of the route.
fn warm_up(bed: &Bed, route: Route) -> anyhow::Result<()> {
    let args = ["rate", "--rps", "10", "--duration", "1", "--warmup", "0", "--connections", "1"];
    let mut last = String::new();
    for _ in 0..5 {
        match bed.load(route, &args) {
            Ok(v) if v.get("errors").and_then(Value::as_u64) == Some(0) => return Ok(()),
            Ok(v) => last = errors_note(&v, "requests").unwrap_or_else(|| format!("unexpected result {v}")),
            Err(e) => last = format!("{e:#}"),
        }
        thread::sleep(Duration::from_millis(500));
    }
    bail!("{last}; the gateway's log {} ends with:\n{}", bed.gateway.log_path().display(), bed.gateway.log_tail())
}

/// The gateway's memory idle, then with [`HELD`] open client TLS connections (handshake done,
/// no request yet, as a browser's spare connection).
fn hold(bed: &Bed) -> anyhow::Result<GatewayMemory> {
    let pid = bed.gateway.pid();
    let idle = procfs::rss_bytes(pid);
    let mut memory = GatewayMemory {
        rss_idle_mib: mib(idle),
        anonymous_idle_mib: mib(procfs::anonymous_bytes(pid)),
        held: HELD,
        closed_by_peer: None,
        rss_held_mib: None,
        per_connection_kib: None,
        rss_after_runs_mib: f64::NAN,
        note: None,
    };
    eprintln!("strait-bench gateway: holding {HELD} TLS connections to the gateway");
    let ready = bed.topo.dir().join("hold.ready");
    let _ = fs::remove_file(&ready);
    let target = bed.target(Route::GatewayPlain);
    let tls = bed.tls_args(Route::GatewayPlain);
    let count = HELD.to_string();
    let mut args = vec!["hold", "--target", &target, "--count", &count, "--ready-file", ready.to_str().unwrap_or("")];
    args.extend(tls.iter().map(String::as_str));
    let process = bed.client.spawn("hold", bin_path("strait-load"), &args, &[])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        if Instant::now() > deadline || !process.is_running() {
            memory.note = Some(format!("the connections were not all opened: {}", process.log_tail()));
            let _ = process.terminate(libc::SIGTERM);
            return Ok(memory);
        }
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_secs(1));
    let held = procfs::rss_bytes(pid);
    let opened = fs::read_to_string(&ready).ok().and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok());
    process.terminate(libc::SIGTERM)?;
    if process.wait_exit(TIMEOUT).is_none() {
        memory.note = Some("strait-load hold did not exit on SIGTERM".into());
    }
    // Its report (one JSON line on stdout) is in its log, after what it said on stderr.
    let report = process.log().lines().rev().find_map(|l| serde_json::from_str::<Value>(l).ok());
    memory.closed_by_peer = report.as_ref().and_then(|v| v.get("closed_by_peer")?.as_u64());
    let count = opened.unwrap_or(HELD);
    memory.held = count;
    memory.rss_held_mib = Some(mib(held));
    memory.per_connection_kib = Some(held.saturating_sub(idle) as f64 / count.max(1) as f64 / 1024.0);
    if let Some(n) = memory.closed_by_peer.filter(|n| *n > 0) {
        memory.note = Some(format!("the gateway had closed {n} of the held connections by the end of the hold"));
    }
    Ok(memory)
}

/// Open loop at 1,000 req/s, 8 keep-alive connections, 1 KiB bodies (as BENCHMARKS.md), with the
/// gateway's CPU (and the node proxy's, on the mesh route) over the run.
fn fixed_rate(bed: &Bed, route: Route, secs: u64, figures: &mut RouteFigures) {
    let secs = secs.to_string();
    let args = ["rate", "--rps", "1000", "--duration", &secs, "--connections", "8", "--path", "/bytes/1024"];
    let (gateway_pid, node_pid) = (bed.gateway.pid(), bed.node_proxy.pid());
    let (gateway_before, node_before) = (procfs::cpu_seconds(gateway_pid), procfs::cpu_seconds(node_pid));
    let started = Instant::now();
    let run = bed.load(route, &args);
    let elapsed = started.elapsed().as_secs_f64();
    let v = match run {
        Ok(v) => v,
        Err(e) => return figures.notes.push(format!("1,000 req/s not measured: {e:#}")),
    };
    for (key, slot) in [
        ("p50_us", &mut figures.p50_us),
        ("p90_us", &mut figures.p90_us),
        ("p99_us", &mut figures.p99_us),
        ("p999_us", &mut figures.p999_us),
        ("achieved_rps", &mut figures.achieved_rps),
    ] {
        *slot = number(&v, key);
    }
    figures.errors = v.get("errors").and_then(Value::as_u64);
    if let Some(note) = errors_note(&v, "requests") {
        figures.notes.push(format!("1,000 req/s: {note}"));
    }
    let krps = figures.achieved_rps.unwrap_or(0.0) / 1000.0;
    if route.through_gateway() && krps > 0.0 {
        // utime+stime over the wall time of the run (warm-up included, as for the mesh figures).
        let per_krps = |before: f64, pid: u32| (procfs::cpu_seconds(pid) - before) / elapsed / krps;
        figures.gateway_cpu_per_krps = Some(per_krps(gateway_before, gateway_pid));
        if route == Route::GatewayMesh {
            figures.node_proxy_cpu_per_krps = Some(per_krps(node_before, node_pid));
        }
    }
}

/// The ladder's rates in turn until one misses: the best rate that held, and what missed.
fn climb(bed: &Bed, route: Route, step_s: u64) -> (Option<f64>, Option<String>) {
    let secs = step_s.to_string();
    let mut best = None;
    for rate in LADDER {
        let rps = rate.to_string();
        let args = [
            "rate",
            "--rps",
            &rps,
            "--duration",
            &secs,
            "--warmup",
            "1",
            "--connections",
            "8",
            "--path",
            "/bytes/1024",
        ];
        let v = match bed.load(route, &args) {
            Ok(v) => v,
            Err(e) => return (best, Some(format!("at {rate} req/s the run failed: {e:#}"))),
        };
        let (p99, achieved) = (number(&v, "p99_us").unwrap_or(f64::NAN), number(&v, "achieved_rps").unwrap_or(0.0));
        let errors = v.get("errors").and_then(Value::as_u64);
        if p99 < 10_000.0 && achieved >= 0.95 * f64::from(rate) && errors == Some(0) {
            best = Some(f64::from(rate));
            continue;
        }
        let mut missed = format!("at {rate} req/s: p99 {p99:.0} µs, {achieved:.0} req/s achieved");
        match errors_note(&v, "requests") {
            Some(note) => missed = format!("{missed}, {note}"),
            None => missed = format!("{missed}, {} errors", errors.map_or("unknown".into(), |n| n.to_string())),
        }
        return (best, Some(missed));
    }
    (best, None)
}

fn number(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// "N of M <what> failed; first: ..." when a run had errors.
fn errors_note(v: &Value, what: &str) -> Option<String> {
    let errors = v.get("errors").and_then(Value::as_u64).filter(|n| *n > 0)?;
    let good = v.get("requests").or_else(|| v.get("connections")).and_then(Value::as_u64).unwrap_or(0);
    let first = v.get("first_error").and_then(Value::as_str).unwrap_or("not reported");
    Some(format!("{errors} of {} {what} failed; first: {first}", errors + good))
}

/// Reads one figure of a route, for a row of the table.
type Getter = fn(&RouteFigures) -> Option<f64>;

pub fn markdown(r: &GatewayReport) -> String {
    let mut md = String::from("# strait gateway: ingress HTTPS\n\n");
    let _ = writeln!(
        md,
        "An outside client (strait-load: rustls/ring, ALPN http/1.1, no session resumption) to a backend \
         outside the mesh, directly over TLS (the server terminating TLS itself) and through \
         `strait gateway` (TLS SIMPLE terminated there, plain HTTP to the backend), and through the \
         gateway to a backend in the mesh (HBONE to its node proxy). ECDSA P-256 certificates \
         throughout; client and gateway on node 1, backends on node 2; every process shares the \
         machine's cores. The gateway runs with its defaults: one worker thread, and an access line \
         per request written to its log (that cost is in its figures).{}\n",
        if r.quick { " **Quick run**: short phases, indicative only." } else { "" }
    );
    md.push_str("| Figure |");
    for route in &r.routes {
        let _ = write!(md, " {} |", route.route);
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(r.routes.len()));
    md.push('\n');
    let fixed = format!("at 1,000 req/s, 8 keep-alive conns, 1 KiB, {} s (µs)", r.fixed_rate_s);
    let rows: [(String, Getter, usize); 7] = [
        (format!("p50 {fixed}"), |f| f.p50_us, 0),
        (format!("p99 {fixed}"), |f| f.p99_us, 0),
        (format!("p99.9 {fixed}"), |f| f.p999_us, 0),
        ("Gateway CPU per 1,000 req/s (vCPU)".into(), |f| f.gateway_cpu_per_krps, 3),
        ("Node proxy CPU per 1,000 req/s (vCPU)".into(), |f| f.node_proxy_cpu_per_krps, 3),
        (format!("Highest rate with p99 < 10 ms, 8 conns, {} s steps (req/s)", r.ladder_step_s), |f| f.max_rps, 0),
        (
            format!("New TLS handshakes per second, one request each, {} s (conn/s)", r.handshakes_s),
            |f| f.handshakes_per_s,
            0,
        ),
    ];
    for (name, get, decimals) in rows {
        let _ = write!(md, "| {name} |");
        for route in &r.routes {
            let _ = write!(md, " {} |", cell(get(route), decimals));
        }
        md.push('\n');
    }
    if let [direct, gateway, ..] = &r.routes[..] {
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "—".into(),
        };
        let added = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => format!("{:+.0} µs", a - b),
            _ => "—".into(),
        };
        let _ = writeln!(
            md,
            "\nGateway → plain against direct: p50 {}, p99 {}; highest rate × {}; handshakes × {}.",
            added(gateway.p50_us, direct.p50_us),
            added(gateway.p99_us, direct.p99_us),
            ratio(gateway.max_rps, direct.max_rps),
            ratio(gateway.handshakes_per_s, direct.handshakes_per_s),
        );
    }
    let m = &r.memory;
    md.push_str("\n| Gateway memory | Value |\n|---|---:|\n");
    let _ = writeln!(
        md,
        "| RSS idle (certificates loaded, a few requests through each route) | {:.1} MiB |",
        m.rss_idle_mib
    );
    let _ = writeln!(md, "| private (anonymous) memory idle | {:.1} MiB |", m.anonymous_idle_mib);
    let _ = writeln!(md, "| RSS with {} open client TLS connections | {} MiB |", m.held, cell(m.rss_held_mib, 1));
    let _ = writeln!(md, "| per open client TLS connection | {} KiB |", cell(m.per_connection_kib, 1));
    let _ = writeln!(md, "| RSS after all the load runs | {:.1} MiB |", m.rss_after_runs_mib);
    let mut notes: Vec<String> = Vec::new();
    for route in &r.routes {
        notes.extend(route.notes.iter().map(|n| format!("{}: {n}", route.route)));
        if let Some(stopped) = &route.max_rps_stopped {
            notes.push(format!("{}: the rate climb stopped {stopped}", route.route));
        }
    }
    notes.extend(m.note.iter().map(|n| format!("memory: {n}")));
    if !notes.is_empty() {
        md.push_str("\nNotes:\n\n");
        for n in notes {
            let _ = writeln!(md, "- {}", n.replace('\n', " "));
        }
    }
    md
}

pub fn write(out: &FsPath, report: &GatewayReport) -> anyhow::Result<()> {
    fs::write(out.join("gateway.md"), markdown(report))?;
    fs::write(out.join("gateway.json"), serde_json::to_string_pretty(report)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_counted_with_the_first() {
        let v = serde_json::json!({"requests": 990, "errors": 10, "first_error": "status 503"});
        assert_eq!(errors_note(&v, "requests").as_deref(), Some("10 of 1000 requests failed; first: status 503"));
        assert_eq!(errors_note(&serde_json::json!({"requests": 5, "errors": 0}), "requests"), None);
        let v = serde_json::json!({"connections": 7, "errors": 1});
        assert_eq!(errors_note(&v, "connections").as_deref(), Some("1 of 8 connections failed; first: not reported"));
    }

    #[test]
    fn certificates_chain_to_the_ca_and_name_the_hosts() {
        let dir = std::env::temp_dir().join(format!("strait-bench-gw-pki-{}", std::process::id()));
        let credential = dir.join("cred");
        make_certificates(&dir, &credential).expect("certificates");
        let ca = dir.join("ca.crt");
        // Real handshakes with strait-load's own acceptor and dialer: each leaf chains to the CA
        // and names its hosts, and a name it does not carry is refused.
        let cases = [
            (dir.join("backend.crt"), dir.join("backend.key"), HOST_DIRECT, true),
            (credential.join("tls.crt"), credential.join("tls.key"), HOST_PLAIN, true),
            (credential.join("tls.crt"), credential.join("tls.key"), HOST_MESH, true),
            (credential.join("tls.crt"), credential.join("tls.key"), HOST_DIRECT, false),
        ];
        let rt = strait_bench::runtime(1).expect("runtime");
        for (cert, key, name, verifies) in cases {
            let acceptor = strait_bench::tls::acceptor(&cert, &key).expect("acceptor");
            let dialer = strait_bench::tls::Dialer::tls(&ca, name).expect("dialer");
            let outcome = rt.block_on(async {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let addr = listener.local_addr().expect("address");
                let server = tokio::spawn(async move {
                    let (tcp, _) = listener.accept().await.expect("accept");
                    acceptor.accept(tcp).await.map(drop)
                });
                let client = dialer.dial(addr).await.map(drop);
                let _ = server.await;
                client
            });
            assert_eq!(outcome.is_ok(), verifies, "{name} against {}: {outcome:?}", cert.display());
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_markdown_marks_missing_figures() {
        let figures = |route| RouteFigures {
            route,
            target: "1.2.3.4:443".into(),
            p50_us: Some(100.0),
            p90_us: None,
            p99_us: Some(300.0),
            p999_us: None,
            achieved_rps: Some(1000.0),
            errors: Some(0),
            gateway_cpu_per_krps: None,
            node_proxy_cpu_per_krps: None,
            max_rps: Some(8000.0),
            max_rps_stopped: Some("at 10000 req/s: p99 12000 µs".into()),
            handshakes_per_s: Some(2000.0),
            handshake_p50_us: None,
            handshake_p99_us: None,
            notes: vec![],
        };
        let mut gateway = figures("gateway → plain backend");
        gateway.p50_us = Some(250.0);
        gateway.max_rps = Some(4000.0);
        let report = GatewayReport {
            quick: true,
            fixed_rate_s: 5,
            handshakes_s: 3,
            ladder_step_s: 2,
            routes: vec![figures("direct TLS"), gateway],
            memory: GatewayMemory {
                rss_idle_mib: 9.5,
                anonymous_idle_mib: 3.0,
                held: 1000,
                closed_by_peer: Some(0),
                rss_held_mib: None,
                per_connection_kib: None,
                rss_after_runs_mib: 12.0,
                note: Some("the connections were not all opened".into()),
            },
        };
        let md = markdown(&report);
        assert!(md.contains("| direct TLS | gateway → plain backend |"), "{md}");
        assert!(md.contains("p50 +150 µs"), "{md}");
        assert!(md.contains("highest rate × 0.50"), "{md}");
        assert!(md.contains("| RSS with 1000 open client TLS connections | — MiB |"), "{md}");
        assert!(md.contains("- memory: the connections were not all opened"), "{md}");
        assert!(md.contains("the rate climb stopped at 10000 req/s"), "{md}");
    }
}
