//! `strait-bench`: measures what the mesh costs (OPS-1). It builds two nodes and their pods
//! out of network namespaces (the test harness), runs strait's node proxies on them, and sends
//! every workload twice in the same run: through the proxies over HBONE, and direct between
//! pods outside the mesh on the same nodes, the physical limit of this machine. The request
//! scenarios (latency, cpu, max-rps) and memory also measure the waypoint path: the same client
//! to a service whose traffic goes through `strait waypoint` between the two node proxies.
//! Results go to `report.md`, `report.json` and `chart.png` in the output directory;
//! `--soak-minutes N` runs the soak instead (`soak.md`, `soak.json`).
//!
//! Each step (the test bed, every scenario, the report) writes a progress line on stderr when it
//! starts and when it ends, with its time.
//!
//! Benchmarks, not tests: nothing here fails because the machine is slow; a missed target is a
//! figure in the report.

mod chart;
mod control;
mod fanout;
mod flame;
mod gateway;
mod kube;
mod profile;
// Progress lines, shared with xtask (std only; see the file).
#[path = "../../xtask/src/progress.rs"]
mod progress;
mod report;
mod same_node;
mod scenarios;

use std::{io, path::PathBuf, process::ExitCode};

use clap::Parser;
use progress::{Progress, Step};

/// Measure strait against direct traffic on network namespaces.
#[derive(Parser)]
#[command(name = "strait-bench")]
struct Cli {
    /// Where to write report.md, report.json and chart.png.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Shorter runs (a few seconds each), for a quick look rather than figures to publish.
    #[arg(long)]
    quick: bool,
    /// Run the soak instead of the scenarios: this many minutes at 1,000 req/s through the node
    /// proxies and the waypoint; fails on any error, RSS change beyond 5 % or descriptor growth.
    #[arg(long, conflicts_with_all = ["quick", "scenarios"])]
    soak_minutes: Option<u64>,
    /// Scenarios to run: throughput, latency, max-rps, connections, cpu, memory (default: all);
    /// or `control` alone: the control plane with a generated 10,000-pod mesh (control.md); or
    /// `kube` alone: `strait control --kubernetes` on a real API server with 10,000 pods (kube.md);
    /// or `gateway` alone: ingress HTTPS through `strait gateway` beside direct TLS (gateway.md);
    /// or `fanout` alone: many client pods of one identity through the HBONE pool (fanout.md);
    /// or `same-node` alone: pod to pod on one node, userspace copy against the kernel fast path
    /// (same-node.md).
    scenarios: Vec<String>,
    /// Record `perf` on each proxy during extra 1,000 req/s runs of the latency scenario (node
    /// path, waypoint path) and write flame graphs (flame-*.svg, flame-*.folded) beside report.md.
    #[arg(long, conflicts_with = "soak_minutes")]
    profile: bool,
    /// Client pods of the `fanout` scenario.
    #[arg(long, default_value_t = 20)]
    fanout_clients: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let alone: Option<fn(&Cli) -> anyhow::Result<String>> = match cli.scenarios.as_slice() {
        [one] => match one.as_str() {
            "control" => Some(run_control),
            "kube" => Some(run_kube),
            "gateway" => Some(run_gateway),
            "fanout" => Some(run_fanout),
            "same-node" => Some(run_same_node),
            _ => None,
        },
        _ => None,
    };
    if let Some(run_alone) = alone {
        let mut progress = Progress::new("bench", 1, io::stderr());
        return exit(progress.run(&cli.scenarios[0], |step| {
            step.start("measuring");
            step.outcome(run_alone(&cli)?);
            Ok::<_, anyhow::Error>(())
        }));
    }
    let all = scenarios::ALL.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let wanted = if cli.scenarios.is_empty() { all } else { cli.scenarios.clone() };
    for name in &wanted {
        if !scenarios::ALL.contains(&name.as_str()) {
            eprintln!(
                "strait-bench: unknown scenario `{name}`; choose from {}, or one of control, kube, gateway, fanout, same-node alone",
                scenarios::ALL.join(", ")
            );
            return ExitCode::FAILURE;
        }
    }
    exit(run(&cli, &wanted))
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strait-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The control plane's figures: no namespaces, no data path.
fn run_control(cli: &Cli) -> anyhow::Result<String> {
    std::fs::create_dir_all(&cli.out)?;
    let report = control::run(&cli.out, cli.quick)?;
    control::write(&cli.out, &report)?;
    println!("{}", control::markdown(&report));
    Ok(format!("wrote {}/control.md and control.json", cli.out.display()))
}

/// `strait control --kubernetes` against a real API server.
fn run_kube(cli: &Cli) -> anyhow::Result<String> {
    std::fs::create_dir_all(&cli.out)?;
    let report = kube::run(&cli.out, cli.quick)?;
    kube::write(&cli.out, &report)?;
    println!("{}", kube::markdown(&report));
    Ok(format!("wrote {}/kube.md and kube.json", cli.out.display()))
}

/// An ingress `strait gateway` against direct TLS.
fn run_gateway(cli: &Cli) -> anyhow::Result<String> {
    std::fs::create_dir_all(&cli.out)?;
    let report = gateway::run(&cli.out, cli.quick)?;
    gateway::write(&cli.out, &report)?;
    println!("{}", gateway::markdown(&report));
    Ok(format!("wrote {}/gateway.md and gateway.json", cli.out.display()))
}

/// Many client pods of one identity through the node proxies' HBONE pool.
fn run_fanout(cli: &Cli) -> anyhow::Result<String> {
    fanout::check_clients(cli.fanout_clients)?;
    std::fs::create_dir_all(&cli.out)?;
    let report = fanout::run(cli.quick, cli.fanout_clients)?;
    fanout::write(&cli.out, &report)?;
    println!("{}", fanout::markdown(&report));
    Ok(format!("wrote {}/fanout.md and fanout.json", cli.out.display()))
}

/// Same-node pod to pod: the userspace copy and the kernel fast path, beside direct.
fn run_same_node(cli: &Cli) -> anyhow::Result<String> {
    std::fs::create_dir_all(&cli.out)?;
    let report = same_node::run(cli.quick)?;
    same_node::write(&cli.out, &report)?;
    println!("{}", same_node::markdown(&report));
    Ok(format!("wrote {}/same-node.md and same-node.json", cli.out.display()))
}

fn run(cli: &Cli, wanted: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cli.out)?;
    if let Some(minutes) = cli.soak_minutes {
        return soak(cli, minutes);
    }
    // The bed, each scenario, the report.
    let mut progress = Progress::new("bench", wanted.len() + 2, io::stderr());
    let bed = progress.run("test bed", |step| build_bed(cli, step))?;
    let mut results = report::Results::new(cli.quick);
    for name in wanted {
        progress.run(name, |step| {
            step.start("measuring");
            scenarios::run(&bed, name, &mut results)
        })?;
    }
    if cli.profile && results.profiles.is_none() {
        let why = "profiles are recorded during the latency scenario, which did not run".to_owned();
        results.profiles = Some(profile::Profiles { problems: vec![why], ..Default::default() });
    }
    drop(bed);
    progress.run("report", |step| {
        report::write(&cli.out, &results)?;
        chart::draw(&cli.out.join("chart.png"), &results)?;
        println!("{}", report::markdown(&results));
        step.outcome(format!("wrote {}/report.md, report.json and chart.png", cli.out.display()));
        Ok::<_, anyhow::Error>(())
    })
}

/// Two nodes, their pods and the proxies, ready for the scenarios.
fn build_bed(cli: &Cli, step: &mut Step<'_, io::Stderr>) -> anyhow::Result<scenarios::Bed> {
    step.start("two nodes, their pods, node proxies and the waypoint");
    let mut bed = scenarios::Bed::build(cli.quick)?;
    if cli.profile {
        bed.profile_into(cli.out.clone());
    }
    step.outcome("ready");
    Ok(bed)
}

/// `minutes` at 1,000 req/s through the node proxies and the waypoint.
fn soak(cli: &Cli, minutes: u64) -> anyhow::Result<()> {
    let mut progress = Progress::new("soak", 2, io::stderr());
    let bed = progress.run("test bed", |step| build_bed(cli, step))?;
    let report = progress.run("soak", |step| {
        step.start(&format!("{minutes} min at 1,000 req/s"));
        let report = scenarios::soak::run(&bed, minutes)?;
        step.outcome(if report.passed() { "passed" } else { "failed its checks" });
        Ok::<_, anyhow::Error>(report)
    })?;
    drop(bed);
    scenarios::soak::write(&cli.out, &report)?;
    println!("{}", report.markdown());
    eprintln!("strait-bench: wrote {}/soak.md and soak.json", cli.out.display());
    anyhow::ensure!(report.passed(), "the soak failed: {}", report.failures.join("; "));
    Ok(())
}
