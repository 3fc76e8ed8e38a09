//! Turns of a rotation, for the policies that weigh two endpoints (`p2c`, `least_load` and
//! `affinity`'s requests without a key): one of the two is the endpoint whose turn it is, as round
//! robin would pick it, the other is drawn at random, and the other is taken only when it is
//! clearly cheaper ([`clearly_cheaper`]; `p2c` adds its own tests, [`Rotation::pick_where`]). Two
//! endpoints drawn at random and the cheaper taken by any margin (the textbook power of two
//! choices) lost to round robin at p99 on every cell of four equal simulators (every request its
//! own prompt: 312 ms for `p2c` and 1,010 for `least_load` against round robin's 84; BENCHMARKS.md,
//! section 2): where the costs are alike, the cheaper of two is decided by noise, so a backend gets
//! bursts of arrivals and their prefills stack, while round robin spaces each backend's arrivals
//! evenly. So where nothing tells the endpoints apart they take turns, and a backend whose queue,
//! latency or load stands out gives its turn away.

use std::sync::atomic::{AtomicUsize, Ordering};

use rand::RngCore;

use super::below;
use crate::endpoint::Eligible;

/// How much cheaper the drawn endpoint must be to take the turn's place: its cost under this
/// share of the turn's. A turn taken adds about one request's worth to the taker (its prefill
/// stacked on the taker's own turn), so taking it pays where the turn's endpoint costs more than
/// twice as much: a queue, a spike price, a backend at half speed once its requests pile up. With
/// two thirds, equal simulators still gave turns away often enough that `least_load` lost to round
/// robin at p99 by 2–9 %; with a half it ties.
const TAKEN_BELOW: f64 = 0.5;

/// Rotations kept apart by the set of candidates (a hash of it picks one).
const ROTATIONS: usize = 16;

/// Turns are counted per set of candidates: with one count for all, requests for a model served by
/// two endpoints, alternating with requests for another model, always found the same one's turn;
/// and a retry that excludes an endpoint, or a second pick after slow start passed over a ramping
/// one, took a turn of the full set, so the endpoint after it got two in a row (75 % and 25 %
/// between two endpoints while a third ramped).
#[derive(Debug, Default)]
pub struct Rotation {
    next: [AtomicUsize; ROTATIONS],
}

impl Rotation {
    /// The slot of `eligible` whose turn it is; it moves on with each call.
    pub fn turn(&self, eligible: &Eligible<'_>) -> Option<usize> {
        eligible.slots.iter().nth(self.next_index(eligible))
    }

    /// The index among `eligible`'s slots whose turn it is, moving its set's count on.
    fn next_index(&self, eligible: &Eligible<'_>) -> usize {
        let count = &self.next[(eligible.slots.fingerprint() % ROTATIONS as u64) as usize];
        count.fetch_add(1, Ordering::Relaxed) % eligible.slots.len().max(1)
    }

    /// The slot whose turn it is, and unless it is the only one, another drawn at random.
    pub fn turn_and_other(
        &self,
        eligible: &Eligible<'_>,
        rng: &mut dyn RngCore,
    ) -> Option<(usize, Option<usize>)> {
        let n = eligible.slots.len();
        let turn = self.next_index(eligible);
        let slot = eligible.slots.iter().nth(turn)?;
        if n <= 1 {
            return Some((slot, None));
        }
        let mut other = below(rng, n - 1);
        if other >= turn {
            other += 1;
        }
        Some((slot, eligible.slots.iter().nth(other)))
    }

    /// The turn's slot, or the drawn one if it is clearly cheaper by `cost`.
    pub fn pick(
        &self,
        eligible: &Eligible<'_>,
        rng: &mut dyn RngCore,
        cost: impl Fn(usize) -> f64,
    ) -> Option<usize> {
        self.pick_where(eligible, rng, |turn, other| {
            clearly_cheaper(cost(other), cost(turn))
        })
    }

    /// The turn's slot, or the drawn one if `takes(turn, drawn)`.
    pub fn pick_where(
        &self,
        eligible: &Eligible<'_>,
        rng: &mut dyn RngCore,
        takes: impl Fn(usize, usize) -> bool,
    ) -> Option<usize> {
        let (turn, other) = self.turn_and_other(eligible, rng)?;
        Some(match other {
            Some(other) if takes(turn, other) => other,
            _ => turn,
        })
    }
}

/// Whether a cost of `other` beats one of `turn` by enough to take its turn.
pub(super) fn clearly_cheaper(other: f64, turn: f64) -> bool {
    other < turn * TAKEN_BELOW
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::tests::table_with;
    use crate::endpoint::Bits;
    use crate::policy::PolicyKind;

    #[test]
    fn each_set_of_candidates_keeps_its_own_turns() {
        let t = table_with(PolicyKind::RoundRobin, &[1.0; 4], &[None, None, None, None]);
        let set = |slots: &[usize]| {
            let mut bits = Bits::default();
            for &s in slots {
                bits.insert(s);
            }
            bits
        };
        let eligible = |slots: Bits| Eligible {
            table: &t,
            slots,
            affinity: None,
            blocks: &[],
        };
        let (a, b) = (set(&[0, 1]), set(&[2, 3]));
        let rotation = Rotation::default();
        let mut picks = Vec::new();
        // Two models' requests alternating, and a retry of the first that excludes slot 0.
        for _ in 0..4 {
            picks.push(rotation.turn(&eligible(a)).unwrap());
            picks.push(rotation.turn(&eligible(b)).unwrap());
            rotation.turn(&eligible(set(&[1]))).unwrap();
        }
        assert_eq!(picks, vec![0, 2, 1, 3, 0, 2, 1, 3]);
    }

    #[test]
    fn only_a_clearly_cheaper_endpoint_takes_the_turn() {
        assert!(!clearly_cheaper(90.0, 100.0));
        assert!(!clearly_cheaper(60.0, 100.0));
        assert!(clearly_cheaper(45.0, 100.0));
        assert!(!clearly_cheaper(0.0, 0.0), "nothing to tell apart");
    }
}
