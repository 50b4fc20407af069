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
