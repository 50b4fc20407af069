//! What the proxy tells its operator: access logs (OBS-2), Istio's metrics (OBS-1) and the
//! run-time log filter, fed by one `ConnectionRecord` per connection.

mod access_log;
mod envoy_format;
pub mod http;
mod labels;
pub mod logging;
pub mod map;
mod metrics;
mod requests;
pub mod trace;

use std::sync::Arc;

pub use access_log::{AccessLog, AccessLogFormat, ConnectionRecord, Outcome};
pub use labels::{DEFAULT_CLUSTER, Reporter, TrafficLabels, canonical_revision, canonical_service, workload_name};
pub use map::TrafficMap;
pub use metrics::{Exposition, MetricsRegistry, ScrapedCounters, ScrapedGauge, ScrapedGauges, TrafficMetrics};
pub use requests::{RequestMetrics, RequestRecord, RequestTelemetry};
pub use trace::{TraceContext, Traced, Tracer, TracingOptions};

/// Where connection handlers report: `opened` once a connection's ends are known, `closed`
/// when it is over. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Telemetry {
    access_log: Arc<AccessLog>,
    metrics: Arc<TrafficMetrics>,
    map: Arc<TrafficMap>,
    /// Set when spans are exported (`--otlp-endpoint`).
    tracer: Option<Arc<Tracer>>,
}

impl Telemetry {
    pub fn new(access_log: AccessLog, metrics: Arc<TrafficMetrics>, map: Arc<TrafficMap>) -> Self {
        Self { access_log: Arc::new(access_log), metrics, map, tracer: None }
    }

    /// Exports a span per traced connection to `tracer`.
    pub fn with_tracer(mut self, tracer: Option<Arc<Tracer>>) -> Self {
        self.tracer = tracer;
        self
    }

    /// The tracer, when the proxy exports spans.
    pub fn tracer(&self) -> Option<&Arc<Tracer>> {
        self.tracer.as_ref()
    }

    /// The span of a connection, child of what `parent` reads (the incoming `traceparent`), or
    /// `None` when the proxy does not trace: then `parent` is not even called.
    pub fn trace(&self, parent: impl FnOnce() -> Option<TraceContext>) -> Option<Box<Traced>> {
        let tracer = self.tracer.as_ref()?;
        let parent = parent();
        Some(Box::new(Traced { context: tracer.child(parent.as_ref()), parent, link: None }))
    }

    /// The access log, shared with request telemetry.
    pub fn access_log(&self) -> Arc<AccessLog> {
        self.access_log.clone()
    }

    /// The mesh map's edge table, shared with request telemetry.
    pub fn map(&self) -> Arc<TrafficMap> {
        self.map.clone()
    }

    /// Counts the connection as opened (`istio_tcp_connections_opened_total`). Call once, when
    /// the connection is accepted and its source and destination are known: the label set is
    /// resolved here, once, and kept in the record for `closed`.
    pub fn opened(&self, record: &mut ConnectionRecord) {
        record.counters = Some(self.metrics.open(&TrafficLabels::of(record)));
        self.map.opened(
            TrafficLabels::reporter_of(record).as_str(),
            map::End::workload(record.source_workload.as_deref()),
            map::End::destination(record.destination_workload.as_deref(), record.destination_service.as_deref()),
            record.security,
        );
    }

    /// Writes the queued access lines now (the proxy is stopping).
    pub fn flush(&self) {
        self.access_log.flush();
    }

    /// Writes the access line and counts the connection as closed, with its bytes. Call once,
    /// when the connection is over. A connection refused before `opened` is counted as opened
    /// here too, so that opened ≥ closed always holds.
    pub fn closed(&self, record: &ConnectionRecord) {
        self.access_log.record(record);
        let opened;
        let counters = match &record.counters {
            Some(c) => c,
            None => {
                opened = self.metrics.open(&TrafficLabels::of(record));
                &opened
            }
        };
        // Istio counts request bytes as "received" and response bytes as "sent", whoever reports.
        self.metrics.close(
            counters,
            record.outcome.response_flags(),
            || TrafficLabels::of(record),
            record.bytes_sent,
            record.bytes_received,
        );
        self.map.observe(map_observation(record));
        if let (Some(tracer), Some(traced)) = (&self.tracer, &record.trace) {
            tracer.export(connection_span(record, traced));
        }
    }
}

/// A connection's span (OBS-7): the client side of the tunnel at the source's proxy, the server
/// side at the destination's.
fn connection_span(record: &ConnectionRecord, traced: &Traced) -> trace::Span {
    let kind = if record.direction == "inbound" { trace::SpanKind::Server } else { trace::SpanKind::Client };
    let name = format!("{} tcp", record.direction);
    let mut span = trace::Span::new(traced.context, traced.parent, name, kind, record.started, record.duration);
    span.link = traced.link;
    span.ends(
        record.source_workload.as_deref(),
        record.source_identity.as_deref(),
        record.destination_workload.as_deref(),
        record.destination_service.as_deref(),
    );
    span.attr("destination.address", record.destination_addr.to_string());
    span.attr("connection.security_policy", record.security);
    let (result, reason) = record.outcome.fields();
    span.attr("strait.result", result);
    span.attr("response_flags", record.outcome.response_flags());
    if let Some(reason) = reason {
        span.attr("strait.reason", reason);
    }
    span.int("strait.bytes_sent", record.bytes_sent);
    span.int("strait.bytes_received", record.bytes_received);
    span.error = record.outcome != Outcome::Completed;
    span
}

/// What the mesh map keeps of a connection (OBS-6): a refusal by the mesh counts as denied.
fn map_observation(record: &ConnectionRecord) -> map::Observation<'_> {
    let reporter = TrafficLabels::reporter_of(record).as_str();
    let (result, reason) = record.outcome.fields();
    let mut event = map::MapEvent::new(reporter, record.started, record.duration);
    event.result = std::borrow::Cow::Borrowed(result);
    event.flags = std::borrow::Cow::Borrowed(record.outcome.response_flags());
    event.sent = record.bytes_sent;
    event.received = record.bytes_received;
    event.reason = reason.map(str::to_owned);
    map::Observation {
        reporter,
        protocol: "tcp",
        source: map::End::workload(record.source_workload.as_deref()),
        destination: map::End::destination(
            record.destination_workload.as_deref(),
            record.destination_service.as_deref(),
        ),
        security: record.security,
        verdict: match record.outcome {
            Outcome::Completed => map::Verdict::Ok,
            Outcome::Refused(_) => map::Verdict::Denied,
            Outcome::Broken(_) | Outcome::UpstreamConnectFailed(_) => map::Verdict::Error,
        },
        duration: record.duration,
        // Counted when it opened (`opened` resolved its metric handles then).
        counted: record.counters.is_some(),
        event,
    }
}

/// RFC 3339 UTC timestamp with milliseconds, for log lines.
pub fn rfc3339(time: std::time::SystemTime) -> String {
    let since_epoch = time.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A captured pod `namespace/name` (its service account named the same), for the tests of
/// telemetry's parts.
#[cfg(test)]
pub(crate) fn test_workload(namespace: &str, name: &str) -> crate::model::Workload {
    crate::model::Workload {
        name: name.into(),
        namespace: namespace.into(),
        service_account: name.into(),
        node: None,
        ip: std::net::IpAddr::from([10, 1, 0, 10]),
        labels: Default::default(),
        host_network: false,
        captured: true,
        waypoint: None,
        waypoint_role: None,
        protocol: crate::model::WorkloadProtocol::Hbone,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(super::rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_321_845_123);
        assert_eq!(super::rfc3339(t), "2026-11-22T04:30:45.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(super::rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    // A connection refused before `opened` still counts as opened, and never twice.
    #[test]
    fn opened_and_closed_balance() {
        let path = std::env::temp_dir().join(format!("strait-telemetry-{}.log", std::process::id()));
        let registry = MetricsRegistry::new();
        let telemetry = Telemetry::new(
            AccessLog::new(AccessLogFormat::Text, Some(&path)).expect("log"),
            registry.traffic(),
            Arc::new(TrafficMap::new("node test")),
        );
        let start =
            || ConnectionRecord::start("outbound", "10.1.0.1:1".parse().expect("a"), "10.2.0.1:2".parse().expect("a"));
        let mut served = start();
        telemetry.opened(&mut served);
        served.bytes_sent = 5;
        telemetry.closed(&served);
        let mut refused = start();
        refused.outcome = Outcome::Refused("reserved port".into());
        telemetry.closed(&refused);
        let text = registry.encode(Exposition::OpenMetrics);
        let _ = std::fs::remove_file(&path);
        let total = |family: &str| -> u64 {
            text.lines()
                .filter(|l| l.starts_with(&format!("{family}_total{{")))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum()
        };
        assert_eq!(total("istio_tcp_connections_opened"), 2, "{text}");
        assert_eq!(total("istio_tcp_connections_closed"), 2, "{text}");
        assert_eq!(total("istio_tcp_received_bytes"), 5, "{text}");
    }
}
