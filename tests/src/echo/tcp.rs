//! `strait-echo tcp`, `send`, `hold` and `probe`: raw TCP servers and clients.
//!
//! `send` proves that every byte crossed the mesh unchanged and in order (and measures
//! throughput); `hold` proves that an open connection survives a configuration change or a
//! proxy restart; `probe` is the readiness and reachability check.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::thread;
use std::time::{Duration, Instant};

use super::{Fnv1a64, check_pattern, pattern_slice};

/// Connect timeout for `send` and `hold`: a mesh that cannot connect in this long is broken.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Buffer size for `send`: big enough not to limit multi-Gbit/s throughput.
const SEND_CHUNK: usize = 256 * 1024;
/// Interval between `hold` round trips.
const HOLD_INTERVAL: Duration = Duration::from_millis(200);

/// Serves TCP echo on `0.0.0.0:port` until the process is killed.
pub fn serve(port: u16) -> io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    println!("listening on 0.0.0.0:{port}");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        thread::spawn(move || {
            if let Ok(peer) = stream.peer_addr() {
                println!("accepted peer={peer}");
            }
            let _ = echo(stream);
        });
    }
    Ok(())
}

fn echo(stream: TcpStream) -> io::Result<()> {
    let mut reader = stream.try_clone()?;
    let mut writer = stream;
    io::copy(&mut reader, &mut writer)?;
    // Pass the client's half-close on, so `send` sees the end of the echo.
    writer.shutdown(Shutdown::Write)
}

/// The first address `target` (`ip:port` or `host:port`) resolves to.
pub fn resolve(target: &str) -> io::Result<SocketAddr> {
    target
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{target} resolves to no address")))
}

/// Whether a TCP connection to `target` succeeds within `timeout`.
pub fn probe(target: &str, timeout: Duration) -> bool {
    resolve(target).and_then(|addr| TcpStream::connect_timeout(&addr, timeout)).is_ok()
}

/// What `send` measured.
#[derive(Debug)]
pub struct SendReport {
    pub sent: u64,
    pub received: u64,
    pub digest: Fnv1a64,
    pub elapsed: Duration,
}

impl SendReport {
    /// The line `strait-echo send` prints.
    pub fn summary(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        let gbps = if secs > 0.0 { self.received as f64 * 8.0 / secs / 1e9 } else { 0.0 };
        format!(
            "sent={} received={} fnv1a64={} secs={secs:.6} gbps={gbps:.3}",
            self.sent,
            self.received,
            self.digest.hex()
        )
    }
}

/// Sends `bytes` pattern bytes to an echo server while reading the echo concurrently, and
/// checks that the echo is exactly what was sent. `timeout` bounds each read.
pub fn send(target: &str, bytes: u64, timeout: Duration) -> Result<SendReport, String> {
    let addr = resolve(target).map_err(|e| format!("cannot resolve {target}: {e}"))?;
    let stream =
        TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let start = Instant::now();

    let sender = thread::spawn(move || -> io::Result<()> {
        let mut sent = 0u64;
        while sent < bytes {
            let want = usize::try_from(bytes - sent).unwrap_or(SEND_CHUNK).min(SEND_CHUNK);
            let chunk = pattern_slice(sent, want);
            writer.write_all(chunk)?;
            sent += chunk.len() as u64;
        }
        writer.shutdown(Shutdown::Write)
    });

    let mut reader = stream;
    let mut buf = vec![0u8; SEND_CHUNK];
    let mut received = 0u64;
    let mut digest = Fnv1a64::default();
    let read_result = loop {
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(at) = check_pattern(received, &buf[..n]) {
                    break Err(format!("echoed bytes differ from those sent, first at offset {at}"));
                }
                digest.update(&buf[..n]);
                received += n as u64;
                if received > bytes {
                    break Err(format!("received {received} bytes, more than the {bytes} sent"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                break Err(format!("reading the echo failed after {received} bytes: {e}"));
            }
        }
    };
    let elapsed = start.elapsed();
    if read_result.is_err() {
        // Unblock the sender if it is stuck on a full send buffer.
        let _ = reader.shutdown(Shutdown::Both);
    }
    let send_result = sender.join().map_err(|_| "the sending thread panicked".to_string())?;
    read_result?;
    send_result.map_err(|e| format!("sending failed: {e}"))?;
    if received != bytes {
        return Err(format!("the echo ended after {received} of {bytes} bytes"));
    }
    Ok(SendReport { sent: bytes, received, digest, elapsed })
}

/// Keeps one connection to an echo server busy for `duration`, one line every
/// [`HOLD_INTERVAL`], printing `ok <n>` per round trip. Returns the number of round trips, or
/// the message `broken after <n>: <error>`.
pub fn hold(target: &str, duration: Duration) -> Result<u64, String> {
    let mut done = 0u64;
    let broken = |done: u64, e: &dyn std::fmt::Display| format!("broken after {done}: {e}");
    let addr = resolve(target).map_err(|e| broken(0, &e))?;
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| broken(0, &e))?;
    stream.set_read_timeout(Some(CONNECT_TIMEOUT)).map_err(|e| broken(0, &e))?;
    let start = Instant::now();
    while start.elapsed() < duration {
        let line = format!("ping {}\n", done + 1);
        stream.write_all(line.as_bytes()).map_err(|e| broken(done, &e))?;
        let mut echoed = vec![0u8; line.len()];
        stream.read_exact(&mut echoed).map_err(|e| broken(done, &e))?;
        if echoed != line.as_bytes() {
            let got = String::from_utf8_lossy(&echoed);
            return Err(broken(done, &format!("echo {got:?} instead of {line:?}")));
        }
        done += 1;
        println!("ok {done}");
        thread::sleep(HOLD_INTERVAL);
    }
    Ok(done)
}
