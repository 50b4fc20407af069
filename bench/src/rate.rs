//! `strait-load rate`: open-loop HTTP/1.1 keep-alive load at a fixed request rate.
//!
//! Each connection has at most one request outstanding and sends its share of the [`Schedule`]
//! in order. Latency counts from each request's due time, so a slow response shows in every
//! request queued behind it on its connection (no coordinated omission).
//!
//! One correction keeps the generator's own timer out of the figures. Tokio's timer fires on
//! whole milliseconds (deadlines round up to the next tick, and parking rounds again), so a send
//! is typically 1-2 ms late: counting that from the due time would swamp the ~100 µs effects the
//! benchmark looks for, and at high rates the lag would also queue the next requests on the
//! connection. So each response's service time (actual send to last byte) is replayed on the
//! schedule as an exact timer would have sent it ([`IdealTimeline`]): the request starts at its
//! due time, or when the previous request of its connection would have finished, whichever is
//! later, and its latency ends one service time after that start. Queueing behind slow responses is kept in full; only
//! the timer lag is dropped, and it is reported on its own as `send_lag_*` so a generator falling
//! behind its schedule still shows.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::{
    io::AsyncWriteExt,
    task::JoinSet,
    time::{Instant, sleep_until, timeout_at},
};

use crate::{
    http::{self, HttpError},
    latency::{self, Percentiles, round3},
    schedule::{IdealTimeline, Schedule},
    tls::{Dialer, Stream},
};

/// Read buffer per connection, reused for every response: a head plus a 1 KiB body fit in one
/// read, and larger bodies stream through it.
const READ_BUF: usize = 64 * 1024;

/// The timeline of slow requests is kept in slots this long, by due time.
const SLOT: Duration = Duration::from_millis(100);
/// A request slower than this counts as slow in the timeline: the bench's p99 bound.
const SLOW: Duration = Duration::from_millis(10);

/// A `rate` run as the command line describes it.
#[derive(Clone, Debug)]
pub struct RateConfig {
    pub target: SocketAddr,
    pub rps: u64,
    /// The measured window, after the warm-up.
    pub duration: Duration,
    /// Load at the same rate before the window, not recorded: connections, caches and the
    /// proxies' pools settle first.
    pub warmup: Duration,
    pub connections: u64,
    /// Path requested; `/bytes/N` also checks the body is N bytes.
    pub path: String,
    /// Longest wait for one response before it counts as an error and its connection is replaced.
    pub timeout: Duration,
    /// Every this many requests a connection sends `Connection: close` and the next request
    /// opens a fresh one: connection churn next to keep-alive reuse (0: never).
    pub close_every: u64,
    /// Plain TCP or TLS (`--tls-ca`, `--tls-sni`).
    pub dialer: Dialer,
    /// The `Host` header (default: the target address).
    pub host: Option<String>,
}

/// What a `rate` run prints.
#[derive(Clone, Debug, Serialize)]
pub struct RateReport {
    pub mode: &'static str,
    pub target_rps: u64,
    /// Successful responses in the window over the window's length (which stretches past the
    /// schedule when responses come late).
    pub achieved_rps: f64,
    /// Successful responses in the window.
    pub requests: u64,
    /// Requests in the window that failed: I/O, status, body length, timeout.
    pub errors: u64,
    pub duration_s: f64,
    #[serde(flatten)]
    pub latency: Percentiles,
    /// `(value_us, cumulative_fraction)` points of the latency distribution.
    pub histogram: Vec<(u64, f64)>,
    pub connections: u64,
    /// Connections opened after the first ones: replacements of closed or failed connections.
    pub reconnects: u64,
    /// How late the timer sent requests due on a free connection (kept out of the latency above).
    pub send_lag_p50_us: u64,
    pub send_lag_p99_us: u64,
    pub send_lag_max_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// The measured window's 100 ms slots (by due time) that held a request slower than 10 ms:
    /// a stall shows as a few slots, saturation as most of them, later ones worse.
    pub slow_slots: Vec<SlowSlot>,
    /// Slots in the measured window.
    pub slots: u64,
}

/// One 100 ms slot of the measured window with slow requests.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SlowSlot {
    /// Start of the slot, ms after the measured window's start.
    pub at_ms: u64,
    /// Requests due in it that took longer than 10 ms.
    pub slow: u64,
    /// The slowest of them, µs.
    pub max_us: u64,
}

/// Runs the schedule and reports on its measured window; fails if no request in it succeeded.
pub async fn run(config: RateConfig) -> anyhow::Result<RateReport> {
    let schedule = Schedule::new(config.rps, config.connections, config.warmup, config.duration)
        .context("--rps and --connections must be at least 1")?;
    if schedule.measured_requests() == 0 {
        bail!("--duration is too short for a single request at {} req/s", config.rps);
    }
    let host = config.host.clone().unwrap_or_else(|| config.target.to_string());
    let request: Arc<[u8]> = http::request(&config.path, &host, false).into();
    let closing: Arc<[u8]> = http::request(&config.path, &host, true).into();
    let expected_len = http::expected_body_len(&config.path);

    // Every connection opens before the clock starts: this mode measures requests, not handshakes.
    let mut streams = Vec::new();
    for i in 0..config.connections {
        let stream = config.dialer.dial(config.target).await.with_context(|| {
            format!("could not open connection {} of {} to {}", i + 1, config.connections, config.target)
        })?;
        streams.push(stream);
    }

    let t0 = Instant::now();
    // Past this nothing more is sent: a server that stopped answering ends the run, not hangs it.
    let deadline = t0 + schedule.end() + config.timeout;
    let mut tasks = JoinSet::new();
    for (index, stream) in (0u64..).zip(streams) {
        let connection = Connection {
            target: config.target,
            dialer: config.dialer.clone(),
            stream: Some(stream),
            request: Arc::clone(&request),
            closing: Arc::clone(&closing),
            close_every: config.close_every,
            expected_len,
            buf: vec![0u8; READ_BUF].into_boxed_slice(),
        };
        tasks.spawn(connection.drive(schedule, index, t0, config.timeout, deadline));
    }

    let mut total = Outcome::new(t0);
    while let Some(joined) = tasks.join_next().await {
        total.merge(joined.context("a connection task panicked")?)?;
    }

    let window_start = t0 + schedule.measured_start();
    let window_end = total.last_done.max(t0 + schedule.end());
    let duration = window_end.saturating_duration_since(window_start);
    if total.completed == 0 {
        bail!(
            "no request in the measured window succeeded ({} errors); first error: {}",
            total.errors,
            total.first_error.as_deref().unwrap_or("none")
        );
    }
    let lag = latency::percentiles(&total.send_lag);
    let slots = schedule.end().saturating_sub(schedule.measured_start()).as_millis().div_ceil(SLOT.as_millis());
    Ok(RateReport {
        mode: "rate",
        target_rps: config.rps,
        achieved_rps: round3(total.completed as f64 / duration.as_secs_f64()),
        requests: total.completed,
        errors: total.errors,
        duration_s: round3(duration.as_secs_f64()),
        latency: latency::percentiles(&total.latency),
        histogram: latency::chart(&total.latency),
        connections: config.connections,
        reconnects: total.reconnects,
        send_lag_p50_us: lag.p50_us,
        send_lag_p99_us: lag.p99_us,
        send_lag_max_us: lag.max_us,
        first_error: total.first_error,
        slow_slots: total.slow_slots.into_iter().filter(|s| s.slow > 0).collect(),
        slots: u64::try_from(slots).unwrap_or(u64::MAX),
    })
}

/// One keep-alive connection and what it reuses for every request.
struct Connection {
    target: SocketAddr,
    dialer: Dialer,
    /// `None` after an error or a `Connection: close`; the next request reconnects.
    stream: Option<Stream>,
    /// The request bytes, shared by all connections.
    request: Arc<[u8]>,
    /// The same request with `Connection: close`, sent every `close_every` requests.
    closing: Arc<[u8]>,
    close_every: u64,
    /// Body length every response must have, for `/bytes/N` paths.
    expected_len: Option<u64>,
    buf: Box<[u8]>,
}

impl Connection {
    /// Sends this connection's share of the schedule and records the measured requests.
    async fn drive(
        mut self,
        schedule: Schedule,
        index: u64,
        t0: Instant,
        timeout: Duration,
        deadline: Instant,
    ) -> Outcome {
        let mut outcome = Outcome::new(t0);
        let window_start = t0 + schedule.measured_start();
        // When the previous request really finished: until then this connection cannot send.
        let mut free_at = t0;
        let mut ideal = IdealTimeline::default();
        for (nth, k) in (1u64..).zip(schedule.requests_of(index)) {
            let close = self.close_every > 0 && nth.is_multiple_of(self.close_every);
            let due = t0 + schedule.offset(k);
            let lagging_timer = free_at <= due;
            if lagging_timer {
                sleep_until(due).await;
            }
            let sent = Instant::now();
            let result = if sent >= deadline {
                Err("the run's deadline passed before this request could be sent".to_owned())
            } else {
                match timeout_at(deadline.min(sent + timeout), self.exchange(close, &mut outcome.reconnects)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no response within {timeout:?}")),
                }
            };
            let done = Instant::now();
            free_at = done;
            let latency = ideal.latency(due - t0, done - sent);
            if result.is_err() {
                self.stream = None;
            }
            if !schedule.is_measured(k) {
                continue;
            }
            match result {
                Ok(()) => {
                    latency::record(&mut outcome.latency, latency);
                    if latency > SLOW {
                        outcome.note_slow(due.saturating_duration_since(window_start), latency);
                    }
                    if lagging_timer {
                        latency::record(&mut outcome.send_lag, sent - due);
                    }
                    outcome.completed += 1;
                    outcome.last_done = done;
                }
                Err(e) => {
                    outcome.errors += 1;
                    outcome.first_error.get_or_insert(e);
                }
            }
        }
        outcome
    }

    /// One request and its response, on the open connection or a new one (counted in
    /// `reconnects`); `close` asks the server to close after it.
    async fn exchange(&mut self, close: bool, reconnects: &mut u64) -> Result<(), HttpError> {
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let stream = self.dialer.dial(self.target).await?;
                *reconnects += 1;
                self.stream.insert(stream)
            }
        };
        stream.write_all(if close { &self.closing } else { &self.request }).await?;
        stream.flush().await?;
        let head = http::read_response(stream, &mut self.buf).await?;
        head.check(self.expected_len)?;
        if head.close || close {
            self.stream = None;
        }
        Ok(())
    }
}

/// What one connection (or, merged, the whole run) measured in the window.
struct Outcome {
    latency: Histogram<u64>,
    send_lag: Histogram<u64>,
    completed: u64,
    errors: u64,
    reconnects: u64,
    first_error: Option<String>,
    /// When the last successful measured response completed.
    last_done: Instant,
    /// Slow requests by 100 ms slot of the measured window (grown as slow ones come).
    slow_slots: Vec<SlowSlot>,
}

impl Outcome {
    fn new(t0: Instant) -> Self {
        Self {
            latency: latency::new_histogram(),
            send_lag: latency::new_histogram(),
            completed: 0,
            errors: 0,
            reconnects: 0,
            first_error: None,
            last_done: t0,
            slow_slots: Vec::new(),
        }
    }

    /// Counts a slow request due `since` after the window's start.
    fn note_slow(&mut self, since: Duration, latency: Duration) {
        let index = usize::try_from(since.as_millis() / SLOT.as_millis()).unwrap_or(usize::MAX).min(100_000);
        if self.slow_slots.len() <= index {
            self.slow_slots.resize_with(index + 1, SlowSlot::default);
        }
        let slot = &mut self.slow_slots[index];
        slot.at_ms = u64::try_from(index as u128 * SLOT.as_millis()).unwrap_or(u64::MAX);
        slot.slow += 1;
        slot.max_us = slot.max_us.max(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    fn merge(&mut self, other: Outcome) -> anyhow::Result<()> {
        self.latency.add(&other.latency).context("merging latency histograms")?;
        self.send_lag.add(&other.send_lag).context("merging send-lag histograms")?;
        self.completed += other.completed;
        self.errors += other.errors;
        self.reconnects += other.reconnects;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.last_done = self.last_done.max(other.last_done);
        if self.slow_slots.len() < other.slow_slots.len() {
            self.slow_slots.resize_with(other.slow_slots.len(), SlowSlot::default);
        }
        for (mine, theirs) in self.slow_slots.iter_mut().zip(other.slow_slots) {
            if theirs.slow > 0 {
                mine.at_ms = theirs.at_ms;
                mine.slow += theirs.slow;
                mine.max_us = mine.max_us.max(theirs.max_us);
            }
        }
        Ok(())
    }
}
