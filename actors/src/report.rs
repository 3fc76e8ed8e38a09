//! How the request path tells the balancer and the metrics actor what happened. Each HTTP thread
//! gathers its outcomes and observations in a [`ThreadReports`] batch and sends them every
//! [`FLUSH_EVERY`] or every [`BATCH`] facts, whichever comes first: one cross-thread message per
//! batch instead of two per request, so a lightly loaded gateway does not wake the control-plane
//! thread for every request. Weights and counters lag by at most one flush interval. The flush
//! timer is armed only while facts are waiting, so an idle gateway does not wake up at all.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::time::Duration;

use actix::Addr;

use crate::balancer::{Balancer, BalancerView, Outcome, Outcomes, Verdict};
use crate::metrics::{MetricsHandle, Observe};

/// Longest a fact waits in a thread's batch.
pub const FLUSH_EVERY: Duration = Duration::from_millis(10);
/// Facts that make a batch go at once.
pub const BATCH: usize = 128;

/// Where facts go; shared by every thread.
#[derive(Clone)]
pub struct Reporters {
    pub balancer: Addr<Balancer>,
    pub view: BalancerView,
    pub metrics: MetricsHandle,
}

/// One thread's pending facts.
pub struct ThreadReports {
    to: Reporters,
    outcomes: RefCell<Vec<Outcome>>,
    observations: RefCell<Vec<Observe>>,
    /// Whether a flush is scheduled.
    armed: Cell<bool>,
    me: Weak<ThreadReports>,
}

impl ThreadReports {
    /// Creates this thread's batch. Must be called on the thread that will use it, inside its
    /// actix runtime (the flush timer is a task on it).
    pub fn start(to: Reporters) -> Rc<Self> {
        Rc::new_cyclic(|me| Self {
            to,
            outcomes: RefCell::new(Vec::with_capacity(BATCH)),
            observations: RefCell::new(Vec::with_capacity(BATCH)),
            armed: Cell::new(false),
            me: me.clone(),
        })
    }

    /// Schedules a flush [`FLUSH_EVERY`] from now, unless one is scheduled already.
    fn arm(&self) {
        if self.armed.replace(true) {
            return;
        }
        let me = self.me.clone();
        actix_rt::spawn(async move {
            actix_rt::time::sleep(FLUSH_EVERY).await;
            if let Some(reports) = me.upgrade() {
                reports.armed.set(false);
                reports.flush();
            }
        });
    }

    pub fn view(&self) -> &BalancerView {
        &self.to.view
    }

    /// Records how a request went. A failure is sent at once, so that consecutive failures
    /// eject an endpoint without waiting for the next flush.
    pub fn outcome(&self, endpoint: usize, verdict: Verdict) {
        let flush = {
            let mut outcomes = self.outcomes.borrow_mut();
            outcomes.push(Outcome { endpoint, verdict });
            !verdict.is_success() || outcomes.len() >= BATCH
        };
        if flush {
            self.flush_outcomes();
        } else {
            self.arm();
        }
    }

    pub fn observe(&self, observation: Observe) {
        let full = {
            let mut observations = self.observations.borrow_mut();
            observations.push(observation);
            observations.len() >= BATCH
        };
        if full {
            self.flush_observations();
        } else {
            self.arm();
        }
    }

    pub fn flush(&self) {
        self.flush_outcomes();
        self.flush_observations();
    }

    fn flush_outcomes(&self) {
        let outcomes = std::mem::take(&mut *self.outcomes.borrow_mut());
        if !outcomes.is_empty() {
            self.to.view.report(&self.to.balancer, Outcomes(outcomes));
        }
    }

    fn flush_observations(&self) {
        let observations = std::mem::take(&mut *self.observations.borrow_mut());
        if !observations.is_empty() {
            self.to.metrics.observe_all(observations);
        }
    }
}
