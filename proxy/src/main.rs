//! The `strait` command line: one binary, one subcommand per role.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "strait", version, about = "An ambient (sidecarless) service-mesh data plane")]
struct Cli {
    /// Log filter, as RUST_LOG takes it (`info`, `strait=debug`, ...).
    #[arg(long, global = true, default_value = "info", env = "STRAIT_LOG")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the per-node proxy: capture enrolled pods' traffic with eBPF and proxy it.
    Node {
        /// Directory of Kubernetes and Istio YAML resources, watched for changes.
        #[arg(long)]
        config: PathBuf,
        /// This node's name, as pods' `spec.nodeName` gives it.
        #[arg(long)]
        node: String,
        /// Admin endpoint (config dump, stats).
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin_addr: SocketAddr,
        /// Trust domain of workload identities.
        #[arg(long, default_value = strait::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Directory of the built-in CA (Istio's plug-in CA layout); created if empty. Proxies
        /// given the same directory share one trust root.
        #[arg(long, default_value = "/var/lib/strait/ca")]
        ca_dir: PathBuf,
        /// Lifetime of workload certificates (renewed at half life).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        cert_ttl: Duration,
        /// The node's uplink interface (default: from the routing table).
        #[arg(long)]
        uplink: Option<String>,
        /// Data-plane worker threads (default: half the CPUs, at least one).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Build a two-node mesh out of network namespaces on this machine and show it working.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();

    let result = match cli.command {
        Command::Node { config, node, admin_addr, trust_domain, ca_dir, cert_ttl, uplink, workers } => {
            runtime(workers).and_then(|rt| {
                rt.block_on(strait::node::run(strait::node::NodeOptions {
                    config_dir: config,
                    node_name: node,
                    admin_addr,
                    trust_domain,
                    ca_dir,
                    cert_ttl,
                    uplink,
                }))
            })
        }
        Command::Demo => strait::demo::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strait: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    strait::config::parse_duration(text)
}

/// The data-plane runtime. One worker per two CPUs by default: measured on the 2-core
/// benchmark machine, where the proxies share the CPUs with the applications, one worker moved
/// a single HBONE stream at 3.6 Gbit/s and eight streams at 3.9, against 2.0-2.9 and 2.3 with
/// two workers, which pay for cross-thread wake-ups and context switches on every chunk.
fn runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = workers.unwrap_or(cpus / 2).max(1);
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()?)
}
