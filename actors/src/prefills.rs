//! The prompts an endpoint is prefilling right now, so that a request whose prompt shares a long
//! prefix with one of them waits for that prefill to end instead of computing the same tokens
//! beside it.
//!
//! No inference server shares a prefill in progress. llama.cpp runs two requests of one prompt in
//! two slots, each computing the whole prompt (on a CPU, each at half the speed: both finish when
//! one prefill after the other would have, and the prompt's cache is paid twice). vLLM computes a
//! block for each request scheduled in the same step, and a request that arrives during another's
//! prefill step finds that prompt's blocks only when the step has ended. So a request routed to an
//! endpoint that is prefilling its prefix waits for that stream's first token (the end of its
//! prefill), then goes, and finds the prefix cached: it starts about when it would have on a GPU,
//! far sooner on a CPU server, and the fleet prefills the prompt once.
//!
//! Only streams are registered (a non-streamed answer shows no end of prefill), and only when the
//! part still to compute is at least [`MIN_HOLD_BLOCKS`]. A request waits only for the blocks
//! another is computing now (beyond what was cached when that one started), and only until the
//! first of: that stream's first token, the time its prefill should take (half as long again as
//! the endpoint's learned prefill of those blocks: a first token later than that is late for
//! another reason, a queue or a latency spike, and the blocks are probably computed),
//! `upstream.prefill_hold_ms`, the request's deadline. A prefill that ends in failure wakes its
//! waiters as well, and they go on as they would have.
//!
//! llama.cpp's server keeps a prompt's KV in the slot that computed it until that request ends:
//! a request of the same prompt that starts before then gets another slot and computes the
//! prompt again, first token or not (on two servers with two slots each, this was most of the
//! cold prefills left above the ideal one per prompt). On an endpoint known to bind slots that
//! way ([`crate::endpoint::Endpoint::binds_slots`], from its `/metrics` names), every request
//! registers its whole prompt (cached or not, streamed or not: a warm request binds the prompt's
//! KV to its slot as well) until it ends, with no due time of its own: that end comes for sure,
//! and the waiter's limits (`upstream.prefill_hold_ms`, its deadline) bound the wait.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Blocks (64 prompt bytes each, about 16 tokens) a prefill must compute, and a waiting request
/// share with it, for a hold to be worth it: ~256 tokens, a few ms on a GPU, a second on a CPU.
pub const MIN_HOLD_BLOCKS: usize = 16;

/// The prefills in progress on one endpoint.
#[derive(Debug, Default)]
pub struct Prefills {
    entries: Mutex<Vec<Entry>>,
    /// `entries.len()`, read without the lock: most requests find nothing to wait for.
    len: AtomicUsize,
    next_id: AtomicU64,
    /// Woken whenever a prefill ends; a waiter checks whether it was the one it waits for.
    ended: Notify,
    /// Requests that waited for a prefill here, ever.
    holds: AtomicU64,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    blocks: Arc<[u64]>,
    /// The blocks before this were cached when it started: it computes `blocks[from..]`.
    from: usize,
    /// When its prefill should have ended; `None` on an endpoint that binds slots, where it ends
    /// exactly with its request and only the waiter's own limits bound the wait.
    due: Option<Instant>,
}

impl Prefills {
    /// Registers a stream's prefill of `blocks[from..]`, expected to take `expected` (`None`:
    /// until it is ended, however long); `None` when that is too short to hold anyone for. End it
    /// with [`Prefills::end`].
    pub fn begin(&self, blocks: &[u64], from: usize, expected: Option<Duration>) -> Option<u64> {
        if blocks.len().saturating_sub(from) < MIN_HOLD_BLOCKS {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let blocks = blocks.into();
        let mut entries = self.lock();
        entries.push(Entry {
            id,
            blocks,
            from,
            due: expected.map(|expected| Instant::now() + expected.mul_f64(1.5)),
        });
        self.len.store(entries.len(), Ordering::Relaxed);
        Some(id)
    }

    /// The prefill `id` ended (its first token, or its request ended or failed).
    pub fn end(&self, id: u64) {
        let mut entries = self.lock();
        if let Some(i) = entries.iter().position(|e| e.id == id) {
            entries.swap_remove(i);
        }
        self.len.store(entries.len(), Ordering::Relaxed);
        drop(entries);
        self.ended.notify_waiters();
    }

    /// The prefill in progress (its id and when it is due) that computes the most of `blocks`'
    /// prefix that was not cached, if that is at least [`MIN_HOLD_BLOCKS`].
    pub(crate) fn computing(&self, blocks: &[u64]) -> Option<(u64, Option<Instant>)> {
        self.lock()
            .iter()
            .map(|e| {
                let computing = shared_prefix(&e.blocks, blocks).saturating_sub(e.from);
                (e.id, e.due, computing)
            })
            .filter(|&(_, _, computing)| computing >= MIN_HOLD_BLOCKS)
            .max_by_key(|&(_, _, computing)| computing)
            .map(|(id, due, _)| (id, due))
    }

    /// Waits, at most `limit` and not past the other prefill's due time, while this endpoint
    /// computes a long part of `blocks`' prefix for another request. Returns whether it waited.
    pub async fn wait_for(&self, blocks: &[u64], limit: Duration) -> bool {
        if limit.is_zero()
            || blocks.len() < MIN_HOLD_BLOCKS
            || self.len.load(Ordering::Relaxed) == 0
        {
            return false;
        }
        let Some((id, due)) = self.computing(blocks) else {
            return false;
        };
        let limit = Instant::now() + limit;
        let until = due.map_or(limit, |due| due.min(limit));
        if until <= Instant::now() {
            return false;
        }
        self.holds.fetch_add(1, Ordering::Relaxed);
        let ended = async {
            loop {
                let notified = self.ended.notified();
                tokio::pin!(notified);
                // Registered before looking, so an end between the look and the wait wakes it.
                notified.as_mut().enable();
                if !self.lock().iter().any(|e| e.id == id) {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout_at(until, ended).await;
        true
    }

    /// Requests that waited for a prefill on this endpoint, ever.
    pub fn holds(&self) -> u64 {
        self.holds.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How many leading blocks two prompts share. Block keys chain (each hashes the one before), so
/// two prompts agree on every block before the last one they agree on: a binary search finds it.
fn shared_prefix(a: &[u64], b: &[u64]) -> usize {
    let (mut agree, mut differ) = (0, a.len().min(b.len()) + 1);
    while differ - agree > 1 {
        let mid = (agree + differ) / 2;
        if a[mid - 1] == b[mid - 1] {
            agree = mid;
        } else {
            differ = mid;
        }
    }
    agree
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chained keys like the prefix index's: a prompt of `n` blocks whose first `shared` are
    /// those of prompt 0.
    fn prompt(seed: u64, shared: usize, n: usize) -> Vec<u64> {
        let mut key = 0u64;
        (0..n)
            .map(|i| {
                let block = if i < shared { 0 } else { seed };
                key = key
                    .wrapping_mul(31)
                    .wrapping_add(block * 1000 + i as u64 + 1);
                key
            })
            .collect()
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn shared_prefix_finds_the_last_common_block() {
        let a = prompt(1, 40, 60);
        assert_eq!(shared_prefix(&a, &prompt(2, 40, 50)), 40);
        assert_eq!(shared_prefix(&a, &a), 60);
        assert_eq!(shared_prefix(&a, &prompt(3, 0, 60)), 0);
        assert_eq!(shared_prefix(&a, &a[..7]), 7);
        assert_eq!(shared_prefix(&a, &[]), 0);
    }

    #[test]
    fn only_long_uncached_prefills_are_registered_and_waited_for() {
        let p = Prefills::default();
        let long = prompt(1, 40, 60);
        // 60 blocks, 50 of them cached: 10 to compute is too short to hold anyone for.
        assert_eq!(p.begin(&long, 50, Some(MINUTE)), None);
        let id = p.begin(&long, 10, Some(MINUTE)).unwrap();
        // Shares 40 blocks, 30 of them being computed: waits.
        assert_eq!(p.computing(&prompt(2, 40, 50)).map(|(id, _)| id), Some(id));
        // Shares 20, of which 10 are being computed: goes.
        assert_eq!(p.computing(&prompt(2, 20, 50)), None);
        // Shares nothing.
        assert_eq!(p.computing(&prompt(3, 0, 50)), None);
        p.end(id);
        assert_eq!(p.computing(&prompt(2, 40, 50)), None);
    }

    #[actix_rt::test]
    async fn a_waiter_goes_when_the_prefill_ends_or_at_its_limit() {
        let p = Arc::new(Prefills::default());
        let long = prompt(1, 40, 60);
        let id = p.begin(&long, 0, Some(MINUTE)).unwrap();
        let ender = {
            let p = p.clone();
            actix_rt::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                p.end(id);
            })
        };
        let start = std::time::Instant::now();
        assert!(
            p.wait_for(&prompt(2, 40, 50), Duration::from_secs(30))
                .await
        );
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(
            waited < Duration::from_secs(30),
            "woken by the end: {waited:?}"
        );
        ender.await.unwrap();
        assert_eq!(p.holds(), 1);

        // A prefill that never ends holds a request no longer than the limit...
        let stuck = p.begin(&long, 0, Some(MINUTE)).unwrap();
        let start = std::time::Instant::now();
        assert!(p.wait_for(&long, Duration::from_millis(200)).await);
        assert!(start.elapsed() >= Duration::from_millis(200));
        // ...and a zero limit turns holding off.
        assert!(!p.wait_for(&long, Duration::ZERO).await);
        p.end(stuck);

        // A first token later than half as long again as the expected prefill (100 ms) is late
        // for another reason: the waiter goes at 150 ms.
        let _late = p.begin(&long, 0, Some(Duration::from_millis(100))).unwrap();
        let start = std::time::Instant::now();
        assert!(p.wait_for(&long, MINUTE).await);
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(140), "{waited:?}");
        assert!(waited < Duration::from_secs(30), "{waited:?}");
    }

    #[actix_rt::test]
    async fn an_end_wakes_every_waiter() {
        let p = Arc::new(Prefills::default());
        let long = prompt(1, 40, 60);
        let id = p.begin(&long, 0, Some(MINUTE)).unwrap();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let p = p.clone();
                let long = long.clone();
                actix_rt::spawn(async move { p.wait_for(&long, Duration::from_secs(60)).await })
            })
            .collect();
        while p.holds() < 3 {
            tokio::task::yield_now().await;
        }
        p.end(id);
        for waiter in waiters {
            let waited = tokio::time::timeout(Duration::from_secs(20), waiter)
                .await
                .expect("woken by the end, not by its limit")
                .unwrap();
            assert!(waited);
        }
    }
}
