//! Istio's CA API served by strait (ID-2, CFG-3): `istio.v1.auth.IstioCertificateService/
//! CreateCertificate` over gRPC on TLS, signing with the built-in [`LocalCa`].
//!
//! Any Istio node agent (ztunnel, or strait's own [`IstioCaClient`](super::IstioCaClient)) can get
//! workload certificates here. Who may have which identity is a [`CaPolicy`]:
//! - [`SharedToken`] (a node proxy's `--ca-listen`): one bearer token; its holders ask in node
//!   mode (`ImpersonatedIdentity` metadata) for any identity of the trust domain. Without a
//!   token configured nobody is authenticated and every request is refused.
//! - [`CallerPolicy`] (`strait control`): what istiod allows. The caller is authenticated (see
//!   `caller`) and gets its own identity, or, a node proxy, the identities of the pods scheduled
//!   on its node; nothing else.
//!
//! The CSR contributes its public key only.

use std::{
    net::IpAddr,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{
    crypto::ring,
    pki_types::PrivateKeyDer,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use strait_proto::{
    istio::v1::auth::{
        IstioCertificateRequest, IstioCertificateResponse,
        istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer},
    },
    prost_types::value::Kind,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use super::{
    Identity, IdentityError, LocalCa,
    ca::to_pem,
    caller::{Authenticate, Caller},
    tls::ALPN_H2,
};

/// The metadata key node agents put the requested identity under (ztunnel's caclient.rs).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// DNS names of the CA endpoint's certificate: istiod's service name, so clients configured for
/// istiod verify strait's CA unchanged, and strait's own.
pub const CA_SERVER_NAMES: [&str; 2] = ["istiod.istio-system.svc", "strait-ca"];
/// Lifetime of the CA endpoint's own certificate; it is renewed at half life.
const SERVING_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// A client that connects but never finishes its TLS handshake gives up its slot after this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How the CA endpoint decides who gets what.
#[derive(Clone)]
pub struct CaServerOptions {
    /// Callers must send `authorization: Bearer <token>`. Only such callers may impersonate
    /// workloads, so with `None` every request is refused.
    pub token: Option<String>,
    /// Lifetime when the request names none (`validity_duration` 0).
    pub default_ttl: Duration,
    /// Longer requests are shortened to this rather than refused, so a client asking too much
    /// still gets a working certificate.
    pub max_ttl: Duration,
    /// IP addresses to put in the endpoint's certificate, for clients that dial an IP.
    pub ip_sans: Vec<IpAddr>,
}

impl std::fmt::Debug for CaServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaServerOptions")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("default_ttl", &self.default_ttl)
            .field("max_ttl", &self.max_ttl)
            .field("ip_sans", &self.ip_sans)
            .finish()
    }
}

impl Default for CaServerOptions {
    /// Istio's defaults: 24 h certificates, 90 days at most.
    fn default() -> Self {
        Self {
            token: None,
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(90 * 24 * 3600),
            ip_sans: Vec::new(),
        }
    }
}

/// Serves the CA API on `listener` until the returned future is dropped. Fails only at setup
/// (the endpoint's certificate); a bad connection or request never stops the server.
pub async fn serve_ca(listener: TcpListener, ca: Arc<LocalCa>, options: CaServerOptions) -> Result<(), IdentityError> {
    let resolver = Arc::new(ServingCert::new(ca.clone(), options.ip_sans.clone())?);
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    tls.alpn_protocols = vec![ALPN_H2.to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let policy = Arc::new(SharedToken(options.token.clone()));
    let service = ca_service(ca, options, policy);
    if let Ok(addr) = listener.local_addr() {
        info!("CA API (istio.v1.auth.IstioCertificateService) listening on {addr}");
    }
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors and the like: pass, rather than spin or stop serving.
                warn!("CA API: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, service) = (acceptor.clone(), service.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return debug!("CA API: TLS handshake with {peer} failed: {e}"),
                Err(_) => return debug!("CA API: TLS handshake with {peer} timed out"),
            };
            if let Err(e) = crate::grpc::serve_connection(tls, service).await {
                debug!("CA API: connection from {peer} ended: {e}");
            }
        });
    }
}

/// The CA API as a gRPC service, for a server that routes several services on one port.
pub fn ca_service(
    ca: Arc<LocalCa>,
    options: CaServerOptions,
    policy: Arc<dyn CaPolicy>,
) -> IstioCertificateServiceServer<impl IstioCertificateService> {
    IstioCertificateServiceServer::new(CaService { ca, options, policy })
}

/// What the CA decided to sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub identity: Identity,
    /// Put in the certificate: a node proxy's own certificate names its node.
    pub node: Option<String>,
    /// Who asked, for the log line.
    pub caller: String,
}

/// Decides who gets a certificate for which identity.
#[tonic::async_trait]
pub trait CaPolicy: Send + Sync {
    /// `requested` is the `ImpersonatedIdentity`, already checked to be in the trust domain.
    async fn authorize(
        &self,
        extensions: &http::Extensions,
        metadata: &tonic::metadata::MetadataMap,
        requested: Option<Identity>,
    ) -> Result<Grant, Status>;
}

/// One bearer token for every caller, which may then ask for any identity (node mode only).
pub struct SharedToken(pub Option<String>);

#[tonic::async_trait]
impl CaPolicy for SharedToken {
    async fn authorize(
        &self,
        _extensions: &http::Extensions,
        metadata: &tonic::metadata::MetadataMap,
        requested: Option<Identity>,
    ) -> Result<Grant, Status> {
        let authorization = metadata.get("authorization").and_then(|v| v.to_str().ok());
        check_token(self.0.as_deref(), authorization)?;
        let identity = requested.ok_or_else(|| {
            Status::unauthenticated(format!(
                "no identity to sign for: this CA issues only in node mode, to the SPIFFE URI \
                 given as metadata {IMPERSONATED_IDENTITY}"
            ))
        })?;
        Ok(Grant { identity, node: None, caller: "a holder of the shared token".into() })
    }
}

/// istiod's rule (ID-2, CFG-3): a caller gets its own identity; a node proxy also the
/// identities of the pods scheduled on its node, as `pods_on_node(node, identity)` tells from
/// the current model.
pub struct CallerPolicy<F> {
    pub authenticator: Arc<dyn Authenticate>,
    pub pods_on_node: F,
}

#[tonic::async_trait]
impl<F> CaPolicy for CallerPolicy<F>
where
    F: Fn(&str, &Identity) -> bool + Send + Sync,
{
    async fn authorize(
        &self,
        extensions: &http::Extensions,
        metadata: &tonic::metadata::MetadataMap,
        requested: Option<Identity>,
    ) -> Result<Grant, Status> {
        let caller = self.authenticator.authenticate(extensions, metadata).await?;
        authorize_caller(&caller, requested, &self.pods_on_node)
    }
}

/// The decision of `CallerPolicy`, pure.
pub fn authorize_caller(
    caller: &Caller,
    requested: Option<Identity>,
    pods_on_node: &dyn Fn(&str, &Identity) -> bool,
) -> Result<Grant, Status> {
    let grant = |identity: Identity, node: Option<String>| Grant { identity, node, caller: caller.to_string() };
    let Some(requested) = requested else {
        return Ok(grant(caller.identity.clone(), caller.node.clone()));
    };
    if requested == caller.identity {
        return Ok(grant(requested, caller.node.clone()));
    }
    match &caller.node {
        Some(node) if pods_on_node(node, &requested) => Ok(grant(requested, None)),
        Some(node) => Err(Status::permission_denied(format!(
            "{caller} may not have a certificate for {requested}: no pod scheduled on {node} runs as it"
        ))),
        None => Err(Status::permission_denied(format!(
            "{caller} may only have a certificate for its own identity, not {requested}"
        ))),
    }
}

struct CaService {
    ca: Arc<LocalCa>,
    options: CaServerOptions,
    policy: Arc<dyn CaPolicy>,
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let requested = requested_identity(request.get_ref(), self.ca.trust_domain())?;
        let grant = match self.policy.authorize(request.extensions(), request.metadata(), requested).await {
            Ok(grant) => grant,
            Err(status) => {
                warn!("CA API: refused: {}", status.message());
                return Err(status);
            }
        };
        let request = request.into_inner();
        let ttl = granted_ttl(request.validity_duration, &self.options);
        let mut chain = self
            .ca
            .sign_csr_for(&request.csr, &grant.identity, grant.node.as_deref(), ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Istio's convention: leaf first, root last, so clients that take the last entry as
        // the root find it.
        let roots: Vec<String> = self.ca.roots().iter().map(|r| to_pem(r)).collect();
        if !chain.last().is_some_and(|last| roots.contains(last)) {
            chain.extend(roots);
        }
        info!("CA API: issued {} for {}s to {}", grant.identity, ttl.as_secs(), grant.caller);
        Ok(Response::new(IstioCertificateResponse { cert_chain: chain, root_cert: None }))
    }
}

/// With a token configured, the caller must present exactly it; without one, nobody can be
/// authenticated.
fn check_token(expected: Option<&str>, authorization: Option<&str>) -> Result<(), Status> {
    let Some(expected) = expected else {
        return Err(Status::permission_denied(
            "this CA has no caller token configured, so it cannot trust any caller to \
             impersonate workloads (ImpersonatedIdentity); start it with a token and give the \
             same token to the node proxies",
        ));
    };
    let presented = authorization
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>` metadata"))?;
    if constant_time_eq(presented.trim().as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(Status::unauthenticated("bearer token not accepted by this CA"))
    }
}

/// The identity named by the `ImpersonatedIdentity` metadata, if any, which must be in our
/// trust domain.
fn requested_identity(request: &IstioCertificateRequest, trust_domain: &str) -> Result<Option<Identity>, Status> {
    let value =
        request.metadata.as_ref().and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)).and_then(|v| v.kind.as_ref());
    let uri = match value {
        Some(Kind::StringValue(uri)) => uri,
        Some(_) => {
            return Err(Status::invalid_argument(format!(
                "metadata {IMPERSONATED_IDENTITY} must be a string (a SPIFFE URI)"
            )));
        }
        None => return Ok(None),
    };
    let identity: Identity = uri.parse().map_err(|e: IdentityError| Status::invalid_argument(e.to_string()))?;
    if identity.trust_domain != trust_domain {
        return Err(Status::permission_denied(format!(
            "{identity} is outside this CA's trust domain `{trust_domain}`"
        )));
    }
    Ok(Some(identity))
}

fn granted_ttl(requested_secs: i64, options: &CaServerOptions) -> Duration {
    match u64::try_from(requested_secs) {
        Ok(0) | Err(_) => options.default_ttl,
        Ok(secs) => Duration::from_secs(secs).min(options.max_ttl),
    }
}

/// Compares without an early exit, so response timing does not reveal a token's prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The certificate resolver of a strait endpoint (CA API, control plane) certified by `ca` for
/// `CA_SERVER_NAMES` and `ips`.
pub fn serving_cert(ca: Arc<LocalCa>, ips: Vec<IpAddr>) -> Result<Arc<dyn ResolvesServerCert>, IdentityError> {
    Ok(Arc::new(ServingCert::new(ca, ips)?))
}

/// The CA endpoint's certificate, re-issued by the CA at half life during a handshake, so a
/// long-running server never presents an expired one and never needs a restart.
struct ServingCert {
    ca: Arc<LocalCa>,
    ips: Vec<IpAddr>,
    /// The certificate in use and when to replace it.
    current: RwLock<(Arc<CertifiedKey>, SystemTime)>,
}

// rustls wants resolvers to be Debug; the CA inside has nothing worth printing.
impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert").field("ips", &self.ips).finish()
    }
}

impl ServingCert {
    fn new(ca: Arc<LocalCa>, ips: Vec<IpAddr>) -> Result<Self, IdentityError> {
        let current = RwLock::new(issue_serving(&ca, &ips)?);
        Ok(Self { ca, ips, current })
    }
}

fn issue_serving(ca: &LocalCa, ips: &[IpAddr]) -> Result<(Arc<CertifiedKey>, SystemTime), IdentityError> {
    let (chain, key) = ca.issue_server_cert(&CA_SERVER_NAMES, ips, SERVING_CERT_TTL)?;
    let key =
        ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(key)).map_err(|e| IdentityError::Tls(e.to_string()))?;
    let renew_at = SystemTime::now() + SERVING_CERT_TTL / 2;
    Ok((Arc::new(CertifiedKey::new(chain, key)), renew_at))
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let (cert, renew_at) = match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        if SystemTime::now() < renew_at {
            return Some(cert);
        }
        match issue_serving(&self.ca, &self.ips) {
            Ok(fresh) => {
                let cert = fresh.0.clone();
                match self.current.write() {
                    Ok(mut current) => *current = fresh,
                    Err(poisoned) => *poisoned.into_inner() = fresh,
                }
                Some(cert)
            }
            Err(e) => {
                // Still valid for half its life: keep serving it and try again next handshake.
                warn!("CA API: cannot renew the endpoint certificate: {e}");
                Some(cert)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use strait_proto::prost_types::{Struct, Value};
    use tonic::Code;

    use super::*;

    fn request(identity: Option<Kind>) -> IstioCertificateRequest {
        IstioCertificateRequest {
            csr: String::new(),
            validity_duration: 0,
            metadata: identity.map(|kind| Struct {
                fields: BTreeMap::from([(IMPERSONATED_IDENTITY.to_owned(), Value { kind: Some(kind) })]),
            }),
        }
    }

    #[test]
    fn token_decides_who_may_ask() {
        type Case<'a> = (Option<&'a str>, Option<&'a str>, Result<(), Code>);
        let cases: [Case<'_>; 6] = [
            (Some("s3cret"), Some("Bearer s3cret"), Ok(())),
            (Some("s3cret"), Some("Bearer wrong"), Err(Code::Unauthenticated)),
            (Some("s3cret"), Some("Bearer s3cre"), Err(Code::Unauthenticated)),
            (Some("s3cret"), Some("s3cret"), Err(Code::Unauthenticated)),
            (Some("s3cret"), None, Err(Code::Unauthenticated)),
            (None, Some("Bearer anything"), Err(Code::PermissionDenied)),
        ];
        for (expected, header, want) in cases {
            let got = check_token(expected, header).map_err(|s| s.code());
            assert_eq!(got, want, "{expected:?} {header:?}");
        }
    }

    #[tokio::test]
    async fn identity_comes_from_impersonation_metadata_in_our_trust_domain() {
        let ok = request(Some(Kind::StringValue("spiffe://cluster.local/ns/a/sa/b".into())));
        let want = Some(Identity::new("cluster.local", "a", "b"));
        assert_eq!(requested_identity(&ok, "cluster.local").expect("valid"), want);
        assert_eq!(requested_identity(&request(None), "cluster.local").expect("none"), None);
        let shared = SharedToken(Some("t".into()));
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("authorization", "Bearer t".parse().expect("ascii"));
        let refused = shared.authorize(&http::Extensions::new(), &metadata, None).await.expect_err("node mode only");
        assert_eq!(refused.code(), Code::Unauthenticated);
        let cases = [
            (request(Some(Kind::BoolValue(true))), Code::InvalidArgument),
            (request(Some(Kind::StringValue("not-a-spiffe-id".into()))), Code::InvalidArgument),
            (request(Some(Kind::StringValue("spiffe://other.domain/ns/a/sa/b".into()))), Code::PermissionDenied),
        ];
        for (req, code) in cases {
            let got = requested_identity(&req, "cluster.local").map_err(|s| s.code());
            assert_eq!(got.err(), Some(code), "{:?}", req.metadata);
        }
    }

    // What istiod allows: one's own identity (with or without ImpersonatedIdentity), and for a
    // node proxy the identities of pods on its node; nothing else.
    #[test]
    fn callers_get_their_own_identity_and_node_proxies_their_pods() {
        use crate::identity::caller::{Credential, node_proxy_identity};
        let td = "cluster.local";
        let node1 =
            Caller { identity: node_proxy_identity(td), node: Some("node1".into()), by: Credential::BootstrapToken };
        let waypoint =
            Caller { identity: Identity::new(td, "shop", "waypoint"), node: None, by: Credential::ClientCertificate };
        let (web, db) = (Identity::new(td, "shop", "web"), Identity::new(td, "shop", "db"));
        let on_node = |node: &str, id: &Identity| node == "node1" && id.service_account == "web";
        type Case = (&'static str, Option<Identity>, Result<(Identity, Option<&'static str>), Code>);
        let cases: Vec<(&Caller, Case)> = vec![
            (&node1, ("own, no metadata", None, Ok((node_proxy_identity(td), Some("node1"))))),
            (&node1, ("own, named", Some(node_proxy_identity(td)), Ok((node_proxy_identity(td), Some("node1"))))),
            (&node1, ("pod on its node", Some(web.clone()), Ok((web.clone(), None)))),
            (&node1, ("pod on another node", Some(db.clone()), Err(Code::PermissionDenied))),
            (&waypoint, ("own", None, Ok((waypoint.identity.clone(), None)))),
            (&waypoint, ("own, named", Some(waypoint.identity.clone()), Ok((waypoint.identity.clone(), None)))),
            (&waypoint, ("another", Some(web.clone()), Err(Code::PermissionDenied))),
        ];
        for (caller, (what, requested, want)) in cases {
            let got = authorize_caller(caller, requested, &on_node).map(|g| (g.identity, g.node)).map_err(|s| s.code());
            let want = want.map(|(id, node)| (id, node.map(str::to_owned)));
            assert_eq!(got, want, "{what}");
        }
        let refused = authorize_caller(&node1, Some(db), &on_node).expect_err("refused");
        assert!(refused.message().contains("node1") && refused.message().contains("ns/shop/sa/db"), "{refused:?}");
    }

    #[test]
    fn ttl_defaults_and_is_capped() {
        let options = CaServerOptions {
            default_ttl: Duration::from_secs(100),
            max_ttl: Duration::from_secs(1000),
            ..CaServerOptions::default()
        };
        for (asked, granted) in [(0, 100), (-5, 100), (60, 60), (1000, 1000), (i64::MAX, 1000)] {
            assert_eq!(granted_ttl(asked, &options), Duration::from_secs(granted), "{asked}");
        }
    }
}
