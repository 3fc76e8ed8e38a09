//! Round robin: each eligible endpoint in turn, whatever its speed: the baseline the other
//! policies are measured against.

use rand::RngCore;

use super::rotation::Rotation;
use super::{Policy, PolicyKind};
use crate::endpoint::Eligible;

#[derive(Debug, Default)]
pub struct RoundRobin {
    turns: Rotation,
}

impl Policy for RoundRobin {
    fn kind(&self) -> PolicyKind {
        PolicyKind::RoundRobin
    }

    fn pick(&self, eligible: &Eligible<'_>, _rng: &mut dyn RngCore) -> Option<usize> {
        self.turns.turn(eligible)
    }
}

#[cfg(test)]
mod tests {
    use crate::endpoint::tests::{request, table_with};
    use crate::policy::PolicyKind;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn takes_turns_and_skips_the_unavailable() {
        let t = table_with(
            PolicyKind::RoundRobin,
            &[1.0, 1.0, 1.0],
            &[None, None, None],
        );
        let mut rng = SmallRng::seed_from_u64(1);
        let picks: Vec<usize> = (0..6)
            .map(|_| t.pick(&request("m"), &mut rng).unwrap().slot)
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        t.endpoints[1].set_draining(true);
        let picks: Vec<usize> = (0..4)
            .map(|_| t.pick(&request("m"), &mut rng).unwrap().slot)
            .collect();
        assert!(picks.iter().all(|&p| p != 1));
        assert!(picks.contains(&0) && picks.contains(&2));
    }
}
