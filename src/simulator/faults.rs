//! Per-request random faults: the unreliable-GPU behaviour routing quality is measured against.
//!
//! Each worker thread keeps one entropy-seeded `SmallRng`, so a draw costs a few arithmetic
//! operations and no lock; the draw itself takes any `Rng` so tests can seed it.

use std::{cell::RefCell, time::Duration};

use rand::{rngs::SmallRng, Rng, SeedableRng};

use super::SimConfig;

thread_local! {
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_entropy());
}

/// Runs `f` with this thread's generator.
pub fn with_rng<T>(f: impl FnOnce(&mut SmallRng) -> T) -> T {
    RNG.with(|rng| f(&mut rng.borrow_mut()))
}

/// What goes wrong with one request, drawn once when it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Answer 500 at once.
    Error,
    /// Never answer.
    Hang,
    /// Answer normally after an extra delay before the first token.
    Spike(Duration),
}

/// `error_rate` is passed separately because it can change at runtime.
pub fn draw(rng: &mut impl Rng, cfg: &SimConfig, error_rate: f64) -> Fault {
    // `gen::<f64>() < p` rather than `gen_bool(p)`: it cannot panic on an out-of-range rate.
    if rng.gen::<f64>() < error_rate {
        Fault::Error
    } else if rng.gen::<f64>() < cfg.hang_rate {
        Fault::Hang
    } else if rng.gen::<f64>() < cfg.spike_rate {
        Fault::Spike(Duration::from_millis(cfg.spike_ms))
    } else {
        Fault::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_of_zero_and_one_are_exact() {
        let mut rng = SmallRng::seed_from_u64(7);
        let calm = SimConfig::default();
        assert!((0..1000).all(|_| draw(&mut rng, &calm, 0.0) == Fault::None));
        assert!((0..1000).all(|_| draw(&mut rng, &calm, 1.0) == Fault::Error));
        let hung = SimConfig {
            hang_rate: 1.0,
            ..SimConfig::default()
        };
        assert_eq!(draw(&mut rng, &hung, 0.0), Fault::Hang);
        let spiky = SimConfig {
            spike_rate: 1.0,
            spike_ms: 30,
            ..SimConfig::default()
        };
        assert_eq!(
            draw(&mut rng, &spiky, 0.0),
            Fault::Spike(Duration::from_millis(30))
        );
    }
}
