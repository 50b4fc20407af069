//! Clients that load a node proxy the way a hostile or unlucky pod does, for the hardening tests:
//!
//! - `flood`: holds as many idle TCP connections to a target as it can, reopening each one the
//!   moment it is closed (the descriptor exhaustion attack on a proxy's HBONE port);
//! - `sweep`: one HTTP request per connection from each local port of a range, in order, so a
//!   test can reuse exactly the 4-tuples of earlier connections (TIME_WAIT collisions).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::json::Value;

fn object(members: Vec<(&str, Value)>) -> String {
    Value::Object(members.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()).to_string()
}

/// What a flood achieved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FloodReport {
    pub attempts: u64,
    pub connected: u64,
    /// The most connections open at once.
    pub max_open: u64,
    /// Connections the target closed or reset.
    pub closed_by_target: u64,
    pub connect_errors: u64,
}

impl FloodReport {
    pub fn to_json(&self) -> String {
        object(vec![
            ("attempts", self.attempts.into()),
            ("connected", self.connected.into()),
            ("max_open", self.max_open.into()),
            ("closed_by_target", self.closed_by_target.into()),
            ("connect_errors", self.connect_errors.into()),
        ])
    }
}

#[derive(Default)]
struct FloodCounters {
    attempts: AtomicU64,
    connected: AtomicU64,
    open: AtomicU64,
    max_open: AtomicU64,
    closed_by_target: AtomicU64,
    connect_errors: AtomicU64,
}

/// Keeps `connections` connections to `target` open (sending nothing) for `duration`.
pub fn flood(target: SocketAddr, connections: u64, duration: Duration) -> io::Result<FloodReport> {
    raise_fd_limit(connections + 256);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let counters = Arc::new(FloodCounters::default());
    let deadline = Instant::now() + duration;
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let counters = counters.clone();
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    counters.attempts.fetch_add(1, Ordering::Relaxed);
                    let left = deadline.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left.min(Duration::from_secs(3)), TcpStream::connect(target)).await {
                        Ok(Ok(mut stream)) => {
                            counters.connected.fetch_add(1, Ordering::Relaxed);
                            let open = counters.open.fetch_add(1, Ordering::Relaxed) + 1;
                            counters.max_open.fetch_max(open, Ordering::Relaxed);
                            let mut buf = [0u8; 512];
                            let left = deadline.saturating_duration_since(Instant::now());
                            let closed = tokio::time::timeout(left, async {
                                loop {
                                    match stream.read(&mut buf).await {
                                        Ok(0) | Err(_) => return,
                                        Ok(_) => {}
                                    }
                                }
                            })
                            .await
                            .is_ok();
                            counters.open.fetch_sub(1, Ordering::Relaxed);
                            if closed {
                                counters.closed_by_target.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ => {
                            counters.connect_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // Reopen at once, as the attack does; a pause only when nothing connects.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
    });
    let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
    Ok(FloodReport {
        attempts: read(&counters.attempts),
        connected: read(&counters.connected),
        max_open: read(&counters.max_open),
        closed_by_target: read(&counters.closed_by_target),
        connect_errors: read(&counters.connect_errors),
    })
}

/// What a sweep saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    pub ok: u64,
    pub failed: u64,
    pub elapsed_ms: u64,
    pub first_error: Option<String>,
}

impl SweepReport {
    pub fn to_json(&self) -> String {
        object(vec![
            ("ok", self.ok.into()),
            ("failed", self.failed.into()),
            ("elapsed_ms", self.elapsed_ms.into()),
            ("first_error", self.first_error.clone().into()),
        ])
    }
}

/// For each port of `ports`, in order: binds `source:port`, sends `GET /` with `Connection:
/// close` to `target` and reads the response to the server's close, within `timeout`.
pub fn sweep(
    source: IpAddr,
    ports: std::ops::RangeInclusive<u16>,
    target: SocketAddr,
    timeout: Duration,
) -> io::Result<SweepReport> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let started = Instant::now();
    let mut report = SweepReport::default();
    runtime.block_on(async {
        for port in ports {
            match tokio::time::timeout(timeout, exchange(SocketAddr::new(source, port), target)).await {
                Ok(Ok(())) => report.ok += 1,
                failed => {
                    report.failed += 1;
                    report.first_error.get_or_insert_with(|| match failed {
                        Ok(Err(e)) => format!("from port {port}: {e}"),
                        _ => format!("from port {port}: no answer within {timeout:?}"),
                    });
                }
            }
        }
    });
    report.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(report)
}

async fn exchange(local: SocketAddr, target: SocketAddr) -> io::Result<()> {
    let socket = if local.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(local)?;
    let mut stream = socket.connect(target).await?;
    let request = format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    if response.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        let head = String::from_utf8_lossy(&response[..response.len().min(40)]).into_owned();
        Err(io::Error::other(format!("unexpected answer {head:?}")))
    }
}

fn raise_fd_limit(wanted: u64) {
    let limit = libc::rlimit { rlim_cur: wanted, rlim_max: wanted };
    // SAFETY: setrlimit reads a valid struct; failure leaves the old limit, which only makes
    // the flood smaller.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
}
