//! The generator's final report: throughput, the per-month equivalent, latency percentiles
//! and the error breakdown, for people (`text`) and machines (JSON).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::stats::{latency_histogram, per_month, rate, record, thousands, words, Percentiles};

/// What a set of sends (the measured part, or the warm-up) added up to.
pub struct Tally {
    /// Requests (HTTP) or messages (SMTP) sent.
    pub units: u64,
    pub acked: u64,
    pub failed: u64,
    pub errors: HashMap<String, u64>,
    /// Latency per unit, microseconds.
    pub latency: Histogram<u64>,
    /// When the last unit completed.
    pub last_done: Option<Instant>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally { units: 0, acked: 0, failed: 0, errors: HashMap::new(), latency: latency_histogram(), last_done: None }
    }
}

impl Tally {
    /// One unit done: `acked` and `failed` messages, its errors, its latency, when it ended.
    pub fn record(&mut self, acked: u64, failed: u64, errors: impl IntoIterator<Item = String>, latency: Duration, done: Instant) {
        self.units += 1;
        self.acked += acked;
        self.failed += failed;
        for e in errors {
            *self.errors.entry(e).or_insert(0) += 1;
        }
        record(&mut self.latency, latency);
        self.last_done = Some(self.last_done.map_or(done, |d| d.max(done)));
    }

    pub fn merge(&mut self, other: Tally) {
        self.units += other.units;
        self.acked += other.acked;
        self.failed += other.failed;
        for (e, n) in other.errors {
            *self.errors.entry(e).or_insert(0) += n;
        }
        self.latency.add(&other.latency).expect("histograms with the same bounds");
        self.last_done = match (self.last_done, other.last_done) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
}

/// Message counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub attempted: u64,
    pub acknowledged: u64,
    pub failed: u64,
}

/// How the run was set up (copied into the report).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RunInfo {
    /// `smtp` or `http`.
    pub transport: String,
    /// `closed` (as fast as the connections allow) or `open` (a fixed rate).
    pub mode: String,
    /// Connections (workers).
    pub concurrency: usize,
    /// Open loop: the target in messages per second.
    pub target_rate: Option<f64>,
    /// Messages per request (HTTP personalizations; 1 for SMTP).
    pub messages_per_request: u32,
    /// The message sizes, in bytes, with their shares.
    pub sizes: Vec<(usize, f64)>,
    pub attachments: u32,
    pub recipients_per_message: u32,
    pub run_id: String,
    pub warmup_seconds: f64,
    pub ledger: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub run: RunInfo,
    /// Length of the measured window: from the end of the warm-up to the last completion.
    pub elapsed_seconds: f64,
    /// Measured messages (the warm-up is counted apart).
    pub messages: Counts,
    pub warmup: Counts,
    /// Measured requests (HTTP) or messages (SMTP).
    pub requests: u64,
    /// Acknowledged messages per second.
    pub throughput: f64,
    pub requests_per_second: f64,
    /// `throughput` sustained for a 30-day month.
    pub per_month: f64,
    /// Per request (HTTP) or message (SMTP): from the send (closed loop) or from the intended
    /// send time (open loop, so stalls are not hidden by coordinated omission) to the reply.
    pub latency: Percentiles,
    /// Error class → count, measured and warm-up together.
    pub errors: BTreeMap<String, u64>,
}

impl Report {
    /// Builds the report from the tallies; the measured window starts at `measured_from`.
    pub fn build(run: RunInfo, measured: &Tally, warmup: &Tally, measured_from: Instant) -> Report {
        let elapsed = measured.last_done.map(|d| d.saturating_duration_since(measured_from)).unwrap_or_default();
        let throughput = rate(measured.acked, elapsed);
        let mut errors = BTreeMap::new();
        for (e, n) in measured.errors.iter().chain(&warmup.errors) {
            *errors.entry(e.clone()).or_insert(0) += n;
        }
        let counts = |t: &Tally| Counts { attempted: t.acked + t.failed, acknowledged: t.acked, failed: t.failed };
        Report {
            run,
            elapsed_seconds: elapsed.as_secs_f64(),
            messages: counts(measured),
            warmup: counts(warmup),
            requests: measured.units,
            throughput,
            requests_per_second: rate(measured.units, elapsed),
            per_month: per_month(throughput),
            latency: Percentiles::of(&measured.latency),
            errors,
        }
    }

    /// The report for people.
    pub fn text(&self) -> String {
        let r = &self.run;
        let mode = match r.target_rate {
            Some(rate) => format!("open loop at {} msgs/s", thousands(rate)),
            None => "closed loop".to_string(),
        };
        let sizes: Vec<String> = r
            .sizes
            .iter()
            .map(|(s, share)| if r.sizes.len() == 1 { format!("{s} B") } else { format!("{s} B {:.0}%", share * 100.0) })
            .collect();
        let mut out = format!(
            "sluice-load {} · {mode} · {} connections · {} msgs/request · sizes {} · {} attachment(s) · run {}\n",
            r.transport,
            r.concurrency,
            r.messages_per_request,
            sizes.join(", "),
            r.attachments,
            r.run_id
        );
        let m = &self.messages;
        out.push_str(&format!(
            "measured {:.2} s after {:.1} s warm-up ({} acked, {} failed in warm-up)\n",
            self.elapsed_seconds, r.warmup_seconds, self.warmup.acknowledged, self.warmup.failed
        ));
        out.push_str(&format!(
            "messages:   {} acknowledged, {} failed ({:.3}%)\n",
            thousands(m.acknowledged as f64),
            thousands(m.failed as f64),
            if m.attempted == 0 { 0.0 } else { m.failed as f64 * 100.0 / m.attempted as f64 }
        ));
        out.push_str(&format!(
            "throughput: {} msgs/s ({} requests/s) = {} messages per 30-day month\n",
            thousands(self.throughput),
            thousands(self.requests_per_second),
            words(self.per_month)
        ));
        let per = if r.transport == "http" { "request" } else { "message" };
        let from = if r.target_rate.is_some() { "intended send time" } else { "send" };
        out.push_str(&format!("latency per {per} (from {from}): {}\n", self.latency.line()));
        if !self.errors.is_empty() {
            out.push_str("errors:\n");
            let mut errors: Vec<_> = self.errors.iter().collect();
            errors.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            for (e, n) in errors {
                out.push_str(&format!("  {n:>10}  {e}\n"));
            }
        }
        if let Some(l) = &r.ledger {
            out.push_str(&format!("ledger: {l}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_arithmetic() {
        let t0 = Instant::now();
        let mut measured = Tally::default();
        // 1,000 requests of 5 messages each, 4 of them failed, over 2 seconds.
        for i in 0..1000u64 {
            let failed = i < 4;
            let (acked, nacked) = if failed { (0, 5) } else { (5, 0) };
            let errors = failed.then(|| "http 503".to_string());
            measured.record(acked, nacked, errors, Duration::from_millis(1 + i % 10), t0 + Duration::from_millis(2 * (i + 1)));
        }
        let mut warm = Tally::default();
        warm.record(5, 0, None, Duration::from_millis(50), t0);
        warm.record(0, 5, Some("http 503".to_string()), Duration::from_millis(50), t0);
        let run = RunInfo { transport: "http".into(), mode: "closed".into(), messages_per_request: 5, ..RunInfo::default() };
        let r = Report::build(run, &measured, &warm, t0);
        assert_eq!(r.elapsed_seconds, 2.0);
        assert_eq!(r.messages, Counts { attempted: 5000, acknowledged: 4980, failed: 20 });
        assert_eq!(r.warmup, Counts { attempted: 10, acknowledged: 5, failed: 5 });
        assert_eq!(r.requests, 1000);
        assert_eq!(r.throughput, 2490.0);
        assert_eq!(r.requests_per_second, 500.0);
        assert_eq!(r.per_month, 2490.0 * 2_592_000.0);
        assert_eq!(r.errors["http 503"], 5, "warm-up errors are in the breakdown too");
        assert_eq!(r.latency.count, 1000, "the warm-up is not in the latencies");
        // hdrhistogram keeps 3 significant digits.
        assert!((r.latency.max_ms - 10.0).abs() < 0.01, "{:?}", r.latency);
        assert!((r.latency.p50_ms - 5.0).abs() < 0.01, "{:?}", r.latency);
        let text = r.text();
        assert!(text.contains("2,490 msgs/s (500 requests/s)"), "{text}");
        assert!(text.contains("6.45 billion"), "{text}");
        assert!(text.contains("4,980 acknowledged, 20 failed (0.400%)"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["transport"], "http");
        assert_eq!(json["messages"]["acknowledged"], 4980);
        assert!((json["latency"]["p99_ms"].as_f64().unwrap() - 10.0).abs() < 0.01);
    }

    #[test]
    fn tallies_merge() {
        let t0 = Instant::now();
        let mut a = Tally::default();
        a.record(1, 0, None, Duration::from_millis(1), t0);
        let mut b = Tally::default();
        b.record(0, 1, Some("x".into()), Duration::from_millis(3), t0 + Duration::from_secs(1));
        a.merge(b);
        assert_eq!((a.units, a.acked, a.failed, a.errors["x"]), (2, 1, 1, 1));
        assert_eq!(a.last_done, Some(t0 + Duration::from_secs(1)));
        assert_eq!(a.latency.len(), 2);
    }

    #[test]
    fn nothing_measured_gives_zero_rates() {
        let r = Report::build(RunInfo::default(), &Tally::default(), &Tally::default(), Instant::now());
        assert_eq!((r.elapsed_seconds, r.throughput, r.per_month), (0.0, 0.0, 0.0));
        assert!(r.text().contains("0 acknowledged"));
    }
}
