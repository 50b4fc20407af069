//! Per-request telemetry of the L7 engine (OBS-1, OBS-2): Istio's request metrics
//! (`istio_requests_total`, `istio_request_duration_milliseconds`, `istio_request_bytes`,
//! `istio_response_bytes`) and one access line per request.
//!
//! Cost per request: one label set (the TCP set plus code, gRPC status and flags) hashed into
//! four families under their read locks, and one formatted line, written with one syscall.

use std::{
    borrow::Cow,
    fmt,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use prometheus_client::{
    encoding::{EncodeLabel as _, EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use serde::Serialize;

use super::{
    AccessLog, AccessLogFormat, TrafficMap,
    envoy_format::{EnvoyFormat, request_line},
    labels::{PeerLabels, Reporter, UNKNOWN, endpoint_labels},
    map::{self, End, MapEvent, Observation, Verdict},
    rfc3339,
    trace::{Span, SpanKind, Traced, Tracer},
};
use crate::{
    l7::flags::ResponseFlags,
    model::{Service, Workload},
};

/// Istio's duration buckets, milliseconds.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];
/// Istio's size buckets, bytes: powers of ten from 1 to 10^8.
const SIZE_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

/// Everything an access line and the metrics say about one request.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub reporter: Reporter,
    pub start_time: SystemTime,
    /// The original client (as the HBONE `forwarded` header proved it) and the peer's port.
    pub source_addr: SocketAddr,
    pub source_workload: Option<Arc<Workload>>,
    pub source_identity: Option<String>,
    pub destination_service: Option<Arc<Service>>,
    /// The endpoint that served the request.
    pub destination_workload: Option<Arc<Workload>>,
    pub destination_identity: Option<String>,
    pub upstream_addr: Option<SocketAddr>,
    /// Envoy's cluster name of the destination (`outbound|9080|v1|reviews.default.svc...`).
    pub upstream_cluster: Option<String>,
    pub method: String,
    /// Path and query as the client sent them.
    pub path: String,
    pub authority: String,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    /// `http` or `grpc`, the metrics' `request_protocol`.
    pub request_protocol: &'static str,
    pub user_agent: Option<String>,
    /// The client's `x-forwarded-for`, as it arrived.
    pub forwarded_for: Option<String>,
    pub request_id: String,
    pub status: u16,
    pub grpc_status: Option<u32>,
    pub flags: ResponseFlags,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub duration: Duration,
    /// Time the upstream took to answer (its headers), as `x-envoy-upstream-service-time`.
    pub upstream_time: Option<Duration>,
    /// `namespace/name` of the VirtualService whose route was taken, and the route's name.
    pub route: Option<String>,
    /// Why the proxy answered itself (denied, no route, ...).
    pub reason: Option<String>,
    /// Tries made upstream (1 without retries).
    pub attempts: u32,
    /// Refused by policy: L7 authorization (403) or a bad token (401).
    pub denied: bool,
    /// The request's span, when the proxy traces (OBS-7).
    pub trace: Option<Box<Traced>>,
}

impl RequestRecord {
    pub fn new(reporter: Reporter, source_addr: SocketAddr) -> Self {
        Self {
            reporter,
            start_time: SystemTime::now(),
            source_addr,
            source_workload: None,
            source_identity: None,
            destination_service: None,
            destination_workload: None,
            destination_identity: None,
            upstream_addr: None,
            upstream_cluster: None,
            method: String::new(),
            path: String::new(),
            authority: String::new(),
            protocol: "HTTP/1.1",
            request_protocol: "http",
            user_agent: None,
            forwarded_for: None,
            request_id: String::new(),
            status: 0,
            grpc_status: None,
            flags: ResponseFlags::default(),
            request_bytes: 0,
            response_bytes: 0,
            duration: Duration::ZERO,
            upstream_time: None,
            route: None,
            reason: None,
            attempts: 0,
            denied: false,
            trace: None,
        }
    }
}

/// Istio's request metric families.
#[derive(Debug)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram>,
    request_bytes: Family<RequestLabels, Histogram>,
    response_bytes: Family<RequestLabels, Histogram>,
}

impl RequestMetrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let metrics = Arc::new(Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
            request_bytes: Family::new_with_constructor(|| Histogram::new(SIZE_BUCKETS)),
            response_bytes: Family::new_with_constructor(|| Histogram::new(SIZE_BUCKETS)),
        });
        registry.register("istio_requests", "Total number of requests", metrics.requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Duration of requests in milliseconds",
            metrics.duration.clone(),
        );
        registry.register("istio_request_bytes", "Size of requests in bytes", metrics.request_bytes.clone());
        registry.register("istio_response_bytes", "Size of responses in bytes", metrics.response_bytes.clone());
        metrics
    }

    fn observe(&self, r: &RequestRecord) {
        let labels = RequestLabels::of(r);
        self.requests.get_or_create(&labels).inc();
        self.duration.get_or_create(&labels).observe(r.duration.as_secs_f64() * 1000.0);
        self.request_bytes.get_or_create(&labels).observe(r.request_bytes as f64);
        self.response_bytes.get_or_create(&labels).observe(r.response_bytes as f64);
    }
}

/// Where request handlers report, once per request when its response is over.
#[derive(Debug, Clone)]
pub struct RequestTelemetry {
    access_log: Arc<AccessLog>,
    metrics: Arc<RequestMetrics>,
    map: Arc<TrafficMap>,
    tracer: Option<Arc<Tracer>>,
}

impl RequestTelemetry {
    pub fn new(access_log: Arc<AccessLog>, metrics: Arc<RequestMetrics>, map: Arc<TrafficMap>) -> Self {
        Self { access_log, metrics, map, tracer: None }
    }

    /// Exports a span per request to `tracer`.
    pub fn with_tracer(mut self, tracer: Option<Arc<Tracer>>) -> Self {
        self.tracer = tracer;
        self
    }

    /// The tracer, when the proxy exports spans.
    pub fn tracer(&self) -> Option<&Arc<Tracer>> {
        self.tracer.as_ref()
    }

    /// Writes the access line, counts the request, and hands the record to the mesh map
    /// (which keeps its method, path and reason).
    pub fn finish(&self, record: RequestRecord) {
        let line = match self.access_log.format() {
            AccessLogFormat::Text => text_line(&record),
            AccessLogFormat::Json => json_line(&record),
            AccessLogFormat::Envoy => request_line(&record, EnvoyFormat::Envoy),
            AccessLogFormat::Istio => request_line(&record, EnvoyFormat::Istio),
        };
        self.access_log.write_line(&line);
        self.metrics.observe(&record);
        if let (Some(tracer), Some(traced)) = (&self.tracer, &record.trace) {
            tracer.export(request_span(&record, traced));
        }
        self.observe_on_map(record);
    }

    /// OBS-6: a policy refusal counts as denied, a 5xx (or no answer) as an error.
    fn observe_on_map(&self, r: RequestRecord) {
        let reporter = r.reporter.as_str();
        let verdict = match r.status {
            _ if r.denied => Verdict::Denied,
            0 | 500.. => Verdict::Error,
            _ => Verdict::Ok,
        };
        let mut event = MapEvent::new(reporter, r.start_time, r.duration);
        event.status = r.status;
        event.result = Cow::Borrowed(match verdict {
            Verdict::Ok => "ok",
            Verdict::Error => "error",
            Verdict::Denied => "denied",
        });
        event.flags = r.flags.label();
        event.sent = r.request_bytes;
        event.received = r.response_bytes;
        event.method = r.method;
        event.path = map::trim_path(r.path);
        event.reason = r.reason;
        self.map.observe(Observation {
            reporter,
            protocol: "http",
            source: End::workload(r.source_workload.as_deref()),
            destination: End::destination(r.destination_workload.as_deref(), r.destination_service.as_deref()),
            security: request_security(r.reporter),
            verdict,
            duration: r.duration,
            counted: false,
            event,
        });
    }
}

/// The label set of the request metrics: Istio's, in Istio's order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RequestLabels {
    reporter: Reporter,
    source: PeerLabels,
    destination: PeerLabels,
    destination_service: [String; 3],
    request_protocol: &'static str,
    response_code: u16,
    grpc_response_status: Option<u32>,
    response_flags: Cow<'static, str>,
}

impl RequestLabels {
    fn of(r: &RequestRecord) -> Self {
        let destination_service = match &r.destination_service {
            Some(s) => [s.hostname.clone(), s.namespace.clone(), s.name.clone()],
            None => [UNKNOWN.to_owned(), UNKNOWN.to_owned(), UNKNOWN.to_owned()],
        };
        Self {
            reporter: r.reporter,
            source: PeerLabels::new(r.source_workload.as_deref(), r.source_identity.as_deref()),
            destination: PeerLabels::new(r.destination_workload.as_deref(), r.destination_identity.as_deref()),
            destination_service,
            request_protocol: r.request_protocol,
            response_code: r.status,
            grpc_response_status: r.grpc_status,
            response_flags: r.flags.label(),
        }
    }
}

/// How a request's connection was secured, as Istio documents `connection_security_policy`:
/// `unknown` when the source reports (a gateway cannot tell how its clients' connections were
/// secured); a waypoint's requests arrive over HBONE, always mutual TLS.
fn request_security(reporter: Reporter) -> &'static str {
    if reporter == Reporter::Source { UNKNOWN } else { "mutual_tls" }
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        let shared = endpoint_labels(self.reporter, &self.source, &self.destination, &self.destination_service);
        let code = self.response_code.to_string();
        let grpc = self.grpc_response_status.map_or_else(String::new, |g| g.to_string());
        let security = request_security(self.reporter);
        let own = [
            ("request_protocol", self.request_protocol),
            ("response_code", code.as_str()),
            ("grpc_response_status", grpc.as_str()),
            ("response_flags", &self.response_flags),
            ("connection_security_policy", security),
        ];
        for label in shared.into_iter().chain(own) {
            label.encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// A request's span (OBS-7): the server side, at the waypoint or gateway, named as Envoy names
/// its spans (the authority and path), with the two workloads and the answer.
fn request_span(r: &RequestRecord, traced: &Traced) -> Span {
    let name = format!("{}{}", r.authority, r.path.split('?').next().unwrap_or_default());
    let mut span = Span::new(traced.context, traced.parent, name, SpanKind::Server, r.start_time, r.duration);
    span.link = traced.link;
    span.ends(
        r.source_workload.as_deref(),
        r.source_identity.as_deref(),
        r.destination_workload.as_deref(),
        r.destination_service.as_deref(),
    );
    if let Some(addr) = r.upstream_addr {
        span.attr("upstream.address", addr.to_string());
    }
    span.attr("http.request.method", r.method.as_str());
    span.attr("url.path", r.path.split('?').next().unwrap_or_default());
    span.attr("http.protocol", r.protocol);
    span.int("http.response.status_code", u64::from(r.status));
    span.attr("response_flags", r.flags.label());
    span.attr("x-request-id", r.request_id.as_str());
    span.error = r.status == 0 || r.status >= 500;
    span
}

fn text_line(r: &RequestRecord) -> String {
    let workload = |w: &Option<Arc<Workload>>| w.as_ref().map_or_else(|| "-".to_owned(), |w| w.display_name());
    let dash = |v: Option<&str>| v.unwrap_or("-").to_owned();
    let mut line = format!(
        "[{}] {} http src.addr={} src.workload={} src.identity={} method={} path=\"{}\" authority={} protocol={} \
         status={} flags={} dst.service={} dst.workload={} upstream={} cluster={} sent={} received={} \
         duration_ms={} upstream_ms={} attempts={} request_id={} route={}",
        rfc3339(r.start_time),
        r.reporter.as_str(),
        r.source_addr,
        workload(&r.source_workload),
        dash(r.source_identity.as_deref()),
        r.method,
        r.path.replace('"', "%22"),
        dash(Some(&r.authority).filter(|a| !a.is_empty()).map(String::as_str)),
        r.protocol,
        r.status,
        r.flags,
        r.destination_service.as_ref().map_or("-", |s| s.hostname.as_str()),
        workload(&r.destination_workload),
        r.upstream_addr.map_or_else(|| "-".to_owned(), |a| a.to_string()),
        dash(r.upstream_cluster.as_deref()),
        r.request_bytes,
        r.response_bytes,
        r.duration.as_millis(),
        r.upstream_time.map_or_else(|| "-".to_owned(), |t| t.as_millis().to_string()),
        r.attempts,
        r.request_id,
        dash(r.route.as_deref()),
    );
    if let Some(g) = r.grpc_status {
        line.push_str(&format!(" grpc_status={g}"));
    }
    if let Some(reason) = &r.reason {
        line.push_str(&format!(" reason=\"{}\"", reason.replace('"', "'")));
    }
    line.push('\n');
    line
}

#[derive(Serialize)]
struct JsonLine<'a> {
    start_time: String,
    reporter: &'a str,
    protocol: &'a str,
    method: &'a str,
    path: &'a str,
    authority: &'a str,
    response_code: u16,
    response_flags: String,
    grpc_status: Option<u32>,
    src: JsonEnd<'a>,
    dst: JsonEnd<'a>,
    upstream_cluster: Option<&'a str>,
    bytes_received: u64,
    bytes_sent: u64,
    duration_ms: u128,
    upstream_service_time_ms: Option<u128>,
    attempts: u32,
    request_id: &'a str,
    user_agent: Option<&'a str>,
    route: Option<&'a str>,
    reason: Option<&'a str>,
}

#[derive(Serialize)]
struct JsonEnd<'a> {
    addr: Option<String>,
    service: Option<&'a str>,
    workload: Option<String>,
    identity: Option<&'a str>,
}

fn json_line(r: &RequestRecord) -> String {
    let line = JsonLine {
        start_time: rfc3339(r.start_time),
        reporter: r.reporter.as_str(),
        protocol: r.protocol,
        method: &r.method,
        path: &r.path,
        authority: &r.authority,
        response_code: r.status,
        response_flags: r.flags.label().into_owned(),
        grpc_status: r.grpc_status,
        src: JsonEnd {
            addr: Some(r.source_addr.to_string()),
            service: None,
            workload: r.source_workload.as_ref().map(|w| w.display_name()),
            identity: r.source_identity.as_deref(),
        },
        dst: JsonEnd {
            addr: r.upstream_addr.map(|a| a.to_string()),
            service: r.destination_service.as_ref().map(|s| s.hostname.as_str()),
            workload: r.destination_workload.as_ref().map(|w| w.display_name()),
            identity: r.destination_identity.as_deref(),
        },
        upstream_cluster: r.upstream_cluster.as_deref(),
        bytes_received: r.request_bytes,
        bytes_sent: r.response_bytes,
        duration_ms: r.duration.as_millis(),
        upstream_service_time_ms: r.upstream_time.map(|t| t.as_millis()),
        attempts: r.attempts,
        request_id: &r.request_id,
        user_agent: r.user_agent.as_deref(),
        route: r.route.as_deref(),
        reason: r.reason.as_deref(),
    };
    let mut text = serde_json::to_string(&line).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Exposition;

    fn record() -> RequestRecord {
        let mut r = RequestRecord::new(Reporter::Waypoint, "10.1.0.10:40000".parse().expect("addr"));
        r.method = "GET".into();
        r.path = "/reviews/0".into();
        r.authority = "reviews:9080".into();
        r.status = 503;
        r.flags = ResponseFlags::UO;
        r.source_identity = Some("spiffe://cluster.local/ns/default/sa/productpage".into());
        r.request_id = "abc".into();
        r.duration = Duration::from_millis(3);
        r.start_time = std::time::UNIX_EPOCH;
        r
    }

    // OBS-2: the request line names method, path, status, flags, upstream and duration.
    #[test]
    fn access_line_has_the_request_fields() {
        let line = text_line(&record());
        assert!(line.starts_with("[1970-01-01T00:00:00.000Z] waypoint http src.addr=10.1.0.10:40000"), "{line}");
        for field in ["method=GET", "path=\"/reviews/0\"", "status=503", "flags=UO", "upstream=-", "duration_ms=3"] {
            assert!(line.contains(field), "{field} in {line}");
        }
        let json: serde_json::Value = serde_json::from_str(&json_line(&record())).expect("json");
        assert_eq!(json["response_flags"], "UO");
        assert_eq!(json["response_code"], 503);
    }

    // OBS-1: Istio's request families and labels.
    #[test]
    fn request_metrics_carry_code_and_flags() {
        let mut registry = crate::telemetry::MetricsRegistry::new();
        let metrics = registry.register_requests();
        metrics.observe(&record());
        let text = registry.encode(Exposition::Prometheus);
        let sample = text.lines().find(|l| l.starts_with("istio_requests_total{")).unwrap_or_default();
        for label in
            ["reporter=\"waypoint\"", "response_code=\"503\"", "response_flags=\"UO\"", "request_protocol=\"http\""]
        {
            assert!(sample.contains(label), "{label} in {sample}");
        }
        assert!(text.contains("istio_request_duration_milliseconds_bucket{"), "{text}");
        assert!(text.contains("istio_response_bytes_count{"), "{text}");
        assert!(sample.contains("connection_security_policy=\"mutual_tls\""), "{sample}");
    }

    // OBS-1: a gateway reports as the source, which Istio's label says cannot know the policy.
    #[test]
    fn source_reported_requests_have_an_unknown_security_policy() {
        let mut registry = crate::telemetry::MetricsRegistry::new();
        let metrics = registry.register_requests();
        metrics.observe(&RequestRecord { reporter: Reporter::Source, ..record() });
        let text = registry.encode(Exposition::Prometheus);
        let sample = text.lines().find(|l| l.starts_with("istio_requests_total{")).unwrap_or_default();
        assert!(sample.contains("reporter=\"source\""), "{sample}");
        assert!(sample.contains("connection_security_policy=\"unknown\""), "{sample}");
    }
}
