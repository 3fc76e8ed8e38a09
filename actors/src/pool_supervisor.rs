//! Admission and pool sizing. The [`Admission`] gate is what the request path touches: an atomic
//! fast path when a worker slot is free, else a bounded FIFO queue with a deadline. The
//! [`PoolSupervisor`] actor is its single sizing authority: on its interval it doubles the pool
//! when the peak load factor passed `grow_above` and halves it below `shrink_below`, within
//! `[min_workers, max_workers]`. A request that has to queue also nudges the supervisor, so a
//! burst grows the pool within milliseconds instead of waiting for the next tick.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ForwardError;
use crate::{Fail, GetStats, Stats};

/// Pool and queue limits; defaults documented in `config/default.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    pub min_workers: usize,
    pub max_workers: usize,
    pub resize_interval_ms: u64,
    pub grow_above: f64,
    pub shrink_below: f64,
    /// Requests that may wait for a worker; one more is refused with 503 and `Retry-After`.
    pub queue_limit: usize,
    /// Longest wait in the queue before the request is refused.
    pub queue_timeout_ms: u64,
    /// What `Retry-After` says when refusing.
    pub retry_after_secs: u64,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            min_workers: 10,
            max_workers: 5000,
            resize_interval_ms: 5000,
            grow_above: 0.8,
            shrink_below: 0.3,
            queue_limit: 10_000,
            queue_timeout_ms: 30_000,
            retry_after_secs: 1,
        }
    }
}

impl PoolSettings {
    /// The new pool size for a load factor (busy plus queued over the current size), if any.
    pub fn resize(&self, current: usize, load_factor: f64) -> Option<(usize, &'static str)> {
        if load_factor > self.grow_above && current < self.max_workers {
            Some((
                (current * 2).clamp(self.min_workers, self.max_workers),
                "grow",
            ))
        } else if load_factor < self.shrink_below && current > self.min_workers {
            Some(((current / 2).max(self.min_workers), "shrink"))
        } else {
            None
        }
    }
}

// ===== Admission =====

/// The shared gate in front of the workers. Cloning shares it.
#[derive(Clone)]
pub struct Admission {
    gate: Arc<Gate>,
}

struct Gate {
    slots: Arc<Semaphore>,
    capacity: AtomicUsize,
    /// Slots to retire as busy ones come back, after a shrink below the number in use.
    debt: AtomicUsize,
    busy: AtomicUsize,
    queued: AtomicUsize,
    /// Highest busy + queued since the supervisor last looked.
    peak: AtomicUsize,
    refused: AtomicU64,
    admitted: AtomicU64,
    pressure_sent: AtomicBool,
    supervisor: OnceLock<Addr<PoolSupervisor>>,
    queue_limit: usize,
    queue_timeout: Duration,
    retry_after: Duration,
    pub(crate) workers_alive: AtomicUsize,
}

/// A worker slot; giving it back (dropping it) lets the next queued request in.
pub struct Permit {
    permit: Option<OwnedSemaphorePermit>,
    gate: Arc<Gate>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.busy.fetch_sub(1, Ordering::Relaxed);
        let retire = self
            .gate
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
            .is_ok();
        if let Some(permit) = self.permit.take() {
            if retire {
                permit.forget();
            }
        }
    }
}

/// Leaves the queue count right however the wait ends (admitted, timed out, or client gone).
struct Queued<'a>(&'a Gate);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    pub fn new(settings: &PoolSettings) -> Self {
        let initial = settings.min_workers.max(1);
        Self {
            gate: Arc::new(Gate {
                slots: Arc::new(Semaphore::new(initial)),
                capacity: AtomicUsize::new(initial),
                debt: AtomicUsize::new(0),
                busy: AtomicUsize::new(0),
                queued: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                refused: AtomicU64::new(0),
                admitted: AtomicU64::new(0),
                pressure_sent: AtomicBool::new(false),
                supervisor: OnceLock::new(),
                queue_limit: settings.queue_limit,
                queue_timeout: Duration::from_millis(settings.queue_timeout_ms),
                retry_after: Duration::from_secs(settings.retry_after_secs),
                workers_alive: AtomicUsize::new(0),
            }),
        }
    }

    /// Takes a worker slot, waiting in the bounded queue when all are busy, but not past the
    /// request's deadline.
    pub async fn admit(&self, deadline: Instant) -> Result<Permit, ForwardError> {
        let gate = &self.gate;
        if let Ok(permit) = gate.slots.clone().try_acquire_owned() {
            return Ok(self.admitted(permit));
        }
        let queued = gate.queued.fetch_add(1, Ordering::Relaxed) + 1;
        let guard = Queued(gate);
        if queued > gate.queue_limit {
            gate.refused.fetch_add(1, Ordering::Relaxed);
            return Err(self.overloaded(queued));
        }
        self.note_peak(queued);
        self.signal_pressure();
        let wait = gate
            .queue_timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        let waited = tokio::time::timeout(wait, gate.slots.clone().acquire_owned()).await;
        drop(guard);
        match waited {
            Ok(Ok(permit)) => Ok(self.admitted(permit)),
            _ => {
                gate.refused.fetch_add(1, Ordering::Relaxed);
                Err(self.overloaded(gate.queued.load(Ordering::Relaxed)))
            }
        }
    }

    fn admitted(&self, permit: OwnedSemaphorePermit) -> Permit {
        let gate = &self.gate;
        gate.admitted.fetch_add(1, Ordering::Relaxed);
        let busy = gate.busy.fetch_add(1, Ordering::Relaxed) + 1;
        self.note_peak(busy + gate.queued.load(Ordering::Relaxed));
        if busy as f64 > gate.capacity.load(Ordering::Relaxed) as f64 * 0.8 {
            self.signal_pressure();
        }
        Permit {
            permit: Some(permit),
            gate: gate.clone(),
        }
    }

    fn overloaded(&self, queued: usize) -> ForwardError {
        ForwardError::Overloaded {
            queued,
            retry_after: self.gate.retry_after,
        }
    }

    fn note_peak(&self, load: usize) {
        self.gate.peak.fetch_max(load, Ordering::Relaxed);
    }

    /// At most one nudge is in the supervisor's mailbox at a time.
    fn signal_pressure(&self) {
        if let Some(supervisor) = self.gate.supervisor.get() {
            if !self.gate.pressure_sent.swap(true, Ordering::AcqRel) {
                supervisor.do_send(Pressure);
            }
        }
    }

    pub fn capacity(&self) -> usize {
        self.gate.capacity.load(Ordering::Relaxed)
    }

    pub fn busy(&self) -> usize {
        self.gate.busy.load(Ordering::Relaxed)
    }

    pub fn queued(&self) -> usize {
        self.gate.queued.load(Ordering::Relaxed)
    }

    pub fn refused(&self) -> u64 {
        self.gate.refused.load(Ordering::Relaxed)
    }

    pub fn workers_alive(&self) -> usize {
        self.gate.workers_alive.load(Ordering::Relaxed)
    }

    pub(crate) fn gate_workers(&self) -> &AtomicUsize {
        &self.gate.workers_alive
    }

    /// Sets the number of slots; shrinking below what is busy retires slots as they come back.
    fn set_capacity(&self, new: usize) {
        let gate = &self.gate;
        let old = gate.capacity.swap(new, Ordering::AcqRel);
        if new > old {
            let mut grow = new - old;
            while grow > 0 {
                match gate
                    .debt
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
                {
                    Ok(_) => grow -= 1,
                    Err(_) => break,
                }
            }
            gate.slots.add_permits(grow);
        } else if new < old {
            let shrink = old - new;
            let forgotten = gate.slots.forget_permits(shrink);
            gate.debt.fetch_add(shrink - forgotten, Ordering::AcqRel);
        }
    }

    /// Peak load since the last call, and starts a new window at the current load.
    fn take_peak(&self) -> usize {
        let now = self.busy() + self.queued();
        self.gate.peak.swap(now, Ordering::AcqRel).max(now)
    }
}

// ===== PoolSupervisor =====

/// A request had to queue or the pool is nearly full: check whether to grow now.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
struct Pressure;

#[derive(Debug, Clone, Serialize)]
struct Resize {
    at_unix_ms: u128,
    from: usize,
    to: usize,
    why: String,
}

pub struct PoolSupervisor {
    settings: PoolSettings,
    admission: Admission,
    last_resize: Option<Resize>,
    resizes: u64,
}

impl PoolSupervisor {
    pub fn new(settings: PoolSettings, admission: Admission) -> Self {
        Self {
            settings,
            admission,
            last_resize: None,
            resizes: 0,
        }
    }

    fn consider(&mut self, load: usize, only_grow: bool) {
        let current = self.admission.capacity();
        let load_factor = load as f64 / current.max(1) as f64;
        let Some((to, direction)) = self.settings.resize(current, load_factor) else {
            return;
        };
        if only_grow && to < current {
            return;
        }
        self.admission.set_capacity(to);
        self.resizes += 1;
        let why =
            format!("{direction}: load factor {load_factor:.2} (busy+queued {load} of {current})");
        log::info!("worker pool {current} -> {to}, {why}");
        self.last_resize = Some(Resize {
            at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or_default(),
            from: current,
            to,
            why,
        });
    }
}

impl Actor for PoolSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let _ = self.admission.gate.supervisor.set(ctx.address());
        let interval = Duration::from_millis(self.settings.resize_interval_ms.max(1));
        ctx.run_interval(interval, |this, _ctx| {
            let peak = this.admission.take_peak();
            this.consider(peak, false);
        });
    }
}

impl Supervised for PoolSupervisor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        log::warn!("pool supervisor restarting; pool size and queue are kept");
        self.admission
            .gate
            .pressure_sent
            .store(false, Ordering::Release);
    }
}

impl Handler<Pressure> for PoolSupervisor {
    type Result = ();

    fn handle(&mut self, _msg: Pressure, _ctx: &mut Self::Context) {
        self.admission
            .gate
            .pressure_sent
            .store(false, Ordering::Release);
        let load = self.admission.busy() + self.admission.queued();
        self.consider(load, true);
    }
}

#[derive(Serialize)]
struct PoolStats {
    current: usize,
    workers: usize,
    busy: usize,
    queued: usize,
    min: usize,
    max: usize,
    queue_limit: usize,
    admitted: u64,
    refused: u64,
    resizes: u64,
    last_resize: Option<Resize>,
}

impl Handler<GetStats> for PoolSupervisor {
    type Result = Stats;

    fn handle(&mut self, _msg: GetStats, _ctx: &mut Self::Context) -> Stats {
        let a = &self.admission;
        Stats::of(&PoolStats {
            current: a.capacity(),
            workers: a.workers_alive(),
            busy: a.busy(),
            queued: a.queued(),
            min: self.settings.min_workers,
            max: self.settings.max_workers,
            queue_limit: self.settings.queue_limit,
            admitted: a.gate.admitted.load(Ordering::Relaxed),
            refused: a.refused(),
            resizes: self.resizes,
            last_resize: self.last_resize.clone(),
        })
    }
}

impl Handler<Fail> for PoolSupervisor {
    type Result = ();

    fn handle(&mut self, _msg: Fail, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_doubles_above_and_halves_below() {
        let s = PoolSettings::default();
        assert_eq!(s.resize(10, 0.9), Some((20, "grow")));
        assert_eq!(s.resize(4000, 1.0), Some((5000, "grow")));
        assert_eq!(s.resize(5000, 1.0), None);
        assert_eq!(s.resize(100, 0.1), Some((50, "shrink")));
        assert_eq!(s.resize(15, 0.0), Some((10, "shrink")));
        assert_eq!(s.resize(10, 0.0), None);
        assert_eq!(s.resize(100, 0.5), None);
        assert_eq!(s.resize(100, 0.8), None);
        assert_eq!(s.resize(100, 0.3), None);
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    fn settings(min: usize, queue_limit: usize) -> PoolSettings {
        PoolSettings {
            min_workers: min,
            queue_limit,
            queue_timeout_ms: 50,
            ..PoolSettings::default()
        }
    }

    #[actix_rt::test]
    async fn full_queue_is_refused_with_retry_after() {
        let admission = Admission::new(&settings(1, 1));
        let held = admission.admit(far()).await.unwrap();
        let waiting = {
            let a = admission.clone();
            actix_rt::spawn(async move { a.admit(far()).await.is_ok() })
        };
        tokio::task::yield_now().await;
        match admission.admit(far()).await {
            Err(ForwardError::Overloaded { retry_after, .. }) => {
                assert_eq!(retry_after, Duration::from_secs(1))
            }
            _ => panic!("expected overload"),
        }
        drop(held);
        assert!(
            waiting.await.unwrap(),
            "the queued request gets the freed slot"
        );
        assert_eq!(admission.queued(), 0);
        assert_eq!(admission.busy(), 0);
    }

    #[actix_rt::test]
    async fn queue_wait_times_out() {
        let admission = Admission::new(&settings(1, 10));
        let _held = admission.admit(far()).await.unwrap();
        assert!(admission.admit(far()).await.is_err());
        assert_eq!(admission.queued(), 0);
        assert_eq!(admission.refused(), 1);
    }

    #[actix_rt::test]
    async fn shrinking_below_busy_retires_slots_as_they_return() {
        let admission = Admission::new(&settings(4, 0));
        let permits: Vec<Permit> =
            futures_util::future::join_all((0..4).map(|_| admission.admit(far())))
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect();
        admission.set_capacity(2);
        drop(permits);
        let a = admission.admit(far()).await.unwrap();
        let b = admission.admit(far()).await.unwrap();
        assert!(
            admission.admit(far()).await.is_err(),
            "only two slots remain"
        );
        drop((a, b));
        admission.set_capacity(3);
        let _held: Vec<Permit> =
            futures_util::future::join_all((0..3).map(|_| admission.admit(far())))
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect();
    }

    #[actix_rt::test]
    async fn queued_requests_make_the_supervisor_grow_the_pool_at_once() {
        let settings = PoolSettings {
            resize_interval_ms: 60_000,
            ..settings(2, 100)
        };
        let admission = Admission::new(&settings);
        PoolSupervisor::new(settings, admission.clone()).start();
        tokio::task::yield_now().await;
        let first = admission.admit(far()).await.unwrap();
        let second = admission.admit(far()).await.unwrap();
        let third = tokio::time::timeout(Duration::from_secs(1), admission.admit(far())).await;
        assert!(
            matches!(third, Ok(Ok(_))),
            "the pool grew while the request queued"
        );
        assert_eq!(admission.capacity(), 4);
        drop((first, second));
    }
}
