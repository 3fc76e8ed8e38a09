//! Per-key limits, held in memory on the request path: requests per minute (GCRA, from
//! `governor`), tokens per minute, requests in flight and a daily token budget.
//!
//! Tokens are known only when the answer's usage arrives, so they are charged afterwards, and a
//! request is admitted while its key is not over its limit (as OpenAI and Envoy AI Gateway do):
//! the token bucket may go into debt, which the key then waits out. governor's GCRA cannot be
//! charged past its capacity, so the token bucket is the few lines of [`TokenBucket`].
//!
//! Everything a request path needs goes through [`LimitStore`], so a store shared by several
//! gateway replicas (Redis) can replace [`MemoryLimits`] without touching the callers.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, MonotonicClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::keys::KeyLimits;

const MINUTE: Duration = Duration::from_secs(60);
const DAY_MS: u64 = 86_400_000;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_concurrent` requests are in flight.
    Concurrency,
    Requests,
    Tokens,
    /// The daily token budget is spent until midnight UTC.
    DailyBudget,
}

/// What OpenAI's `x-ratelimit-*` headers say, for the SDKs' own back-off.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateState {
    pub requests: Option<Window>,
    pub tokens: Option<Window>,
}

/// One limit's state: its size, what is left, and when it is whole again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub limit: u64,
    pub remaining: u64,
    pub reset: Duration,
}

/// A refused request: why, when to try again, and the limits' state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refused {
    pub why: Refusal,
    pub retry_after: Duration,
    pub state: RateState,
}

/// The limits of one key, as the request path uses them.
pub trait LimitStore: Send + Sync {
    /// Admits a request (counting it against the request rate and as in flight) or refuses it.
    fn admit(&self) -> Result<RateState, Refused>;
    /// Ends a request admitted by [`LimitStore::admit`].
    fn release(&self);
    /// Charges the tokens a finished request used.
    fn charge(&self, tokens: u64);
    /// The limits' state without admitting anything.
    fn state(&self) -> RateState;
}

type Gcra = RateLimiter<NotKeyed, InMemoryState, MonotonicClock, StateInformationMiddleware>;

/// [`LimitStore`] in this process's memory.
pub struct MemoryLimits {
    limits: KeyLimits,
    requests: Option<(Gcra, MonotonicClock)>,
    tokens: Option<Mutex<TokenBucket>>,
    daily: Option<DailyBudget>,
    in_flight: AtomicU64,
    /// Requests left after the last admission, and when.
    last_requests: Mutex<(u64, Instant)>,
}

impl MemoryLimits {
    pub fn new(limits: KeyLimits) -> Self {
        let requests = limits.rpm.map(|rpm| {
            let rpm = NonZeroU32::new(u32::try_from(rpm).unwrap_or(u32::MAX).max(1))
                .unwrap_or(NonZeroU32::MIN);
            let clock = MonotonicClock;
            (
                RateLimiter::direct_with_clock(Quota::per_minute(rpm), clock.clone())
                    .with_middleware::<StateInformationMiddleware>(),
                clock,
            )
        });
        Self {
            limits,
            requests,
            tokens: limits
                .tpm
                .map(|tpm| Mutex::new(TokenBucket::full(tpm, Instant::now()))),
            daily: limits.daily_tokens.map(DailyBudget::new),
            in_flight: AtomicU64::new(0),
            last_requests: Mutex::new((limits.rpm.unwrap_or(0), Instant::now())),
        }
    }

    fn token_window(&self, now: Instant) -> Option<Window> {
        let bucket = self.tokens.as_ref()?;
        let mut bucket = bucket.lock().unwrap_or_else(|e| e.into_inner());
        Some(bucket.window(now))
    }

    fn refuse(&self, why: Refusal, retry_after: Duration, requests: Option<Window>) -> Refused {
        Refused {
            why,
            retry_after,
            state: RateState {
                requests: requests.or_else(|| self.request_window()),
                tokens: self.token_window(Instant::now()),
            },
        }
    }

    /// The request window as the last admission left it, refilled since: governor has no way to
    /// read its state without taking a cell.
    fn request_window(&self) -> Option<Window> {
        let rpm = self.limits.rpm?;
        let interval = request_interval(rpm);
        let (remaining, at) = *self.last_requests.lock().unwrap_or_else(|e| e.into_inner());
        let refilled = (at.elapsed().as_nanos() / interval.as_nanos().max(1)) as u64;
        let remaining = remaining.saturating_add(refilled).min(rpm);
        Some(request_window(rpm, remaining))
    }
}

fn request_interval(rpm: u64) -> Duration {
    MINUTE / u32::try_from(rpm).unwrap_or(u32::MAX).max(1)
}

fn request_window(rpm: u64, remaining: u64) -> Window {
    Window {
        limit: rpm,
        remaining,
        reset: request_interval(rpm) * u32::try_from(rpm - remaining.min(rpm)).unwrap_or(u32::MAX),
    }
}

impl LimitStore for MemoryLimits {
    fn admit(&self) -> Result<RateState, Refused> {
        if let Some(max) = self.limits.max_concurrent {
            if self.in_flight.fetch_add(1, Ordering::AcqRel) >= max {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                return Err(self.refuse(Refusal::Concurrency, Duration::from_secs(1), None));
            }
        }
        let undo = |this: &Self| {
            if this.limits.max_concurrent.is_some() {
                this.in_flight.fetch_sub(1, Ordering::AcqRel);
            }
        };
        if let Some(wait) = self.daily.as_ref().and_then(DailyBudget::spent_for) {
            undo(self);
            return Err(self.refuse(Refusal::DailyBudget, wait, None));
        }
        let now = Instant::now();
        // One lock of the bucket: refused while in debt, else its window for the headers.
        let tokens = match &self.tokens {
            Some(bucket) => {
                let mut bucket = bucket.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(wait) = bucket.debt_for(now) {
                    drop(bucket);
                    undo(self);
                    return Err(self.refuse(Refusal::Tokens, wait, None));
                }
                Some(bucket.window(now))
            }
            None => None,
        };
        let requests = match (&self.requests, self.limits.rpm) {
            (Some((gcra, clock)), Some(rpm)) => match gcra.check() {
                Ok(snapshot) => {
                    let remaining = u64::from(snapshot.remaining_burst_capacity());
                    *self.last_requests.lock().unwrap_or_else(|e| e.into_inner()) =
                        (remaining, now);
                    Some(request_window(rpm, remaining))
                }
                Err(not_until) => {
                    undo(self);
                    let wait = not_until.wait_time_from(clock.now());
                    // None left, and the next one due in `wait`: as if the last admission (of
                    // the last one) happened an interval before that.
                    *self.last_requests.lock().unwrap_or_else(|e| e.into_inner()) =
                        (0, now + wait - request_interval(rpm).min(wait));
                    let window = request_window(rpm, 0);
                    return Err(self.refuse(Refusal::Requests, wait, Some(window)));
                }
            },
            _ => None,
        };
        Ok(RateState { requests, tokens })
    }

    fn release(&self) {
        if self.limits.max_concurrent.is_some() {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn charge(&self, tokens: u64) {
        if tokens == 0 {
            return;
        }
        if let Some(bucket) = &self.tokens {
            let mut bucket = bucket.lock().unwrap_or_else(|e| e.into_inner());
            bucket.take(tokens, Instant::now());
        }
        if let Some(daily) = &self.daily {
            daily.charge(tokens);
        }
    }

    fn state(&self) -> RateState {
        RateState {
            requests: self.request_window(),
            tokens: self.token_window(Instant::now()),
        }
    }
}

/// Tokens per minute: a bucket of `tpm` that refills continuously and may go below zero when an
/// answer used more than was left; requests wait until it is above zero again.
#[derive(Debug)]
struct TokenBucket {
    capacity: f64,
    level: f64,
    at: Instant,
}

impl TokenBucket {
    fn full(tpm: u64, now: Instant) -> Self {
        Self {
            capacity: tpm as f64,
            level: tpm as f64,
            at: now,
        }
    }

    fn per_second(&self) -> f64 {
        self.capacity / MINUTE.as_secs_f64()
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * self.per_second()).min(self.capacity);
        self.at = now;
    }

    /// How long until the key may send again, when it is at or below zero.
    fn debt_for(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        (self.level < 1.0).then(|| seconds((1.0 - self.level) / self.per_second()))
    }

    fn take(&mut self, tokens: u64, now: Instant) {
        self.refill(now);
        self.level -= tokens as f64;
    }

    fn window(&mut self, now: Instant) -> Window {
        self.refill(now);
        Window {
            limit: self.capacity as u64,
            remaining: self.level.max(0.0) as u64,
            // A key in debt is whole again only once the debt is paid too.
            reset: seconds((self.capacity - self.level).max(0.0) / self.per_second()),
        }
    }
}

/// A wait in seconds as a `Duration`, saturating: a backend that reports absurd usage (say
/// 2⁶⁴ tokens) puts the key's bucket that deep in debt, and `Duration::from_secs_f64` panics
/// on a wait that long.
fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

/// Tokens per UTC day.
struct DailyBudget {
    budget: u64,
    /// The day (days since the epoch) and the tokens used on it, changed together.
    used: Mutex<(u64, u64)>,
}

impl DailyBudget {
    fn new(budget: u64) -> Self {
        Self {
            budget,
            used: Mutex::new((now_ms() / DAY_MS, 0)),
        }
    }

    /// Runs `f` on today's count (a new day starts from zero); returns the time now.
    fn today<T>(&self, f: impl FnOnce(&mut u64) -> T) -> (T, u64) {
        let now = now_ms();
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if used.0 != now / DAY_MS {
            *used = (now / DAY_MS, 0);
        }
        (f(&mut used.1), now)
    }

    /// Until midnight UTC, when the budget is spent.
    fn spent_for(&self) -> Option<Duration> {
        let (spent, now) = self.today(|used| *used >= self.budget);
        spent.then(|| Duration::from_millis(DAY_MS - now % DAY_MS))
    }

    fn charge(&self, tokens: u64) {
        self.today(|used| *used = used.saturating_add(tokens));
    }
}

/// Milliseconds since the Unix epoch, unsigned as the day arithmetic wants them.
fn now_ms() -> u64 {
    u64::try_from(crate::clock::unix_ms()).unwrap_or(0)
}

/// A key's limits, shared by every request of the key.
pub type SharedLimits = Arc<dyn LimitStore>;

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rpm: Option<u64>, tpm: Option<u64>, concurrent: Option<u64>) -> MemoryLimits {
        MemoryLimits::new(KeyLimits {
            rpm,
            tpm,
            max_concurrent: concurrent,
            daily_tokens: None,
        })
    }

    #[test]
    fn requests_per_minute_admit_a_burst_of_the_limit_then_refuse_with_the_wait() {
        let l = limits(Some(30), None, None);
        for i in 0..30 {
            let state = l.admit().unwrap_or_else(|_| panic!("request {i} admitted"));
            assert_eq!(state.requests.unwrap().remaining, 29 - i);
        }
        let refused = l.admit().unwrap_err();
        assert_eq!(refused.why, Refusal::Requests);
        assert!(refused.retry_after > Duration::from_millis(1500));
        assert!(refused.retry_after <= Duration::from_secs(2));
        assert_eq!(refused.state.requests.unwrap().remaining, 0);
    }

    #[test]
    fn tokens_are_charged_after_the_answer_and_a_key_in_debt_waits() {
        let l = limits(None, Some(600), None);
        assert!(l.admit().is_ok());
        l.charge(900);
        let refused = l.admit().unwrap_err();
        assert_eq!(refused.why, Refusal::Tokens);
        // 300 tokens of debt at 10 tokens a second: about 30 s.
        let wait = refused.retry_after.as_secs_f64();
        assert!((29.0..=31.0).contains(&wait), "{wait}");
        assert_eq!(refused.state.tokens.unwrap().remaining, 0);
    }

    #[test]
    fn absurd_reported_usage_refuses_for_as_long_as_it_can_say_without_a_panic() {
        // A backend reporting 2⁶⁴ tokens: a debt of ~10²¹ s at one token a minute.
        let l = limits(None, Some(1), None);
        assert!(l.admit().is_ok());
        l.charge(u64::MAX);
        let refused = l.admit().unwrap_err();
        assert_eq!(refused.why, Refusal::Tokens);
        assert_eq!(refused.retry_after, Duration::MAX);
        assert_eq!(l.state().tokens.unwrap().reset, Duration::MAX);
    }

    #[test]
    fn concurrency_is_held_until_release() {
        let l = limits(None, None, Some(2));
        assert!(l.admit().is_ok());
        assert!(l.admit().is_ok());
        assert_eq!(l.admit().unwrap_err().why, Refusal::Concurrency);
        l.release();
        assert!(l.admit().is_ok());
    }

    #[test]
    fn a_refused_request_takes_nothing() {
        let l = limits(Some(5), None, Some(1));
        assert!(l.admit().is_ok());
        assert_eq!(l.admit().unwrap_err().why, Refusal::Concurrency);
        assert_eq!(l.state().requests.unwrap().remaining, 4);
    }

    #[test]
    fn the_daily_budget_refuses_until_midnight() {
        let l = MemoryLimits::new(KeyLimits {
            daily_tokens: Some(100),
            ..KeyLimits::default()
        });
        assert!(l.admit().is_ok());
        l.charge(100);
        let refused = l.admit().unwrap_err();
        assert_eq!(refused.why, Refusal::DailyBudget);
        assert!(refused.retry_after <= Duration::from_millis(DAY_MS));
    }
}
