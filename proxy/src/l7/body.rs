//! Bodies the engine sends: requests to upstreams (streamed through, or buffered when a retry
//! or mirror needs to send them again) and responses to clients, which report when they end so
//! that the access line, the metrics and the connection pool learn the request is over.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body on its way upstream.
pub enum UpstreamBody {
    /// Nothing (or nothing left).
    Empty,
    /// A buffered body, sent once.
    Full(Option<Bytes>),
    /// The client's body, streamed, its bytes counted into `counted`.
    Streaming { body: Incoming, counted: Arc<AtomicU64> },
}

impl UpstreamBody {
    pub fn full(bytes: Bytes) -> Self {
        if bytes.is_empty() { UpstreamBody::Empty } else { UpstreamBody::Full(Some(bytes)) }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Empty => Poll::Ready(None),
            UpstreamBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            UpstreamBody::Streaming { body, counted } => {
                let frame = ready!(Pin::new(body).poll_frame(cx));
                if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
                    counted.fetch_add(data.map_or(0, |d| d.len() as u64), Ordering::Relaxed);
                }
                Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Full(bytes) => bytes.is_none(),
            UpstreamBody::Streaming { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            UpstreamBody::Streaming { body, .. } => body.size_hint(),
        }
    }
}

/// Reads a whole body of at most `limit` bytes; `Err` with what was read when it is longer
/// (the caller then gives up on buffering) or broken.
pub async fn collect_limited(mut body: Incoming, limit: usize) -> Result<Bytes, String> {
    let mut buffer = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("the request body broke: {e}"))?;
        if let Some(data) = frame.data_ref() {
            if buffer.len() + data.len() > limit {
                return Err(format!("the request body is larger than {limit} bytes"));
            }
            buffer.extend_from_slice(data);
        }
    }
    Ok(buffer.freeze())
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
        Self { inner, bytes: 0, grpc_status: None, on_end: None }
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
