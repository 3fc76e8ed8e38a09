//! Passive failure detection: a circuit breaker per endpoint fed by live traffic. Consecutive
//! failures open the circuit (the endpoint is ejected) for a cool-down that doubles while the
//! endpoint keeps failing; when it expires the circuit is half-open and one live request at a time
//! may try the endpoint: a success closes the circuit, a failure opens it again for longer.

use std::time::{Duration, Instant};

use serde::Serialize;

/// Breaker thresholds, as `[balancer]` in `config/default.toml` sets them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// Consecutive live failures that eject an endpoint.
    pub eject_after_failures: u32,
    /// First cool-down; each further ejection without a success in between doubles it.
    pub cooldown_ms: u64,
    pub max_cooldown_ms: u64,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            eject_after_failures: 3,
            cooldown_ms: 2_000,
            max_cooldown_ms: 60_000,
        }
    }
}

/// Whether an endpoint takes traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Circuit {
    Closed,
    Open,
    HalfOpen,
}

impl Circuit {
    pub fn as_u8(self) -> u8 {
        match self {
            Circuit::Closed => 0,
            Circuit::Open => 1,
            Circuit::HalfOpen => 2,
        }
    }

    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => Circuit::Open,
            2 => Circuit::HalfOpen,
            _ => Circuit::Closed,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Breaker {
    circuit: Circuit,
    consecutive_failures: u32,
    /// Ejections since the last success; sets the next cool-down.
    ejections: u32,
    reopen_at: Option<Instant>,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            circuit: Circuit::Closed,
            consecutive_failures: 0,
            ejections: 0,
            reopen_at: None,
        }
    }
}

impl Breaker {
    pub fn circuit(&self) -> Circuit {
        self.circuit
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    pub fn ejections(&self) -> u32 {
        self.ejections
    }

    /// Time left before an open circuit turns half-open.
    pub fn reopens_in(&self, now: Instant) -> Option<Duration> {
        self.reopen_at.map(|at| at.saturating_duration_since(now))
    }

    /// Counts one live outcome; returns the new circuit when it changed.
    ///
    /// A success while the circuit is open changes nothing: nothing is sent to an open endpoint,
    /// so it is the answer of a request sent before the ejection (outcomes reach the balancer in
    /// batches, after the verdict that ejected it), and says nothing about the endpoint now. Only
    /// the half-open trial closes the circuit.
    pub fn record(&mut self, success: bool, now: Instant, s: &BreakerSettings) -> Option<Circuit> {
        if success {
            match self.circuit {
                Circuit::Open => return None,
                Circuit::HalfOpen => {
                    self.consecutive_failures = 0;
                    self.ejections = 0;
                    self.reopen_at = None;
                    return self.set(Circuit::Closed);
                }
                Circuit::Closed => {
                    self.consecutive_failures = 0;
                    self.ejections = 0;
                    return None;
                }
            }
        }
        self.consecutive_failures += 1;
        let trip = match self.circuit {
            Circuit::Closed => self.consecutive_failures >= s.eject_after_failures.max(1),
            Circuit::HalfOpen => true,
            Circuit::Open => false,
        };
        if !trip {
            return None;
        }
        self.open(now, s)
    }

    /// Ejects at once, whatever the count of failures (the endpoint refused a fresh connection,
    /// or a probe found it hung): the cool-down grows as for any ejection.
    pub fn eject(&mut self, now: Instant, s: &BreakerSettings) -> Option<Circuit> {
        self.consecutive_failures = self.consecutive_failures.max(s.eject_after_failures);
        if self.circuit == Circuit::Open {
            return None;
        }
        self.open(now, s)
    }

    /// Opens the circuit for a cool-down that doubles with each ejection, up to the maximum.
    fn open(&mut self, now: Instant, s: &BreakerSettings) -> Option<Circuit> {
        self.ejections += 1;
        let doublings = self.ejections.saturating_sub(1).min(20);
        let cooldown = s
            .cooldown_ms
            .saturating_mul(1 << doublings)
            .min(s.max_cooldown_ms.max(s.cooldown_ms));
        self.reopen_at = Some(now + Duration::from_millis(cooldown));
        self.set(Circuit::Open)
    }

    /// Turns an open circuit half-open once its cool-down has passed.
    pub fn tick(&mut self, now: Instant) -> Option<Circuit> {
        match (self.circuit, self.reopen_at) {
            (Circuit::Open, Some(at)) if now >= at => {
                self.reopen_at = None;
                self.set(Circuit::HalfOpen)
            }
            _ => None,
        }
    }

    fn set(&mut self, circuit: Circuit) -> Option<Circuit> {
        (self.circuit != circuit).then(|| {
            self.circuit = circuit;
            circuit
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    #[test]
    fn ejects_after_consecutive_failures_and_backs_off_while_failing() {
        let s = BreakerSettings::default();
        let clock = ManualClock::default();
        let mut b = Breaker::default();
        assert_eq!(b.record(false, clock.now(), &s), None);
        assert_eq!(
            b.record(true, clock.now(), &s),
            None,
            "a success resets the count"
        );
        assert_eq!(b.record(false, clock.now(), &s), None);
        assert_eq!(b.record(false, clock.now(), &s), None);
        assert_eq!(b.record(false, clock.now(), &s), Some(Circuit::Open));
        assert_eq!(b.reopens_in(clock.now()), Some(Duration::from_secs(2)));
        clock.advance(Duration::from_millis(1999));
        assert_eq!(b.tick(clock.now()), None);
        clock.advance(Duration::from_millis(1));
        assert_eq!(b.tick(clock.now()), Some(Circuit::HalfOpen));
        assert_eq!(
            b.record(false, clock.now(), &s),
            Some(Circuit::Open),
            "the half-open probe failed"
        );
        assert_eq!(
            b.reopens_in(clock.now()),
            Some(Duration::from_secs(4)),
            "cool-down doubled"
        );
        clock.advance(Duration::from_secs(4));
        assert_eq!(b.tick(clock.now()), Some(Circuit::HalfOpen));
        assert_eq!(b.record(true, clock.now(), &s), Some(Circuit::Closed));
        assert_eq!(b.ejections(), 0);
    }

    #[test]
    fn a_late_success_does_not_close_an_open_circuit() {
        let s = BreakerSettings::default();
        let clock = ManualClock::default();
        let mut b = Breaker::default();
        assert_eq!(b.eject(clock.now(), &s), Some(Circuit::Open));
        // The answer of a request sent before the ejection arrives after it.
        assert_eq!(b.record(true, clock.now(), &s), None);
        assert_eq!(b.circuit(), Circuit::Open);
        assert_eq!(b.reopens_in(clock.now()), Some(Duration::from_secs(2)));
        clock.advance(Duration::from_secs(2));
        assert_eq!(b.tick(clock.now()), Some(Circuit::HalfOpen));
        assert_eq!(b.record(true, clock.now(), &s), Some(Circuit::Closed));
    }

    #[test]
    fn cooldown_is_capped() {
        let s = BreakerSettings {
            eject_after_failures: 1,
            cooldown_ms: 1000,
            max_cooldown_ms: 3000,
        };
        let clock = ManualClock::default();
        let mut b = Breaker::default();
        for expected in [1, 2, 3, 3] {
            assert_eq!(b.record(false, clock.now(), &s), Some(Circuit::Open));
            assert_eq!(
                b.reopens_in(clock.now()),
                Some(Duration::from_secs(expected))
            );
            clock.advance(Duration::from_secs(expected));
            assert_eq!(b.tick(clock.now()), Some(Circuit::HalfOpen));
        }
    }
}
