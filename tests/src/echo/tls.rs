//! `strait-echo https`: an HTTP/1.1 server behind TLS, standing in for an external HTTPS host
//! (www.googleapis.com and the like) in tests of TLS origination.
//!
//! It reports what the TLS client did, so tests can check what the proxy originated: each
//! connection logs `tls peer=<ip:port> sni=<name> alpn=<offered,...> client_cert=<digest>`
//! (`-` when absent; the digest is FNV-1a of the client's leaf certificate, so a rotated
//! certificate shows as a new digest), and every response body is `hello from <name> sni=...
//! alpn=... client_cert=... path=<path>`. With `--client-ca` it requires a client certificate
//! signed by that CA (mutual TLS). The server offers no ALPN protocol of its own and speaks
//! HTTP/1.1 whatever the client offered.

use std::fs;
use std::io::{self, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig, ServerConnection, StreamOwned};

use super::Fnv1a64;
use super::wire::{BadRequest, parse_head, read_body, read_head};

/// Keep-alive connections idle this long are closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the server's certificates are.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: String,
    pub key: String,
    /// Require client certificates signed by this CA.
    pub client_ca: Option<String>,
}

/// What a client's hello said.
#[derive(Debug, Default)]
struct Hello {
    sni: Option<String>,
    alpn: Vec<String>,
}

/// Answers with the one certificate, noting the client hello's SNI and ALPN offer.
#[derive(Debug)]
struct Noting {
    key: Arc<CertifiedKey>,
    seen: Mutex<Hello>,
}

impl ResolvesServerCert for Noting {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.sni = hello.server_name().map(str::to_owned);
        seen.alpn =
            hello.alpn().map(|a| a.map(|p| String::from_utf8_lossy(p).into_owned()).collect()).unwrap_or_default();
        Some(self.key.clone())
    }
}

fn load(files: &TlsFiles) -> Result<(Arc<CertifiedKey>, Option<Arc<RootCertStore>>), String> {
    let read = |path: &str| fs::read(path).map_err(|e| format!("{path}: {e}"));
    let chain = CertificateDer::pem_slice_iter(&read(&files.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", files.cert))?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?).map_err(|e| format!("{}: {e}", files.key))?;
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| format!("{}: {e}", files.key))?;
    let roots = match &files.client_ca {
        None => None,
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&read(path)?) {
                roots.add(cert.map_err(|e| format!("{path}: {e}"))?).map_err(|e| format!("{path}: {e}"))?;
            }
            Some(Arc::new(roots))
        }
    };
    Ok((Arc::new(key), roots))
}

/// Serves HTTPS on `0.0.0.0:port` until the process is killed. The certificate files are read
/// again for every connection, so a test can rotate them.
pub fn serve(port: u16, name: String, files: TlsFiles) -> io::Result<()> {
    load(&files).map_err(io::Error::other)?;
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    println!("listening on 0.0.0.0:{port}");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (name, files) = (name.clone(), files.clone());
        thread::spawn(move || {
            if let Err(e) = serve_connection(stream, &name, &files) {
                println!("tls error: {e}");
            }
        });
    }
    Ok(())
}

fn serve_connection(stream: TcpStream, name: &str, files: &TlsFiles) -> io::Result<()> {
    let peer = stream.peer_addr()?;
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let (key, roots) = load(files).map_err(io::Error::other)?;
    let noting = Arc::new(Noting { key, seen: Mutex::default() });
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?;
    let builder = match roots {
        Some(roots) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(roots, provider).build().map_err(io::Error::other)?,
        ),
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_cert_resolver(noting.clone());
    let mut conn = ServerConnection::new(Arc::new(config)).map_err(io::Error::other)?;
    let mut tcp = stream;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut tcp) {
            println!("tls peer={peer} handshake failed: {e}");
            return Ok(());
        }
    }
    let report = {
        let hello = noting.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let client_cert = conn.peer_certificates().and_then(|c| c.first()).map_or("-".to_owned(), |leaf| {
            let mut digest = Fnv1a64::default();
            digest.update(leaf);
            digest.hex()
        });
        let alpn = if hello.alpn.is_empty() { "-".to_owned() } else { hello.alpn.join(",") };
        format!("sni={} alpn={alpn} client_cert={client_cert}", hello.sni.as_deref().unwrap_or("-"))
    };
    println!("tls peer={peer} {report}");
    let mut reader = BufReader::new(StreamOwned::new(conn, tcp));
    loop {
        let head = match read_head(&mut reader)? {
            None => return Ok(()),
            Some(head) => head,
        };
        let parsed = head.and_then(|h| parse_head(&h)).and_then(|r| r.body_kind().map(|k| (r, k)));
        let (request, kind) = match parsed {
            Ok(parsed) => parsed,
            Err(BadRequest(reason)) => {
                println!("request peer={peer} - - 400 {reason}");
                return Ok(());
            }
        };
        if let Err(BadRequest(reason)) = read_body(&mut reader, kind, |_| {})? {
            println!("request peer={peer} - - 400 {reason}");
            return Ok(());
        }
        let body = format!("hello from {name} {report} path={}\n", request.path());
        println!(
            "request peer={peer} {} {} 200 host={} {report}",
            request.method,
            request.target,
            request.header("host").unwrap_or("-")
        );
        let keep_alive = request.keep_alive();
        let writer = reader.get_mut();
        write!(
            writer,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-served-by: {name}\r\n{}\r\n{body}",
            body.len(),
            if keep_alive { "" } else { "connection: close\r\n" }
        )?;
        writer.flush()?;
        if !keep_alive {
            writer.conn.send_close_notify();
            let _ = writer.flush();
            return Ok(());
        }
    }
}
