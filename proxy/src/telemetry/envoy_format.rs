//! Access lines in Envoy's default text format and in Istio's default text format (OBS-2), so
//! log pipelines written for Envoy or Istio sidecars and waypoints parse strait's lines as they
//! are.
//!
//! Envoy's default format string is
//! `[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
//! %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%
//! "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%"
//! "%UPSTREAM_HOST%"`. Istio's mesh default inserts `%RESPONSE_CODE_DETAILS%
//! %CONNECTION_TERMINATION_DETAILS% "%UPSTREAM_TRANSPORT_FAILURE_REASON%"` after the flags and
//! appends `%UPSTREAM_CLUSTER% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS%
//! %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%`.
//!
//! As in Envoy, an unknown or empty value is `-`, and a TCP connection has `- - -` for the
//! request line and response code 0. Unquoted values never hold a space (Envoy's details are
//! single tokens); quoted ones never hold a double quote.

use std::{fmt::Write as _, net::SocketAddr};

use super::{ConnectionRecord, Outcome, RequestRecord, rfc3339};

/// Which of the two text formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvoyFormat {
    /// Envoy's default format string.
    Envoy,
    /// Istio's default `accessLogFormat` (Envoy's, with details, cluster and addresses).
    Istio,
}

/// The fields both formats are made of, as one request or connection fills them.
struct Fields<'a> {
    start: String,
    method: &'a str,
    /// Path and query; a `"` (never valid unencoded in a request target) is written `%22`.
    path: String,
    protocol: &'a str,
    response_code: u16,
    response_flags: &'a str,
    response_code_details: String,
    connection_termination_details: String,
    upstream_transport_failure_reason: String,
    bytes_received: u64,
    bytes_sent: u64,
    duration_ms: u128,
    upstream_service_time: Option<u128>,
    forwarded_for: Option<&'a str>,
    user_agent: Option<&'a str>,
    request_id: Option<&'a str>,
    authority: Option<&'a str>,
    upstream_host: Option<SocketAddr>,
    upstream_cluster: Option<&'a str>,
    downstream_local: Option<SocketAddr>,
    downstream_remote: SocketAddr,
    requested_server_name: Option<&'a str>,
    route_name: Option<&'a str>,
}

/// One request of a waypoint or gateway.
pub(super) fn request_line(r: &RequestRecord, format: EnvoyFormat) -> String {
    let flags = r.flags.label();
    // Envoy says where a response came from: the upstream's own, or why the proxy answered.
    let details = if r.upstream_time.is_some() && r.reason.is_none() {
        "via_upstream".to_owned()
    } else {
        r.reason.as_deref().map_or_else(|| "-".to_owned(), token)
    };
    let fields = Fields {
        start: rfc3339(r.start_time),
        method: &r.method,
        path: r.path.replace('"', "%22"),
        protocol: r.protocol,
        response_code: r.status,
        response_flags: &flags,
        response_code_details: details,
        connection_termination_details: "-".to_owned(),
        upstream_transport_failure_reason: "-".to_owned(),
        bytes_received: r.request_bytes,
        bytes_sent: r.response_bytes,
        duration_ms: r.duration.as_millis(),
        upstream_service_time: r.upstream_time.map(|t| t.as_millis()),
        forwarded_for: r.forwarded_for.as_deref(),
        user_agent: r.user_agent.as_deref(),
        request_id: Some(r.request_id.as_str()),
        authority: Some(r.authority.as_str()),
        upstream_host: r.upstream_addr,
        upstream_cluster: r.upstream_cluster.as_deref(),
        downstream_local: None,
        downstream_remote: r.source_addr,
        requested_server_name: None,
        route_name: r.route.as_deref(),
    };
    fields.line(format)
}

/// One proxied TCP connection of a node proxy (or a waypoint's TCP route).
pub(super) fn connection_line(r: &ConnectionRecord, format: EnvoyFormat) -> String {
    // Envoy's flag for an upstream that could not be reached is UF; Envoy has none for an L4
    // policy refusal, which keeps the value strait's metrics give it (ztunnel's `DENY`).
    let (flags, termination, transport) = match &r.outcome {
        Outcome::Completed => ("-", "-".to_owned(), "-".to_owned()),
        Outcome::Broken(reason) => ("-", token(reason), "-".to_owned()),
        Outcome::UpstreamConnectFailed(reason) => ("UF", "-".to_owned(), reason.replace('"', "'")),
        Outcome::Refused(reason) => (r.outcome.response_flags(), token(reason), "-".to_owned()),
    };
    let refused = matches!(r.outcome, Outcome::Refused(_));
    let fields = Fields {
        start: rfc3339(r.started),
        method: "-",
        path: "-".to_owned(),
        protocol: "-",
        response_code: 0,
        response_flags: flags,
        response_code_details: "-".to_owned(),
        connection_termination_details: termination,
        upstream_transport_failure_reason: transport,
        // Envoy counts from the downstream's side: received from the client, sent to it.
        bytes_received: r.bytes_sent,
        bytes_sent: r.bytes_received,
        duration_ms: r.duration.as_millis(),
        upstream_service_time: None,
        forwarded_for: None,
        user_agent: None,
        request_id: None,
        authority: None,
        upstream_host: (!refused).then_some(r.destination_addr),
        upstream_cluster: None,
        // A captured connection's local address is the one the client dialled.
        downstream_local: Some(r.destination_addr),
        downstream_remote: r.source_addr,
        requested_server_name: r.server_name.as_deref(),
        route_name: None,
    };
    fields.line(format)
}

impl Fields<'_> {
    fn line(&self, format: EnvoyFormat) -> String {
        let mut line = String::with_capacity(320);
        let _ = write!(
            line,
            "[{}] \"{} {} {}\" {} {}",
            self.start,
            dash(Some(self.method)),
            dash(Some(self.path.as_str())),
            dash(Some(self.protocol)),
            self.response_code,
            dash(Some(self.response_flags)),
        );
        if format == EnvoyFormat::Istio {
            let _ = write!(
                line,
                " {} {} \"{}\"",
                self.response_code_details, self.connection_termination_details, self.upstream_transport_failure_reason
            );
        }
        let _ = write!(
            line,
            " {} {} {} {} \"{}\" \"{}\" \"{}\" \"{}\" \"{}\"",
            self.bytes_received,
            self.bytes_sent,
            self.duration_ms,
            self.upstream_service_time.map_or_else(|| "-".to_owned(), |t| t.to_string()),
            quoted(self.forwarded_for),
            quoted(self.user_agent),
            quoted(self.request_id),
            quoted(self.authority),
            addr(self.upstream_host),
        );
        if format == EnvoyFormat::Istio {
            let _ = write!(
                line,
                " {} - {} {} {} {}",
                dash(self.upstream_cluster),
                addr(self.downstream_local),
                self.downstream_remote,
                dash(self.requested_server_name),
                dash(self.route_name),
            );
        }
        line.push('\n');
        line
    }
}

/// An unquoted value: `-` when unknown or empty.
fn dash(value: Option<&str>) -> &str {
    value.filter(|v| !v.is_empty()).unwrap_or("-")
}

/// A value between double quotes: `-` when unknown or empty, its own quotes made single.
fn quoted(value: Option<&str>) -> String {
    match value.filter(|v| !v.is_empty()) {
        Some(v) if v.contains('"') => v.replace('"', "'"),
        Some(v) => v.to_owned(),
        None => "-".to_owned(),
    }
}

fn addr(value: Option<SocketAddr>) -> String {
    value.map_or_else(|| "-".to_owned(), |a| a.to_string())
}

/// A reason as an Envoy details token: words joined by `_`, as Envoy writes
/// `upstream_reset_before_response_started{connection_failure}`.
fn token(reason: &str) -> String {
    let joined: String = reason.chars().map(|c| if c.is_whitespace() || c == '"' { '_' } else { c }).collect();
    if joined.is_empty() { "-".to_owned() } else { joined }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::{l7::flags::ResponseFlags, telemetry::Reporter};

    fn request() -> RequestRecord {
        let mut r = RequestRecord::new(Reporter::Waypoint, "10.1.0.10:40000".parse().expect("addr"));
        r.start_time = UNIX_EPOCH + Duration::from_millis(1_795_321_845_123);
        r.method = "GET".into();
        r.path = "/reviews/0?x=\"1\"".into();
        r.authority = "reviews:9080".into();
        r.user_agent = Some("curl/7.88.1".into());
        r.request_id = "7f3c".into();
        r.status = 200;
        r.request_bytes = 0;
        r.response_bytes = 358;
        r.duration = Duration::from_millis(12);
        r.upstream_time = Some(Duration::from_millis(9));
        r.upstream_addr = Some("10.2.0.11:9080".parse().expect("addr"));
        r.upstream_cluster = Some("outbound|9080|v1|reviews.shop.svc.cluster.local".into());
        r.route = Some("shop/reviews".into());
        r
    }

    // OBS-2: a request in Envoy's default format, field by field.
    #[test]
    fn request_in_envoys_default_format() {
        assert_eq!(
            request_line(&request(), EnvoyFormat::Envoy),
            "[2026-11-22T04:30:45.123Z] \"GET /reviews/0?x=%221%22 HTTP/1.1\" 200 - 0 358 12 9 \"-\" \"curl/7.88.1\" \
             \"7f3c\" \"reviews:9080\" \"10.2.0.11:9080\"\n"
        );
    }

    // OBS-2: Istio's default adds details, the cluster and both downstream addresses.
    #[test]
    fn request_in_istios_default_format() {
        let mut r = request();
        r.forwarded_for = Some("192.0.2.1".into());
        assert_eq!(
            request_line(&r, EnvoyFormat::Istio),
            "[2026-11-22T04:30:45.123Z] \"GET /reviews/0?x=%221%22 HTTP/1.1\" 200 - via_upstream - \"-\" 0 358 12 9 \
             \"192.0.2.1\" \"curl/7.88.1\" \"7f3c\" \"reviews:9080\" \"10.2.0.11:9080\" \
             outbound|9080|v1|reviews.shop.svc.cluster.local - - 10.1.0.10:40000 - shop/reviews\n"
        );
        let mut aborted = request();
        (aborted.status, aborted.flags, aborted.upstream_time, aborted.upstream_addr) =
            (503, ResponseFlags::FI, None, None);
        aborted.reason = Some("fault filter abort".into());
        let line = request_line(&aborted, EnvoyFormat::Istio);
        assert!(line.contains("\" 503 FI fault_filter_abort - \"-\" 0 358 12 - "), "{line}");
        assert!(line.contains("\"reviews:9080\" \"-\" outbound|"), "{line}");
    }

    fn connection(outcome: Outcome) -> ConnectionRecord {
        let mut r = ConnectionRecord::start(
            "inbound",
            "10.1.0.10:40000".parse().expect("addr"),
            "10.2.0.10:8080".parse().expect("addr"),
        );
        r.started = UNIX_EPOCH;
        (r.bytes_sent, r.bytes_received, r.duration) = (78, 300, Duration::from_millis(5));
        r.outcome = outcome;
        r
    }

    // OBS-2: a TCP connection has no request line; bytes are counted from the client's side.
    #[test]
    fn connection_in_both_formats() {
        let ok = connection(Outcome::Completed);
        assert_eq!(
            connection_line(&ok, EnvoyFormat::Envoy),
            "[1970-01-01T00:00:00.000Z] \"- - -\" 0 - 78 300 5 - \"-\" \"-\" \"-\" \"-\" \"10.2.0.10:8080\"\n"
        );
        assert_eq!(
            connection_line(&ok, EnvoyFormat::Istio),
            "[1970-01-01T00:00:00.000Z] \"- - -\" 0 - - - \"-\" 78 300 5 - \"-\" \"-\" \"-\" \"-\" \"10.2.0.10:8080\" \
             - - 10.2.0.10:8080 10.1.0.10:40000 - -\n"
        );
        let failed = connection(Outcome::UpstreamConnectFailed("connection \"refused\"".into()));
        assert!(connection_line(&failed, EnvoyFormat::Envoy).contains("\" 0 UF 78 300 5 -"));
        assert!(connection_line(&failed, EnvoyFormat::Istio).contains(" 0 UF - - \"connection 'refused'\" 78 "));
        let denied = connection(Outcome::Refused("denied by shop/deny-all".into()));
        let line = connection_line(&denied, EnvoyFormat::Istio);
        assert!(line.contains("\" 0 DENY - denied_by_shop/deny-all \"-\" "), "{line}");
        assert!(line.contains("\"-\" - - 10.2.0.10:8080"), "no upstream host: {line}");
    }
}
