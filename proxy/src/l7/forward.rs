//! Sending a routed request to its destination (L7-4, L7-5, L7-7, L7-11): endpoint choice,
//! connection pool limits, tries under `timeout` and `perTryTimeout`, retries by `retryOn`
//! with back-off, outlier accounting, mirrors, and WebSocket upgrades.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::BodyExt as _;
use hyper::{body::Incoming, upgrade::OnUpgrade};
use hyper_util::rt::TokioIo;

use super::{
    body::UpstreamBody,
    flags::ResponseFlags,
    headers,
    lb::hash_parts,
    matching::query_param,
    outlier::TryOutcome,
    pool::{self, AcquireError, Lease, UpstreamVersion},
    request_body::{Buffered, RequestBody, Reservation},
    retry::{self, TryFailure},
    router::{Exchange, Local, remaining},
    upstream::{Cluster, ClusterError, ClusterKey, Limits, UpstreamEndpoint},
};
use crate::model::{
    AppProtocol,
    routes::{Destination, HashKey, LoadBalancer, RetryPolicy, WeightedDestination},
};

/// How long a mirrored request may take before it is abandoned (it never delays the client).
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// The parts of a request every try (and mirror) sends.
pub struct UpstreamRequest {
    pub method: Method,
    pub path_and_query: String,
    /// Host / `:authority` to send.
    pub authority: String,
    pub headers: HeaderMap,
    pub downstream_version: Version,
    /// The client's side of a WebSocket upgrade, when the request asks for one.
    pub upgrade: Option<OnUpgrade>,
}

/// The request body, for as many tries as it allows.
pub enum Replay {
    /// No body: every try (and mirror) sends none.
    Empty,
    /// Buffered: every try (and mirror) sends a copy.
    Buffered(Buffered),
    /// Streamed: one try only.
    Stream(Option<StreamedBody>),
}

/// A body sent once: what was read while trying to buffer it, then the rest.
pub struct StreamedBody {
    pub prefix: Vec<Bytes>,
    /// The buffer budget `prefix` holds until it is sent.
    pub held: Option<Reservation>,
    pub rest: RequestBody,
}

impl Replay {
    fn take(&mut self, counted: &Arc<AtomicU64>) -> Option<UpstreamBody> {
        match self {
            Replay::Empty => Some(UpstreamBody::Empty),
            Replay::Buffered(buffered) => {
                counted.store(buffered.bytes.len() as u64, Ordering::Relaxed);
                Some(UpstreamBody::full(buffered.clone()))
            }
            Replay::Stream(body) => body.take().map(|StreamedBody { prefix, held, rest }| {
                UpstreamBody::streaming(prefix, held, rest, counted.clone())
            }),
        }
    }

    fn replayable(&self) -> bool {
        !matches!(self, Replay::Stream(_))
    }
}

/// An upstream's answer, with what must live until its body is over.
pub struct Forwarded {
    pub response: Response<Incoming>,
    pub lease: Lease,
    pub endpoint_guard: EndpointGuard,
    pub flags: ResponseFlags,
}

/// Counts a request in flight on its endpoint (and, once answered, in its destination's
/// `http2MaxRequests`) until dropped.
pub struct EndpointGuard {
    endpoint: Arc<UpstreamEndpoint>,
    _active: Option<ActiveRequest>,
}

impl EndpointGuard {
    fn new(endpoint: &Arc<UpstreamEndpoint>) -> Self {
        endpoint.active.fetch_add(1, Ordering::Relaxed);
        Self { endpoint: endpoint.clone(), _active: None }
    }
}

impl Drop for EndpointGuard {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Holds one of the destination's `http2MaxRequests` slots.
struct ActiveRequest(Arc<Limits>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        Limits::give_back(&self.0.active_requests);
    }
}

/// Picks one destination of a route by weight.
pub fn choose_weighted(destinations: &[WeightedDestination]) -> Option<&WeightedDestination> {
    let total: u64 = destinations.iter().map(|d| u64::from(d.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut roll = fastrand::u64(0..total);
    for d in destinations {
        let weight = u64::from(d.weight);
        if roll < weight {
            return Some(d);
        }
        roll -= weight;
    }
    destinations.last()
}

/// The cluster behind a route destination. A destination without a port takes the port the
/// request came in on, or the service's only port.
pub fn resolve(x: &Exchange, destination: &Destination) -> Result<Arc<Cluster>, Local> {
    let key = ClusterKey::of(&x.model, destination, x.down.target.port());
    x.ctx.upstreams.cluster(&x.model, &key).map_err(|e| {
        let flags = match e {
            ClusterError::UnknownHost(_) | ClusterError::UnknownSubset(..) | ClusterError::UnknownPort(..) => {
                ResponseFlags::NC
            }
        };
        Local::new(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream").flagged(flags).because(e.to_string())
    })
}

/// Sends `request` to `cluster`: as many tries as the retry policy and the body allow, all
/// within `timeout`.
pub async fn forward(
    x: &mut Exchange,
    cluster: Arc<Cluster>,
    mut request: UpstreamRequest,
    mut replay: Replay,
    retries: Option<&RetryPolicy>,
    timeout: Option<Duration>,
) -> Result<Forwarded, Local> {
    let started = Instant::now();
    let deadline = timeout.map(|t| started + t);
    x.record.upstream_cluster = Some(cluster.key.name());
    if let Some(service) = &cluster.service {
        x.record.destination_service = Some(service.clone());
    }
    let max_requests = cluster.policy.connection_pool.as_ref().and_then(|p| p.http2_max_requests);
    if !Limits::try_take(&cluster.limits.active_requests, max_requests) {
        return Err(overflow("http2MaxRequests reached"));
    }
    let active = ActiveRequest(cluster.limits.clone());
    let version = upstream_version(cluster.protocol, request.downstream_version);
    let (hash, set_cookie) = hash_key(x, &cluster, &request);
    let websocket = request.upgrade.take();
    let tries = match retries {
        Some(r) if replay.replayable() && websocket.is_none() => r.attempts.saturating_add(1),
        _ => 1,
    };
    let per_try = retries.and_then(|r| r.per_try_timeout);
    let mut flags = ResponseFlags::default();
    let mut last: Option<Local> = None;
    for attempt in 1..=tries {
        let more = attempt < tries;
        x.record.attempts = attempt;
        let Some(endpoint) = cluster.pick(hash, Instant::now()).cloned() else {
            return Err(Local::new(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream")
                .flagged(ResponseFlags::UH | flags)
                .because(format!("every endpoint of {} is ejected or none exists", cluster.key.name())));
        };
        note_endpoint(x, &endpoint);
        let Some(body) = replay.take(&x.request_bytes) else { break };
        let outgoing = build(&mut request, version, body, more);
        let mut guard = EndpointGuard::new(&endpoint);
        let try_deadline = match (deadline, per_try) {
            (Some(d), Some(p)) => Some(d.min(Instant::now() + p)),
            (d, p) => d.or_else(|| p.map(|p| Instant::now() + p)),
        };
        // A client body that fails ends the try at once; the upstream stream is reset later
        // (`pool::RESET_GRACE`) by the exchange left behind.
        let sent = async {
            tokio::select! {
                sent = one_try(x, &cluster, &endpoint, version, outgoing) => sent,
                fault = x.fault.failed() => Err(TryError::ClientBody(fault.local())),
            }
        };
        let result = match remaining(try_deadline) {
            Some(left) => tokio::time::timeout(left, sent).await.ok(),
            None => Some(sent.await),
        };
        let failure = match result {
            Some(Ok((mut response, lease))) => {
                let status = response.status().as_u16();
                cluster.record(&endpoint, TryOutcome::Status(status));
                let failure = TryFailure::Status { status, grpc: headers::grpc_status(response.headers()) };
                let retry = more && retries.is_some_and(|r| retry::allows(&r.retry_on, failure));
                if !retry {
                    if attempt > 1 && retries.is_some_and(|r| retry::allows(&r.retry_on, failure)) {
                        flags.insert(ResponseFlags::URX);
                    }
                    x.record.upstream_time = Some(started.elapsed());
                    set_service_time(response.headers_mut(), started.elapsed());
                    if let Some(cookie) = &set_cookie {
                        response.headers_mut().append(header::SET_COOKIE, cookie.clone());
                    }
                    if status == 101
                        && let Some(client) = websocket
                    {
                        bridge_upgrade(client, &mut response);
                    }
                    guard._active = Some(active);
                    return Ok(Forwarded { response, lease, endpoint_guard: guard, flags });
                }
                // The failed answer is not read: its connection cannot carry another request.
                lease.release(false);
                last = None;
                failure
            }
            Some(Err(TryError::Overflow(why))) => return Err(overflow(why).flagged(flags)),
            Some(Err(TryError::ClientBody(local))) => return Err(local.flagged(flags)),
            Some(Err(TryError::Tls(why))) => {
                return Err(Local::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers. reset reason: connection failure, \
                     transport failure reason: TLS origination is misconfigured",
                )
                .flagged(ResponseFlags::UF | flags)
                .because(why));
            }
            Some(Err(TryError::Connect(e))) => {
                cluster.record(&endpoint, TryOutcome::ConnectFailure);
                last = Some(
                    Local::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                    )
                    .flagged(ResponseFlags::UF)
                    .because(format!("cannot connect to {}: {e}", endpoint.addr)),
                );
                TryFailure::ConnectFailure
            }
            Some(Err(TryError::Reset(e))) => {
                if let Some(fault) = x.fault.get() {
                    // The client's body broke the try: the upstream is not to blame (OPS-4).
                    return Err(fault.local().flagged(flags));
                }
                cluster.record(&endpoint, TryOutcome::ConnectFailure);
                let refused = e.contains("refused");
                last = Some(
                    Local::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
                    )
                    .flagged(ResponseFlags::UC)
                    .because(format!("{} reset the request: {e}", endpoint.addr)),
                );
                if refused { TryFailure::RefusedStream } else { TryFailure::Reset }
            }
            None => {
                cluster.record(&endpoint, TryOutcome::Neutral);
                let overall = deadline.is_some_and(|d| Instant::now() >= d);
                let timed_out = Local::new(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
                    .flagged(ResponseFlags::UT)
                    .because(if overall { "route timeout" } else { "perTryTimeout" });
                if overall {
                    return Err(timed_out.flagged(flags));
                }
                last = Some(timed_out);
                TryFailure::PerTryTimeout
            }
        };
        drop(guard);
        let may_retry = more && retries.is_some_and(|r| retry::allows(&r.retry_on, failure));
        if !may_retry {
            break;
        }
        let max_retries = cluster.policy.connection_pool.as_ref().and_then(|p| p.max_retries);
        if !Limits::try_take(&cluster.limits.active_retries, max_retries) {
            flags.insert(ResponseFlags::UO);
            break;
        }
        let wait = retry::backoff(attempt);
        let wait = remaining(deadline).map_or(wait, |left| wait.min(left));
        tokio::time::sleep(wait).await;
        Limits::give_back(&cluster.limits.active_retries);
    }
    if x.record.attempts > 1 {
        // Retried, and still failed: the retry budget of the route is spent (Envoy's `URX`).
        flags.insert(ResponseFlags::URX);
    }
    let local = last.unwrap_or_else(|| Local::new(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"));
    Err(local.flagged(flags))
}

fn overflow(why: &str) -> Local {
    Local::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream connect error or disconnect/reset before headers. reset reason: overflow",
    )
    .flagged(ResponseFlags::UO)
    .because(format!("circuit breaker: {why}"))
}

fn note_endpoint(x: &mut Exchange, endpoint: &UpstreamEndpoint) {
    x.record.upstream_addr = Some(endpoint.addr);
    x.record.destination_workload = Some(endpoint.workload.clone());
    x.record.destination_identity =
        Some(endpoint.workload.identity(&x.ctx.upstreams.connector.trust_domain).to_string());
}

/// HTTP/2 for ports declared so (gRPC needs it end to end), HTTP/1.1 for `http` ports, and
/// the client's own version for ports that declare nothing.
fn upstream_version(protocol: AppProtocol, downstream: Version) -> UpstreamVersion {
    match protocol {
        AppProtocol::Http2 | AppProtocol::Grpc => UpstreamVersion::Http2,
        AppProtocol::Http => UpstreamVersion::Http1,
        _ if downstream == Version::HTTP_2 => UpstreamVersion::Http2,
        _ => UpstreamVersion::Http1,
    }
}

/// The consistent-hash key of a request (`consistentHash`), when the policy hashes. A request
/// without the hash cookie of a policy that sets one (`httpCookie` with a `ttl`) gets a new
/// cookie, returned as the `Set-Cookie` value to answer with, so its next requests stick.
fn hash_key(x: &Exchange, cluster: &Cluster, request: &UpstreamRequest) -> (Option<u64>, Option<HeaderValue>) {
    let Some(LoadBalancer::ConsistentHash(key)) = &cluster.policy.load_balancer else { return (None, None) };
    let hash = |v: &[u8]| Some(hash_parts(&[v]));
    match key {
        HashKey::Header(name) => (request.headers.get(name.as_str()).and_then(|v| hash(v.as_bytes())), None),
        HashKey::Cookie { name, path, ttl } => match (cookie(&request.headers, name), ttl) {
            (Some(value), _) => (hash(value.as_bytes()), None),
            (None, Some(ttl)) => {
                let value = format!("{:016x}", fastrand::u64(..));
                let mut set = format!("{name}={value}; Max-Age={}; HttpOnly", ttl.as_secs());
                if let Some(path) = path {
                    set.push_str(&format!("; Path={path}"));
                }
                (hash(value.as_bytes()), HeaderValue::from_str(&set).ok())
            }
            (None, None) => (None, None),
        },
        HashKey::SourceIp => (hash(x.down.client_addr.ip().to_string().as_bytes()), None),
        HashKey::QueryParameter(name) => {
            let query = request.path_and_query.split_once('?').map(|(_, q)| q);
            (query_param(query, name).and_then(|v| hash(v.as_bytes())), None)
        }
    }
}

fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))
}

fn set_service_time(headers: &mut HeaderMap, took: Duration) {
    if let Ok(v) = HeaderValue::from_str(&took.as_millis().to_string()) {
        headers.insert(headers::X_ENVOY_UPSTREAM_SERVICE_TIME, v);
    }
}

/// One try's request. Headers are copied while another try may follow; the last try takes
/// them.
fn build(
    template: &mut UpstreamRequest,
    version: UpstreamVersion,
    body: UpstreamBody,
    copy: bool,
) -> Request<UpstreamBody> {
    let mut request = Request::new(body);
    *request.method_mut() = template.method.clone();
    let uri = match version {
        UpstreamVersion::Http1 => template.path_and_query.parse::<Uri>(),
        UpstreamVersion::Http2 => format!("http://{}{}", template.authority, template.path_and_query).parse::<Uri>(),
    };
    *request.uri_mut() = uri.unwrap_or_else(|_| Uri::from_static("/"));
    *request.headers_mut() = if copy { template.headers.clone() } else { std::mem::take(&mut template.headers) };
    let headers = request.headers_mut();
    match version {
        UpstreamVersion::Http1 => {
            *request.version_mut() = Version::HTTP_11;
            if let Ok(host) = HeaderValue::from_str(&template.authority) {
                request.headers_mut().insert(header::HOST, host);
            }
        }
        UpstreamVersion::Http2 => {
            headers.remove(header::HOST);
            *request.version_mut() = Version::HTTP_2;
        }
    }
    request
}

/// Why a try got no response.
enum TryError {
    Overflow(&'static str),
    /// The client's request body failed: the client's fault, not the upstream's (OPS-4).
    ClientBody(Local),
    Connect(std::io::Error),
    /// The destination's TLS origination cannot be set up (SPEC GW-3).
    Tls(String),
    Reset(String),
}

async fn one_try(
    x: &Exchange,
    cluster: &Cluster,
    endpoint: &Arc<UpstreamEndpoint>,
    version: UpstreamVersion,
    request: Request<UpstreamBody>,
) -> Result<(Response<Incoming>, Lease), TryError> {
    let upstreams = &x.ctx.upstreams;
    // A connection opened for this request names its span as the tunnel's parent (OBS-7).
    let traceparent = x.record.trace.as_ref().map(|t| t.context.header());
    let lease = pool::acquire(cluster, endpoint, version, &upstreams.connector, x.down.client_addr.ip(), traceparent)
        .await
        .map_err(|e| match e {
            AcquireError::Overflow(why) => TryError::Overflow(why),
            AcquireError::Connect(e) => TryError::Connect(e),
            AcquireError::Tls(why) => TryError::Tls(why),
        })?;
    pool::exchange(lease, request, &upstreams.detached).await.map_err(TryError::Reset)
}

/// Joins the client's and the upstream's upgraded connections once both switched protocols.
fn bridge_upgrade(client: OnUpgrade, response: &mut Response<Incoming>) {
    let upstream = hyper::upgrade::on(response);
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!("WebSocket upgrade failed: {e}");
                return;
            }
        };
        let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!("WebSocket connection ended: {e}");
        }
    });
}

/// Sends a copy of the request to `destination` (L7-7): fire and forget, the answer thrown
/// away, Host with `-shadow` added, never delaying the client.
pub fn mirror(
    x: &Exchange,
    request: &UpstreamRequest,
    replay: &Replay,
    destination: &Destination,
    timeout: Option<Duration>,
) {
    let body = match replay {
        Replay::Empty => None,
        Replay::Buffered(buffered) => Some(buffered.clone()),
        Replay::Stream(_) => {
            tracing::debug!("request body streamed: not mirrored");
            return;
        }
    };
    let Ok(cluster) = resolve(x, destination) else {
        tracing::debug!(host = %destination.host, "mirror destination unknown: not mirrored");
        return;
    };
    let mut shadow = UpstreamRequest {
        method: request.method.clone(),
        path_and_query: request.path_and_query.clone(),
        authority: shadow_authority(&request.authority),
        headers: request.headers.clone(),
        downstream_version: request.downstream_version,
        upgrade: None,
    };
    let (ctx, client_ip) = (x.ctx.clone(), x.down.client_addr.ip());
    tokio::spawn(async move {
        let version = upstream_version(cluster.protocol, shadow.downstream_version);
        let Some(endpoint) = cluster.pick(None, Instant::now()).cloned() else { return };
        let send = async {
            let mut lease =
                pool::acquire(&cluster, &endpoint, version, &ctx.upstreams.connector, client_ip, None).await.ok()?;
            let body = body.map_or(UpstreamBody::Empty, UpstreamBody::full);
            let response = lease.send(build(&mut shadow, version, body, false)).await.ok()?;
            let complete = response.into_body().collect().await.is_ok();
            lease.release(complete);
            Some(())
        };
        if tokio::time::timeout(timeout.unwrap_or(MIRROR_TIMEOUT), send).await.is_err() {
            tracing::debug!(cluster = %cluster.key.name(), "mirrored request abandoned after its timeout");
        }
    });
}

/// `httpbin:8000` → `httpbin-shadow:8000`, as Envoy names mirrored traffic.
fn shadow_authority(authority: &str) -> String {
    if let Some((host, port)) = authority.rsplit_once(':')
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && (!host.contains(':') || host.ends_with(']'))
    {
        return format!("{host}-shadow:{port}");
    }
    format!("{authority}-shadow")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::routes::HeaderOps;

    #[test]
    fn shadow_host_keeps_the_port() {
        assert_eq!(shadow_authority("httpbin:8000"), "httpbin-shadow:8000");
        assert_eq!(shadow_authority("httpbin"), "httpbin-shadow");
        assert_eq!(shadow_authority("httpbin.default.svc.cluster.local"), "httpbin.default.svc.cluster.local-shadow");
    }

    // L7-3: weights split traffic in proportion; weight 0 never wins.
    #[test]
    fn weights_split_in_proportion() {
        let d = |host: &str, weight| WeightedDestination {
            destination: Destination { host: host.into(), subset: None, port: None },
            weight,
            headers: HeaderOps::default(),
        };
        let dests = [d("a", 80), d("b", 20), d("never", 0)];
        let mut a = 0;
        for _ in 0..10_000 {
            match choose_weighted(&dests).map(|w| w.destination.host.as_str()) {
                Some("a") => a += 1,
                Some("b") => {}
                other => panic!("{other:?}"),
            }
        }
        assert!((7600..8400).contains(&a), "{a}");
        assert!(choose_weighted(&[d("x", 0)]).is_none());
    }
}
