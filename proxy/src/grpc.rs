//! Just enough gRPC transport for Istio's APIs: tonic's generated clients and servers run over
//! hyper's HTTP/2 connections that strait sets up itself (TCP, then rustls).
//!
//! tonic's own transport would bring tower's balancing and buffering layers, axum and
//! hyper-util's pooled client, all for one connection to one address; this module is the part
//! of it strait needs: the CA API (ID-2) now, delta xDS (CFG-2, CFG-3) next. TLS setup,
//! including ALPN `h2` (grpc-go peers such as istiod refuse connections without it), stays with
//! the caller.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use hyper::{
    body::Incoming,
    client::conn::http2::SendRequest,
    rt::{Read, Write},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::{body::Body, codegen::Service};
use tracing::debug;

/// Serves one gRPC service on one established (already TLS-wrapped) connection until the peer
/// goes away.
pub async fn serve_connection<IO, S>(io: IO, service: S) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<http::Request<Incoming>, Response = http::Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let service = service_fn(move |request| {
        // Generated tonic servers are cheap clones (an Arc inside); `call` needs `&mut`.
        let mut service = service.clone();
        async move { service.call(request).await }
    });
    hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(io), service).await
}

/// A gRPC channel over one HTTP/2 connection; clones share the connection.
#[derive(Clone)]
pub struct H2Channel(SendRequest<Body>);

impl H2Channel {
    /// Runs the HTTP/2 handshake on an established connection and drives the connection in a
    /// background task, which ends when the peer or every clone of the channel goes away.
    pub async fn handshake<IO>(io: IO) -> Result<Self, hyper::Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        TokioIo<IO>: Read + Write,
    {
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!("gRPC connection ended: {e}");
            }
        });
        Ok(Self(sender))
    }

    /// True once the connection is gone: callers should connect again.
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

impl Service<http::Request<Body>> for H2Channel {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}
