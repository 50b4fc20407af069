//! One request's decisions, in Envoy's filter order: request id and trace context, L7
//! authorization (403), route selection (404 `NR`), redirects and direct responses, fault
//! injection (`DI`, `FI`), then the chosen destination (`forward`) and the response edits.
//!
//! Every answer, the proxy's own or the upstream's, leaves through `Exchange::respond`, which
//! arranges for the access line and metrics to be written when the response body is over.

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant, SystemTime},
};

use http::{HeaderValue, Method, Response, StatusCode, Uri, Version, header, request::Parts};
use hyper::body::{Body as _, Incoming};

use super::{
    Downstream, L7Context, Target,
    body::ResponseBody,
    flags::ResponseFlags,
    forward::{self, Forwarded, Replay, StreamedBody, UpstreamRequest},
    headers,
    jwt::{self, JwtOutcome, ValidatedJwt},
    limits::BODY_BUFFER_PER_REQUEST,
    matching::{RequestView, select_route},
    request_body::{self, Buffering, ClientFault, RequestBody},
    rewrite::{redirect_to, rewrite_request},
};
use crate::{
    authz::{self, Connection, HttpRequest},
    model::{
        Model,
        gateways::HttpCandidate,
        routes::{AbortStatus, Destination, HttpRoute, Percentage, RouteAction},
    },
    telemetry::{RequestRecord, TraceContext, Traced},
};

/// What the proxy answers itself, and why.
pub(super) struct Local {
    pub status: StatusCode,
    pub body: String,
    pub flags: ResponseFlags,
    pub reason: Option<String>,
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
    /// A policy refused the request (the mesh map shows it as a denial, OBS-6).
    pub denied: bool,
}

impl Local {
    pub fn new(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            body: body.into(),
            flags: ResponseFlags::default(),
            reason: None,
            headers: Vec::new(),
            denied: false,
        }
    }

    /// Marks the answer as a policy's refusal.
    pub fn denying(mut self) -> Self {
        self.denied = true;
        self
    }

    pub fn flagged(mut self, flags: ResponseFlags) -> Self {
        self.flags.insert(flags);
        self
    }

    pub fn because(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

/// One request in flight: what the access line will say, built up as decisions are made.
pub(super) struct Exchange {
    pub ctx: Arc<L7Context>,
    pub down: Arc<Downstream>,
    pub model: Arc<Model>,
    pub record: RequestRecord,
    pub started: Instant,
    pub request_bytes: Arc<AtomicU64>,
    /// Set when the client's request body fails: the try it broke is the client's fault.
    pub fault: Arc<ClientFault>,
    /// The HTTP version the client speaks, which answers are given in.
    pub version: Version,
}

/// Handles one request from `down`.
pub async fn handle(
    ctx: Arc<L7Context>,
    down: Arc<Downstream>,
    request: http::Request<Incoming>,
) -> Response<ResponseBody> {
    let model = ctx.model.current();
    let mut record = RequestRecord::new(ctx.reporter, down.client_addr);
    record.source_workload = down.source_workload.clone();
    record.source_identity = down.identity.as_ref().map(ToString::to_string);
    record.destination_service = down.target.service().cloned();
    let (mut parts, body) = request.into_parts();
    let fault = Arc::new(ClientFault::default());
    let body = RequestBody::new(body, ctx.limits.body_idle_timeout, fault.clone());
    let mut x = Exchange {
        ctx,
        down,
        model,
        record,
        started: Instant::now(),
        request_bytes: Arc::default(),
        fault,
        version: parts.version,
    };
    x.describe(&parts);
    match route_and_forward(&mut x, &mut parts, body).await {
        Ok(forwarded) => x.respond_upstream(forwarded),
        Err(local) => x.respond_local(local),
    }
}

impl Exchange {
    fn describe(&mut self, parts: &Parts) {
        let r = &mut self.record;
        r.method = parts.method.to_string();
        r.path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        r.authority = authority(parts).to_owned();
        r.protocol = if parts.version == Version::HTTP_2 { "HTTP/2" } else { "HTTP/1.1" };
        let grpc =
            parts.headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        r.request_protocol = if grpc { "grpc" } else { "http" };
        r.user_agent = parts.headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).map(str::to_owned);
        r.forwarded_for = parts.headers.get(headers::X_FORWARDED_FOR).and_then(|v| v.to_str().ok()).map(str::to_owned);
    }

    /// Sends the proxy's own answer.
    fn respond_local(self, local: Local) -> Response<ResponseBody> {
        let mut response = Response::new(ResponseBody::full(local.body));
        *response.status_mut() = local.status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        for (name, value) in local.headers {
            headers.insert(name, value);
        }
        let mut x = self;
        x.record.flags.insert(local.flags);
        x.record.reason = local.reason;
        x.record.denied = local.denied;
        x.finish_on_end(response, None)
    }

    fn respond_upstream(mut self, forwarded: Forwarded) -> Response<ResponseBody> {
        let Forwarded { mut response, lease, endpoint_guard, flags } = forwarded;
        self.record.flags.insert(flags);
        if let Some(server) = &self.ctx.server_header
            && !response.headers().contains_key(header::SERVER)
        {
            response.headers_mut().insert(header::SERVER, server.clone());
        }
        // The answer goes out in the client's HTTP version, whatever the upstream spoke, and
        // without the upstream's connection-level headers (`connection: close` of an HTTP/1.0
        // server is about its own connection); a WebSocket upgrade keeps its two.
        let (mut parts, body) = response.into_parts();
        parts.version = self.version;
        if parts.status != StatusCode::SWITCHING_PROTOCOLS {
            headers::remove_hop_by_hop(&mut parts.headers);
        }
        let response = Response::from_parts(parts, ResponseBody::upstream(body));
        self.finish_on_end(response, Some((lease, endpoint_guard)))
    }

    /// Arranges for the record to be written when the response body ends, and for the
    /// upstream connection to go back to its pool if the response was read to its end.
    fn finish_on_end(
        self,
        mut response: Response<ResponseBody>,
        upstream: Option<(super::pool::Lease, forward::EndpointGuard)>,
    ) -> Response<ResponseBody> {
        let Exchange { ctx, mut record, started, request_bytes, .. } = self;
        record.status = response.status().as_u16();
        if record.grpc_status.is_none() {
            record.grpc_status = headers::grpc_status(response.headers());
        }
        response.body_mut().on_end(move |end| {
            record.response_bytes = end.bytes;
            record.request_bytes = record.request_bytes.max(request_bytes.load(std::sync::atomic::Ordering::Relaxed));
            if end.grpc_status.is_some() {
                record.grpc_status = end.grpc_status;
            }
            if !end.complete {
                record.flags.insert(ResponseFlags::DC);
            }
            record.duration = started.elapsed();
            if let Some((lease, guard)) = upstream {
                lease.release(end.complete);
                drop(guard);
            }
            ctx.telemetry.finish(record);
        });
        response
    }
}

/// Host / `:authority` of a request.
pub(super) fn authority(parts: &Parts) -> &str {
    parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or("")
}

async fn route_and_forward(x: &mut Exchange, parts: &mut Parts, body: RequestBody) -> Result<Forwarded, Local> {
    if parts.version == Version::HTTP_10 || parts.version == Version::HTTP_09 {
        return Err(Local::new(StatusCode::UPGRADE_REQUIRED, "HTTP/1.0 is not supported; use HTTP/1.1 or HTTP/2\n"));
    }
    x.record.request_id = headers::ensure_request_id(&mut parts.headers);
    if let Some(tracer) = x.ctx.telemetry.tracer() {
        // OBS-7: the request's own trace if it has one (then the tunnel's is a link), else the
        // trace of the tunnel it came through.
        let incoming = parts.headers.get(headers::TRACEPARENT).and_then(|v| TraceContext::parse(v.as_bytes()));
        let parent = incoming.or(x.down.tunnel_trace);
        let context = tracer.child(parent.as_ref());
        headers::set_trace_context(&mut parts.headers, &context);
        let link = incoming.and(x.down.tunnel_trace);
        x.record.trace = Some(Box::new(Traced { context, parent, link }));
    }
    headers::ensure_trace_context(&mut parts.headers);
    let jwt = authenticate(x, parts)?;
    authorize(x, parts, jwt.as_deref())?;

    if let Some(redirect) = https_redirect(x, parts) {
        return Err(redirect);
    }
    let candidates = match candidates(x, parts) {
        Some(found) => found,
        None => return forward_default(x, parts, body).await,
    };
    let view = RequestView {
        path: parts.uri.path(),
        query: parts.uri.query(),
        method: parts.method.as_str(),
        authority: authority(parts),
        scheme: x.down.scheme(),
        headers: &parts.headers,
        port: x.down.target.port(),
        source_labels: x.down.source_workload.as_ref().map(|w| &w.labels),
        source_namespace: x.down.identity.as_ref().map(|i| i.namespace.as_str()),
        gateway: &x.ctx.gateway,
    };
    let selected = candidates.iter().find_map(|c| {
        let view = RequestView { gateway: &c.gateway, ..view };
        select_route(&c.virtual_service, &view).map(|(route, matched)| (&c.virtual_service, route, matched))
    });
    let Some((vs, route, matched)) = selected else {
        let names: Vec<String> = candidates.iter().map(|c| c.virtual_service.key()).collect();
        let reason = if names.is_empty() {
            format!("no VirtualService of the gateway serves host `{}`", host_of(view.authority))
        } else {
            format!("no route of VirtualService {} matches", names.join(", "))
        };
        return Err(Local::new(StatusCode::NOT_FOUND, "").flagged(ResponseFlags::NR).because(reason));
    };
    x.record.route = Some(match &route.name {
        Some(name) => format!("{}:{name}", vs.key()),
        None => vs.key(),
    });

    let destinations = match &route.action {
        RouteAction::DirectResponse { status, body } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
            return Err(Local::new(status, body.clone().unwrap_or_default()));
        }
        RouteAction::Redirect(redirect) => return Err(redirect_to(redirect, parts, matched)),
        RouteAction::Forward(destinations) => destinations,
    };
    inject_faults(x, route).await?;
    let Some(chosen) = forward::choose_weighted(destinations) else {
        return Err(Local::new(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream")
            .flagged(ResponseFlags::UH)
            .because("every destination of the route has weight 0"));
    };
    headers::apply(&mut parts.headers, &route.headers.request);
    headers::apply(&mut parts.headers, &chosen.headers.request);
    if let Some(rewrite) = &route.rewrite {
        rewrite_request(parts, rewrite.uri.as_deref(), rewrite.authority.as_deref(), matched);
    }
    let replay = replayable(x, route, body).await?;
    let request = upstream_request(x, parts);
    let mirrors = route.mirrors.iter().filter(|m| rolls(m.percentage)).map(|m| &m.destination);
    for mirror in mirrors {
        forward::mirror(x, &request, &replay, mirror, route.timeout);
    }
    let timeout = headers::timeout_override(&request.headers).map_or(route.timeout, |t| (!t.is_zero()).then_some(t));
    let cluster = forward::resolve(x, &chosen.destination)?;
    let mut forwarded = forward::forward(x, cluster, request, replay, route.retries.as_ref(), timeout).await?;
    let response_headers = forwarded.response.headers_mut();
    headers::apply(response_headers, &route.headers.response);
    headers::apply(response_headers, &chosen.headers.response);
    Ok(forwarded)
}

/// The VirtualServices that may route the request, each with the gateway it is bound through:
/// at a waypoint the one of the target service (`None`: there is none, go straight to the
/// service); at a gateway those bound to the servers of the port that serve the Host (GW-1), of
/// the SNI's server alone on TLS (GW-2), or a 404 when none does.
fn candidates(x: &mut Exchange, parts: &Parts) -> Option<Vec<HttpCandidate>> {
    match &x.down.target {
        Target::Gateway { port, view, server } => {
            let host = host_of(authority(parts));
            Some(view.borrow().http_candidates(*port, &host, server.as_ref()))
        }
        target => {
            let vs = target.service().and_then(|s| x.model.routing.mesh_routes_for(&s.hostname))?;
            Some(vec![HttpCandidate { gateway: x.ctx.gateway.clone(), virtual_service: vs.clone() }])
        }
    }
}

/// At a gateway's HTTP server with `tls.httpsRedirect` (GW-1): 301 to the same URL in https,
/// `:80` dropped from the host as Envoy does (another port is kept).
fn https_redirect(x: &Exchange, parts: &Parts) -> Option<Local> {
    let Target::Gateway { port, view, server: None } = &x.down.target else { return None };
    let authority = authority(parts);
    if !view.borrow().redirects_to_https(*port, &host_of(authority)) {
        return None;
    }
    let host = authority.strip_suffix(":80").unwrap_or(authority);
    let location = match parts.uri.query() {
        Some(q) => format!("https://{host}{}?{q}", parts.uri.path()),
        None => format!("https://{host}{}", parts.uri.path()),
    };
    let mut local = Local::new(StatusCode::MOVED_PERMANENTLY, "").because("httpsRedirect");
    if let Ok(value) = HeaderValue::from_str(&location) {
        local.headers.push((header::LOCATION, value));
    }
    Some(local)
}

/// The host of a Host header, lower case, without its port.
fn host_of(authority: &str) -> String {
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority.rsplit_once(':').map_or(authority, |(host, _)| host),
    };
    host.to_ascii_lowercase()
}

/// Traffic to a service without a VirtualService (or to a pod): straight to its endpoints.
async fn forward_default(x: &mut Exchange, parts: &mut Parts, body: RequestBody) -> Result<Forwarded, Local> {
    let replay = if body.is_end_stream() {
        Replay::Empty
    } else {
        Replay::Stream(Some(StreamedBody { prefix: Vec::new(), held: None, rest: body }))
    };
    let timeout = headers::timeout_override(&parts.headers).filter(|t| !t.is_zero());
    let request = upstream_request(x, parts);
    let cluster = match &x.down.target {
        Target::Service { service, port } => {
            let destination = Destination { host: service.hostname.clone(), subset: None, port: Some(*port) };
            forward::resolve(x, &destination)?
        }
        Target::Workload { workload, port } => x.ctx.upstreams.workload_cluster(&x.model, workload, *port),
        Target::Gateway { .. } => {
            return Err(Local::new(StatusCode::NOT_FOUND, "").flagged(ResponseFlags::NR).because("no route"));
        }
    };
    forward::forward(x, cluster, request, replay, None, timeout).await
}

/// RequestAuthentication (L7-10): a request without a token passes (policy may still require
/// one); a token that does not verify is 401. A verified token is removed before forwarding
/// unless the rule says to forward it, and its payload copied to a header when asked.
fn authenticate(x: &mut Exchange, parts: &mut Parts) -> Result<Option<Box<ValidatedJwt>>, Local> {
    let providers = x.ctx.authn.providers(x.down.target.service().map(Arc::as_ref));
    if providers.is_empty() {
        return Ok(None);
    }
    let request = jwt::RequestParts { headers: &parts.headers, query: parts.uri.query() };
    match jwt::authenticate(&providers, &request, SystemTime::now()) {
        JwtOutcome::NoToken => Ok(None),
        JwtOutcome::Invalid(reason) => {
            Err(Local::new(StatusCode::UNAUTHORIZED, jwt::UNAUTHORIZED_BODY).because(reason).denying())
        }
        JwtOutcome::Valid(token) => {
            if !token.forward_original_token {
                jwt::strip_token(&mut parts.headers, &token.location);
                if let jwt::TokenLocation::Param(name) = &token.location {
                    let stripped = jwt::strip_query_param(parts.uri.path_and_query().map_or("/", |p| p.as_str()), name);
                    let mut uri_parts = parts.uri.clone().into_parts();
                    uri_parts.path_and_query = stripped.parse().ok();
                    if let Ok(uri) = Uri::from_parts(uri_parts) {
                        parts.uri = uri;
                    }
                }
            }
            if let Some(name) = &token.output_payload_to_header
                && let Ok(value) = HeaderValue::from_str(&token.payload_header_value())
            {
                parts.headers.insert(name.clone(), value);
            }
            Ok(Some(token))
        }
    }
}

/// L7 authorization at the waypoint (AUTHZ-3, AUTHZ-4): the policies bound to the service or
/// the waypoint decide with the whole request in view; a denial is 403 `RBAC: access denied`.
fn authorize(x: &mut Exchange, parts: &Parts, jwt: Option<&ValidatedJwt>) -> Result<(), Local> {
    let model = &x.model;
    let service = x.down.target.service().map(Arc::as_ref);
    let mut policies = model.security.authorization_at_waypoint(service, &x.ctx.waypoint).peekable();
    if policies.peek().is_none() {
        return Ok(());
    }
    let target = x.down.target.addr();
    let mut http = HttpRequest {
        host: Some(authority(parts).to_owned()),
        method: parts.method.to_string(),
        path: parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        headers: parts
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
        remote_ip: Some(x.down.client_addr.ip()),
        ..Default::default()
    };
    if let Some(token) = jwt {
        token.fill(&mut http);
    }
    let connection = Connection {
        source: x.down.identity.clone(),
        source_ip: x.down.client_addr.ip(),
        destination_ip: target.ip(),
        destination_port: target.port(),
        http: Some(http),
    };
    let decision = authz::evaluate(policies, &connection);
    if decision.allowed {
        return Ok(());
    }
    Err(Local::new(StatusCode::FORBIDDEN, "RBAC: access denied").because(decision.denial_reason()).denying())
}

/// Fault injection (L7-6): a delay first, then an abort, each for its share of requests; an
/// aborted request never reaches the upstream.
async fn inject_faults(x: &mut Exchange, route: &HttpRoute) -> Result<(), Local> {
    let Some(fault) = &route.fault else { return Ok(()) };
    if let Some(delay) = &fault.delay
        && rolls(delay.percentage)
    {
        x.record.flags.insert(ResponseFlags::DI);
        tokio::time::sleep(delay.fixed_delay).await;
    }
    if let Some(abort) = &fault.abort
        && rolls(abort.percentage)
    {
        return Err(match abort.status {
            AbortStatus::Http(status) => Local::new(
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "fault filter abort",
            )
            .flagged(ResponseFlags::FI),
            AbortStatus::Grpc(code) => {
                let mut local = Local::new(StatusCode::OK, "").flagged(ResponseFlags::FI);
                if let Ok(v) = HeaderValue::from_str(&code.to_string()) {
                    local.headers.push((header::HeaderName::from_static("grpc-status"), v));
                }
                local.headers.push((header::CONTENT_TYPE, HeaderValue::from_static("application/grpc")));
                local
            }
        });
    }
    Ok(())
}

/// Whether this request falls in `percentage` (percent, fractions allowed).
pub(super) fn rolls(percentage: Percentage) -> bool {
    percentage.0 >= 100.0 || (percentage.0 > 0.0 && fastrand::f64() * 100.0 < percentage.0)
}

/// The body as retries and mirrors need it: buffered when they need it again and it fits in
/// both the per-request limit and the proxy's budget, streamed (once) otherwise.
async fn replayable(x: &Exchange, route: &HttpRoute, body: RequestBody) -> Result<Replay, Local> {
    let needs_replay = route.retries.as_ref().is_some_and(|r| r.attempts > 0) || !route.mirrors.is_empty();
    if body.is_end_stream() {
        return Ok(Replay::Empty);
    }
    let limit = BODY_BUFFER_PER_REQUEST;
    if !needs_replay || body.size_hint().lower() > limit as u64 {
        return Ok(Replay::Stream(Some(StreamedBody { prefix: Vec::new(), held: None, rest: body })));
    }
    match request_body::buffer(body, limit, &x.ctx.body_budget).await {
        Ok(Buffering::Complete(buffered)) => Ok(Replay::Buffered(buffered)),
        Ok(Buffering::Partial { read, held, rest }) => {
            tracing::debug!(
                "request body not buffered (too large, or the buffer budget is spent): no retries or mirrors"
            );
            Ok(Replay::Stream(Some(StreamedBody { prefix: read, held: Some(held), rest })))
        }
        Err(fault) => Err(fault.local()),
    }
}

/// The parts of the request every try sends: method, URI, headers with hop-by-hop headers
/// removed (a WebSocket upgrade keeps its two), `x-forwarded-*` added.
fn upstream_request(x: &Exchange, parts: &mut Parts) -> UpstreamRequest {
    let websocket = parts.version == Version::HTTP_11 && headers::is_websocket_upgrade(&parts.headers);
    let mut request_headers = std::mem::take(&mut parts.headers);
    headers::remove_hop_by_hop(&mut request_headers);
    // A gateway is the edge: a client's own x-forwarded-proto is not believed (Envoy sanitizes it
    // for untrusted downstreams too), the gateway says what the client used (L7-9).
    if matches!(x.down.target, Target::Gateway { .. }) {
        request_headers.remove(headers::X_FORWARDED_PROTO);
    }
    headers::add_forwarded(&mut request_headers, x.down.client_addr.ip(), x.down.scheme());
    if websocket {
        request_headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        request_headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    let upgrade = websocket.then(|| parts.extensions.remove::<hyper::upgrade::OnUpgrade>()).flatten();
    UpstreamRequest {
        method: std::mem::replace(&mut parts.method, Method::GET),
        path_and_query: parts.uri.path_and_query().map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        authority: authority_of(parts, &request_headers),
        headers: request_headers,
        downstream_version: parts.version,
        upgrade,
    }
}

fn authority_of(parts: &Parts, headers: &http::HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("")
        .to_owned()
}

/// Time left before `deadline`, if any.
pub(super) fn remaining(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // L7-6: percentages are percent: 0.1 is one in a thousand, 100 is all.
    #[test]
    fn percentages_roll_in_proportion() {
        assert!(rolls(Percentage(100.0)));
        assert!(!rolls(Percentage(0.0)));
        let hits = (0..100_000).filter(|_| rolls(Percentage(0.1))).count();
        assert!((40..=200).contains(&hits), "{hits}");
    }

    // GW-1, L7-9: a connection whose TLS the gateway terminated is https; plain HTTP at the
    // gateway and HBONE streams at a waypoint are http.
    #[test]
    fn scheme_follows_the_gateway_tls() {
        use crate::model::gateways::{GatewayView, ServerId};
        let (_tx, view) = tokio::sync::watch::channel(Arc::new(GatewayView::default()));
        let down = |server: Option<ServerId>| Downstream {
            client_addr: "10.1.0.10:40000".parse().expect("addr"),
            identity: None,
            source_workload: None,
            target: Target::Gateway { port: 443, view: view.clone(), server },
            protocol: crate::model::AppProtocol::Http,
            tunnel_trace: None,
        };
        assert_eq!(down(Some(ServerId { gateway: "web/gw".into(), index: 0 })).scheme(), "https");
        assert_eq!(down(None).scheme(), "http");
    }
}
