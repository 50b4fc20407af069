//! A client of Istio's CA API (ID-2): certificates for the node's workloads come from istiod, or
//! from strait's own CA endpoint, instead of a key held on the node.
//!
//! It asks as ztunnel does, in node mode: a fresh ECDSA P-256 key and a CSR per identity, the
//! identity named in the `ImpersonatedIdentity` metadata, and the node's credential as
//! `authorization: Bearer <token>`. The CA endpoint is verified against the root file the user
//! gives (`--ca-root`), which is also the trust root handed to the TLS settings: a CA cannot
//! widen what the node trusts by sending extra certificates. One HTTP/2 connection is kept and
//! reused, and replaced when it breaks.

use std::{
    collections::BTreeMap,
    fmt, fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::{
    RootCertStore,
    crypto::ring,
    pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName},
};
use strait_proto::{
    istio::v1::auth::{
        IstioCertificateRequest, IstioCertificateResponse,
        istio_certificate_service_client::IstioCertificateServiceClient,
    },
    prost_types::{Struct, Value, value::Kind},
};
use tokio::{net::TcpStream, sync::Mutex};
use tokio_rustls::TlsConnector;

use super::{
    BoxFuture, CertificateProvider, ClientCertSlot, Identity, IdentityError, IssuedCert,
    ca::parse_certs,
    caserver::IMPERSONATED_IDENTITY,
    tls::{ALPN_H2, identity_of},
};
use crate::grpc::H2Channel;

/// Istio's CA port (istiod's secure gRPC port), used when the address names none.
pub const DEFAULT_CA_PORT: u16 = 15012;
/// Connecting, TLS included; a CA that is down fails the issue instead of hanging it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// One CreateCertificate call on an established connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A bearer token a proxy presents to the CA and the control plane: a bootstrap token, or a
/// Kubernetes projected service-account token (audience `istio-ca`). One kept in a file is read
/// again for every request, as the kubelet rewrites a projected token well before it expires.
#[derive(Clone)]
pub enum BearerToken {
    Value(Arc<str>),
    File(PathBuf),
}

impl BearerToken {
    /// The token in `path`, read now so that a missing file is reported at startup.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let token = Self::File(path.to_path_buf());
        token.current()?;
        Ok(token)
    }

    /// The token as of now, trimmed.
    pub fn current(&self) -> Result<String, String> {
        match self {
            Self::Value(token) => Ok(token.trim().to_owned()),
            Self::File(path) => match fs::read_to_string(path) {
                Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_owned()),
                Ok(_) => Err(format!("the token file {} is empty", path.display())),
                Err(e) => Err(format!("cannot read the token file {}: {e}", path.display())),
            },
        }
    }

    /// `authorization: Bearer <token>` metadata, from the token as of now.
    pub fn metadata(&self) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, String> {
        format!("Bearer {}", self.current()?).parse().map_err(|_| "the token is not valid in a gRPC header".to_owned())
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Value(_) => f.write_str("BearerToken(<redacted>)"),
            Self::File(path) => write!(f, "BearerToken({})", path.display()),
        }
    }
}

impl From<&str> for BearerToken {
    fn from(token: &str) -> Self {
        Self::Value(token.into())
    }
}

impl From<String> for BearerToken {
    fn from(token: String) -> Self {
        Self::Value(token.into())
    }
}

/// How to reach and authenticate to the CA, besides its address and root.
#[derive(Clone, Default)]
pub struct CaClientOptions {
    /// Sent as `authorization: Bearer <token>`: what lets the CA trust the impersonation.
    pub token: Option<BearerToken>,
    /// The name to verify the CA's certificate against, when it differs from the address's
    /// host (e.g. dialling an IP, or a CA certified as `istiod.istio-system.svc`).
    pub server_name: Option<String>,
    /// The caller's own certificate, presented (mTLS) once it holds one: what authenticates it
    /// to strait's control plane after bootstrapping with the token.
    pub client_cert: Option<Arc<ClientCertSlot>>,
}

impl fmt::Debug for CaClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaClientOptions")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("server_name", &self.server_name)
            .field("client_cert", &self.client_cert)
            .finish()
    }
}

/// Issues workload certificates through a remote `IstioCertificateService`.
pub struct IstioCaClient {
    /// As the user wrote it: every error names it.
    address: String,
    /// `host:port` to dial.
    authority: String,
    origin: http::Uri,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    roots: Vec<CertificateDer<'static>>,
    token: Option<BearerToken>,
    connection: Mutex<Option<H2Channel>>,
}

impl fmt::Debug for IstioCaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IstioCaClient").field("address", &self.address).finish()
    }
}

impl IstioCaClient {
    /// `address` is `[https://]host[:port]` (port 15012 when absent); `ca_root` is a PEM file of
    /// the roots that both the CA endpoint and the issued certificates chain to.
    pub fn new(address: &str, ca_root: &Path, options: CaClientOptions) -> Result<Self, IdentityError> {
        let bad = |reason: String| IdentityError::CaRequest(format!("{address}: {reason}"));
        let crate::grpc::TlsEndpoint { authority, origin, server_name } =
            crate::grpc::TlsEndpoint::parse(address, DEFAULT_CA_PORT, options.server_name.as_deref(), "the CA API")
                .map_err(bad)?;

        let pem = fs::read_to_string(ca_root)
            .map_err(|e| bad(format!("cannot read the CA root file {}: {e}", ca_root.display())))?;
        let roots = parse_certs(&pem).map_err(|e| bad(format!("{}: {e}", ca_root.display())))?;
        let mut store = RootCertStore::empty();
        for root in &roots {
            store.add(root.clone()).map_err(|e| bad(format!("{}: unusable root: {e}", ca_root.display())))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .with_root_certificates(store);
        let mut tls = match &options.client_cert {
            Some(slot) => builder.with_client_cert_resolver(slot.clone()),
            None => builder.with_no_client_auth(),
        };
        // A resumed session keeps the identity of the one it resumes: one opened before the
        // caller held its certificate would go on without it.
        tls.resumption = rustls::client::Resumption::disabled();
        tls.alpn_protocols = vec![ALPN_H2.to_vec()];

        Ok(Self {
            address: address.to_owned(),
            authority,
            origin,
            server_name,
            tls: TlsConnector::from(Arc::new(tls)),
            roots,
            token: options.token,
            connection: Mutex::new(None),
        })
    }

    /// Calls `CreateCertificate` on the shared connection, dialling it first if need be. A failed
    /// call drops the connection, so the next one starts afresh.
    pub async fn create_certificate(
        &self,
        request: IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, IdentityError> {
        let channel = self.channel().await?;
        let mut request = tonic::Request::new(request);
        if let Some(token) = &self.token {
            request.metadata_mut().insert("authorization", token.metadata().map_err(|e| self.error(e))?);
        }
        let mut client = IstioCertificateServiceClient::with_origin(channel, self.origin.clone());
        let result = tokio::time::timeout(REQUEST_TIMEOUT, client.create_certificate(request)).await;
        let failure = match result {
            Ok(Ok(response)) => return Ok(response.into_inner()),
            Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
            Err(_) => format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()),
        };
        *self.connection.lock().await = None;
        Err(self.error(failure))
    }

    async fn channel(&self) -> Result<H2Channel, IdentityError> {
        let mut slot = self.connection.lock().await;
        if let Some(channel) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(channel.clone());
        }
        let channel = tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
            .await
            .map_err(|_| self.error(format!("no connection within {}s", CONNECT_TIMEOUT.as_secs())))??;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    async fn connect(&self) -> Result<H2Channel, IdentityError> {
        let tcp = TcpStream::connect(&self.authority).await.map_err(|e| self.error(format!("cannot connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let tls = self.tls.connect(self.server_name.clone(), tcp).await.map_err(|e| {
            self.error(format!(
                "TLS handshake failed (is --ca-root the root that certified this CA, and \
                     does its certificate name {:?}?): {e}",
                self.server_name.to_str()
            ))
        })?;
        H2Channel::handshake(tls).await.map_err(|e| self.error(format!("HTTP/2 handshake failed: {e}")))
    }

    fn error(&self, reason: String) -> IdentityError {
        IdentityError::CaRequest(format!("{}: {reason}", self.address))
    }

    /// The caller's own certificate: asked for without `ImpersonatedIdentity`, as Istio's
    /// proxies in dedicated mode ask; the CA decides the identity, which must be `expected`.
    pub async fn issue_own(&self, expected: &Identity, ttl: Duration) -> Result<IssuedCert, IdentityError> {
        self.request(expected, ttl, None).await
    }

    async fn issue_remote(&self, identity: &Identity, ttl: Duration) -> Result<IssuedCert, IdentityError> {
        self.request(identity, ttl, Some(impersonation(identity))).await
    }

    async fn request(
        &self,
        identity: &Identity,
        ttl: Duration,
        metadata: Option<Struct>,
    ) -> Result<IssuedCert, IdentityError> {
        let fail = |reason: String| IdentityError::Issue {
            identity: identity.to_string(),
            reason: format!("from CA {}: {reason}", self.address),
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(e.to_string()))?;
        let csr = csr_for(identity, &key).map_err(&fail)?;
        let response = self
            .create_certificate(IstioCertificateRequest {
                csr,
                validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
                metadata,
            })
            .await?;
        let (chain, not_before, not_after, serial) =
            accept_chain(&response, identity, &key, &self.roots).map_err(fail)?;
        Ok(IssuedCert {
            identity: identity.clone(),
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            roots: self.roots.clone(),
            not_before,
            not_after,
            received: SystemTime::now(),
            serial,
        })
    }
}

impl CertificateProvider for IstioCaClient {
    fn issue<'a>(&'a self, identity: &'a Identity, ttl: Duration) -> BoxFuture<'a, Result<IssuedCert, IdentityError>> {
        Box::pin(self.issue_remote(identity, ttl))
    }
}

/// Keeps the caller's own certificate (`issue_own`) in `slot`, renewed at about half of its
/// life; a failure is retried after 1, 2, 4 s... up to 2 min. The first result, success or
/// not, is reported through `first`.
pub async fn keep_own_certificate(
    client: Arc<IstioCaClient>,
    identity: Identity,
    ttl: Duration,
    slot: Arc<ClientCertSlot>,
    first: tokio::sync::oneshot::Sender<Result<(), IdentityError>>,
) {
    let mut first = Some(first);
    let mut backoff = Duration::from_secs(1);
    loop {
        let wait = match client.issue_own(&identity, ttl).await.and_then(|cert| slot.set(&cert).map(|()| cert)) {
            Ok(cert) => {
                // The connection in use was opened without it: the next request opens one that
                // presents it.
                *client.connection.lock().await = None;
                tracing::info!(%identity, serial = %cert.serial, "own certificate issued: presented to the control plane from now on");
                if let Some(first) = first.take() {
                    let _ = first.send(Ok(()));
                }
                backoff = Duration::from_secs(1);
                cert.refresh_at().duration_since(SystemTime::now()).unwrap_or_default()
            }
            Err(e) => {
                tracing::warn!(%identity, "cannot obtain this proxy's own certificate, next attempt in {}s: {e}", backoff.as_secs());
                if let Some(first) = first.take() {
                    let _ = first.send(Err(e));
                }
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(120));
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// The node-mode metadata: which workload identity the certificate is for.
fn impersonation(identity: &Identity) -> Struct {
    Struct {
        fields: BTreeMap::from([(
            IMPERSONATED_IDENTITY.to_owned(),
            Value { kind: Some(Kind::StringValue(identity.to_string())) },
        )]),
    }
}

/// A CSR as Istio's agents write it: empty subject, the SPIFFE URI as the only name.
fn csr_for(identity: &Identity, key: &KeyPair) -> Result<String, String> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = identity.to_string().try_into().map_err(|e| format!("identity is not a valid URI: {e}"))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.serialize_request(key).and_then(|csr| csr.pem()).map_err(|e| format!("cannot build the CSR: {e}"))
}

type AcceptedChain = (Vec<CertificateDer<'static>>, SystemTime, SystemTime, String);

/// Checks the CA's answer before anything uses it: the leaf must carry exactly the identity
/// asked for and our public key. Returns the chain to present (leaf and intermediates; the
/// roots peers already hold are dropped) and the leaf's validity and serial.
fn accept_chain(
    response: &IstioCertificateResponse,
    identity: &Identity,
    key: &KeyPair,
    roots: &[CertificateDer<'static>],
) -> Result<AcceptedChain, String> {
    // An entry may hold several certificates (Istio concatenates multiple roots into one).
    let mut chain = Vec::new();
    for pem in &response.cert_chain {
        chain.extend(parse_certs(pem).map_err(|e| format!("bad cert_chain entry: {e}"))?);
    }
    let Some(leaf) = chain.first().cloned() else {
        return Err("the CA answered with an empty certificate chain".into());
    };
    let issued = identity_of(&leaf).map_err(|e| format!("unusable leaf certificate: {e}"))?;
    if &issued != identity {
        return Err(format!("the CA issued a certificate for {issued} instead"));
    }
    let (_, x509) =
        x509_parser::parse_x509_certificate(&leaf).map_err(|e| format!("unparsable leaf certificate: {e}"))?;
    if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err("the leaf certificate is not for the key in our CSR".into());
    }
    let validity = x509.validity();
    let at = |t: &x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).unwrap_or(0);
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    };
    let (not_before, not_after) = (at(&validity.not_before), at(&validity.not_after));
    let serial = x509.raw_serial().iter().map(|b| format!("{b:02x}")).collect();
    while chain.len() > 1 && chain.last().is_some_and(|last| roots.contains(last)) {
        chain.pop();
    }
    Ok((chain, not_before, not_after, serial))
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr, SocketAddr},
        path::PathBuf,
    };

    use rustls::pki_types::ServerName;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
        task::JoinHandle,
    };
    use tokio_rustls::{TlsAcceptor, TlsConnector};
    use x509_parser::extensions::GeneralName;

    use super::*;
    use crate::identity::{
        LocalCa, TlsSettings,
        caserver::{CaServerOptions, serve_ca},
        peer_identity,
    };

    const TOKEN: &str = "s3cret";
    const MAX_TTL: Duration = Duration::from_secs(2 * 3600);

    /// A CA endpoint on 127.0.0.1 backed by a fresh LocalCa; stopped and cleaned up on drop.
    struct CaEndpoint {
        ca: Arc<LocalCa>,
        addr: SocketAddr,
        dir: PathBuf,
        task: JoinHandle<Result<(), IdentityError>>,
    }

    impl Drop for CaEndpoint {
        fn drop(&mut self) {
            self.task.abort();
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    fn local_ca(tag: &str) -> (Arc<LocalCa>, PathBuf) {
        let dir = std::env::temp_dir().join(format!("strait-caapi-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let ca = LocalCa::load_or_create(&dir, "cluster.local").expect("ca");
        (Arc::new(ca), dir)
    }

    async fn start(tag: &str, token: Option<&str>) -> CaEndpoint {
        let (ca, dir) = local_ca(tag);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let options = CaServerOptions {
            token: token.map(str::to_owned),
            max_ttl: MAX_TTL,
            ip_sans: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            ..CaServerOptions::default()
        };
        let task = tokio::spawn(serve_ca(listener, ca.clone(), options));
        CaEndpoint { ca, addr, dir, task }
    }

    fn client(ca: &CaEndpoint, token: Option<&str>) -> IstioCaClient {
        let options = CaClientOptions { token: token.map(BearerToken::from), ..CaClientOptions::default() };
        IstioCaClient::new(&format!("https://{}", ca.addr), &ca.ca.root_cert_path(), options).expect("client")
    }

    fn sans(der: &[u8]) -> Vec<String> {
        let (_, x509) = x509_parser::parse_x509_certificate(der).expect("parse");
        let san = x509.subject_alternative_name().expect("ext").expect("san");
        san.value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(uri) => format!("URI:{uri}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    /// A TLS 1.3 mTLS handshake over an in-memory pipe; returns the identity each side saw.
    async fn handshake(client: &TlsSettings, server: &TlsSettings) -> (Identity, Identity) {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(server.server.clone());
        let connector = TlsConnector::from(client.client.clone());
        let server_side = async move {
            let mut tls = acceptor.accept(s).await.expect("server handshake");
            let peer = peer_identity(tls.get_ref().1.peer_certificates());
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.expect("read");
            peer.expect("client identity")
        };
        let client_side = async move {
            let name = ServerName::try_from("strait.mesh").expect("name");
            let mut tls = connector.connect(name, c).await.expect("client handshake");
            tls.write_all(b"x").await.expect("write");
            tls.flush().await.expect("flush");
            peer_identity(tls.get_ref().1.peer_certificates()).expect("server identity")
        };
        tokio::join!(client_side, server_side)
    }

    // ID-2: certificates issued through the CA API carry exactly the impersonated identity,
    // chain to the CA's root and work for mTLS between two workloads.
    #[tokio::test]
    async fn issued_certificates_carry_the_impersonated_identity_and_do_mtls() {
        let endpoint = start("issue", Some(TOKEN)).await;
        let client = client(&endpoint, Some(TOKEN));
        let (a, b) = (Identity::new("cluster.local", "a", "client"), Identity::new("cluster.local", "b", "server"));
        let ttl = Duration::from_secs(3600);
        let cert_a = client.issue(&a, ttl).await.expect("issue a");
        let cert_b = client.issue(&b, ttl).await.expect("issue b (same connection)");
        for (cert, id) in [(&cert_a, &a), (&cert_b, &b)] {
            assert_eq!(sans(&cert.chain[0]), [format!("URI:{id}")]);
            assert_eq!(cert.chain.len(), 1, "the root is not sent back to peers");
            assert_eq!(cert.roots, endpoint.ca.roots());
            let life = cert.not_after.duration_since(cert.not_before).expect("order");
            assert!(life >= ttl && life <= ttl + Duration::from_secs(120), "{life:?}");
            assert!(!cert.serial.is_empty());
        }
        let (a_tls, b_tls) =
            (TlsSettings::new(Arc::new(cert_a)).expect("tls a"), TlsSettings::new(Arc::new(cert_b)).expect("tls b"));
        assert_eq!(handshake(&a_tls, &b_tls).await, (b.clone(), a.clone()));

        // The CA is certified for `strait-ca` too: a client dialling a name the certificate
        // lacks verifies against the override instead.
        let by_name = IstioCaClient::new(
            &format!("localhost:{}", endpoint.addr.port()),
            &endpoint.ca.root_cert_path(),
            CaClientOptions { token: Some(TOKEN.into()), server_name: Some("strait-ca".into()), client_cert: None },
        )
        .expect("client");
        by_name.issue(&a, ttl).await.expect("issue via strait-ca");
    }

    #[tokio::test]
    async fn callers_without_the_token_are_refused() {
        let endpoint = start("token", Some(TOKEN)).await;
        let id = Identity::new("cluster.local", "a", "b");
        for token in [Some("wrong"), None] {
            let err = client(&endpoint, token)
                .issue(&id, Duration::from_secs(60))
                .await
                .expect_err("must be refused")
                .to_string();
            assert!(err.contains("Unauthenticated"), "{err}");
            assert!(err.contains(&endpoint.addr.to_string()), "names the CA: {err}");
        }

        let open = start("notoken", None).await;
        let err = client(&open, Some("anything"))
            .issue(&id, Duration::from_secs(60))
            .await
            .expect_err("no token configured: nobody may impersonate")
            .to_string();
        assert!(err.contains("PermissionDenied"), "{err}");
    }

    // A token file is read for every request: the token rotated in it (as the kubelet rotates
    // a projected token) is the one sent next, without restarting the client.
    #[tokio::test]
    async fn a_token_file_is_read_for_every_request() {
        let endpoint = start("token-file", Some(TOKEN)).await;
        let file = endpoint.dir.join("token");
        fs::write(&file, "stale\n").expect("write");
        let token = BearerToken::from_file(&file).expect("readable");
        let options = CaClientOptions { token: Some(token.clone()), ..CaClientOptions::default() };
        let client = IstioCaClient::new(&format!("https://{}", endpoint.addr), &endpoint.ca.root_cert_path(), options)
            .expect("client");
        let id = Identity::new("cluster.local", "a", "b");
        let err = client.issue(&id, Duration::from_secs(60)).await.expect_err("stale token").to_string();
        assert!(err.contains("Unauthenticated"), "{err}");
        fs::write(&file, format!("{TOKEN}\n")).expect("rotate");
        client.issue(&id, Duration::from_secs(60)).await.expect("the rotated token is used");
        fs::remove_file(&file).expect("remove");
        let err = client.issue(&id, Duration::from_secs(60)).await.expect_err("no file").to_string();
        assert!(err.contains(&file.display().to_string()), "names the file: {err}");
        assert!(BearerToken::from_file(&file).is_err_and(|e| e.contains("cannot read the token file")));
    }

    #[tokio::test]
    async fn a_client_trusting_another_root_refuses_the_ca() {
        let endpoint = start("foreign", Some(TOKEN)).await;
        let (other, other_dir) = local_ca("foreign-root");
        let client = IstioCaClient::new(
            &format!("https://{}", endpoint.addr),
            &other.root_cert_path(),
            CaClientOptions { token: Some(TOKEN.into()), ..CaClientOptions::default() },
        )
        .expect("client");
        let err = client
            .issue(&Identity::new("cluster.local", "a", "b"), Duration::from_secs(60))
            .await
            .expect_err("the CA's certificate does not chain to that root")
            .to_string();
        assert!(err.contains("TLS handshake failed"), "{err}");
        let _ = fs::remove_dir_all(other_dir);
    }

    // The CA decides the names: a CSR asking for more gets only the impersonated identity, and
    // the lifetime is capped. The answer follows Istio's order, leaf first and root last.
    #[tokio::test]
    async fn csr_names_are_ignored_and_ttl_capped() {
        let endpoint = start("csr", Some(TOKEN)).await;
        let client = client(&endpoint, Some(TOKEN));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::URI("spiffe://cluster.local/ns/kube-system/sa/admin".try_into().expect("uri")));
        let csr = params.serialize_request(&key).and_then(|c| c.pem()).expect("csr");
        let id = Identity::new("cluster.local", "a", "b");
        let response = client
            .create_certificate(IstioCertificateRequest {
                csr,
                validity_duration: 365 * 24 * 3600,
                metadata: Some(impersonation(&id)),
            })
            .await
            .expect("issued");
        let root = crate::identity::ca::to_pem(&endpoint.ca.roots()[0]);
        assert_eq!(response.cert_chain.last(), Some(&root), "root last");
        let leaf = parse_certs(&response.cert_chain[0]).expect("pem");
        assert_eq!(sans(&leaf[0]), [format!("URI:{id}")]);
        let (chain, _, not_after, _) = accept_chain(&response, &id, &key, endpoint.ca.roots()).expect("acceptable");
        assert_eq!(chain.len(), 1);
        assert!(not_after <= SystemTime::now() + MAX_TTL, "capped at the CA's maximum");
    }

    // The client checks what it got: right identity, and our key.
    #[test]
    fn answers_for_another_identity_or_key_are_rejected() {
        let (ca, dir) = local_ca("accept");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let (asked, other) = (Identity::new("cluster.local", "a", "b"), Identity::new("cluster.local", "x", "y"));
        let csr = csr_for(&asked, &key).expect("csr");
        let answer = |id: &Identity, csr: &str| IstioCertificateResponse {
            cert_chain: ca.sign_csr_for(csr, id, None, Duration::from_secs(60)).expect("sign"),
            root_cert: None,
        };
        let err = accept_chain(&answer(&other, &csr), &asked, &key, ca.roots()).expect_err("id");
        assert!(err.contains("instead"), "{err}");
        let stranger = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let err = accept_chain(&answer(&asked, &csr), &asked, &stranger, ca.roots()).expect_err("key");
        assert!(err.contains("key"), "{err}");
        let empty = IstioCertificateResponse::default();
        assert!(accept_chain(&empty, &asked, &key, ca.roots()).is_err());
        let _ = fs::remove_dir_all(dir);
    }
}
