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

/// Where a gRPC client over TLS connects, from an address as users write it
/// (`[https://]host[:port]`).
#[derive(Debug, Clone)]
pub struct TlsEndpoint {
    /// `host:port`, to dial.
    pub authority: String,
    /// `https://host:port`, the origin of the requests.
    pub origin: http::Uri,
    /// The name to verify in the server's certificate: `server_name`, else the host (IPv6
    /// without the URI's brackets, as certificates name it).
    pub server_name: rustls::pki_types::ServerName<'static>,
}

impl TlsEndpoint {
    /// Parses `address`; `what` names the service in messages ("the CA API", "xDS").
    pub fn parse(address: &str, default_port: u16, server_name: Option<&str>, what: &str) -> Result<Self, String> {
        let with_scheme = if address.contains("://") { address.to_owned() } else { format!("https://{address}") };
        let uri: http::Uri = with_scheme.parse().map_err(|e| format!("not [https://]host[:port]: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("{what} is only spoken over TLS: use https://"));
        }
        let host = uri.host().ok_or("no host in the address")?;
        let authority = format!("{host}:{}", uri.port_u16().unwrap_or(default_port));
        let origin = format!("https://{authority}").parse().map_err(|e| format!("not [https://]host[:port]: {e}"))?;
        let name =
            server_name.map_or_else(|| host.trim_start_matches('[').trim_end_matches(']').to_owned(), str::to_owned);
        let server_name = rustls::pki_types::ServerName::try_from(name.clone())
            .map_err(|_| format!("`{name}` is not a valid TLS server name"))?;
        Ok(Self { authority, origin, server_name })
    }
}
