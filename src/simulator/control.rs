//! Runtime switches and counters of one simulator, shared by its handlers and its owner.
//!
//! Counters are plain atomics because every request touches them; the switches live in a
//! `watch` channel because waiting requests must be *woken* when the server goes down or stops
//! hanging, which an atomic cannot do.

use std::{
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::sync::watch;

/// Point-in-time copy of the counters, served as `GET /sim/stats`.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct SimStats {
    pub running: usize,
    pub waiting: usize,
    pub requests: u64,
    pub completed: u64,
    pub cancelled: u64,
    pub errors: u64,
    /// Prompt tokens of all requests that reached a batch slot (and of embeddings).
    pub prompt_tokens: u64,
    /// Prompt tokens looked up in the prefix cache, and how many of them it already held.
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
}

/// The fault switches, published together so a waiter sees a consistent set.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Switches {
    pub down: bool,
    pub hang: bool,
    pub garbage: bool,
    /// Streams answer their head (200, `text/event-stream`), then send nothing.
    pub stall: bool,
    /// Streams answer their head, then the connection is cut.
    pub reset: bool,
    /// Bumped on every up-to-down transition, so a sequence that started before the outage is
    /// cut even if the server is already back up by the time it looks.
    #[serde(skip)]
    pub down_epoch: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub requests: AtomicU64,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub errors: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// In tokens, like vLLM's `prefix_cache_queries` and `prefix_cache_hits`.
    pub prefix_queries: AtomicU64,
    pub prefix_hits: AtomicU64,
}

/// Runtime switches of a running simulator, shared with its handlers.
pub struct SimControl {
    switches: watch::Sender<Switches>,
    error_rate_bits: AtomicU64,
    pub(crate) counters: Counters,
    born: Instant,
    /// When the server last came up, in milliseconds after `born`: warm-up counts from here.
    up_at_ms: AtomicU64,
}

impl SimControl {
    pub(crate) fn new(error_rate: f64) -> Self {
        let control = Self {
            switches: watch::Sender::new(Switches::default()),
            error_rate_bits: AtomicU64::new(0),
            counters: Counters::default(),
            born: Instant::now(),
            up_at_ms: AtomicU64::new(0),
        };
        control.set_error_rate(error_rate);
        control
    }

    /// Down: every route except `/sim/*` answers 503 and closes the connection, and in-flight
    /// sequences are cut mid-stream, as when a GPU server dies.
    pub fn set_down(&self, down: bool) {
        self.switches.send_if_modified(|s| {
            if s.down == down {
                return false;
            }
            s.down = down;
            if down {
                s.down_epoch += 1;
            } else {
                let now = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
                self.up_at_ms.store(now, Relaxed);
            }
            true
        });
    }

    /// How long the server has been up since it started or last came back.
    pub(crate) fn up_for(&self) -> Duration {
        self.born
            .elapsed()
            .saturating_sub(Duration::from_millis(self.up_at_ms.load(Relaxed)))
    }

    /// Hang: the server freezes, like a process stopped with SIGSTOP: every new request
    /// (including `/health`) gets no answer, and requests in flight produce nothing more, until
    /// switched off.
    pub fn set_hang(&self, hang: bool) {
        self.switches
            .send_if_modified(|s| std::mem::replace(&mut s.hang, hang) != hang);
    }

    /// Garbage: inference routes answer 200 with an HTML body, as a misrouted proxy would.
    pub fn set_garbage(&self, garbage: bool) {
        self.switches
            .send_if_modified(|s| std::mem::replace(&mut s.garbage, garbage) != garbage);
    }

    /// Stall: a streamed request gets its 200 head and then no byte more, like a server whose
    /// engine died after the HTTP layer answered; the request holds no batch slot meanwhile.
    pub fn set_stall(&self, stall: bool) {
        self.switches
            .send_if_modified(|s| std::mem::replace(&mut s.stall, stall) != stall);
    }

    /// Reset: a streamed request gets its 200 head, then its connection is cut.
    pub fn set_reset(&self, reset: bool) {
        self.switches
            .send_if_modified(|s| std::mem::replace(&mut s.reset, reset) != reset);
    }

    /// Clamped to 0..=1 (NaN counts as 0) so a bad value cannot make the draw panic.
    pub fn set_error_rate(&self, rate: f64) {
        let rate = if rate.is_nan() {
            0.0
        } else {
            rate.clamp(0.0, 1.0)
        };
        self.error_rate_bits.store(rate.to_bits(), Relaxed);
    }

    pub fn snapshot(&self) -> SimStats {
        let c = &self.counters;
        SimStats {
            running: c.running.load(Relaxed),
            waiting: c.waiting.load(Relaxed),
            requests: c.requests.load(Relaxed),
            completed: c.completed.load(Relaxed),
            cancelled: c.cancelled.load(Relaxed),
            errors: c.errors.load(Relaxed),
            prompt_tokens: c.prompt_tokens.load(Relaxed),
            prefix_query_tokens: c.prefix_queries.load(Relaxed),
            prefix_hit_tokens: c.prefix_hits.load(Relaxed),
        }
    }

    /// Zeroes the cumulative counters (not the `running`/`waiting` gauges, which requests in
    /// flight still hold up). Requests in flight at the reset are counted when they end.
    pub(crate) fn reset_counters(&self) {
        let c = &self.counters;
        for counter in [
            &c.requests,
            &c.completed,
            &c.cancelled,
            &c.errors,
            &c.prompt_tokens,
            &c.generation_tokens,
            &c.prefix_queries,
            &c.prefix_hits,
        ] {
            counter.store(0, Relaxed);
        }
    }

    pub(crate) fn error_rate(&self) -> f64 {
        f64::from_bits(self.error_rate_bits.load(Relaxed))
    }

    pub(crate) fn switches(&self) -> Switches {
        *self.switches.borrow()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Switches> {
        self.switches.subscribe()
    }
}

/// How a request ended; decides which counter its [`Ticket`] bumps when dropped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Still running: if dropped like this, the client went away.
    Open,
    Completed,
    Failed,
}

/// One accepted request. Counting happens on drop so that every exit path, including the
/// handler future being dropped when the client disconnects, lands in exactly one counter.
pub(crate) struct Ticket {
    control: Arc<SimControl>,
    outcome: Outcome,
}

impl Ticket {
    pub fn new(control: Arc<SimControl>) -> Self {
        control.counters.requests.fetch_add(1, Relaxed);
        Self {
            control,
            outcome: Outcome::Open,
        }
    }

    pub fn complete(&mut self) {
        self.outcome = Outcome::Completed;
    }

    pub fn fail(&mut self) {
        self.outcome = Outcome::Failed;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let c = &self.control.counters;
        let counter = match self.outcome {
            Outcome::Open => &c.cancelled,
            Outcome::Completed => &c.completed,
            Outcome::Failed => &c.errors,
        };
        counter.fetch_add(1, Relaxed);
    }
}

/// Holds a gauge up by one for as long as it lives (`waiting` while queued, `running` while in
/// the batch), so a dropped future can never leave a gauge stuck.
pub(crate) struct GaugeGuard<'a>(&'a AtomicUsize);

impl<'a> GaugeGuard<'a> {
    pub fn raise(gauge: &'a AtomicUsize) -> Self {
        gauge.fetch_add(1, Relaxed);
        Self(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}
