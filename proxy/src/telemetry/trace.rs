//! Spans exported over OTLP/HTTP with JSON encoding (OBS-7, OBS-4): a node proxy makes one span
//! per connection it tunnels, a waypoint or gateway one per request, each joined to the W3C
//! `traceparent` it received and passing its own span on, so a request through node → waypoint
//! → node shows as a chain of parent and child spans.
//!
//! - Sampling follows the incoming `sampled` flag; a new trace is sampled with the configured
//!   percentage (Istio's `sampling`, default 1 %).
//! - Spans leave in batches from one background task through a bounded queue: when the queue is
//!   full the span is dropped and counted, never waited for. Without `--otlp-endpoint` there is
//!   no tracer, and the data path does nothing of this.
//! - OTLP/JSON writes trace and span ids in hex and 64-bit integers as strings (the OTLP
//!   specification's JSON mapping); POST `<endpoint>/v1/traces`, as an OTLP/HTTP collector
//!   listens on 4318.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Method, Uri};
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{ScrapedCounters, http::exchange};
use crate::model::{Service, Workload};

/// Spans waiting to be sent; more are dropped.
const QUEUE: usize = 4096;
/// Spans sent in one request at most.
const BATCH: usize = 512;
/// How long a span may wait for others to fill its batch.
const LINGER: Duration = Duration::from_millis(500);
/// How long the collector has to answer.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one warning per this long while exports fail.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Where spans go and how many new traces are sampled (`--otlp-endpoint`, `--trace-sampling`).
#[derive(Debug, Clone)]
pub struct TracingOptions {
    /// `http://host:port` of an OTLP/HTTP collector.
    pub endpoint: String,
    /// Percent of new traces sampled (Istio's `sampling`).
    pub sampling: f64,
}

impl TracingOptions {
    /// Starts the tracer of a proxy named `service` (OTLP's `service.name`), `instance` being
    /// this one of them; registers its counters.
    pub fn start(
        &self,
        service: String,
        instance: String,
        metrics: &mut super::MetricsRegistry,
    ) -> Result<Arc<Tracer>, String> {
        let tracer = Tracer::start(&self.endpoint, self.sampling, service, instance)
            .map_err(|e| format!("--otlp-endpoint {}: {e}", self.endpoint))?;
        metrics.register(tracer.counters());
        Ok(tracer)
    }
}

/// A W3C trace context: the trace, the span that is the parent of the next hop, and whether
/// the trace is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

impl TraceContext {
    /// Reads a `traceparent` header (version 00, or a later version read as 00); `None` when
    /// malformed or with all-zero ids, which W3C says to ignore.
    pub fn parse(value: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(value).ok()?.trim();
        let mut parts = text.split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| (s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())).then_some(());
        hex(version, 2)?;
        hex(trace, 32)?;
        hex(span, 16)?;
        hex(flags, 2)?;
        if version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok().filter(|t| *t != 0)?;
        let span_id = u64::from_str_radix(span, 16).ok().filter(|s| *s != 0)?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self { trace_id, span_id, sampled: flags & 1 == 1 })
    }

    /// The `traceparent` that makes this span the parent of the next hop.
    pub fn header(&self) -> String {
        format!("00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, u8::from(self.sampled))
    }

    pub fn trace_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    pub fn span_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }
}

/// The span of something in progress: its own context and its parent's.
#[derive(Debug, Clone, Copy)]
pub struct Traced {
    pub context: TraceContext,
    pub parent: Option<TraceContext>,
    /// The tunnel a request came through, when the request's own trace is another one.
    pub link: Option<TraceContext>,
}

/// What a span is, in OTLP's terms.
#[derive(Debug, Clone, Copy)]
pub enum SpanKind {
    Server = 2,
    Client = 3,
}

/// An attribute value.
#[derive(Debug, Clone)]
pub enum Value {
    Str(String),
    Int(i64),
}

/// One finished span.
#[derive(Debug, Clone)]
pub struct Span {
    pub context: TraceContext,
    pub parent: Option<u64>,
    pub name: String,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    pub error: bool,
    /// Another trace this span belongs with: the connection a request arrived on, when the
    /// request carried a trace of its own.
    pub link: Option<TraceContext>,
}

impl Span {
    /// A span of `context`, child of `parent`, that ran from `start` for `duration`.
    pub fn new(
        context: TraceContext,
        parent: Option<TraceContext>,
        name: String,
        kind: SpanKind,
        start: SystemTime,
        duration: Duration,
    ) -> Self {
        Self {
            context,
            parent: parent.map(|p| p.span_id),
            name,
            kind,
            start,
            end: start + duration,
            attributes: Vec::new(),
            error: false,
            link: None,
        }
    }

    pub fn attr(&mut self, key: &'static str, value: impl Into<String>) {
        self.attributes.push((key, Value::Str(value.into())));
    }

    /// The two ends, as far as they are known: source workload and principal, destination
    /// workload and service.
    pub fn ends(
        &mut self,
        source: Option<&Workload>,
        principal: Option<&str>,
        destination: Option<&Workload>,
        service: Option<&Service>,
    ) {
        if let Some(w) = source {
            self.attr("source.workload", w.display_name());
        }
        if let Some(id) = principal {
            self.attr("source.principal", id);
        }
        if let Some(w) = destination {
            self.attr("destination.workload", w.display_name());
        }
        if let Some(s) = service {
            self.attr("destination.service", s.hostname.as_str());
        }
    }

    pub fn int(&mut self, key: &'static str, value: u64) {
        self.attributes.push((key, Value::Int(i64::try_from(value).unwrap_or(i64::MAX))));
    }
}

/// Where spans are sent, and how many.
pub struct Tracer {
    /// Percent of new traces sampled.
    sampling: f64,
    queue: mpsc::Sender<Span>,
    counts: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    exported: AtomicU64,
    dropped: AtomicU64,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer").field("sampling", &self.sampling).finish_non_exhaustive()
    }
}

impl Tracer {
    /// Starts exporting to `endpoint` (`http://collector:4318`; `/v1/traces` is added unless the
    /// path names it) as `service` (OTLP's `service.name`), sampling `sampling` percent of new
    /// traces.
    pub fn start(endpoint: &str, sampling: f64, service: String, instance: String) -> Result<Arc<Self>, String> {
        let uri = super::http::parse_http_uri(endpoint)?;
        let uri = if uri.path().trim_end_matches('/').is_empty() {
            super::http::parse_http_uri(&format!("{}/v1/traces", endpoint.trim_end_matches('/')))?
        } else {
            uri
        };
        if !(0.0..=100.0).contains(&sampling) {
            return Err(format!("the sampling percentage {sampling} is not between 0 and 100"));
        }
        let (queue, spans) = mpsc::channel(QUEUE);
        let counts = Arc::new(Counts::default());
        tokio::spawn(export(uri, service, instance, spans, counts.clone()));
        Ok(Arc::new(Self { sampling, queue, counts }))
    }

    /// The context of a new span: a child of `parent` (its trace and its sampling decision), or
    /// the root of a new trace, sampled at the configured rate.
    pub fn child(&self, parent: Option<&TraceContext>) -> TraceContext {
        let span_id = fastrand::u64(1..);
        match parent {
            Some(p) => TraceContext { trace_id: p.trace_id, span_id, sampled: p.sampled },
            None => TraceContext {
                trace_id: fastrand::u128(1..),
                span_id,
                sampled: fastrand::f64() * 100.0 < self.sampling,
            },
        }
    }

    /// Queues a finished span if its trace is sampled; never waits.
    pub fn export(&self, span: Span) {
        if !span.context.sampled {
            return;
        }
        if self.queue.try_send(span).is_err() {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `strait_trace_spans_exported_total` and `strait_trace_spans_dropped_total`.
    pub fn counters(&self) -> ScrapedCounters {
        let counts = self.counts.clone();
        ScrapedCounters::each("strait_trace_spans", "Spans sent to the OTLP collector, or dropped (OBS-7)", move || {
            [("exported", counts.exported.load(Ordering::Relaxed)), ("dropped", counts.dropped.load(Ordering::Relaxed))]
        })
    }
}

async fn export(uri: Uri, service: String, instance: String, mut spans: mpsc::Receiver<Span>, counts: Arc<Counts>) {
    let mut last_warning: Option<std::time::Instant> = None;
    while let Some(first) = spans.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, spans.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let body = Bytes::from(encode(&service, &instance, &batch));
        let n = batch.len() as u64;
        match exchange(Method::POST, &uri, Some("application/json"), body, EXPORT_TIMEOUT).await {
            Ok((status, _)) if status.is_success() => {
                counts.exported.fetch_add(n, Ordering::Relaxed);
                debug!(spans = n, "spans exported");
            }
            failed => {
                counts.dropped.fetch_add(n, Ordering::Relaxed);
                let reason = match failed {
                    Ok((status, answer)) => format!("{uri} answered {status}: {}", String::from_utf8_lossy(&answer)),
                    Err(e) => e,
                };
                if last_warning.is_none_or(|t| t.elapsed() > WARN_EVERY) {
                    last_warning = Some(std::time::Instant::now());
                    warn!(
                        "cannot export spans to the OTLP collector (dropped, counted in strait_trace_spans_dropped_total): {reason}"
                    );
                }
            }
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonSpan<'a> {
    trace_id: String,
    span_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    parent_span_id: String,
    name: &'a str,
    kind: u8,
    start_time_unix_nano: String,
    end_time_unix_nano: String,
    attributes: Vec<serde_json::Value>,
    status: serde_json::Value,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    links: Vec<serde_json::Value>,
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()).to_string()
}

fn attribute(key: &str, value: &Value) -> serde_json::Value {
    match value {
        Value::Str(s) => serde_json::json!({"key": key, "value": {"stringValue": s}}),
        Value::Int(i) => serde_json::json!({"key": key, "value": {"intValue": i.to_string()}}),
    }
}

/// One OTLP `ExportTraceServiceRequest` in JSON.
fn encode(service: &str, instance: &str, spans: &[Span]) -> String {
    let spans: Vec<JsonSpan<'_>> = spans
        .iter()
        .map(|s| JsonSpan {
            trace_id: s.context.trace_hex(),
            span_id: s.context.span_hex(),
            parent_span_id: s.parent.map_or_else(String::new, |p| {
                let mut hex = String::with_capacity(16);
                let _ = write!(hex, "{p:016x}");
                hex
            }),
            name: &s.name,
            kind: s.kind as u8,
            start_time_unix_nano: nanos(s.start),
            end_time_unix_nano: nanos(s.end),
            attributes: s.attributes.iter().map(|(k, v)| attribute(k, v)).collect(),
            // OTLP's STATUS_CODE_ERROR is 2; unset (0) otherwise, as instrumentation should.
            status: if s.error { serde_json::json!({"code": 2}) } else { serde_json::json!({}) },
            links: s
                .link
                .iter()
                .map(|l| serde_json::json!({"traceId": l.trace_hex(), "spanId": l.span_hex()}))
                .collect(),
        })
        .collect();
    let request = serde_json::json!({
        "resourceSpans": [{
            "resource": {"attributes": [
                attribute("service.name", &Value::Str(service.to_owned())),
                attribute("service.instance.id", &Value::Str(instance.to_owned())),
                attribute("service.version", &Value::Str(env!("CARGO_PKG_VERSION").to_owned())),
            ]},
            "scopeSpans": [{"scope": {"name": "strait", "version": env!("CARGO_PKG_VERSION")}, "spans": spans}],
        }]
    });
    request.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_bad_ones() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = TraceContext::parse(text.as_bytes()).expect("valid");
        assert_eq!(context.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(context.span_id, 0x00f067aa0ba902b7);
        assert!(context.sampled);
        assert_eq!(context.header(), text);
        let unsampled = TraceContext::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").expect("ok");
        assert!(!unsampled.sampled);
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xyz",
        ] {
            assert_eq!(TraceContext::parse(bad.as_bytes()), None, "{bad}");
        }
        assert!(TraceContext::parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future").is_some());
    }

    #[tokio::test]
    async fn children_join_the_parent_and_roots_follow_the_sampling() {
        let tracer = Tracer::start("http://127.0.0.1:9", 0.0, "s".into(), "i".into()).expect("tracer");
        let parent = TraceContext { trace_id: 7, span_id: 9, sampled: true };
        let child = tracer.child(Some(&parent));
        assert_eq!((child.trace_id, child.sampled), (7, true));
        assert_ne!(child.span_id, 9);
        assert!(!tracer.child(None).sampled, "0 % samples no new trace");
        let all = Tracer::start("http://127.0.0.1:9", 100.0, "s".into(), "i".into()).expect("tracer");
        assert!(all.child(None).sampled);
        assert!(Tracer::start("https://collector:4318", 1.0, "s".into(), "i".into()).is_err());
        assert!(Tracer::start("http://collector:4318", 101.0, "s".into(), "i".into()).is_err());
    }

    #[test]
    fn spans_encode_as_otlp_json() {
        let context = TraceContext { trace_id: 1, span_id: 2, sampled: true };
        let mut span = Span::new(
            context,
            Some(TraceContext { trace_id: 1, span_id: 3, sampled: true }),
            "GET /".into(),
            SpanKind::Server,
            std::time::UNIX_EPOCH + Duration::from_secs(1),
            Duration::from_millis(5),
        );
        span.attr("source.workload", "mesh/client");
        span.int("http.response.status_code", 200);
        let json: serde_json::Value = serde_json::from_str(&encode("svc", "node1", &[span])).expect("json");
        let s = &json["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], "00000000000000000000000000000001");
        assert_eq!(s["spanId"], "0000000000000002");
        assert_eq!(s["parentSpanId"], "0000000000000003");
        assert_eq!(s["kind"], 2);
        assert_eq!(s["startTimeUnixNano"], "1000000000");
        assert_eq!(s["endTimeUnixNano"], "1005000000");
        assert_eq!(s["attributes"][1]["value"]["intValue"], "200");
        assert_eq!(json["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"], "svc");
    }
}
