//! Power of two choices: of two endpoints, take the cheaper, where the cost is the time a new
//! request should expect to its first byte: the endpoint's average time to first byte, the price
//! of its latency spikes (the estimator's tail, [`crate::endpoint::Estimate::tail_ms`]) and the
//! wait for a batch slot once its batch is full ([`super::cache_aware::queue_ms`]). Weighing
//! in-flight requests by latency alone, as tower does for services without batches, piles
//! requests onto a fast backend long after its batch is full. The average, not the peak-EWMA that
//! `affinity` weighs (tower's `PeakEwma`): on four equal simulators each one's peak was its worst
//! answer of the last seconds, so the peaks differed by noise that lasted seconds, and the one
//! with the highest gave its turns away for as long (p99 time to first token 140–600 ms against
//! round robin's 83 on every request its own prompt). Spikes are priced by the tail instead, which
//! counts how often they come, not only the last one.
//!
//! One of the two is the endpoint whose turn it is and the other is drawn at random, and the drawn
//! one must be clearly cheaper to take the turn's place ([`super::rotation`]). Comparing two
//! choices instead of scanning all avoids herding every request onto the momentarily best
//! endpoint, as in Mitzenmacher's "The Power of Two Choices in Randomized Load Balancing" (2001),
//! whose bound on the maximum load is for two drawn at random, not for this pair.

use rand::RngCore;

use super::cache_aware::queue_ms;
use super::rotation::Rotation;
use super::{Policy, PolicyKind};
use crate::endpoint::{Eligible, Endpoint};

#[derive(Debug, Default)]
pub struct P2c {
    turns: Rotation,
}

/// Latency differences below a few milliseconds are noise next to an LLM's time to first token;
/// adding this to every estimate keeps them from deciding a pick.
const LATENCY_FLOOR_MS: f64 = 5.0;

/// The time one more request on `e` should expect to its first byte, ms: its average (the floor
/// for an unmeasured one, so new endpoints get traffic and are measured), its spikes' price and
/// the wait for a slot once its batch is full.
pub fn cost(e: &Endpoint) -> f64 {
    let estimate = e.estimate();
    let latency = e.latency_mean_ms();
    let service = if estimate.service_ms > 0.0 {
        estimate.service_ms
    } else {
        latency.max(LATENCY_FLOOR_MS)
    };
    latency + LATENCY_FLOOR_MS + estimate.tail_ms + queue_ms(e, &estimate, service)
}

/// The cost of one more request to `e` if its latency estimate were `latency_ms`.
pub fn cost_with(e: &Endpoint, latency_ms: f64) -> f64 {
    (f64::from(e.in_flight()) + 1.0) * (latency_ms + LATENCY_FLOOR_MS)
}

impl Policy for P2c {
    fn kind(&self) -> PolicyKind {
        PolicyKind::P2c
    }

    fn pick(&self, eligible: &Eligible<'_>, rng: &mut dyn RngCore) -> Option<usize> {
        pick_two(eligible, &self.turns, rng)
    }
}

/// The turn of `turns` or a clearly cheaper endpoint drawn at random, by [`cost`].
pub(crate) fn pick_two(
    eligible: &Eligible<'_>,
    turns: &Rotation,
    rng: &mut dyn RngCore,
) -> Option<usize> {
    turns.pick(eligible, rng, |slot| cost(eligible.endpoint(slot)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::tests::{request, table_with};
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn the_cheaper_of_two_wins() {
        let t = table_with(PolicyKind::P2c, &[1.0, 1.0], &[None, None]);
        t.endpoints[0].set_latency_mean_ms(500.0);
        t.endpoints[1].set_latency_mean_ms(50.0);
        let mut rng = SmallRng::seed_from_u64(2);
        for _ in 0..100 {
            assert_eq!(t.pick(&request("m"), &mut rng).unwrap().slot, 1);
        }
        let estimate = crate::endpoint::Estimate {
            warm_ms: 0.0,
            block_ms: 0.0,
            jitter_ms: 0.0,
            spikes: 0.0,
            share: 0.5,
            tail_ms: 0.0,
            reuse: 0.0,
            service_ms: 1000.0,
            capacity: 4,
            residence_ms: f64::INFINITY,
            ramp: 1.0,
        };
        t.endpoints[1].publish_estimate(estimate);
        let _batch: Vec<_> = (0..3).map(|_| t.endpoints[1].begin()).collect();
        assert_eq!(
            t.pick(&request("m"), &mut rng).unwrap().slot,
            1,
            "a batch with room costs no more"
        );
        let _full: Vec<_> = (0..2).map(|_| t.endpoints[1].begin()).collect();
        assert_eq!(
            t.pick(&request("m"), &mut rng).unwrap().slot,
            0,
            "one beyond a full batch of 4 waits 250 ms for a slot: 550 ms"
        );
    }

    #[test]
    fn alike_endpoints_take_turns() {
        let t = table_with(PolicyKind::P2c, &[1.0; 3], &[None, None, None]);
        for (e, ms) in t.endpoints.iter().zip([100.0, 110.0, 95.0]) {
            e.set_latency_mean_ms(ms);
        }
        let mut rng = SmallRng::seed_from_u64(3);
        let picks: Vec<usize> = (0..6)
            .map(|_| t.pick(&request("m"), &mut rng).unwrap().slot)
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2], "as round robin");
    }

    #[test]
    fn load_spreads_over_equal_endpoints() {
        let t = table_with(PolicyKind::P2c, &[1.0; 4], &[None, None, None, None]);
        let mut rng = SmallRng::seed_from_u64(9);
        let mut held = Vec::new();
        for _ in 0..400 {
            held.push(t.pick(&request("m"), &mut rng).unwrap().endpoint.begin());
        }
        let loads: Vec<u32> = t.endpoints.iter().map(|e| e.in_flight()).collect();
        let (min, max) = (*loads.iter().min().unwrap(), *loads.iter().max().unwrap());
        assert!(max - min <= 8, "p2c keeps loads close: {loads:?}");
    }
}
