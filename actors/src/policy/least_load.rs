//! Least load: the endpoint with the least work relative to what it can run at once, where work is
//! the gateway's own in-flight count plus what the backend reports about itself on `/metrics`
//! (requests waiting, KV-cache use, scraped by the health checker every
//! `health.load_interval_ms`), and what it can run is its batch capacity. The backend's queue is
//! seen as soon as it forms, before it shows up as latency; the in-flight count is exact at the
//! moment of a pick. Of two endpoints, the one with more free batch slots wins: load counted in
//! requests, not slots, filled the largest batches first and queued on the smaller, and taking
//! the least loaded of all sent every request between two scrapes to the one that looked idle in
//! the last (herding on stale load), which made its queue the fleet's slowest percent. One of the
//! two is the endpoint whose turn it is, the other is drawn at random and takes the turn only when
//! clearly less loaded ([`super::rotation`]): equal backends then take turns, as round robin's
//! evenly spaced arrivals keep their prefills apart.

use rand::RngCore;

use super::cache_aware::batch_capacity;
use super::rotation::Rotation;
use super::{Policy, PolicyKind};
use crate::endpoint::{Eligible, Endpoint};

#[derive(Debug, Default)]
pub struct LeastLoad {
    turns: Rotation,
}

/// How full a new request would find `e`: the gateway's requests on it and the queue the backend
/// reported (counted twice: a queued request also waits for a slot) over its batch capacity,
/// plus KV-cache pressure once the cache is nearly full (then it preempts sequences). The
/// backend's running count and its KV-cache use below that are left out: scraped once a second,
/// they are stale at the moment of a pick, and weighing them made a backend caught busy by a
/// scrape look busy until the next, sending the others every request in between; its queue and
/// a full cache, rarer and longer-lived, are worth it.
pub fn load(e: &Endpoint) -> f64 {
    let (_, waiting, kv_cache) = e.reported_load();
    let capacity = f64::from(batch_capacity(e.estimate().capacity));
    (f64::from(e.in_flight()) + 2.0 * waiting + 1.0) / capacity
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
        self.turns
            .pick(eligible, rng, |slot| load(eligible.endpoint(slot)))
    }
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
        let mut picks = [0; 3];
        for _ in 0..30 {
            picks[t.pick(&request("m"), &mut rng).unwrap().slot] += 1;
        }
        assert_eq!(picks[0], 0, "its queue gives every turn away: {picks:?}");
        let _held: Vec<_> = (0..4).map(|_| t.endpoints[1].begin()).collect();
        let mut picks = [0; 3];
        for _ in 0..30 {
            picks[t.pick(&request("m"), &mut rng).unwrap().slot] += 1;
        }
        // Of the two (the turn and one drawn), the one with room wins, so the busier one is
        // taken only where the other drawn was the queued one.
        assert!(
            picks[0] == 0 && picks[2] > picks[1] + 5,
            "in-flight blends in: {picks:?}"
        );
    }

    #[test]
    fn equal_loads_take_turns_and_a_loaded_endpoint_gives_its_turn_away() {
        let t = table_with(PolicyKind::LeastLoad, &[1.0; 3], &[None, None, None]);
        let mut rng = SmallRng::seed_from_u64(5);
        let picks: Vec<usize> = (0..6)
            .map(|_| t.pick(&request("m"), &mut rng).unwrap().slot)
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2], "as round robin");
        // With half a batch (of 8) on each, a request or two more is no reason to skip a turn; a
        // queue is.
        let _half: Vec<_> = (0..12).map(|i| t.endpoints[i % 3].begin()).collect();
        let _few: Vec<_> = (0..2).map(|_| t.endpoints[0].begin()).collect();
        let picks: Vec<usize> = (0..6)
            .map(|_| t.pick(&request("m"), &mut rng).unwrap().slot)
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        let _full: Vec<_> = (0..8).map(|_| t.endpoints[0].begin()).collect();
        for _ in 0..30 {
            assert_ne!(t.pick(&request("m"), &mut rng).unwrap().slot, 0);
        }
    }
}
