//! Bodies the engine sends: requests to upstreams (streamed through, or buffered when a retry
//! or mirror needs to send them again) and responses to clients, which report when they end so
//! that the access line, the metrics and the connection pool learn the request is over.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use super::{
    pool::RESET_GRACE,
    request_body::{Buffered, RequestBody, Reservation},
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body on its way upstream.
pub enum UpstreamBody {
    /// Nothing (or nothing left).
    Empty,
    /// A buffered body, sent once by this try; holds its share of the buffer budget.
    Full { bytes: Option<Bytes>, _held: Arc<Reservation> },
    /// The client's body, streamed.
    Streaming(Box<Streamed>),
}

/// A streamed body: what was read before streaming was decided, then the rest as it arrives.
pub struct Streamed {
    /// Read while trying to buffer, front first, and the budget share those bytes hold.
    prefix: VecDeque<Bytes>,
    held: Option<Reservation>,
    body: RequestBody,
    /// Body bytes sent, for telemetry.
    counted: Arc<AtomicU64>,
    opened: Instant,
    /// A failure of the client's body, held back until the stream is `RESET_GRACE` old.
    failed: Option<(BoxError, Pin<Box<Sleep>>)>,
}

impl UpstreamBody {
    pub fn full(buffered: Buffered) -> Self {
        if buffered.bytes.is_empty() {
            UpstreamBody::Empty
        } else {
            UpstreamBody::Full { bytes: Some(buffered.bytes), _held: buffered.reservation }
        }
    }

    /// Streams `prefix` (holding `held`), then the rest of `body`.
    pub fn streaming(
        prefix: Vec<Bytes>,
        held: Option<Reservation>,
        body: RequestBody,
        counted: Arc<AtomicU64>,
    ) -> Self {
        UpstreamBody::Streaming(Box::new(Streamed {
            prefix: prefix.into(),
            held,
            body,
            counted,
            opened: Instant::now(),
            failed: None,
        }))
    }
}

impl Streamed {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some((_, grace)) = &mut self.failed {
            ready!(grace.as_mut().poll(cx));
            return Poll::Ready(self.failed.take().map(|(e, _)| Err(e)));
        }
        let frame = match self.prefix.pop_front() {
            Some(bytes) => {
                if self.prefix.is_empty() {
                    self.held = None;
                }
                Some(Ok(Frame::data(bytes)))
            }
            None => ready!(Pin::new(&mut self.body).poll_frame(cx)),
        };
        match frame {
            Some(Err(e)) if self.opened.elapsed() < RESET_GRACE => {
                self.failed = Some((e, Box::pin(tokio::time::sleep_until(self.opened + RESET_GRACE))));
                self.poll_frame(cx)
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.counted.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => Poll::Ready(other),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Empty => Poll::Ready(None),
            UpstreamBody::Full { bytes, .. } => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            UpstreamBody::Streaming(streamed) => streamed.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Full { bytes, .. } => bytes.is_none(),
            UpstreamBody::Streaming(s) => s.prefix.is_empty() && s.failed.is_none() && s.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Full { bytes, .. } => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            UpstreamBody::Streaming(s) => {
                let read: u64 = s.prefix.iter().map(|b| b.len() as u64).sum();
                let rest = s.body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + read);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + read);
                }
                hint
            }
        }
    }
}

/// How a response body ended.
#[derive(Debug, Clone, Copy, Default)]
pub struct BodyEnd {
    /// Body bytes sent to the client.
    pub bytes: u64,
    /// Whether the whole body went out (else the client or the upstream broke off).
    pub complete: bool,
    /// `grpc-status` from the trailers, when there were any.
    pub grpc_status: Option<u32>,
}

type OnEnd = Box<dyn FnOnce(BodyEnd) + Send>;

/// A response body on its way to the client; calls its `on_end` exactly once, when the body
/// ends or is dropped unfinished.
pub struct ResponseBody {
    inner: Inner,
    bytes: u64,
    grpc_status: Option<u32>,
    on_end: Option<OnEnd>,
    /// Lives as long as the body (the connection's count of requests in flight).
    _held: Option<Box<dyn Send>>,
}

enum Inner {
    Full(Option<Bytes>),
    Upstream(Incoming),
}

impl ResponseBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Self::new(Inner::Full((!bytes.is_empty()).then_some(bytes)))
    }

    pub fn empty() -> Self {
        Self::new(Inner::Full(None))
    }

    pub fn upstream(body: Incoming) -> Self {
        Self::new(Inner::Upstream(body))
    }

    fn new(inner: Inner) -> Self {
        Self { inner, bytes: 0, grpc_status: None, on_end: None, _held: None }
    }

    /// Keeps `guard` until the body is over.
    pub fn hold(&mut self, guard: impl Send + 'static) {
        self._held = Some(Box::new(guard));
    }

    /// Sets what runs when the body is over (replacing any earlier hook).
    pub fn on_end(&mut self, hook: impl FnOnce(BodyEnd) + Send + 'static) {
        self.on_end = Some(Box::new(hook));
    }

    fn finish(&mut self, complete: bool) {
        if let Some(hook) = self.on_end.take() {
            hook(BodyEnd { bytes: self.bytes, complete, grpc_status: self.grpc_status });
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A body known to be over is never polled to its end by hyper: it finished.
        let complete = self.is_end_stream();
        self.finish(complete);
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = match &mut this.inner {
            Inner::Full(bytes) => bytes.take().map(|b| Ok(Frame::data(b))),
            Inner::Upstream(body) => ready!(Pin::new(body).poll_frame(cx)).map(|f| f.map_err(BoxError::from)),
        };
        match &frame {
            None => this.finish(true),
            Some(Err(_)) => this.finish(false),
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    this.bytes += data.len() as u64;
                } else if let Some(trailers) = f.trailers_ref() {
                    this.grpc_status = super::headers::grpc_status(trailers);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(bytes) => bytes.is_none(),
            Inner::Upstream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Upstream(body) => body.size_hint(),
        }
    }
}
