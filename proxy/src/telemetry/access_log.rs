//! One access line per proxied connection (OBS-2), on stdout or appended to a file.
//!
//! The text format follows the spirit of Envoy's default: a timestamp, then `key=value` fields
//! an operator can grep. Workloads are named `namespace/name`; `-` stands for unknown. The JSON
//! format carries the same fields, one object per line, for log pipelines that parse; the
//! `envoy` and `istio` formats are Envoy's and Istio's own default text (`envoy_format`).

use std::{
    fs::File,
    io::{self, Write as _},
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use super::{
    envoy_format::{EnvoyFormat, connection_line},
    metrics::ConnectionCounters,
    rfc3339,
};
use crate::model::{Service, Workload};

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions finished.
    Completed,
    /// The connection carried data and then failed.
    Broken(String),
    /// The upstream could not be reached (Envoy's `UF`).
    UpstreamConnectFailed(String),
    /// The proxy refused the connection, with the reason.
    Refused(String),
}

impl Outcome {
    pub(super) fn fields(&self) -> (&'static str, Option<&str>) {
        match self {
            Outcome::Completed => ("ok", None),
            Outcome::Broken(r) => ("broken", Some(r)),
            Outcome::UpstreamConnectFailed(r) => ("upstream_connect_failed", Some(r)),
            Outcome::Refused(r) => ("refused", Some(r)),
        }
    }
}

/// Everything an access line and the metrics say about one connection.
#[derive(Debug, Clone)]
pub struct ConnectionRecord {
    /// `outbound` or `inbound`; inbound connections are reported by the destination.
    pub direction: &'static str,
    pub source_addr: SocketAddr,
    /// The source pod, when the mesh knows it (metrics derive workload, namespace and
    /// canonical service from it).
    pub source_workload: Option<Arc<Workload>>,
    /// SPIFFE identity of the source, when known (proven by mTLS inbound).
    pub source_identity: Option<String>,
    pub destination_addr: SocketAddr,
    pub destination_workload: Option<Arc<Workload>>,
    pub destination_identity: Option<String>,
    /// The service the client addressed, if it addressed one.
    pub destination_service: Option<Arc<Service>>,
    /// `mutual_tls` (HBONE) or `none` (plain TCP).
    pub security: &'static str,
    /// The SNI a gateway routed a TLS PASSTHROUGH connection by (GW-1), as Envoy's
    /// `requested_server_name`.
    pub server_name: Option<String>,
    /// Bytes the client sent (request direction).
    pub bytes_sent: u64,
    /// Bytes the client received (response direction).
    pub bytes_received: u64,
    pub started: SystemTime,
    pub duration: Duration,
    pub outcome: Outcome,
    /// Metric handles resolved when the connection was counted as opened.
    pub(super) counters: Option<ConnectionCounters>,
    /// The connection's span, when the proxy traces (OBS-7); boxed, so that a connection of a
    /// proxy that does not trace holds one pointer for it.
    pub trace: Option<Box<super::trace::Traced>>,
}

impl ConnectionRecord {
    /// A record for a connection that starts now; the caller fills in what it learns.
    pub fn start(direction: &'static str, source_addr: SocketAddr, destination_addr: SocketAddr) -> Self {
        Self {
            direction,
            source_addr,
            source_workload: None,
            source_identity: None,
            destination_addr,
            destination_workload: None,
            destination_identity: None,
            destination_service: None,
            security: "none",
            server_name: None,
            bytes_sent: 0,
            bytes_received: 0,
            started: SystemTime::now(),
            duration: Duration::ZERO,
            outcome: Outcome::Completed,
            counters: None,
            trace: None,
        }
    }
}

/// How access lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// `key=value` fields after a timestamp.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
    /// Envoy's default format string.
    Envoy,
    /// Istio's default text format (Envoy's, with details, cluster and addresses).
    Istio,
}

/// Lines wait in memory at most this long before they are written. One `write(2)` per line
/// was 3.7 % of the waypoint's CPU at 1,000 req/s (`cargo xtask bench --profile latency`,
/// 2026-12-07); gathered, it is one write per interval. Envoy flushes its access logs every
/// second; a tenth of that keeps `tail -f` and the tests' waits feeling immediate.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// A buffer this full is written at once, without waiting for the interval.
const FLUSH_AT: usize = 64 * 1024;

/// Writes access lines. Shared by every connection.
///
/// Lines are gathered in memory and written together: by the first line's flush timer, when
/// the buffer fills, by `flush` when the proxy stops, and when the log is dropped. Outside a
/// tokio runtime (no timer to rely on) each line is written at once.
#[derive(Debug, Default)]
pub struct AccessLog {
    format: AccessLogFormat,
    /// `None` writes to stdout.
    file: Option<Arc<Mutex<File>>>,
    /// Whole lines not written yet; never split, so concurrent writers cannot interleave.
    pending: Arc<Mutex<Pending>>,
}

impl AccessLog {
    /// Lines in `format`, appended to `path` (created if missing) or written to stdout.
    pub fn new(format: AccessLogFormat, path: Option<&Path>) -> io::Result<Self> {
        let file = match path {
            Some(path) => Some(Arc::new(Mutex::new(File::options().create(true).append(true).open(path)?))),
            None => None,
        };
        Ok(Self { format, file, pending: Arc::default() })
    }

    /// Like `new`, with an error that names the file.
    pub fn open(format: AccessLogFormat, path: Option<&Path>) -> io::Result<Self> {
        Self::new(format, path).map_err(|e| {
            let name = path.unwrap_or(Path::new("-")).display();
            io::Error::new(e.kind(), format!("cannot open the access log {name}: {e}"))
        })
    }

    pub fn record(&self, r: &ConnectionRecord) {
        let line = match self.format {
            AccessLogFormat::Text => format_line(r),
            AccessLogFormat::Json => json_line(r),
            AccessLogFormat::Envoy => connection_line(r, EnvoyFormat::Envoy),
            AccessLogFormat::Istio => connection_line(r, EnvoyFormat::Istio),
        };
        self.write_line(&line);
    }

    pub fn format(&self) -> AccessLogFormat {
        self.format
    }

    /// Queues one finished line (ending in a newline) for writing.
    pub(super) fn write_line(&self, line: &str) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            write_to(self.file.as_deref(), line.as_bytes());
            return;
        };
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let first = pending.bytes.is_empty();
        pending.bytes.extend_from_slice(line.as_bytes());
        if first {
            pending.since = now;
            // The first line of a batch arms one timer; an idle proxy arms none.
            drop(pending);
            let (pending, file) = (Arc::downgrade(&self.pending), self.file.clone());
            runtime.spawn(async move {
                tokio::time::sleep(FLUSH_INTERVAL).await;
                if let Some(pending) = pending.upgrade() {
                    pending.lock().unwrap_or_else(|p| p.into_inner()).write(file.as_deref());
                }
            });
        } else if pending.bytes.len() >= FLUSH_AT || now.duration_since(pending.since) > 2 * FLUSH_INTERVAL {
            // Full, or the timer did not fire (its runtime ended): written now.
            pending.write(self.file.as_deref());
        }
    }

    /// Writes every queued line now (the proxy is stopping).
    pub fn flush(&self) {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).write(self.file.as_deref());
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Lines queued for writing.
#[derive(Debug)]
struct Pending {
    bytes: Vec<u8>,
    /// When the first of them was queued.
    since: Instant,
}

impl Default for Pending {
    fn default() -> Self {
        Self { bytes: Vec::new(), since: Instant::now() }
    }
}

impl Pending {
    /// Writes the queued lines and empties the queue; called under its lock, so batches keep
    /// their order.
    fn write(&mut self, file: Option<&Mutex<File>>) {
        write_to(file, &self.bytes);
        self.bytes.clear();
        if self.bytes.capacity() > FLUSH_AT {
            // A burst's buffer is not kept for the quiet that follows.
            self.bytes = Vec::new();
        }
    }
}

fn write_to(file: Option<&Mutex<File>>, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    match file {
        Some(file) => {
            let _ = file.lock().unwrap_or_else(|p| p.into_inner()).write_all(bytes);
        }
        None => {
            let _ = io::stdout().lock().write_all(bytes);
        }
    }
}

fn format_line(r: &ConnectionRecord) -> String {
    let (result, reason) = r.outcome.fields();
    let workload = |w: &Option<Arc<Workload>>| w.as_ref().map_or_else(|| "-".to_owned(), |w| w.display_name());
    let dash = |v: &Option<String>| v.as_deref().unwrap_or("-").to_owned();
    let mut line = format!(
        "[{}] {} tcp src.addr={} src.workload={} src.identity={} dst.addr={} dst.service={} dst.workload={} dst.identity={} security={} sent={} received={} duration_ms={} result={}",
        rfc3339(r.started),
        r.direction,
        r.source_addr,
        workload(&r.source_workload),
        dash(&r.source_identity),
        r.destination_addr,
        r.destination_service.as_ref().map_or("-", |s| s.hostname.as_str()),
        workload(&r.destination_workload),
        dash(&r.destination_identity),
        r.security,
        r.bytes_sent,
        r.bytes_received,
        r.duration.as_millis(),
        result,
    );
    if let Some(sni) = &r.server_name {
        line.push_str(&format!(" sni={sni}"));
    }
    if let Some(reason) = reason {
        line.push_str(&format!(" reason=\"{}\"", reason.replace('"', "'")));
    }
    line.push('\n');
    line
}

/// The JSON line: the text line's fields, nested where the text uses dots (`src.addr` is
/// `.src.addr` in jq), `null` where the text writes `-` (an unknown service is left out).
#[derive(Serialize)]
struct JsonLine<'a> {
    start_time: String,
    direction: &'a str,
    protocol: &'a str,
    src: JsonEnd<'a>,
    dst: JsonEnd<'a>,
    security: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sni: Option<&'a str>,
    sent: u64,
    received: u64,
    duration_ms: u128,
    result: &'a str,
    reason: Option<&'a str>,
    response_flags: &'a str,
}

#[derive(Serialize)]
struct JsonEnd<'a> {
    addr: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<&'a str>,
    workload: Option<String>,
    identity: Option<&'a str>,
}

fn json_line(r: &ConnectionRecord) -> String {
    let (result, reason) = r.outcome.fields();
    let line = JsonLine {
        start_time: rfc3339(r.started),
        direction: r.direction,
        protocol: "tcp",
        src: JsonEnd {
            addr: r.source_addr,
            service: None,
            workload: r.source_workload.as_ref().map(|w| w.display_name()),
            identity: r.source_identity.as_deref(),
        },
        dst: JsonEnd {
            addr: r.destination_addr,
            service: r.destination_service.as_ref().map(|s| s.hostname.as_str()),
            workload: r.destination_workload.as_ref().map(|w| w.display_name()),
            identity: r.destination_identity.as_deref(),
        },
        security: r.security,
        sni: r.server_name.as_deref(),
        sent: r.bytes_sent,
        received: r.bytes_received,
        duration_ms: r.duration.as_millis(),
        result,
        reason,
        response_flags: r.outcome.response_flags(),
    };
    // Serializing plain strings and numbers cannot fail; the fallback keeps the line count right.
    let mut text = serde_json::to_string(&line).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ConnectionRecord {
        let mut r = ConnectionRecord::start(
            "outbound",
            "10.1.0.10:40000".parse().expect("addr"),
            "10.2.0.10:80".parse().expect("addr"),
        );
        r.source_workload = Some(Arc::new(crate::telemetry::test_workload("mesh", "client")));
        r.source_identity = Some("spiffe://cluster.local/ns/mesh/sa/client".into());
        r.bytes_sent = 78;
        r.bytes_received = 300;
        r.started = std::time::UNIX_EPOCH;
        r.duration = Duration::from_millis(12);
        r.outcome = Outcome::UpstreamConnectFailed("connection \"refused\"".into());
        r
    }

    #[test]
    fn line_names_both_ends_bytes_and_result() {
        assert_eq!(
            format_line(&record()),
            "[1970-01-01T00:00:00.000Z] outbound tcp src.addr=10.1.0.10:40000 src.workload=mesh/client \
             src.identity=spiffe://cluster.local/ns/mesh/sa/client dst.addr=10.2.0.10:80 dst.service=- \
             dst.workload=- dst.identity=- security=none sent=78 received=300 duration_ms=12 \
             result=upstream_connect_failed reason=\"connection 'refused'\"\n"
        );
    }

    #[test]
    fn json_line_has_the_same_fields() {
        let line = json_line(&record());
        assert!(line.ends_with('\n') && !line.trim_end().contains('\n'), "one line: {line}");
        let v: serde_json::Value = serde_json::from_str(&line).expect("valid JSON");
        assert_eq!(v["start_time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["direction"], "outbound");
        assert_eq!(v["src"]["addr"], "10.1.0.10:40000");
        assert_eq!(v["src"]["workload"], "mesh/client");
        assert_eq!(v["src"]["identity"], "spiffe://cluster.local/ns/mesh/sa/client");
        assert_eq!(v["dst"]["addr"], "10.2.0.10:80");
        assert!(v["dst"]["identity"].is_null() && v["dst"]["workload"].is_null(), "{v}");
        assert!(v["dst"].get("service").is_none(), "{v}");
        assert_eq!((v["sent"].as_u64(), v["received"].as_u64()), (Some(78), Some(300)));
        assert_eq!(v["duration_ms"], 12);
        assert_eq!(v["security"], "none");
        assert_eq!(v["result"], "upstream_connect_failed");
        assert_eq!(v["reason"], "connection \"refused\"");
        assert_eq!(v["response_flags"], "CONNECT");

        let mut ok = record();
        ok.outcome = Outcome::Completed;
        let v: serde_json::Value = serde_json::from_str(&json_line(&ok)).expect("valid JSON");
        assert!(v["reason"].is_null(), "{v}");
        assert_eq!((v["result"].as_str(), v["response_flags"].as_str()), (Some("ok"), Some("-")));
        assert!(v.get("sni").is_none(), "{v}");
    }

    // GW-1: a passthrough connection's line names the SNI it was routed by.
    #[test]
    fn passthrough_lines_name_the_sni() {
        let mut r = record();
        r.outcome = Outcome::Completed;
        r.server_name = Some("edition.cnn.com".into());
        assert!(format_line(&r).ends_with(" result=ok sni=edition.cnn.com\n"), "{}", format_line(&r));
        let v: serde_json::Value = serde_json::from_str(&json_line(&r)).expect("valid JSON");
        assert_eq!(v["sni"], "edition.cnn.com");
    }

    #[test]
    fn file_sink_appends() {
        let path = std::env::temp_dir().join(format!("strait-access-{}.log", std::process::id()));
        std::fs::write(&path, "earlier\n").expect("seed");
        let log = AccessLog::new(AccessLogFormat::Json, Some(&path)).expect("open");
        log.record(&record());
        log.record(&record());
        let text = std::fs::read_to_string(&path).expect("read");
        let _ = std::fs::remove_file(&path);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "earlier");
        assert!(lines[1..].iter().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()), "{text}");
    }

    // Inside a runtime, lines are gathered and written together within the flush interval, in
    // order, and `flush` writes what is queued at once.
    #[test]
    fn lines_are_written_in_batches_within_the_interval() {
        let path = std::env::temp_dir().join(format!("strait-access-batch-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let log = AccessLog::new(AccessLogFormat::Text, Some(&path)).expect("open");
        let read = || std::fs::read_to_string(&path).unwrap_or_default();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            log.write_line("one\n");
            log.write_line("two\n");
            assert_eq!(read(), "", "queued, not yet written");
            tokio::time::sleep(FLUSH_INTERVAL * 3).await;
            assert_eq!(read(), "one\ntwo\n", "written by the timer, in order");
            log.write_line("three\n");
            log.flush();
            assert_eq!(read(), "one\ntwo\nthree\n", "flush writes at once");
            // A full buffer is written without waiting.
            let long = format!("{}\n", "x".repeat(FLUSH_AT));
            log.write_line("four\n");
            log.write_line(&long);
            assert!(read().ends_with(&long), "a full buffer is written at once");
        });
        let _ = std::fs::remove_file(&path);
    }
}
