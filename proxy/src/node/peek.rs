//! Reading a client's ClientHello without consuming it (GW-3, L7-8): a `tls[]` route of a
//! ServiceEntry host decides by SNI, and the connection then goes on, bytes untouched, to
//! wherever the route (or none) sends it.

use std::time::Duration;

use tokio::{net::TcpStream, time::Instant};

use crate::gateway::tls;

/// The most peeked: a ClientHello fits one TLS record (16 KiB), post-quantum key shares
/// included.
const MAX_HELLO: usize = 16 * 1024 + 5;

/// The SNI of the ClientHello the client sends first: `None` when it has none, or when the
/// client does not speak TLS (nothing to match `sniHosts` against). Errors: the client sent
/// no complete hello within `timeout`, or left.
pub async fn client_hello_sni(stream: &TcpStream, timeout: Duration) -> Result<Option<String>, String> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_HELLO];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(0)) => return Err("the client closed before its ClientHello".into()),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(format!("cannot read the ClientHello: {e}")),
            Err(_) => return Err(format!("no ClientHello within {timeout:?}")),
        };
        match tls::client_hello_sni(&buf[..n]) {
            Ok(Some(sni)) => return Ok(sni),
            Ok(None) if n < buf.len() => {}
            Ok(None) => return Err(format!("a ClientHello larger than {MAX_HELLO} bytes")),
            Err(_) => return Ok(None),
        }
        // A peek returns at once while any byte waits, so the rest of the hello (usually one
        // segment behind) is waited for by polling; only connections a tls route may apply to
        // get here, for a few milliseconds.
        if Instant::now() + Duration::from_millis(2) > deadline {
            return Err(format!("no complete ClientHello within {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::{ClientConfig, ClientConnection, RootCertStore, pki_types::ServerName};
    use tokio::{
        io::AsyncWriteExt as _,
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// The first flight of a rustls client asking for `server_name`.
    fn client_hello(server_name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        let name = ServerName::try_from(server_name.to_owned()).expect("name");
        let mut client = ClientConnection::new(Arc::new(config), name).expect("client");
        let mut hello = Vec::new();
        client.write_tls(&mut hello).expect("hello");
        hello
    }

    /// A connected pair: what the test writes on the first arrives on the second.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    // GW-3, L7-8: the SNI is read without consuming anything, also when the hello arrives in
    // pieces; an IP address is no SNI; bytes that are not TLS give none; a silent client or one
    // that leaves is an error.
    #[tokio::test]
    async fn reads_the_sni_and_leaves_the_bytes() {
        let hello = client_hello("edition.cnn.com");
        let (mut client, mut server) = pair().await;
        let rest = hello[hello.len() / 2..].to_vec();
        client.write_all(&hello[..hello.len() / 2]).await.expect("write");
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            client.write_all(&rest).await.expect("write");
            client
        });
        let sni = client_hello_sni(&server, Duration::from_secs(2)).await;
        assert_eq!(sni, Ok(Some("edition.cnn.com".to_owned())));
        let _client = writer.await.expect("writer");
        let mut kept = vec![0u8; hello.len()];
        tokio::io::AsyncReadExt::read_exact(&mut server, &mut kept).await.expect("read");
        assert_eq!(kept, hello, "every byte is still there for the destination");

        let (mut client, server) = pair().await;
        client.write_all(&client_hello("192.0.2.7")).await.expect("write");
        assert_eq!(client_hello_sni(&server, Duration::from_secs(2)).await, Ok(None));

        let (mut client, server) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\nHost: edition.cnn.com\r\n\r\n").await.expect("write");
        assert_eq!(client_hello_sni(&server, Duration::from_secs(2)).await, Ok(None));

        let (_client, server) = pair().await;
        let silent = client_hello_sni(&server, Duration::from_millis(100)).await;
        assert!(silent.as_ref().is_err_and(|e| e.contains("no ClientHello")), "{silent:?}");

        let (mut client, server) = pair().await;
        client.write_all(&hello[..10]).await.expect("write");
        drop(client);
        let partial = client_hello_sni(&server, Duration::from_millis(300)).await;
        assert!(partial.is_err(), "{partial:?}");
    }
}
