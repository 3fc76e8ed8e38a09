//! The usage log actor: one record per request, written to the database in batches through the
//! store's deadpool pool. The request path never waits for it: records reach it in the metrics
//! actor's batches, wait in a bounded buffer, and go out every `flush_interval_ms` or as soon as
//! `batch_records` are waiting, one write at a time. While the database is down or slow the
//! buffer fills; when it is full, new records are dropped and counted (in `/stats`, `/metrics`
//! and the log), and the writes are retried with a growing pause until the database answers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde::{Deserialize, Serialize};

use crate::clock::unix_ms;
use crate::store::{Store, StoreError, PRUNE_ROWS};
use crate::usage::UsageRecord;
use crate::{Fail, GetStats, Stats};

/// `[usage]` settings of the log itself (the database and its pool are `store::DatabaseSettings`).
#[derive(Debug, Clone, Deserialize)]
pub struct UsageLogSettings {
    /// Records written in one statement.
    pub batch_records: usize,
    /// Longest a record waits before its batch is written.
    pub flush_interval_ms: u64,
    /// Records held while the database is down or slow; beyond it new ones are dropped.
    pub buffer_records: usize,
    /// First pause after a failed write; it doubles up to 30 s.
    pub retry_interval_ms: u64,
    /// Records older than this many days are deleted, at start and every hour; 0 keeps them all.
    pub retention_days: u64,
}

/// Counters the metrics actor exposes, shared so `/metrics` needs no message to the log.
#[derive(Debug, Default)]
pub struct UsageLogCounters {
    pub buffered: AtomicU64,
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    pub failed_writes: AtomicU64,
    /// Records deleted for being older than the retention.
    pub pruned: AtomicU64,
}

/// A batch of records from the metrics actor.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Records(pub Vec<UsageRecord>);

/// Writes what is buffered now (tests, and shutdown); answers how many records are still waiting.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Flush;

const MAX_RETRY: Duration = Duration::from_secs(30);
/// How often records past the retention are looked for.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// The pause between two slices of a prune: SQLite's waiting writers only retry on a timer, and
/// slices back to back kept the write lock from the batches of new records.
const PRUNE_PAUSE: Duration = Duration::from_millis(250);
const DAY_MS: i64 = 86_400_000;
/// Longest a write may take before the database counts as down (a connection that hangs
/// without closing would otherwise hold the log for good).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a batch was not written.
enum Failed {
    /// The database is down, slow or unreachable: the batch goes back to the front.
    Retry(String, Arc<Vec<UsageRecord>>),
    /// The database refused the records (a value it cannot store): dropped and counted.
    Rejected(String, usize),
}

pub struct UsageLog {
    store: Store,
    settings: UsageLogSettings,
    counters: Arc<UsageLogCounters>,
    buffer: VecDeque<UsageRecord>,
    /// Whether a write is on its way (one at a time, so records stay in order).
    writing: bool,
    /// Whether the schema is known to be in place (the database may have been down at start).
    migrated: bool,
    /// The pause after the last failed write; zero while the database answers.
    backoff: Duration,
    /// Waiting out `backoff` before the next attempt.
    paused: bool,
    /// Whether a prune is on its way (one at a time, each a slice: [`Store::prune_usage`]).
    pruning: bool,
    peak_buffered: usize,
    batches: u64,
    last_error: Option<String>,
}

impl UsageLog {
    pub fn new(
        store: Store,
        settings: UsageLogSettings,
        migrated: bool,
        counters: Arc<UsageLogCounters>,
    ) -> Self {
        Self {
            store,
            settings,
            counters,
            buffer: VecDeque::new(),
            writing: false,
            migrated,
            backoff: Duration::ZERO,
            paused: false,
            pruning: false,
            peak_buffered: 0,
            batches: 0,
            last_error: None,
        }
    }

    fn publish_buffered(&mut self) {
        self.peak_buffered = self.peak_buffered.max(self.buffer.len());
        self.counters
            .buffered
            .store(self.buffer.len() as u64, Ordering::Relaxed);
    }

    /// Starts a write of the oldest batch unless one is on its way or the log is backing off.
    fn write(&mut self, ctx: &mut Context<Self>) {
        if self.writing || self.paused || self.buffer.is_empty() {
            return;
        }
        self.writing = true;
        let batch: Arc<Vec<UsageRecord>> = Arc::new(
            self.buffer
                .drain(..self.buffer.len().min(self.settings.batch_records.max(1)))
                .collect(),
        );
        let (store, migrate) = (self.store.clone(), !self.migrated);
        async move {
            let written = async {
                if migrate {
                    store.migrate().await?;
                }
                store.insert_usage(&batch).await
            };
            match tokio::time::timeout(WRITE_TIMEOUT, written).await {
                Ok(Ok(())) => Ok(batch.len()),
                // The database refused these records themselves: trying them again would stop
                // every record behind them.
                Ok(Err(StoreError::Query(e))) => Err(Failed::Rejected(e, batch.len())),
                Ok(Err(e)) => Err(Failed::Retry(e.to_string(), batch)),
                Err(_) => Err(Failed::Retry(
                    format!("no answer in {WRITE_TIMEOUT:?}"),
                    batch,
                )),
            }
        }
        .into_actor(self)
        .map(|written, this, ctx| this.written(written, ctx))
        .spawn(ctx);
    }

    fn written(&mut self, written: Result<usize, Failed>, ctx: &mut Context<Self>) {
        self.writing = false;
        match written {
            Ok(count) => {
                if !self.backoff.is_zero() || !self.migrated {
                    log::info!(
                        "usage log: the {} database answers again",
                        self.store.kind()
                    );
                }
                if !self.migrated {
                    // Down at start: its prune waited for the schema.
                    self.migrated = true;
                    self.prune(ctx);
                }
                self.backoff = Duration::ZERO;
                self.batches += 1;
                self.counters
                    .written
                    .fetch_add(count as u64, Ordering::Relaxed);
                if self.buffer.len() >= self.settings.batch_records {
                    self.write(ctx);
                }
            }
            Err(Failed::Rejected(error, count)) => {
                self.counters.failed_writes.fetch_add(1, Ordering::Relaxed);
                log::error!(
                    "usage log: the {} database refused a batch of {count} records ({error}); \
                     they are dropped",
                    self.store.kind()
                );
                self.last_error = Some(error);
                self.dropped(count as u64);
                self.write(ctx);
            }
            Err(Failed::Retry(error, batch)) => {
                // Still shared only when a write that timed out holds it on its thread.
                let batch = Arc::try_unwrap(batch).unwrap_or_else(|shared| (*shared).clone());
                self.counters.failed_writes.fetch_add(1, Ordering::Relaxed);
                self.backoff = if self.backoff.is_zero() {
                    Duration::from_millis(self.settings.retry_interval_ms.max(1))
                } else {
                    (self.backoff * 2).min(MAX_RETRY)
                };
                log::error!(
                    "usage log: writing {} records to the {} database failed ({error}); {} \
                     records buffered, retrying in {:?}",
                    batch.len(),
                    self.store.kind(),
                    self.buffer.len() + batch.len(),
                    self.backoff
                );
                self.last_error = Some(error);
                // Back to the front, in order; what no longer fits is dropped, newest first.
                for record in batch.into_iter().rev() {
                    self.buffer.push_front(record);
                }
                let excess = self
                    .buffer
                    .len()
                    .saturating_sub(self.settings.buffer_records);
                if excess > 0 {
                    self.buffer.truncate(self.settings.buffer_records);
                    self.dropped(excess as u64);
                }
                self.paused = true;
                ctx.run_later(self.backoff, |this, ctx| {
                    this.paused = false;
                    this.write(ctx);
                });
            }
        }
        self.publish_buffered();
    }

    /// Deletes records past the retention, a slice at a time, the next slice [`PRUNE_PAUSE`]
    /// after one comes back full. A database that is down is left for the next hour.
    fn prune(&mut self, ctx: &mut Context<Self>) {
        if self.settings.retention_days == 0 || self.pruning || !self.migrated {
            return;
        }
        self.pruning = true;
        let days = i64::try_from(self.settings.retention_days).unwrap_or(i64::MAX);
        let before_ms = unix_ms().saturating_sub(days.saturating_mul(DAY_MS));
        let store = self.store.clone();
        async move { tokio::time::timeout(WRITE_TIMEOUT, store.prune_usage(before_ms)).await }
            .into_actor(self)
            .map(|pruned, this, ctx| {
                this.pruning = false;
                match pruned {
                    Ok(Ok(count)) => {
                        this.counters.pruned.fetch_add(count, Ordering::Relaxed);
                        if count >= PRUNE_ROWS {
                            ctx.run_later(PRUNE_PAUSE, |this, ctx| this.prune(ctx));
                        }
                    }
                    Ok(Err(e)) => log::warn!("usage log: pruning old records failed ({e})"),
                    Err(_) => {
                        log::warn!("usage log: pruning old records took over {WRITE_TIMEOUT:?}")
                    }
                }
            })
            .spawn(ctx);
    }

    fn dropped(&mut self, count: u64) {
        let before = self.counters.dropped.fetch_add(count, Ordering::Relaxed);
        // One line per thousand dropped: enough to see it, not a flood while the database is down.
        if before / 1000 != (before + count) / 1000 || before == 0 {
            log::error!(
                "usage log: buffer full ({} records); {} records dropped so far",
                self.settings.buffer_records,
                before + count
            );
        }
    }
}

impl Actor for UsageLog {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1024);
        let every = Duration::from_millis(self.settings.flush_interval_ms.max(1));
        ctx.run_interval(every, |this, ctx| this.write(ctx));
        ctx.run_interval(Duration::from_secs(30), |this, _| {
            this.store.retire_idle();
        });
        self.prune(ctx);
        ctx.run_interval(PRUNE_EVERY, |this, ctx| this.prune(ctx));
    }
}

impl Supervised for UsageLog {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.writing = false;
        self.paused = false;
        self.pruning = false;
    }
}

impl Handler<Records> for UsageLog {
    type Result = ();

    fn handle(&mut self, records: Records, ctx: &mut Self::Context) {
        let room = self
            .settings
            .buffer_records
            .saturating_sub(self.buffer.len());
        let count = records.0.len();
        self.buffer.extend(records.0.into_iter().take(room));
        if count > room {
            self.dropped((count - room) as u64);
        }
        self.publish_buffered();
        if self.buffer.len() >= self.settings.batch_records {
            self.write(ctx);
        }
    }
}

impl Handler<Flush> for UsageLog {
    type Result = usize;

    fn handle(&mut self, _msg: Flush, ctx: &mut Self::Context) -> usize {
        self.write(ctx);
        self.buffer.len() + usize::from(self.writing)
    }
}

#[derive(Serialize)]
struct UsageLogStats {
    store: &'static str,
    buffered: usize,
    peak_buffered: usize,
    buffer_records: usize,
    written: u64,
    dropped: u64,
    failed_writes: u64,
    pruned: u64,
    retention_days: u64,
    batches: u64,
    database_up: bool,
    last_error: Option<String>,
    pool: crate::store::PoolStats,
}

impl Handler<GetStats> for UsageLog {
    type Result = Stats;

    fn handle(&mut self, _msg: GetStats, _ctx: &mut Self::Context) -> Stats {
        Stats::of(&UsageLogStats {
            store: self.store.kind(),
            buffered: self.buffer.len(),
            peak_buffered: self.peak_buffered,
            buffer_records: self.settings.buffer_records,
            written: self.counters.written.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
            failed_writes: self.counters.failed_writes.load(Ordering::Relaxed),
            pruned: self.counters.pruned.load(Ordering::Relaxed),
            retention_days: self.settings.retention_days,
            batches: self.batches,
            database_up: self.backoff.is_zero() && self.migrated,
            last_error: self.last_error.clone(),
            pool: self.store.pool_stats(),
        })
    }
}

impl Handler<Fail> for UsageLog {
    type Result = ();

    fn handle(&mut self, _msg: Fail, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
