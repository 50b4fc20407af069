//! `strait-load stream`: bulk throughput over K parallel TCP connections to a sink.
//!
//! The clock runs from the first connect to the last byte count received, so it covers every byte
//! reaching the server, not just the client's socket buffers (see [`crate::sink`]). Parallel
//! streams show whether a mesh spreads connections over cores and tunnels or funnels them into one.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::{
    net::TcpStream,
    task::JoinSet,
    time::{Instant, timeout},
};

use crate::{latency::round3, sink};

/// A `stream` run as the command line describes it.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    pub target: SocketAddr,
    /// Total bytes over all streams.
    pub bytes: u64,
    pub streams: u64,
    /// Longest the whole run may take.
    pub timeout: Duration,
}

/// What a `stream` run prints.
#[derive(Clone, Debug, Serialize)]
pub struct StreamReport {
    pub mode: &'static str,
    pub streams: u64,
    pub bytes: u64,
    pub duration_s: f64,
    pub gbit_per_s: f64,
}

/// Bytes stream `i` of `streams` sends: an even share, the remainder spread over the first ones.
pub fn share(bytes: u64, streams: u64, i: u64) -> u64 {
    bytes / streams + u64::from(i < bytes % streams)
}

/// Sends every stream and waits for all counts; any stream failing fails the run.
pub async fn run(config: StreamConfig) -> anyhow::Result<StreamReport> {
    if config.streams == 0 {
        bail!("--streams must be at least 1");
    }
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..config.streams {
        let (target, bytes) = (config.target, share(config.bytes, config.streams, i));
        tasks.spawn(async move {
            // Nagle stays on, as in iperf3: bulk writes fill segments anyway, and it merges the
            // partial segment at the end of each write with the next one.
            let mut stream =
                TcpStream::connect(target).await.with_context(|| format!("stream {i}: connect to {target}"))?;
            sink::send_and_confirm(&mut stream, bytes).await.with_context(|| format!("stream {i}"))
        });
    }
    let all = async {
        while let Some(joined) = tasks.join_next().await {
            joined.context("a stream task panicked")??;
        }
        anyhow::Ok(())
    };
    timeout(config.timeout, all).await.with_context(|| format!("streams not done within {:?}", config.timeout))??;
    let elapsed = start.elapsed().as_secs_f64();
    Ok(StreamReport {
        mode: "stream",
        streams: config.streams,
        bytes: config.bytes,
        duration_s: round3(elapsed),
        gbit_per_s: round3(config.bytes as f64 * 8.0 / elapsed / 1e9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_total() {
        assert_eq!((0..3).map(|i| share(10, 3, i)).collect::<Vec<_>>(), [4, 3, 3]);
        assert_eq!((0..2).map(|i| share(64 << 20, 2, i)).sum::<u64>(), 64 << 20);
        assert_eq!(share(0, 4, 3), 0);
    }
}
