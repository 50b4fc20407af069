//! The `strait` command line: one binary, one subcommand per role.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "strait",
    version,
    about = "An ambient (sidecarless) service-mesh data plane"
)]
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
    },
    /// Build a two-node mesh out of network namespaces on this machine and show it working.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();

    let result = match cli.command {
        Command::Node {
            config,
            node,
            admin_addr,
        } => runtime().and_then(|rt| {
            rt.block_on(strait::node::run(strait::node::NodeOptions {
                config_dir: config,
                node_name: node,
                admin_addr,
            }))
        }),
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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
