//! The HTTP server side of the engine: one client connection, HTTP/1.1 or HTTP/2, served until
//! the client closes it, the proxy drains, or a client-side timeout of OPS-4 ends it.
//!
//! hyper's own `header_read_timeout` starts whenever it waits for a head, the idle gap between
//! keep-alive requests included, so it cannot tell a slow head from an idle client: the
//! connection's activity is tracked here instead. A head must be complete `header_timeout`
//! after its first byte (Envoy's `request_headers_timeout`); a connection with no request in
//! flight closes after `idle_timeout`; a request body's pauses are timed by `RequestBody`.
//!
//! An HTTP/2 client that cancels most of its requests right after opening them (rapid reset)
//! is cut off, as Envoy does: each cancelled request may still cost an upstream exchange.

use std::{
    convert::Infallible,
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

use super::{Downstream, HttpVersion, L7Context, drained, handle, limits::HttpLimits};

/// HTTP/2 windows towards clients: the same reasoning as towards upstreams (`pool`).
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// Largest read buffer of an HTTP/1.1 client connection. hyper's default (about 400 KiB) is
/// reached by every connection that uploads a large body, and kept while it lives: 200 stalled
/// 1 MB uploads held 80 MiB in read buffers alone. 64 KiB still reads bodies in large steps.
const HTTP1_READ_BUFFER: usize = 64 * 1024;
/// Largest request head (request line and headers), Envoy's default (`max_request_headers_kb`),
/// so what passes an Istio waypoint passes this one; larger heads get 431.
const HTTP1_MAX_HEAD: usize = 60 * 1024;
/// An HTTP/2 client that has sent nothing for this long is pinged; one that does not answer
/// within hyper's keep-alive timeout (20 s) is gone, and its streams are ended. Pings cost a
/// frame each way per idle half minute.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// A request cancelled by its client sooner than this after it arrived is a premature reset
/// (Envoy's `premature_reset_min_stream_lifetime`).
const PREMATURE_RESET_LIFETIME: Duration = Duration::from_secs(1);
/// A connection with this many premature resets, making up half its requests or more, is
/// closed. Envoy closes at 250; lower here because every reset request may leave a detached
/// upstream exchange behind (`pool::exchange`), and one connection must not fill that pool.
const PREMATURE_RESETS_MAX: u64 = 100;

/// Serves HTTP on `io` until the client closes it; every request goes to `handle`.
/// `head_started`: the client's first bytes were already read (protocol detection), so a
/// request head is under way.
pub async fn serve_http<I>(ctx: Arc<L7Context>, down: Arc<Downstream>, io: I, version: HttpVersion, head_started: bool)
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let limits = ctx.limits;
    let activity = Arc::new(Activity::new(head_started && version == HttpVersion::Http1));
    let drain = drained(ctx.drain.clone());
    let in_service = activity.clone();
    let service = service_fn(move |request| {
        let (ctx, down) = (ctx.clone(), down.clone());
        let mut in_flight = InFlight::begin(&in_service);
        async move {
            let mut response = handle(ctx, down, request).await;
            in_flight.answered = true;
            response.body_mut().hold(in_flight);
            Ok::<_, Infallible>(response)
        }
    });
    let result = match version {
        HttpVersion::Http1 => {
            let io = TokioIo::new(ActivityIo { inner: io, activity: activity.clone() });
            // Answers are small and frequent: do not hold the head back for the body.
            let connection = hyper::server::conn::http1::Builder::new()
                .writev(true)
                .max_buf_size(HTTP1_READ_BUFFER)
                .max_header_size(HTTP1_MAX_HEAD)
                .serve_connection(io, service)
                .with_upgrades();
            drive(connection, |c| c.graceful_shutdown(), &activity, limits, drain).await
        }
        HttpVersion::Http2 => {
            let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(KEEPALIVE_INTERVAL)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .serve_connection(TokioIo::new(io), service);
            drive(connection, |c| c.graceful_shutdown(), &activity, limits, drain).await
        }
    };
    if let Err(e) = result {
        tracing::debug!("downstream HTTP connection ended: {e}");
    }
}

/// Polls `connection` to its end, shutting it down gracefully when the proxy drains or the
/// client has been idle too long, and dropping it when a head takes too long.
async fn drive<C>(
    connection: C,
    graceful_shutdown: impl Fn(Pin<&mut C>),
    activity: &Activity,
    limits: HttpLimits,
    drain: impl Future<Output = ()>,
) -> Result<(), hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(connection, drain);
    let mut draining = false;
    // Once shut down for idleness: when to stop waiting for the client's goodbye.
    let mut closing: Option<Instant> = None;
    loop {
        tokio::select! {
            result = connection.as_mut() => return result,
            () = activity.abusive.notified() => {
                tracing::debug!(limit = PREMATURE_RESETS_MAX, "client resets most of its requests at once: closing the connection");
                return Ok(());
            }
            () = &mut drain, if !draining => {
                draining = true;
                graceful_shutdown(connection.as_mut());
            }
            expired = activity.expired(limits), if !draining && closing.is_none() => match expired {
                Expired::Head => {
                    tracing::debug!(timeout = ?limits.header_timeout, "request head incomplete: closing the connection");
                    return Ok(());
                }
                Expired::Idle => {
                    graceful_shutdown(connection.as_mut());
                    // An HTTP/2 goodbye waits for the client's answer to a ping; a client
                    // that does not answer gets as long as it would for a head.
                    closing = Some(Instant::now() + limits.header_timeout);
                }
            },
            () = tokio::time::sleep_until(closing.unwrap_or_else(Instant::now)), if closing.is_some() => return Ok(()),
        }
    }
}

/// Which client-side timeout ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    Head,
    Idle,
}

/// What one connection is doing, as its timeouts see it.
struct Activity {
    state: Mutex<ActivityState>,
    /// Signalled once the client has reset too many requests (`PREMATURE_RESETS_MAX`).
    abusive: tokio::sync::Notify,
    /// Whether bytes read while no request is in flight start a head (HTTP/1.1); HTTP/2
    /// connections carry pings and settings between requests.
    track_heads: bool,
}

struct ActivityState {
    in_flight: usize,
    /// Since when no request has been in flight.
    idle_since: Instant,
    /// When the first byte of the next request head arrived.
    head_since: Option<Instant>,
    /// Requests received, and those the client cancelled prematurely.
    requests: u64,
    premature_resets: u64,
}

impl Activity {
    fn new(head_started: bool) -> Self {
        let now = Instant::now();
        let state = ActivityState {
            in_flight: 0,
            idle_since: now,
            head_since: head_started.then_some(now),
            requests: 0,
            premature_resets: 0,
        };
        Self { state: Mutex::new(state), abusive: tokio::sync::Notify::new(), track_heads: head_started }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bytes_read(&self) {
        let mut state = self.lock();
        if state.in_flight == 0 && state.head_since.is_none() {
            state.head_since = Some(Instant::now());
        }
    }

    /// Resolves when a timeout runs out. Sleeps at most one header timeout at a time, so a
    /// head that starts during a long idle sleep is still timed from its first byte.
    async fn expired(&self, limits: HttpLimits) -> Expired {
        loop {
            let now = Instant::now();
            let deadline = {
                let state = self.lock();
                match (state.in_flight, state.head_since) {
                    (0, Some(head)) => Some((head + limits.header_timeout, Expired::Head)),
                    (0, None) => Some((state.idle_since + limits.idle_timeout, Expired::Idle)),
                    _ => None,
                }
            };
            if let Some((at, why)) = deadline
                && at <= now
            {
                return why;
            }
            let next_look = now + limits.header_timeout;
            tokio::time::sleep_until(deadline.map_or(next_look, |(at, _)| at.min(next_look))).await;
        }
    }
}

/// Counts one request in flight on its connection, from the head until its response is over.
struct InFlight {
    activity: Arc<Activity>,
    arrived: Instant,
    /// The response head was produced (else the client cancelled the request).
    answered: bool,
}

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> Self {
        let mut state = activity.lock();
        state.in_flight += 1;
        state.requests += 1;
        state.head_since = None;
        drop(state);
        Self { activity: activity.clone(), arrived: Instant::now(), answered: false }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.activity.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.in_flight == 0 {
            state.idle_since = Instant::now();
        }
        if !self.answered && self.arrived.elapsed() < PREMATURE_RESET_LIFETIME {
            state.premature_resets += 1;
            if state.premature_resets >= PREMATURE_RESETS_MAX && state.premature_resets * 2 >= state.requests {
                self.activity.abusive.notify_one();
            }
        }
    }
}

/// The client connection, noting when bytes arrive between requests (the start of a head).
struct ActivityIo<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for ActivityIo<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.activity.track_heads && buf.filled().len() > before {
            this.activity.bytes_read();
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ActivityIo<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HttpLimits {
        HttpLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            ..HttpLimits::default()
        }
    }

    // OPS-4: a head is timed from its first byte, an idle connection from its last response,
    // and nothing is timed while a request is in flight.
    #[tokio::test(start_paused = true)]
    async fn heads_and_idleness_are_timed_apart() {
        let activity = Arc::new(Activity::new(false));
        let started = Instant::now();
        assert_eq!(activity.expired(limits()).await, Expired::Idle);
        assert_eq!(started.elapsed(), Duration::from_secs(60));

        let activity = Arc::new(Activity::new(true));
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let request = InFlight::begin(&activity);
        tokio::time::sleep(Duration::from_secs(100)).await;
        drop(request);
        tokio::time::sleep(Duration::from_secs(30)).await;
        activity.bytes_read();
        assert_eq!(activity.expired(limits()).await, Expired::Head);
        assert_eq!(started.elapsed(), Duration::from_secs(145), "10 s after the next head's first byte");
    }

    // OPS-4: a client that cancels most of its requests as soon as it sends them is cut off;
    // one whose cancellations are rare, or late, is not.
    #[tokio::test(start_paused = true)]
    async fn premature_resets_mark_a_connection_abusive() {
        async fn requests(activity: &Arc<Activity>, n: u64, answered: bool, lasting: Duration) {
            for _ in 0..n {
                let mut request = InFlight::begin(activity);
                request.answered = answered;
                tokio::time::advance(lasting).await;
                drop(request);
            }
        }
        async fn abusive(activity: &Activity) -> bool {
            tokio::time::timeout(Duration::ZERO, activity.abusive.notified()).await.is_ok()
        }

        let activity = Arc::new(Activity::new(false));
        requests(&activity, 150, true, Duration::ZERO).await;
        requests(&activity, 100, false, Duration::ZERO).await;
        assert!(!abusive(&activity).await, "100 premature resets among 250 requests: under half");
        requests(&activity, 50, false, Duration::ZERO).await;
        assert!(abusive(&activity).await, "150 among 300");

        let late = Arc::new(Activity::new(false));
        requests(&late, 200, false, Duration::from_secs(2)).await;
        assert!(!abusive(&late).await, "cancelled after a while: not premature");
    }
}
