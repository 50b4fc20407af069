//! `strait gateway`: an ingress or egress gateway (GW-1, GW-2), the waypoint's L7 engine
//! (`waypoint::Engine`) behind the listeners of the Istio Gateways whose `selector` matches
//! `--labels`. One listener per server port (`--port-map` moves them, as Istio's charts map
//! 80 to 8080): HTTP ports serve HTTP/1.1 and h2c; TLS ports read the ClientHello and, by SNI,
//! terminate (SIMPLE, MUTUAL) then serve HTTP, or pass the bytes through to the `tls[]` route's
//! destination (PASSTHROUGH); TCP ports splice to the `tcp[]` route. An HBONE listener on
//! 15008 (peer identity verified) serves a CONNECT stream whose port is a server port (or its
//! mapped port) as a connection on that listener: node proxies reach gateway pods labelled
//! `strait.io/gateway` this way (two-hop egress).

mod io;
pub(crate) mod tls;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use http::{Response, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _},
    sync::watch,
};
use tracing::{debug, info, warn};

use crate::{
    admission::{self, Gate},
    hbone::{H2Stream, server::InboundStream, server::refuse},
    identity::{Identity, credentials::Credentials},
    l7::{
        Downstream, HttpVersion, Target, choose_weighted, serve_http,
        upstream::{ClusterKey, UpstreamIo},
    },
    model::{
        AppProtocol, ModelHandle,
        gateways::{GatewayView, PortKind},
        routes::WeightedDestination,
    },
    telemetry::{ConnectionRecord, Outcome, Reporter},
    waypoint::{Engine, WaypointContext, WaypointOptions, sniff},
};

/// Command-line settings of `strait gateway`.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Identity, configuration, operator endpoints, limits: as a waypoint's (`name` is the
    /// gateway's name, used for its identity's default service account and in logs).
    pub base: WaypointOptions,
    /// The gateway pods' labels: Gateways whose selector they satisfy are served.
    pub labels: BTreeMap<String, String>,
    /// Server port -> port listened on.
    pub port_map: BTreeMap<u16, u16>,
    /// Where `credentialName`s are (`<name>/tls.crt|tls.key|ca.crt`, `<name>-cacert/ca.crt`).
    pub credentials: Option<PathBuf>,
    /// Listen on 15008 for HBONE.
    pub hbone: bool,
}

/// A client that does not complete its first flight (ClientHello, request head) within this
/// is dropped: it holds a descriptor and a task.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

struct Gateway {
    wp: Arc<WaypointContext>,
    view: watch::Receiver<Arc<GatewayView>>,
    configs: tls::ServerConfigs,
    port_map: BTreeMap<u16, u16>,
}

impl Gateway {
    fn listen_port(&self, port: u16) -> u16 {
        self.port_map.get(&port).copied().unwrap_or(port)
    }

    /// The server port a CONNECT port names: a server port itself, or the port it is mapped to.
    fn server_port(&self, connect_port: u16) -> Option<u16> {
        let view = self.view.borrow();
        if view.ports.contains_key(&connect_port) {
            return Some(connect_port);
        }
        view.ports.keys().copied().find(|p| self.listen_port(*p) == connect_port)
    }
}

pub async fn run(options: GatewayOptions) -> anyhow::Result<()> {
    let base = &options.base;
    let engine = Engine::start(base, Reporter::Source, format!("{}/{}", base.namespace, base.name)).await?;
    let (view_tx, view) = watch::channel(Arc::new(GatewayView::build(&engine.ctx.model.current(), &options.labels)));
    tokio::spawn(follow_view(engine.ctx.model.clone(), options.labels.clone(), view_tx));
    let gw = Arc::new(Gateway {
        wp: engine.ctx.clone(),
        view,
        configs: tls::ServerConfigs::new(Credentials::new(options.credentials.clone())),
        port_map: options.port_map.clone(),
    });
    let (stop_accepting, accepting) = watch::channel(false);
    if gw.view.borrow().ports.is_empty() {
        warn!("no Gateway selects labels {:?}: nothing to serve until one does", options.labels);
    }
    let clients = engine.clients.clone();
    let mut accepts = vec![tokio::spawn(keep_listeners(gw.clone(), clients, accepting.clone()))];
    if options.hbone {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, strait_ebpf_common::HBONE_PORT));
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen for HBONE on {addr}"))?;
        let gw = gw.clone();
        accepts.push(engine.serve_hbone(listener, accepting, move |_, stream| hbone_stream(gw.clone(), stream)));
    }
    engine.ready.set_ready();
    info!(
        gateway = %engine.ctx.name, identity = %engine.identity,
        "strait gateway ready (open-file limit {})", engine.fd_limit
    );
    engine.run_until_signal(stop_accepting, accepts, base.drain_timeout).await
}

/// Keeps one listener open per server port of the view (GW-1): Gateways applied after the
/// gateway started, or given new ports, are served without a restart, as an Envoy gateway's
/// listeners follow istiod; a port no Gateway serves any more stops accepting (its open
/// connections finish). A port that cannot be bound is retried every few seconds. Ends, with
/// every listener, when `accepting` turns true.
async fn keep_listeners(gw: Arc<Gateway>, clients: Option<Arc<Gate>>, mut accepting: watch::Receiver<bool>) {
    const RETRY_BIND: Duration = Duration::from_secs(3);
    let mut open: BTreeMap<u16, watch::Sender<bool>> = BTreeMap::new();
    let mut view = gw.view.clone();
    loop {
        let ports: BTreeMap<u16, PortKind> = view.borrow_and_update().ports.iter().map(|(p, s)| (*p, s.kind)).collect();
        open.retain(|port, stop| {
            let keep = ports.contains_key(port);
            if !keep {
                let _ = stop.send(true);
                info!(port, "gateway listener closed: no Gateway serves the port any more");
            }
            keep
        });
        let mut unbound = false;
        let new: Vec<(u16, PortKind)> = ports.into_iter().filter(|(p, _)| !open.contains_key(p)).collect();
        for (port, kind) in new {
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, gw.listen_port(port)));
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => listener,
                Err(e) => {
                    warn!(port, "cannot listen on {addr}: {e}; retrying in {RETRY_BIND:?}");
                    unbound = true;
                    continue;
                }
            };
            info!(port, listen = addr.port(), ?kind, "gateway listener");
            let (stop_tx, stop) = watch::channel(false);
            open.insert(port, stop_tx);
            let (gw, clients) = (gw.clone(), clients.clone());
            tokio::spawn(async move {
                admission::accept_loop("gateway", &listener, clients.as_ref(), stop, |stream, peer, pass| {
                    let _ = stream.set_nodelay(true);
                    let gw = gw.clone();
                    tokio::spawn(async move {
                        // The client's place in the gate is held for the connection's life.
                        let _pass = pass;
                        serve(gw, port, stream, peer, None).await;
                    });
                })
                .await;
            });
        }
        tokio::select! {
            changed = view.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(RETRY_BIND), if unbound => {}
            _ = accepting.wait_for(|stop| *stop) => break,
        }
    }
    for stop in open.values() {
        let _ = stop.send(true);
    }
}

/// Keeps the view in step with the configuration.
async fn follow_view(mut model: ModelHandle, labels: BTreeMap<String, String>, tx: watch::Sender<Arc<GatewayView>>) {
    while model.changed().await {
        let _ = tx.send(Arc::new(GatewayView::build(&model.current(), &labels)));
    }
}

/// One client connection (or HBONE stream) on server port `port`.
async fn serve<I>(gw: Arc<Gateway>, port: u16, mut io: I, client: SocketAddr, identity: Option<Identity>)
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let _active = crate::waypoint::ActiveStream::new(&gw.wp.active_streams);
    let kind = gw.view.borrow().ports.get(&port).map(|s| s.kind);
    let down = |protocol| Downstream {
        client_addr: client,
        identity: identity.clone(),
        source_workload: gw.wp.model.current().workload_by_ip(client.ip()).cloned(),
        target: Target::Gateway { port, view: gw.view.clone(), server: None },
        protocol,
        tunnel_trace: None,
    };
    match kind {
        Some(PortKind::Http) => {
            let Some((version, first)) = detect_http(&mut io).await else { return };
            let io = io::Prefixed::new(first, io);
            serve_http(gw.wp.l7.clone(), Arc::new(down(AppProtocol::Http)), io, version, true).await;
        }
        Some(PortKind::Tls) => serve_tls(&gw, port, io, down(AppProtocol::Http)).await,
        Some(PortKind::Tcp) => {
            let route = gw.view.borrow().tcp_route(port);
            let Some((_, vs, i)) = route else {
                debug!(port, %client, "no tcp route: closing");
                return;
            };
            splice(&gw, port, &vs.tcp[i].destinations, Vec::new(), io, &down(AppProtocol::Tcp), None).await;
        }
        None => debug!(port, "port no longer served: closing"),
    }
}

/// Reads the first bytes to tell HTTP/1.1 from h2c; `None` when the client sends neither.
async fn detect_http<I: AsyncRead + Unpin>(io: &mut I) -> Option<(HttpVersion, Vec<u8>)> {
    use tokio::io::AsyncReadExt as _;
    let mut seen = Vec::new();
    let mut chunk = [0u8; 1024];
    let deadline = Instant::now() + FIRST_BYTES_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline.into(), io.read(&mut chunk)).await.ok()?.ok()?;
        if n == 0 {
            return None;
        }
        seen.extend_from_slice(&chunk[..n]);
        match sniff::sniff(&seen) {
            sniff::Sniffed::Http1 => return Some((HttpVersion::Http1, seen)),
            sniff::Sniffed::Http2 => return Some((HttpVersion::Http2, seen)),
            // hyper answers what it cannot parse with 400.
            sniff::Sniffed::Opaque => return Some((HttpVersion::Http1, seen)),
            sniff::Sniffed::NeedMore => continue,
        }
    }
}

async fn serve_tls<I>(gw: &Arc<Gateway>, port: u16, mut io: I, mut down: Downstream)
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let hello = match tokio::time::timeout(FIRST_BYTES_TIMEOUT, tls::read_client_hello(&mut io)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(e)) => return debug!(client = %down.client_addr, "TLS: {e}"),
        Err(_) => return debug!(client = %down.client_addr, "TLS: no ClientHello in time"),
    };
    let view = gw.view.borrow().clone();
    let Some(server) = view.tls_server(port, hello.sni.as_deref()) else {
        return debug!(client = %down.client_addr, sni = ?hello.sni, port, "TLS: no server for this SNI: closing");
    };
    let terminates = server.server().tls.as_ref().is_some_and(|t| t.terminates());
    if !terminates {
        let sni = hello.sni.clone().unwrap_or_default();
        let Some((vs, i)) = view.tls_route(server, port, &sni) else {
            return debug!(client = %down.client_addr, sni, "TLS passthrough: no tls route matches: closing");
        };
        return splice(gw, port, &vs.tls[i].destinations, hello.bytes, io, &down, Some(sni)).await;
    }
    let config = match gw.configs.get(server) {
        Ok(config) => config,
        Err(e) => return warn!(gateway = %server.gateway, port, "cannot serve TLS: {e}"),
    };
    // Requests on this connection are routed among this server's VirtualServices only.
    if let Target::Gateway { server: chosen, .. } = &mut down.target {
        *chosen = Some(server.id());
    }
    drop(view);
    // The rest of the handshake gets the same time as the ClientHello: a client that stalls
    // mid-handshake must not hold its connection and task (OPS-4).
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(io::Prefixed::new(hello.bytes, io));
    let stream = match tokio::time::timeout(FIRST_BYTES_TIMEOUT, accept).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return debug!(client = %down.client_addr, "TLS handshake failed: {e}"),
        Err(_) => return debug!(client = %down.client_addr, "TLS handshake not finished in time: closing"),
    };
    let version = match stream.get_ref().1.alpn_protocol() {
        Some(b"h2") => HttpVersion::Http2,
        _ => HttpVersion::Http1,
    };
    serve_http(gw.wp.l7.clone(), Arc::new(down), stream, version, false).await;
}

/// Splices the client (after `first`, bytes already read) to a destination of a `tcp[]` or
/// `tls[]` route: over HBONE to mesh endpoints, plain TCP otherwise (the waypoint's connector).
/// The access line names the route's service, the SNI of a `tls[]` route and, over HBONE,
/// the endpoint's identity.
async fn splice<I>(
    gw: &Arc<Gateway>,
    port: u16,
    destinations: &[WeightedDestination],
    first: Vec<u8>,
    mut client: I,
    down: &Downstream,
    sni: Option<String>,
) where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let started = Instant::now();
    let client_addr = down.client_addr;
    let mut record = ConnectionRecord::start("gateway", client_addr, client_addr);
    record.source_workload = down.source_workload.clone();
    record.source_identity = down.identity.as_ref().map(ToString::to_string);
    let what = if sni.is_some() { "tls" } else { "tcp" };
    record.server_name = sni;
    let model = gw.wp.model.current();
    let outcome: Result<(UpstreamIo, ClusterKey), String> = async {
        let chosen = choose_weighted(destinations).ok_or("no destination with weight")?;
        let key = ClusterKey::of(&model, &chosen.destination, port);
        record.destination_service = model.service_by_host(&key.host).cloned();
        let cluster = gw.wp.l7.upstreams.cluster(&model, &key).map_err(|e| e.to_string())?;
        let endpoint = cluster.pick(None, Instant::now()).cloned().ok_or(format!("no endpoint of {}", key.name()))?;
        record.destination_addr = endpoint.addr;
        record.destination_workload = Some(endpoint.workload.clone());
        if endpoint.workload.reached_over_hbone() {
            record.security = "mutual_tls";
            record.destination_identity = Some(endpoint.workload.identity(&gw.wp.trust_domain).to_string());
        }
        let io = gw
            .wp
            .l7
            .upstreams
            .connector
            .open(&endpoint, client_addr.ip(), None, None)
            .await
            .map_err(|e| e.to_string())?;
        Ok((io, key))
    }
    .await;
    drop(model);
    match outcome {
        Ok((mut upstream, key)) => {
            debug!(what, cluster = %key.name(), "splicing");
            let result = async {
                upstream.write_all(&first).await?;
                tokio::io::copy_bidirectional(&mut client, &mut upstream).await
            }
            .await;
            match result {
                Ok((sent, received)) => {
                    record.bytes_sent = sent + first.len() as u64;
                    record.bytes_received = received;
                }
                Err(e) => record.outcome = Outcome::Broken(e.to_string()),
            }
        }
        Err(reason) => {
            let _ = client.shutdown().await;
            record.outcome = Outcome::UpstreamConnectFailed(reason);
        }
    }
    record.duration = started.elapsed();
    gw.wp.telemetry.closed(&record);
}

/// A CONNECT stream on 15008: served as a connection on the server port it names.
async fn hbone_stream(gw: Arc<Gateway>, stream: InboundStream) {
    let InboundStream { request, mut respond, peer_identity, peer_addr } = stream;
    let target = request.uri().authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok());
    let port = match target {
        Some(addr) if request.method() == http::Method::CONNECT => gw.server_port(addr.port()),
        _ => None,
    };
    let Some(port) = port else {
        debug!(%peer_addr, ?target, "HBONE stream to no server port of this gateway: 400");
        return refuse(respond, StatusCode::BAD_REQUEST);
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => return debug!("HBONE stream reset before it was answered: {e}"),
    };
    let io = H2Stream::new(send, request.into_body());
    serve(gw, port, io, peer_addr, Some(peer_identity)).await;
}
