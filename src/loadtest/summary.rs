//! Aggregation of request outcomes into the final report.
//!
//! Latencies go into HDR histograms (microsecond resolution, 3 significant
//! digits) so memory stays constant however many requests run and tail
//! percentiles stay accurate; the report itself is plain data so it can be
//! printed as a table or serialised as JSON for scripts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::client::Outcome;

/// 24 hours in microseconds: anything slower is clamped rather than resizing
/// the histogram, since such a request is broken whatever its exact latency.
const HIGHEST_US: u64 = 86_400_000_000;

/// Result of one load test run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Requests completed (ok + failed).
    pub requests: u64,
    pub ok: u64,
    pub failed: u64,
    pub elapsed_s: f64,
    /// Completed requests (ok and failed) per second of wall time.
    pub rps: f64,
    /// Successful requests per second of wall time: the throughput a benchmark compares, since
    /// fast failures would otherwise count as served load.
    pub ok_rps: f64,
    /// Total latency of successful requests; failures are fast or slow for
    /// reasons unrelated to serving and would distort the distribution.
    pub latency_ms: Percentiles,
    /// Time to the first content event of successful streams; `None` when not
    /// streaming or when no stream produced content.
    pub ttft_ms: Option<Percentiles>,
    /// Failed requests by cause, e.g. "connect", "timeout", "status 503".
    pub failures: BTreeMap<String, u64>,
}

/// Distribution of one latency measure, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// All zeros for an empty histogram, which only happens when nothing succeeded.
    fn from_histogram(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Self {
                min: 0.0,
                mean: 0.0,
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                max: 0.0,
            };
        }
        Self {
            min: ms(h.min()),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

/// Running totals, updated as each request completes.
pub(crate) struct Recorder {
    latency: Histogram<u64>,
    ttft: Histogram<u64>,
    ok: u64,
    failures: BTreeMap<String, u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_US, 3).expect("constant histogram bounds are valid")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            latency: histogram(),
            ttft: histogram(),
            ok: 0,
            failures: BTreeMap::new(),
        }
    }

    pub fn record(&mut self, outcome: &Outcome) {
        match &outcome.result {
            Ok(()) => {
                self.ok += 1;
                self.latency.saturating_record(micros(outcome.latency));
                if let Some(ttft) = outcome.ttft {
                    self.ttft.saturating_record(micros(ttft));
                }
            }
            Err(failure) => *self.failures.entry(failure.cause()).or_default() += 1,
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok
    }

    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    pub fn summary(&self, elapsed: Duration) -> Summary {
        let failed = self.failed();
        let requests = self.ok + failed;
        let elapsed_s = elapsed.as_secs_f64();
        Summary {
            requests,
            ok: self.ok,
            failed,
            elapsed_s,
            rps: rate(requests, elapsed_s),
            ok_rps: rate(self.ok, elapsed_s),
            latency_ms: Percentiles::from_histogram(&self.latency),
            ttft_ms: (!self.ttft.is_empty()).then(|| Percentiles::from_histogram(&self.ttft)),
            failures: self.failures.clone(),
        }
    }
}

pub(crate) fn rate(count: u64, elapsed_s: f64) -> f64 {
    if elapsed_s > 0.0 {
        count as f64 / elapsed_s
    } else {
        0.0
    }
}

impl Summary {
    /// A human-readable multi-line table.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "requests   {:>10}", self.requests);
        let _ = writeln!(out, "ok         {:>10}", self.ok);
        let _ = writeln!(out, "failed     {:>10}", self.failed);
        let _ = writeln!(out, "elapsed    {:>10.2} s", self.elapsed_s);
        let _ = writeln!(out, "throughput {:>10.1} req/s", self.rps);
        let _ = writeln!(out, "ok rate    {:>10.1} req/s", self.ok_rps);
        let _ = writeln!(
            out,
            "\n{:<12}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "(ms)", "min", "mean", "p50", "p90", "p99", "max"
        );
        if self.ok == 0 {
            let _ = writeln!(out, "{:<12}{:>10}", "latency", "n/a");
        } else {
            row(&mut out, "latency", &self.latency_ms);
        }
        if let Some(ttft) = &self.ttft_ms {
            row(&mut out, "ttft", ttft);
        }
        if !self.failures.is_empty() {
            let _ = writeln!(out, "\nfailures");
            for (cause, count) in &self.failures {
                let _ = writeln!(out, "  {cause:<20}{count:>10}");
            }
        }
        out
    }
}

fn row(out: &mut String, label: &str, p: &Percentiles) {
    let _ = writeln!(
        out,
        "{label:<12}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
        p.min, p.mean, p.p50, p.p90, p.p99, p.max
    );
}

#[cfg(test)]
mod tests {
    use super::super::client::Failure;
    use super::*;

    fn ok(latency_ms: u64, ttft_ms: Option<u64>) -> Outcome {
        Outcome {
            n: 0,
            due: tokio::time::Instant::now(),
            latency: Duration::from_millis(latency_ms),
            ttft: ttft_ms.map(Duration::from_millis),
            endpoint: None,
            result: Ok(()),
        }
    }

    fn failed(failure: Failure) -> Outcome {
        Outcome {
            n: 0,
            due: tokio::time::Instant::now(),
            latency: Duration::from_millis(1),
            ttft: None,
            endpoint: None,
            result: Err(failure),
        }
    }

    /// Within the histogram's 3-significant-digit bucket width.
    fn close(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() <= expected * 0.001 + 1e-9
    }

    #[test]
    fn percentiles_of_one_to_a_thousand_ms() {
        let mut rec = Recorder::new();
        for ms in 1..=1000 {
            rec.record(&ok(ms, None));
        }
        let s = rec.summary(Duration::from_secs(4));
        let p = &s.latency_ms;
        for (got, want) in [
            (p.min, 1.0),
            (p.mean, 500.5),
            (p.p50, 500.0),
            (p.p90, 900.0),
            (p.p99, 990.0),
            (p.max, 1000.0),
        ] {
            assert!(close(got, want), "got {got}, want {want}: {p:?}");
        }
        assert_eq!((s.requests, s.ok, s.failed), (1000, 1000, 0));
        assert!(close(s.rps, 250.0));
        assert!(s.ttft_ms.is_none());
    }

    #[test]
    fn failures_are_counted_by_cause_and_kept_out_of_latency() {
        let mut rec = Recorder::new();
        rec.record(&ok(10, Some(2)));
        rec.record(&ok(30, Some(4)));
        rec.record(&failed(Failure::Status(503)));
        rec.record(&failed(Failure::Status(503)));
        rec.record(&failed(Failure::Timeout));
        let s = rec.summary(Duration::from_millis(500));
        assert_eq!((s.requests, s.ok, s.failed), (5, 2, 3));
        assert!(close(s.rps, 10.0) && close(s.ok_rps, 4.0));
        assert_eq!(s.failures.get("status 503"), Some(&2));
        assert_eq!(s.failures.get("timeout"), Some(&1));
        assert!(close(s.latency_ms.mean, 20.0));
        assert!(close(s.latency_ms.max, 30.0));
        let ttft = s.ttft_ms.as_ref().expect("ttft recorded");
        assert!(close(ttft.min, 2.0) && close(ttft.max, 4.0));

        let table = s.render();
        for needle in ["requests", "latency", "ttft", "status 503", "timeout"] {
            assert!(table.contains(needle), "{needle} missing from\n{table}");
        }
    }

    #[test]
    fn nothing_recorded_gives_zeros_not_nan() {
        let s = Recorder::new().summary(Duration::ZERO);
        assert_eq!((s.requests, s.rps, s.latency_ms.mean), (0, 0.0, 0.0));
        assert!(s.render().contains("n/a"));
    }
}
