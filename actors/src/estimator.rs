//! What the balancer learns about each endpoint from how its requests went, and publishes for the
//! policies and the hang detector (see [`crate::endpoint::Estimate`]):
//!
//! - time to first token when the prompt is cached (`warm`), and prefill time per uncached prompt
//!   block (`block`): the line through (uncached blocks, time to first token) of its recent
//!   streams, fitted by least squares with old samples fading, so a cold prefill neither reads as
//!   the backend being slow nor is forgotten as cache value, and a backend that only ever sees
//!   cold prompts still shows how fast it prefills. A stream's uncached blocks are what its
//!   backend reported cached where it reports it ([`CacheReport`]), else the prefix index's guess;
//! - how far its first tokens come later than those two predict (`jitter`, the root mean square
//!   of the lateness): latency spikes, stalls, a cache that forgets sooner than its index. A
//!   sample far beyond the prediction (a spike) counts only here, so it neither inflates `warm`
//!   nor `block`;
//! - how often it spikes, and its share of the traffic: together, how much of the fleet's slowest
//!   percent it causes. A backend that spikes one time in twenty can take a tenth of the traffic
//!   and leave the fleet's 99th percentile clean; beyond that its tail is priced (`tail`), so it
//!   serves what the steady ones cannot take soon;
//! - how long a request holds its batch slot (`service`), for the wait a full batch causes;
//! - recent 95th percentiles of time to first token and of whole non-streamed answers, for
//!   deciding when a request is overdue (and when to hedge);
//! - its batch capacity, from the running and waiting requests it reports;
//! - the peak-EWMA time to first byte that `affinity` weighs, and the average it returns to, which
//!   `p2c` weighs.
//!
//! Every estimate decays with time, not only with new samples: without traffic it returns to its
//! long-run value, so one slow answer cannot keep a backend out of rotation for good.

use std::time::{Duration, Instant};

use crate::endpoint::Estimate;
use crate::policy::cache_aware::DEFAULT_CAPACITY;

/// Samples kept for the percentiles.
const WINDOW: usize = 256;
/// Answers before the average time to first byte counts as measured.
const MEAN_SAMPLES: u64 = 8;
/// A first token later than twice the prompt's cold prefill plus this is a spike: it counts as
/// lateness, not as what warm or cold prefills take.
const OUTLIER_MS: f64 = 250.0;
/// Samples sent into a batch this full teach nothing of prefill or lateness (they may have
/// queued): queueing shows in the queue term, not as a tail. They count as spikes only when later
/// than a slot's time on top of a spike.
const LEARN_BELOW_LOAD: f64 = 0.75;
/// The share of the fleet's first tokens that may be spikes: under a 99th percentile, with room.
pub const TAIL_BUDGET: f64 = 0.005;

/// What latency spikes of `jitter_ms` cost a request on a backend at `used` times its tail budget
/// ([`crate::endpoint::Estimate::tail_budget_used`]), ms: a quarter of its lateness while its
/// spikes are well within the fleet's tail budget, rising steeply past it, to twice the lateness.
pub fn tail_price_ms(jitter_ms: f64, used: f64) -> f64 {
    jitter_ms * (0.25 + used * used).min(2.0)
}

/// How a successful request went, as far as learning is concerned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub stream: bool,
    /// Time to the first byte of the body (the first token of a stream).
    pub first: Duration,
    /// Time to the end of the answer.
    pub total: Duration,
    /// Prompt blocks, and how many of them the endpoint was estimated to have cached.
    pub blocks: u32,
    pub cached: u32,
    /// What the answer's usage said the endpoint had cached, which is what it learns from when
    /// it can.
    pub report: CacheReport,
    /// How full the endpoint's batch was when the request was sent (requests in flight over its
    /// capacity; 1 when it reported a queue): the later a loaded request, the more of that may be
    /// queueing rather than the backend.
    pub load: f64,
}

/// What an answer's usage said of the prompt tokens the backend served from its prefix cache.
/// The prefix index's guess is optimistic (it takes for cached what the backend has since let
/// go), and fitted through it the prefill line put a cached prompt's first token at 55–70 ms on
/// simulators that take 7: a cache hit looked worth a third of what it saves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheReport {
    /// No usage from the backend (the gateway estimated it): the index's guess stands.
    #[default]
    Unknown,
    /// A usage without `prompt_tokens_details`: vLLM (with `--enable-prompt-tokens-details`)
    /// writes them only when the cache served part of the prompt, as the simulator does, so none
    /// was cached if this backend has written them before; one that never has may not write them
    /// at all (vLLM without the flag, SGLang without `--enable-cache-report`), and the index's
    /// guess stands. llama.cpp writes them always.
    Silent,
    /// This many of the prompt's blocks (the reported share of its tokens).
    Blocks(u32),
}

/// A time-decaying average: `fast` follows the samples, `slow` is the long-run value `fast` returns
/// to when samples stop.
#[derive(Debug, Clone, Copy, Default)]
struct Learned {
    fast: f64,
    slow: f64,
    /// When `fast` last moved (a sample, or decay).
    at: Option<Instant>,
    /// Samples so far.
    samples: u64,
}

impl Learned {
    /// A sample weighs at least as much as in a plain average of the samples so far, so the first
    /// few are averaged rather than the first one standing for the whole time constant (a 10 ms
    /// probe through the gateway, then 175 answers of 400 ms in 13 s, left one of four equal
    /// backends' slot time at 227 ms, the probe still weighing 44 %: it looked cheaper and queued).
    fn observe(&mut self, sample_ms: f64, now: Instant, tau: Duration, peak: bool) {
        self.samples += 1;
        let weight = 1.0 / self.samples as f64;
        match self.at {
            None => {
                self.fast = sample_ms;
                self.slow = sample_ms;
            }
            Some(at) => {
                let keep = keep(now.saturating_duration_since(at), tau).min(1.0 - weight);
                self.fast = if peak && sample_ms > self.fast {
                    sample_ms
                } else {
                    self.fast * keep + sample_ms * (1.0 - keep)
                };
                let slow_keep = keep.powf(0.1).min(0.99).min(1.0 - weight);
                self.slow = self.slow * slow_keep + sample_ms * (1.0 - slow_keep);
            }
        }
        self.at = Some(now);
    }

    /// Moves `fast` back toward `slow` for the time since it last moved.
    fn decay(&mut self, now: Instant, tau: Duration) {
        if let Some(at) = self.at {
            let keep = keep(now.saturating_duration_since(at), tau);
            self.fast = self.slow + (self.fast - self.slow) * keep;
            self.at = Some(now);
        }
    }

    fn value(&self) -> f64 {
        if self.at.is_some() {
            self.fast
        } else {
            0.0
        }
    }

    /// The long-run value: an average of the samples (each weighing at least 1 %), no peaks.
    fn mean(&self) -> f64 {
        if self.at.is_some() {
            self.slow
        } else {
            0.0
        }
    }
}

/// The weight an old value keeps after `elapsed`, with time constant `tau`.
fn keep(elapsed: Duration, tau: Duration) -> f64 {
    (-elapsed.as_secs_f64() / tau.as_secs_f64().max(1e-9)).exp()
}

/// The weight sums that fade with time constant `tau` keep from `at` to `now` (1 if they have
/// none yet); `at` moves to `now`.
fn fade(at: &mut Option<Instant>, now: Instant, tau: Duration) -> f64 {
    let k = at.map_or(1.0, |at| keep(now.saturating_duration_since(at), tau));
    *at = Some(now);
    k
}

/// A mean of samples whose default is zero (a share of spikes, a lateness), over sums that fade
/// with time constant `tau`, counted as if [`ZERO_PRIOR`] samples of zero came first. A share of
/// spikes is then learned from the first few dozen answers (a time-decaying average that gave a
/// sample a few tenths of a percent of weight took a whole time constant to see a backend that
/// spikes one time in twenty, and by then it had taken its full share and put its spikes at the
/// fleet's 99th percentile), while one late answer weighs as one in [`ZERO_PRIOR`], and, as the
/// sums fade, the mean of a backend that gets no more traffic returns to zero.
#[derive(Debug, Clone, Copy, Default)]
struct Mean {
    sum: f64,
    n: f64,
    /// How much of [`ZERO_PRIOR`] has faded since the first sample (0 to 1).
    faded: f64,
    at: Option<Instant>,
}

/// Samples of zero a [`Mean`] starts from.
const ZERO_PRIOR: f64 = 20.0;
/// What is left of them once they have faded: enough that the mean of a backend that gets no
/// more traffic still returns to zero as its sums fade.
const ZERO_FLOOR: f64 = 2.0;

impl Mean {
    /// (Before the first sample `fade` keeps everything, so the prior starts fading then.)
    fn decay(&mut self, now: Instant, tau: Duration) {
        let k = fade(&mut self.at, now, tau);
        self.sum *= k;
        self.n *= k;
        self.faded = 1.0 - (1.0 - self.faded) * k;
    }

    fn observe(&mut self, sample: f64, now: Instant, tau: Duration) {
        self.decay(now, tau);
        self.sum += sample;
        self.n += 1.0;
    }

    /// The prior fades as the samples do, down to [`ZERO_FLOOR`]. Held at its start, it made a
    /// backend answering 4 streams a second (40 samples within the 10 s time constant, against
    /// 20 of zero) show two thirds of its share of spikes, so it took half as much traffic again
    /// as the tail budget allows (unequal fleet, 40 prompts: 14–21 % of the requests on the
    /// simulator that spikes one time in twenty, whose spikes reached the 99th percentile in 4
    /// rounds of 21 on three workloads; with the prior faded, in none, 7 rounds each).
    fn value(&self) -> f64 {
        let prior = ZERO_FLOOR + (ZERO_PRIOR - ZERO_FLOOR) * (1.0 - self.faded);
        self.sum / (self.n + prior)
    }
}

/// A least-squares line through (uncached blocks, time to first token) whose samples fade with
/// time constant `tau`: the sums decay, so recent samples dominate and, with no samples for a few
/// time constants, the fit has too little weight to publish and the fleet's average stands in.
#[derive(Debug, Clone, Copy, Default)]
struct Fit {
    n: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
    at: Option<Instant>,
}

/// Sample weight below which a fit says nothing.
const MIN_FIT_WEIGHT: f64 = 1.0;

impl Fit {
    fn decay(&mut self, now: Instant, tau: Duration) {
        let k = fade(&mut self.at, now, tau);
        for sum in [
            &mut self.n,
            &mut self.x,
            &mut self.y,
            &mut self.xx,
            &mut self.xy,
        ] {
            *sum *= k;
        }
    }

    fn add(&mut self, x: f64, y: f64, now: Instant, tau: Duration) {
        self.decay(now, tau);
        self.n += 1.0;
        self.x += x;
        self.y += y;
        self.xx += x * x;
        self.xy += x * y;
    }

    /// (time with nothing to prefill, time per block), ms; 0 for what the samples cannot tell.
    /// Samples that all have about the same number of blocks only tell their sum: a warm time if
    /// they were cached, a prefill rate (taking the whole time) if they were not.
    fn line(&self) -> (f64, f64) {
        if self.n < MIN_FIT_WEIGHT {
            return (0.0, 0.0);
        }
        let (mx, my) = (self.x / self.n, self.y / self.n);
        let vx = (self.xx / self.n - mx * mx).max(0.0);
        if vx > (0.1 * mx).powi(2) + 0.25 {
            let slope = ((self.xy / self.n - mx * my) / vx).max(0.0);
            let intercept = my - slope * mx;
            if intercept > 0.0 {
                return (intercept, slope);
            }
            return (MIN_WARM_MS, (my - MIN_WARM_MS).max(0.0) / mx);
        }
        if mx < 2.0 {
            (my.max(MIN_WARM_MS), 0.0)
        } else {
            (0.0, my / mx)
        }
    }

    /// The time to first token it predicts for `x` uncached blocks, once it knows enough: not
    /// for a cold prompt from warm samples only.
    fn predict(&self, x: f64) -> Option<f64> {
        let (warm, block) = self.line();
        let predicted = warm + x * block;
        (predicted > 0.0 && (block > 0.0 || x < 2.0)).then_some(predicted)
    }
}

/// The most requests a backend is taken to run at once, whatever its `/metrics` say.
const MAX_REPORTED_RUNNING: u32 = 1 << 20;

/// The least warm time a fit publishes: zero would read as "not measured".
const MIN_WARM_MS: f64 = 0.1;

/// The latest samples, for percentiles.
#[derive(Debug, Clone, Default)]
struct Window {
    samples: Vec<f64>,
    next: usize,
    /// The 95th percentile as of the last [`P95_EVERY`]th sample (selecting it is a copy and a
    /// partition of the window: too much to do for every answer).
    p95: f64,
    since_p95: usize,
    scratch: Vec<f64>,
}

/// Samples between two computations of a window's 95th percentile, once it is this full.
const P95_EVERY: usize = 16;

impl Window {
    fn push(&mut self, ms: f64) {
        if self.samples.len() < WINDOW {
            self.samples.push(ms);
        } else {
            self.samples[self.next] = ms;
        }
        self.next = (self.next + 1) % WINDOW;
        self.since_p95 += 1;
        if self.since_p95 >= P95_EVERY || self.samples.len() < P95_EVERY {
            self.since_p95 = 0;
            self.scratch.clear();
            self.scratch.extend_from_slice(&self.samples);
            let len = self.scratch.len();
            let rank = ((len as f64 * 0.95).ceil() as usize).clamp(1, len) - 1;
            self.p95 = *self.scratch.select_nth_unstable_by(rank, f64::total_cmp).1;
        }
    }

    fn p95(&self) -> f64 {
        self.p95
    }
}

/// One endpoint's learning state, owned by the balancer.
#[derive(Debug, Clone, Default)]
pub struct Estimator {
    first_byte: Learned,
    prefill: Fit,
    /// Mean square of how much later than predicted first tokens came, ms².
    lateness: Mean,
    /// The share of its streams that were spikes (0..1).
    spikes: Mean,
    /// Requests per second it answered, and how many since the last tick.
    rate: Learned,
    answered: u32,
    service: Learned,
    ttft: Window,
    full: Window,
    /// What it ran when others waited (0: never seen queueing), and the most it has run.
    capacity: u32,
    most_running: u32,
    /// Blocks per second its prefix cache takes in (misses of the gateway's index of it), and
    /// the index's count of them when last read.
    churn: Learned,
    misses_seen: u64,
    /// The share of the prompt blocks sent to it that it had been sent before, and the index's
    /// counts of blocks sent and of those when last read.
    reuse: Learned,
    sent_seen: u64,
    recurred_seen: u64,
    /// Whether it has reported cached tokens ([`CacheReport`]).
    reports_cache: bool,
}

/// A prefix index's running counts, read once per tick.
#[derive(Debug, Clone, Copy)]
pub struct Churn {
    pub misses: u64,
    pub sent: u64,
    pub recurred: u64,
}

impl Estimator {
    pub fn observe(&mut self, s: Sample, now: Instant, tau: Duration) {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        self.answered += 1;
        self.first_byte.observe(ms(s.first), now, tau, true);
        self.service.observe(ms(s.total), now, tau, false);
        if !s.stream {
            self.full.push(ms(s.total));
            return;
        }
        self.ttft.push(ms(s.first));
        // A loaded request may also have waited for a slot: it tells whether it spiked (later
        // than a slot's turn could explain), and nothing of lateness or prefill. Left out
        // altogether, a backend taking its full share while its capacity was unknown hid its
        // spikes for the first seconds, while they were doing the most harm.
        let loaded = s.load >= LEARN_BELOW_LOAD;
        let cached = match s.report {
            CacheReport::Blocks(blocks) => {
                self.reports_cache = true;
                blocks
            }
            CacheReport::Silent if self.reports_cache => 0,
            CacheReport::Silent | CacheReport::Unknown => s.cached,
        };
        let uncached = f64::from(s.blocks.saturating_sub(cached));
        let first = ms(s.first);
        // Lateness is what the prompt's cold prefill does not explain: the index may have taken
        // for cached what the backend was still prefilling for another request of the same
        // prompt, or had let go, and that is a miss, not a spike (two requests of one prompt at
        // once on llama.cpp made the second look 9 s late and priced its backend out).
        let spike = match self.prefill.predict(uncached) {
            Some(predicted) => {
                // (Where no cold prefill was seen yet, the prediction stands in.)
                let cold = self
                    .prefill
                    .predict(f64::from(s.blocks))
                    .map_or(predicted, |cold| cold.max(predicted));
                let late = (first - cold).max(0.0);
                let queue = if loaded { self.service.value() } else { 0.0 };
                let spike = late > cold + OUTLIER_MS + queue;
                self.spikes.observe(f64::from(u8::from(spike)), now, tau);
                if !loaded {
                    self.lateness.observe(late * late, now, tau);
                }
                spike
            }
            None => false,
        };
        if !loaded && !spike {
            self.prefill.add(uncached, first, now, tau);
        }
    }

    /// What the backend reports running and waiting: a queue means its batch is full at what it
    /// runs, and running more than thought means the batch is larger. Until it has queued, its
    /// capacity is unknown (what it ran so far is only a lower bound, and taking it for the
    /// capacity would make an idle backend look full).
    pub fn reported(&mut self, running: f64, waiting: f64) {
        // A batch holds at most thousands: a scrape saying more (or `+Inf`) is a backend's
        // garbage, and taken whole it overflowed the capacity's arithmetic below.
        let running = running.clamp(0.0, f64::from(MAX_REPORTED_RUNNING)).round() as u32;
        let queued = waiting > 0.0 && running > 0;
        if queued || (self.capacity > 0 && running > self.capacity) {
            self.capacity = running;
        }
        self.most_running = self.most_running.max(running);
    }

    /// Takes the index's counts (misses, blocks sent, blocks sent again) once per tick: the rate
    /// of misses since the last tick, and the share of blocks that had been sent before.
    pub fn cache_churn(&mut self, counts: Churn, now: Instant, tau: Duration) {
        let new = counts.misses.saturating_sub(self.misses_seen) as f64;
        self.misses_seen = counts.misses;
        let blocks = counts.sent.saturating_sub(self.sent_seen) as f64;
        self.sent_seen = counts.sent;
        let again = counts.recurred.saturating_sub(self.recurred_seen) as f64;
        self.recurred_seen = counts.recurred;
        if blocks > 0.0 {
            self.reuse
                .observe((again / blocks).min(1.0), now, tau, false);
        }
        let elapsed = self
            .churn
            .at
            .map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        if elapsed > 0.0 || self.churn.at.is_none() {
            let rate = if elapsed > 0.0 { new / elapsed } else { 0.0 };
            self.churn.observe(rate, now, tau, false);
        }
    }

    /// Takes the answers since the last tick as a rate, once per tick; answers it.
    pub fn rate_tick(&mut self, now: Instant, tau: Duration) -> f64 {
        let elapsed = self
            .rate
            .at
            .map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        if elapsed > 0.0 || self.rate.at.is_none() {
            let sample = if elapsed > 0.0 {
                f64::from(self.answered) / elapsed
            } else {
                0.0
            };
            self.rate.observe(sample, now, tau, false);
            self.answered = 0;
        }
        self.rate.value()
    }

    /// Decays every estimate toward its long-run value for the time since it last moved.
    pub fn decay(&mut self, now: Instant, tau: Duration) {
        for learned in [&mut self.first_byte, &mut self.service] {
            learned.decay(now, tau);
        }
        self.lateness.decay(now, tau);
        self.spikes.decay(now, tau);
        self.prefill.decay(now, tau);
    }

    /// The peak-EWMA time to first byte, ms (0: not measured).
    pub fn first_byte_ms(&self) -> f64 {
        self.first_byte.value()
    }

    /// The long-run average time to first byte, ms; 0 (not measured) until [`MEAN_SAMPLES`]
    /// answers came, since the first few stand for the whole backend: the gateway's readiness
    /// probe through it (one token, 7 ms) made one of four equal simulators look eight times
    /// faster than the others until their answers came, and `p2c` gave it their turns meanwhile
    /// (20 requests in flight on it against 12–14 on each of the others).
    pub fn first_byte_mean_ms(&self) -> f64 {
        if self.first_byte.samples < MEAN_SAMPLES {
            0.0
        } else {
            self.first_byte.mean()
        }
    }

    /// Its batch capacity: what it ran when others waited, or while that is unknown, a quarter
    /// more than it has been seen to run, so the gateway feeds it more step by step until its
    /// queue shows.
    pub fn capacity(&self) -> u32 {
        if self.capacity > 0 {
            self.capacity
        } else {
            (self.most_running + self.most_running / 4 + 2).max(DEFAULT_CAPACITY)
        }
    }

    /// The estimate as the request path reads it, with `ramp` the slow-start share,
    /// `cache_blocks` the size of its prefix cache and `share` its part of the fleet's recent
    /// answers.
    pub fn published(&self, ramp: f64, cache_blocks: usize, share: f64) -> Estimate {
        let jitter_ms = self.lateness.value().sqrt();
        let spikes = self.spikes.value();
        let churn = self.churn.value();
        let residence_ms = if churn > 1e-6 {
            cache_blocks as f64 / churn * 1000.0
        } else {
            f64::INFINITY
        };
        let (warm_ms, block_ms) = self.prefill.line();
        let mut estimate = Estimate {
            warm_ms,
            block_ms,
            jitter_ms,
            spikes,
            share,
            tail_ms: 0.0,
            reuse: self.reuse.value(),
            service_ms: self.service.value(),
            capacity: self.capacity(),
            capacity_known: self.capacity > 0,
            residence_ms,
            ramp,
        };
        estimate.tail_ms = tail_price_ms(jitter_ms, estimate.tail_budget_used());
        estimate
    }

    pub fn p95_ms(&self) -> (f64, f64) {
        (self.ttft.p95(), self.full.p95())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    const TAU: Duration = Duration::from_secs(10);

    fn stream(first_ms: u64, blocks: u32, cached: u32) -> Sample {
        Sample {
            stream: true,
            first: Duration::from_millis(first_ms),
            total: Duration::from_millis(first_ms + 300),
            blocks,
            cached,
            report: CacheReport::Unknown,
            load: 0.0,
        }
    }

    #[test]
    fn a_first_sample_weighs_as_one_of_the_first_few() {
        let clock = ManualClock::default();
        let (mut probed, mut plain) = (Estimator::default(), Estimator::default());
        // A 10 ms probe, then 175 answers of 400 ms over 13 s (far less than a time constant's
        // worth of decay between samples): as if the probe had not been there.
        probed.observe(
            Sample {
                stream: false,
                first: Duration::from_millis(10),
                total: Duration::from_millis(10),
                blocks: 0,
                cached: 0,
                report: CacheReport::Unknown,
                load: 0.0,
            },
            clock.now(),
            TAU,
        );
        for _ in 0..175 {
            clock.advance(Duration::from_millis(75));
            probed.observe(stream(100, 10, 10), clock.now(), TAU);
            plain.observe(stream(100, 10, 10), clock.now(), TAU);
        }
        let (probed, plain) = (
            probed.published(1.0, 0, 0.25),
            plain.published(1.0, 0, 0.25),
        );
        assert_eq!(plain.service_ms, 400.0);
        assert!(probed.service_ms > 390.0, "{}", probed.service_ms);
    }

    #[test]
    fn the_average_time_to_first_byte_waits_for_enough_answers() {
        let clock = ManualClock::default();
        let mut e = Estimator::default();
        e.observe(stream(7, 1, 0), clock.now(), TAU);
        assert_eq!(e.first_byte_mean_ms(), 0.0, "one probe is not a measure");
        for _ in 2..MEAN_SAMPLES {
            clock.advance(Duration::from_millis(20));
            e.observe(stream(60, 60, 0), clock.now(), TAU);
        }
        assert_eq!(e.first_byte_mean_ms(), 0.0, "{} answers", MEAN_SAMPLES - 1);
        e.observe(stream(60, 60, 0), clock.now(), TAU);
        let mean = e.first_byte_mean_ms();
        assert!(mean > 50.0 && mean < 60.0, "{mean}");
    }

    #[test]
    fn warm_and_cold_prefills_are_told_apart() {
        let clock = ManualClock::default();
        let mut e = Estimator::default();
        for _ in 0..5 {
            e.observe(stream(10, 100, 100), clock.now(), TAU);
            clock.advance(Duration::from_millis(100));
        }
        e.observe(stream(110, 100, 0), clock.now(), TAU);
        let p = e.published(1.0, 0, 0.25);
        assert!(
            (p.warm_ms - 10.0).abs() < 1e-6,
            "a cold prefill is not warm: {p:?}"
        );
        assert!(
            (p.block_ms - 1.0).abs() < 1e-6,
            "100 ms over 100 uncached blocks: {p:?}"
        );
    }

    #[test]
    fn what_the_backend_reports_cached_overrules_the_index() {
        let clock = ManualClock::default();
        let reported = |first_ms, report| Sample {
            report,
            ..stream(first_ms, 100, 100)
        };
        // The index takes every prompt for cached; the backend had let half of them go, and
        // says so: cached ones in their usage's details, cold ones by leaving the details out.
        let mut told = Estimator::default();
        let mut silent = Estimator::default();
        for i in 0..20 {
            let (first, report) = if i % 2 == 0 {
                (10, CacheReport::Blocks(100))
            } else {
                (110, CacheReport::Silent)
            };
            told.observe(reported(first, report), clock.now(), TAU);
            // A backend that never writes the details: nothing to learn from but the index.
            let never = if i % 2 == 0 {
                CacheReport::Silent
            } else {
                report
            };
            silent.observe(reported(first, never), clock.now(), TAU);
            clock.advance(Duration::from_millis(100));
        }
        let told = told.published(1.0, 0, 0.25);
        assert!((told.warm_ms - 10.0).abs() < 1e-6, "{told:?}");
        assert!((told.block_ms - 1.0).abs() < 1e-6, "{told:?}");
        let silent = silent.published(1.0, 0, 0.25);
        assert_eq!(silent.block_ms, 0.0, "all taken for cached: {silent:?}");
        assert!(silent.warm_ms > 50.0, "{silent:?}");
    }

    #[test]
    fn a_backend_that_only_sees_cold_prompts_still_shows_its_prefill_rate() {
        let clock = ManualClock::default();
        let (mut fast, mut slow) = (Estimator::default(), Estimator::default());
        for _ in 0..20 {
            fast.observe(stream(55, 63, 0), clock.now(), TAU);
            slow.observe(stream(110, 63, 0), clock.now(), TAU);
            clock.advance(Duration::from_millis(100));
        }
        let (fast, slow) = (fast.published(1.0, 0, 0.25), slow.published(1.0, 0, 0.25));
        assert_eq!((fast.warm_ms, slow.warm_ms), (0.0, 0.0), "warm is unknown");
        assert!((slow.block_ms / fast.block_ms - 2.0).abs() < 1e-9);
    }

    #[test]
    fn an_idle_backend_falls_back_to_the_fleet_average() {
        let clock = ManualClock::default();
        let mut e = Estimator::default();
        for _ in 0..20 {
            e.observe(stream(900, 10, 10), clock.now(), TAU);
            clock.advance(Duration::from_millis(100));
        }
        assert!(e.published(1.0, 0, 0.25).warm_ms > 800.0);
        clock.advance(Duration::from_secs(40));
        e.decay(clock.now(), TAU);
        assert_eq!(
            e.published(1.0, 0, 0.25).warm_ms,
            0.0,
            "40 s without samples: too little weight left to say anything"
        );
    }

    #[test]
    fn spikes_count_as_jitter_not_as_prefill() {
        let clock = ManualClock::default();
        let mut steady = Estimator::default();
        let mut spiky = Estimator::default();
        for i in 0..400 {
            steady.observe(stream(10, 100, 100), clock.now(), TAU);
            let first = if i % 20 == 19 { 1010 } else { 10 };
            spiky.observe(stream(first, 100, 100), clock.now(), TAU);
            clock.advance(Duration::from_millis(50));
        }
        let (steady, spiky) = (
            steady.published(1.0, 0, 0.25),
            spiky.published(1.0, 0, 0.25),
        );
        assert!((spiky.warm_ms - 10.0).abs() < 1e-6, "{spiky:?}");
        assert!(steady.jitter_ms < 1.0, "{steady:?}");
        // One second late one time in twenty: a root mean square of about 1000 / sqrt(20).
        assert!((150.0..300.0).contains(&spiky.jitter_ms), "{spiky:?}");
    }

    /// Within seconds, not a time constant: by then a backend that spikes one time in twenty
    /// has taken its full share and put its spikes at the fleet's 99th percentile.
    #[test]
    fn spikes_are_learned_from_the_first_few_dozen_answers() {
        let learned = one_in_twenty_late(60, Duration::from_millis(50));
        assert!((0.03..0.06).contains(&learned.spikes), "{learned:?}");
        assert!(learned.tail_ms > 100.0, "{learned:?}");
    }

    /// At the few answers a second a spiky backend gets, the prior of zeros once outweighed
    /// half of them for good: it read two thirds of the share, and took half as much traffic
    /// again as its tail budget allows.
    #[test]
    fn a_backend_with_little_traffic_shows_its_whole_share_of_spikes_once_the_prior_fades() {
        let learned = one_in_twenty_late(240, Duration::from_millis(250));
        assert!((0.04..0.06).contains(&learned.spikes), "{learned:?}");
    }

    /// What a fresh estimator publishes after `answers` cached streams `gap` apart, one in each
    /// twenty a second late: the eleventh, so that the reading is not taken just after a late
    /// one, when the faded sums weigh it most (taken so, a prior held at its start read 4.2 %).
    fn one_in_twenty_late(answers: u32, gap: Duration) -> Estimate {
        let clock = ManualClock::default();
        let mut e = Estimator::default();
        for i in 0..answers {
            let first = if i % 20 == 10 { 1010 } else { 10 };
            e.observe(stream(first, 100, 100), clock.now(), TAU);
            clock.advance(gap);
        }
        e.published(1.0, 0, 0.25)
    }

    #[test]
    fn a_loaded_backend_still_shows_its_spikes_but_not_its_queue_as_lateness() {
        let clock = ManualClock::default();
        let mut e = Estimator::default();
        for _ in 0..20 {
            e.observe(stream(10, 100, 100), clock.now(), TAU);
            clock.advance(Duration::from_millis(50));
        }
        // Then at a full batch: most wait about a slot's time (queueing, not lateness), and one
        // in twenty spikes by 1.5 s on top.
        for i in 0..60 {
            let first = if i % 20 == 19 { 1810 } else { 310 };
            let sample = Sample {
                load: 1.0,
                ..stream(first, 100, 100)
            };
            e.observe(sample, clock.now(), TAU);
            clock.advance(Duration::from_millis(50));
        }
        let learned = e.published(1.0, 0, 0.25);
        assert!((0.02..0.06).contains(&learned.spikes), "{learned:?}");
        assert!(learned.jitter_ms < 1.0, "{learned:?}");
        assert!((learned.warm_ms - 10.0).abs() < 1e-6, "{learned:?}");
    }

    #[test]
    fn a_prompt_still_prefilling_elsewhere_is_a_miss_not_a_spike_and_one_spike_fades() {
        let clock = ManualClock::default();
        let mut e = Estimator::default();
        for _ in 0..20 {
            e.observe(stream(5000, 45, 0), clock.now(), TAU);
            clock.advance(Duration::from_millis(500));
            e.observe(stream(300, 45, 44), clock.now(), TAU);
            clock.advance(Duration::from_millis(500));
        }
        // Taken for cached (another request was prefilling it), the answer came after two cold
        // prefills: late against the cold prefill, but no spike.
        e.observe(stream(9800, 45, 44), clock.now(), TAU);
        let after = e.published(1.0, 0, 0.5);
        assert_eq!(after.spikes, 0.0, "{after:?}");
        // A real spike on a backend that then gets nothing: it weighs as one answer among the
        // recent ones and what is left of the prior (about ten after 30 s), and fades.
        clock.advance(Duration::from_secs(10));
        e.observe(stream(20000, 45, 44), clock.now(), TAU);
        let spiked = e.published(1.0, 0, 0.5);
        assert!((0.05..0.15).contains(&spiked.spikes), "{spiked:?}");
        clock.advance(Duration::from_secs(120));
        e.decay(clock.now(), TAU);
        let faded = e.published(1.0, 0, 0.01);
        assert!(faded.spikes < 0.1, "{faded:?}");
        assert!(faded.tail_ms < 2000.0, "{faded:?}");
    }

    #[test]
    fn a_slow_answer_fades_with_time_without_new_samples() {
        let clock = ManualClock::default();
        let mut e = Estimator::default();
        for _ in 0..50 {
            e.observe(stream(200, 10, 10), clock.now(), TAU);
            clock.advance(Duration::from_secs(1));
        }
        e.observe(stream(5000, 10, 10), clock.now(), TAU);
        assert_eq!(e.first_byte_ms(), 5000.0, "the peak is taken at once");
        clock.advance(Duration::from_secs(30));
        e.decay(clock.now(), TAU);
        assert!(
            e.first_byte_ms() < 700.0,
            "30 s later, with no traffic, it is back near its usual 200 ms: {}",
            e.first_byte_ms()
        );
    }

    #[test]
    fn residence_is_the_cache_size_over_the_rate_of_new_blocks() {
        let clock = ManualClock::default();
        let mut e = Estimator::default();
        let churn = |second: u64| Churn {
            misses: second * 500,
            sent: second * 2000,
            recurred: second * 1800,
        };
        e.cache_churn(churn(0), clock.now(), TAU);
        assert_eq!(e.published(1.0, 1000, 0.25).residence_ms, f64::INFINITY);
        for second in 1..=60 {
            clock.advance(Duration::from_secs(1));
            e.cache_churn(churn(second), clock.now(), TAU);
        }
        // 500 new blocks a second through 1,000 places: a block stays about 2 s.
        let published = e.published(1.0, 1000, 0.25);
        assert!(
            (1900.0..2100.0).contains(&published.residence_ms),
            "{published:?}"
        );
        assert!(
            (published.reuse - 0.9).abs() < 1e-9,
            "9 in 10 blocks had been sent before, though a quarter missed"
        );
    }

    #[test]
    fn capacity_is_what_runs_when_others_wait() {
        let mut e = Estimator::default();
        e.reported(3.0, 0.0);
        assert_eq!(
            e.published(1.0, 0, 0.25).capacity,
            DEFAULT_CAPACITY,
            "three running says nothing of a limit"
        );
        e.reported(2.0, 5.0);
        assert_eq!(e.published(1.0, 0, 0.25).capacity, 2);
        e.reported(0.0, 0.0);
        assert_eq!(e.published(1.0, 0, 0.25).capacity, 2);
        e.reported(4.0, 0.0);
        assert_eq!(
            e.published(1.0, 0, 0.25).capacity,
            4,
            "it ran more than thought"
        );
        let mut big = Estimator::default();
        big.reported(100.0, 0.0);
        assert_eq!(
            big.published(1.0, 0, 0.25).capacity,
            127,
            "not known: a quarter more than it ran"
        );
        let mut garbage = Estimator::default();
        garbage.reported(f64::INFINITY, f64::NAN);
        assert!(garbage.published(1.0, 0, 0.25).capacity > MAX_REPORTED_RUNNING);
    }

    #[test]
    fn percentiles_come_from_the_latest_samples() {
        let clock = ManualClock::default();
        let mut e = Estimator::default();
        for i in 1..=100 {
            e.observe(stream(i, 1, 1), clock.now(), TAU);
        }
        // Computed at most P95_EVERY samples ago: from the first 95 to all 100.
        let p95 = e.p95_ms().0;
        assert!((91.0..=95.0).contains(&p95), "{p95}");
        for _ in 0..WINDOW {
            e.observe(stream(7, 1, 1), clock.now(), TAU);
        }
        assert_eq!(e.p95_ms().0, 7.0, "the old samples rolled out");
    }
}
