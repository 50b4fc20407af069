//! `strait-bench same-node` (CAP-1, OPS-1): same-node pod → pod through the node proxy, whose
//! admitted plain TCP moves in the kernel (splice) unless `--fast-path off`.
//!
//! One node: an enrolled client and server, and a client and server outside the mesh beside
//! them (direct). Measured in one run, in turn: direct; the node proxy with `--fast-path off`
//! (the userspace copy, "before"); the node proxy with the fast path on ("after"). For each:
//! one TCP stream's throughput, and p50/p99 at 1,000 req/s over 8 keep-alive connections with
//! 1 KiB answers, with the proxy's CPU per 1,000 req/s. Benchmarks, not tests: a figure that
//! cannot be taken is a note in the report.

use std::{fmt::Write as _, fs, path::Path as FsPath, thread, time::Duration, time::Instant};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;
use strait_testbed::{Pod, Process, Topology, k8s};

use crate::report::cell;
use crate::scenarios::{procfs, run_load, start_load_servers, start_proxy_with};

const PORT: u16 = 8080;
const MESH_NS: &str = "same-node";

/// One way of reaching the server.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Run {
    pub label: String,
    pub gbit_per_s: Option<f64>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// The node proxy's CPU per 1,000 req/s during the latency run, vCPU.
    pub proxy_vcpu_per_krps: Option<f64>,
    pub errors: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SameNodeReport {
    pub quick: bool,
    pub stream_bytes: u64,
    pub rate_s: u64,
    pub runs: Vec<Run>,
    pub fast_path_connections: Option<u64>,
    pub notes: Vec<String>,
}

pub fn run(quick: bool) -> anyhow::Result<SameNodeReport> {
    let (bytes, secs) = if quick { (512u64 << 20, 8u64) } else { (2u64 << 30, 30) };
    let topo = Topology::new("bench-same").context("cannot build the bench topology (run as root)")?;
    let node = topo.add_node("node1")?;
    let client = topo.add_pod(&node, "client")?;
    let server = topo.add_pod(&node, "server")?;
    let client_direct = topo.add_pod(&node, "client-direct")?;
    let server_direct = topo.add_pod(&node, "server-direct")?;
    let config = [
        k8s::namespace_yaml(MESH_NS, &[("istio.io/dataplane-mode", "ambient")]),
        k8s::namespace_yaml("plain", &[]),
        k8s::pod_yaml(&client, MESH_NS, "client", &[("app", "client")]),
        k8s::pod_yaml(&server, MESH_NS, "server", &[("app", "server")]),
        k8s::pod_yaml(&client_direct, "plain", "client", &[("app", "client")]),
        k8s::pod_yaml(&server_direct, "plain", "server", &[("app", "server")]),
    ]
    .concat();
    topo.write_config("bench.yaml", &config)?;
    let servers = start_load_servers(&[&server, &server_direct], PORT)?;
    let ca = topo.dir().join("ca");
    let mut report = SameNodeReport {
        quick,
        stream_bytes: bytes,
        rate_s: secs,
        runs: Vec::new(),
        fast_path_connections: None,
        notes: Vec::new(),
    };

    let direct_target = format!("{}:{PORT}", server_direct.ip());
    report.runs.push(measure("direct", &client_direct, &direct_target, None, bytes, secs, &mut report.notes));
    let target = format!("{}:{PORT}", server.ip());
    for (label, mode) in [("strait, userspace copy (--fast-path off)", "off"), ("strait, fast path (splice)", "on")] {
        let proxy = start_proxy_with(&topo, &node, &ca, &["--fast-path", mode])?;
        // One request warms the proxy's certificates.
        let _ = run_load(&client, &target, &["connections", "--duration", "1", "--concurrency", "1"]);
        report.runs.push(measure(label, &client, &target, Some(&proxy), bytes, secs, &mut report.notes));
        if mode == "on" {
            report.fast_path_connections = fast_path_connections(&node);
        }
        drop(proxy);
        // The next proxy binds the same ports.
        thread::sleep(Duration::from_millis(500));
    }
    drop(servers);
    Ok(report)
}

fn measure(
    label: &str,
    client: &Pod,
    target: &str,
    proxy: Option<&Process>,
    bytes: u64,
    secs: u64,
    notes: &mut Vec<String>,
) -> Run {
    eprintln!("strait-bench same-node: {label}");
    let mut run = Run { label: label.into(), ..Run::default() };
    match run_load(client, target, &["stream", "--bytes", &bytes.to_string(), "--streams", "1"]) {
        Ok(v) => run.gbit_per_s = v.get("gbit_per_s").and_then(Value::as_f64),
        Err(e) => notes.push(format!("{label}: one stream not measured: {e:#}")),
    }
    let cpu_before = proxy.map(|p| procfs::cpu_seconds(p.pid()));
    let started = Instant::now();
    let secs = secs.to_string();
    let args = ["rate", "--rps", "1000", "--duration", &secs, "--connections", "8", "--path", "/bytes/1024"];
    match run_load(client, target, &args) {
        Ok(v) => {
            run.p50_us = v.get("p50_us").and_then(Value::as_f64);
            run.p99_us = v.get("p99_us").and_then(Value::as_f64);
            run.errors = v.get("errors").and_then(Value::as_u64).unwrap_or(0);
            let achieved = v.get("achieved_rps").and_then(Value::as_f64).unwrap_or(f64::NAN);
            if let (Some(p), Some(before)) = (proxy, cpu_before) {
                let cpu = (procfs::cpu_seconds(p.pid()) - before) / started.elapsed().as_secs_f64();
                run.proxy_vcpu_per_krps = Some(cpu / (achieved / 1000.0));
            }
        }
        Err(e) => notes.push(format!("{label}: latency not measured: {e:#}")),
    }
    run
}

/// `strait_fast_path_connections_total` of the node proxy.
fn fast_path_connections(node: &strait_testbed::Node) -> Option<u64> {
    let text = node.run_ok("curl", &["-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"]).ok()?;
    text.lines().find_map(|l| l.strip_prefix("strait_fast_path_connections_total ")).and_then(|v| v.trim().parse().ok())
}

pub fn markdown(r: &SameNodeReport) -> String {
    let mut md = String::from("# strait same-node: pod → pod on one node\n\n");
    let _ = writeln!(
        md,
        "An enrolled client and server on one node, through the node proxy, and a pair outside \
         the mesh beside them (direct); one {} MiB TCP stream, then 1,000 req/s over 8 keep-alive \
         connections with 1 KiB answers for {} s. Every process shares the machine's cores.{}\n",
        r.stream_bytes >> 20,
        r.rate_s,
        if r.quick { " **Quick run**: short phases, indicative only." } else { "" }
    );
    let _ = writeln!(md, "| path | one stream (Gbit/s) | p50 (µs) | p99 (µs) | proxy vCPU per 1,000 req/s | errors |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for run in &r.runs {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            run.label,
            cell(run.gbit_per_s, 2),
            cell(run.p50_us, 0),
            cell(run.p99_us, 0),
            cell(run.proxy_vcpu_per_krps, 3),
            run.errors
        );
    }
    let _ = writeln!(
        md,
        "\nConnections on the fast path during its run: {}.",
        r.fast_path_connections.map_or_else(|| "not read".to_owned(), |n| n.to_string())
    );
    for note in &r.notes {
        let _ = writeln!(md, "\n- {note}");
    }
    md
}

pub fn write(out: &FsPath, report: &SameNodeReport) -> anyhow::Result<()> {
    fs::write(out.join("same-node.md"), markdown(report))?;
    fs::write(out.join("same-node.json"), serde_json::to_string_pretty(report)?)?;
    Ok(())
}
