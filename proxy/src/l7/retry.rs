//! Retries (L7-5): which failed tries `retryOn` allows to try again, and the jittered
//! exponential back-off between tries (Envoy's: from 25 ms, capped at 250 ms).

use std::time::Duration;

use crate::model::routes::RetryOn;

const BASE_INTERVAL: Duration = Duration::from_millis(25);
const MAX_INTERVAL: Duration = Duration::from_millis(250);

/// What one try came to, as retry policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryFailure {
    /// The upstream answered with this status (and gRPC status, from its headers).
    Status { status: u16, grpc: Option<u32> },
    /// No connection could be made.
    ConnectFailure,
    /// The connection broke before a response.
    Reset,
    /// The upstream refused the HTTP/2 stream.
    RefusedStream,
    /// The try's own time (`perTryTimeout`) ran out.
    PerTryTimeout,
}

/// Whether `retry_on` allows another try after `failure`.
pub fn allows(retry_on: &RetryOn, failure: TryFailure) -> bool {
    match failure {
        TryFailure::Status { status, grpc } => {
            (retry_on.server_error && (500..600).contains(&status))
                || (retry_on.gateway_error && matches!(status, 502..=504))
                || (retry_on.retriable_4xx && status == 409)
                || retry_on.status_codes.contains(&status)
                || grpc.is_some_and(|g| retry_on.grpc_statuses.contains(&g))
        }
        TryFailure::ConnectFailure => {
            retry_on.connect_failure || retry_on.server_error || retry_on.gateway_error || retry_on.reset
        }
        TryFailure::Reset => retry_on.reset || retry_on.server_error || retry_on.gateway_error,
        TryFailure::RefusedStream => retry_on.refused_stream || retry_on.server_error || retry_on.reset,
        // Envoy counts a try that timed out as "no response": `5xx`, `gateway-error`, `reset`.
        TryFailure::PerTryTimeout => retry_on.server_error || retry_on.gateway_error || retry_on.reset,
    }
}

/// How long to wait before retry number `retry` (1 for the first retry): uniformly random up
/// to 25 ms × 2^(retry-1), never above 250 ms, so clients retrying together spread out.
pub fn backoff(retry: u32) -> Duration {
    let ceiling = BASE_INTERVAL.saturating_mul(1u32 << retry.saturating_sub(1).min(16)).min(MAX_INTERVAL);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(250);
    Duration::from_millis(fastrand::u64(0..=millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(f: impl FnOnce(&mut RetryOn)) -> RetryOn {
        let mut r = RetryOn::default();
        f(&mut r);
        r
    }

    #[test]
    fn retry_on_classes() {
        let five_xx = on(|r| r.server_error = true);
        let gateway = on(|r| r.gateway_error = true);
        let codes = on(|r| r.status_codes = vec![503]);
        let connect = on(|r| r.connect_failure = true);
        let grpc = on(|r| r.grpc_statuses = vec![14]);
        let s = |status| TryFailure::Status { status, grpc: None };
        let cases = [
            (&five_xx, s(500), true),
            (&five_xx, s(404), false),
            (&five_xx, TryFailure::PerTryTimeout, true),
            (&gateway, s(500), false),
            (&gateway, s(503), true),
            (&codes, s(503), true),
            (&codes, s(502), false),
            (&codes, TryFailure::PerTryTimeout, false),
            (&connect, TryFailure::ConnectFailure, true),
            (&connect, TryFailure::Reset, false),
            (&grpc, TryFailure::Status { status: 200, grpc: Some(14) }, true),
            (&grpc, TryFailure::Status { status: 200, grpc: Some(2) }, false),
        ];
        for (policy, failure, expected) in cases {
            assert_eq!(allows(policy, failure), expected, "{policy:?} {failure:?}");
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for _ in 0..100 {
            assert!(backoff(1) <= Duration::from_millis(25));
            assert!(backoff(3) <= Duration::from_millis(100));
            assert!(backoff(30) <= Duration::from_millis(250));
        }
    }
}
