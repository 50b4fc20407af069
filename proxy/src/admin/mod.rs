//! The operator's HTTP endpoints (OBS-1, OBS-3): the admin API on 127.0.0.1:15000, Prometheus
//! metrics on :15020 and readiness on :15021, as Istio's proxies lay them out.
//!
//! All three are small HTTP/1.1 servers on hyper; their handlers only read shared state (the
//! model, the certificate store, counters), so they answer synchronously and never touch the
//! data path's tasks.

mod mesh;
mod routes;
mod views;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{
    Method, Request, Response, StatusCode,
    header::{ACCEPT, CONTENT_TYPE},
};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::debug;

use crate::{
    capture::Capture,
    identity::CertStore,
    model::{ModelHandle, WaypointName},
    telemetry::{Exposition, MetricsRegistry, logging::LogControl},
};

/// A request must send its headers within this time, so idle clients cannot pile up.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Admin endpoints and what they show, listed on unknown paths.
const ADMIN_ENDPOINTS: &[(&str, &str)] = &[
    ("/certs", "certificates held: identity, serial, validity, chain and roots; ?all adds pending ones (JSON)"),
    ("/clusters", "destinations of the L7 engine, endpoints with health and outlier status (JSON)"),
    ("/config_dump", "the compiled configuration in force (JSON)"),
    (
        "/hbone",
        "the node proxy's pooled outbound HBONE connections: local and peer address, identities, streams, idle s (JSON)",
    ),
    ("/healthz/ready", "200 once the proxy is ready"),
    ("/logging", "the log filter; ?level=<filter> (GET or POST) changes it"),
    ("/map", "the live mesh map of this proxy's traffic (HTML, polls /map.json)"),
    ("/map.json", "edges this proxy reported: rate, success, p99, mTLS, denials, recent events (JSON)"),
    ("/policies", "authorization, peer and request authentication policies, and what they apply to here (JSON)"),
    ("/routes", "the waypoint's HTTP and TCP routes, by service port (JSON)"),
    ("/server_info", "what this proxy is: strait, its version, role, node or waypoint, listeners (JSON)"),
    ("/services", "services with their VIP, waypoint, ports and endpoints (JSON)"),
    ("/stats", "capture counters (text)"),
    ("/workloads", "workloads the mesh knows, with identity, waypoint, protocol and capture state (JSON)"),
];
const METRICS_ENDPOINTS: &[(&str, &str)] = &[
    ("/metrics", "Prometheus metrics (OpenMetrics text)"),
    ("/stats/prometheus", "the same, where Istio's sidecars serve it"),
    ("/map", "the live mesh map (HTML)"),
    ("/map.json", "the mesh map's edges, for the page and the control plane (JSON)"),
];

/// The mesh map's page (OBS-6): one file, its script and styles inline, so the binary serves it
/// whole on a machine without internet.
const MAP_PAGE: &str = include_str!("map.html");
const READINESS_ENDPOINTS: &[(&str, &str)] = &[("/healthz/ready", "200 once the proxy is ready")];

/// Where a proxy serves its operator endpoints (Istio's layout: 15000, 15020, 15021).
#[derive(Debug, Clone, Copy)]
pub struct OperatorEndpoints {
    /// Admin API (localhost only by default).
    pub admin: SocketAddr,
    /// Prometheus metrics.
    pub metrics: SocketAddr,
    /// Readiness probe.
    pub readiness: SocketAddr,
}

/// Binds the three endpoints and serves them in the background; `state.ready` answers the
/// readiness probe.
/// The running operator endpoints; `close` stops them (a successor serves them then).
#[derive(Debug)]
pub struct Serving(Vec<tokio::task::JoinHandle<()>>);

impl Serving {
    /// Stops serving and closes the listening sockets.
    pub fn close(self) {
        for task in self.0 {
            task.abort();
        }
    }
}

pub async fn start(
    endpoints: &OperatorEndpoints,
    state: AdminState,
    metrics: MetricsRegistry,
) -> std::io::Result<Serving> {
    let bind = |addr: SocketAddr, what: &'static str| {
        reusable_listener(addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on the {what} address {addr}: {e}")))
    };
    let admin_listener = bind(endpoints.admin, "admin")?;
    let metrics_listener = bind(endpoints.metrics, "metrics")?;
    let readiness_listener = bind(endpoints.readiness, "readiness")?;
    Ok(Serving(vec![
        tokio::spawn(serve_readiness(readiness_listener, state.ready.clone())),
        tokio::spawn(serve_metrics(metrics_listener, Arc::new(metrics), state.map.clone())),
        tokio::spawn(serve_admin(admin_listener, state, *endpoints)),
    ]))
}

/// A listener another process may bind too (SO_REUSEPORT): while a restarted node proxy takes
/// over (OPS-3), both serve their operator endpoints until the old one closes its own.
fn reusable_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    TcpListener::from_std(socket.into())
}

/// Whether the proxy is ready to serve: set once, when its listeners and capture are in place.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Draining: kubelet takes the proxy out of rotation.
    pub fn set_not_ready(&self) {
        self.0.store(false, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A view computed when asked (the L7 engine's destinations, at a waypoint).
pub type View = Arc<dyn Fn() -> String + Send + Sync>;

/// What the admin endpoint reads.
#[derive(Clone)]
pub struct AdminState {
    pub model: ModelHandle,
    /// The node's capture programs; `None` in a proxy that captures nothing (a waypoint).
    pub capture: Option<Arc<Mutex<Capture>>>,
    /// `/clusters`, when the proxy has an L7 engine.
    pub clusters: Option<View>,
    /// `/hbone`, when the proxy pools outbound HBONE connections per source pod (a node proxy).
    pub hbone: Option<View>,
    /// `/map.json`: the edges of the traffic this proxy reported (OBS-6).
    pub map: Option<View>,
    pub certs: Arc<CertStore>,
    /// The node a node proxy serves (empty in a waypoint).
    pub node_name: String,
    /// The waypoint this proxy runs; `None` in a node proxy.
    pub waypoint: Option<WaypointName>,
    pub trust_domain: String,
    /// `None` when the process installed no reloadable log filter.
    pub logging: Option<LogControl>,
    pub ready: Readiness,
    /// The xDS client's state, when the proxy follows a control plane.
    pub xds: Option<crate::xds::client::SharedStatus>,
}

/// A response before it becomes HTTP.
struct Reply {
    status: StatusCode,
    content_type: &'static str,
    body: String,
}

impl Reply {
    fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self { status, content_type: "text/plain; charset=utf-8", body: body.into() }
    }

    fn json(body: String) -> Self {
        Self { status: StatusCode::OK, content_type: "application/json", body }
    }

    /// `/map` and `/map.json`, where a map is kept.
    fn map(path: &str, map: Option<&View>) -> Self {
        match (path, map) {
            ("/map", Some(_)) => {
                Self { status: StatusCode::OK, content_type: "text/html; charset=utf-8", body: MAP_PAGE.to_owned() }
            }
            (_, Some(view)) => Self::json(view()),
            (_, None) => Self::text(StatusCode::NOT_FOUND, "this proxy keeps no mesh map\n"),
        }
    }

    fn not_found(path: &str, endpoints: &[(&str, &str)]) -> Self {
        let mut body = format!("no endpoint {path}; try:\n");
        for (path, what) in endpoints {
            body.push_str(&format!("  {path:<18} {what}\n"));
        }
        Self::text(StatusCode::NOT_FOUND, body)
    }

    fn readiness(ready: &Readiness) -> Self {
        if ready.is_ready() {
            Self::text(StatusCode::OK, "ready\n")
        } else {
            Self::text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
        }
    }
}

/// Serves the admin API; `endpoints` are listed by `/server_info` with the proxy's listeners.
pub async fn serve_admin(listener: TcpListener, state: AdminState, endpoints: OperatorEndpoints) {
    let state = Arc::new(state);
    serve(listener, "admin", move |request| admin(&state, &endpoints, request)).await
}

/// Serves `/metrics` in the format the scraper asks for; the registry is read-only from here on.
/// The mesh map is served here too, where the control plane can read it (the admin port is the
/// proxy's localhost only).
pub async fn serve_metrics(listener: TcpListener, metrics: Arc<MetricsRegistry>, map: Option<View>) {
    serve(listener, "metrics", move |request| match (request.method(), request.uri().path()) {
        (&Method::GET, path @ ("/map" | "/map.json")) => Reply::map(path, map.as_ref()),
        (&Method::GET, "/metrics" | "/stats/prometheus") => {
            let accept = request.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
            let format = Exposition::negotiate(accept);
            Reply { status: StatusCode::OK, content_type: format.content_type(), body: metrics.encode(format) }
        }
        (_, "/metrics" | "/stats/prometheus") => Reply::text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n"),
        (_, path) => Reply::not_found(path, METRICS_ENDPOINTS),
    })
    .await
}

/// Serves `/healthz/ready`, for kubelet's readiness probe.
pub async fn serve_readiness(listener: TcpListener, ready: Readiness) {
    serve(listener, "readiness", move |request| match request.uri().path() {
        "/healthz/ready" => Reply::readiness(&ready),
        path => Reply::not_found(path, READINESS_ENDPOINTS),
    })
    .await
}

fn admin(state: &AdminState, endpoints: &OperatorEndpoints, request: &Request<Incoming>) -> Reply {
    let (method, path, query) = (request.method(), request.uri().path(), request.uri().query());
    let get = method == Method::GET;
    match path {
        "/logging" if get || method == Method::POST => views::logging(state.logging.as_ref(), query),
        "/map" | "/map.json" if get => Reply::map(path, state.map.as_ref()),
        "/stats" if get => Reply::text(StatusCode::OK, views::stats(state.capture.as_deref())),
        "/clusters" if get => match &state.clusters {
            Some(view) => Reply::json(view()),
            None => Reply::text(StatusCode::NOT_FOUND, "this proxy has no L7 destinations (it is a node proxy)\n"),
        },
        "/hbone" if get => match &state.hbone {
            Some(view) => Reply::json(view()),
            None => Reply::text(StatusCode::NOT_FOUND, "this proxy lists no HBONE pool (it is not a node proxy)\n"),
        },
        "/routes" if get => match &state.waypoint {
            Some(waypoint) => Reply::json(routes::routes(&state.model.current(), waypoint)),
            None => Reply::text(StatusCode::NOT_FOUND, "this proxy has no L7 routes (it is a node proxy)\n"),
        },
        "/config_dump" if get => Reply::json(views::config_dump(&state.model.current(), state.xds.as_ref())),
        "/server_info" if get => Reply::json(views::server_info(state, endpoints)),
        "/workloads" if get => {
            Reply::json(views::workloads(&state.model.current(), &state.node_name, &state.trust_domain))
        }
        "/services" if get => Reply::json(mesh::services(&state.model.current(), &state.trust_domain)),
        "/policies" if get => Reply::json(mesh::policies(&state.model.current(), &place(state))),
        "/certs" if get => {
            let all = query.is_some_and(|q| q.split('&').any(|p| matches!(p, "all" | "all=true" | "all=1")));
            let pending = if all { state.certs.pending() } else { Vec::new() };
            Reply::json(views::certs(&state.certs.held(), &pending))
        }
        "/healthz/ready" if get => Reply::readiness(&state.ready),
        _ if ADMIN_ENDPOINTS.iter().any(|(p, _)| *p == path) => {
            Reply::text(StatusCode::METHOD_NOT_ALLOWED, "only GET (and POST on /logging)\n")
        }
        _ => Reply::not_found(path, ADMIN_ENDPOINTS),
    }
}

/// Where the proxy enforces what: a node proxy for its node's workloads, a waypoint for its
/// services.
fn place(state: &AdminState) -> mesh::Place<'_> {
    match &state.waypoint {
        Some(waypoint) => mesh::Place::Waypoint(waypoint),
        None => mesh::Place::Node(&state.node_name),
    }
}

/// Accepts connections forever, answering each request with `handler`.
async fn serve<H>(listener: TcpListener, name: &'static str, handler: H)
where
    H: Fn(&Request<Incoming>) -> Reply + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                debug!("accept on the {name} endpoint failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                debug!(endpoint = name, method = %request.method(), path = request.uri().path(), "request");
                let reply = handler(&request);
                async move { Ok::<_, Infallible>(response(reply)) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                debug!("{name} connection ended: {e}");
            }
        });
    }
}

fn response(reply: Reply) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() = reply.status;
    response.headers_mut().insert(CONTENT_TYPE, http::HeaderValue::from_static(reply.content_type));
    response
}
