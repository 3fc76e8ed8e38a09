//! Turns of a rotation, for the policies that weigh two endpoints (`p2c`, `least_load` and
//! `affinity`'s requests without a key): one of the two is the endpoint whose turn it is, as
//! round robin would pick it, the other is drawn at random, and the other is taken only when it is
//! clearly cheaper ([`clearly_cheaper`]). Two endpoints drawn at random and the cheaper taken by
//! any margin (the textbook power of two choices) lost to round robin at p99 on every cell of
//! four equal simulators (every request its own prompt: 312 ms for `p2c` and 1,010 for
//! `least_load` against round robin's 84; BENCHMARKS.md, section 2): where
//! the costs are alike, the cheaper of two is decided by noise, so a backend gets bursts of
//! arrivals and their prefills stack, while round robin spaces each backend's arrivals evenly. So
//! where nothing tells the endpoints apart they take turns, and a backend whose queue, latency or
//! load stands out gives its turn away.

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

#[derive(Debug, Default)]
pub struct Rotation {
    next: AtomicUsize,
}

impl Rotation {
    /// The slot of `eligible` whose turn it is; it moves on with each call.
    pub fn turn(&self, eligible: &Eligible<'_>) -> Option<usize> {
        let n = eligible.slots.len();
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % n.max(1);
        eligible.slots.iter().nth(turn)
    }

    /// The slot whose turn it is, and unless it is the only one, another drawn at random.
    pub fn turn_and_other(
        &self,
        eligible: &Eligible<'_>,
        rng: &mut dyn RngCore,
    ) -> Option<(usize, Option<usize>)> {
        let n = eligible.slots.len();
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % n.max(1);
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
        let (turn, other) = self.turn_and_other(eligible, rng)?;
        Some(match other {
            Some(other) if clearly_cheaper(cost(other), cost(turn)) => other,
            _ => turn,
        })
    }
}

/// Whether a cost of `other` beats one of `turn` by enough to take its turn.
fn clearly_cheaper(other: f64, turn: f64) -> bool {
    other < turn * TAKEN_BELOW
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_clearly_cheaper_endpoint_takes_the_turn() {
        assert!(!clearly_cheaper(90.0, 100.0));
        assert!(!clearly_cheaper(60.0, 100.0));
        assert!(clearly_cheaper(45.0, 100.0));
        assert!(!clearly_cheaper(0.0, 0.0), "nothing to tell apart");
    }
}
