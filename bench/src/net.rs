//! Socket helpers shared by the client modes and the server.

use std::{io, net::SocketAddr};

use tokio::net::TcpStream;

/// Bytes that every bulk body and stream is sent from, and sink reads are sized by.
///
/// A zeroed static lives in .bss: no allocation, and one copy serves every connection. 256 KiB per
/// write is large enough that syscalls are a small share of a loopback stream's cost.
pub static ZEROS: [u8; 256 * 1024] = [0; 256 * 1024];

/// Connects to `addr` with Nagle's algorithm off.
///
/// Requests and small responses go out in one write each, but a request that ever spans two
/// segments would otherwise wait for a delayed ACK (up to 40 ms), which would dwarf what we measure.
pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Whether a failed connect is worth retrying after a short pause.
///
/// These are the errors of a moment's exhaustion when thousands of connections open at once: no
/// free local port yet (`EADDRNOTAVAIL`, `EAGAIN`), a full accept queue dropping the SYN (timeout),
/// or an interrupted call.
pub fn is_transient_connect_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock
            | io::ErrorKind::AddrNotAvailable
            | io::ErrorKind::TimedOut
            | io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionRefused
    )
}
