//! An HBONE stream as a byte stream (`AsyncRead` + `AsyncWrite`), for code that speaks a
//! protocol inside the tunnel: the waypoint's HTTP server and clients, and its TCP routes.
//!
//! Reads hand out the DATA frames h2 received and reopen the flow-control window as they are
//! consumed, so a slow reader pushes back on the peer. Writes wait for send capacity instead of
//! letting h2 buffer without bound; vectored writes are gathered into one DATA frame, which
//! keeps an HTTP/1.1 response (head and body written separately by hyper) to one frame.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Keeps whatever must live as long as the stream (a pooled connection's stream count).
type Guard = Box<dyn Send + Sync>;

/// How long a stream we ended waits, once dropped, for the peer to end it too. Dropping it
/// sooner resets it (RST_STREAM), and an HTTP/2 peer may count resets against the whole
/// connection; a peer that answers our end with its own does so within a round trip.
const LINGER: Duration = Duration::from_secs(2);

/// One CONNECT stream's two halves as a byte stream.
pub struct H2Stream {
    send: SendStream<Bytes>,
    /// Always `Some` but while being dropped (see `Drop`).
    recv: Option<RecvStream>,
    /// Bytes received and not yet read: the rest of a DATA frame, or bytes put back by
    /// protocol detection.
    pending: Bytes,
    /// END_STREAM was sent.
    shut_down: bool,
    _guard: Option<Guard>,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self { send, recv: Some(recv), pending: Bytes::new(), shut_down: false, _guard: None }
    }

    /// A stream that keeps `guard` alive until it is dropped.
    pub fn with_guard(send: SendStream<Bytes>, recv: RecvStream, guard: impl Send + Sync + 'static) -> Self {
        let mut stream = Self::new(send, recv);
        stream._guard = Some(Box::new(guard));
        stream
    }

    /// Puts bytes back in front of what is still to be read (after peeking at them).
    pub fn unread(&mut self, bytes: Bytes) {
        if self.pending.is_empty() {
            self.pending = bytes;
        } else {
            let mut joined = BytesMut::with_capacity(bytes.len() + self.pending.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.pending);
            self.pending = joined.freeze();
        }
    }

    /// Waits for the next DATA frame; `None` at the end of the stream.
    pub async fn next_data(&mut self) -> io::Result<Option<Bytes>> {
        if !self.pending.is_empty() {
            return Ok(Some(std::mem::take(&mut self.pending)));
        }
        std::future::poll_fn(|cx| self.poll_frame(cx)).await
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        let Some(recv) = self.recv.as_mut() else { return Poll::Ready(Ok(None)) };
        loop {
            match ready!(recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(None)),
                Some(Ok(data)) => {
                    // The window reopens as soon as h2 hands the frame over: the bytes are ours
                    // now, held in `pending` at most one frame at a time.
                    let _ = recv.flow_control().release_capacity(data.len());
                    if !data.is_empty() {
                        return Poll::Ready(Ok(Some(data)));
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            }
        }
    }

    /// Resets the stream (the peer sees the tunnel fail, not finish).
    pub fn reset(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        // Ended on our side, not yet on the peer's: read (and discard) until it ends too,
        // rather than resetting the stream by dropping it now.
        let Some(mut recv) = self.recv.take() else { return };
        if !self.shut_down || recv.is_end_stream() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let guard = self._guard.take();
        runtime.spawn(async move {
            let drained = async {
                while let Some(Ok(data)) = recv.data().await {
                    let _ = recv.flow_control().release_capacity(data.len());
                }
            };
            let _ = tokio::time::timeout(LINGER, drained).await;
            drop(guard);
        });
    }
}

/// A reset with NO_ERROR is how a peer ends a stream it no longer reads: treat it as EOF.
fn h2_to_io(e: h2::Error) -> io::Error {
    if e.reason() == Some(h2::Reason::NO_ERROR) {
        io::Error::new(io::ErrorKind::UnexpectedEof, e)
    } else if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending.is_empty() {
            match ready!(this.poll_frame(cx)) {
                Ok(Some(data)) => this.pending = data,
                Ok(None) => return Poll::Ready(Ok(())),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        if this.pending.is_empty() {
            // An empty slice still pins the whole frame it was cut from: let it go.
            this.pending = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl H2Stream {
    /// Waits until h2 grants send capacity for up to `wanted` bytes; returns how much.
    fn poll_send_capacity(&mut self, cx: &mut Context<'_>, wanted: usize) -> Poll<io::Result<usize>> {
        if self.shut_down {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "write after shutdown")));
        }
        self.send.reserve_capacity(wanted);
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                None => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed by the peer")));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                Some(Ok(0)) => continue,
                Some(Ok(n)) => return Poll::Ready(Ok(n.min(wanted))),
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(this.poll_send_capacity(cx, buf.len()))?;
        this.send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(this.poll_send_capacity(cx, total))?;
        let mut frame = BytesMut::with_capacity(n);
        for b in bufs {
            let room = n - frame.len();
            if room == 0 {
                break;
            }
            frame.extend_from_slice(&b[..b.len().min(room)]);
        }
        this.send.send_data(frame.freeze(), false).map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2's connection task writes frames out as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.shut_down {
            this.shut_down = true;
            // END_STREAM half-closes the tunnel; a stream the peer already reset needs nothing.
            let _ = this.send.send_data(Bytes::new(), true);
        }
        Poll::Ready(Ok(()))
    }
}
