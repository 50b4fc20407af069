//! Latency histograms and their export: the percentiles of a report and the points of its chart.
//!
//! HDR histograms at 3 significant digits record any latency from 1 µs to hours within 0.1% in a
//! fixed-cost array update, so recording on the hot path allocates nothing; each connection owns
//! one and they are merged once at the end, so connections never contend on a shared one.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Significant digits kept: 0.1% resolution, the usual HDR choice for latency.
const SIGNIFICANT_DIGITS: u8 = 3;

/// Chart points per decade of "nines": 20 gives 81 points from 0 to 99.99%.
const POINTS_PER_DECADE: u32 = 20;
/// Decades of nines the chart reaches: 4 is 99.99%, as far as a few 10^4 samples support.
const DECADES: u32 = 4;

/// An empty latency histogram in microseconds.
///
/// It starts small and grows to the largest value recorded, so an idle connection's histogram
/// stays a few KiB; growth happens at most a few times per run, not per request.
pub fn new_histogram() -> Histogram<u64> {
    let mut h = Histogram::new_with_bounds(1, 1_000_000, SIGNIFICANT_DIGITS)
        .expect("1 µs to 1 s at 3 significant digits is a valid histogram");
    h.auto(true);
    h
}

/// Records one latency, in whole microseconds.
pub fn record(h: &mut Histogram<u64>, latency: Duration) {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    // `record` grows an auto-resizing histogram; `saturating_record` would clamp to its current
    // top instead (1 s at first) and hide exactly the outliers that matter. Growing fails only for
    // values beyond u64 arithmetic, which the clamp then handles.
    if h.record(micros).is_err() {
        h.saturating_record(micros);
    }
}

/// The summary figures of a report, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

/// The summary figures of `h`; all zero when it is empty.
pub fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        p50_us: h.value_at_quantile(0.5),
        p90_us: h.value_at_quantile(0.9),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
        mean_us: round3(h.mean()),
    }
}

/// The latency distribution as `(value_us, cumulative_fraction)` points for a chart.
///
/// Fractions are spaced evenly in "nines" (1 - 10^-x for x from 0 to 4), the usual log scale for
/// latency: the tail, where meshes differ, gets as many points as the body. The last point is the
/// maximum at fraction 1. Empty when nothing was recorded.
pub fn chart(h: &Histogram<u64>) -> Vec<(u64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let steps = POINTS_PER_DECADE * DECADES;
    let mut points: Vec<(u64, f64)> = (0..=steps)
        .map(|i| {
            let fraction = 1.0 - 10f64.powf(-f64::from(i) / f64::from(POINTS_PER_DECADE));
            (h.value_at_quantile(fraction), round_fraction(fraction))
        })
        .collect();
    points.push((h.max(), 1.0));
    points
}

/// Rounds to 3 decimals: reports carry µs and seconds, where more digits are noise.
pub fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

/// Six decimals keep 99.9999% apart from 100% while keeping the JSON short.
fn round_fraction(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_is_a_monotonic_cdf_ending_at_the_max() {
        let mut h = new_histogram();
        for us in 1..=10_000u64 {
            record(&mut h, Duration::from_micros(us));
        }
        let points = chart(&h);
        assert_eq!(points.len(), 82);
        assert_eq!(points[0], (1, 0.0));
        // The maximum is reported as the top of its bucket: within 0.1% above the true one.
        let (max, fraction) = *points.last().expect("non-empty");
        assert_eq!(fraction, 1.0);
        assert!((10_000..=10_010).contains(&max), "{max}");
        assert!(points.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        // The 99.99% point: 3 significant digits put 9999 µs in the bucket that ends at 10 000 µs.
        let (value, fraction) = points[80];
        assert_eq!(fraction, 0.9999);
        assert!((9_990..=10_007).contains(&value), "{value}");
        // Median within 0.1%.
        let (median, _) = points.iter().copied().find(|&(_, f)| f >= 0.5).expect("a point past the median");
        assert!((5_000..=5_700).contains(&median), "{median}");
    }

    #[test]
    fn chart_serializes_as_pairs() {
        let mut h = new_histogram();
        record(&mut h, Duration::from_micros(250));
        let json = serde_json::to_string(&chart(&h)[..2]).expect("serializable");
        assert_eq!(json, "[[250,0.0],[250,0.108749]]");
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            record(&mut h, Duration::from_micros(us));
        }
        // Values past 1 s grow the histogram instead of being clamped.
        record(&mut h, Duration::from_secs(5));
        let p = percentiles(&h);
        // 1001 samples: the median is the 501st. Below 2048 µs buckets are 1 µs wide, so exact.
        assert_eq!((p.p50_us, p.p90_us, p.p99_us), (501, 901, 991));
        assert!((4_995_000..=5_005_000).contains(&p.max_us), "{}", p.max_us);
        assert_eq!(percentiles(&new_histogram()), Percentiles::default());
        assert!(chart(&new_histogram()).is_empty());
    }

    #[test]
    fn sub_microsecond_latencies_count_as_zero() {
        let mut h = new_histogram();
        record(&mut h, Duration::from_nanos(300));
        assert_eq!((h.len(), h.max()), (1, 0));
    }
}
