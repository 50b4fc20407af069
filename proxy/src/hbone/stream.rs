//! Copies bytes between a TCP socket and an HTTP/2 stream, honouring HTTP/2 flow control in
//! both directions so that a slow reader slows the writer instead of growing buffers.
//!
//! Reads from TCP go into one `BytesMut` that is split, not copied, into DATA frames; once h2
//! has written those frames the allocation is reclaimed by `reserve`, so a steady stream
//! reuses one buffer. Buffers start small, grow while reads fill them, and are released when
//! the socket has nothing more to read, so idle connections cost no buffer.

use std::{future::poll_fn, io};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use socket2::SockRef;
use tokio::net::TcpStream;

use super::socket;
use crate::node::copy::{Copied, write_all};

const FIRST_BUFFER: usize = 16 * 1024;
const MAX_BUFFER: usize = 256 * 1024;

/// Copies until both directions are finished. `Copied::a_to_b` counts TCP → stream.
pub async fn copy(tcp: &TcpStream, send: SendStream<Bytes>, recv: RecvStream) -> (Copied, Option<io::Error>) {
    let (up, down) = tokio::join!(tcp_to_stream(tcp, send), stream_to_tcp(recv, tcp));
    (Copied { a_to_b: up.0, b_to_a: down.0 }, up.1.or(down.1))
}

fn h2_error(e: h2::Error) -> io::Error {
    io::Error::other(e)
}

async fn tcp_to_stream(tcp: &TcpStream, mut send: SendStream<Bytes>) -> (u64, Option<io::Error>) {
    let mut total = 0u64;
    let mut buffer = BytesMut::new();
    let mut size = FIRST_BUFFER;
    loop {
        if let Err(e) = tcp.readable().await {
            send.send_reset(h2::Reason::CANCEL);
            return (total, Some(e));
        }
        if buffer.capacity() < size / 2 {
            buffer.reserve(size);
        }
        match socket::read_buf(tcp, &mut buffer) {
            Ok((0, _)) => {
                // End of the client's data: END_STREAM half-closes the tunnel.
                let result = send.send_data(Bytes::new(), true).err().map(h2_error);
                return (total, result);
            }
            Ok((n, drained)) => {
                total += n as u64;
                if !drained && size < MAX_BUFFER {
                    size *= 2;
                }
                let data = buffer.split().freeze();
                if drained {
                    // The socket is empty: an idle connection holds no buffer (its spare
                    // capacity would otherwise stay allocated for the connection's life).
                    buffer = BytesMut::new();
                    size = FIRST_BUFFER;
                }
                if let Err(e) = send_all(&mut send, data).await {
                    // The peer is gone: stop reading from the client too.
                    let _ = SockRef::from(tcp).shutdown(std::net::Shutdown::Both);
                    return (total, Some(e));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Readiness was stale: idle, so hand the buffer back.
                buffer = BytesMut::new();
                size = FIRST_BUFFER;
            }
            Err(e) => {
                send.send_reset(h2::Reason::CANCEL);
                return (total, Some(e));
            }
        }
    }
}

/// Sends `data` as the window allows, waiting for capacity rather than letting h2 buffer it.
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> io::Result<()> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(h2_error(e)),
            None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed by the peer")),
        };
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        send.send_data(chunk, false).map_err(h2_error)?;
    }
    Ok(())
}

async fn stream_to_tcp(mut recv: RecvStream, tcp: &TcpStream) -> (u64, Option<io::Error>) {
    let mut total = 0u64;
    loop {
        match recv.data().await {
            None => {
                let _ = SockRef::from(tcp).shutdown(std::net::Shutdown::Write);
                return (total, None);
            }
            Some(Ok(data)) => {
                let n = data.len();
                if let Err(e) = write_all(tcp, &data).await {
                    let _ = SockRef::from(tcp).shutdown(std::net::Shutdown::Both);
                    return (total, Some(e));
                }
                total += n as u64;
                // Reopen the window only once the bytes reached the socket, so a slow
                // receiver pushes back on the sender.
                let _ = recv.flow_control().release_capacity(n);
            }
            Some(Err(e)) => {
                // Reset by the peer: make the client see the failure instead of a clean EOF.
                let _ = SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
                let _ = SockRef::from(tcp).shutdown(std::net::Shutdown::Both);
                return (total, Some(h2_error(e)));
            }
        }
    }
}
