//! Weighted random: the chance of an endpoint is its weight over the sum, where the balancer
//! raises a weight on success and cuts it on failure.

use rand::RngCore;

use super::{Policy, PolicyKind};
use crate::endpoint::Eligible;

#[derive(Debug)]
pub struct Weighted;

impl Policy for Weighted {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Weighted
    }

    fn pick(&self, eligible: &Eligible<'_>, rng: &mut dyn RngCore) -> Option<usize> {
        let weight = |slot: usize| eligible.endpoint(slot).weight().max(0.0);
        let total: f64 = eligible.slots.iter().map(weight).sum();
        let mut point = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
        let mut last = None;
        for slot in eligible.slots.iter() {
            let w = weight(slot);
            if point < w {
                return Some(slot);
            }
            point -= w;
            last = Some(slot);
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use crate::endpoint::tests::{request, table_with};
    use crate::policy::PolicyKind;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn picks_follow_weights() {
        let t = table_with(PolicyKind::Weighted, &[1.0, 3.0], &[None, None]);
        let mut rng = SmallRng::seed_from_u64(7);
        let mut counts = [0u32; 2];
        for _ in 0..40_000 {
            counts[t.pick(&request("m"), &mut rng).unwrap().slot] += 1;
        }
        let share = counts[1] as f64 / 40_000.0;
        assert!(
            (share - 0.75).abs() < 0.02,
            "share of the heavier endpoint: {share}"
        );
    }
}
