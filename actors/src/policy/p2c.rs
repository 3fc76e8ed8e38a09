//! Power of two choices: of two endpoints, take the cheaper, where the cost is the time a new
//! request should expect to its first byte: the endpoint's average time to first byte, the price of
//! its latency spikes (the estimator's tail, [`crate::endpoint::Estimate::tail_ms`]) and the wait
//! for a batch slot once its batch is full ([`super::cache_aware::queue_ms`]). Weighing in-flight
//! requests by latency alone, as tower does for services without batches, piles requests onto a
//! fast backend long after its batch is full. The average, not the peak-EWMA that `affinity` weighs
//! (tower's `PeakEwma`): on four equal simulators each one's peak was its worst answer of the last
//! seconds, so the peaks differed by noise that lasted seconds, and the one with the highest gave
//! its turns away for as long (p99 time to first token 140–600 ms against round robin's 83 on every
//! request its own prompt). Spikes are priced by the tail instead, which counts how often they
//! come, not only the last one.
//!
//! One of the two is the endpoint whose turn it is and the other is drawn at random, and the drawn
//! one must be clearly cheaper to take the turn's place ([`super::rotation`]), and either less
//! loaded or four times faster by itself ([`pick_two`]). Comparing two choices instead of scanning
//! all avoids herding every request onto the momentarily best endpoint, as in Mitzenmacher's "The
//! Power of Two Choices in Randomized Load Balancing" (2001), whose bound on the maximum load is
//! for two drawn at random, not for this pair.

use rand::RngCore;

use super::cache_aware::{batch_capacity, queue_ms};
use super::rotation::{clearly_cheaper, Rotation};
use super::{Policy, PolicyKind};
use crate::endpoint::{Eligible, Endpoint, Estimate};

#[derive(Debug, Default)]
pub struct P2c {
    turns: Rotation,
}

/// Latency differences below a few milliseconds are noise next to an LLM's time to first token;
/// adding this to every estimate keeps them from deciding a pick.
const LATENCY_FLOOR_MS: f64 = 5.0;

/// How many times faster by itself ([`Side::own_ms`]) the drawn endpoint must be to take the turn
/// of one with no more requests ahead.
const FASTER_BY: f64 = 4.0;

/// One endpoint of a pick, read once: its estimate, its average time to first byte and the
/// batch capacity its queue is priced at.
struct Side<'a> {
    endpoint: &'a Endpoint,
    estimate: Estimate,
    mean_ms: f64,
    capacity: u32,
}

impl<'a> Side<'a> {
    fn new(endpoint: &'a Endpoint) -> Self {
        let estimate = endpoint.estimate();
        Side {
            endpoint,
            estimate,
            mean_ms: endpoint.latency_mean_ms(),
            capacity: estimate.capacity,
        }
    }

    /// What a request should expect to its first byte whatever the load: the average time to
    /// first byte (the floor for an unmeasured endpoint, so new endpoints get traffic and are
    /// measured) and the price of its spikes.
    fn own_ms(&self) -> f64 {
        self.mean_ms + LATENCY_FLOOR_MS + self.estimate.tail_ms
    }

    /// The time one more request should expect to its first byte, ms: its own time and the wait
    /// for a slot once its batch is full.
    fn cost(&self) -> f64 {
        let service = if self.estimate.service_ms > 0.0 {
            self.estimate.service_ms
        } else {
            self.mean_ms.max(LATENCY_FLOOR_MS)
        };
        let batch = Estimate {
            capacity: self.capacity,
            ..self.estimate
        };
        self.own_ms() + queue_ms(self.endpoint, &batch, service)
    }

    /// The requests a new one would find ahead of it, per batch slot: the gateway's in flight,
    /// other clients' and the queue the backend reported (twice, as `least_load` counts it: a
    /// queued request also waits for a slot).
    fn ahead(&self) -> f64 {
        let e = self.endpoint;
        (f64::from(e.in_flight()) + e.others() + 2.0 * e.reported_load().1)
            / f64::from(batch_capacity(self.capacity))
    }
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

/// The turn of `turns`, or the endpoint drawn beside it where that one is clearly cheaper by
/// [`Side::cost`] and the saving is real: either fewer requests per batch slot are ahead of a
/// new one there, or the drawn endpoint is [`FASTER_BY`] times faster by itself (once both
/// averages are measured).
///
/// Where either batch capacity is a guess, both are priced at the smaller of the two. The
/// estimator guesses a quarter more than a backend has been seen to run until it queues at a
/// scrape, and on four equal simulators two guessed 22 while two knew 16: at 17 requests in
/// flight the guessed ones had no queue and the others two slots of one, so the guessed ones
/// took turns, queued beyond their real batch and set the fleet's p99. Known capacities stay
/// each its own, so a large batch is not priced as a small one. A cheaper cost alone is not
/// enough: on equal backends at the knee every turn given away stacks two prefills on the
/// taker, so it must at least leave that one less loaded than the turn's. The second way in is
/// for endpoints that differ by themselves (a backend many times slower, or one whose spikes
/// cost several times the other's whole wait), which must lose turns even where their load is
/// no higher. Four times rather than twice: averages of equal backends differ by which prompts
/// each found cached, and the matrix did not tell the two factors apart (BENCHMARKS.md,
/// section 2), so the one that moves fewer turns on such noise. That way waits for both
/// averages to be measured ([`crate::estimator::Estimator::first_byte_mean_ms`]): a backend's
/// first answers (a one-token probe) made it look several times faster than it was.
pub(crate) fn pick_two(
    eligible: &Eligible<'_>,
    turns: &Rotation,
    rng: &mut dyn RngCore,
) -> Option<usize> {
    turns.pick_where(eligible, rng, |turn, other| {
        let (mut t, mut o) = (
            Side::new(eligible.endpoint(turn)),
            Side::new(eligible.endpoint(other)),
        );
        if !(t.estimate.capacity_known && o.estimate.capacity_known) {
            let smaller = match (t.capacity, o.capacity) {
                (0, c) | (c, 0) => c,
                (a, b) => a.min(b),
            };
            (t.capacity, o.capacity) = (smaller, smaller);
        }
        let measured = t.mean_ms > 0.0 && o.mean_ms > 0.0;
        clearly_cheaper(o.cost(), t.cost())
            && (o.ahead() < t.ahead() || measured && o.own_ms() * FASTER_BY < t.own_ms())
    })
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
        t.endpoints[1].publish_estimate(estimate(1000.0, 4, 0.0));
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
            "two beyond a full batch of 4 wait for slots: 1,367 ms against 505"
        );
    }

    /// An estimate as the balancer publishes it for an endpoint answering in `service_ms` whose
    /// batch holds `capacity`, with spikes priced at `tail_ms`.
    fn estimate(service_ms: f64, capacity: u32, tail_ms: f64) -> crate::endpoint::Estimate {
        crate::endpoint::Estimate {
            warm_ms: 0.0,
            block_ms: 0.0,
            jitter_ms: 0.0,
            spikes: 0.0,
            share: 0.5,
            tail_ms,
            reuse: 0.0,
            service_ms,
            capacity,
            capacity_known: true,
            residence_ms: f64::INFINITY,
            ramp: 1.0,
        }
    }

    fn picks(t: &crate::endpoint::RoutingTable, n: usize) -> Vec<usize> {
        let mut rng = SmallRng::seed_from_u64(5);
        (0..n)
            .map(|_| t.pick(&request("m"), &mut rng).unwrap().slot)
            .collect()
    }

    /// Two endpoints of average time to first byte `mean_ms`, publishing `estimates`, with
    /// `in_flight` requests each (held as long as the returned guards).
    fn pair(
        mean_ms: f64,
        estimates: [crate::endpoint::Estimate; 2],
        in_flight: [usize; 2],
    ) -> (
        crate::endpoint::RoutingTable,
        Vec<crate::endpoint::InFlight>,
    ) {
        let t = table_with(PolicyKind::P2c, &[1.0, 1.0], &[None, None]);
        let mut held = Vec::new();
        for ((e, estimate), n) in t.endpoints.iter().zip(estimates).zip(in_flight) {
            e.set_latency_mean_ms(mean_ms);
            e.publish_estimate(estimate);
            held.extend((0..n).map(|_| e.begin()));
        }
        (t, held)
    }

    #[test]
    fn a_guessed_batch_capacity_does_not_take_turns() {
        // Equal backends: one has queued at a scrape (its batch is known: 16), the other has not
        // (the estimator guesses 22). At 18 and 17 in flight the guess alone showed no queue on
        // the second, which then took the first's turns.
        let guessed = crate::endpoint::Estimate {
            capacity_known: false,
            ..estimate(460.0, 22, 0.0)
        };
        let (t, _held) = pair(70.0, [estimate(460.0, 16, 0.0), guessed], [18, 17]);
        assert_eq!(picks(&t, 6), vec![0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn known_batch_capacities_are_each_its_own() {
        // A backend running 64 at once with 30 in flight has room; one running 8 with 10 in
        // flight queues. Priced at the smaller batch, the large one looked queued 23 deep.
        let estimates = [estimate(400.0, 64, 0.0), estimate(400.0, 8, 0.0)];
        let (t, _held) = pair(60.0, estimates, [30, 10]);
        assert_eq!(picks(&t, 6), vec![0; 6]);
    }

    #[test]
    fn a_cheaper_estimate_does_not_take_turns_to_a_busier_endpoint() {
        // The second's requests have been shorter of late, so its queue looks cheaper, but a new
        // request would find more ahead of it there.
        let estimates = [estimate(900.0, 16, 0.0), estimate(100.0, 16, 0.0)];
        let (t, _held) = pair(60.0, estimates, [16, 18]);
        assert_eq!(picks(&t, 6), vec![0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn spikes_give_turns_away_even_to_a_busier_endpoint() {
        let estimates = [estimate(400.0, 16, 450.0), estimate(400.0, 16, 1.0)];
        let (t, _held) = pair(110.0, estimates, [4, 6]);
        assert_eq!(picks(&t, 6), vec![1; 6]);
    }

    #[test]
    fn alike_endpoints_take_turns() {
        let t = table_with(PolicyKind::P2c, &[1.0; 3], &[None, None, None]);
        for (e, ms) in t.endpoints.iter().zip([100.0, 110.0, 95.0]) {
            e.set_latency_mean_ms(ms);
        }
        assert_eq!(picks(&t, 6), vec![0, 1, 2, 0, 1, 2], "as round robin");
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
