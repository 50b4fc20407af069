//! The control plane's one TLS port (CFG-3), like istiod's 15012: delta ADS and the CA API side
//! by side, told apart by the gRPC path. Client certificates are optional (a proxy bootstrapping
//! with a token has none yet) and, when presented, must chain to the mesh root; the caller they
//! name travels with every request of the connection.

use std::{convert::Infallible, future::Future, net::IpAddr, pin::Pin, sync::Arc, task::Poll, time::Duration};

use http::{Request, Response};
use hyper::body::Incoming;
use rustls::{RootCertStore, crypto::ring, server::WebPkiClientVerifier};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tonic::{body::Body, codegen::Service};
use tracing::{debug, info, warn};

use crate::identity::{
    ALPN_H2, IdentityError, LocalCa, NodeAccounts, PeerCertificate, caller::caller_of_certificate,
    caserver::serving_cert,
};

/// A client that connects but never finishes its TLS handshake gives up its slot after this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// gRPC services by path prefix (`/package.Service/`).
pub type Routes = Vec<(&'static str, GrpcService)>;

/// TLS settings of the port: certified by the mesh CA for `ips` and strait's endpoint names;
/// client certificates optional, verified against the mesh roots.
pub fn server_tls(ca: Arc<LocalCa>, ips: Vec<IpAddr>) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
    let provider = Arc::new(ring::default_provider());
    let mut roots = RootCertStore::empty();
    for root in ca.roots() {
        roots.add(root.clone()).map_err(|e| IdentityError::Tls(e.to_string()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| IdentityError::Tls(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(serving_cert(ca, ips)?);
    tls.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(tls))
}

/// Serves `routes` on `listener` until dropped. A client certificate naming a node is believed
/// for `node_accounts` only.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, routes: Routes, node_accounts: NodeAccounts) {
    let acceptor = TlsAcceptor::from(tls);
    let routes: Arc<Routes> = Arc::new(routes);
    let node_accounts = Arc::new(node_accounts);
    if let Ok(addr) = listener.local_addr() {
        info!("control plane listening on {addr} (delta ADS and the CA API)");
    }
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors and the like: pass, rather than spin or stop serving.
                warn!("control plane: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, routes, node_accounts) = (acceptor.clone(), routes.clone(), node_accounts.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return debug!("control plane: TLS handshake with {peer} failed: {e}"),
                Err(_) => return debug!("control plane: TLS handshake with {peer} timed out"),
            };
            let caller = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                None => None,
                Some(leaf) => match caller_of_certificate(leaf, &node_accounts) {
                    Ok(caller) => Some(PeerCertificate(caller)),
                    Err(e) => return warn!("control plane: refused {peer}: {e}"),
                },
            };
            let router = Router { routes, caller, peer };
            if let Err(e) = crate::grpc::serve_connection(tls, router).await {
                debug!("control plane: connection from {peer} ended: {e}");
            }
        });
    }
}

/// Dispatches by path and hands each request the connection's verified caller.
#[derive(Clone)]
struct Router {
    routes: Arc<Routes>,
    caller: Option<PeerCertificate>,
    peer: std::net::SocketAddr,
}

impl Service<Request<Incoming>> for Router {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = CallFuture;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        if let Some(caller) = &self.caller {
            request.extensions_mut().insert(caller.clone());
        }
        request.extensions_mut().insert(crate::xds::server::PeerAddr(self.peer));
        let path = request.uri().path();
        match self.routes.iter().find(|(prefix, _)| path.starts_with(prefix)) {
            Some((_, service)) => service.call(request),
            None => {
                let status = tonic::Status::unimplemented(format!("no service at {path} on this control plane"));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

type CallFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// A generated tonic server, type-erased so that several can share one router.
pub struct GrpcService(Box<dyn Fn(Request<Incoming>) -> CallFuture + Send + Sync>);

impl GrpcService {
    /// Wraps a generated tonic server (cloned per call: an `Arc` inside).
    pub fn new<S>(service: S) -> Self
    where
        S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        Self(Box::new(move |request| {
            let mut service = service.clone();
            Box::pin(async move { service.call(request).await })
        }))
    }

    fn call(&self, request: Request<Incoming>) -> CallFuture {
        (self.0)(request)
    }
}
