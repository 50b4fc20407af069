//! `strait-echo abuse`: hostile HTTP/1.1 clients for the hardening tests (SPEC OPS-4), many
//! connections at once, each doing one thing a well-behaved client never does.
//!
//! Modes: `partial-head` sends half a request head and goes quiet (slowloris);
//! `invalid-chunked` sends a chunked body with a broken chunk size; `abort-upload` promises a
//! body, sends part of it and closes; `stalled-body` sends one chunk of a chunked body and goes
//! quiet; `silent` sends nothing; `idle-keepalive` sends one complete request and stays;
//! `h2-idle` opens HTTP/2 (preface and SETTINGS) and then answers nothing. Each connection then
//! waits (at most `--hold-secs`) for the server to answer or close; the report says how many
//! answered with which status, how many the server closed and when.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use super::json::{self, Value};
use super::pattern_slice;

/// Threads are one per connection; they do little, so a small stack keeps a thousand cheap.
const THREAD_STACK: usize = 64 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Distinct error messages kept in a report.
const MAX_ERROR_SAMPLES: usize = 5;

/// What each connection does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    PartialHead,
    InvalidChunked,
    AbortUpload,
    StalledBody,
    Silent,
    IdleKeepalive,
    H2Idle,
}

impl Mode {
    pub fn parse(text: &str) -> Result<Mode, String> {
        match text {
            "partial-head" => Ok(Mode::PartialHead),
            "invalid-chunked" => Ok(Mode::InvalidChunked),
            "abort-upload" => Ok(Mode::AbortUpload),
            "stalled-body" => Ok(Mode::StalledBody),
            "silent" => Ok(Mode::Silent),
            "idle-keepalive" => Ok(Mode::IdleKeepalive),
            "h2-idle" => Ok(Mode::H2Idle),
            other => Err(format!(
                "unknown mode {other:?} (partial-head, invalid-chunked, abort-upload, stalled-body, silent, \
                 idle-keepalive, h2-idle)"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AbuseOptions {
    pub addr: SocketAddr,
    /// The `Host` header.
    pub host: String,
    pub path: String,
    pub mode: Mode,
    pub connections: usize,
    /// Body bytes sent before aborting or stalling.
    pub body_bytes: u64,
    /// How long each connection waits for the server to answer or close before giving up.
    pub hold: Duration,
}

/// What `abuse` saw: the line it prints, and what tests read back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AbuseReport {
    /// Connections that were established and sent their bytes.
    pub opened: u64,
    /// Responses per HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    /// Connections the server closed (with or without an answer) before `hold` ran out.
    pub closed_by_peer: u64,
    /// The longest a connection stayed open before the server closed it.
    pub max_close_ms: u64,
    /// Connections still open when `hold` ran out (closed by the client then).
    pub still_open: u64,
    /// Connections that could not be made or written.
    pub errors: u64,
    pub error_samples: Vec<String>,
}

/// How one connection ended.
enum Outcome {
    Closed { after: Duration, status: Option<u16> },
    StillOpen { status: Option<u16> },
    Failed(String),
}

/// Runs `options.connections` abusive connections at once and reports how the server dealt
/// with them.
pub fn run(options: &AbuseOptions) -> AbuseReport {
    let report = Mutex::new(AbuseReport::default());
    thread::scope(|scope| {
        for _ in 0..options.connections {
            let report = &report;
            let spawned = thread::Builder::new().stack_size(THREAD_STACK).spawn_scoped(scope, move || {
                let outcome = one_connection(options);
                report.lock().unwrap_or_else(std::sync::PoisonError::into_inner).count(outcome);
            });
            if let Err(e) = spawned {
                report.lock().unwrap_or_else(std::sync::PoisonError::into_inner).count(Outcome::Failed(e.to_string()));
            }
        }
    });
    report.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn one_connection(options: &AbuseOptions) -> Outcome {
    let started = Instant::now();
    let mut stream = match TcpStream::connect_timeout(&options.addr, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(format!("connect {}: {e}", options.addr)),
    };
    if let Err(e) = send_abuse(&mut stream, options) {
        return Outcome::Failed(format!("write: {e}"));
    }
    if options.mode == Mode::AbortUpload {
        let _ = stream.shutdown(Shutdown::Both);
        return Outcome::StillOpen { status: None };
    }
    wait_for_server(&mut stream, started, options.hold)
}

fn send_abuse(stream: &mut TcpStream, options: &AbuseOptions) -> io::Result<()> {
    let (host, path) = (&options.host, &options.path);
    match options.mode {
        Mode::PartialHead => write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nx-slow: "),
        Mode::InvalidChunked => write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: {host}\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nbroken\r\n"
        ),
        Mode::AbortUpload => {
            let promised = options.body_bytes * 2 + 1;
            write!(stream, "POST {path} HTTP/1.1\r\nHost: {host}\r\ncontent-length: {promised}\r\n\r\n")?;
            write_pattern(stream, options.body_bytes)
        }
        Mode::StalledBody => {
            write!(
                stream,
                "POST {path} HTTP/1.1\r\nHost: {host}\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n",
                options.body_bytes
            )?;
            write_pattern(stream, options.body_bytes)?;
            stream.write_all(b"\r\n")
        }
        Mode::Silent => Ok(()),
        Mode::IdleKeepalive => write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        // The client preface and an empty SETTINGS frame (length 0, type 4, no flags, stream 0).
        Mode::H2Idle => stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0"),
    }
}

fn write_pattern(stream: &mut TcpStream, bytes: u64) -> io::Result<()> {
    let mut sent = 0;
    while sent < bytes {
        let chunk = pattern_slice(sent, usize::try_from(bytes - sent).unwrap_or(usize::MAX).min(64 * 1024));
        stream.write_all(chunk)?;
        sent += chunk.len() as u64;
    }
    Ok(())
}

/// Reads until the server closes or `hold` (from `started`) runs out; notes the status line of
/// an answer on the way.
fn wait_for_server(stream: &mut TcpStream, started: Instant, hold: Duration) -> Outcome {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let left = hold.saturating_sub(started.elapsed());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Outcome::StillOpen { status: status_of(&head) };
        }
        match stream.read(&mut buffer) {
            Ok(0) => return Outcome::Closed { after: started.elapsed(), status: status_of(&head) },
            Ok(n) => {
                if head.len() < 64 {
                    head.extend_from_slice(&buffer[..n]);
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Outcome::StillOpen { status: status_of(&head) };
            }
            Err(_) => return Outcome::Closed { after: started.elapsed(), status: status_of(&head) },
        }
    }
}

/// The status of an `HTTP/1.x NNN ...` status line at the start of `head`.
fn status_of(head: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(head.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
}

impl AbuseReport {
    fn count(&mut self, outcome: Outcome) {
        let status = match outcome {
            Outcome::Closed { after, status } => {
                self.opened += 1;
                self.closed_by_peer += 1;
                self.max_close_ms = self.max_close_ms.max(u64::try_from(after.as_millis()).unwrap_or(u64::MAX));
                status
            }
            Outcome::StillOpen { status } => {
                self.opened += 1;
                self.still_open += 1;
                status
            }
            Outcome::Failed(message) => {
                self.errors += 1;
                if self.error_samples.len() < MAX_ERROR_SAMPLES && !self.error_samples.contains(&message) {
                    self.error_samples.push(message);
                }
                None
            }
        };
        if let Some(status) = status {
            *self.statuses.entry(status).or_default() += 1;
        }
    }

    /// Responses with `status`.
    pub fn status(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    pub fn to_json(&self) -> String {
        let statuses = self.statuses.iter().map(|(s, n)| (s.to_string(), Value::from(*n))).collect();
        Value::Object(vec![
            ("opened".into(), self.opened.into()),
            ("statuses".into(), Value::Object(statuses)),
            ("closed_by_peer".into(), self.closed_by_peer.into()),
            ("max_close_ms".into(), self.max_close_ms.into()),
            ("still_open".into(), self.still_open.into()),
            ("errors".into(), self.errors.into()),
            ("error_samples".into(), Value::Array(self.error_samples.iter().map(|s| s.as_str().into()).collect())),
        ])
        .to_string()
    }

    pub fn from_json(text: &str) -> Result<AbuseReport, String> {
        let value = json::parse(text)?;
        let number = |key: &str| value.get(key).and_then(Value::as_u64).ok_or_else(|| format!("no number {key:?}"));
        let statuses = value
            .get("statuses")
            .and_then(Value::as_object)
            .ok_or("no object \"statuses\"")?
            .iter()
            .map(|(k, v)| match (k.parse(), v.as_u64()) {
                (Ok(status), Some(n)) => Ok((status, n)),
                _ => Err(format!("bad status count {k:?}")),
            })
            .collect::<Result<_, String>>()?;
        let samples = value.get("error_samples").and_then(Value::as_array).ok_or("no array \"error_samples\"")?;
        Ok(AbuseReport {
            opened: number("opened")?,
            statuses,
            closed_by_peer: number("closed_by_peer")?,
            max_close_ms: number("max_close_ms")?,
            still_open: number("still_open")?,
            errors: number("errors")?,
            error_samples: samples.iter().filter_map(|s| s.as_str().map(String::from)).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_read() {
        assert_eq!(status_of(b"HTTP/1.1 400 Bad Request\r\n"), Some(400));
        assert_eq!(status_of(b"HTTP/1.0 200 OK\r\n"), Some(200));
        assert_eq!(status_of(b"HTTP/1.1 4"), None);
        assert_eq!(status_of(b"garbage that is long"), None);
    }

    #[test]
    fn report_round_trips() {
        let mut report = AbuseReport::default();
        report.count(Outcome::Closed { after: Duration::from_millis(1500), status: Some(400) });
        report.count(Outcome::StillOpen { status: None });
        report.count(Outcome::Failed("connect: refused".into()));
        assert_eq!(AbuseReport::from_json(&report.to_json()), Ok(report.clone()));
        assert_eq!((report.opened, report.closed_by_peer, report.max_close_ms, report.status(400)), (2, 1, 1500, 1));
    }
}
