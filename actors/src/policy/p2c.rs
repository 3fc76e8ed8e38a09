//! Power of two choices: draw two endpoints at random and take the cheaper, where the cost is the
//! time a new request should expect to its first byte: the endpoint's peak-EWMA time to first
//! byte (as in tower's `PeakEwma`) plus the wait for a batch slot once its batch is full
//! ([`super::cache_aware::queue_ms`]). Weighing in-flight requests by latency alone, as tower does
//! for services without batches, piles requests onto a fast backend long after its batch is full.
//! Comparing two random choices instead of scanning all avoids herding every request onto the
//! momentarily best endpoint, and still keeps the maximum load within O(log log n) of the mean
//! (Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing", 2001).
//!
//! The estimate itself ([`PeakEwma`]) is updated by the balancer from outcomes: a slower sample
//! than the estimate replaces it at once (peak), faster ones pull it down with exponential decay,
//! so a backend that turns slow is avoided immediately and trusted again gradually.

use std::time::{Duration, Instant};

use rand::RngCore;

use super::cache_aware::queue_ms;
use super::{Policy, PolicyKind};
use crate::endpoint::{Eligible, Endpoint};

#[derive(Debug)]
pub struct P2c;

/// Latency differences below a few milliseconds are noise next to an LLM's time to first token;
/// adding this to every estimate keeps them from deciding a pick.
const LATENCY_FLOOR_MS: f64 = 5.0;

/// The time one more request on `e` should expect to its first byte, ms: its latency estimate
/// (the floor for an unmeasured one, so new endpoints get traffic and are measured) and the wait
/// for a slot once its batch is full.
pub fn cost(e: &Endpoint) -> f64 {
    let estimate = e.estimate();
    let service = if estimate.service_ms > 0.0 {
        estimate.service_ms
    } else {
        e.latency_ms().max(LATENCY_FLOOR_MS)
    };
    e.latency_ms() + LATENCY_FLOOR_MS + queue_ms(e, &estimate, service)
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
        pick_two(eligible, rng)
    }
}

pub(crate) fn pick_two(eligible: &Eligible<'_>, rng: &mut dyn RngCore) -> Option<usize> {
    let (first, second) = super::least_load::two(eligible, rng)?;
    let Some(second) = second else {
        return Some(first);
    };
    if cost(eligible.endpoint(second)) < cost(eligible.endpoint(first)) {
        Some(second)
    } else {
        Some(first)
    }
}

/// Peak-EWMA of a latency, with decay time constant `tau`.
#[derive(Debug, Clone, Copy)]
pub struct PeakEwma {
    pub value_ms: f64,
    pub at: Option<Instant>,
}

impl PeakEwma {
    pub fn new() -> Self {
        Self {
            value_ms: 0.0,
            at: None,
        }
    }

    pub fn observe(&mut self, sample: Duration, now: Instant, tau: Duration) -> f64 {
        let sample_ms = sample.as_secs_f64() * 1000.0;
        self.value_ms = match self.at {
            None => sample_ms,
            Some(_) if sample_ms > self.value_ms => sample_ms,
            Some(at) => {
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                let keep = (-elapsed / tau.as_secs_f64().max(1e-9)).exp();
                self.value_ms * keep + sample_ms * (1.0 - keep)
            }
        };
        self.at = Some(now);
        self.value_ms
    }
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::endpoint::tests::{request, table_with};
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let clock = ManualClock::default();
        let tau = Duration::from_secs(10);
        let mut e = PeakEwma::new();
        assert_eq!(
            e.observe(Duration::from_millis(100), clock.now(), tau),
            100.0
        );
        assert_eq!(
            e.observe(Duration::from_millis(400), clock.now(), tau),
            400.0,
            "peak"
        );
        clock.advance(Duration::from_secs(10));
        let v = e.observe(Duration::from_millis(100), clock.now(), tau);
        let expected = 400.0 * (-1f64).exp() + 100.0 * (1.0 - (-1f64).exp());
        assert!((v - expected).abs() < 1e-9, "{v} vs {expected}");
        let v2 = e.observe(Duration::from_millis(100), clock.now(), tau);
        assert_eq!(v2, v, "no time passed: no decay");
    }

    #[test]
    fn the_cheaper_of_two_wins() {
        let t = table_with(PolicyKind::P2c, &[1.0, 1.0], &[None, None]);
        t.endpoints[0].set_latency_ms(500.0);
        t.endpoints[1].set_latency_ms(50.0);
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
