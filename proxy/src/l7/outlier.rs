//! Outlier detection (L7-4): an endpoint that answers with too many consecutive errors is
//! ejected from load balancing for `baseEjectionTime` times the number of its ejections, as
//! Envoy does, and comes back on its own when that time is up.
//!
//! Errors are counted as answers arrive, so an ejection takes effect on the very next request
//! (Envoy ejects consecutive-error outliers immediately too, not at the next `interval`).

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::model::routes::OutlierDetection;

/// What one try against an endpoint came to, as outlier detection counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryOutcome {
    /// A response with this status.
    Status(u16),
    /// The connection could not be made, or broke before a response.
    ConnectFailure,
    /// Timed out or cancelled: says nothing about the endpoint's health.
    Neutral,
}

/// An endpoint's outlier-detection state at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierStatus {
    /// How much longer the endpoint stays ejected; `None` when it is not.
    pub ejected_for: Option<Duration>,
    /// Ejections that still lengthen the next one.
    pub ejections: u32,
    pub consecutive_5xx: u32,
    pub consecutive_gateway_errors: u32,
}

/// One endpoint's health as outlier detection sees it.
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    /// Times ejected; each ejection lasts longer, and a healthy stretch brings it back down.
    ejections: u32,
    /// When the last ejection ended, to forget old ejections after a healthy `interval`.
    returned_at: Option<Instant>,
}

impl Health {
    /// Whether the endpoint may receive requests now.
    pub fn available(&self, now: Instant) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.ejected_until.is_none_or(|until| until <= now)
    }

    /// Whether the endpoint is currently ejected (for the admin API).
    pub fn ejected(&self, now: Instant) -> bool {
        !self.available(now)
    }

    /// What the admin API shows of it.
    pub fn status(&self, now: Instant) -> OutlierStatus {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        OutlierStatus {
            ejected_for: state
                .ejected_until
                .and_then(|until| until.checked_duration_since(now))
                .filter(|d| !d.is_zero()),
            ejections: state.ejections,
            consecutive_5xx: state.consecutive_5xx,
            consecutive_gateway_errors: state.consecutive_gateway,
        }
    }

    /// Counts `outcome`; returns whether the endpoint should now be ejected. The caller checks
    /// the cluster-wide budget (`may_eject`) and then calls `eject`.
    pub fn record(&self, outcome: TryOutcome, detector: &OutlierDetection, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(until) = state.ejected_until
            && until <= now
        {
            state.ejected_until = None;
            state.returned_at = Some(until);
        }
        if state.ejected_until.is_none()
            && state.ejections > 0
            && state.returned_at.is_some_and(|at| now.duration_since(at) >= detector.interval)
        {
            // Healthy for a whole interval since coming back: the next ejection starts short again.
            state.ejections -= 1;
            state.returned_at = Some(now);
        }
        let (is_5xx, is_gateway) = match outcome {
            TryOutcome::Status(s) => ((500..600).contains(&s), matches!(s, 502..=504)),
            TryOutcome::ConnectFailure => (true, true),
            TryOutcome::Neutral => return false,
        };
        state.consecutive_5xx = if is_5xx { state.consecutive_5xx + 1 } else { 0 };
        state.consecutive_gateway = if is_gateway { state.consecutive_gateway + 1 } else { 0 };
        if state.ejected_until.is_some() {
            return false;
        }
        let over = |threshold: Option<u32>, count: u32| threshold.is_some_and(|t| t > 0 && count >= t);
        over(detector.consecutive_5xx, state.consecutive_5xx)
            || over(detector.consecutive_gateway_errors, state.consecutive_gateway)
    }

    /// Ejects the endpoint for `base_ejection_time` × (ejections so far + 1).
    pub fn eject(&self, detector: &OutlierDetection, now: Instant) -> Duration {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.ejections += 1;
        let length = detector.base_ejection_time.saturating_mul(state.ejections);
        state.ejected_until = Some(now + length);
        state.consecutive_5xx = 0;
        state.consecutive_gateway = 0;
        length
    }
}

/// Whether one more of `total` endpoints may be ejected while `ejected` already are:
/// `maxEjectionPercent` caps the share, but one endpoint may always be ejected (Envoy), and
/// below `minHealthPercent` healthy endpoints ejection stops.
pub fn may_eject(detector: &OutlierDetection, ejected: usize, total: usize) -> bool {
    if ejected >= total {
        return false;
    }
    let cap = (total * detector.max_ejection_percent.min(100) as usize / 100).max(1);
    let healthy_after = total - ejected - 1;
    let min_healthy = total * detector.min_health_percent.min(100) as usize;
    ejected < cap && healthy_after * 100 >= min_healthy
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detector(consecutive: u32) -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: Some(consecutive),
            consecutive_gateway_errors: None,
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_secs(3),
            max_ejection_percent: 100,
            min_health_percent: 0,
        }
    }

    // L7-4: consecutive 5xx eject; a success in between resets the count; the ejection ends
    // after baseEjectionTime and the next lasts twice as long.
    #[test]
    fn consecutive_errors_eject_and_time_brings_back() {
        let d = detector(2);
        let h = Health::default();
        let t0 = Instant::now();
        assert!(!h.record(TryOutcome::Status(500), &d, t0));
        assert!(!h.record(TryOutcome::Status(200), &d, t0));
        assert!(!h.record(TryOutcome::Status(503), &d, t0));
        assert!(h.record(TryOutcome::ConnectFailure, &d, t0));
        assert_eq!(h.eject(&d, t0), Duration::from_secs(3));
        assert!(!h.available(t0 + Duration::from_secs(2)));
        assert!(h.available(t0 + Duration::from_secs(3)));
        let t1 = t0 + Duration::from_secs(3);
        assert!(!h.record(TryOutcome::Status(500), &d, t1));
        assert!(h.record(TryOutcome::Status(500), &d, t1));
        assert_eq!(h.eject(&d, t1), Duration::from_secs(6), "second ejection lasts longer");
        assert!(!h.record(TryOutcome::Neutral, &d, t1), "timeouts say nothing");
    }

    #[test]
    fn gateway_errors_count_only_502_to_504() {
        let d = OutlierDetection { consecutive_5xx: None, consecutive_gateway_errors: Some(1), ..detector(0) };
        let h = Health::default();
        let now = Instant::now();
        assert!(!h.record(TryOutcome::Status(500), &d, now));
        assert!(h.record(TryOutcome::Status(502), &d, now));
    }

    #[test]
    fn ejection_budget() {
        let ten = OutlierDetection { max_ejection_percent: 10, ..detector(1) };
        assert!(may_eject(&ten, 0, 2), "one endpoint may always be ejected");
        assert!(!may_eject(&ten, 1, 2));
        let all = detector(1);
        assert!(may_eject(&all, 1, 2));
        assert!(!may_eject(&all, 2, 2));
        let half_healthy = OutlierDetection { min_health_percent: 50, ..detector(1) };
        assert!(may_eject(&half_healthy, 0, 2));
        assert!(!may_eject(&half_healthy, 1, 2));
    }
}
