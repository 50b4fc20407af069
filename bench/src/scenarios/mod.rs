//! The test bed and the scenarios. Every scenario sends the same workload direct (pods outside
//! the mesh on the same two nodes) and through the mesh (enrolled pods, node proxies, HBONE),
//! in the same run, so that ratios compare like with like on whatever machine runs them; the
//! request scenarios also send it through the namespace's waypoint (see [`waypoint`]).

mod memory;
pub(crate) mod procfs;
mod requests;
mod restart;
pub mod soak;
mod waypoint;

use std::{
    cell::RefCell,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use strait_testbed::{Node, Pod, Process, Topology, bin_path, k8s};

use crate::report::{Better, Figure, Results, Target};
use waypoint::{Waypoint, WaypointLoad};

/// In the order they run; `restart` replaces the node proxies, so it comes last.
pub const ALL: [&str; 8] =
    ["throughput", "latency", "cpu", "max-rps", "connections", "sequential", "memory", "restart"];

const PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(20);
/// The enrolled namespace, home of the client, the servers and the waypoint.
const MESH_NS: &str = "mesh";

/// Two nodes; on node 1 a client in the mesh and one outside it, and the waypoint; on node 2 a
/// server of each, and the server behind the waypoint.
pub struct Bed {
    quick: bool,
    topo: Topology,
    client: Pod,
    client_direct: Pod,
    server: Pod,
    server_direct: Pod,
    proxies: Vec<Process>,
    _servers: Vec<Process>,
    /// Node proxies' RSS before any load, bytes.
    idle_rss: Vec<u64>,
    /// The waypoint, or why it could not be started and warmed up: its figures then say so
    /// while the node path is measured as usual.
    waypoint: Result<Waypoint, String>,
    /// CPU of both proxies per 1,000 req/s, measured by the latency scenario.
    cpu_per_krps: RefCell<Option<f64>>,
    /// The 1,000 req/s run through the waypoint (by latency or cpu, whichever runs first), or
    /// why it failed.
    waypoint_load: RefCell<Option<Result<WaypointLoad, String>>>,
    /// `--profile`: where the latency scenario writes its flame graphs.
    profile: Option<std::path::PathBuf>,
}

/// Which path a workload takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    /// Client pod → node-1 proxy → HBONE → node-2 proxy → server pod, addressed by pod IP.
    Mesh,
    /// The mesh client to the service VIP: node-1 proxy → waypoint → node-2 proxy → server pod.
    Waypoint,
}

impl Bed {
    pub fn build(quick: bool) -> anyhow::Result<Bed> {
        let topo = Topology::new("bench").context("cannot build the bench topology (run as root)")?;
        let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
        let client = topo.add_pod(&n1, "client")?;
        let client_direct = topo.add_pod(&n1, "client-direct")?;
        let server = topo.add_pod(&n2, "server")?;
        let server_direct = topo.add_pod(&n2, "server-direct")?;
        let waypoint_pod = topo.add_pod(&n1, "waypoint")?;
        let server_behind_waypoint = topo.add_pod(&n2, "server-wp")?;
        let config = [
            k8s::namespace_yaml(MESH_NS, &[("istio.io/dataplane-mode", "ambient")]),
            k8s::namespace_yaml("plain", &[]),
            k8s::pod_yaml(&client, MESH_NS, "client", &[("app", "client")]),
            k8s::pod_yaml(&server, MESH_NS, "server", &[("app", "server")]),
            k8s::pod_yaml(&client_direct, "plain", "client", &[("app", "client")]),
            k8s::pod_yaml(&server_direct, "plain", "server", &[("app", "server")]),
            waypoint::config(&waypoint_pod, &server_behind_waypoint),
        ]
        .concat();
        topo.write_config("bench.yaml", &config)?;
        let servers = start_load_servers(&[&server, &server_direct, &server_behind_waypoint], PORT)?;
        let ca = topo.dir().join("ca");
        let mut proxies = Vec::new();
        for node in [&n1, &n2] {
            proxies.push(start_proxy(&topo, node, &ca)?);
        }
        let mut bed = Bed {
            quick,
            topo,
            client,
            client_direct,
            server,
            server_direct,
            proxies,
            _servers: servers,
            idle_rss: Vec::new(),
            waypoint: Err("not started".into()),
            cpu_per_krps: RefCell::new(None),
            waypoint_load: RefCell::new(None),
            profile: None,
        };
        // One request each way warms certificates and the HBONE pool.
        for path in [Path::Direct, Path::Mesh] {
            bed.load(path, &["connections", "--duration", "1", "--concurrency", "1"])?;
        }
        thread::sleep(Duration::from_millis(500));
        // Before the waypoint carries anything, so the node proxies' idle figures stay those of
        // the node path alone, comparable with runs that had no waypoint.
        bed.idle_rss = bed.proxies.iter().map(|p| procfs::rss_bytes(p.pid())).collect();
        bed.waypoint = waypoint::start(&bed, &waypoint_pod, &ca).map_err(|e| {
            let why = format!("the waypoint path could not be set up: {e:#}");
            eprintln!("strait-bench: {why}");
            why
        });
        Ok(bed)
    }

    /// Profiles the proxies during the latency scenario, into `dir`.
    pub fn profile_into(&mut self, dir: std::path::PathBuf) {
        self.profile = Some(dir);
    }

    /// The pod a path's workload runs in, and the address it sends to.
    fn client_and_target(&self, path: Path) -> (&Pod, String) {
        match path {
            Path::Direct => (&self.client_direct, format!("{}:{PORT}", self.server_direct.ip())),
            Path::Mesh => (&self.client, format!("{}:{PORT}", self.server.ip())),
            Path::Waypoint => (&self.client, waypoint::target()),
        }
    }

    /// Runs `strait-load <args> --target <server>` in the path's client pod; its JSON result.
    fn load(&self, path: Path, args: &[&str]) -> anyhow::Result<Value> {
        if path == Path::Waypoint {
            self.waypoint()?;
        }
        let (client, target) = self.client_and_target(path);
        run_load(client, &target, args)
    }

    /// The running waypoint, or why there is none.
    fn waypoint(&self) -> anyhow::Result<&Waypoint> {
        let waypoint = self.waypoint.as_ref().map_err(|why| anyhow::anyhow!("{why}"))?;
        if let Some(exited) = waypoint.exited() {
            bail!("{exited}");
        }
        Ok(waypoint)
    }

    fn proxy_cpu_seconds(&self) -> f64 {
        self.proxies.iter().map(|p| procfs::cpu_seconds(p.pid())).sum()
    }

    fn secs(&self, full: u64, quick: u64) -> String {
        (if self.quick { quick } else { full }).to_string()
    }
}

/// `strait-load server --port <port>` in each of `pods`, each listening before this returns.
pub(crate) fn start_load_servers(pods: &[&Pod], port: u16) -> anyhow::Result<Vec<Process>> {
    let port = port.to_string();
    let mut servers = Vec::new();
    for pod in pods {
        let process = pod.spawn(
            &format!("load-server-{}", pod.name()),
            bin_path("strait-load"),
            &["server", "--port", &port],
            &[],
        )?;
        process.wait_for_log("listening on", TIMEOUT)?;
        servers.push(process);
    }
    Ok(servers)
}

/// Runs `strait-load <args> --target <target>` in `client`; its JSON result.
pub(crate) fn run_load(client: &Pod, target: &str, args: &[&str]) -> anyhow::Result<Value> {
    let mut full: Vec<&str> = args.to_vec();
    full.extend_from_slice(&["--target", target]);
    let out = client.run(bin_path("strait-load"), &full)?;
    if !out.status.success() {
        bail!("strait-load {} failed: {}", full.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("strait-load {} printed no JSON", full.join(" ")))
}

pub(crate) fn start_proxy(topo: &Topology, node: &Node, ca: &std::path::Path) -> anyhow::Result<Process> {
    start_proxy_with(topo, node, ca, &[])
}

/// `start_proxy` with `extra` arguments for `strait node`.
pub(crate) fn start_proxy_with(
    topo: &Topology,
    node: &Node,
    ca: &std::path::Path,
    extra: &[&str],
) -> anyhow::Result<Process> {
    let config = topo.config_dir();
    let pins = node.bpf_pin_dir();
    let mut args = vec![
        "node",
        "--config",
        config.to_str().unwrap_or_default(),
        "--node",
        node.name(),
        "--ca-dir",
        ca.to_str().unwrap_or_default(),
        "--bpf-pin-dir",
        pins.to_str().unwrap_or_default(),
        "--detach-on-exit",
    ];
    args.extend_from_slice(extra);
    let proxy = node.spawn(&format!("strait-{}", node.name()), bin_path("strait"), &args, &[("STRAIT_LOG", "warn")])?;
    // At warn level the ready line is not logged: wait for the admin endpoint instead.
    let deadline = Instant::now() + TIMEOUT;
    while !node.run("curl", &["-sf", "--max-time", "1", "http://127.0.0.1:15000/healthz/ready"])?.status.success() {
        if Instant::now() > deadline || !proxy.is_running() {
            bail!("strait node did not start:\n{}", proxy.log_tail());
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(proxy)
}

fn f(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// Failed requests of a `strait-load` run, and a note saying how many and the first error, for
/// the figures that come from it.
fn errors_of(v: &Value) -> (Option<u64>, Option<String>) {
    let errors = v.get("errors").and_then(Value::as_u64);
    let note = errors.filter(|n| *n > 0).map(|n| {
        let sent = n + v.get("requests").and_then(Value::as_u64).unwrap_or(0);
        let first = v.get("first_error").and_then(Value::as_str).unwrap_or("not reported");
        format!("{} of {} requests failed; first: {first}", thousands(n), thousands(sent))
    });
    (errors, note)
}

/// 12345 as "12,345", as the report writes counts.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn run(bed: &Bed, name: &str, results: &mut Results) -> anyhow::Result<()> {
    match name {
        "throughput" => throughput(bed, results),
        "latency" => requests::latency(bed, results),
        "cpu" => requests::cpu(bed, results),
        "max-rps" => requests::max_rps(bed, results),
        "connections" => connections(bed, results),
        "sequential" => sequential(bed, results),
        "memory" => memory::memory(bed, results),
        "restart" => restart::restart(bed, results),
        other => bail!("unknown scenario {other}"),
    }
}

fn throughput(bed: &Bed, results: &mut Results) -> anyhow::Result<()> {
    let bytes = if bed.quick { 512u64 << 20 } else { 2u64 << 30 };
    for (streams, target) in [(1, Some(Target::Ratio(0.5))), (8, None)] {
        let mut figures = [0.0; 2];
        for (i, path) in [Path::Direct, Path::Mesh].into_iter().enumerate() {
            let v = bed.load(path, &["stream", "--bytes", &bytes.to_string(), "--streams", &streams.to_string()])?;
            figures[i] = f(&v, "gbit_per_s");
        }
        results.add(Figure {
            scenario: "throughput",
            name: format!("{} GiB, {streams} TCP stream{}", bytes >> 30, if streams > 1 { "s" } else { "" })
                .replace("0 GiB", "0.5 GiB"),
            unit: "Gbit/s",
            direct: Some(figures[0]),
            mesh: figures[1],
            better: Better::Higher,
            target,
            errors: None,
            note: None,
        });
    }
    Ok(())
}

fn connections(bed: &Bed, results: &mut Results) -> anyhow::Result<()> {
    let secs = bed.secs(10, 3);
    let mut rates = [0.0; 2];
    for (i, path) in [Path::Direct, Path::Mesh].into_iter().enumerate() {
        let v = bed.load(path, &["connections", "--duration", &secs, "--concurrency", "8"])?;
        rates[i] = f(&v, "per_second");
    }
    results.add(Figure {
        scenario: "connections",
        name: "new connections per second, one small request each".into(),
        unit: "conn/s",
        direct: Some(rates[0]),
        mesh: rates[1],
        better: Better::Higher,
        target: None,
        errors: None,
        note: None,
    });
    Ok(())
}

/// Requests one after another on one keep-alive connection: 10,000 times the round trip of a
/// small request when nothing queues (1 connection at 1,000 req/s leaves it idle between
/// requests), i.e. the per-request cost of the path.
fn sequential(bed: &Bed, results: &mut Results) -> anyhow::Result<()> {
    let secs = bed.secs(5, 2);
    let mut times = [0.0; 2];
    for (i, path) in [Path::Direct, Path::Mesh].into_iter().enumerate() {
        let args = [
            "rate",
            "--rps",
            "1000",
            "--duration",
            &secs,
            "--warmup",
            "1",
            "--connections",
            "1",
            "--path",
            "/bytes/64",
        ];
        let v = bed.load(path, &args)?;
        times[i] = 10_000.0 * f(&v, "mean_us") / 1e6;
    }
    results.add(Figure {
        scenario: "sequential",
        name: "10,000 sequential small requests on one connection".into(),
        unit: "s",
        direct: Some(times[0]),
        mesh: times[1],
        better: Better::Lower,
        target: None,
        errors: None,
        note: None,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_get_thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn errors_are_counted_and_explained() {
        let clean = serde_json::json!({"requests": 8000, "errors": 0});
        assert_eq!(errors_of(&clean), (Some(0), None));
        let failing = serde_json::json!({"requests": 7990, "errors": 10, "first_error": "no response within 10s"});
        let (errors, note) = errors_of(&failing);
        assert_eq!(errors, Some(10));
        assert_eq!(note.as_deref(), Some("10 of 8,000 requests failed; first: no response within 10s"));
    }
}
