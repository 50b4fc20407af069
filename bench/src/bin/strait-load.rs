//! `strait-load`: load generator and test server for `cargo xtask bench`.
//!
//! Every client mode prints one JSON object on stdout when it ends and talks to people on
//! stderr; a failed run prints no JSON and exits non-zero with the reason.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Serialize;
use strait_bench::{
    connections, hold, limits, rate, runtime, server, stream,
    tls::{self, Dialer},
};

#[derive(Parser)]
#[command(name = "strait-load", version, about = "Load generator and test server for strait's benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP/1.1 (`GET /bytes/N`) and the byte-count sink on each port until killed.
    Server {
        /// Port to listen on; repeat for several. 0 picks a free port.
        #[arg(long = "port", required = true)]
        ports: Vec<u16>,
        /// Address to listen on.
        #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
        bind: IpAddr,
        /// Runtime worker threads.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Serve HTTPS with this certificate chain (PEM) on every port, instead of plain HTTP
        /// and the sink.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM) of `--tls-cert`.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Open-loop keep-alive HTTP load at a fixed rate; latency counts from each request's due time.
    Rate {
        #[arg(long)]
        target: SocketAddr,
        /// Requests per second over all connections.
        #[arg(long)]
        rps: u64,
        /// Measured window, in seconds (after the warm-up).
        #[arg(long, value_parser = seconds)]
        duration: Duration,
        /// Keep-alive connections, one request outstanding on each.
        #[arg(long, default_value_t = 8)]
        connections: u64,
        #[arg(long, default_value = "/bytes/1024")]
        path: String,
        /// Load before the measured window, in seconds, not recorded.
        #[arg(long, value_parser = seconds, default_value = "2")]
        warmup: Duration,
        /// Seconds to wait for one response before it counts as an error.
        #[arg(long, value_parser = seconds, default_value = "10")]
        timeout: Duration,
        /// Every N requests a connection asks the server to close and the next request opens a
        /// new one (0: keep-alive only).
        #[arg(long, default_value_t = 0)]
        close_every: u64,
        /// Runtime threads; 1 is a current-thread runtime, the cheapest.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Closed loop of new connections, each one `GET /bytes/64` with `Connection: close`.
    Connections {
        #[arg(long)]
        target: SocketAddr,
        /// Seconds to keep starting connections.
        #[arg(long, value_parser = seconds)]
        duration: Duration,
        /// Connections in flight at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Seconds one connection may take before it counts as an error.
        #[arg(long, value_parser = seconds, default_value = "10")]
        timeout: Duration,
        /// New connections per second over all workers (default: as fast as they go).
        #[arg(long)]
        rate: Option<u64>,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Bulk throughput: K parallel connections to the sink, N bytes in all, each count checked.
    Stream {
        #[arg(long)]
        target: SocketAddr,
        /// Total bytes; K, M and G suffixes are KiB, MiB and GiB.
        #[arg(long, value_parser = byte_count)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        streams: u64,
        /// Seconds the whole run may take.
        #[arg(long, value_parser = seconds, default_value = "120")]
        timeout: Duration,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Open N idle connections, write `holding N` to the ready file, hold them until SIGTERM/SIGINT.
    Hold {
        /// Target; repeat to spread connections round-robin (one target's local ports end near 28,000).
        #[arg(long = "target", required = true)]
        targets: Vec<SocketAddr>,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        ready_file: PathBuf,
        /// Connects in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[command(flatten)]
        tls: TlsArgs,
    },
}

/// HTTPS instead of HTTP, and the name the request is for.
#[derive(clap::Args)]
struct TlsArgs {
    /// Speak TLS, trusting only the CA certificates in this PEM file.
    #[arg(long, requires = "tls_sni")]
    tls_ca: Option<PathBuf>,
    /// The server name sent in the ClientHello and verified in the certificate.
    #[arg(long, requires = "tls_ca")]
    tls_sni: Option<String>,
    /// The `Host` header (default: the target address).
    #[arg(long)]
    host: Option<String>,
}

impl TlsArgs {
    fn dialer(&self) -> anyhow::Result<Dialer> {
        match (&self.tls_ca, &self.tls_sni) {
            (Some(ca), Some(sni)) => Dialer::tls(ca, sni),
            _ => Ok(Dialer::plain()),
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strait-load: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Server { ports, bind, workers, tls_cert, tls_key } => {
            raise_fd_limit();
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some(tls::acceptor(&cert, &key)?),
                _ => None,
            };
            runtime(workers)?.block_on(server::run(server::ServerConfig { bind, ports, tls }))
        }
        Command::Rate { target, rps, duration, connections, path, warmup, timeout, close_every, threads, tls } => {
            let (dialer, host) = (tls.dialer()?, tls.host);
            let config = rate::RateConfig {
                target,
                rps,
                duration,
                warmup,
                connections,
                path,
                timeout,
                close_every,
                dialer,
                host,
            };
            print(&runtime(threads)?.block_on(rate::run(config))?)
        }
        Command::Connections { target, duration, concurrency, timeout, rate, threads, tls } => {
            let (dialer, host) = (tls.dialer()?, tls.host);
            let config = connections::ConnectionsConfig { target, duration, concurrency, timeout, rate, dialer, host };
            print(&runtime(threads)?.block_on(connections::run(config))?)
        }
        Command::Stream { target, bytes, streams, timeout, threads } => {
            let config = stream::StreamConfig { target, bytes, streams, timeout };
            print(&runtime(threads)?.block_on(stream::run(config))?)
        }
        Command::Hold { targets, count, ready_file, concurrency, threads, tls } => {
            raise_fd_limit();
            let config = hold::HoldConfig { targets, count, ready_file, concurrency, dialer: tls.dialer()? };
            print(&runtime(threads)?.block_on(hold::run(config))?)
        }
    }
}

/// Raises the open-file limit; a failure only caps how many sockets fit, so it is a warning.
fn raise_fd_limit() {
    match limits::raise_nofile_limit() {
        Ok(n) => eprintln!("strait-load: open-file limit {n}"),
        Err(e) => eprintln!("strait-load: warning: could not raise the open-file limit: {e}"),
    }
}

fn print(report: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(report).context("serializing the report")?);
    Ok(())
}

/// A non-negative number of seconds, fractions allowed.
fn seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|_| format!("`{s}` is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{s}` is not a non-negative, finite number of seconds"))
}

/// A byte count with an optional binary suffix: `1048576`, `64M`, `1G`.
fn byte_count(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("`{s}` is not a byte count (digits, optionally followed by K, M or G)"))
}
