//! The continuous-batching timing model: why a simulated GPU answers when it does.
//!
//! At most `max_batch` sequences hold a batch slot; the rest wait FIFO on a semaphore. A
//! sequence's first token comes a prefill time after it gets its slot, and each later token one
//! decode step after the previous, where the step grows with the number of sequences running at
//! that moment. Sequences are plain futures driven by the response body, so dropping the body
//! (client gone) releases the slot at once, and 10,000 idle streams cost only their timers.

use std::{
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};

use thiserror::Error;
use tokio::{
    sync::{watch, OwnedSemaphorePermit, Semaphore},
    time::{sleep_until, Instant},
};

use super::{
    control::{GaugeGuard, SimControl, Switches, Ticket},
    SimConfig,
};

/// Time from getting a batch slot to the first token: fixed overhead plus prefill of the prompt.
pub fn time_to_first_token(cfg: &SimConfig, prompt_tokens: u32) -> Duration {
    let micros = cfg.ttft_base_ms as f64 * 1000.0
        + f64::from(prompt_tokens) * cfg.prefill_us_per_token as f64;
    Duration::from_secs_f64(micros / 1e6 / cfg.speed)
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

/// Shared by all requests of one simulator: its knobs, its batch slots and its control.
pub struct Engine {
    cfg: SimConfig,
    slots: Arc<Semaphore>,
    control: Arc<SimControl>,
}

impl Engine {
    pub fn new(cfg: SimConfig, control: Arc<SimControl>) -> Self {
        let slots = Arc::new(Semaphore::new(cfg.max_batch));
        Self {
            cfg,
            slots,
            control,
        }
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

/// What a request asks the GPU to do, decided before it queues.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub prompt_tokens: u32,
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
    produced: u32,
    deadline: Instant,
}

impl Sequence {
    pub fn new(engine: Arc<Engine>, plan: Plan, ticket: Ticket, outage: Outage) -> Self {
        Self {
            engine,
            plan,
            ticket,
            outage,
            slot: None,
            produced: 0,
            deadline: Instant::now(),
        }
    }

    /// Waits for the next token. Deadlines accumulate from the previous one (not from "now"), so
    /// timer and scheduling overhead do not stretch a long stream.
    pub async fn next(&mut self) -> Result<Step, Cut> {
        let result = self.advance().await;
        match result {
            Ok(Step::Done) => {
                self.slot = None;
                self.ticket.complete();
            }
            Err(Cut) => {
                self.slot = None;
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
            self.deadline = Instant::now()
                + time_to_first_token(cfg, self.plan.prompt_tokens)
                + self.plan.spike;
        } else if self.produced >= self.plan.completion_tokens {
            return Ok(Step::Done);
        } else {
            let running = counters.running.load(Relaxed);
            self.deadline += decode_step(cfg, running);
        }
        self.outage.guard(sleep_until(self.deadline)).await?;
        counters.generation_tokens.fetch_add(1, Relaxed);
        let token = self.produced;
        self.produced += 1;
        Ok(Step::Token(token))
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
            completion_tokens: 2,
            spike: Duration::ZERO,
        };
        let new_seq = || {
            Sequence::new(
                Arc::clone(&engine),
                plan,
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
