//! Power of two choices: draw two endpoints at random and take the cheaper, where the cost is the
//! peak-EWMA time to first byte times (in-flight + 1), as in tower's `PeakEwma`. Comparing two
//! random choices instead of scanning all avoids herding every request onto the momentarily best
//! endpoint, and still keeps the maximum load within O(log log n) of the mean
//! (Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing", 2001).
//!
//! The estimate itself ([`PeakEwma`]) is updated by the balancer from outcomes: a slower sample
//! than the estimate replaces it at once (peak), faster ones pull it down with exponential decay,
//! so a backend that turns slow is avoided immediately and trusted again gradually.

use std::time::{Duration, Instant};

use rand::RngCore;

use super::{below, Policy, PolicyKind};
use crate::endpoint::{Eligible, Endpoint};

#[derive(Debug)]
pub struct P2c;

/// Latency differences below a few milliseconds are noise next to an LLM's time to first token;
/// adding this to every estimate keeps them from deciding a pick.
const LATENCY_FLOOR_MS: f64 = 5.0;

/// The cost of sending one more request to `e`. An unmeasured endpoint (estimate 0) costs only
/// its in-flight count, so new endpoints get traffic and are measured.
pub fn cost(e: &Endpoint) -> f64 {
    cost_with(e, e.latency_ms())
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
    let n = eligible.slots.len();
    if n <= 1 {
        return eligible.slots.iter().next();
    }
    let a = below(rng, n);
    let mut b = below(rng, n - 1);
    if b >= a {
        b += 1;
    }
    let first = eligible.slots.iter().nth(a)?;
    let second = eligible.slots.iter().nth(b)?;
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
            assert_eq!(t.pick(&request("m"), &mut rng).unwrap().0, 1);
        }
        let _busy: Vec<_> = (0..20).map(|_| t.endpoints[1].begin()).collect();
        assert_eq!(
            t.pick(&request("m"), &mut rng).unwrap().0,
            0,
            "in-flight counts too"
        );
    }

    #[test]
    fn load_spreads_over_equal_endpoints() {
        let t = table_with(PolicyKind::P2c, &[1.0; 4], &[None, None, None, None]);
        let mut rng = SmallRng::seed_from_u64(9);
        let mut held = Vec::new();
        for _ in 0..400 {
            let (_, e) = t.pick(&request("m"), &mut rng).unwrap();
            held.push(e.begin());
        }
        let loads: Vec<u32> = t.endpoints.iter().map(|e| e.in_flight()).collect();
        let (min, max) = (*loads.iter().min().unwrap(), *loads.iter().max().unwrap());
        assert!(max - min <= 8, "p2c keeps loads close: {loads:?}");
    }
}
