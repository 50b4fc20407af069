//! The client's request body as the engine reads it (OPS-4): a body that breaks is the
//! client's fault, told apart from upstream failures so it never feeds outlier detection; a
//! body that stalls times out; and bodies buffered for retries and mirrors share one budget.

use std::{
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::{
    sync::Notify,
    time::{Instant, Sleep},
};

use super::{body::BoxError, flags::ResponseFlags, router::Local};

/// How a client's request body failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyFault {
    /// The body broke the protocol (a bad chunk size, more or less than `content-length`).
    Malformed(String),
    /// The client went away (closed or reset) before its body was complete.
    Gone(String),
    /// No body bytes arrived for the body idle timeout.
    Idle(Duration),
}

impl BodyFault {
    /// The answer for the client, flagged as its own doing (Envoy's `DPE`, `DC`, `SI`).
    pub(super) fn local(&self) -> Local {
        match self {
            BodyFault::Malformed(why) => Local::new(StatusCode::BAD_REQUEST, "bad request body\n")
                .flagged(ResponseFlags::DPE)
                .because(format!("the client's request body is malformed: {why}")),
            BodyFault::Gone(why) => Local::new(StatusCode::BAD_REQUEST, "request body incomplete\n")
                .flagged(ResponseFlags::DC)
                .because(format!("the client went away during its request body: {why}")),
            BodyFault::Idle(after) => Local::new(StatusCode::REQUEST_TIMEOUT, "request body timeout\n")
                .flagged(ResponseFlags::SI)
                .because(format!("no request body bytes for {after:?}")),
        }
    }

    fn classify(error: &hyper::Error) -> BodyFault {
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            if let Some(h2) = cause.downcast_ref::<h2::Error>() {
                // A reset the client sent is the client leaving; an error h2 found in the
                // client's frames is a malformed request.
                let reason = h2.reason().unwrap_or(h2::Reason::INTERNAL_ERROR);
                return if h2.is_remote() || reason == h2::Reason::CANCEL || reason == h2::Reason::NO_ERROR {
                    BodyFault::Gone(h2.to_string())
                } else {
                    BodyFault::Malformed(h2.to_string())
                };
            }
            if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                return match io.kind() {
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => {
                        BodyFault::Malformed(io.to_string())
                    }
                    _ => BodyFault::Gone(io.to_string()),
                };
            }
            source = cause.source();
        }
        BodyFault::Gone(error.to_string())
    }
}

/// Where a request notes that its client's body failed, for the code deciding what the
/// failure of an upstream try means, and for the try itself, which ends at once.
#[derive(Debug, Default)]
pub struct ClientFault {
    fault: OnceLock<BodyFault>,
    noticed: Notify,
}

impl ClientFault {
    pub fn get(&self) -> Option<&BodyFault> {
        self.fault.get()
    }

    fn set(&self, fault: BodyFault) {
        if self.fault.set(fault).is_ok() {
            self.noticed.notify_one();
        }
    }

    /// Resolves once the client's body has failed.
    pub async fn failed(&self) -> &BodyFault {
        loop {
            if let Some(fault) = self.fault.get() {
                return fault;
            }
            self.noticed.notified().await;
        }
    }
}

/// The client's body: its frames, with an idle timer between them and its failure noted. The
/// timer runs only while the engine waits for the client: time spent not asking (the upstream
/// pushing back) is not the client's idleness.
pub struct RequestBody {
    inner: Incoming,
    /// `None`: no body idle timeout.
    idle: Option<Duration>,
    timer: Option<Pin<Box<Sleep>>>,
    /// The last poll found nothing: the timer is running.
    waiting: bool,
    fault: Arc<ClientFault>,
}

impl RequestBody {
    pub fn new(inner: Incoming, idle: Option<Duration>, fault: Arc<ClientFault>) -> Self {
        Self { inner, idle, timer: None, waiting: false, fault }
    }

    fn failed(&mut self, fault: BodyFault) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let message = format!("{fault:?}");
        self.fault.set(fault);
        Poll::Ready(Some(Err(message.into())))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = false;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => this.failed(BodyFault::classify(&e)),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let Some(idle) = this.idle else { return Poll::Pending };
                let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if !this.waiting {
                    this.waiting = true;
                    timer.as_mut().reset(Instant::now() + idle);
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => this.failed(BodyFault::Idle(idle)),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Bytes of request bodies held for retries and mirrors, all requests together, and the most
/// they may take: beyond it, requests stream without retries or mirrors.
#[derive(Debug)]
pub struct BodyBudget {
    used: AtomicUsize,
    limit: usize,
}

impl BodyBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { used: AtomicUsize::new(0), limit })
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    fn take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        let before = self.used.fetch_sub(bytes, Ordering::AcqRel);
        if before == bytes {
            super::memory::release_free_memory();
        }
    }
}

/// Bytes of the budget held by one request's buffer; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl Reservation {
    fn empty(budget: &Arc<BodyBudget>) -> Self {
        Self { budget: budget.clone(), bytes: 0 }
    }

    /// Grows the reservation to `bytes` if the budget has room.
    fn grow_to(&mut self, bytes: usize) -> bool {
        if bytes <= self.bytes {
            return true;
        }
        if !self.budget.take(bytes - self.bytes) {
            return false;
        }
        self.bytes = bytes;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.give_back(self.bytes);
        }
    }
}

/// A buffered body and the budget it holds, shared by the tries and mirrors that send it.
#[derive(Debug, Clone)]
pub struct Buffered {
    pub bytes: Bytes,
    pub reservation: Arc<Reservation>,
}

/// What buffering a body came to.
pub enum Buffering {
    /// The whole body, to send as often as needed.
    Complete(Buffered),
    /// Too large for one request's limit, or no room in the budget: what was read (still
    /// holding its share of the budget), and the rest of the body, to be streamed once.
    Partial { read: Vec<Bytes>, held: Reservation, rest: RequestBody },
}

/// First buffer size: most retried bodies are small JSON or gRPC messages.
const FIRST_BUFFER: usize = 16 * 1024;

/// Reads `body` into one buffer of at most `limit` bytes while the budget has room for it.
/// The buffer's capacity, not just its length, is taken from the budget: it grows by doubling
/// with exact reservations, so what is counted is what is allocated.
pub async fn buffer(mut body: RequestBody, limit: usize, budget: &Arc<BodyBudget>) -> Result<Buffering, BodyFault> {
    let mut reservation = Reservation::empty(budget);
    let mut buffer: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => return Err(body.fault.get().cloned().unwrap_or_else(|| BodyFault::Gone(e.to_string()))),
        };
        let Ok(data) = frame.into_data() else { continue };
        let needed = buffer.len() + data.len();
        if needed > buffer.capacity() {
            let capacity = needed.max(buffer.capacity() * 2).max(FIRST_BUFFER).min(limit);
            if needed > limit || !reservation.grow_to(capacity) {
                let read = if buffer.is_empty() { vec![data] } else { vec![Bytes::from(buffer), data] };
                return Ok(Buffering::Partial { read, held: reservation, rest: body });
            }
            buffer.reserve_exact(capacity - buffer.len());
        }
        buffer.extend_from_slice(&data);
    }
    Ok(Buffering::Complete(Buffered { bytes: Bytes::from(buffer), reservation: Arc::new(reservation) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    // OPS-4: the budget is shared; a reservation that does not fit takes nothing, and what a
    // dropped reservation held is free again.
    #[test]
    fn budget_is_shared_and_given_back() {
        let budget = BodyBudget::new(100);
        let mut a = Reservation::empty(&budget);
        let mut b = Reservation::empty(&budget);
        assert!(a.grow_to(60));
        assert!(!b.grow_to(50), "over the limit");
        assert_eq!(budget.used(), 60);
        assert!(b.grow_to(40));
        assert!(a.grow_to(60), "no growth needs no room");
        drop(a);
        assert_eq!(budget.used(), 40);
        assert!(b.grow_to(100));
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn faults_are_the_clients() {
        let cases = [
            (BodyFault::Malformed("bad chunk".into()), 400, ResponseFlags::DPE),
            (BodyFault::Gone("reset".into()), 400, ResponseFlags::DC),
            (BodyFault::Idle(Duration::from_secs(1)), 408, ResponseFlags::SI),
        ];
        for (fault, status, flag) in cases {
            let local = fault.local();
            assert_eq!((local.status.as_u16(), local.flags), (status, flag), "{fault:?}");
        }
    }
}
