//! The arithmetic both reports share: latency histograms (microseconds, hdrhistogram) and their
//! percentiles, rates and the per-month equivalent.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Seconds in the month used for "messages per month": 30 days.
pub const MONTH_SECONDS: f64 = 30.0 * 86_400.0;

/// A histogram of latencies in microseconds, from 1 µs to 1 hour with 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Records `d` (clamped to the histogram's range).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

/// Events per second over `elapsed` (0 when nothing elapsed).
pub fn rate(count: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 {
        count as f64 / s
    } else {
        0.0
    }
}

/// What a sustained `per_second` rate adds up to in a 30-day month.
pub fn per_month(per_second: f64) -> f64 {
    per_second * MONTH_SECONDS
}

/// Latency percentiles, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }

    /// `p50 1.20 ms, p90 ..., max ...`.
    pub fn line(&self) -> String {
        format!(
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms (mean {:.2} ms, n={})",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms, self.mean_ms, self.count
        )
    }
}

/// `1234567` as `1,234,567`; rates below 100 keep one decimal.
pub fn thousands(x: f64) -> String {
    if x.abs() < 100.0 && x.fract() != 0.0 {
        return format!("{x:.1}");
    }
    let s = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 {
        out.insert(0, '-');
    }
    out
}

/// 2.6e9 as `2.6 billion`, 4.1e6 as `4.1 million`.
pub fn words(x: f64) -> String {
    match x {
        x if x >= 1e9 => format!("{:.2} billion", x / 1e9),
        x if x >= 1e6 => format!("{:.2} million", x / 1e6),
        x => thousands(x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = latency_histogram();
        for ms in 1..=1000u64 {
            record(&mut h, Duration::from_millis(ms));
        }
        let p = Percentiles::of(&h);
        assert_eq!(p.count, 1000);
        // 3 significant digits: values are exact to within 0.1%.
        let close = |a: f64, b: f64| (a - b).abs() <= b * 0.001 + 1e-9;
        assert!(close(p.p50_ms, 500.0), "{p:?}");
        assert!(close(p.p90_ms, 900.0), "{p:?}");
        assert!(close(p.p99_ms, 990.0), "{p:?}");
        assert!(close(p.p999_ms, 999.0), "{p:?}");
        assert!(close(p.max_ms, 1000.0), "{p:?}");
        assert!(close(p.mean_ms, 500.5), "{p:?}");
    }

    #[test]
    fn empty_histograms_give_zeros_and_outliers_are_clamped() {
        assert_eq!(Percentiles::of(&latency_histogram()), Percentiles::default());
        let mut h = latency_histogram();
        record(&mut h, Duration::from_secs(7200));
        record(&mut h, Duration::ZERO);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn rates_and_months() {
        assert_eq!(rate(5000, Duration::from_secs(2)), 2500.0);
        assert_eq!(rate(5, Duration::ZERO), 0.0);
        // 1,000 msgs/s for 30 days is 2.592 billion.
        assert_eq!(per_month(1000.0), 2_592_000_000.0);
        assert_eq!(words(per_month(1000.0)), "2.59 billion");
        assert_eq!(words(4_100_000.0), "4.10 million");
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(12.34), "12.3");
        assert_eq!(thousands(-1000.0), "-1,000");
        assert_eq!(thousands(0.0), "0");
    }
}
