//! `strait-load connections`: how fast new connections can be opened, used and closed.
//!
//! A closed loop: each worker connects, sends one `GET /bytes/64` with `Connection: close`, reads
//! the response and waits for the server's close, then starts over. Through the mesh every
//! connection is a new capture, policy decision and upstream connection (or pool lookup), which is
//! what this mode puts a number on.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    task::JoinSet,
    time::{Instant, sleep, timeout},
};

use crate::{
    http::{self, HttpError},
    latency::{self, round3},
    tls::Dialer,
};

/// Body size requested: small, so the figure is about connections, not bytes.
const BODY: u64 = 64;

/// A `connections` run as the command line describes it.
#[derive(Clone, Debug)]
pub struct ConnectionsConfig {
    pub target: SocketAddr,
    /// Workers stop starting connections after this long.
    pub duration: Duration,
    /// Connections in flight at once, one per worker.
    pub concurrency: usize,
    /// Longest one connection may take, connect to close.
    pub timeout: Duration,
    /// New connections per second over all workers; as fast as they go when `None`. Paced runs
    /// start connection n at n / rate seconds (a late worker starts at once), so a restart
    /// measured under them sees a steady stream of new connections.
    pub rate: Option<u64>,
    /// Plain TCP or TLS: with TLS every connection is a full handshake (no resumption).
    pub dialer: Dialer,
    /// The `Host` header (default: the target address).
    pub host: Option<String>,
}

/// What a `connections` run prints.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionsReport {
    pub mode: &'static str,
    /// Connections that completed a correct exchange.
    pub connections: u64,
    pub errors: u64,
    pub duration_s: f64,
    pub per_second: f64,
    /// Connect to last response byte, in µs.
    pub p50_us: u64,
    pub p99_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// Runs the workers for the configured duration; fails if no connection succeeded.
pub async fn run(config: ConnectionsConfig) -> anyhow::Result<ConnectionsReport> {
    let request: Arc<[u8]> =
        http::request(&format!("/bytes/{BODY}"), config.host.as_deref().unwrap_or(&config.target.to_string()), true)
            .into();
    let start = Instant::now();
    let stop = start + config.duration;
    let mut workers = JoinSet::new();
    let tickets = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for _ in 0..config.concurrency.max(1) {
        let request = Arc::clone(&request);
        let (target, limit, rate, tickets) = (config.target, config.timeout, config.rate, tickets.clone());
        let dialer = config.dialer.clone();
        workers.spawn(async move {
            let mut histogram = latency::new_histogram();
            let (mut errors, mut first_error) = (0u64, None);
            // Small: the response is 64 bytes after a short head.
            let mut buf = [0u8; 1024];
            while Instant::now() < stop {
                if let Some(rate) = rate.filter(|r| *r > 0) {
                    let n = tickets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
                    if due >= stop {
                        break;
                    }
                    tokio::time::sleep_until(due).await;
                }
                let began = Instant::now();
                match timeout(limit, one_connection(&dialer, target, &request, &mut buf)).await {
                    Ok(Ok(responded)) => latency::record(&mut histogram, responded - began),
                    failed => {
                        errors += 1;
                        first_error.get_or_insert_with(|| match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("no complete exchange within {limit:?}"),
                        });
                        // A refused connect or no free port fails in microseconds; pausing keeps a
                        // dead target from turning the loop into a busy spin that counts errors.
                        sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            (histogram, errors, first_error)
        });
    }

    let mut histogram = latency::new_histogram();
    let (mut errors, mut first_error) = (0u64, None);
    while let Some(joined) = workers.join_next().await {
        let (h, e, first) = joined.context("a connection worker panicked")?;
        histogram.add(&h).context("merging latency histograms")?;
        errors += e;
        first_error = first_error.or(first);
    }
    let elapsed = start.elapsed();
    let connections = histogram.len();
    if connections == 0 {
        bail!("no connection succeeded ({errors} errors); first error: {}", first_error.as_deref().unwrap_or("none"));
    }
    let p = latency::percentiles(&histogram);
    Ok(ConnectionsReport {
        mode: "connections",
        connections,
        errors,
        duration_s: round3(elapsed.as_secs_f64()),
        per_second: round3(connections as f64 / elapsed.as_secs_f64()),
        p50_us: p.p50_us,
        p99_us: p.p99_us,
        first_error,
    })
}

/// One connection's life; returns when its response was complete.
async fn one_connection(
    dialer: &Dialer,
    target: SocketAddr,
    request: &[u8],
    buf: &mut [u8],
) -> Result<Instant, HttpError> {
    let mut stream = dialer.dial(target).await?;
    stream.write_all(request).await?;
    stream.flush().await?;
    let head = http::read_response(&mut stream, buf).await?;
    let responded = Instant::now();
    head.check(Some(BODY))?;
    // Wait for the server's FIN so that it closes first: TIME_WAIT then stays on the server side,
    // and a long run does not use up this side's ephemeral ports.
    if stream.read(buf).await? != 0 {
        return Err(HttpError::TrailingBytes);
    }
    Ok(responded)
}
