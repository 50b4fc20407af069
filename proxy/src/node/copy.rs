//! Copies bytes between two TCP sockets, both directions at once, for plain-TCP forwarding.
//!
//! Buffers are taken only while data flows and given back when a socket has nothing to read,
//! so an idle connection holds no buffer at all: the node proxy's memory per idle connection is
//! the sockets and one task, not 2 × buffer size. A burst starts with a small buffer and doubles
//! it while reads fill it, so bulk transfers reach large reads (fewer syscalls) quickly.

use std::io;

use socket2::SockRef;
use tokio::net::TcpStream;

const FIRST_BUFFER: usize = 16 * 1024;
const MAX_BUFFER: usize = 256 * 1024;

/// Bytes copied each way: (a → b, b → a).
#[derive(Debug, Default, Clone, Copy)]
pub struct Copied {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// Copies until both directions reached end of stream, half-closing each side as its peer
/// finishes. Returns the byte counts and the first error, if any.
pub async fn bidirectional(a: &TcpStream, b: &TcpStream) -> (Copied, Option<io::Error>) {
    let (ab, ba) = tokio::join!(one_way(a, b), one_way(b, a));
    let copied = Copied { a_to_b: ab.0, b_to_a: ba.0 };
    (copied, ab.1.or(ba.1))
}

async fn one_way(from: &TcpStream, to: &TcpStream) -> (u64, Option<io::Error>) {
    let mut total = 0u64;
    let mut buffer: Vec<u8> = Vec::new();
    let mut size = FIRST_BUFFER;
    loop {
        if let Err(e) = from.readable().await {
            return (total, Some(e));
        }
        if buffer.is_empty() {
            buffer = vec![0; size];
        }
        match from.try_read(&mut buffer) {
            Ok(0) => {
                // Pass the end of stream on; the other direction may still be sending.
                let _ = SockRef::from(to).shutdown(std::net::Shutdown::Write);
                return (total, None);
            }
            Ok(n) => {
                if let Err(e) = write_all(to, &buffer[..n]).await {
                    let _ = SockRef::from(from).shutdown(std::net::Shutdown::Read);
                    return (total, Some(e));
                }
                total += n as u64;
                if n == buffer.len() && size < MAX_BUFFER {
                    size *= 2;
                    buffer = Vec::new();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Idle: give the buffer back and start small on the next burst.
                buffer = Vec::new();
                size = FIRST_BUFFER;
            }
            Err(e) => {
                let _ = SockRef::from(to).shutdown(std::net::Shutdown::Write);
                return (total, Some(e));
            }
        }
    }
}

/// Writes all of `data`, waiting for the socket to take it.
pub(crate) async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
