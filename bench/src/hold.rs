//! `strait-load hold`: opens N idle connections and keeps them until SIGTERM or SIGINT.
//!
//! The benchmark reads the proxies' memory while they carry N idle connections, so the
//! connections must all be open, and stay open, when it reads: the ready file says when, and the
//! report's `closed_by_peer` says whether any were dropped meanwhile. Opening runs a bounded number
//! of connects at a time so the accept queues of the proxies and server never overflow, which
//! would stall the run on 1 s SYN retransmits.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::{
    net::TcpStream,
    signal::unix::{SignalKind, signal},
    task::JoinSet,
    time::{sleep, timeout},
};

use crate::{
    net,
    tls::{Dialer, Stream},
};

/// Tries per connection before it counts as failed; with the backoff below about 1.5 s in all.
const CONNECT_TRIES: u32 = 8;
/// A SYN lost to a full accept queue is retransmitted after 1 s; this leaves room for two.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A `hold` run as the command line describes it.
#[derive(Clone, Debug)]
pub struct HoldConfig {
    /// Connections are dealt round-robin over these: one target's ephemeral ports run out near
    /// 28,000 connections, so larger counts need several server ports.
    pub targets: Vec<SocketAddr>,
    pub count: u64,
    /// Receives `holding N` once every connection is open.
    pub ready_file: PathBuf,
    /// Connects in flight at once.
    pub concurrency: usize,
    /// Plain TCP or TLS (each held connection then finished its handshake).
    pub dialer: Dialer,
}

/// What a `hold` run prints.
#[derive(Clone, Debug, Serialize)]
pub struct HoldReport {
    pub mode: &'static str,
    /// Connections opened.
    pub open: u64,
    /// Connections that could not be opened.
    pub failed: u64,
    /// Connections that the peer had closed by the time the signal came.
    pub closed_by_peer: u64,
}

/// Opens the connections, announces them, holds them until a signal, then closes them.
pub async fn run(config: HoldConfig) -> anyhow::Result<HoldReport> {
    if config.targets.is_empty() {
        bail!("hold needs at least one --target");
    }
    // Installed first: from here SIGTERM ends the hold cleanly instead of killing the process.
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let mut held = Vec::with_capacity(usize::try_from(config.count).unwrap_or(0));
    let mut failed = 0u64;
    let mut first_error = None;
    let opening = open_all(&config, &mut held, &mut failed, &mut first_error);
    let interrupted = tokio::select! {
        () = opening => false,
        _ = terminate.recv() => true,
        _ = interrupt.recv() => true,
    };
    if let Some(e) = &first_error {
        eprintln!("strait-load hold: {failed} connections failed; first error: {e}");
    }
    if interrupted {
        eprintln!("strait-load hold: signalled while opening; closing {} connections", held.len());
    } else {
        if held.is_empty() {
            bail!("no connection could be opened; first error: {}", first_error.unwrap_or_default());
        }
        write_ready_file(&config.ready_file, held.len())
            .with_context(|| format!("writing {}", config.ready_file.display()))?;
        eprintln!("strait-load hold: holding {} connections", held.len());
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    }
    let closed_by_peer = held.iter().filter(|s| closed_by_peer(s)).count() as u64;
    let open = held.len() as u64;
    drop(held);
    Ok(HoldReport { mode: "hold", open, failed, closed_by_peer })
}

/// Opens `config.count` connections, at most `config.concurrency` connecting at once.
async fn open_all(config: &HoldConfig, held: &mut Vec<Stream>, failed: &mut u64, first_error: &mut Option<String>) {
    let mut connecting = JoinSet::new();
    let mut settle = |result: Option<Result<io::Result<Stream>, tokio::task::JoinError>>| match result {
        Some(Ok(Ok(stream))) => held.push(stream),
        Some(Ok(Err(e))) => {
            *failed += 1;
            first_error.get_or_insert_with(|| e.to_string());
        }
        Some(Err(e)) => {
            *failed += 1;
            first_error.get_or_insert_with(|| e.to_string());
        }
        None => {}
    };
    for (i, target) in (0..config.count).zip(config.targets.iter().cycle()) {
        if connecting.len() >= config.concurrency.max(1) {
            settle(connecting.join_next().await);
        }
        let target = *target;
        connecting.spawn(connect_with_retry(config.dialer.clone(), target));
        if i % 10_000 == 9_999 {
            eprintln!("strait-load hold: {} of {} connections started", i + 1, config.count);
        }
    }
    while !connecting.is_empty() {
        settle(connecting.join_next().await);
    }
}

/// Connects, retrying briefly through the momentary exhaustion that opening thousands causes.
async fn connect_with_retry(dialer: Dialer, target: SocketAddr) -> io::Result<Stream> {
    let mut pause = Duration::from_millis(5);
    let mut tries = 0;
    loop {
        tries += 1;
        let error = match timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(stream)) => return dialer.wrap(stream).await,
            Ok(Err(e)) => e,
            Err(_) => io::Error::new(io::ErrorKind::TimedOut, format!("connect to {target} timed out")),
        };
        if tries >= CONNECT_TRIES || !net::is_transient_connect_error(&error) {
            return Err(error);
        }
        sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// Whether the peer closed or reset a held connection. The connection was idle, so readable
/// means EOF, a reset, or data the server should not have sent (which also means it is not idle).
fn closed_by_peer(stream: &Stream) -> bool {
    // Bytes waiting do not mean the peer closed: over TLS 1.3 the server's session tickets arrive
    // after the handshake. They are read and dropped (the stream is only closed after this);
    // the end of the stream or an error is what counts.
    let mut buf = [0u8; 4096];
    loop {
        match stream.tcp().try_read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Writes `holding N` through a temporary file and a rename, so a reader never sees half of it.
fn write_ready_file(path: &Path, open: usize) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("holding {open}"))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A peer that sent bytes and stays open is open; one that closed is closed.
    #[tokio::test]
    async fn bytes_from_the_peer_are_not_a_close() {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let client = Stream::Plain(TcpStream::connect(addr).await.expect("connect"));
        let (mut server, _) = listener.accept().await.expect("accept");
        assert!(!closed_by_peer(&client));
        server.write_all(b"a session ticket, say").await.expect("write");
        sleep(Duration::from_millis(50)).await;
        assert!(!closed_by_peer(&client), "data alone is not a close");
        drop(server);
        sleep(Duration::from_millis(50)).await;
        assert!(closed_by_peer(&client), "a FIN is");
    }
}
