//! The continuous-batching timing model: why a simulated GPU answers when it does.
//!
//! At most `max_batch` sequences hold a batch slot; the rest wait FIFO on a semaphore. A
//! sequence's prefill starts when it has its slot and the prefills admitted before it are done
//! (they share the GPU, [`PrefillCompute`]); its first token comes a fixed overhead after its
//! prefill ends, and each later token one
//! decode step after the previous, where the step grows with the number of sequences running at
//! that moment. Prefill is charged only for the prompt tokens the prefix cache does not already
//! hold; the cache is consulted (and filled) when the sequence gets its slot, as vLLM's scheduler
//! does. Sequences are plain futures driven by the response body, so dropping the body
//! (client gone) releases the slot at once, and 10,000 idle streams cost only their timers.

use std::{
    sync::{atomic::Ordering::Relaxed, Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use thiserror::Error;
use tokio::{
    sync::{watch, OwnedSemaphorePermit, Semaphore},
    time::{sleep_until, Instant},
};

use super::{
    control::{GaugeGuard, SimControl, Switches, Ticket},
    prefix::{self, PrefixCache, BLOCK_TOKENS},
    request_log::{Record, RequestLog},
    SimConfig,
};

/// Time from getting a batch slot to the first token on an otherwise idle GPU: fixed overhead
/// plus prefill of the prompt.
pub fn time_to_first_token(cfg: &SimConfig, prompt_tokens: u32) -> Duration {
    first_token_overhead(cfg) + prefill_compute(cfg, prompt_tokens)
}

/// What each request adds before its first token on its own (scheduling, sampling): not shared.
fn first_token_overhead(cfg: &SimConfig) -> Duration {
    Duration::from_secs_f64(cfg.ttft_base_ms as f64 / 1e3 / cfg.speed)
}

/// GPU time to prefill `prompt_tokens`, which all prefills of one server share (see
/// [`PrefillCompute`]).
fn prefill_compute(cfg: &SimConfig, prompt_tokens: u32) -> Duration {
    let micros = f64::from(prompt_tokens) * cfg.prefill_us_per_token as f64;
    Duration::from_secs_f64(micros / 1e6 / cfg.speed)
}

/// The GPU's prefill compute, shared first come first served. vLLM's scheduler fills each step's
/// token budget with the prompt chunks of the requests it already runs, in arrival order, before
/// it admits a new one (SGLang's chunked prefill and llama.cpp's batch, filled slot by slot, do
/// the same), so a prompt's prefill starts once the prompt tokens admitted before it are
/// computed: two cold prompts take twice as long as one however many batch slots are free, and a
/// cached prompt's first token waits for the prefills ahead of it. Decode steps are not slowed
/// by the prefills here (in vLLM a step that carries a prompt chunk takes as long as the chunk).
struct PrefillCompute {
    free_at: Mutex<Instant>,
}

/// A prefill's share of [`PrefillCompute`]: from `start`, for `compute`.
#[derive(Clone, Copy)]
struct Booking {
    start: Instant,
    compute: Duration,
}

impl Booking {
    fn end(self) -> Instant {
        self.start + self.compute
    }
}

impl PrefillCompute {
    fn new() -> Self {
        Self {
            free_at: Mutex::new(Instant::now()),
        }
    }

    /// Books `compute` for a prompt whose cached blocks are all computed at `ready`.
    fn book(&self, ready: Instant, compute: Duration) -> Booking {
        let mut free_at = self.free_at.lock().unwrap_or_else(PoisonError::into_inner);
        let start = ready.max(*free_at);
        *free_at = start + compute;
        Booking { start, compute }
    }

    /// Gives back what a prefill cut short (client gone, hedge lost, server down) did not
    /// compute, as vLLM frees an aborted request's share of the next steps. The prefills booked
    /// after it keep their times; the next ones start sooner.
    fn cancel(&self, booking: Booking) {
        let now = Instant::now();
        let left = booking
            .end()
            .saturating_duration_since(now.max(booking.start));
        if left.is_zero() {
            return;
        }
        let mut free_at = self.free_at.lock().unwrap_or_else(PoisonError::into_inner);
        *free_at = free_at.checked_sub(left).map_or(now, |at| at.max(now));
    }
}

/// Time of one decode step while `running` sequences share the batch (at least one: the caller).
pub fn decode_step(cfg: &SimConfig, running: usize) -> Duration {
    let extra = running.saturating_sub(1) as f64;
    let millis = cfg.decode_step_ms as f64 * (1.0 + cfg.batch_slowdown * extra);
    Duration::from_secs_f64(millis / 1e3 / cfg.speed)
}

/// The simulated server went down while this sequence was in flight.
#[derive(Debug, Error)]
#[error("simulated GPU server went down")]
pub struct Cut;

/// What a request found in the prefix cache and took.
struct Acquired {
    /// Prompt tokens served from the cache.
    cached: u32,
    blocks: prefix::Acquired,
    /// When the found blocks are all computed, if another request's prefill still computes some.
    computed_at: Option<Instant>,
}

/// Shared by all requests of one simulator: its knobs, its batch slots, its prefix cache and its
/// control.
pub struct Engine {
    cfg: SimConfig,
    slots: Arc<Semaphore>,
    /// A plain mutex: the simulator serves on one thread and holds it for one lookup.
    prefix: Mutex<PrefixCache>,
    prefill: PrefillCompute,
    control: Arc<SimControl>,
    request_log: Option<RequestLog>,
}

impl Engine {
    pub fn new(cfg: SimConfig, control: Arc<SimControl>) -> Self {
        let slots = Arc::new(Semaphore::new(cfg.max_batch));
        let prefix = Mutex::new(PrefixCache::new(cfg.prefix_cache_blocks));
        Self {
            cfg,
            slots,
            prefix,
            prefill: PrefillCompute::new(),
            control,
            request_log: None,
        }
    }

    pub fn with_request_log(mut self, log: Option<RequestLog>) -> Self {
        self.request_log = log;
        self
    }

    /// Empties the prefix cache and zeroes the counters, so a benchmark run starts cold without
    /// restarting the process.
    pub fn flush(&self) {
        self.prefix_cache().clear();
        self.control.reset_counters();
        if let Some(log) = &self.request_log {
            log.restart();
        }
    }

    /// Prompt tokens already cached for a prompt with these blocks, which stay pinned in the cache
    /// until [`Engine::release`] (`held` of them), and when they are all computed if another
    /// request's prefill still computes some. Like vLLM, a fully cached prompt still computes its
    /// last token, and queries and hits are counted in tokens.
    fn acquire_prefix(&self, blocks: &[u64], prompt_tokens: u32) -> Acquired {
        let mut cache = self.prefix_cache();
        let got = cache.acquire(blocks);
        let computed_at = cache
            .computed_at(&blocks[..got.hits])
            .map(Instant::from_std);
        drop(cache);
        let cached = u32::try_from(got.hits)
            .unwrap_or(u32::MAX)
            .saturating_mul(BLOCK_TOKENS)
            .min(prompt_tokens.saturating_sub(1));
        let counters = &self.control.counters;
        counters
            .prefix_queries
            .fetch_add(u64::from(prompt_tokens), Relaxed);
        counters.prefix_hits.fetch_add(u64::from(cached), Relaxed);
        Acquired {
            cached,
            blocks: got,
            computed_at,
        }
    }

    fn release_prefix(&self, held: &[u64]) {
        if !held.is_empty() {
            self.prefix_cache().release(held);
        }
    }

    /// How much slower than its speed the GPU runs now: `warmup_factor` for the first
    /// `warmup_ms` after start or after coming back up (cold CUDA graphs and allocator), else 1.
    fn slowdown(&self) -> f64 {
        if self.control.up_for() < Duration::from_millis(self.cfg.warmup_ms) {
            self.cfg.warmup_factor
        } else {
            1.0
        }
    }

    /// A panic while holding the lock cannot leave the LRU inconsistent in a way that matters
    /// for a simulation, so a poisoned lock is used as is.
    fn prefix_cache(&self) -> std::sync::MutexGuard<'_, PrefixCache> {
        self.prefix.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn cfg(&self) -> &SimConfig {
        &self.cfg
    }

    pub fn control(&self) -> &Arc<SimControl> {
        &self.control
    }

    /// Watches for an outage that starts after this call.
    pub fn outage(&self) -> Outage {
        let switches = self.control.subscribe();
        let epoch = switches.borrow().down_epoch;
        Outage { switches, epoch }
    }

    /// Waits FIFO for a batch slot, counted in `waiting` meanwhile.
    async fn admit(&self) -> Result<Slot, Cut> {
        let _waiting = GaugeGuard::raise(&self.control.counters.waiting);
        let permit = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map_err(|_| Cut)?;
        Ok(Slot::new(permit, Arc::clone(&self.control)))
    }
}

/// A batch slot; `running` counts the live ones.
struct Slot {
    control: Arc<SimControl>,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, control: Arc<SimControl>) -> Self {
        control.counters.running.fetch_add(1, Relaxed);
        Self {
            control,
            _permit: permit,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.control.counters.running.fetch_sub(1, Relaxed);
    }
}

/// Resolves when the server goes down after this was created.
pub struct Outage {
    switches: watch::Receiver<Switches>,
    epoch: u64,
}

impl Outage {
    /// Runs `work` unless the server goes down first.
    pub async fn guard<F: std::future::Future>(&mut self, work: F) -> Result<F::Output, Cut> {
        let epoch = self.epoch;
        tokio::select! {
            biased;
            down = self.switches.wait_for(|s| s.down_epoch != epoch) => {
                // A closed channel means the simulator itself is gone: nothing will cut us then.
                if down.is_err() {
                    std::future::pending::<()>().await;
                }
                Err(Cut)
            }
            out = work => Ok(out),
        }
    }
}

impl Outage {
    /// Waits while the server is hung (frozen: nothing in flight moves either, like a process
    /// stopped with SIGSTOP); `Err` if it goes down meanwhile.
    pub async fn thaw(&mut self) -> Result<(), Cut> {
        if !self.switches.borrow().hang {
            return Ok(());
        }
        let epoch = self.epoch;
        let cut = match self
            .switches
            .wait_for(|s| !s.hang || s.down_epoch != epoch)
            .await
        {
            Ok(s) => s.down_epoch != epoch,
            // The simulator is being dropped: nothing will thaw it.
            Err(_) => {
                std::future::pending::<()>().await;
                true
            }
        };
        if cut {
            Err(Cut)
        } else {
            Ok(())
        }
    }
}

/// What a request asks the GPU to do, decided before it queues.
#[derive(Debug, Clone)]
pub struct Plan {
    pub prompt_tokens: u32,
    /// The prompt's prefix-cache block keys (see [`super::prefix`]).
    pub prefix_blocks: Vec<u64>,
    pub completion_tokens: u32,
    /// Extra delay before the first token (a drawn latency spike), zero for most requests.
    pub spike: Duration,
}

/// What [`Sequence::next`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Token number `n` (from 0) is ready.
    Token(u32),
    /// All tokens were produced; the slot is released.
    Done,
}

/// One request moving through queue, prefill and decode.
pub struct Sequence {
    engine: Arc<Engine>,
    plan: Plan,
    ticket: Ticket,
    outage: Outage,
    slot: Option<Slot>,
    /// How many leading prefix blocks the slot pins in the cache.
    held: usize,
    /// Prompt tokens the prefix cache served, once the prefill began.
    cached: u32,
    /// Its prefill's share of the GPU, until its first token.
    prefill: Option<Booking>,
    produced: u32,
    deadline: Instant,
    /// When it arrived (for the request log), and how long it waited for a slot, ms.
    arrived: Instant,
    wait_ms: f64,
}

impl Sequence {
    pub fn new(engine: Arc<Engine>, plan: Plan, ticket: Ticket, outage: Outage) -> Self {
        Self {
            engine,
            plan,
            ticket,
            outage,
            slot: None,
            held: 0,
            cached: 0,
            prefill: None,
            produced: 0,
            deadline: Instant::now(),
            arrived: Instant::now(),
            wait_ms: 0.0,
        }
    }

    /// Gives back the batch slot and the cache blocks it pinned.
    fn free_slot(&mut self) {
        if let Some(booking) = self.prefill.take() {
            self.engine.prefill.cancel(booking);
        }
        self.slot = None;
        let held = std::mem::take(&mut self.held);
        self.engine.release_prefix(&self.plan.prefix_blocks[..held]);
    }

    /// Waits for the next token. Deadlines accumulate from the previous one (not from "now"), so
    /// timer and scheduling overhead do not stretch a long stream.
    /// Prompt tokens the prefix cache served (what vLLM reports as
    /// `usage.prompt_tokens_details.cached_tokens`).
    pub fn cached_tokens(&self) -> u32 {
        self.cached
    }

    pub async fn next(&mut self) -> Result<Step, Cut> {
        let result = self.advance().await;
        match result {
            Ok(Step::Done) => {
                self.free_slot();
                self.ticket.complete();
            }
            Err(Cut) => {
                self.free_slot();
                self.ticket.fail();
            }
            Ok(Step::Token(_)) => {}
        }
        result
    }

    async fn advance(&mut self) -> Result<Step, Cut> {
        let cfg = &self.engine.cfg;
        let counters = &self.engine.control.counters;
        if self.slot.is_none() {
            if self.produced > 0 {
                return Ok(Step::Done);
            }
            let slot = self.outage.guard(self.engine.admit()).await??;
            self.slot = Some(slot);
            counters
                .prompt_tokens
                .fetch_add(u64::from(self.plan.prompt_tokens), Relaxed);
            let got = self
                .engine
                .acquire_prefix(&self.plan.prefix_blocks, self.plan.prompt_tokens);
            self.held = got.blocks.held;
            self.cached = got.cached;
            let slowdown = self.engine.slowdown();
            let compute =
                prefill_compute(cfg, self.plan.prompt_tokens - got.cached).mul_f64(slowdown);
            // Cached blocks another prefill still computes are there once its step ends.
            let now = Instant::now();
            self.wait_ms = ms(now - self.arrived);
            let ready = got.computed_at.map_or(now, |at| at.max(now));
            let booking = self.engine.prefill.book(ready, compute);
            self.prefill = Some(booking);
            self.engine.prefix_cache().computing(
                &self.plan.prefix_blocks[got.blocks.hits..got.blocks.held],
                booking.end().into_std(),
            );
            self.deadline =
                booking.end() + first_token_overhead(cfg).mul_f64(slowdown) + self.plan.spike;
        } else if self.produced >= self.plan.completion_tokens {
            return Ok(Step::Done);
        } else {
            let running = counters.running.load(Relaxed);
            self.deadline += decode_step(cfg, running).mul_f64(self.engine.slowdown());
        }
        self.outage.guard(sleep_until(self.deadline)).await?;
        self.outage.thaw().await?;
        counters.generation_tokens.fetch_add(1, Relaxed);
        let token = self.produced;
        if token == 0 {
            self.prefill = None;
            self.log_first_token();
        }
        self.produced += 1;
        Ok(Step::Token(token))
    }

    fn log_first_token(&self) {
        let Some(log) = &self.engine.request_log else {
            return;
        };
        let ttft = Instant::now() - self.arrived;
        log.record(&Record {
            at_ms: SystemTime::now()
                .checked_sub(ttft)
                .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            wait_ms: self.wait_ms,
            ttft_ms: ms(ttft),
            prompt_tokens: self.plan.prompt_tokens,
            cached_tokens: self.cached,
            spike_ms: ms(self.plan.spike),
            prompt: self.plan.prefix_blocks.first().map(|k| format!("{k:016x}")),
        });
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Drop for Sequence {
    /// A client that leaves mid-request frees its blocks like one that finished.
    fn drop(&mut self) {
        self.free_slot();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SimConfig {
        SimConfig::default()
    }

    #[test]
    fn ttft_is_base_plus_prefill() {
        // 5 ms + 1000 tokens * 50 us = 55 ms.
        assert_eq!(time_to_first_token(&cfg(), 1000), Duration::from_millis(55));
        assert_eq!(time_to_first_token(&cfg(), 0), Duration::from_millis(5));
    }

    #[test]
    fn ttft_scales_with_speed() {
        let fast = SimConfig {
            speed: 2.0,
            ..cfg()
        };
        assert_eq!(
            time_to_first_token(&fast, 1000),
            Duration::from_micros(27_500)
        );
    }

    #[test]
    fn decode_step_grows_with_batch() {
        assert_eq!(decode_step(&cfg(), 1), Duration::from_millis(10));
        // Zero running (a race with a finishing sequence) is treated as a batch of one.
        assert_eq!(decode_step(&cfg(), 0), Duration::from_millis(10));
        // 10 ms * (1 + 0.02 * 31) = 16.2 ms.
        assert_eq!(decode_step(&cfg(), 32), Duration::from_micros(16_200));
    }

    #[test]
    fn decode_step_scales_with_speed() {
        let fast = SimConfig {
            speed: 4.0,
            ..cfg()
        };
        assert_eq!(decode_step(&fast, 1), Duration::from_micros(2_500));
    }

    #[test]
    fn prefills_share_the_gpu_first_come_first_served() {
        let gpu = PrefillCompute::new();
        let t0 = Instant::now() + Duration::from_secs(10);
        let ms = Duration::from_millis;
        let first = gpu.book(t0, ms(100));
        let second = gpu.book(t0, ms(100));
        assert_eq!((first.start, second.start), (t0, t0 + ms(100)));
        // A prompt whose cached blocks are ready only later starts then, not before.
        let later = gpu.book(t0 + ms(500), ms(10));
        assert_eq!(later.start, t0 + ms(500));
        assert_eq!(gpu.book(t0, ms(1)).start, t0 + ms(510));
    }

    #[test]
    fn a_prefill_cut_short_gives_back_what_it_did_not_compute() {
        let gpu = PrefillCompute::new();
        let t0 = Instant::now() + Duration::from_secs(10);
        let ms = Duration::from_millis;
        gpu.book(t0, ms(100));
        let cancelled = gpu.book(t0, ms(300));
        gpu.cancel(cancelled);
        assert_eq!(gpu.book(t0, ms(50)).start, t0 + ms(100));
        // Nothing is given back twice over: the GPU is never free before now.
        let now = Instant::now();
        let gpu = PrefillCompute::new();
        gpu.cancel(Booking {
            start: now + ms(1),
            compute: ms(1000),
        });
        assert!(gpu.book(now, ms(1)).start >= now);
    }

    /// The cached tokens of a request that runs and finishes at once.
    fn cached_tokens(engine: &Engine, blocks: &[u64], tokens: u32) -> u32 {
        let Acquired {
            cached,
            blocks: prefix::Acquired { held, .. },
            ..
        } = engine.acquire_prefix(blocks, tokens);
        engine.release_prefix(&blocks[..held]);
        cached
    }

    /// Keys of an 8,000-character system prompt (2,000 tokens) followed by `question`.
    fn prompt(question: &str) -> (u32, Vec<u64>) {
        let mut blocks = super::super::prefix::BlockHasher::default();
        let system: String = (0..8000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        blocks.feed(&system);
        blocks.feed(question);
        (((8000 + question.len()) / 4) as u32, blocks.finish())
    }

    #[test]
    fn a_shared_system_prompt_is_prefilled_once() {
        let control = Arc::new(SimControl::new(0.0));
        let engine = Engine::new(cfg(), Arc::clone(&control));
        let (tokens, blocks) = prompt("question 1: why?");
        assert_eq!((tokens, blocks.len()), (2004, 125));
        assert_eq!(cached_tokens(&engine, &blocks, tokens), 0);
        let (tokens, blocks) = prompt("question 2: and why not?");
        let cached = cached_tokens(&engine, &blocks, tokens);
        assert_eq!(cached, 2000);
        // Cold: 5 ms + 2,006 tokens * 50 us, about 105 ms; warm: 5 ms + 6 tokens.
        assert_eq!(
            time_to_first_token(&cfg(), tokens - cached),
            Duration::from_micros(5_300)
        );
        let stats = control.snapshot();
        assert_eq!(
            (stats.prefix_query_tokens, stats.prefix_hit_tokens),
            (2004 + 2006, 2000)
        );
        engine.flush();
        let stats = control.snapshot();
        assert_eq!((stats.prefix_query_tokens, stats.prefix_hit_tokens), (0, 0));
        assert_eq!(cached_tokens(&engine, &blocks, tokens), 0);
    }

    #[test]
    fn prefix_cache_off_hits_nothing_and_a_full_hit_leaves_one_token() {
        let control = Arc::new(SimControl::new(0.0));
        let off = Engine::new(
            SimConfig {
                prefix_cache_blocks: 0,
                ..cfg()
            },
            Arc::clone(&control),
        );
        let (tokens, blocks) = prompt("");
        cached_tokens(&off, &blocks, tokens);
        assert_eq!(cached_tokens(&off, &blocks, tokens), 0);
        let on = Engine::new(cfg(), control);
        cached_tokens(&on, &blocks, tokens);
        assert_eq!(cached_tokens(&on, &blocks, tokens), tokens - 1);
    }

    #[actix_rt::test]
    async fn warm_sequences_reach_the_first_token_sooner() {
        let control = Arc::new(SimControl::new(0.0));
        let engine = Arc::new(Engine::new(cfg(), Arc::clone(&control)));
        let (tokens, blocks) = prompt("q");
        let first_token = || {
            let plan = Plan {
                prompt_tokens: tokens,
                prefix_blocks: blocks.clone(),
                completion_tokens: 1,
                spike: Duration::ZERO,
            };
            let ticket = Ticket::new(Arc::clone(&control));
            let mut seq = Sequence::new(Arc::clone(&engine), plan, ticket, engine.outage());
            async move {
                let start = Instant::now();
                assert_eq!(seq.next().await.ok(), Some(Step::Token(0)));
                start.elapsed()
            }
        };
        let cold = first_token().await;
        let warm = first_token().await;
        // The cold wait is at least its 105 ms of timer; the warm one is 5 ms plus scheduling.
        assert!(cold >= Duration::from_millis(105), "{cold:?}");
        assert!(warm < Duration::from_millis(60), "{warm:?}");
    }

    #[actix_rt::test]
    async fn queue_is_fifo_and_counted() {
        let control = Arc::new(SimControl::new(0.0));
        let fast = SimConfig {
            max_batch: 1,
            speed: 100.0,
            ..cfg()
        };
        let engine = Arc::new(Engine::new(fast, Arc::clone(&control)));
        let plan = Plan {
            prompt_tokens: 1,
            prefix_blocks: Vec::new(),
            completion_tokens: 2,
            spike: Duration::ZERO,
        };
        let new_seq = || {
            Sequence::new(
                Arc::clone(&engine),
                plan.clone(),
                Ticket::new(Arc::clone(&control)),
                engine.outage(),
            )
        };
        let mut first = new_seq();
        let mut second = new_seq();
        assert_eq!(first.next().await.ok(), Some(Step::Token(0)));
        assert_eq!(control.snapshot().running, 1);
        {
            // The second sequence cannot get the only slot; dropping it while queued leaves no
            // trace in the gauges.
            let queued = second.next();
            let waited = tokio::time::timeout(Duration::from_millis(20), queued).await;
            assert!(waited.is_err());
        }
        assert_eq!(control.snapshot().waiting, 0);
        assert_eq!(first.next().await.ok(), Some(Step::Token(1)));
        assert_eq!(first.next().await.ok(), Some(Step::Done));
        assert_eq!(control.snapshot().running, 0);
        drop(first);
        drop(second);
        let stats = control.snapshot();
        assert_eq!(
            (stats.requests, stats.completed, stats.cancelled),
            (2, 1, 1)
        );
    }
}
