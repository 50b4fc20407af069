//! The stream targets: a peer's bytes as one HBONE connection after the TLS handshake (at the
//! node proxy or at the waypoint), or as one HTTP connection into the L7 engine, over an
//! in-memory pipe. The first byte of an input says who the peer is and where it connects.

use std::{future::pending, sync::Arc, time::Duration};

use http::Response;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

use super::{
    mesh::{self, NODE, Peer, TRUST_DOMAIN},
    run,
};
use crate::{
    hbone::{
        H2Stream,
        server::{InboundStream, refuse, serve_streams},
    },
    l7::{Downstream, HttpVersion, Target, serve_http},
    model::Model,
    node::inbound::decide_stream,
    waypoint::{
        inbound::handle_stream,
        sniff::{Sniffed, sniff},
    },
};

/// The in-memory pipe's buffer each way: a typical socket buffer's size, so writes of a few
/// frames never wait for the reader.
const PIPE_BUFFER: usize = 64 * 1024;

/// How long the peer waits, once it has sent everything, before it ends its side: longer than
/// any timer the proxy sets for one request (a mirror gives up after 30 s), so every answer is
/// complete. The clock is paused: this costs no real time.
const PEER_QUIET: Duration = Duration::from_secs(60);

/// Which proxy serves a fuzzed HBONE connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HboneSide {
    /// The node proxy of the `reviews` pods: its checks of a CONNECT stream (target, claimed
    /// client address, L4 policy), and an echo in place of the pod.
    Node,
    /// The waypoint, whole: target, protocol detection, then HTTP into the L7 engine or TCP.
    Waypoint,
}

/// What the first byte of an HBONE input chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HboneSetup {
    pub side: HboneSide,
    pub peer: Peer,
}

impl HboneSetup {
    pub fn from_byte(byte: u8) -> Self {
        let side = if byte & 1 == 0 { HboneSide::Node } else { HboneSide::Waypoint };
        Self { side, peer: Peer::ALL[usize::from(byte >> 1) % Peer::ALL.len()] }
    }

    pub fn to_byte(self) -> u8 {
        let peer = Peer::ALL.iter().position(|p| *p == self.peer).unwrap_or(0) as u8;
        peer << 1 | u8::from(self.side == HboneSide::Waypoint)
    }
}

/// HBONE after the handshake (L4-1): `[setup byte] [HTTP/2 from the peer...]`.
pub fn hbone(data: &[u8]) {
    let Some((&first, bytes)) = data.split_first() else { return };
    let setup = HboneSetup::from_byte(first);
    mesh::mesh();
    run(async move {
        let (client, server) = tokio::io::duplex(PIPE_BUFFER);
        tokio::join!(peer(client, bytes), serve_hbone(server, setup));
    });
}

/// Serves one HBONE connection from `setup.peer` on `io`, as `setup.side` would.
pub async fn serve_hbone<I>(io: I, setup: HboneSetup)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let (identity, addr) = (setup.peer.identity(), setup.peer.addr());
    // Errors end the connection, as they do in the proxy; a panic is what the fuzzer looks for.
    let _ = match setup.side {
        HboneSide::Node => {
            let model = mesh::mesh().model.clone();
            serve_streams(io, identity, addr, move |stream| node_stream(model.current(), stream), pending()).await
        }
        HboneSide::Waypoint => {
            let ctx = mesh::waypoint_context();
            serve_streams(io, identity, addr, move |stream| handle_stream(ctx.clone(), stream), pending()).await
        }
    };
}

/// A CONNECT stream at the node proxy, checked as `node::inbound` checks it; the pod it reaches
/// echoes what it receives.
async fn node_stream(model: Arc<Model>, stream: InboundStream) {
    let InboundStream { request, respond, peer_identity, peer_addr } = stream;
    let served = Peer::Reviews.identity();
    let decided = decide_stream(&model, NODE, TRUST_DOMAIN, &served, &request, &peer_identity, peer_addr);
    if let Err((status, _)) = decided.verdict {
        return refuse(respond, status);
    }
    let mut respond = respond;
    let Ok(send) = respond.send_response(Response::new(()), false) else { return };
    let (mut from_peer, mut to_peer) = tokio::io::split(H2Stream::new(send, request.into_body()));
    let _ = tokio::io::copy(&mut from_peer, &mut to_peer).await;
    let _ = to_peer.shutdown().await;
}

/// The destinations of the L7 target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L7Target {
    /// `reviews:9080`, declared `http`: VirtualService, DestinationRule, JWT and L7 policy.
    Reviews,
    /// `ratings:9090`, declared `grpc`.
    RatingsGrpc,
    /// `ratings:7000`, undeclared: HTTP detected from the first bytes.
    RatingsOther,
}

/// What the first byte of an L7 input chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L7Setup {
    pub target: L7Target,
    pub peer: Peer,
}

const L7_TARGETS: [L7Target; 3] = [L7Target::Reviews, L7Target::RatingsGrpc, L7Target::RatingsOther];

impl L7Setup {
    pub fn from_byte(byte: u8) -> Self {
        let byte = usize::from(byte);
        let target = L7_TARGETS[byte % L7_TARGETS.len()];
        Self { target, peer: Peer::ALL[byte / L7_TARGETS.len() % Peer::ALL.len()] }
    }

    pub fn to_byte(self) -> u8 {
        let target = L7_TARGETS.iter().position(|t| *t == self.target).unwrap_or(0);
        let peer = Peer::ALL.iter().position(|p| *p == self.peer).unwrap_or(0);
        (peer * L7_TARGETS.len() + target) as u8
    }
}

/// The L7 engine (L7-1 to L7-11): `[setup byte] [HTTP/1.1, or HTTP/2 with prior knowledge]`,
/// told apart as the waypoint tells them.
pub fn l7_http(data: &[u8]) {
    let Some((&first, bytes)) = data.split_first() else { return };
    let setup = L7Setup::from_byte(first);
    let version = if sniff(bytes) == Sniffed::Http2 { HttpVersion::Http2 } else { HttpVersion::Http1 };
    mesh::mesh();
    run(async move {
        let (client, server) = tokio::io::duplex(PIPE_BUFFER);
        tokio::join!(peer(client, bytes), serve_l7(server, setup, version));
    });
}

/// Serves one HTTP connection from `setup.peer` to `setup.target` on `io`, as the waypoint does
/// inside an HBONE stream.
pub async fn serve_l7<I>(io: I, setup: L7Setup, version: HttpVersion)
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let model = mesh::mesh().model.current();
    let (host, port) = match setup.target {
        L7Target::Reviews => ("reviews.shop.svc.cluster.local", 9080),
        L7Target::RatingsGrpc => ("ratings.shop.svc.cluster.local", 9090),
        L7Target::RatingsOther => ("ratings.shop.svc.cluster.local", 7000),
    };
    let Some(service) = model.service_by_host(host).cloned() else { return };
    let Some(protocol) = service.port(port).map(|p| p.protocol) else { return };
    let down = Downstream {
        client_addr: setup.peer.addr(),
        identity: Some(setup.peer.identity()),
        source_workload: model.workload_by_ip(setup.peer.addr().ip()).cloned(),
        target: Target::Service { service, port },
        protocol,
        tunnel_trace: None,
    };
    serve_http(mesh::l7_context(), Arc::new(down), io, version, false).await;
}

/// The peer: sends `bytes`, waits for the answers, then ends its side; it reads (and drops) all
/// it is sent.
async fn peer(io: DuplexStream, bytes: &[u8]) {
    let (mut from_proxy, mut to_proxy) = tokio::io::split(io);
    let send = async {
        let _ = to_proxy.write_all(bytes).await;
        // An HTTP/1.1 server drops the requests in flight when its client half-closes.
        tokio::time::sleep(PEER_QUIET).await;
        let _ = to_proxy.shutdown().await;
    };
    let receive = async {
        let mut buffer = vec![0; PIPE_BUFFER];
        while matches!(from_proxy.read(&mut buffer).await, Ok(n) if n > 0) {}
    };
    tokio::join!(send, receive);
}
