//! The gateway-wide retry budget, as Envoy's: retries in flight may be at most a fraction of the
//! requests in flight (plus a minimum), so when the whole fleet is sick the gateway does not
//! multiply the load on it, while a busy gateway can still retry in proportion. A request that
//! leaves an endpoint found dead (it refused a fresh connection, or a probe found it hung) is a
//! failover, not a retry: it takes no budget, since the endpoint is out of rotation and a dead
//! backend's whole queue must be served elsewhere. Hedges (a second attempt racing a slow first
//! token) draw on the same budget as retries.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use serde::Serialize;

#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_concurrency: usize,
    in_flight: AtomicUsize,
    retries: AtomicU64,
    denied: AtomicU64,
    failovers: AtomicU64,
    hedges: AtomicU64,
    hedges_won: AtomicU64,
}

/// One retry (or hedge) in flight; gives its place back when dropped.
#[derive(Debug)]
pub struct RetryPermit(Arc<RetryBudget>);

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Serialize)]
pub struct RetryBudgetStats {
    pub ratio: f64,
    pub min_concurrency: usize,
    pub in_flight: usize,
    pub retries: u64,
    pub denied: u64,
    pub failovers: u64,
    pub hedges: u64,
    pub hedges_won: u64,
}

impl RetryBudget {
    /// `ratio`: retries in flight allowed per request in flight; `min_concurrency`: retries
    /// allowed however few requests there are.
    pub fn new(ratio: f64, min_concurrency: usize) -> Arc<Self> {
        Arc::new(Self {
            ratio: ratio.clamp(0.0, 1.0),
            min_concurrency,
            in_flight: AtomicUsize::new(0),
            retries: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
            hedges: AtomicU64::new(0),
            hedges_won: AtomicU64::new(0),
        })
    }

    fn limit(&self, active: usize) -> usize {
        ((active as f64 * self.ratio) as usize).max(self.min_concurrency)
    }

    fn take(self: &Arc<Self>, active: usize) -> Option<RetryPermit> {
        let limit = self.limit(active);
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| RetryPermit(self.clone()))
    }

    /// A retry, if `active` requests in flight leave room for one.
    pub fn try_retry(self: &Arc<Self>, active: usize) -> Option<RetryPermit> {
        let permit = self.take(active);
        let counter = if permit.is_some() {
            &self.retries
        } else {
            &self.denied
        };
        counter.fetch_add(1, Ordering::Relaxed);
        permit
    }

    /// A hedge, under the same limit as retries.
    pub fn try_hedge(self: &Arc<Self>, active: usize) -> Option<RetryPermit> {
        let permit = self.take(active);
        if permit.is_some() {
            self.hedges.fetch_add(1, Ordering::Relaxed);
        }
        permit
    }

    pub fn hedge_won(&self) {
        self.hedges_won.fetch_add(1, Ordering::Relaxed);
    }

    /// A request left an endpoint found dead; it takes no budget.
    pub fn failover(&self) {
        self.failovers.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> RetryBudgetStats {
        RetryBudgetStats {
            ratio: self.ratio,
            min_concurrency: self.min_concurrency,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            denied: self.denied.load(Ordering::Relaxed),
            failovers: self.failovers.load(Ordering::Relaxed),
            hedges: self.hedges.load(Ordering::Relaxed),
            hedges_won: self.hedges_won.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_in_flight_are_a_share_of_requests_in_flight_with_a_minimum() {
        let budget = RetryBudget::new(0.2, 2);
        let a = budget.try_retry(0).expect("the minimum");
        let b = budget.try_retry(0).expect("the minimum");
        assert!(
            budget.try_retry(0).is_none(),
            "two in flight with nothing else"
        );
        let c = budget.try_retry(20).expect("a fifth of 20 is 4");
        let d = budget.try_retry(20).expect("a fifth of 20 is 4");
        assert!(budget.try_retry(20).is_none());
        drop((a, b));
        assert!(
            budget.try_retry(20).is_some(),
            "finished retries give their place back"
        );
        drop((c, d));
        let stats = budget.stats();
        assert_eq!((stats.retries, stats.denied, stats.in_flight), (5, 2, 0));
    }

    #[test]
    fn failovers_take_no_budget() {
        let budget = RetryBudget::new(0.0, 0);
        for _ in 0..100 {
            budget.failover();
        }
        assert!(budget.try_retry(1000).is_none());
        assert_eq!(budget.stats().failovers, 100);
    }
}
