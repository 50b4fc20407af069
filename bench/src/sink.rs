//! The sink protocol of `stream` mode: the client sends bytes and shuts down its write side; the
//! server counts everything until EOF and answers with the count as 8 big-endian bytes.
//!
//! The count closes the loop that bulk TCP leaves open: a `write` returning only means the kernel
//! buffered the bytes, so the client's clock stops when the server confirms it has read them all,
//! and a count that differs from what was sent exposes a proxy that lost or invented data.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::net::ZEROS;

/// Length of the count the sink answers with.
pub const COUNT_LEN: usize = 8;

/// Why a stream did not deliver its bytes.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("the sink counted {received} bytes, {sent} were sent (a proxy in the path lost or added data)")]
    CountMismatch { sent: u64, received: u64 },
    #[error("the peer closed without sending the byte count; is the target a strait-load server?")]
    NoCount,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The count as sent on the wire.
pub fn encode_count(bytes: u64) -> [u8; COUNT_LEN] {
    bytes.to_be_bytes()
}

/// The count read from the wire.
pub fn decode_count(wire: [u8; COUNT_LEN]) -> u64 {
    u64::from_be_bytes(wire)
}

/// Server side: counts until EOF, answers with the count and closes the write side.
///
/// `already` is what the caller read before it knew this was a sink (protocol detection); `buf`
/// is the read buffer, whose size sets the syscall count on a fast stream.
pub async fn serve<S>(stream: &mut S, already: u64, buf: &mut [u8]) -> io::Result<u64>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut received = already;
    loop {
        let n = stream.read(buf).await?;
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    answer(stream, received).await?;
    Ok(received)
}

/// Server side, once EOF has been read: sends the count and closes the write side.
pub async fn answer<S>(stream: &mut S, received: u64) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    stream.write_all(&encode_count(received)).await?;
    stream.shutdown().await
}

/// Client side: sends `bytes` bytes, shuts down the write side and checks the sink's count.
pub async fn send_and_confirm<S>(stream: &mut S, bytes: u64) -> Result<(), SinkError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut left = bytes;
    while left > 0 {
        let chunk = usize::try_from(left).map_or(ZEROS.len(), |l| l.min(ZEROS.len()));
        stream.write_all(&ZEROS[..chunk]).await?;
        left -= chunk as u64;
    }
    stream.shutdown().await?;
    let mut wire = [0u8; COUNT_LEN];
    stream.read_exact(&mut wire).await.map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => SinkError::NoCount,
        _ => SinkError::Io(e),
    })?;
    match decode_count(wire) {
        received if received == bytes => Ok(()),
        received => Err(SinkError::CountMismatch { sent: bytes, received }),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::duplex;

    use super::*;

    #[test]
    fn count_is_eight_big_endian_bytes() {
        assert_eq!(encode_count(0x0102_0304_0506_0708), [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(decode_count(encode_count(64 << 20)), 64 << 20);
    }

    #[tokio::test]
    async fn client_and_sink_agree_on_the_count() {
        // A duplex buffer smaller than one write exercises partial writes and reads.
        let (mut client, mut server) = duplex(4096);
        let sink = tokio::spawn(async move {
            let mut buf = vec![0u8; 1000];
            serve(&mut server, 5, &mut buf).await
        });
        // The sink is told 5 bytes came before it started counting, as after protocol detection.
        let sent = ZEROS.len() as u64 + 12_345;
        let err = send_and_confirm(&mut client, sent).await.expect_err("the count includes the 5 bytes");
        assert!(
            matches!(err, SinkError::CountMismatch { sent: s, received } if s == sent && received == sent + 5),
            "{err:?}"
        );
        assert_eq!(sink.await.expect("join").expect("sink"), sent + 5);
    }

    #[tokio::test]
    async fn exact_count_confirms() {
        let (mut client, mut server) = duplex(64 * 1024);
        let sink = tokio::spawn(async move { serve(&mut server, 0, &mut [0u8; 4096]).await });
        send_and_confirm(&mut client, 1 << 20).await.expect("confirmed");
        assert_eq!(sink.await.expect("join").expect("sink"), 1 << 20);
    }

    #[tokio::test]
    async fn a_peer_that_closes_without_a_count_is_reported() {
        let (mut client, server) = duplex(64 * 1024);
        let peer = tokio::spawn(async move {
            let mut server = server;
            let mut buf = [0u8; 4096];
            while server.read(&mut buf).await.expect("read") > 0 {}
            // Drop without answering, like a server that is not a sink.
        });
        let err = send_and_confirm(&mut client, 10).await.expect_err("no count");
        assert!(matches!(err, SinkError::NoCount), "{err}");
        peer.await.expect("join");
    }
}
