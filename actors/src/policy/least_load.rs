//! Least load: the endpoint with the least work relative to what it can run at once, where work is
//! the gateway's own in-flight count plus what the backend reports about itself on `/metrics`
//! (requests waiting, KV-cache use, scraped by the health checker every
//! `health.load_interval_ms`), and what it can run is its batch capacity. The backend's queue is
//! seen as soon as it forms, before it shows up as latency; the in-flight count is exact at the
//! moment of a pick. Of two endpoints drawn at
//! random, the one with more free batch slots wins: load counted in requests, not slots, filled
//! the largest batches first and queued on the smaller, and taking the least loaded of all sent
//! every request between two scrapes to the one that looked idle in the last (herding on stale
//! load), which made its queue the fleet's slowest percent.

use rand::RngCore;

use super::cache_aware::DEFAULT_CAPACITY;
use super::{below, Policy, PolicyKind};
use crate::endpoint::{Eligible, Endpoint};

#[derive(Debug)]
pub struct LeastLoad;

/// How full a new request would find `e`: the gateway's requests on it and the queue the backend
/// reported (counted twice: a queued request also waits for a slot) over its batch capacity,
/// plus KV-cache pressure once the cache is nearly full (then it preempts sequences). The
/// backend's running count and its KV-cache use below that are left out: scraped once a second,
/// they are stale at the moment of a pick, and weighing them made a backend caught busy by a
/// scrape look busy until the next, sending the others every request in between; its queue and
/// a full cache, rarer and longer-lived, are worth it.
pub fn load(e: &Endpoint) -> f64 {
    let (_, waiting, kv_cache) = e.reported_load();
    let capacity = match e.estimate().capacity {
        0 => DEFAULT_CAPACITY,
        n => n,
    };
    (f64::from(e.in_flight()) + 2.0 * waiting + 1.0) / f64::from(capacity)
        + (kv_cache - KV_CACHE_FULL).max(0.0) / (1.0 - KV_CACHE_FULL)
}

/// KV-cache use above which a backend starts preempting (vLLM preempts when a step finds no free
/// block).
const KV_CACHE_FULL: f64 = 0.9;

impl Policy for LeastLoad {
    fn kind(&self) -> PolicyKind {
        PolicyKind::LeastLoad
    }

    fn pick(&self, eligible: &Eligible<'_>, rng: &mut dyn RngCore) -> Option<usize> {
        let (first, second) = two(eligible, rng)?;
        let Some(second) = second else {
            return Some(first);
        };
        let (a, b) = (
            load(eligible.endpoint(first)),
            load(eligible.endpoint(second)),
        );
        Some(if b < a { second } else { first })
    }
}

/// Two different slots of `eligible` drawn at random (the second absent when there is one).
pub(crate) fn two(
    eligible: &Eligible<'_>,
    rng: &mut dyn RngCore,
) -> Option<(usize, Option<usize>)> {
    let n = eligible.slots.len();
    if n <= 1 {
        return eligible.slots.iter().next().map(|slot| (slot, None));
    }
    let a = below(rng, n);
    let mut b = below(rng, n - 1);
    if b >= a {
        b += 1;
    }
    Some((eligible.slots.iter().nth(a)?, eligible.slots.iter().nth(b)))
}

#[cfg(test)]
mod tests {
    use crate::endpoint::tests::{request, table_with};
    use crate::policy::PolicyKind;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn a_reported_queue_steers_traffic_away_before_latency_shows_it() {
        let t = table_with(PolicyKind::LeastLoad, &[1.0, 1.0, 1.0], &[None, None, None]);
        t.endpoints[0].set_reported_load(8.0, 6.0, 0.9);
        t.endpoints[1].set_reported_load(2.0, 0.0, 0.2);
        t.endpoints[2].set_reported_load(3.0, 0.0, 0.2);
        let mut rng = SmallRng::seed_from_u64(4);
        assert_eq!(t.pick(&request("m"), &mut rng).unwrap().slot, 1);
        let _held: Vec<_> = (0..4).map(|_| t.endpoints[1].begin()).collect();
        assert_eq!(
            t.pick(&request("m"), &mut rng).unwrap().slot,
            2,
            "in-flight blends in"
        );
    }

    #[test]
    fn ties_are_broken_at_random() {
        let t = table_with(PolicyKind::LeastLoad, &[1.0, 1.0], &[None, None]);
        let mut rng = SmallRng::seed_from_u64(5);
        let mut seen = [false; 2];
        for _ in 0..50 {
            seen[t.pick(&request("m"), &mut rng).unwrap().slot] = true;
        }
        assert_eq!(seen, [true, true]);
    }
}
