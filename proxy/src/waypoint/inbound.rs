//! The waypoint's HBONE side: TLS as the waypoint's identity, one task per CONNECT stream,
//! and for each stream the decision what it carries (HTTP/1.1, HTTP/2, or TCP) and for whom.
//!
//! A stream must target a service or pod that uses this waypoint (400 otherwise); the client's
//! address is one the peer's identity owns (its TCP source, or else `forwarded`), as at the node.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use http::{Method, Response, StatusCode};
use tokio::net::TcpStream;
use tracing::debug;

use super::{
    ActiveStream, WaypointContext,
    sniff::{Sniffed, sniff},
    tcp,
};
use crate::{
    admission::Pass,
    authz::{self, Connection},
    hbone::{
        self, FORWARDED, H2Stream,
        server::{InboundStream, refuse},
    },
    identity::{CertStore, Identity},
    l7::{Downstream, HttpVersion, Target, serve_http},
    model::{AppProtocol, Model},
    telemetry::{ConnectionRecord, Outcome},
};

/// A client of an undeclared port that sends nothing this long is handled as TCP (a
/// server-first protocol waits for the server to speak).
const DETECTION_TIMEOUT: Duration = Duration::from_millis(200);

/// Serves one HBONE connection from a node proxy (or another waypoint or gateway); each
/// CONNECT stream goes to `handle` (`handle_stream` at a waypoint).
pub async fn serve_connection<F, Fut>(
    ctx: Arc<WaypointContext>,
    certs: Arc<CertStore>,
    identity: Identity,
    tcp: TcpStream,
    peer: SocketAddr,
    admission: Option<Pass>,
    handle: F,
) where
    F: Fn(Arc<WaypointContext>, InboundStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let _ = tcp.set_nodelay(true);
    let settings = match certs.get(&identity).await {
        Ok(s) => s,
        Err(e) => {
            refused(&ctx, peer, &format!("no certificate to serve {identity}: {e}"));
            return;
        }
    };
    let stream_ctx = ctx.clone();
    let drain = crate::l7::drained(ctx.l7.drain.clone());
    let result = hbone::server::serve_connection_until(
        tcp,
        peer,
        settings.server.clone(),
        admission,
        move |stream| handle(stream_ctx.clone(), stream),
        drain,
    )
    .await;
    match result {
        // Counted in strait_hbone_handshake_failures_total, not written line by line (OPS-4).
        Err(e) if e.before_identity() => debug!(%peer, "HBONE handshake failed: {e}"),
        Err(e) => refused(&ctx, peer, &e.to_string()),
        Ok(()) => {}
    }
}

fn refused(ctx: &WaypointContext, peer: SocketAddr, reason: &str) {
    let mut record = ConnectionRecord::start("waypoint", peer, peer);
    record.security = "mutual_tls";
    record.outcome = Outcome::Refused(reason.to_owned());
    ctx.telemetry.closed(&record);
}

pub(crate) async fn handle_stream(ctx: Arc<WaypointContext>, stream: InboundStream) {
    let _active = ActiveStream::new(&ctx.active_streams);
    let InboundStream { request, mut respond, peer_identity, peer_addr } = stream;
    let model = ctx.model.current();
    let authority = request.uri().authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
    let checked = if request.method() != Method::CONNECT {
        Err(format!("method {} is not CONNECT", request.method()))
    } else {
        match authority.parse::<SocketAddr>() {
            Ok(addr) => target(&ctx, &model, addr),
            Err(_) => Err(format!("CONNECT target `{authority}` is not ip:port")),
        }
    };
    let (target, protocol) = match checked {
        Ok(found) => found,
        Err(reason) => {
            refuse(respond, StatusCode::BAD_REQUEST);
            let mut record = ConnectionRecord::start("waypoint", peer_addr, peer_addr);
            record.security = "mutual_tls";
            record.source_identity = Some(peer_identity.to_string());
            record.outcome = Outcome::Refused(format!("400 {reason}"));
            ctx.telemetry.closed(&record);
            return;
        }
    };
    let claimed = request.headers().get(FORWARDED).and_then(|v| v.to_str().ok()).and_then(hbone::parse_forwarded_for);
    // The client the peer's identity proves (L4-6: `hbone::client_address`); else the peer is
    // the client.
    let owned = |ip| hbone::owns_ip(&model, &ctx.trust_domain, ip, &peer_identity);
    let client_addr = hbone::client_address(claimed, peer_addr, owned).unwrap_or(peer_addr);
    let down = Downstream {
        client_addr,
        source_workload: model.workload_by_ip(client_addr.ip()).cloned(),
        identity: Some(peer_identity),
        target,
        protocol,
        tunnel_trace: ctx.l7.telemetry.tracer().and_then(|_| {
            request.headers().get(hbone::TRACEPARENT).and_then(|v| crate::telemetry::TraceContext::parse(v.as_bytes()))
        }),
    };
    if protocol == AppProtocol::Tcp {
        tcp::serve(ctx, model, down, request, respond).await;
        return;
    }
    drop(model);
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => {
            debug!("HBONE stream reset before it was answered: {e}");
            return;
        }
    };
    let mut io = H2Stream::new(send, request.into_body());
    // On a port declared HTTP, a client that never speaks is an idle connection, one that
    // stops within its first bytes a request head that is too slow (OPS-4).
    let timeouts = if protocol == AppProtocol::Unknown {
        DetectTimeouts { silent: DETECTION_TIMEOUT, started: DETECTION_TIMEOUT }
    } else {
        DetectTimeouts { silent: ctx.l7.limits.idle_timeout, started: ctx.l7.limits.header_timeout }
    };
    match detect(&mut io, timeouts).await {
        Sniffed::Http1 => serve_http(ctx.l7.clone(), Arc::new(down), io, HttpVersion::Http1, true).await,
        Sniffed::Http2 => serve_http(ctx.l7.clone(), Arc::new(down), io, HttpVersion::Http2, true).await,
        Sniffed::Opaque | Sniffed::NeedMore if protocol == AppProtocol::Unknown => {
            tcp::serve_detected(ctx, down, io).await;
        }
        Sniffed::NeedMore => {
            debug!(client = %down.client_addr, "no request on a port declared HTTP; closing the stream");
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut io).await;
        }
        Sniffed::Opaque => {
            // A port declared HTTP whose client speaks something else: nothing can route it.
            debug!(client = %down.client_addr, "not HTTP on a port declared HTTP; closing the stream");
            io.reset();
        }
    }
}

/// What the CONNECT target is: a service VIP of this waypoint (with the port's protocol), an
/// address of a ServiceEntry that uses it (one of its `addresses`, or an address its host
/// resolved to: an egress waypoint, SPEC GW-3), or a pod that uses this waypoint.
fn target(ctx: &WaypointContext, model: &Model, addr: SocketAddr) -> Result<(Target, AppProtocol), String> {
    let resolved = || {
        let name = ctx.l7.upstreams.dns.name_of(addr.ip())?;
        model
            .services
            .iter()
            .filter(|s| s.port(addr.port()).is_some())
            .find(|s| s.entry.as_ref().is_some_and(|e| e.dns.iter().any(|d| d.name == name)))
    };
    if let Some(service) = model.service_by_address(addr.ip()).or_else(resolved) {
        if service.waypoint.as_ref() != Some(&ctx.name) {
            return Err(format!("service {} does not use waypoint {}", service.hostname, ctx.name));
        }
        let port = service
            .port(addr.port())
            .ok_or_else(|| format!("service {} has no port {}", service.hostname, addr.port()))?;
        return Ok((Target::Service { service: service.clone(), port: port.port }, port.protocol));
    }
    if let Some(workload) = model.workload_by_ip(addr.ip()) {
        if workload.waypoint.as_ref() != Some(&ctx.name) {
            return Err(format!("pod {} does not use waypoint {}", workload.display_name(), ctx.name));
        }
        return Ok((Target::Workload { workload: workload.clone(), port: addr.port() }, AppProtocol::Unknown));
    }
    Err(format!("{addr} is neither a service nor a pod of the mesh"))
}

/// How long protocol detection waits for a client: for its first byte, and for the rest of
/// what tells the protocol once a first byte came.
struct DetectTimeouts {
    silent: Duration,
    started: Duration,
}

/// Reads the client's first bytes to tell HTTP/1.1 from HTTP/2 (and from TCP: a client that
/// stops short of telling is `Opaque` if it sent anything, `NeedMore` if not), then puts them
/// back for the server that will read them.
async fn detect(io: &mut H2Stream, timeouts: DetectTimeouts) -> Sniffed {
    let mut deadline = Instant::now() + timeouts.silent;
    let mut seen = BytesMut::new();
    let verdict = loop {
        let next = match tokio::time::timeout_at(deadline.into(), io.next_data()).await {
            Ok(next) => next,
            Err(_) if seen.is_empty() => break Sniffed::NeedMore,
            Err(_) => break Sniffed::Opaque,
        };
        match next {
            Ok(Some(data)) => {
                if seen.is_empty() {
                    deadline = Instant::now() + timeouts.started;
                }
                seen.extend_from_slice(&data);
                match sniff(&seen) {
                    Sniffed::NeedMore => continue,
                    verdict => break verdict,
                }
            }
            // The client sent nothing and finished, or the stream broke: nothing to serve.
            Ok(None) | Err(_) => break Sniffed::NeedMore,
        }
    };
    io.unread(seen.freeze());
    verdict
}

/// L4 authorization of a TCP stream at the waypoint: the policies bound to the service or the
/// waypoint, without HTTP attributes (an ALLOW rule needing them never matches).
pub(super) fn authorize_tcp(ctx: &WaypointContext, model: &Model, down: &Downstream) -> authz::Decision {
    let target = down.target.addr();
    let connection = Connection {
        source: down.identity.clone(),
        source_ip: down.client_addr.ip(),
        destination_ip: target.ip(),
        destination_port: target.port(),
        http: None,
    };
    let service = down.target.service().map(Arc::as_ref);
    authz::evaluate(model.security.authorization_at_waypoint(service, &ctx.name), &connection)
}
