//! Shared pieces of strait's end-to-end tests: starting node proxies in a topology and reading
//! what they report.

#![allow(dead_code)] // each test file uses a different subset

pub mod pcap;

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use strait_testbed::{Node, Process, Topology, bin_path};

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
    let strait = bin_path("strait");
    let (config, ca) = (config_dir.to_string_lossy(), ca_dir.to_string_lossy());
    let pins = node.bpf_pin_dir().to_string_lossy().into_owned();
    let mut args = vec!["node", "--config", &config, "--node", node.name(), "--ca-dir", &ca, "--bpf-pin-dir", &pins];
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

/// tcpdump on the underlay (every interface of the fabric namespace) while a test step runs.
pub struct UnderlayCapture {
    process: Process,
    file: PathBuf,
}

impl UnderlayCapture {
    pub fn start(topo: &Topology) -> io::Result<Self> {
        let file = topo.dir().join(format!("underlay-{}.pcap", std::process::id()));
        let path = file.to_string_lossy().into_owned();
        // `-Z root`: write the file as root (the topology directory is root's); immediate mode so
        // nothing captured is still buffered when it stops.
        let args = ["-i", "any", "-Z", "root", "--immediate-mode", "-U", "-n", "-w", &path, "tcp"];
        let process = topo.fabric().spawn("tcpdump", "tcpdump", &args, &[])?;
        process.wait_for_log("listening on", TIMEOUT)?;
        Ok(Self { process, file })
    }

    /// Stops the capture and returns the TCP segments it saw.
    pub fn finish(self) -> io::Result<Vec<pcap::Segment>> {
        std::thread::sleep(Duration::from_millis(300));
        self.process.terminate(libc_sigint())?;
        self.process.wait_exit(TIMEOUT);
        let bytes = std::fs::read(&self.file)?;
        pcap::tcp_segments(&bytes).map_err(io::Error::other)
    }
}

fn libc_sigint() -> i32 {
    2
}

/// Writes `file` into the topology's config directory and waits until every proxy applied it.
pub fn apply(topo: &Topology, proxies: &[&Process], file: &str, yaml: &str) -> io::Result<()> {
    let before: Vec<usize> = proxies.iter().map(|p| p.count_log_lines("configuration applied")).collect();
    topo.write_config(file, yaml)?;
    let deadline = Instant::now() + TIMEOUT;
    for (proxy, before) in proxies.iter().zip(before) {
        while proxy.count_log_lines("configuration applied") <= before {
            if Instant::now() > deadline {
                return Err(io::Error::other(format!("configuration {file} not applied:\n{}", proxy.log_tail())));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}
