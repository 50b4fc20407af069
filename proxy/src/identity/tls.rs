//! TLS for HBONE (L4-1, ID-3): TLS 1.3 only, AES-GCM suites, ALPN `h2`, both sides present a
//! workload certificate, and both sides check the peer's chain against the mesh roots and its
//! SPIFFE identity's trust domain. Which identity the peer must have is checked by the caller
//! right after the handshake (`peer_identity`), before any application byte is exchanged: the
//! expected identity depends on the destination, while these configs are shared per workload.

use std::{fmt, sync::Arc};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms, ring},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{
        ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use super::{Identity, IdentityError, IssuedCert};

pub const ALPN_H2: &[u8] = b"h2";

/// The client and server TLS settings of one workload identity.
pub struct TlsSettings {
    pub cert: Arc<IssuedCert>,
    pub client: Arc<rustls::ClientConfig>,
    pub server: Arc<rustls::ServerConfig>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings").field("identity", &self.cert.identity.to_string()).finish()
    }
}

/// ring's provider restricted to TLS 1.3 AES-GCM suites (SPEC L4-1). AES-GCM runs on AES-NI
/// here; ChaCha20 would be slower on this hardware and Istio peers do not offer it first.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = ring::default_provider();
    provider.cipher_suites =
        vec![ring::cipher_suite::TLS13_AES_128_GCM_SHA256, ring::cipher_suite::TLS13_AES_256_GCM_SHA384];
    Arc::new(provider)
}

impl TlsSettings {
    pub fn new(cert: Arc<IssuedCert>) -> Result<Self, IdentityError> {
        let tls = |e: TlsError| IdentityError::Tls(e.to_string());
        let provider = provider();
        let mut roots = RootCertStore::empty();
        for root in &cert.roots {
            roots.add(root.clone()).map_err(tls)?;
        }
        let roots = Arc::new(roots);
        let trust_domain = cert.identity.trust_domain.clone();
        let key = || PrivateKeyDer::Pkcs8(cert.key.clone_key());

        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots: roots.clone(),
                trust_domain: trust_domain.clone(),
                algorithms: provider.signature_verification_algorithms,
                fallback: server_verifier,
            }))
            .with_client_auth_cert(cert.chain.clone(), key())
            .map_err(tls)?;
        client.alpn_protocols = vec![ALPN_H2.to_vec()];
        // Resumption would let a peer skip presenting its certificate; identity is per handshake.
        client.resumption = rustls::client::Resumption::disabled();

        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier { inner: client_verifier, trust_domain }))
            .with_single_cert(cert.chain.clone(), key())
            .map_err(tls)?;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        Ok(Self { cert, client: Arc::new(client), server: Arc::new(server) })
    }
}

/// The SPIFFE identity in a peer's leaf certificate: its only URI SAN.
pub fn peer_identity(chain: Option<&[CertificateDer<'_>]>) -> Option<Identity> {
    let leaf = chain?.first()?;
    identity_of(leaf).ok()
}

pub(super) fn identity_of(leaf: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    let bad = |why: &str| {
        TlsError::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(IdentityError::Tls(
            why.to_owned(),
        )))))
    };
    let (_, x509) = x509_parser::parse_x509_certificate(leaf).map_err(|_| bad("unparsable certificate"))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|_| bad("malformed subjectAltName"))?
        .ok_or_else(|| bad("no subjectAltName: not a workload certificate"))?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    let uri = uris.next().ok_or_else(|| bad("no SPIFFE URI in subjectAltName"))?;
    if uris.next().is_some() {
        return Err(bad("more than one URI in subjectAltName"));
    }
    uri.parse().map_err(|_| bad("subjectAltName URI is not a SPIFFE workload identity"))
}

fn check_trust_domain(leaf: &CertificateDer<'_>, trust_domain: &str) -> Result<(), TlsError> {
    let identity = identity_of(leaf)?;
    if identity.trust_domain == trust_domain {
        Ok(())
    } else {
        Err(TlsError::InvalidCertificate(CertificateError::NotValidForName))
    }
}

/// Verifies a server: chain to the mesh roots, SPIFFE identity in our trust domain. (Server
/// names are meaningless here: peers are named by SPIFFE identity, checked by the caller.)
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: String,
    algorithms: WebPkiSupportedAlgorithms,
    fallback: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        check_trust_domain(end_entity, &self.trust_domain)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.fallback.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.fallback.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.fallback.supported_verify_schemes()
    }
}

/// Verifies a client: webpki chain checks, then the trust domain of its SPIFFE identity.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        check_trust_domain(end_entity, &self.trust_domain)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::identity::LocalCa;

    fn ca(tag: &str, td: &str) -> LocalCa {
        let dir = std::env::temp_dir().join(format!("strait-tls-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = LocalCa::load_or_create(&dir, td).expect("ca");
        // Everything is in memory now.
        let _ = std::fs::remove_dir_all(&dir);
        ca
    }

    fn settings(ca: &LocalCa, ns: &str, sa: &str) -> TlsSettings {
        let id = Identity::new(ca.trust_domain(), ns, sa);
        TlsSettings::new(Arc::new(ca.issue_local(&id, Duration::from_secs(600)).expect("issue"))).expect("tls")
    }

    /// Runs a handshake over an in-memory pipe; returns what each side saw of the other.
    async fn handshake(
        client: &TlsSettings,
        server: &TlsSettings,
    ) -> (Result<Option<Identity>, String>, Result<Option<Identity>, String>) {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(server.server.clone());
        let connector = TlsConnector::from(client.client.clone());
        let name = ServerName::try_from("strait.mesh").expect("name");
        let server_side = async move {
            let mut tls = acceptor.accept(s).await.map_err(|e| e.to_string())?;
            let peer = peer_identity(tls.get_ref().1.peer_certificates());
            let mut b = [0u8; 4];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            Ok(peer)
        };
        let client_side = async move {
            let mut tls = connector.connect(name, c).await.map_err(|e| e.to_string())?;
            let peer = peer_identity(tls.get_ref().1.peer_certificates());
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_H2));
            tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            Ok(peer)
        };
        tokio::join!(client_side, server_side)
    }

    // ID-3: both sides learn the other's SPIFFE identity.
    #[tokio::test]
    async fn mutual_tls_reveals_both_identities() {
        let ca = ca("ok", "cluster.local");
        let (client, server) = (settings(&ca, "a", "client"), settings(&ca, "b", "server"));
        let (c, s) = handshake(&client, &server).await;
        assert_eq!(c.expect("client ok"), Some(server.cert.identity.clone()));
        assert_eq!(s.expect("server ok"), Some(client.cert.identity.clone()));
    }

    // ID-3: a client whose certificate comes from another root is refused.
    #[tokio::test]
    async fn foreign_root_is_refused_both_ways() {
        let (ours, theirs) = (ca("ours", "cluster.local"), ca("theirs", "cluster.local"));
        let (c, s) = handshake(&settings(&theirs, "x", "intruder"), &settings(&ours, "b", "server")).await;
        assert!(c.is_err() || s.is_err(), "a foreign client must fail: {c:?} {s:?}");
        assert!(s.is_err());
        let (c, _) = handshake(&settings(&ours, "a", "client"), &settings(&theirs, "b", "fake")).await;
        assert!(c.is_err(), "a foreign server must fail");
    }

    #[tokio::test]
    async fn other_trust_domain_is_refused() {
        let dir = std::env::temp_dir().join(format!("strait-tls-test-td-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = LocalCa::load_or_create(&dir, "cluster.local").expect("ca");
        let _ = std::fs::remove_dir_all(&dir);
        let foreign = ca.issue_local(&Identity::new("evil.local", "a", "b"), Duration::from_secs(60)).expect("issue");
        let mut foreign = foreign;
        foreign.identity = Identity::new("cluster.local", "a", "b"); // settings use our TD
        let client = TlsSettings::new(Arc::new(foreign)).expect("tls");
        let (_, s) = handshake(&client, &settings(&ca, "b", "server")).await;
        assert!(s.is_err(), "identity outside the trust domain must be refused");
    }
}
