//! Logging that a flood cannot drown. Every log line goes through env_logger (`RUST_LOG` as usual),
//! but each source (module) may write at most [`BURST`] lines at once and [`PER_SECOND`] a second
//! after that; what it writes beyond is counted and reported with its next line. A client sending
//! malformed requests by the thousand, or a backend failing every request, then costs a few lines
//! a second instead of filling the disk, and the lines that matter still get through.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use log::{Log, Metadata, Record};

/// Lines a source may write at once.
pub const BURST: f64 = 20.0;
/// Lines a source may write per second after its burst.
pub const PER_SECOND: f64 = 5.0;

/// One source's allowance.
struct Allowance {
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
}

impl Allowance {
    /// Takes a line's token; `Some(n)` with the lines suppressed before it when it may be written.
    fn take(&mut self, now: Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * PER_SECOND).min(BURST);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// An env_logger behind a per-source rate limit.
pub struct RateLimitedLogger {
    inner: env_logger::Logger,
    sources: Mutex<HashMap<String, Allowance>>,
}

impl RateLimitedLogger {
    /// Installs the logger: `RUST_LOG` decides what is logged, `info` by default.
    pub fn install() {
        let inner =
            env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
                .build();
        let level = inner.filter();
        let logger = Self {
            inner,
            sources: Mutex::new(HashMap::new()),
        };
        if log::set_boxed_logger(Box::new(logger)).is_ok() {
            log::set_max_level(level);
        }
    }
}

impl Log for RateLimitedLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        let now = Instant::now();
        let suppressed = {
            let Ok(mut sources) = self.sources.lock() else {
                return;
            };
            let allowance = sources
                .entry(record.target().to_string())
                .or_insert_with(|| Allowance {
                    tokens: BURST,
                    refilled: now,
                    suppressed: 0,
                });
            allowance.take(now)
        };
        match suppressed {
            None => {}
            Some(0) => self.inner.log(record),
            Some(n) => self.inner.log(
                &Record::builder()
                    .args(format_args!(
                        "{} ({n} more lines from here were suppressed)",
                        record.args()
                    ))
                    .metadata(record.metadata().clone())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            ),
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_source_gets_its_burst_then_its_rate_and_counts_what_it_lost() {
        let start = Instant::now();
        let mut allowance = Allowance {
            tokens: BURST,
            refilled: start,
            suppressed: 0,
        };
        for _ in 0..BURST as usize {
            assert_eq!(allowance.take(start), Some(0));
        }
        for _ in 0..7 {
            assert_eq!(allowance.take(start), None);
        }
        assert_eq!(
            allowance.take(start + Duration::from_millis(200)),
            Some(7),
            "a fifth of a second buys one line, which reports the seven lost"
        );
    }
}
