//! The waypoint path: client pod → node-1 proxy → HBONE → waypoint (a pod on node 1) → HBONE →
//! node-2 proxy → server pod, so the L7 proxy's cost shows next to the node-only path.
//!
//! It is set up beside the node path without changing it: its own server pod behind a Service
//! labelled `istio.io/use-waypoint`. The namespace carries no such label, so traffic to pod IPs
//! (the mesh path) still skips the waypoint and measures what it measured before.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read as _, Seek as _, SeekFrom},
    path::Path as FsPath,
    thread,
    time::{Duration, Instant},
};

use anyhow::bail;
use serde_json::Value;
use strait_testbed::{Pod, Process, bin_path, k8s};

use super::{Bed, MESH_NS, PORT, Path, TIMEOUT, errors_of, f, procfs, requests::rate_run, run_load};

/// The waypoint's name (and service account, as Istio deploys it).
const NAME: &str = "waypoint";
/// The label Istio puts on a waypoint's pods, naming their waypoint.
const POD_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
const SERVICE: &str = "server-wp";
const VIP: &str = "10.96.0.50";
const SERVICE_PORT: u16 = 80;

/// The running waypoint and its memory once warm.
pub(super) struct Waypoint {
    pub process: Process,
    /// RSS after warm-up (certificates issued, one request through), bytes.
    pub idle_rss: u64,
    /// Anonymous (private) memory at the same moment, bytes.
    pub idle_anonymous: u64,
}

/// What marks the waypoint's access lines (one per request), as against its warnings.
const ACCESS_LINE: &str = " waypoint http ";

impl Waypoint {
    /// If the waypoint has exited: its exit status and the last lines it logged other than
    /// access lines (its warnings and errors), for the report.
    pub fn exited(&self) -> Option<String> {
        let status = self.process.wait_exit(Duration::ZERO)?;
        let log = self.process.log();
        let lines: Vec<&str> = log.lines().filter(|l| !l.contains(ACCESS_LINE)).collect();
        let tail = lines[lines.len().saturating_sub(5)..].join("\n");
        let last = if tail.is_empty() { "no warnings before".into() } else { format!("it last said:\n{tail}") };
        Some(format!("the waypoint has exited ({status}; log {}); {last}", log_path(&self.process)))
    }

    /// Where its log ends now, to read what a run added.
    fn log_end(&self) -> u64 {
        fs::metadata(self.process.log_path()).map_or(0, |m| m.len())
    }

    /// The requests the waypoint answered with anything but 200 since `from` (a log offset),
    /// counted by status and response flags: "12 × status=503 flags=UF".
    fn failures_since(&self, from: u64) -> Option<String> {
        let mut added = String::new();
        let mut file = fs::File::open(self.process.log_path()).ok()?;
        file.seek(SeekFrom::Start(from)).ok()?;
        file.read_to_string(&mut added).ok()?;
        failure_kinds(&added)
    }
}

/// Access lines in `log` with a status other than 200, counted by status and flags.
fn failure_kinds(log: &str) -> Option<String> {
    let mut counts = BTreeMap::<String, u64>::new();
    for line in log.lines().filter(|l| l.contains(ACCESS_LINE) && !l.contains(" status=200 ")) {
        let field = |key: &str| line.split(' ').find(|w| w.starts_with(key)).unwrap_or("").to_owned();
        *counts.entry(format!("{} {}", field("status="), field("flags="))).or_default() += 1;
    }
    let listed: Vec<String> = counts.iter().map(|(kind, n)| format!("{n} × {kind}")).collect();
    (!listed.is_empty()).then(|| format!("the waypoint logged {}", listed.join(", ")))
}

/// What the 1,000 req/s run through the waypoint measured besides latency.
#[derive(Clone)]
pub(super) struct WaypointLoad {
    /// vCPU per 1,000 req/s of the waypoint process alone.
    pub waypoint_cpu: f64,
    /// vCPU per 1,000 req/s of the whole path: both node proxies and the waypoint.
    pub path_cpu: f64,
    /// The waypoint's RSS as the run ended, bytes.
    pub rss_after: u64,
    /// Failed requests in the run, and the note saying so.
    pub errors: Option<u64>,
    pub note: Option<String>,
}

/// Where the client sends for the waypoint path: the service VIP.
pub(super) fn target() -> String {
    format!("{VIP}:{SERVICE_PORT}")
}

/// The waypoint's pod, the server pod behind it and their Service, in the mesh namespace.
pub(super) fn config(waypoint: &Pod, server: &Pod) -> String {
    let selector = [("app", SERVICE)];
    [
        k8s::pod_yaml(waypoint, MESH_NS, NAME, &[(POD_LABEL, NAME)]),
        k8s::pod_yaml(server, MESH_NS, "server", &selector),
        k8s::named_service_yaml(
            SERVICE,
            MESH_NS,
            VIP,
            &[("http", SERVICE_PORT, PORT)],
            &selector,
            &[("istio.io/use-waypoint", NAME)],
        ),
    ]
    .concat()
}

/// Starts `strait waypoint` in its pod, sends one request through it and measures it idle.
pub(super) fn start(bed: &Bed, pod: &Pod, ca: &FsPath) -> anyhow::Result<Waypoint> {
    let config = bed.topo.config_dir();
    let args = [
        "waypoint",
        "--config",
        config.to_str().unwrap_or_default(),
        "--name",
        NAME,
        "--namespace",
        MESH_NS,
        "--ca-dir",
        ca.to_str().unwrap_or_default(),
    ];
    // Warn level like the node proxies; its access lines (one per request) still go to its log.
    let process = pod.spawn("waypoint", bin_path("strait"), &args, &[("STRAIT_LOG", "warn")])?;
    // At warn level the ready line is not logged: wait for the readiness endpoint in its pod.
    let deadline = Instant::now() + TIMEOUT;
    while !pod.run("curl", &["-sf", "--max-time", "1", "http://127.0.0.1:15021/healthz/ready"])?.status.success() {
        if Instant::now() > deadline || !process.is_running() {
            bail!("strait waypoint did not start; its log {} ends with:\n{}", log_path(&process), process.log_tail());
        }
        thread::sleep(Duration::from_millis(50));
    }
    warm_up(bed, &process)?;
    thread::sleep(Duration::from_millis(500));
    let pid = process.pid();
    Ok(Waypoint { idle_rss: procfs::rss_bytes(pid), idle_anonymous: procfs::anonymous_bytes(pid), process })
}

/// One request through the waypoint issues its certificate for the server's node and opens the
/// HBONE connections on both sides of it. Retried a few times: a first request may race the
/// proxies' view of the configuration, and a failure here costs every waypoint figure.
fn warm_up(bed: &Bed, process: &Process) -> anyhow::Result<()> {
    let args = ["rate", "--rps", "1", "--duration", "1", "--warmup", "0", "--connections", "1"];
    let mut last = String::new();
    for _ in 0..5 {
        match run_load(&bed.client, &target(), &args) {
            Ok(v) if v.get("errors").and_then(Value::as_u64) == Some(0) => return Ok(()),
            Ok(v) => last = errors_of(&v).1.unwrap_or_else(|| format!("unexpected result {v}")),
            Err(e) => last = format!("{e:#}"),
        }
        if !process.is_running() {
            break;
        }
        thread::sleep(Duration::from_millis(500));
    }
    bail!(
        "no request got through the waypoint ({last}); its log {} ends with:\n{}",
        log_path(process),
        process.log_tail()
    )
}

fn log_path(process: &Process) -> String {
    process.log_path().display().to_string()
}

/// The 1,000 req/s run (8 connections, 1 KiB) through the waypoint, with the CPU of each
/// proxy on the path and the waypoint's RSS as it ends; recorded in the bed for the cpu and
/// memory scenarios. A failure is a reason for the report, not the end of the bench.
pub(super) fn measured_load(bed: &Bed, secs: &str) -> Result<(Value, WaypointLoad), String> {
    let outcome = measure(bed, secs);
    *bed.waypoint_load.borrow_mut() = Some(outcome.as_ref().map(|(_, load)| load.clone()).map_err(Clone::clone));
    outcome
}

fn measure(bed: &Bed, secs: &str) -> Result<(Value, WaypointLoad), String> {
    let waypoint = bed.waypoint().map_err(|e| format!("{e:#}"))?;
    let pid = waypoint.process.pid();
    let (nodes_before, waypoint_before, log_from) =
        (bed.proxy_cpu_seconds(), procfs::cpu_seconds(pid), waypoint.log_end());
    let started = Instant::now();
    let run = rate_run(bed, Path::Waypoint, 1000, secs, "8");
    let elapsed = started.elapsed().as_secs_f64();
    let rss_after = procfs::rss_bytes(pid);
    let v = run.map_err(|e| explain(waypoint, format!("{e:#}"), log_from))?;
    let cpu = procfs::cpu_seconds(pid) - waypoint_before;
    let nodes = bed.proxy_cpu_seconds() - nodes_before;
    let krps = f(&v, "achieved_rps") / 1000.0;
    let (errors, note) = errors_of(&v);
    let note = note.map(|n| explain(waypoint, n, log_from)).or_else(|| waypoint.exited());
    let load = WaypointLoad {
        waypoint_cpu: cpu / elapsed / krps,
        path_cpu: (cpu + nodes) / elapsed / krps,
        rss_after,
        errors,
        note,
    };
    Ok((v, load))
}

/// `what` went wrong with requests through the waypoint since `log_from`: adds what the
/// waypoint logged about them and whether it is still running.
pub(super) fn explain(waypoint: &Waypoint, what: String, log_from: u64) -> String {
    [Some(what), waypoint.failures_since(log_from), waypoint.exited()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("; ")
}

/// Where the waypoint's log ends, if it runs: passed back to [`explain`] after a run.
pub(super) fn log_mark(bed: &Bed) -> Option<u64> {
    bed.waypoint.as_ref().ok().map(Waypoint::log_end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_requests_are_counted_by_status_and_flags() {
        let log = "\
[t] waypoint http src.addr=a method=GET status=200 flags=- upstream=x
[t] waypoint http src.addr=a method=GET status=503 flags=UF upstream=x
WARN strait::waypoint: upstream connect failed status=503 flags=UF
[t] waypoint http src.addr=a method=GET status=503 flags=UF upstream=x
[t] waypoint http src.addr=a method=GET status=504 flags=UT upstream=x
";
        assert_eq!(
            failure_kinds(log).as_deref(),
            Some("the waypoint logged 2 × status=503 flags=UF, 1 × status=504 flags=UT")
        );
        assert_eq!(failure_kinds("[t] waypoint http status=200 flags=- x\n"), None);
    }
}
