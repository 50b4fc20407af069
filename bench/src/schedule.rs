//! The open-loop schedule of a `rate` run: when each request is due and which connection sends it.
//!
//! Open loop means the schedule never waits for responses: request k is due at t0 + k/R whatever
//! happened before it, so a slow response delays the requests queued behind it on its connection
//! and that delay shows in their latency (no coordinated omission). Offsets are computed in integer
//! nanoseconds from k, not by adding 1/R repeatedly, so request 10^7 is as exact as request 1.

use std::time::Duration;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Which requests a run sends and when, relative to its start t0.
///
/// The warm-up comes first and runs at the same rate; the measured window follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Requests per second, the R of t0 + k/R.
    rps: u64,
    /// Keep-alive connections the requests are dealt to, round-robin.
    connections: u64,
    /// Requests due before the measured window starts; their latency is not recorded.
    warmup_requests: u64,
    /// All requests of the run, warm-up included.
    total_requests: u64,
}

impl Schedule {
    /// A run of `warmup` then `duration` at `rps` over `connections` connections.
    ///
    /// Returns `None` when `rps` or `connections` is zero: such a run would send nothing.
    pub fn new(rps: u64, connections: u64, warmup: Duration, duration: Duration) -> Option<Self> {
        if rps == 0 || connections == 0 {
            return None;
        }
        // Request k is in [0, T) exactly when k < T·R, so the count before T is ceil(T·R).
        let due_before = |t: Duration| t.as_nanos().saturating_mul(u128::from(rps)).div_ceil(NANOS_PER_SEC);
        let warmup_requests = u64::try_from(due_before(warmup)).ok()?;
        let total_requests = u64::try_from(due_before(warmup.saturating_add(duration))).ok()?;
        Some(Self { rps, connections, warmup_requests, total_requests })
    }

    /// When request `k` is due, as an offset from t0.
    pub fn offset(&self, k: u64) -> Duration {
        let nanos = u128::from(k) * NANOS_PER_SEC / u128::from(self.rps);
        // u64 nanoseconds last 584 years; a longer schedule is not a benchmark.
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// The connection (0-based) that sends request `k`.
    pub fn connection_of(&self, k: u64) -> u64 {
        k % self.connections
    }

    /// The requests connection `connection` sends, in the order it sends them.
    pub fn requests_of(&self, connection: u64) -> impl Iterator<Item = u64> + use<> {
        // usize is 64 bits on every target this runs on; the fallback only guards the cast.
        let step = usize::try_from(self.connections).unwrap_or(usize::MAX);
        (connection..self.total_requests).step_by(step)
    }

    /// Whether request `k` falls in the measured window (after the warm-up).
    pub fn is_measured(&self, k: u64) -> bool {
        k >= self.warmup_requests
    }

    /// Requests due in the measured window.
    pub fn measured_requests(&self) -> u64 {
        self.total_requests - self.warmup_requests
    }

    /// All requests of the run, warm-up included.
    pub fn total_requests(&self) -> u64 {
        self.total_requests
    }

    /// Where the measured window starts: the due time of its first request.
    pub fn measured_start(&self) -> Duration {
        self.offset(self.warmup_requests)
    }

    /// Where the schedule ends: the due time one request past the last one.
    pub fn end(&self) -> Duration {
        self.offset(self.total_requests)
    }
}

/// One connection's requests replayed as an exact timer would have sent them.
///
/// The real timer sends late (see [`crate::rate`]); this keeps, per connection, when the previous
/// request would have finished had every send been on time and every response taken the service
/// time it really took. A request then starts at its due time or at that finish, whichever is
/// later, so waiting behind a slow response counts and timer lag does not.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdealTimeline {
    /// When the previous request would have finished, as an offset from t0.
    free_at: Duration,
}

impl IdealTimeline {
    /// Takes the next request of the connection, due at `due`, whose response came `service`
    /// after it was actually sent; returns its latency counted from `due`.
    pub fn latency(&mut self, due: Duration, service: Duration) -> Duration {
        let start = self.free_at.max(due);
        self.free_at = start + service;
        self.free_at - due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn kth_request_is_due_at_k_over_r() {
        let s = Schedule::new(1000, 8, secs(0.0), secs(1.0)).expect("valid schedule");
        assert_eq!(s.offset(0), Duration::ZERO);
        assert_eq!(s.offset(1), Duration::from_millis(1));
        assert_eq!(s.offset(1500), Duration::from_millis(1500));
        // 3 rps: 1/3 s is not a whole number of nanoseconds; offsets truncate, never drift.
        let s = Schedule::new(3, 1, secs(0.0), secs(1.0)).expect("valid schedule");
        assert_eq!(s.offset(1), Duration::from_nanos(333_333_333));
        assert_eq!(s.offset(3), Duration::from_secs(1));
        assert_eq!(s.offset(30_000_000), Duration::from_secs(10_000_000));
    }

    #[test]
    fn warmup_and_window_counts() {
        let s = Schedule::new(500, 4, secs(1.0), secs(2.0)).expect("valid schedule");
        assert_eq!(s.total_requests(), 1500);
        assert_eq!(s.measured_requests(), 1000);
        assert!(!s.is_measured(499));
        assert!(s.is_measured(500));
        assert_eq!(s.measured_start(), Duration::from_secs(1));
        assert_eq!(s.end(), Duration::from_secs(3));
        // A fractional window rounds up to the requests due inside it: 0.0025 s at 1000 rps
        // holds requests 0, 1 and 2 (due at 0, 1 and 2 ms).
        let s = Schedule::new(1000, 1, secs(0.0), secs(0.0025)).expect("valid schedule");
        assert_eq!(s.total_requests(), 3);
    }

    #[test]
    fn requests_are_dealt_round_robin() {
        let s = Schedule::new(100, 3, secs(0.0), secs(0.1)).expect("valid schedule");
        assert_eq!(s.requests_of(0).collect::<Vec<_>>(), [0, 3, 6, 9]);
        assert_eq!(s.requests_of(1).collect::<Vec<_>>(), [1, 4, 7]);
        assert_eq!(s.requests_of(2).collect::<Vec<_>>(), [2, 5, 8]);
        assert!((0..10).all(|k| s.requests_of(s.connection_of(k)).any(|j| j == k)));
    }

    #[test]
    fn queueing_behind_a_slow_response_counts_from_the_due_time() {
        let ms = Duration::from_millis;
        let mut timeline = IdealTimeline::default();
        // Requests due every 10 ms; the first takes 25 ms, so the next two wait behind it.
        assert_eq!(timeline.latency(ms(0), ms(25)), ms(25));
        assert_eq!(timeline.latency(ms(10), ms(1)), ms(16));
        assert_eq!(timeline.latency(ms(20), ms(1)), ms(7));
        // By 30 ms the backlog is gone: latency is the service time again.
        assert_eq!(timeline.latency(ms(30), ms(1)), ms(1));
        // However late the timer really sent it, only the service time counts.
        assert_eq!(timeline.latency(ms(40), Duration::from_micros(120)), Duration::from_micros(120));
    }

    #[test]
    fn empty_runs_are_rejected() {
        assert_eq!(Schedule::new(0, 1, secs(0.0), secs(1.0)), None);
        assert_eq!(Schedule::new(1, 0, secs(0.0), secs(1.0)), None);
    }
}
