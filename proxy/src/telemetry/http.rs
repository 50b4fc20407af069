//! A minimal HTTP/1.1 client for telemetry that leaves the proxy: the control plane reading the
//! proxies' mesh maps (OBS-6) and spans sent to an OTLP collector (OBS-7). One connection per
//! exchange, plain HTTP (both stay inside the cluster's network), bounded in time and size.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

/// Largest answer read.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// A `http://host:port/path` URI checked for what `exchange` can reach.
pub fn parse_http_uri(text: &str) -> Result<Uri, String> {
    let uri: Uri = text.parse().map_err(|e| format!("`{text}` is not a URI: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("`{text}`: only http:// is supported"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{text}` names no host"));
    }
    Ok(uri)
}

/// Sends one request to `uri` and reads the answer, within `timeout`.
pub async fn exchange(
    method: Method,
    uri: &Uri,
    content_type: Option<&'static str>,
    body: Bytes,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), String> {
    tokio::time::timeout(timeout, send(method, uri, content_type, body))
        .await
        .map_err(|_| format!("{uri}: no answer within {timeout:?}"))?
}

async fn send(
    method: Method,
    uri: &Uri,
    content_type: Option<&'static str>,
    body: Bytes,
) -> Result<(StatusCode, Bytes), String> {
    let fail = |what: String| format!("{uri}: {what}");
    let (Some(host), Some(authority)) = (uri.host(), uri.authority()) else {
        return Err(fail("no host".to_owned()));
    };
    // `Uri::host` keeps the brackets of an IPv6 literal, which name resolution does not accept.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let stream = TcpStream::connect((host, uri.port_u16().unwrap_or(80)))
        .await
        .map_err(|e| fail(format!("cannot connect: {e}")))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail(format!("HTTP handshake failed: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!("telemetry connection ended: {e}");
        }
    });
    let mut request = Request::builder()
        .method(method)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(header::HOST, authority.as_str());
    if let Some(content_type) = content_type {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    let request = request.body(Full::new(body)).map_err(|e| fail(format!("bad request: {e}")))?;
    let response = sender.send_request(request).await.map_err(|e| fail(format!("request failed: {e}")))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| fail(format!("reading the answer failed: {e}")))?
        .to_bytes();
    Ok((status, body))
}
