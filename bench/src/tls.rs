//! TLS for the gateway benchmark (GW-1, OPS-1): `strait-load` clients speak HTTPS to an ingress
//! gateway, and the server speaks it for the direct baseline, so both paths pay for the same
//! handshakes and records and the difference is what the gateway costs.
//!
//! rustls with ring, as the proxy uses: the two ends then spend the same CPU per record as the
//! gateway does on each of its sides, and nothing new is built. Client and server configurations
//! are built once per process and shared by every connection; session resumption is off on the
//! client so that `connections` runs measure full handshakes, the figure a gateway's new-
//! connection rate is quoted in.

use std::{
    io,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
};

use anyhow::{Context, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

/// How clients open connections: plain TCP, or TLS to a server name with a CA to trust.
#[derive(Clone, Default)]
pub struct Dialer {
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.tls {
            None => f.write_str("plain TCP"),
            Some((_, name)) => write!(f, "TLS to {}", name.to_str()),
        }
    }
}

impl Dialer {
    /// Plain TCP.
    pub fn plain() -> Dialer {
        Dialer::default()
    }

    /// TLS to `sni`, trusting only the certificates in `ca_file` (PEM); ALPN offers http/1.1.
    pub fn tls(ca_file: &Path, sni: &str) -> anyhow::Result<Dialer> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(ca_file)? {
            roots.add(cert).with_context(|| format!("{}: not a usable CA certificate", ca_file.display()))?;
        }
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .context("TLS protocol versions")?
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        let name = ServerName::try_from(sni.to_owned()).with_context(|| format!("`{sni}` is not a TLS server name"))?;
        Ok(Dialer { tls: Some((TlsConnector::from(Arc::new(config)), name)) })
    }

    /// Connects (Nagle off, see [`crate::net::connect`]) and, for TLS, completes the handshake.
    pub async fn dial(&self, addr: std::net::SocketAddr) -> io::Result<Stream> {
        let tcp = crate::net::connect(addr).await?;
        self.wrap(tcp).await
    }

    /// The TLS handshake over an open TCP connection (nothing for plain TCP).
    pub async fn wrap(&self, tcp: TcpStream) -> io::Result<Stream> {
        match &self.tls {
            None => Ok(Stream::Plain(tcp)),
            Some((connector, name)) => Ok(Stream::TlsClient(Box::new(connector.connect(name.clone(), tcp).await?))),
        }
    }
}

/// The server's certificate and key, for `server --tls-cert/--tls-key`.
pub fn acceptor(cert_file: &Path, key_file: &Path) -> anyhow::Result<TlsAcceptor> {
    let certs = read_certs(cert_file)?;
    let key = read_key(key_file)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!("{} and {} do not make a certificate and key pair", cert_file.display(), key_file.display())
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: malformed PEM", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no CERTIFICATE block", path.display());
    }
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("{}: malformed PEM", path.display()))?
        .with_context(|| format!("{}: no private key block", path.display()))
}

/// A client or server connection, plain or TLS. Boxed TLS states keep a held plain connection
/// as small as a bare socket.
pub enum Stream {
    Plain(TcpStream),
    TlsClient(Box<client::TlsStream<TcpStream>>),
    TlsServer(Box<server::TlsStream<TcpStream>>),
}

impl Stream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::TlsClient(s) => s.get_ref().0,
            Stream::TlsServer(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::TlsServer(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::TlsServer(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::TlsServer(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::TlsServer(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
