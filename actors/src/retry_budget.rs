//! The gateway-wide retry budget: retries may be at most a configured fraction of requests (plus
//! a small burst), so that when the whole fleet is sick the gateway does not multiply the load on
//! it. A token bucket in one atomic: every request deposits `ratio` of a token, every retry takes
//! one whole token.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use serde::Serialize;

/// Fixed-point scale of the bucket: one token.
const TOKEN: i64 = 1000;

#[derive(Debug)]
pub struct RetryBudget {
    balance: AtomicI64,
    deposit: i64,
    cap: i64,
    retries: AtomicU64,
    denied: AtomicU64,
}

#[derive(Debug, Serialize)]
pub struct RetryBudgetStats {
    pub tokens: f64,
    pub retries: u64,
    pub denied: u64,
}

impl RetryBudget {
    /// `ratio`: retries allowed per request over time; `burst`: tokens available at start and
    /// the most that can be saved up.
    pub fn new(ratio: f64, burst: u32) -> Self {
        let cap = i64::from(burst) * TOKEN;
        Self {
            balance: AtomicI64::new(cap),
            deposit: (ratio.clamp(0.0, 1.0) * TOKEN as f64) as i64,
            cap,
            retries: AtomicU64::new(0),
            denied: AtomicU64::new(0),
        }
    }

    /// A request arrived.
    pub fn deposit(&self) {
        if self.deposit == 0 {
            return;
        }
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b < self.cap).then(|| (b + self.deposit).min(self.cap))
            });
    }

    /// Takes a token for one retry, if there is one.
    pub fn try_retry(&self) -> bool {
        let taken = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= TOKEN).then_some(b - TOKEN)
            })
            .is_ok();
        if taken {
            self.retries.fetch_add(1, Ordering::Relaxed);
        } else {
            self.denied.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    pub fn stats(&self) -> RetryBudgetStats {
        RetryBudgetStats {
            tokens: self.balance.load(Ordering::Relaxed) as f64 / TOKEN as f64,
            retries: self.retries.load(Ordering::Relaxed),
            denied: self.denied.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_by_burst_then_by_ratio() {
        let budget = RetryBudget::new(0.2, 2);
        assert!(budget.try_retry());
        assert!(budget.try_retry());
        assert!(!budget.try_retry(), "burst spent");
        for _ in 0..4 {
            budget.deposit();
        }
        assert!(!budget.try_retry(), "four requests earn 0.8 of a retry");
        budget.deposit();
        assert!(budget.try_retry(), "five requests earn one");
        let stats = budget.stats();
        assert_eq!((stats.retries, stats.denied), (3, 2));
    }

    #[test]
    fn savings_are_capped() {
        let budget = RetryBudget::new(1.0, 3);
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(budget.stats().tokens, 3.0);
    }
}
