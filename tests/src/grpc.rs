//! A gRPC client written from the public protos (h2, prost and the message types of
//! strait_proto), for the control plane's tests and benchmark: not strait's client, so the
//! control plane is checked against the protocol as Istio's and Envoy's documents define it,
//! not against strait's reading of it.
//!
//! gRPC over HTTP/2: a POST to `/package.Service/Method` with `content-type: application/grpc`
//! and `te: trailers`; each message is framed as one flag byte (0, uncompressed), a 4-byte
//! big-endian length and the protobuf bytes; the status comes in `grpc-status` and
//! `grpc-message`, in the trailers (or in the headers of a response without messages).

use std::{io, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream, client::SendRequest};
use prost::Message;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;

/// A gRPC error: the status code and message, as the server sent them.
#[derive(Debug)]
pub struct GrpcError {
    pub code: u32,
    pub message: String,
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// An HTTP/2 connection over TLS (ALPN h2) to `addr`, verified against `root` (PEM).
pub async fn connect(addr: SocketAddr, root: &Path) -> io::Result<SendRequest<Bytes>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(root).map_err(other)? {
        roots.add(cert.map_err(other)?).map_err(other)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::from(addr.ip());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await?;
    let (client, connection) = h2::client::handshake(tls).await.map_err(other)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn request(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
) -> io::Result<http::Request<()>> {
    let mut builder = http::Request::post(format!("https://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).map_err(other)
}

fn frame(message: &impl Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut framed = Vec::with_capacity(5 + body.len());
    framed.push(0);
    framed.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    framed.extend_from_slice(&body);
    Bytes::from(framed)
}

fn status_of(headers: &http::HeaderMap) -> Option<GrpcError> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers.get("grpc-message").and_then(|m| m.to_str().ok()).unwrap_or_default();
    // grpc-message is percent-encoded; the tests only look for plain words in it.
    Some(GrpcError { code, message: message.replace("%20", " ").replace("%3A", ":").replace("%2F", "/") })
}

/// Reads gRPC messages off a response body.
struct Reader {
    body: RecvStream,
    buf: BytesMut,
}

impl Reader {
    /// The next message; `Ok(Err(status))` when the stream ended with a status instead.
    async fn next<T: Message + Default>(&mut self) -> io::Result<Result<T, GrpcError>> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    let message = self.buf.split_to(len);
                    return T::decode(message.freeze()).map(Ok).map_err(other);
                }
            }
            match self.body.data().await {
                Some(chunk) => {
                    let chunk = chunk.map_err(other)?;
                    let _ = self.body.flow_control().release_capacity(chunk.len());
                    self.buf.extend_from_slice(&chunk);
                }
                None => {
                    let trailers = self.body.trailers().await.map_err(other)?.unwrap_or_default();
                    let status = status_of(&trailers)
                        .unwrap_or(GrpcError { code: 2, message: "stream ended without a status".into() });
                    return Ok(Err(status));
                }
            }
        }
    }
}

/// A unary call.
pub async fn unary<Req: Message, Resp: Message + Default>(
    client: &mut SendRequest<Bytes>,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    message: &Req,
) -> io::Result<Result<Resp, GrpcError>> {
    unary_with_headers(client, addr, path, token, &[], message).await
}

/// A unary call with more metadata (gRPC headers, such as Istio's `ClusterID`).
pub async fn unary_with_headers<Req: Message, Resp: Message + Default>(
    client: &mut SendRequest<Bytes>,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    message: &Req,
) -> io::Result<Result<Resp, GrpcError>> {
    let ready = client.clone().ready().await.map_err(other)?;
    *client = ready;
    let (response, mut send) = client.send_request(request(addr, path, token, headers)?, false).map_err(other)?;
    send.send_data(frame(message), true).map_err(other)?;
    let response = response.await.map_err(other)?;
    if let Some(status) = status_of(response.headers()).filter(|s| s.code != 0) {
        return Ok(Err(status));
    }
    let mut reader = Reader { body: response.into_body(), buf: BytesMut::new() };
    reader.next().await
}

/// A bidirectional stream (delta ADS).
pub struct BidiStream {
    send: SendStream<Bytes>,
    reader: Reader,
}

impl BidiStream {
    /// Opens `path` and sends `first` on it.
    pub async fn open(
        client: &mut SendRequest<Bytes>,
        addr: SocketAddr,
        path: &str,
        token: Option<&str>,
        first: &impl Message,
    ) -> io::Result<Result<BidiStream, GrpcError>> {
        let ready = client.clone().ready().await.map_err(other)?;
        *client = ready;
        let (response, mut send) = client.send_request(request(addr, path, token, &[])?, false).map_err(other)?;
        send.send_data(frame(first), false).map_err(other)?;
        let response = response.await.map_err(other)?;
        if let Some(status) = status_of(response.headers()).filter(|s| s.code != 0) {
            return Ok(Err(status));
        }
        Ok(Ok(BidiStream { send, reader: Reader { body: response.into_body(), buf: BytesMut::new() } }))
    }

    pub fn send(&mut self, message: &impl Message) -> io::Result<()> {
        self.send.send_data(frame(message), false).map_err(other)
    }

    /// The next message within `timeout`; `None` if none came.
    pub async fn recv<T: Message + Default>(&mut self, timeout: Duration) -> io::Result<Option<Result<T, GrpcError>>> {
        match tokio::time::timeout(timeout, self.reader.next()).await {
            Ok(result) => result.map(Some),
            Err(_) => Ok(None),
        }
    }
}
