//! Restarts under load (OPS-3): new connections at 1,000 per second through the mesh while
//! both node proxies are restarted, the new process started first and taking the running one's
//! listening sockets over, the old one then stopped. The figure is how many connections failed
//! (refused, reset or unanswered) across the two restarts: the target is none.
//!
//! It replaces the bed's proxies, so it runs last.

use std::{thread, time::Duration};

use anyhow::{Context as _, bail};
use serde_json::Value;
use strait_testbed::{Node, Process, bin_path};

use super::{Bed, PORT, TIMEOUT, f};
use crate::report::{Better, Figure, Results, Target};

/// New connections per second: a steady stream, well within what the mesh path sustains.
const RATE: u64 = 1000;

pub fn restart(bed: &Bed, results: &mut Results) -> anyhow::Result<()> {
    let secs: u64 = if bed.quick { 8 } else { 14 };
    let target = format!("{}:{PORT}", bed.server.ip());
    let (rate, duration) = (RATE.to_string(), secs.to_string());
    let args = ["connections", "--target", &target, "--duration", &duration, "--concurrency", "32", "--rate", &rate];
    let load = bed.client.spawn("restart-load", bin_path("strait-load"), &args, &[])?;
    let nodes = bed.topo.nodes();
    let ca = bed.topo.dir().join("ca");
    let mut successors = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        thread::sleep(Duration::from_secs(secs / 4));
        successors.push(start_successor(bed, node, &ca)?);
        bed.proxies[i].terminate(libc::SIGTERM)?;
    }
    // Connections that stay open (the waypoint's pooled upstream connections) hold a replaced
    // proxy until its drain timeout (30 s by default) cuts them.
    for old in &bed.proxies {
        if old.wait_exit(Duration::from_secs(45)).is_none() {
            bail!("a replaced proxy did not drain and stop:\n{}", old.log_tail());
        }
    }
    if load.wait_exit(Duration::from_secs(secs + 30)).is_none() {
        bail!("the load did not finish:\n{}", load.log_tail());
    }
    let report: Value = load
        .log()
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("strait-load printed no JSON:\n{}", load.log_tail()))?;
    let errors = report.get("errors").and_then(Value::as_u64).unwrap_or(u64::MAX);
    let note = format!(
        "{} connections at {:.0}/s, both node proxies restarted{}",
        report.get("connections").and_then(Value::as_u64).unwrap_or(0),
        f(&report, "per_second"),
        report.get("first_error").and_then(Value::as_str).map(|e| format!("; first error: {e}")).unwrap_or_default(),
    );
    results.add(Figure {
        scenario: "restart",
        name: format!("connections failed across two node-proxy restarts at {RATE} new conn/s"),
        unit: "conn",
        direct: None,
        mesh: errors as f64,
        better: Better::Lower,
        target: Some(Target::Absolute(0.0)),
        errors: Some(errors),
        note: Some(note),
    });
    drop(successors);
    Ok(())
}

/// Starts a second `strait node` on `node` and waits until it has taken the listeners over.
fn start_successor(bed: &Bed, node: &Node, ca: &std::path::Path) -> anyhow::Result<Process> {
    let (config, pins) = (bed.topo.config_dir(), node.bpf_pin_dir());
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
    let name = format!("strait-{}-successor", node.name());
    let proxy = node.spawn(&name, bin_path("strait"), &args, &[("STRAIT_LOG", "info")])?;
    proxy.wait_for_log("strait node ready", TIMEOUT).context("the successor did not start")?;
    if !proxy.log().contains("took over the listening sockets") {
        bail!("the successor opened listeners of its own instead of taking them over:\n{}", proxy.log_tail());
    }
    Ok(proxy)
}
