//! Affinity: consistent hashing with bounded load (Mirrokni, Thorup, Zadimoghaddam, "Consistent
//! Hashing with Bounded Loads", 2018). A request's affinity key (its session or user, or a hash of
//! its prompt prefix) maps to a point on a ring of virtual nodes; the request goes to the first
//! endpoint clockwise whose cost stays within `load_factor` × the average cost, so requests
//! sharing a prefix keep landing on the backend whose prefix cache holds it, until that backend
//! is loaded beyond the bound and the excess spills to the next one on the ring (which then warms
//! its own cache for those keys). The cost is (in-flight + 1) × the peak-EWMA time to first byte
//! rather than the in-flight count alone: with equal backends the bound is the paper's,
//! while a slow or stalling backend (its estimate jumps at once on a slow answer) gives its keys
//! up to the next one until it recovers. Requests without a key go to p2c's pick.

use std::sync::Arc;

use rand::RngCore;

use super::p2c::{cost_with, pick_two};
use super::rotation::Rotation;
use super::{Policy, PolicyKind};
use crate::endpoint::{Bits, Eligible, Endpoint};

/// Virtual nodes per endpoint: enough to spread keys evenly over a handful of backends.
const VIRTUAL_NODES: usize = 64;

#[derive(Debug)]
pub struct Affinity {
    /// (point, slot), sorted by point.
    ring: Vec<(u64, usize)>,
    load_factor: f64,
    /// Turns for the requests without a key (p2c's).
    turns: Rotation,
}

/// A stable 64-bit hash for ring points and affinity keys, the same in every process and run.
/// It runs on every request over up to `affinity.prefix_bytes` of the prompt, so it takes eight
/// bytes a step (multiply-rotate, as FxHash) and ends with the splitmix64 finalizer so that
/// similar prompts still land far apart on the ring; it is not meant to resist adversaries.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    stable_hash_seeded(0, bytes)
}

/// [`stable_hash`] in a separate space per `seed` (so a session id and a prompt with the same
/// bytes are different keys).
pub fn stable_hash_seeded(seed: u64, bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let step = |h: u64, word: u64| (h.rotate_left(5) ^ word).wrapping_mul(K);
    let mut h = step(seed ^ K, bytes.len() as u64);
    let mut words = bytes.chunks_exact(8);
    for chunk in &mut words {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        h = step(h, u64::from_le_bytes(word));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        h = step(h, u64::from_le_bytes(word));
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

impl Affinity {
    pub fn new(endpoints: &[Arc<Endpoint>], load_factor: f64) -> Self {
        let mut ring: Vec<(u64, usize)> = endpoints
            .iter()
            .enumerate()
            .flat_map(|(slot, e)| {
                (0..VIRTUAL_NODES)
                    .map(move |v| (stable_hash(format!("{}#{v}", e.url).as_bytes()), slot))
            })
            .collect();
        ring.sort_unstable();
        Self {
            ring,
            load_factor: load_factor.max(1.0),
            turns: Rotation::default(),
        }
    }
}

impl Policy for Affinity {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Affinity
    }

    fn pick(&self, eligible: &Eligible<'_>, rng: &mut dyn RngCore) -> Option<usize> {
        let Some(key) = eligible.affinity else {
            return pick_two(eligible, &self.turns, rng);
        };
        let n = eligible.slots.len();
        // An endpoint not measured yet is taken to be as fast as the measured ones on average,
        // so that it neither attracts every key nor pushes the measured ones over the bound.
        let (measured, sum) = eligible
            .slots
            .iter()
            .map(|s| eligible.endpoint(s).latency_ms())
            .filter(|&ms| ms > 0.0)
            .fold((0usize, 0.0), |(n, sum), ms| (n + 1, sum + ms));
        let prior = if measured == 0 {
            0.0
        } else {
            sum / measured as f64
        };
        let cost = |slot: usize| {
            let e = eligible.endpoint(slot);
            let ms = e.latency_ms();
            cost_with(e, if ms > 0.0 { ms } else { prior })
        };
        let total: f64 = eligible.slots.iter().map(cost).sum();
        let bound = self.load_factor * total / n as f64;
        let start = self.ring.partition_point(|(point, _)| *point < key);
        let mut seen = Bits::default();
        let mut least: Option<(f64, usize)> = None;
        for &(_, slot) in self.ring[start..].iter().chain(&self.ring[..start]) {
            if !eligible.slots.contains(slot) || seen.contains(slot) {
                continue;
            }
            let c = cost(slot);
            if c <= bound {
                return Some(slot);
            }
            seen.insert(slot);
            if least.is_none_or(|(l, _)| c < l) {
                least = Some((c, slot));
            }
            if seen.len() == n {
                break;
            }
        }
        least
            .map(|(_, slot)| slot)
            .or_else(|| pick_two(eligible, &self.turns, rng))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::tests::{request, table_with};
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn the_hash_is_stable_and_spreads_similar_inputs() {
        assert_eq!(stable_hash(b"abc"), stable_hash(b"abc"));
        assert_ne!(stable_hash(b"abc"), stable_hash(b"abd"));
        assert_ne!(stable_hash_seeded(1, b"abc"), stable_hash_seeded(2, b"abc"));
        assert_ne!(stable_hash(b"12345678"), stable_hash(b"12345678\0"));
        let top_bits: std::collections::HashSet<u64> = (0..64u32)
            .map(|i| stable_hash(&i.to_le_bytes()) >> 58)
            .collect();
        assert!(top_bits.len() > 30, "consecutive keys spread over the ring");
    }

    #[test]
    fn the_same_key_lands_on_the_same_endpoint() {
        let t = table_with(PolicyKind::Affinity, &[1.0; 4], &[None, None, None, None]);
        let mut rng = SmallRng::seed_from_u64(1);
        let mut owners = std::collections::HashSet::new();
        for key in 0..200u64 {
            let mut r = request("m");
            r.affinity = Some(stable_hash(&key.to_le_bytes()));
            let first = t.pick(&r, &mut rng).unwrap().slot;
            for _ in 0..5 {
                assert_eq!(t.pick(&r, &mut rng).unwrap().slot, first);
            }
            owners.insert(first);
        }
        assert_eq!(owners.len(), 4, "keys spread over every endpoint");
    }

    #[test]
    fn load_beyond_the_bound_spills_to_the_next_endpoint() {
        let t = table_with(PolicyKind::Affinity, &[1.0; 4], &[None, None, None, None]);
        let mut rng = SmallRng::seed_from_u64(1);
        let mut r = request("m");
        r.affinity = Some(42);
        let owner = t.pick(&r, &mut rng).unwrap().slot;
        let mut held = Vec::new();
        let mut placements = [0u32; 4];
        for _ in 0..40 {
            let picked = t.pick(&r, &mut rng).unwrap();
            placements[picked.slot] += 1;
            held.push(picked.endpoint.begin());
        }
        let max = *placements.iter().max().unwrap();
        assert_eq!(
            placements.iter().position(|&p| p == max),
            Some(owner),
            "{placements:?}"
        );
        assert!(
            max <= (1.25f64 * 40.0 / 4.0).ceil() as u32 + 1,
            "bounded: {placements:?}"
        );
        assert!(
            placements.iter().filter(|&&p| p > 0).count() > 1,
            "spilled: {placements:?}"
        );
    }

    #[test]
    fn a_slow_endpoint_gives_its_keys_to_the_next_one_until_it_recovers() {
        let t = table_with(PolicyKind::Affinity, &[1.0; 4], &[None, None, None, None]);
        for e in &t.endpoints {
            e.set_latency_ms(100.0);
        }
        let mut rng = SmallRng::seed_from_u64(1);
        let mut r = request("m");
        r.affinity = Some(7);
        let owner = t.pick(&r, &mut rng).unwrap().slot;
        t.endpoints[owner].set_latency_ms(1000.0);
        let spill = t.pick(&r, &mut rng).unwrap().slot;
        assert_ne!(spill, owner, "a stalled backend loses its keys");
        assert_eq!(
            t.pick(&r, &mut rng).unwrap().slot,
            spill,
            "to one stable successor"
        );
        t.endpoints[owner].set_latency_ms(110.0);
        assert_eq!(
            t.pick(&r, &mut rng).unwrap().slot,
            owner,
            "and gets them back"
        );
    }

    #[test]
    fn a_removed_endpoint_only_moves_its_own_keys() {
        let four = table_with(PolicyKind::Affinity, &[1.0; 4], &[None, None, None, None]);
        let mut rng = SmallRng::seed_from_u64(1);
        let mut moved = 0;
        for key in 0..400u64 {
            let mut r = request("m");
            r.affinity = Some(stable_hash(&key.to_le_bytes()));
            let before = four.pick(&r, &mut rng).unwrap().slot;
            four.endpoints[3].set_draining(true);
            let after = four.pick(&r, &mut rng).unwrap().slot;
            four.endpoints[3].set_draining(false);
            if before != 3 {
                assert_eq!(before, after, "keys of other endpoints stay put");
            } else {
                moved += 1;
            }
        }
        assert!(
            moved > 50 && moved < 150,
            "about a quarter of the keys moved: {moved}"
        );
    }
}
