//! Bytes the gateway holds on behalf of requests in flight, by where they wait, so every such
//! buffer has a bound that `/stats` and `/metrics` show and tests can assert on:
//!
//! - request bodies being read and waiting to go upstream, and answers being gathered to fill the
//!   cache, each under a gateway-wide [`ByteBudget`] (a request that would pass it is refused, a
//!   cache fill that would pass it stops filling and streams instead);
//! - chunks waiting in relay channels between the upstream read and the client write, counted per
//!   HTTP thread by [`RelayBytes`] (each relay holds at most `RELAY_DEPTH` chunks, so this is
//!   bounded by the streams held; a client that stops reading is cut off after the stall timeout).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

// ===== ByteBudget =====

/// A gateway-wide cap on bytes of one kind, shared by all threads.
#[derive(Debug)]
pub struct ByteBudget {
    used: AtomicUsize,
    peak: AtomicUsize,
    limit: usize,
    refused: AtomicU64,
}

/// Bytes taken from a [`ByteBudget`]; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<ByteBudget>,
    bytes: usize,
}

impl ByteBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            limit,
            refused: AtomicU64::new(0),
        })
    }

    /// An empty reservation, grown as bytes arrive.
    pub fn reservation(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: self.clone(),
            bytes: 0,
        }
    }

    fn take(&self, bytes: usize) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            });
        match taken {
            Ok(before) => {
                self.peak.fetch_max(before + bytes, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> BudgetStats {
        BudgetStats {
            bytes: self.used(),
            peak_bytes: self.peak.load(Ordering::Relaxed),
            limit_bytes: self.limit,
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

impl Reservation {
    /// Takes `bytes` more; `false` (and nothing taken) when the budget would be exceeded.
    pub fn grow(&mut self, bytes: usize) -> bool {
        let ok = self.budget.take(bytes);
        if ok {
            self.bytes += bytes;
        }
        ok
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct BudgetStats {
    pub bytes: usize,
    pub peak_bytes: usize,
    pub limit_bytes: usize,
    /// Reservations refused because the budget was full.
    pub refused: u64,
}

// ===== RelayBytes =====

/// One HTTP thread's bytes waiting in relay channels. The relay and the response body that reads
/// it run on the same thread, so the counter has a single writer: plain loads and stores, no
/// read-modify-write on the per-chunk path.
#[derive(Debug, Default)]
pub struct RelayBytes {
    now: AtomicU64,
    peak: AtomicU64,
}

impl RelayBytes {
    pub(crate) fn add(&self, bytes: usize) {
        let now = self.now.load(Ordering::Relaxed) + bytes as u64;
        self.now.store(now, Ordering::Relaxed);
        if now > self.peak.load(Ordering::Relaxed) {
            self.peak.store(now, Ordering::Relaxed);
        }
    }

    pub(crate) fn sub(&self, bytes: usize) {
        let now = self
            .now
            .load(Ordering::Relaxed)
            .saturating_sub(bytes as u64);
        self.now.store(now, Ordering::Relaxed);
    }
}

// ===== Buffers =====

/// Every buffer gauge of one gateway.
#[derive(Debug)]
pub struct Buffers {
    pub request_bodies: Arc<ByteBudget>,
    pub cache_fills: Arc<ByteBudget>,
    relays: Mutex<Vec<Arc<RelayBytes>>>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct BufferStats {
    pub request_bodies: BudgetStats,
    pub cache_fills: BudgetStats,
    pub relay_bytes: u64,
    /// The sum of each thread's peak: an upper bound of the gateway's peak.
    pub relay_peak_bytes: u64,
}

impl Buffers {
    pub fn new(request_body_limit: usize, cache_fill_limit: usize) -> Arc<Self> {
        Arc::new(Self {
            request_bodies: ByteBudget::new(request_body_limit),
            cache_fills: ByteBudget::new(cache_fill_limit),
            relays: Mutex::new(Vec::new()),
        })
    }

    /// A new relay counter for one HTTP thread.
    pub fn thread_relay(&self) -> Arc<RelayBytes> {
        let counter = Arc::new(RelayBytes::default());
        if let Ok(mut relays) = self.relays.lock() {
            relays.push(counter.clone());
        }
        counter
    }

    pub fn stats(&self) -> BufferStats {
        let (now, peak) = self.relays.lock().map_or((0, 0), |relays| {
            relays.iter().fold((0, 0), |(now, peak), r| {
                (
                    now + r.now.load(Ordering::Relaxed),
                    peak + r.peak.load(Ordering::Relaxed),
                )
            })
        });
        BufferStats {
            request_bodies: self.request_bodies.stats(),
            cache_fills: self.cache_fills.stats(),
            relay_bytes: now,
            relay_peak_bytes: peak,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_refuses_what_would_pass_it_and_gets_bytes_back_on_drop() {
        let budget = ByteBudget::new(100);
        let mut a = budget.reservation();
        assert!(a.grow(60));
        let mut b = budget.reservation();
        assert!(!b.grow(41), "60 + 41 > 100");
        assert!(b.grow(40));
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 40);
        let stats = budget.stats();
        assert_eq!((stats.peak_bytes, stats.refused), (100, 1));
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn relay_counters_sum_over_threads() {
        let buffers = Buffers::new(1, 1);
        let (a, b) = (buffers.thread_relay(), buffers.thread_relay());
        a.add(10);
        b.add(5);
        a.sub(10);
        let stats = buffers.stats();
        assert_eq!((stats.relay_bytes, stats.relay_peak_bytes), (5, 15));
    }
}
