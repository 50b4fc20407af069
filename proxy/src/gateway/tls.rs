//! TLS at the gateway (GW-1, GW-2): the ClientHello is read first, to learn the SNI the
//! client asks for; the server of the port naming it most specifically decides between
//! terminating (SIMPLE, MUTUAL: its certificate, ALPN h2 and http/1.1, client certificates
//! checked against its CA for MUTUAL) and passing the bytes through (PASSTHROUGH).

use std::{
    collections::HashMap,
    io,
    sync::{Arc, Mutex},
};

use rustls::{
    ServerConfig,
    server::{Acceptor, ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use tokio::io::{AsyncRead, AsyncReadExt as _};

use crate::{
    config::{ServerTlsMode, TlsVersion},
    identity::credentials::{Credential, Credentials},
    model::gateways::{BoundServer, ServerTls},
};

/// Largest ClientHello read before deciding (TLS records are at most 16 KiB; a hello with
/// post-quantum key shares still fits in a few).
const MAX_HELLO: usize = 64 * 1024;

/// What the client's first flight says.
pub struct Hello {
    /// Everything read so far, to be replayed.
    pub bytes: Vec<u8>,
    pub sni: Option<String>,
}

/// Reads until the ClientHello is complete. Errors: not TLS, too large, or the client left.
pub async fn read_client_hello<I: AsyncRead + Unpin>(io: &mut I) -> io::Result<Hello> {
    let mut acceptor = Acceptor::default();
    let mut bytes = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the client closed before its ClientHello"));
        }
        bytes.extend_from_slice(&chunk[..n]);
        let mut fresh = &chunk[..n];
        while !fresh.is_empty() {
            acceptor.read_tls(&mut fresh)?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_ascii_lowercase);
                return Ok(Hello { bytes, sni });
            }
            Ok(None) if bytes.len() < MAX_HELLO => continue,
            Ok(None) => return Err(io::Error::other("ClientHello too large")),
            Err((e, _)) => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("not a TLS ClientHello: {e}")));
            }
        }
    }
}

/// The server name of the ClientHello at the start of `bytes`, for a reader that cannot
/// consume them (the node proxy peeks, GW-3): `Ok(None)` while the hello is incomplete,
/// `Ok(Some(None))` for a hello without SNI; an error when the bytes are not a ClientHello.
pub fn client_hello_sni(mut bytes: &[u8]) -> io::Result<Option<Option<String>>> {
    let mut acceptor = Acceptor::default();
    while !bytes.is_empty() {
        acceptor.read_tls(&mut bytes)?;
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Ok(Some(accepted.client_hello().server_name().map(str::to_ascii_lowercase))),
        Ok(None) => Ok(None),
        Err((e, _)) => Err(io::Error::new(io::ErrorKind::InvalidData, format!("not a TLS ClientHello: {e}"))),
    }
}

/// The certificate of one server, whatever SNI asked for it (the server was chosen by SNI).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A server: its Gateway (`ns/name`) and index in `servers`.
type ServerKey = (String, usize);
/// A configuration and the credential it was built from.
type Built = (Arc<Credential>, Arc<ServerConfig>);

/// Server configurations, one per server, rebuilt when its credential changed on disk: a
/// handshake reuses the cached one (its session cache included) while the files stay the same.
pub struct ServerConfigs {
    credentials: Arc<Credentials>,
    cache: Mutex<HashMap<ServerKey, Built>>,
}

impl ServerConfigs {
    pub fn new(credentials: Arc<Credentials>) -> Self {
        Self { credentials, cache: Mutex::default() }
    }

    /// The configuration for a terminating `server`; the error says which file is wrong.
    pub fn get(&self, server: &BoundServer) -> Result<Arc<ServerConfig>, String> {
        let tls = server.server().tls.as_ref().ok_or("the server has no tls")?;
        let source = tls.credential.as_ref().ok_or("the server has no certificate")?;
        let credential = self.credentials.get(source)?;
        let key = (server.gateway.clone(), server.index);
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((held, config)) = cache.get(&key)
            && Arc::ptr_eq(held, &credential)
        {
            return Ok(config.clone());
        }
        let config = Arc::new(build(tls, &credential)?);
        cache.insert(key, (credential, config.clone()));
        Ok(config)
    }
}

fn build(tls: &ServerTls, credential: &Credential) -> Result<ServerConfig, String> {
    let certified = credential.key.clone().ok_or("the credential has no certificate and key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions = versions(tls.min_version, tls.max_version)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match tls.mode {
        ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual => {
            let roots = credential.roots.clone().ok_or("MUTUAL needs a CA (caCertificates or ca.crt)")?;
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider);
            let verifier =
                if tls.mode == ServerTlsMode::OptionalMutual { verifier.allow_unauthenticated() } else { verifier };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| format!("client CA: {e}"))?)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(Fixed(certified)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn versions(
    min: Option<TlsVersion>,
    max: Option<TlsVersion>,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, String> {
    // rustls speaks TLS 1.2 and 1.3 only; older minimums mean 1.2.
    let lo = match min {
        Some(TlsVersion::V1_3) => 13,
        _ => 12,
    };
    let hi = match max {
        Some(TlsVersion::V1_0 | TlsVersion::V1_1) => {
            return Err("maxProtocolVersion below TLS 1.2 is not supported".into());
        }
        Some(TlsVersion::V1_2) => 12,
        _ => 13,
    };
    if lo > hi {
        return Err("minProtocolVersion is above maxProtocolVersion".into());
    }
    let mut out = Vec::new();
    if lo <= 12 {
        out.push(&rustls::version::TLS12);
    }
    if hi >= 13 {
        out.push(&rustls::version::TLS13);
    }
    Ok(out)
}
