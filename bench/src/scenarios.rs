//! The test bed and the scenarios. Every scenario sends the same workload direct (pods outside
//! the mesh on the same two nodes) and through the mesh (enrolled pods, node proxies, HBONE),
//! in the same run, so that ratios compare like with like on whatever machine runs them.

use std::{
    cell::RefCell,
    fs, thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use strait_testbed::{Node, Pod, Process, Topology, bin_path, k8s};

use crate::report::{Better, Distribution, Figure, Results, Target};

pub const ALL: [&str; 7] = ["throughput", "latency", "cpu", "max-rps", "connections", "sequential", "memory"];

const PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(20);

/// Two nodes; on node 1 a client in the mesh and one outside it; on node 2 a server of each.
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
    /// CPU of both proxies per 1,000 req/s, measured by the latency scenario.
    cpu_per_krps: RefCell<Option<f64>>,
}

/// Which path a workload takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    Mesh,
}

impl Bed {
    pub fn build(quick: bool) -> anyhow::Result<Bed> {
        let topo = Topology::new("bench").context("cannot build the bench topology (run as root)")?;
        let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
        let client = topo.add_pod(&n1, "client")?;
        let client_direct = topo.add_pod(&n1, "client-direct")?;
        let server = topo.add_pod(&n2, "server")?;
        let server_direct = topo.add_pod(&n2, "server-direct")?;
        let config = [
            k8s::namespace_yaml("mesh", &[("istio.io/dataplane-mode", "ambient")]),
            k8s::namespace_yaml("plain", &[]),
            k8s::pod_yaml(&client, "mesh", "client", &[("app", "client")]),
            k8s::pod_yaml(&server, "mesh", "server", &[("app", "server")]),
            k8s::pod_yaml(&client_direct, "plain", "client", &[("app", "client")]),
            k8s::pod_yaml(&server_direct, "plain", "server", &[("app", "server")]),
        ]
        .concat();
        topo.write_config("bench.yaml", &config)?;
        let load = bin_path("strait-load");
        let mut servers = Vec::new();
        for pod in [&server, &server_direct] {
            let process = pod.spawn(
                &format!("load-server-{}", pod.name()),
                &load,
                &["server", "--port", &PORT.to_string()],
                &[],
            )?;
            process.wait_for_log("listening on", TIMEOUT)?;
            servers.push(process);
        }
        let ca = topo.dir().join("ca");
        let mut proxies = Vec::new();
        for node in [&n1, &n2] {
            proxies.push(start_proxy(&topo, node, &ca)?);
        }
        let bed = Bed {
            quick,
            topo,
            client,
            client_direct,
            server,
            server_direct,
            proxies,
            _servers: servers,
            idle_rss: Vec::new(),
            cpu_per_krps: RefCell::new(None),
        };
        // One request each way warms certificates and the HBONE pool.
        for path in [Path::Direct, Path::Mesh] {
            bed.load(path, &["connections", "--duration", "1", "--concurrency", "1"])?;
        }
        thread::sleep(Duration::from_millis(500));
        let idle_rss = bed.proxies.iter().map(|p| rss_bytes(p.pid())).collect();
        Ok(Bed { idle_rss, ..bed })
    }

    fn pods(&self, path: Path) -> (&Pod, &Pod) {
        match path {
            Path::Direct => (&self.client_direct, &self.server_direct),
            Path::Mesh => (&self.client, &self.server),
        }
    }

    /// Runs `strait-load <args> --target <server>` in the path's client pod; its JSON result.
    fn load(&self, path: Path, args: &[&str]) -> anyhow::Result<Value> {
        let (client, server) = self.pods(path);
        let target = format!("{}:{PORT}", server.ip());
        let mut full: Vec<&str> = args.to_vec();
        full.extend_from_slice(&["--target", &target]);
        let out = client.run(bin_path("strait-load"), &full)?;
        if !out.status.success() {
            bail!("strait-load {} failed: {}", full.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        serde_json::from_slice(&out.stdout).with_context(|| format!("strait-load {} printed no JSON", full.join(" ")))
    }

    fn proxy_cpu_seconds(&self) -> f64 {
        self.proxies.iter().map(|p| cpu_seconds(p.pid())).sum()
    }

    fn secs(&self, full: u64, quick: u64) -> String {
        (if self.quick { quick } else { full }).to_string()
    }
}

fn start_proxy(topo: &Topology, node: &Node, ca: &std::path::Path) -> anyhow::Result<Process> {
    let config = topo.config_dir();
    let pins = node.bpf_pin_dir();
    let args = [
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

pub fn run(bed: &Bed, name: &str, results: &mut Results) -> anyhow::Result<()> {
    match name {
        "throughput" => throughput(bed, results),
        "latency" => latency(bed, results),
        "cpu" => cpu(bed, results),
        "max-rps" => max_rps(bed, results),
        "connections" => connections(bed, results),
        "sequential" => sequential(bed, results),
        "memory" => memory(bed, results),
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
        });
    }
    Ok(())
}

/// Open loop at 1,000 req/s, 8 keep-alive connections, 1 KiB bodies (BENCHMARKS.md).
fn rate_run(bed: &Bed, path: Path, rps: u32, secs: &str, connections: &str) -> anyhow::Result<Value> {
    let rps = rps.to_string();
    let args = ["rate", "--rps", &rps, "--duration", secs, "--connections", connections, "--path", "/bytes/1024"];
    bed.load(path, &args)
}

fn latency(bed: &Bed, results: &mut Results) -> anyhow::Result<()> {
    let secs = bed.secs(30, 8);
    let direct = rate_run(bed, Path::Direct, 1000, &secs, "8")?;
    let cpu_before = bed.proxy_cpu_seconds();
    let started = Instant::now();
    let mesh = rate_run(bed, Path::Mesh, 1000, &secs, "8")?;
    let cpu = (bed.proxy_cpu_seconds() - cpu_before) / started.elapsed().as_secs_f64();
    let achieved = f(&mesh, "achieved_rps");
    *bed.cpu_per_krps.borrow_mut() = Some(cpu / (achieved / 1000.0));
    for (key, label, target) in [
        ("p50_us", "p50", Some(Target::Added(120.0))),
        ("p90_us", "p90", None),
        ("p99_us", "p99", Some(Target::Added(240.0))),
        ("p999_us", "p99.9", None),
    ] {
        results.add(Figure {
            scenario: "latency",
            name: format!("{label} at 1,000 req/s, 8 conns, 1 KiB"),
            unit: "µs",
            direct: Some(f(&direct, key)),
            mesh: f(&mesh, key),
            better: Better::Lower,
            target,
        });
    }
    for (label, v) in [("direct", &direct), ("strait", &mesh)] {
        let points = v
            .get("histogram")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?))).collect())
            .unwrap_or_default();
        results.latency.push(Distribution { label: label.into(), points });
    }
    add_cpu(bed, results);
    Ok(())
}

fn add_cpu(bed: &Bed, results: &mut Results) {
    if let Some(cpu) = *bed.cpu_per_krps.borrow() {
        if results.figures.iter().any(|f| f.scenario == "cpu") {
            return;
        }
        results.add(Figure {
            scenario: "cpu",
            name: "both proxies, per 1,000 req/s".into(),
            unit: "vCPU",
            direct: None,
            mesh: cpu,
            better: Better::Lower,
            target: Some(Target::Absolute(0.12)),
        });
    }
}

fn cpu(bed: &Bed, results: &mut Results) -> anyhow::Result<()> {
    if bed.cpu_per_krps.borrow().is_none() {
        let cpu_before = bed.proxy_cpu_seconds();
        let started = Instant::now();
        let mesh = rate_run(bed, Path::Mesh, 1000, &bed.secs(30, 8), "8")?;
        let cpu = (bed.proxy_cpu_seconds() - cpu_before) / started.elapsed().as_secs_f64();
        *bed.cpu_per_krps.borrow_mut() = Some(cpu / (f(&mesh, "achieved_rps") / 1000.0));
    }
    add_cpu(bed, results);
    Ok(())
}

/// The highest rate whose p99 stays under 10 ms (and that is actually achieved).
fn max_rps(bed: &Bed, results: &mut Results) -> anyhow::Result<()> {
    const RATES: [u32; 14] =
        [2000, 4000, 6000, 8000, 10000, 12500, 15000, 17500, 20000, 25000, 30000, 35000, 40000, 50000];
    let secs = bed.secs(5, 3);
    let mut best = [0.0; 2];
    for (i, path) in [Path::Direct, Path::Mesh].into_iter().enumerate() {
        for rate in RATES {
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
            let v = bed.load(path, &args)?;
            let ok =
                f(&v, "p99_us") < 10_000.0 && f(&v, "achieved_rps") >= 0.95 * f64::from(rate) && f(&v, "errors") == 0.0;
            if !ok {
                break;
            }
            best[i] = f64::from(rate);
        }
    }
    results.add(Figure {
        scenario: "max-rps",
        name: "highest rate with p99 < 10 ms, 8 conns".into(),
        unit: "req/s",
        direct: Some(best[0]),
        mesh: best[1],
        better: Better::Higher,
        target: Some(Target::Absolute(15000.0)),
    });
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
    });
    Ok(())
}

fn memory(bed: &Bed, results: &mut Results) -> anyhow::Result<()> {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    for (i, idle) in bed.idle_rss.iter().enumerate() {
        results.add(Figure {
            scenario: "memory",
            name: format!("RSS of node {} proxy, idle (certificates and pool warm)", i + 1),
            unit: "MiB",
            direct: None,
            mesh: mib(*idle),
            better: Better::Lower,
            target: Some(Target::Absolute(10.0)),
        });
    }
    // RSS counts the pages of the binary and libc the process touched, which are shared with
    // every other process mapping them; the private (anonymous) part is what one more proxy costs.
    for (i, proxy) in bed.proxies.iter().enumerate() {
        results.add(Figure {
            scenario: "memory",
            name: format!("private (anonymous) memory of node {} proxy, idle", i + 1),
            unit: "MiB",
            direct: None,
            mesh: mib(anonymous_bytes(proxy.pid())),
            better: Better::Lower,
            target: None,
        });
    }
    let counts: &[u32] = if bed.quick { &[1000] } else { &[1000, 10_000] };
    for &count in counts {
        let before: Vec<u64> = bed.proxies.iter().map(|p| rss_bytes(p.pid())).collect();
        let ready = bed.topo.dir().join(format!("hold-{count}.ready"));
        let _ = fs::remove_file(&ready);
        let target = format!("{}:{PORT}", bed.server.ip());
        let args = [
            "hold",
            "--target",
            &target,
            "--count",
            &count.to_string(),
            "--ready-file",
            ready.to_str().unwrap_or_default(),
        ];
        let hold = bed.client.spawn(&format!("hold-{count}"), bin_path("strait-load"), &args, &[])?;
        wait_for_file(&ready, &hold)?;
        thread::sleep(Duration::from_secs(1));
        let held: Vec<u64> = bed.proxies.iter().map(|p| rss_bytes(p.pid())).collect();
        hold.terminate(libc::SIGTERM)?;
        hold.wait_exit(TIMEOUT);
        for (i, (b, h)) in before.iter().zip(&held).enumerate() {
            results.add(Figure {
                scenario: "memory",
                name: format!("RSS of node {} proxy with {count} idle connections", i + 1),
                unit: "MiB",
                direct: None,
                mesh: mib(*h),
                better: Better::Lower,
                target: None,
            });
            results.add(Figure {
                scenario: "memory",
                name: format!("memory per idle connection, node {} proxy ({count} held)", i + 1),
                unit: "KiB",
                direct: None,
                mesh: h.saturating_sub(*b) as f64 / f64::from(count) / 1024.0,
                better: Better::Lower,
                target: Some(Target::Absolute(3.0)),
            });
        }
    }
    Ok(())
}

fn wait_for_file(path: &std::path::Path, process: &Process) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        if Instant::now() > deadline || !process.is_running() {
            bail!("connections were not all opened:\n{}", process.log_tail());
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Resident memory of a process, bytes.
fn rss_bytes(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Anonymous (private, not file-backed) resident memory of a process, bytes.
fn anonymous_bytes(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Anonymous:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// User plus system CPU time of a process, seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}
