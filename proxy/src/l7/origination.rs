//! TLS origination towards destinations outside the mesh (SPEC GW-3): a DestinationRule's
//! `trafficPolicy.tls` with mode SIMPLE (verify the server) or MUTUAL (also present a client
//! certificate) makes the L7 engine speak TLS to endpoints it would otherwise reach in plain
//! TCP. Endpoints in the mesh keep HBONE whatever the mode (ISTIO_MUTUAL is what they get
//! anyway); DISABLE sends plaintext.
//!
//! One `Origination` per cluster holds the rustls client configs, built once and shared by every
//! connection to the cluster. Building one parses the CA bundle (reading the system's bundle
//! took 26 ms in a debug build, a config with a file CA and a client key 0.13 ms) and
//! a fresh config has an empty session cache, so rebuilding per connection would also turn every
//! resumable handshake into a full one. The certificate files are looked at again at most every
//! `RECHECK`; a change builds new configs and a new `epoch`, and pooled connections of an older
//! epoch are closed instead of reused, so a rotated client certificate is presented on the next
//! request (the certificate files are watched like the node's own certificates).

use std::{
    fmt, fs, io,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant, SystemTime},
};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error as TlsError, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{WebPkiSupportedAlgorithms, ring},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::pool::UpstreamVersion;
use crate::model::routes::{UpstreamTls, UpstreamTlsMode};

/// How often, at most, the certificate files are looked at for changes: a `stat` of three files
/// per request would be cheap, but once per half second is enough to pick a rotation up well
/// within the 2 s the gateway's certificates get (SPEC GW-2).
const RECHECK: Duration = Duration::from_millis(500);

/// A cluster's TLS origination: its settings, and the client configs built from them.
pub struct Origination {
    pub settings: UpstreamTls,
    /// The name sent as SNI: `sni`, else the destination's host.
    pub sni: String,
    state: Mutex<State>,
}

impl fmt::Debug for Origination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Origination").field("mode", &self.settings.mode).field("sni", &self.sni).finish()
    }
}

struct State {
    /// When the files were last looked at; `None` before the first load.
    checked: Option<Instant>,
    stamps: Vec<Stamp>,
    loaded: Result<Arc<Loaded>, String>,
    epoch: u64,
}

/// A file's size and modification time, `None` when it cannot be read.
type Stamp = Option<(u64, SystemTime)>;

/// The client configs of one version of the certificate files.
pub struct Loaded {
    http1: Arc<ClientConfig>,
    http2: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    sni: String,
    /// Connections opened with an older epoch are not reused.
    pub epoch: u64,
}

impl Origination {
    /// The origination `tls` asks for towards `host`; `None` when it asks for none (DISABLE, and
    /// ISTIO_MUTUAL, which is the mesh's HBONE).
    pub fn new(tls: Option<&UpstreamTls>, host: &str) -> Option<Origination> {
        let tls = tls?;
        if !matches!(tls.mode, UpstreamTlsMode::Simple | UpstreamTlsMode::Mutual) {
            return None;
        }
        Some(Origination {
            settings: tls.clone(),
            sni: tls.sni.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| host.to_owned()),
            state: Mutex::new(State {
                checked: None,
                stamps: Vec::new(),
                loaded: Err("not loaded yet".to_owned()),
                epoch: 0,
            }),
        })
    }

    /// The configs to connect with now, reloaded when the files changed. A file that goes
    /// missing or bad after a good load keeps the last good configs (and is logged); one that
    /// never loaded is an error for every request to the cluster.
    pub fn current(&self) -> Result<Arc<Loaded>, String> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if state.checked.is_some_and(|t| now.duration_since(t) < RECHECK) {
            return state.loaded.clone();
        }
        let first = state.checked.is_none();
        state.checked = Some(now);
        let stamps: Vec<Stamp> = self.files().iter().map(|f| stamp(f)).collect();
        if !first && stamps == state.stamps {
            return state.loaded.clone();
        }
        state.stamps = stamps;
        let epoch = state.epoch + 1;
        match load(&self.settings, &self.sni, epoch) {
            Ok(loaded) => {
                if !first {
                    tracing::info!(sni = %self.sni, epoch, "TLS origination certificates reloaded");
                }
                state.epoch = epoch;
                state.loaded = Ok(Arc::new(loaded));
            }
            Err(e) if state.loaded.is_ok() => {
                tracing::warn!(sni = %self.sni, "TLS origination: {e}; the previous certificates stay in use");
            }
            Err(e) => {
                tracing::warn!(sni = %self.sni, "TLS origination: {e}");
                state.loaded = Err(e);
            }
        }
        state.loaded.clone()
    }

    fn files(&self) -> Vec<&str> {
        let s = &self.settings;
        [&s.ca_certificates, &s.client_certificate, &s.private_key].into_iter().flatten().map(String::as_str).collect()
    }
}

fn stamp(path: &str) -> Stamp {
    let meta = fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

impl Loaded {
    /// Opens TLS over `tcp`, offering the ALPN protocol of `version`.
    pub async fn connect(&self, version: UpstreamVersion, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        let config = match version {
            UpstreamVersion::Http1 => self.http1.clone(),
            UpstreamVersion::Http2 => self.http2.clone(),
        };
        TlsConnector::from(config)
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake (sni {}) failed: {e}", self.sni)))
    }
}

/// Builds the client configs from the settings and the files they name.
fn load(settings: &UpstreamTls, sni: &str, epoch: u64) -> Result<Loaded, String> {
    let server_name = ServerName::try_from(sni.to_owned())
        .map_err(|_| format!("sni `{sni}` is neither a DNS name nor an IP address"))?;
    let paths_given =
        settings.ca_certificates.is_some() || settings.client_certificate.is_some() || settings.private_key.is_some();
    if let Some(name) = &settings.credential_name
        && !paths_given
    {
        return Err(format!(
            "credentialName `{name}`: named credentials are not resolved for TLS origination yet; give \
             caCertificates, clientCertificate and privateKey as file paths"
        ));
    }
    let provider = Arc::new(ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let verifier: Arc<dyn ServerCertVerifier> = if settings.insecure_skip_verify {
        Arc::new(SkipVerification { algorithms })
    } else {
        let roots = match &settings.ca_certificates {
            Some(path) => Arc::new(read_roots(path)?),
            None => system_roots()?,
        };
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| format!("CA certificates: {e}"))?;
        if settings.subject_alt_names.is_empty() {
            inner
        } else {
            Arc::new(SanVerifier { inner, names: settings.subject_alt_names.clone() })
        }
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match settings.mode {
        UpstreamTlsMode::Mutual => {
            let (Some(cert), Some(key)) = (&settings.client_certificate, &settings.private_key) else {
                return Err("mode MUTUAL needs clientCertificate and privateKey".to_owned());
            };
            let chain = read_certs(cert, "clientCertificate")?;
            let key = read_key(key)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| format!("clientCertificate {cert}: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    let mut http1 = config.clone();
    http1.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut http2 = config;
    http2.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded { http1: Arc::new(http1), http2: Arc::new(http2), server_name, sni: sni.to_owned(), epoch })
}

fn read_certs(path: &str, field: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = fs::read(path).map_err(|e| format!("{field} {path}: {e}"))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{field} {path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{field} {path}: no PEM certificate in the file"));
    }
    Ok(certs)
}

fn read_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    let pem = fs::read(path).map_err(|e| format!("privateKey {path}: {e}"))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| format!("privateKey {path}: {e}"))?
        .ok_or_else(|| format!("privateKey {path}: no PEM private key in the file"))
}

fn read_roots(path: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path, "caCertificates")? {
        roots.add(cert).map_err(|e| format!("caCertificates {path}: {e}"))?;
    }
    Ok(roots)
}

/// The system's CA bundle, read once: the platform's usual places, or the files `SSL_CERT_FILE`
/// and `SSL_CERT_DIR` name (what tests use to trust their own CA without `caCertificates`, as
/// Istio's sample DestinationRules have none).
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found.errors.first().map(|e| format!(": {e}")).unwrap_or_default();
                return Err(format!("no caCertificates given and no system CA certificates found{why}"));
            }
            Ok(Arc::new(roots))
        })
        .clone()
}

/// `subjectAltNames`: the chain must verify, and the server's certificate must carry one of the
/// names (DNS, IP or URI), which replaces the check against the SNI.
#[derive(Debug)]
struct SanVerifier {
    inner: Arc<WebPkiServerVerifier>,
    names: Vec<String>,
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let bad = |why: String| {
            TlsError::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(io::Error::other(why)))))
        };
        let present = certificate_names(end_entity).map_err(bad)?;
        if !self.names.iter().any(|n| present.iter().any(|p| p.eq_ignore_ascii_case(n))) {
            return Err(bad(format!(
                "the certificate names {} but subjectAltNames asks for {}",
                present.join(", "),
                self.names.join(", ")
            )));
        }
        // The chain is verified against a name the certificate carries, which always matches:
        // the name that matters was checked above.
        let own = present
            .iter()
            .find_map(|n| ServerName::try_from(n.as_str()).ok())
            .ok_or_else(|| bad("the certificate has no DNS or IP name to verify its chain with".to_owned()))?;
        self.inner.verify_server_cert(end_entity, intermediates, &own, ocsp_response, now)
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

/// The DNS names, IP addresses and URIs a certificate's subjectAltName lists.
fn certificate_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, x509) = x509_parser::parse_x509_certificate(cert).map_err(|_| "unparsable certificate".to_owned())?;
    let san = x509.subject_alternative_name().map_err(|_| "malformed subjectAltName".to_owned())?;
    let names = san.map(|s| s.value.general_names.clone()).unwrap_or_default();
    Ok(names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            GeneralName::URI(u) => Some((*u).to_owned()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b).ok().map(|a| std::net::IpAddr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b).ok().map(|a| std::net::IpAddr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect())
}

/// `insecureSkipVerify`: any certificate is accepted; the handshake's signatures are still
/// checked, so the connection is at least with the holder of the certificate's key.
#[derive(Debug)]
struct SkipVerification {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SkipVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };
    use tokio_rustls::TlsAcceptor;

    use super::*;

    /// A CA, a server certificate for `external.test` and a client certificate signed by it, and
    /// a second, unrelated CA, as PEM files in a directory of their own.
    struct Pki {
        dir: PathBuf,
    }

    impl Pki {
        fn new(tag: &str) -> Pki {
            let dir = std::env::temp_dir().join(format!("strait-origination-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("temp dir");
            let pki = Pki { dir };
            let ca = pki.ca("ca");
            pki.ca("other-ca");
            pki.leaf(&ca, "server", &["external.test"]);
            pki.leaf(&ca, "client", &["client.test"]);
            pki
        }

        fn path(&self, name: &str) -> String {
            self.dir.join(name).to_string_lossy().into_owned()
        }

        fn ca(&self, name: &str) -> Issuer<'static, KeyPair> {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(rcgen::DnType::CommonName, format!("test {name}"));
            let cert = params.self_signed(&key).expect("self-signed");
            fs::write(self.path(&format!("{name}.pem")), cert.pem()).expect("write");
            Issuer::new(params, key)
        }

        fn leaf(&self, ca: &Issuer<'static, KeyPair>, name: &str, names: &[&str]) {
            let key = KeyPair::generate().expect("key");
            let params =
                CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
            let cert = params.signed_by(&key, ca).expect("signed");
            fs::write(self.path(&format!("{name}.pem")), cert.pem()).expect("write");
            fs::write(self.path(&format!("{name}-key.pem")), key.serialize_pem()).expect("write");
        }

        fn settings(&self, mode: UpstreamTlsMode, ca: &str) -> UpstreamTls {
            UpstreamTls {
                mode,
                sni: None,
                client_certificate: Some(self.path("client.pem")),
                private_key: Some(self.path("client-key.pem")),
                ca_certificates: Some(self.path(ca)),
                credential_name: None,
                subject_alt_names: Vec::new(),
                insecure_skip_verify: false,
            }
        }

        /// A TLS server for one connection that answers `hello` once the handshake is over;
        /// `client_ca` makes it require a client certificate signed by that CA.
        async fn server(&self, client_ca: bool) -> std::net::SocketAddr {
            self.server_with_alpn(client_ca, Vec::new()).await
        }

        async fn server_with_alpn(&self, client_ca: bool, alpn: Vec<Vec<u8>>) -> std::net::SocketAddr {
            let chain = read_certs(&self.path("server.pem"), "server").expect("chain");
            let key = read_key(&self.path("server-key.pem")).expect("key");
            let provider = Arc::new(ring::default_provider());
            let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("versions");
            let builder = if client_ca {
                let roots = Arc::new(read_roots(&self.path("ca.pem")).expect("roots"));
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                    .build()
                    .expect("verifier");
                builder.with_client_cert_verifier(verifier)
            } else {
                builder.with_no_client_auth()
            };
            let mut config = builder.with_single_cert(chain, key).expect("server config");
            config.alpn_protocols = alpn;
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.expect("accept");
                if let Ok(mut tls) = TlsAcceptor::from(Arc::new(config)).accept(tcp).await {
                    let _ = tls.write_all(b"hello").await;
                    let _ = tls.shutdown().await;
                }
            });
            addr
        }
    }

    /// Connects with `settings` towards host `external.test` and reads the server's greeting.
    async fn exchange(pki: &Pki, settings: UpstreamTls, client_ca: bool) -> Result<String, String> {
        let addr = pki.server(client_ca).await;
        let origination = Origination::new(Some(&settings), "external.test").expect("originates");
        let loaded = origination.current()?;
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = loaded.connect(UpstreamVersion::Http1, tcp).await.map_err(|e| e.to_string())?;
        let mut answer = String::new();
        // In TLS 1.3 a refused client certificate shows on the first read, not in the handshake.
        tls.read_to_string(&mut answer).await.map_err(|e| e.to_string())?;
        Ok(answer)
    }

    // GW-3: only SIMPLE and MUTUAL originate; SNI is `sni`, else the destination's host.
    #[test]
    fn modes_and_sni() {
        let pki = Pki::new("modes");
        for mode in [UpstreamTlsMode::Disable, UpstreamTlsMode::IstioMutual] {
            assert!(Origination::new(Some(&pki.settings(mode, "ca.pem")), "h").is_none(), "{mode:?}");
        }
        assert!(Origination::new(None, "h").is_none());
        let simple = pki.settings(UpstreamTlsMode::Simple, "ca.pem");
        assert_eq!(Origination::new(Some(&simple), "www.googleapis.com").expect("simple").sni, "www.googleapis.com");
        let named = UpstreamTls { sni: Some("api.test".into()), ..simple };
        assert_eq!(Origination::new(Some(&named), "www.googleapis.com").expect("simple").sni, "api.test");
    }

    // GW-3: SIMPLE verifies the server against `caCertificates` and the SNI, or against
    // `subjectAltNames` when given; `insecureSkipVerify` accepts any certificate.
    #[tokio::test]
    async fn simple_verifies_the_server() {
        let pki = Pki::new("simple");
        let simple = pki.settings(UpstreamTlsMode::Simple, "ca.pem");
        assert_eq!(exchange(&pki, simple.clone(), false).await.as_deref(), Ok("hello"));

        let wrong_ca = pki.settings(UpstreamTlsMode::Simple, "other-ca.pem");
        let refused = exchange(&pki, wrong_ca.clone(), false).await.expect_err("unknown issuer");
        assert!(refused.contains("sni external.test") && refused.contains("UnknownIssuer"), "{refused}");

        let wrong_sni = UpstreamTls { sni: Some("other.test".into()), ..simple.clone() };
        let refused = exchange(&pki, wrong_sni.clone(), false).await.expect_err("wrong name");
        assert!(refused.contains("not valid for name \"other.test\""), "{refused}");

        let by_san = UpstreamTls { subject_alt_names: vec!["external.test".into()], ..wrong_sni };
        assert_eq!(exchange(&pki, by_san.clone(), false).await.as_deref(), Ok("hello"));
        let other_san =
            UpstreamTls { subject_alt_names: vec!["spiffe://x/ns/a/sa/b".into(), "a.test".into()], ..by_san };
        let refused = exchange(&pki, other_san, false).await.expect_err("SAN mismatch");
        assert!(refused.contains("the certificate names external.test but subjectAltNames asks for"), "{refused}");

        let skip = UpstreamTls { insecure_skip_verify: true, ..wrong_ca };
        assert_eq!(exchange(&pki, skip, false).await.as_deref(), Ok("hello"));
    }

    // GW-3: ALPN follows the upstream's protocol: h2 for http2/grpc ports, else http/1.1.
    #[tokio::test]
    async fn alpn_follows_the_upstream_version() {
        let pki = Pki::new("alpn");
        let settings = pki.settings(UpstreamTlsMode::Simple, "ca.pem");
        let origination = Origination::new(Some(&settings), "external.test").expect("originates");
        let loaded = origination.current().expect("loaded");
        for (version, expected) in [(UpstreamVersion::Http2, b"h2".as_slice()), (UpstreamVersion::Http1, b"http/1.1")] {
            let addr = pki.server_with_alpn(false, vec![b"h2".to_vec(), b"http/1.1".to_vec()]).await;
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let tls = loaded.connect(version, tcp).await.expect("handshake");
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(expected), "{version:?}");
        }
    }

    // GW-3: MUTUAL presents the client certificate; SIMPLE to a server requiring one is refused.
    #[tokio::test]
    async fn mutual_presents_the_client_certificate() {
        let pki = Pki::new("mutual");
        let mutual = pki.settings(UpstreamTlsMode::Mutual, "ca.pem");
        assert_eq!(exchange(&pki, mutual, true).await.as_deref(), Ok("hello"));
        let simple = pki.settings(UpstreamTlsMode::Simple, "ca.pem");
        let refused = exchange(&pki, simple, true).await.expect_err("no client certificate");
        assert!(refused.contains("CertificateRequired") || refused.contains("certificate"), "{refused}");
    }

    // GW-3: settings that cannot be used are an error naming the file or field, not a panic.
    #[test]
    fn unusable_settings_are_clear_errors() {
        let pki = Pki::new("errors");
        let error = |settings: UpstreamTls| match Origination::new(Some(&settings), "external.test") {
            Some(o) => o.current().err().unwrap_or_default(),
            None => "no origination".to_owned(),
        };
        let missing = pki.settings(UpstreamTlsMode::Simple, "absent.pem");
        assert!(error(missing).contains(&format!("caCertificates {}: No such file", pki.path("absent.pem"))));
        fs::write(pki.path("junk.pem"), "not a certificate\n").expect("write");
        let junk = pki.settings(UpstreamTlsMode::Simple, "junk.pem");
        assert!(error(junk).contains("no PEM certificate in the file"));
        let keyless = UpstreamTls { private_key: None, ..pki.settings(UpstreamTlsMode::Mutual, "ca.pem") };
        assert!(error(keyless).contains("mode MUTUAL needs clientCertificate and privateKey"));
        let named = UpstreamTls {
            credential_name: Some("google-creds".into()),
            ca_certificates: None,
            client_certificate: None,
            private_key: None,
            ..pki.settings(UpstreamTlsMode::Simple, "ca.pem")
        };
        assert!(error(named).contains("credentialName `google-creds`"));
        let bad_sni = UpstreamTls { sni: Some("not a name".into()), ..pki.settings(UpstreamTlsMode::Simple, "ca.pem") };
        assert!(error(bad_sni).contains("sni `not a name` is neither a DNS name nor an IP address"));
    }

    // GW-3: a changed certificate file makes a new epoch (after `RECHECK`); a file that breaks
    // after a good load keeps the last good configs.
    #[test]
    fn changed_files_are_reloaded() {
        let pki = Pki::new("reload");
        let origination =
            Origination::new(Some(&pki.settings(UpstreamTlsMode::Mutual, "ca.pem")), "external.test").expect("o");
        assert_eq!(origination.current().expect("loaded").epoch, 1);
        assert_eq!(origination.current().expect("loaded").epoch, 1, "unchanged");
        let ca = pki.ca("ca-unused");
        pki.leaf(&ca, "client", &["rotated.test"]);
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert_eq!(origination.current().expect("reloaded").epoch, 2);
        fs::write(pki.path("client.pem"), "broken\n").expect("write");
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert_eq!(origination.current().expect("last good kept").epoch, 2);
    }
}
