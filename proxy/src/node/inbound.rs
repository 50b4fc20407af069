//! Inbound: HBONE tunnels to pods of this node (CAP-2, L4-1), and the in-process hop that
//! same-node traffic takes, under the same checks.
//!
//! The TLS identity a connection is served with is the one of the pod it was addressed to (the
//! capture program keeps the original destination as the socket's local address). Each CONNECT
//! stream must target a pod of this node with that same identity; the pod is dialled from the
//! original client's IP when the client's certificate proves it owns that IP (L4-6).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use http::{Method, Response, StatusCode};
use tokio::net::TcpStream;
use tracing::debug;

use super::{
    NodeContext, copy,
    live::{Admitted, Registration},
    outbound::PROXY_PORTS,
    policy,
};
use crate::{
    admission::Pass,
    hbone::{
        self, FORWARDED,
        server::{InboundStream, refuse},
    },
    identity::Identity,
    model::{Model, Workload},
    sys,
    telemetry::{ConnectionRecord, Outcome},
};

/// Accepts one TCP connection on the HBONE port and serves its streams. `admission` holds the
/// connection's place among unauthenticated ones until the handshake is over (OPS-4).
pub async fn serve_hbone(ctx: Arc<NodeContext>, tcp: TcpStream, peer: SocketAddr, admission: Option<Pass>) {
    let Ok(local) = tcp.local_addr() else { return };
    // Frames must leave as soon as they are written: Nagle would hold a small response back
    // until the previous segment is acknowledged.
    let _ = tcp.set_nodelay(true);
    let served = {
        let model = ctx.model.current();
        model
            .workload_by_ip(local.ip())
            .filter(|w| w.captured && w.node.as_deref() == Some(ctx.node_name.as_str()))
            .cloned()
    };
    let Some(served) = served else {
        refused_connection(&ctx, peer, local, "HBONE connection to an address that is not a captured pod of this node");
        return;
    };
    let identity = served.identity(&ctx.trust_domain);
    let settings = match ctx.certs.get(&identity).await {
        Ok(s) => s,
        Err(e) => {
            refused_connection(&ctx, peer, local, &format!("no certificate to serve {identity}: {e}"));
            return;
        }
    };
    let stream_ctx = ctx.clone();
    let drain = crate::l7::drained(ctx.draining.clone());
    let result = hbone::server::serve_connection_until(
        tcp,
        peer,
        settings.server.clone(),
        admission,
        move |stream| handle_stream(stream_ctx.clone(), identity.clone(), stream),
        drain,
    )
    .await;
    match result {
        // A peer that proved no identity is counted (strait_hbone_handshake_failures_total),
        // not logged line by line: under a flood of them the lines would be the flood.
        Err(e) if e.before_identity() => debug!(%peer, %local, "HBONE handshake failed: {e}"),
        Err(e) => refused_connection(&ctx, peer, local, &e.to_string()),
        Ok(()) => {}
    }
}

fn refused_connection(ctx: &NodeContext, peer: SocketAddr, local: SocketAddr, reason: &str) {
    let mut record = ConnectionRecord::start("inbound", peer, local);
    record.security = "mutual_tls";
    record.outcome = Outcome::Refused(reason.to_owned());
    ctx.telemetry.closed(&record);
}

async fn handle_stream(ctx: Arc<NodeContext>, served: Identity, stream: InboundStream) {
    let clock = Instant::now();
    let InboundStream { request, mut respond, peer_identity, peer_addr } = stream;
    let target: Option<SocketAddr> = request.uri().authority().and_then(|a| a.as_str().parse().ok());
    let mut record = ConnectionRecord::start("inbound", peer_addr, target.unwrap_or(peer_addr));
    record.security = "mutual_tls";
    record.source_identity = Some(peer_identity.to_string());
    record.destination_identity = Some(served.to_string());
    // OBS-7: the stream's span is a child of the sender's (the CONNECT's `traceparent`).
    record.trace = ctx.telemetry.trace(|| {
        request.headers().get(hbone::TRACEPARENT).and_then(|v| crate::telemetry::TraceContext::parse(v.as_bytes()))
    });

    let model = ctx.model.current();
    let decided =
        decide_stream(&model, &ctx.node_name, &ctx.trust_domain, &served, &request, &peer_identity, peer_addr);
    if let Some(workload) = &decided.workload {
        record.destination_workload = Some(workload.clone());
    }
    if let Some(addr) = decided.client {
        record.source_addr = addr;
        record.source_workload = model.workload_by_ip(addr.ip()).cloned();
    }
    drop(model);
    // What the connection no longer needs is let go before it starts: an idle proxied
    // connection keeps only what its access line, metrics and late rejection use (OPS-1).
    drop(served);
    // Only the body (the stream's data) is needed from here on: the head's headers go now.
    let body = request.into_body();
    let client_ip = decided.client.map(|addr| addr.ip());
    let source_ip = || client_ip.unwrap_or(peer_addr.ip());
    let target = match decided.verdict {
        Ok(target) => target,
        Err((status, reason)) => {
            refuse(respond, status);
            record.outcome = Outcome::Refused(format!("{} {reason}", status.as_u16()));
            record.duration = clock.elapsed();
            ctx.telemetry.closed(&record);
            return;
        }
    };
    ctx.telemetry.opened(&mut record);

    let upstream = match dial_pod(client_ip, target).await {
        Ok(s) => s,
        Err(e) => {
            refuse(respond, StatusCode::SERVICE_UNAVAILABLE);
            record.outcome = Outcome::UpstreamConnectFailed(e.to_string());
            record.duration = clock.elapsed();
            ctx.telemetry.closed(&record);
            return;
        }
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => {
            debug!("HBONE stream reset before it was answered: {e}");
            return;
        }
    };
    let mut registration =
        ctx.live.register(Admitted { source: Some(peer_identity), source_ip: source_ip(), destination: target });
    match until_rejected(hbone::stream::copy(&upstream, send, body), &mut registration).await {
        Ok((copied, error)) => {
            // Seen from the client: what it sent went into the stream, what it received came out.
            record.bytes_sent = copied.b_to_a;
            record.bytes_received = copied.a_to_b;
            if let Some(e) = error {
                record.outcome = Outcome::Broken(e.to_string());
            }
        }
        Err(reason) => {
            // Dropping the stream unfinished resets it for the client.
            reset(&upstream);
            record.outcome = Outcome::Refused(reason);
        }
    }
    record.duration = clock.elapsed();
    ctx.telemetry.closed(&record);
}

/// What `decide_stream` found out about one CONNECT stream.
pub(crate) struct StreamDecision {
    /// The pod it reaches, once the target checked out.
    pub workload: Option<Arc<Workload>>,
    /// The original client, when the peer proved it (its own TCP source, or its `forwarded`
    /// address, owned by its identity: `hbone::client_address`).
    pub client: Option<SocketAddr>,
    /// The pod's address to dial, or the status to refuse the stream with and why.
    pub verdict: Result<SocketAddr, (StatusCode, String)>,
}

/// The decision on one CONNECT stream, before anything is dialled (pure: the fuzz targets run it
/// too): it must be a CONNECT to `ip:port` of a captured pod of this node served as `served`, and
/// L4 policy must allow the client.
pub(crate) fn decide_stream<B>(
    model: &Model,
    node: &str,
    trust_domain: &str,
    served: &Identity,
    request: &http::Request<B>,
    peer_identity: &Identity,
    peer_addr: SocketAddr,
) -> StreamDecision {
    let authority = request.uri().authority().map(|a| a.as_str()).unwrap_or_default();
    let checked = if request.method() != Method::CONNECT {
        Err((StatusCode::BAD_REQUEST, format!("method {} is not CONNECT", request.method())))
    } else if let Ok(target) = authority.parse::<SocketAddr>() {
        check_target(model, node, trust_domain, target, served).map(|w| (w, target))
    } else {
        Err((StatusCode::BAD_REQUEST, format!("CONNECT target `{authority}` is not ip:port")))
    };
    let (workload, target) = match checked {
        Ok(found) => found,
        Err(refused) => return StreamDecision { workload: None, client: None, verdict: Err(refused) },
    };
    // Never an address the peer's identity cannot prove (L4-6): see `hbone::client_address`.
    let claimed = request.headers().get(FORWARDED).and_then(|v| v.to_str().ok()).and_then(hbone::parse_forwarded_for);
    let client = hbone::client_address(claimed, peer_addr, |ip| hbone::owns_ip(model, trust_domain, ip, peer_identity));
    let source_ip = client.map_or(peer_addr.ip(), |addr| addr.ip());
    let decision = policy::authorize(model, &workload, Some(peer_identity), source_ip, target);
    let verdict = if decision.allowed { Ok(target) } else { Err((StatusCode::UNAUTHORIZED, decision.denial_reason())) };
    StreamDecision { workload: Some(workload), client, verdict }
}

/// The pod a tunnel may reach: a captured pod of this node, with the identity the connection
/// was served as, on a port that is not one of the proxy's.
pub(crate) fn check_target(
    model: &Model,
    node: &str,
    trust_domain: &str,
    target: SocketAddr,
    served: &Identity,
) -> Result<Arc<Workload>, (StatusCode, String)> {
    if PROXY_PORTS.contains(&target.port()) {
        return Err((StatusCode::BAD_REQUEST, format!("port {} is reserved for the mesh proxy", target.port())));
    }
    let workload = model
        .workload_by_ip(target.ip())
        .filter(|w| w.captured && w.node.as_deref() == Some(node))
        .ok_or_else(|| (StatusCode::BAD_REQUEST, format!("{} is not a captured pod of this node", target.ip())))?;
    if &workload.identity(trust_domain) != served {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("{} runs as {}, not as {served}", target.ip(), workload.identity(trust_domain)),
        ));
    }
    Ok(workload.clone())
}

async fn dial_pod(client_ip: Option<IpAddr>, target: SocketAddr) -> std::io::Result<TcpStream> {
    match client_ip {
        // Boxed: a step of the connection's setup, not kept in its task (see outbound).
        Some(ip) => Box::pin(sys::connect_transparent(ip, target)).await,
        None => Box::pin(sys::connect_marked(target)).await,
    }
}

/// Same-node traffic: the outbound connection is delivered to the local pod here, with the
/// checks an HBONE stream gets and an inbound access line of its own. The source's identity is
/// the one this proxy holds a certificate for and would have presented over TLS.
pub async fn deliver_local(
    ctx: &NodeContext,
    downstream: &TcpStream,
    peer: SocketAddr,
    source: &Arc<Workload>,
    target: &Arc<Workload>,
    addr: SocketAddr,
    record: &mut ConnectionRecord,
) {
    let clock = Instant::now();
    let source_identity = source.identity(&ctx.trust_domain);
    let served = target.identity(&ctx.trust_domain);
    record.destination_addr = addr;
    let mut inbound = ConnectionRecord::start("inbound", peer, addr);
    inbound.security = "mutual_tls";
    inbound.source_workload = Some(source.clone());
    inbound.source_identity = Some(source_identity.to_string());
    inbound.destination_workload = Some(target.clone());
    inbound.destination_identity = Some(served.to_string());
    ctx.telemetry.opened(&mut inbound);

    let checked = {
        let model = ctx.model.current();
        check_target(&model, &ctx.node_name, &ctx.trust_domain, addr, &served).and_then(|workload| {
            let decision = policy::authorize(&model, &workload, Some(&source_identity), peer.ip(), addr);
            if decision.allowed { Ok(workload) } else { Err((StatusCode::UNAUTHORIZED, decision.denial_reason())) }
        })
    };
    match checked {
        Err((status, reason)) => {
            let reason = format!("{} {reason}", status.as_u16());
            inbound.outcome = Outcome::Refused(reason.clone());
            record.outcome = Outcome::Refused(reason);
        }
        Ok(_) => match dial_pod(Some(peer.ip()), addr).await {
            Ok(upstream) => {
                let admitted =
                    Admitted { source: Some(source_identity.clone()), source_ip: peer.ip(), destination: addr };
                let mut registration = ctx.live.register(admitted);
                match until_rejected(copy::bidirectional(downstream, &upstream), &mut registration).await {
                    Ok((copied, error)) => {
                        for r in [&mut *record, &mut inbound] {
                            r.bytes_sent = copied.a_to_b;
                            r.bytes_received = copied.b_to_a;
                            if let Some(e) = &error {
                                r.outcome = Outcome::Broken(e.to_string());
                            }
                        }
                    }
                    Err(reason) => {
                        reset(downstream);
                        reset(&upstream);
                        inbound.outcome = Outcome::Refused(reason.clone());
                        record.outcome = Outcome::Refused(reason);
                    }
                }
            }
            Err(e) => {
                inbound.outcome = Outcome::UpstreamConnectFailed(e.to_string());
                record.outcome = Outcome::UpstreamConnectFailed(e.to_string());
            }
        },
    }
    inbound.duration = clock.elapsed();
    ctx.telemetry.closed(&inbound);
}

/// Plaintext to a captured pod from outside the mesh (CAP-2), handed over on port 15006 with
/// the pod's address as the local address. PeerAuthentication decides (L4-4): STRICT refuses,
/// PERMISSIVE and DISABLE let it through to the pod, from the client's own address.
pub async fn serve_plaintext(ctx: Arc<NodeContext>, downstream: TcpStream, peer: SocketAddr) {
    let clock = Instant::now();
    let Ok(target) = downstream.local_addr() else { return };
    let _ = downstream.set_nodelay(true);
    let mut record = ConnectionRecord::start("inbound", peer, target);
    let decision = {
        let model = ctx.model.current();
        record.source_workload = model.workload_by_ip(peer.ip()).cloned();
        match model
            .workload_by_ip(target.ip())
            .filter(|w| w.captured && w.node.as_deref() == Some(ctx.node_name.as_str()))
        {
            None => Err(format!("{} is not a captured pod of this node", target.ip())),
            Some(workload) => {
                record.destination_workload = Some(workload.clone());
                record.destination_identity = Some(workload.identity(&ctx.trust_domain).to_string());
                if PROXY_PORTS.contains(&target.port()) {
                    Err(format!("port {} is reserved for the mesh proxy", target.port()))
                } else if !policy::plaintext_allowed(&model, workload, target.port()) {
                    Err("plaintext to a STRICT workload (PeerAuthentication)".to_owned())
                } else {
                    let decision = policy::authorize(&model, workload, None, peer.ip(), target);
                    if decision.allowed { Ok(()) } else { Err(decision.denial_reason()) }
                }
            }
        }
    };
    match decision {
        Err(reason) => {
            let _ = socket2::SockRef::from(&downstream).set_linger(Some(std::time::Duration::ZERO));
            record.outcome = Outcome::Refused(reason);
        }
        Ok(()) => match dial_pod(Some(peer.ip()), target).await {
            Ok(upstream) => {
                ctx.telemetry.opened(&mut record);
                let mut registration =
                    ctx.live.register(Admitted { source: None, source_ip: peer.ip(), destination: target });
                match until_rejected(copy::bidirectional(&downstream, &upstream), &mut registration).await {
                    Ok((copied, error)) => {
                        record.bytes_sent = copied.a_to_b;
                        record.bytes_received = copied.b_to_a;
                        if let Some(e) = error {
                            record.outcome = Outcome::Broken(e.to_string());
                        }
                    }
                    Err(reason) => {
                        reset(&downstream);
                        reset(&upstream);
                        record.outcome = Outcome::Refused(reason);
                    }
                }
            }
            Err(e) => record.outcome = Outcome::UpstreamConnectFailed(e.to_string()),
        },
    }
    record.duration = clock.elapsed();
    ctx.telemetry.closed(&record);
}

/// Runs a copy until it ends or a policy change rejects the connection (`Err` with the reason).
async fn until_rejected<F, T>(copy: F, registration: &mut Registration) -> Result<T, String>
where
    F: std::future::Future<Output = T>,
{
    tokio::select! {
        done = copy => Ok(done),
        Ok(reason) = &mut registration.rejected => Err(reason),
    }
}

/// Makes the socket's close an RST, so the peer sees the connection cut, not finished.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{config::parse_file, model::compile};

    const TD: &str = "cluster.local";

    /// `server` (10.1.0.10) on n1 admits only 10.1.1.11 by `ipBlocks`; `p11` (10.1.1.11) and
    /// `p12` (10.1.1.12) run as `client`, `other` (10.1.1.13) as `other`.
    fn model() -> Model {
        let pod = |name: &str, account: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{app: {name}}}\n\
                 spec:\n  nodeName: n1\n  serviceAccountName: {account}\nstatus:\n  podIP: {ip}\n---\n"
            )
        };
        let yaml = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {{istio.io/dataplane-mode: ambient}}\n---\n\
             {}{}{}{}\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p11-only\n  namespace: shop\nspec:\n  \
             selector:\n    matchLabels: {{app: server}}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        ipBlocks: [10.1.1.11/32]\n",
            pod("server", "server", "10.1.0.10"),
            pod("p11", "client", "10.1.1.11"),
            pod("p12", "client", "10.1.1.12"),
            pod("other", "other", "10.1.1.13"),
        );
        let (resources, d) = parse_file(Path::new("t.yaml"), &yaml);
        assert!(d.is_empty(), "{d:?}");
        let (m, d) = compile(&resources);
        assert!(d.iter().all(|d| !d.is_error()), "{d:?}");
        m
    }

    /// The client `decide_stream` names and whether policy admits it, for a stream to the server
    /// from a peer proving `client`'s identity at TCP source `peer`, claiming `forwarded`.
    fn decide(model: &Model, peer: &str, forwarded: Option<&str>) -> (Option<String>, bool) {
        let mut request = http::Request::builder().method(Method::CONNECT).uri("10.1.0.10:8080");
        if let Some(f) = forwarded {
            request = request.header(FORWARDED, f);
        }
        let request = request.body(()).expect("request");
        let served = Identity::new(TD, "shop", "server");
        let peer_identity = Identity::new(TD, "shop", "client");
        let peer = peer.parse().expect("peer");
        let decided = decide_stream(model, "n1", TD, &served, &request, &peer_identity, peer);
        assert!(decided.workload.is_some(), "the target checks out");
        (decided.client.map(|c| c.to_string()), decided.verdict.is_ok())
    }

    // L4-6: the client is an address the peer's identity owns, the TCP source first; policy
    // (`ipBlocks`) sees that address.
    #[test]
    fn decide_stream_takes_the_client_the_peer_proves() {
        let m = model();
        let client = |c: &str| Some(c.to_owned());
        // TCP source owned (a peer dialling from the client pod): the client, keeping the
        // `forwarded` port when it names the same pod.
        assert_eq!(decide(&m, "10.1.1.11:40000", None), (client("10.1.1.11:40000"), true));
        assert_eq!(decide(&m, "10.1.1.11:40000", Some("for=\"10.1.1.11:3456\"")), (client("10.1.1.11:3456"), true));
        assert_eq!(decide(&m, "10.1.1.12:40000", None), (client("10.1.1.12:40000"), false));
        // Only `forwarded` owned (a peer dialling from its node's address): today's rule.
        assert_eq!(decide(&m, "10.200.0.1:50000", Some("for=\"10.1.1.11:3456\"")), (client("10.1.1.11:3456"), true));
        assert_eq!(decide(&m, "10.200.0.1:50000", Some("for=10.1.1.12")), (client("10.1.1.12:0"), false));
        // Both owned and different: the TCP source wins, so p12 cannot pass as p11.
        assert_eq!(decide(&m, "10.1.1.12:40000", Some("for=\"10.1.1.11:3456\"")), (client("10.1.1.12:40000"), false));
        // Neither owned (`other` is another identity's pod): no client; policy sees the TCP
        // source, which no rule admits.
        assert_eq!(decide(&m, "10.200.0.1:50000", Some("for=10.1.1.13")), (None, false));
        assert_eq!(decide(&m, "10.200.0.1:50000", None), (None, false));
    }
}
