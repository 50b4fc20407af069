//! When to renew a workload certificate and when to try again after a CA failed (ID-1): pure
//! functions of the certificate's validity and of the number of failures.
//!
//! Renewal counts from when the certificate was received, not from its `notBefore`: CAs
//! back-date `notBefore` (strait's by a minute, for slow peer clocks), so "half of notBefore to
//! notAfter" can already be past on arrival and renew in a loop, a request storm against a
//! remote CA. Renewing at about half of the real remaining life, with jitter, also spreads the
//! identities a proxy obtained together at start over time.

use std::time::{Duration, SystemTime};

/// Renew at 45-55 % of the life left when the certificate arrived: half life, as Istio does,
/// spread by ±5 % so that certificates issued together are not all renewed in the same instant.
const RENEW_FROM: f64 = 0.45;
const RENEW_SPREAD: f64 = 0.10;
/// A certificate with less life than this when received is treated as a failed request: renewing
/// it at half life would ask the CA again at once (a clock far off, or a CA misconfigured).
pub const MIN_USEFUL_LIFE: Duration = Duration::from_secs(1);
/// First retry 1 s after a failure, then 2, 4, 8 s...: a CA that blinked is asked again soon,
/// one that is down sees a handful of requests a minute from each identity, not a stream.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between attempts before jitter: a CA back after an outage is used within
/// about two minutes, far inside the default 12 h between half life and expiry.
const MAX_RETRY: Duration = Duration::from_secs(120);
/// Up to a quarter more on each wait, so proxies that lost the CA together do not retry in
/// step; less than the doubling, so successive waits always grow.
const RETRY_SPREAD: f64 = 0.25;

/// When to renew a certificate valid from `not_before` to `not_after`, received at `received`;
/// `jitter` in [0, 1) places it in the spread.
pub fn refresh_at(received: SystemTime, not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let start = received.max(not_before);
    let life = not_after.duration_since(start).unwrap_or_default();
    start + life.mul_f64(RENEW_FROM + RENEW_SPREAD * jitter.clamp(0.0, 1.0))
}

/// How long to wait after the `failures`-th failure in a row (counting from 1) before asking
/// the CA again; `jitter` in [0, 1) lengthens it by up to a quarter.
pub fn retry_after(failures: u32, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    let base = FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY);
    base.mul_f64(1.0 + RETRY_SPREAD * jitter.clamp(0.0, 1.0))
}

/// A fraction in [0, 1) derived from a certificate's serial number: fixed for one certificate,
/// unrelated between two, since CAs draw serials at random (strait's and Istio's, 128 bits).
pub fn jitter_of(serial: &str) -> f64 {
    // FNV-1a: a few lines, stable across releases (unlike `DefaultHasher`), and mixing enough
    // for hex strings.
    let hash = serial.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    (hash % 10_000) as f64 / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    // ID-1: renewal counts from receipt, not from the back-dated notBefore. The storm this
    // prevents: `--cert-ttl 1m` with notBefore a minute early made "half life" the moment of
    // issue, so the certificate was renewed on every pass of the renewal loop.
    #[test]
    fn renewal_is_half_the_life_left_at_receipt() {
        let t0 = SystemTime::UNIX_EPOCH + secs(1_000_000);
        // (received, not_before, not_after, jitter) -> seconds after t0
        let cases = [
            ((0, -60, 60), 0.5, 30.0),   // back-dated a minute: still half of the 60 s left
            ((0, -60, 60), 0.0, 27.0),   // earliest of the spread
            ((0, -60, 60), 0.999, 33.0), // latest
            ((0, 0, 86_400), 0.5, 43_200.0),
            ((0, 10, 70), 0.5, 40.0),   // the CA's clock ahead: counts from notBefore
            ((100, 0, 60), 0.5, 100.0), // expired on arrival: now (the store refuses it)
        ];
        let at = |offset: i64| if offset >= 0 { t0 + secs(offset as u64) } else { t0 - secs((-offset) as u64) };
        for ((received, not_before, not_after), jitter, expected) in cases {
            let due = refresh_at(at(received), at(not_before), at(not_after), jitter);
            let got = due.duration_since(t0).expect("after t0").as_secs_f64();
            assert!((got - expected).abs() < 0.01, "{received} {not_before} {not_after} {jitter}: {got} != {expected}");
        }
    }

    // Back-off doubles from 1 s, is capped at 2 min, and jitter never makes a wait shorter than
    // the one before it.
    #[test]
    fn retries_back_off_exponentially_up_to_a_cap() {
        let waits: Vec<u64> = (1..=9).map(|n| retry_after(n, 0.0).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 120, 120]);
        assert_eq!(retry_after(u32::MAX, 0.0), secs(120));
        assert_eq!(retry_after(3, 0.999).as_millis(), 4_999);
        for n in 1..7 {
            assert!(retry_after(n + 1, 0.0) > retry_after(n, 0.999), "wait {n} then {}", n + 1);
        }
    }

    #[test]
    fn jitter_is_stable_per_serial_and_spread_between_serials() {
        assert_eq!(jitter_of("0a1b2c"), jitter_of("0a1b2c"));
        let spread: Vec<f64> = (0..1000).map(|i| jitter_of(&format!("{i:032x}"))).collect();
        assert!(spread.iter().all(|j| (0.0..1.0).contains(j)));
        let low = spread.iter().filter(|j| **j < 0.5).count();
        assert!((400..600).contains(&low), "{low} of 1000 below one half");
    }
}
