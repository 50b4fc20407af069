//! Headers the proxy adds, removes and edits (L7-3, L7-9): request ids, trace context, the
//! `x-forwarded-*` pair, hop-by-hop headers, and the `headers` edits of routes.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::model::routes::HeaderEdits;

pub const X_REQUEST_ID: &str = "x-request-id";
pub const X_FORWARDED_FOR: &str = "x-forwarded-for";
pub const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
pub const X_ENVOY_UPSTREAM_SERVICE_TIME: &str = "x-envoy-upstream-service-time";
pub const X_ENVOY_UPSTREAM_RQ_TIMEOUT_MS: &str = "x-envoy-upstream-rq-timeout-ms";
pub const TRACEPARENT: &str = "traceparent";
pub const B3_TRACE_ID: &str = "x-b3-traceid";
pub const B3_SPAN_ID: &str = "x-b3-spanid";
pub const B3_PARENT_SPAN_ID: &str = "x-b3-parentspanid";
pub const B3_SAMPLED: &str = "x-b3-sampled";
pub const B3_SINGLE: &str = "b3";

/// Hop-by-hop headers (RFC 9110 7.6.1): they describe one connection and are never forwarded.
/// `upgrade` and `connection` are put back by the engine for a WebSocket upgrade it forwards.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, and those the `Connection` header lists.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
    // `te` may only say `trailers` beyond one hop (gRPC needs exactly that).
    let trailers_only = headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !trailers_only {
        headers.remove(header::TE);
    }
}

/// Whether a request asks to upgrade to WebSocket (HTTP/1.1 `Connection: upgrade` +
/// `Upgrade: websocket`).
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")));
    connection_upgrade && headers.get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// A random UUID (version 4), the form Envoy gives `x-request-id`.
pub fn new_request_id() -> String {
    let mut bytes = fastrand::u128(..).to_be_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex(&bytes);
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Keeps the client's `x-request-id`, or adds one; returns it.
pub fn ensure_request_id(headers: &mut HeaderMap) -> String {
    if let Some(id) = headers.get(X_REQUEST_ID).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty()) {
        return id.to_owned();
    }
    let id = new_request_id();
    if let Ok(value) = HeaderValue::from_str(&id) {
        headers.insert(X_REQUEST_ID, value);
    }
    id
}

/// Trace context (L7-9, OBS-4): headers the client sent (W3C `traceparent`, B3 multi or
/// single) pass through untouched; a request with none gets a new trace in both forms, so
/// applications that only propagate one of them still join it.
pub fn ensure_trace_context(headers: &mut HeaderMap) {
    if headers.contains_key(TRACEPARENT) || headers.contains_key(B3_TRACE_ID) || headers.contains_key(B3_SINGLE) {
        return;
    }
    let trace = hex(&fastrand::u128(..).to_be_bytes());
    let span = hex(&fastrand::u64(..).to_be_bytes());
    let values = [
        (TRACEPARENT, format!("00-{trace}-{span}-01")),
        (B3_TRACE_ID, trace),
        (B3_SPAN_ID, span),
        (B3_SAMPLED, "1".to_owned()),
    ];
    for (name, value) in values {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
}

/// Names `context` as the next hop's parent (OBS-7): `traceparent` is replaced (same trace,
/// this proxy's span), and a request without B3 headers gets them for the same trace, as
/// `ensure_trace_context` gives them.
pub fn set_trace_context(headers: &mut HeaderMap, context: &crate::telemetry::TraceContext) {
    if let Ok(value) = HeaderValue::from_str(&context.header()) {
        headers.insert(TRACEPARENT, value);
    }
    if headers.contains_key(B3_TRACE_ID) || headers.contains_key(B3_SINGLE) {
        return;
    }
    let values = [
        (B3_TRACE_ID, context.trace_hex()),
        (B3_SPAN_ID, context.span_hex()),
        (B3_SAMPLED, if context.sampled { "1" } else { "0" }.to_owned()),
    ];
    for (name, value) in values {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
}

/// Appends the client's address to `x-forwarded-for` and sets `x-forwarded-proto` when absent.
pub fn add_forwarded(headers: &mut HeaderMap, client: IpAddr, scheme: &str) {
    let xff = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.is_empty() => format!("{existing}, {client}"),
        _ => client.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    if !headers.contains_key(X_FORWARDED_PROTO)
        && let Ok(value) = HeaderValue::from_str(scheme)
    {
        headers.insert(X_FORWARDED_PROTO, value);
    }
}

/// Applies a route's `headers.request` or `headers.response` edits: set, then add, then
/// remove. Values that are not valid header values were rejected when compiling; any that
/// slip through are skipped.
pub fn apply(headers: &mut HeaderMap, edits: &HeaderEdits) {
    for (name, value) in &edits.set {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            headers.insert(name, value);
        }
    }
    for (name, value) in &edits.add {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            headers.append(name, value);
        }
    }
    for name in &edits.remove {
        headers.remove(name.as_str());
    }
}

/// The `grpc-status` a header block carries (response headers of a trailers-only answer, or
/// trailers).
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

/// The request's timeout override in `x-envoy-upstream-rq-timeout-ms` (L7-5); 0 disables.
pub fn timeout_override(headers: &HeaderMap) -> Option<std::time::Duration> {
    let ms: u64 = headers.get(X_ENVOY_UPSTREAM_RQ_TIMEOUT_MS)?.to_str().ok()?.trim().parse().ok()?;
    Some(std::time::Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_uuid_v4_and_kept() {
        let id = new_request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        let mut headers = HeaderMap::new();
        let made = ensure_request_id(&mut headers);
        assert_eq!(headers.get(X_REQUEST_ID).and_then(|v| v.to_str().ok()), Some(made.as_str()));
        assert_eq!(ensure_request_id(&mut headers), made, "kept when present");
    }

    #[test]
    fn trace_context_is_propagated_or_started() {
        let mut headers = HeaderMap::new();
        ensure_trace_context(&mut headers);
        let tp = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        let trace = headers.get(B3_TRACE_ID).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        assert_eq!(tp.len(), 55, "{tp}");
        assert_eq!(&tp[3..35], trace, "both forms carry the same trace");
        let mut b3_only = HeaderMap::new();
        b3_only.insert(B3_TRACE_ID, HeaderValue::from_static("463ac35c9f6413ad"));
        ensure_trace_context(&mut b3_only);
        assert!(!b3_only.contains_key(TRACEPARENT), "an existing trace is not replaced");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut headers);
        let mut names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-kept"]);
    }

    #[test]
    fn edits_set_add_remove() {
        let mut headers = HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("old"));
        headers.insert("x-gone", HeaderValue::from_static("1"));
        let edits = HeaderEdits {
            set: vec![("x-a".into(), "new".into())],
            add: vec![("x-a".into(), "more".into()), ("x-b".into(), "b".into())],
            remove: vec!["x-gone".into()],
        };
        apply(&mut headers, &edits);
        let a: Vec<&str> = headers.get_all("x-a").iter().filter_map(|v| v.to_str().ok()).collect();
        assert_eq!(a, ["new", "more"]);
        assert!(headers.get("x-gone").is_none() && headers.get("x-b").is_some());
    }

    #[test]
    fn forwarded_headers_append() {
        let mut headers = HeaderMap::new();
        add_forwarded(&mut headers, "10.1.0.10".parse().expect("ip"), "http");
        add_forwarded(&mut headers, "10.1.0.11".parse().expect("ip"), "https");
        assert_eq!(headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()), Some("10.1.0.10, 10.1.0.11"));
        assert_eq!(headers.get(X_FORWARDED_PROTO).and_then(|v| v.to_str().ok()), Some("http"));
    }
}
