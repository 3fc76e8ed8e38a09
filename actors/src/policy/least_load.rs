//! Least load: the endpoint with the least work, where work is what the backend reports about
//! itself on `/metrics` (requests running and waiting, KV-cache use, scraped by the health
//! checker every `health.load_interval_ms`) blended with the gateway's own in-flight count. The
//! backend's queue is seen as soon as it forms, before it shows up as latency; the in-flight count
//! covers the time between scrapes and traffic from this gateway the backend has not counted yet.

use rand::RngCore;

use super::{below, Policy, PolicyKind};
use crate::endpoint::{Eligible, Endpoint};

#[derive(Debug)]
pub struct LeastLoad;

/// Requests ahead of a new one: the larger of the gateway's and the backend's count (the backend
/// also serves other clients), with queued requests counted twice since they wait for a slot,
/// plus KV-cache pressure (a nearly full cache preempts sequences).
pub fn load(e: &Endpoint) -> f64 {
    let (running, waiting, kv_cache) = e.reported_load();
    f64::from(e.in_flight()).max(running + waiting) + waiting + 2.0 * kv_cache
}

impl Policy for LeastLoad {
    fn kind(&self) -> PolicyKind {
        PolicyKind::LeastLoad
    }

    fn pick(&self, eligible: &Eligible<'_>, rng: &mut dyn RngCore) -> Option<usize> {
        let mut best = None;
        let mut best_load = f64::INFINITY;
        let mut ties = 0usize;
        for slot in eligible.slots.iter() {
            let l = load(eligible.endpoint(slot));
            if l < best_load {
                best = Some(slot);
                best_load = l;
                ties = 1;
            } else if l == best_load {
                ties += 1;
                if below(rng, ties) == 0 {
                    best = Some(slot);
                }
            }
        }
        best
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
        assert_eq!(t.pick(&request("m"), &mut rng).unwrap().0, 1);
        let _held: Vec<_> = (0..4).map(|_| t.endpoints[1].begin()).collect();
        assert_eq!(
            t.pick(&request("m"), &mut rng).unwrap().0,
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
            seen[t.pick(&request("m"), &mut rng).unwrap().0] = true;
        }
        assert_eq!(seen, [true, true]);
    }
}
