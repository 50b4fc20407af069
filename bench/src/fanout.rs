//! `strait-bench fanout` (L4-1, L4-6, OPS-1): what the node proxy's outbound HBONE pool costs
//! when many client pods of one identity share a fixed load.
//!
//! Two nodes. Node 1: N client pods (20 by default, `--fanout-clients`), all of one service
//! account in an enrolled namespace, each running `strait-load rate` with one keep-alive
//! connection; together they send 1,000 req/s (1 KiB bodies). Node 2: two server pods of one
//! identity; client `i` talks to server `i % 2`. Measured: p50/p99 of all requests together,
//! the highest total rate whose p99 stays under 10 ms, the HBONE connections open between the
//! nodes during the run (`ss -tn` in each node's namespace, so runs of any strait version
//! compare; and the node proxy's `/hbone` admin list when it has one), and both node proxies'
//! RSS idle, during the run and right after it (pool still warm). Benchmarks, not tests: a
//! figure that cannot be taken is a note in the report.

use std::{fmt::Write as _, fs, path::Path as FsPath, thread, time::Duration};

use anyhow::{Context as _, bail};
use serde::Serialize;
use serde_json::Value;
use strait_testbed::{Node, Pod, Process, Topology, k8s};

use crate::report::{cell, mib};
use crate::scenarios::{procfs, run_load, start_load_servers, start_proxy};

const PORT: u16 = 8080;
const MESH_NS: &str = "fanout";
const HBONE_PORT: u16 = 15008;
/// The fixed total rate the latency figures are taken at.
const RATE: u32 = 1000;
/// Total rates tried in turn, up to the first that misses (p99 ≥ 10 ms, under 95 % achieved,
/// or an error).
const LADDER: [u32; 12] = [2000, 3000, 4000, 5000, 6000, 8000, 10000, 12500, 15000, 17500, 20000, 25000];

/// One node proxy's memory.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyMemory {
    /// After one warm-up request (certificates issued), before the run, MiB.
    pub idle_mib: f64,
    /// Halfway through the 1,000 req/s run, MiB.
    pub during_mib: f64,
    /// Two seconds after the run, its pooled connections still open, MiB.
    pub after_mib: f64,
    /// (during − idle) / HBONE connections on this node during the run, KiB.
    pub per_connection_kib: Option<f64>,
    /// HBONE connections in this node's namespace (`ss -tn`, established, port 15008).
    pub hbone_connections: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FanoutReport {
    pub quick: bool,
    pub clients: usize,
    pub servers: usize,
    pub rate_s: u64,
    pub ladder_step_s: u64,
    pub p50_us: Option<f64>,
    pub p90_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    pub achieved_rps: Option<f64>,
    pub errors: u64,
    pub max_rps: Option<f64>,
    pub max_rps_stopped: Option<String>,
    /// Node 1's `/hbone` list length during the run; `None` when the proxy has no such endpoint.
    pub admin_hbone_connections: Option<u64>,
    pub nodes: Vec<ProxyMemory>,
    pub notes: Vec<String>,
}

struct Bed {
    nodes: [Node; 2],
    clients: Vec<Pod>,
    servers: Vec<Pod>,
    proxies: Vec<Process>,
    _servers: Vec<Process>,
    /// Last: the processes above stop before their namespaces go.
    _topo: Topology,
}

pub fn run(quick: bool, clients: usize) -> anyhow::Result<FanoutReport> {
    let (rate_s, ladder_step_s) = if quick { (5, 2) } else { (30, 5) };
    let bed = build(clients.max(1))?;
    let mut report = FanoutReport {
        quick,
        clients: bed.clients.len(),
        servers: bed.servers.len(),
        rate_s,
        ladder_step_s,
        p50_us: None,
        p90_us: None,
        p99_us: None,
        p999_us: None,
        achieved_rps: None,
        errors: 0,
        max_rps: None,
        max_rps_stopped: None,
        admin_hbone_connections: None,
        nodes: Vec::new(),
        notes: Vec::new(),
    };
    let idle: Vec<u64> = bed.proxies.iter().map(|p| procfs::rss_bytes(p.pid())).collect();

    eprintln!("strait-bench fanout: {RATE} req/s from {} client pods for {rate_s} s", bed.clients.len());
    // Sampled halfway through the measured window (after the 2 s warm-up).
    let sample_after = Duration::from_secs(2 + rate_s / 2);
    let (runs, sample) = thread::scope(|s| {
        let sampler = s.spawn(|| {
            thread::sleep(sample_after);
            let rss: Vec<u64> = bed.proxies.iter().map(|p| procfs::rss_bytes(p.pid())).collect();
            let ss = [hbone_sockets(&bed.nodes[0], "dport"), hbone_sockets(&bed.nodes[1], "sport")];
            (rss, ss, admin_hbone(&bed.nodes[0]))
        });
        let runs = fan_out(&bed, RATE, rate_s);
        (runs, sampler.join().unwrap_or_default())
    });
    thread::sleep(Duration::from_secs(2));
    let after: Vec<u64> = bed.proxies.iter().map(|p| procfs::rss_bytes(p.pid())).collect();
    match runs {
        Ok(runs) => {
            let merged = Merged::of(&runs);
            report.p50_us = merged.quantile(0.5);
            report.p90_us = merged.quantile(0.9);
            report.p99_us = merged.quantile(0.99);
            report.p999_us = merged.quantile(0.999);
            report.achieved_rps = Some(merged.achieved_rps);
            report.errors = merged.errors;
            if let Some(first) = merged.first_error {
                report.notes.push(format!("{} requests failed at {RATE} req/s; first: {first}", merged.errors));
            }
        }
        Err(e) => report.notes.push(format!("the {RATE} req/s run failed: {e:#}")),
    }
    let (rss, ss, admin) = sample;
    report.admin_hbone_connections = admin;
    for i in 0..bed.proxies.len() {
        let (idle, during, conns) = (idle[i], rss.get(i).copied().unwrap_or(0), ss.get(i).copied().flatten());
        report.nodes.push(ProxyMemory {
            idle_mib: mib(idle),
            during_mib: mib(during),
            after_mib: mib(after[i]),
            per_connection_kib: conns
                .filter(|n| *n > 0)
                .map(|n| during.saturating_sub(idle) as f64 / 1024.0 / n as f64),
            hbone_connections: conns.unwrap_or(0),
        });
    }

    eprintln!("strait-bench fanout: highest total rate with p99 < 10 ms, {ladder_step_s} s a step");
    for rate in LADDER {
        match fan_out(&bed, rate, ladder_step_s) {
            Ok(runs) => {
                let merged = Merged::of(&runs);
                let p99 = merged.quantile(0.99).unwrap_or(f64::INFINITY);
                if p99 < 10_000.0 && merged.achieved_rps >= 0.95 * f64::from(rate) && merged.errors == 0 {
                    report.max_rps = Some(f64::from(rate));
                    continue;
                }
                report.max_rps_stopped = Some(format!(
                    "at {rate} req/s: p99 {p99:.0} µs, {:.0} req/s achieved, {} errors",
                    merged.achieved_rps, merged.errors
                ));
            }
            Err(e) => report.max_rps_stopped = Some(format!("at {rate} req/s the run failed: {e:#}")),
        }
        break;
    }
    drop(bed);
    Ok(report)
}

/// Builds the topology, starts the servers and both node proxies, and sends one request from
/// the first client so certificates are issued before the idle figures.
fn build(clients: usize) -> anyhow::Result<Bed> {
    let topo = Topology::new("fanout").context("cannot build the fanout bench topology (run as root)")?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let clients = (0..clients).map(|i| topo.add_pod(&n1, &format!("c{i:02}"))).collect::<Result<Vec<_>, _>>()?;
    let servers = (0..2).map(|i| topo.add_pod(&n2, &format!("s{i}"))).collect::<Result<Vec<_>, _>>()?;
    let mut config = k8s::namespace_yaml(MESH_NS, &[("istio.io/dataplane-mode", "ambient")]);
    for pod in &clients {
        config.push_str(&k8s::pod_yaml(pod, MESH_NS, "client", &[("app", "client")]));
    }
    for pod in &servers {
        config.push_str(&k8s::pod_yaml(pod, MESH_NS, "server", &[("app", "server")]));
    }
    topo.write_config("fanout.yaml", &config)?;
    let server_processes = start_load_servers(&servers.iter().collect::<Vec<_>>(), PORT)?;
    let ca = topo.dir().join("ca");
    let proxies = vec![start_proxy(&topo, &n1, &ca)?, start_proxy(&topo, &n2, &ca)?];
    let bed = Bed { nodes: [n1, n2], clients, servers, proxies, _servers: server_processes, _topo: topo };
    let first = bed.clients.first().context("no client pods")?;
    run_load(first, &bed.target(0), &["connections", "--duration", "1", "--concurrency", "1"])?;
    thread::sleep(Duration::from_millis(500));
    Ok(bed)
}

impl Bed {
    fn target(&self, client: usize) -> String {
        format!("{}:{PORT}", self.servers[client % self.servers.len()].ip())
    }
}

/// Every client pod runs `strait-load rate` at its share of `total` req/s at the same time; their
/// JSON results.
fn fan_out(bed: &Bed, total: u32, secs: u64) -> anyhow::Result<Vec<Value>> {
    let n = u32::try_from(bed.clients.len()).unwrap_or(u32::MAX).max(1);
    let secs = secs.to_string();
    thread::scope(|s| {
        let handles: Vec<_> = bed
            .clients
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let share = total / n + u32::from(u32::try_from(i).unwrap_or(u32::MAX) < total % n);
                let target = bed.target(i);
                let secs = &secs;
                s.spawn(move || {
                    let rps = share.max(1).to_string();
                    let args =
                        ["rate", "--rps", &rps, "--duration", secs, "--connections", "1", "--path", "/bytes/1024"];
                    run_load(pod, &target, &args)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("a load thread panicked"))?).collect()
    })
}

/// Established TCP connections with `port_side` (`dport` or `sport`) 15008 in `node`'s namespace.
fn hbone_sockets(node: &Node, port_side: &str) -> Option<u64> {
    let filter = format!("( {port_side} = :{HBONE_PORT} )");
    let out = node.run("ss", &["-Htn", "state", "established", &filter]).ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()).count() as u64)
}

/// The length of node 1's `/hbone` admin list, if the proxy serves one.
fn admin_hbone(node: &Node) -> Option<u64> {
    let out = node.run("curl", &["-sf", "--max-time", "2", "http://127.0.0.1:15000/hbone"]).ok()?;
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v.as_array().map(|a| a.len() as u64)
}

/// Many `strait-load rate` results as one: summed counts, and the latency distribution of all
/// requests together, from each run's chart points weighted by its request count.
struct Merged {
    achieved_rps: f64,
    errors: u64,
    first_error: Option<String>,
    /// Per run: its successful requests and its `(value_us, cumulative_fraction)` points.
    runs: Vec<(f64, Vec<(f64, f64)>)>,
}

impl Merged {
    fn of(runs: &[Value]) -> Merged {
        let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        Merged {
            achieved_rps: runs.iter().map(|v| num(v, "achieved_rps")).sum(),
            errors: runs.iter().filter_map(|v| v.get("errors").and_then(Value::as_u64)).sum(),
            first_error: runs.iter().find_map(|v| v.get("first_error").and_then(Value::as_str)).map(String::from),
            runs: runs
                .iter()
                .map(|v| {
                    let points = v
                        .get("histogram")
                        .and_then(Value::as_array)
                        .map(|a| a.iter().filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?))).collect())
                        .unwrap_or_default();
                    (num(v, "requests"), points)
                })
                .collect(),
        }
    }

    /// The smallest latency at which the request-weighted share of all runs at or below it
    /// reaches `q`. Each run's share at `x` is the largest chart fraction whose value is ≤ x, so
    /// the result is exact at the chart's points (which include p50, p90, p99, p99.9) and
    /// conservative between them.
    fn quantile(&self, q: f64) -> Option<f64> {
        let total: f64 = self.runs.iter().map(|(w, _)| w).sum();
        if total <= 0.0 {
            return None;
        }
        let mut candidates: Vec<f64> = self.runs.iter().flat_map(|(_, p)| p.iter().map(|(v, _)| *v)).collect();
        candidates.sort_by(f64::total_cmp);
        candidates.dedup();
        candidates.into_iter().find(|&x| {
            let share: f64 = self
                .runs
                .iter()
                .map(|(w, points)| {
                    let f = points.iter().filter(|(v, _)| *v <= x).map(|(_, f)| *f).fold(0.0, f64::max);
                    w * f
                })
                .sum();
            // A hair of slack for the six-decimal rounding of the chart's fractions.
            share / total >= q - 1e-9
        })
    }
}

pub fn markdown(r: &FanoutReport) -> String {
    let mut md = String::from("# strait fanout: many client pods of one identity\n\n");
    let _ = writeln!(
        md,
        "{} client pods (one service account, enrolled) on node 1, each with one keep-alive \
         connection, share {RATE} req/s of `GET /bytes/1024` to {} server pods of one identity on \
         node 2 (client i → server i mod {}); every process shares the machine's cores.{}\n",
        r.clients,
        r.servers,
        r.servers,
        if r.quick { " **Quick run**: short phases, indicative only." } else { "" }
    );
    let _ = writeln!(md, "| figure | value |\n|---|---|");
    let rows = [
        (format!("p50 at {RATE} req/s ({} s), µs", r.rate_s), cell(r.p50_us, 0)),
        (format!("p90 at {RATE} req/s, µs"), cell(r.p90_us, 0)),
        (format!("p99 at {RATE} req/s, µs"), cell(r.p99_us, 0)),
        (format!("p99.9 at {RATE} req/s, µs"), cell(r.p999_us, 0)),
        ("achieved req/s".into(), cell(r.achieved_rps, 0)),
        ("errors".into(), r.errors.to_string()),
        (format!("highest total rate with p99 < 10 ms ({} s a step), req/s", r.ladder_step_s), cell(r.max_rps, 0)),
        (
            "node 1 `/hbone` entries during the run".into(),
            r.admin_hbone_connections.map_or("— (no endpoint)".into(), |n| n.to_string()),
        ),
    ];
    for (name, value) in rows {
        let _ = writeln!(md, "| {name} | {value} |");
    }
    for (i, n) in r.nodes.iter().enumerate() {
        let node = i + 1;
        let _ = writeln!(
            md,
            "| node {node}: HBONE connections during the run (`ss -tn`, :15008) | {} |",
            n.hbone_connections
        );
        let _ = writeln!(
            md,
            "| node {node} proxy RSS idle / during / after the run, MiB | {:.1} / {:.1} / {:.1} |",
            n.idle_mib, n.during_mib, n.after_mib
        );
        let _ = writeln!(md, "| node {node}: (during − idle) / connections, KiB | {} |", cell(n.per_connection_kib, 1));
    }
    if let Some(stopped) = &r.max_rps_stopped {
        let _ = writeln!(md, "\nThe climb stopped {stopped}.");
    }
    for note in &r.notes {
        let _ = writeln!(md, "\nNote: {note}");
    }
    md
}

pub fn write(out: &FsPath, report: &FanoutReport) -> anyhow::Result<()> {
    fs::write(out.join("fanout.md"), markdown(report))?;
    fs::write(out.join("fanout.json"), serde_json::to_string_pretty(report)?)?;
    Ok(())
}

/// Fails when `clients` is not a usable count.
pub fn check_clients(clients: usize) -> anyhow::Result<()> {
    if clients == 0 || clients > 200 {
        bail!("--fanout-clients must be between 1 and 200, not {clients}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(requests: u64, points: &[(u64, f64)]) -> Value {
        serde_json::json!({"requests": requests, "errors": 0, "achieved_rps": 50.0, "histogram": points})
    }

    #[test]
    fn merged_quantiles_weigh_runs_by_their_requests() {
        // Run a: everything at 100 µs; run b (three times the requests): everything at 300 µs.
        let a = run(100, &[(100, 0.0), (100, 0.5), (100, 0.99), (100, 1.0)]);
        let b = run(300, &[(300, 0.0), (300, 0.5), (300, 0.99), (300, 1.0)]);
        let merged = Merged::of(&[a, b]);
        assert_eq!(merged.quantile(0.2), Some(100.0));
        assert_eq!(merged.quantile(0.25), Some(100.0));
        assert_eq!(merged.quantile(0.5), Some(300.0));
        assert_eq!(merged.quantile(0.99), Some(300.0));
        assert_eq!(merged.achieved_rps, 100.0);
    }

    #[test]
    fn one_run_merges_to_itself_and_none_to_nothing() {
        let a = run(1000, &[(80, 0.0), (120, 0.5), (200, 0.9), (900, 0.99), (1500, 0.999), (2000, 1.0)]);
        let merged = Merged::of(&[a]);
        assert_eq!(merged.quantile(0.5), Some(120.0));
        assert_eq!(merged.quantile(0.99), Some(900.0));
        assert_eq!(merged.quantile(0.999), Some(1500.0));
        assert_eq!(Merged::of(&[]).quantile(0.5), None);
    }

    #[test]
    fn client_counts_are_bounded() {
        assert!(check_clients(20).is_ok());
        assert!(check_clients(0).is_err());
        assert!(check_clients(201).is_err());
    }
}
