//! The database behind the usage log and the API keys: embedded SQLite by default, PostgreSQL when
//! several gateways share one log, or none at all. Both dialects share one schema ([`schema`]) and
//! one report query ([`report`]), so a report reads the same whichever database answers it.
//!
//! The caller owns the timers: it flushes batches of [`UsageRecord`]s through
//! [`Store::insert_usage`] and calls [`Store::retire_idle`] now and then. Nothing here spawns a
//! task of its own besides PostgreSQL's per-connection I/O task.

mod postgres;
mod report;
mod schema;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Metrics, Status, Timeouts};
use serde::{Deserialize, Serialize};

use crate::keys::{KeyLimits, StoredKey};
use crate::usage::UsageRecord;

use self::postgres::PostgresStore;
use self::sqlite::SqliteStore;

/// `[usage]` database settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite:PATH` (relative to the working directory; `sqlite::memory:` for a throwaway
    /// in-memory database), `postgres://user:pass@host:port/db` (or `postgresql://`), or `off`.
    pub database: String,
    /// Connections opened by [`Store::warm`] and kept however idle, so that the first requests
    /// after a quiet spell do not all wait for a connect. Capped at `pool_max_connections`.
    pub pool_min_connections: usize,
    /// Connections open at once. SQLite is capped at 4: it serializes writes anyway, and more
    /// readers only contend for the same file.
    pub pool_max_connections: usize,
    /// Uses (checkouts: one per store operation) after which a connection is closed rather than
    /// reused, so that server-side memory a session accumulates is given back.
    pub max_queries_per_connection: u64,
    /// Connections beyond `pool_min_connections` idle longer than this are closed by
    /// [`Store::retire_idle`].
    pub idle_timeout_secs: u64,
    /// Longest a store operation waits for a free connection before failing as unavailable.
    pub acquire_timeout_ms: u64,
    /// Longest opening one connection may take (PostgreSQL's `connect_timeout` as well).
    pub connect_timeout_ms: u64,
}

/// Usage records one prune deletes at most (see [`Store::prune_usage`]).
pub const PRUNE_ROWS: u64 = 10_000;

/// An open database: a connection pool and what it needs to know to use it.
#[derive(Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The settings cannot work: a malformed URL, an impossible pool size.
    #[error("invalid database settings: {0}")]
    Config(String),
    /// The database cannot be reached or opened, or no connection came free in time.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database refused a statement or answered something unexpected.
    #[error("database query failed: {0}")]
    Query(String),
    /// A row with the same unique value already exists.
    #[error("{0}")]
    Conflict(String),
}

/// What a usage report covers and how it is broken down.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct UsageQuery {
    pub key: Option<String>,
    pub model: Option<String>,
    /// Inclusive, in milliseconds since the Unix epoch.
    pub since_ms: Option<i64>,
    /// Exclusive, in milliseconds since the Unix epoch.
    pub until_ms: Option<i64>,
    pub group_by: Option<GroupBy>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Key,
    Model,
    Endpoint,
    /// UTC hours.
    Hour,
}

/// One line of a usage report.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct UsageRow {
    /// The key, model, endpoint or hour (RFC 3339 UTC, `2026-11-28T01:00:00Z`) this row sums;
    /// `None` when the report is not grouped, and for records that had none (no key, no model,
    /// answered by the gateway itself).
    pub group: Option<String>,
    pub requests: u64,
    /// Requests answered with a status of 400 or more.
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    /// Requests whose token counts are the gateway's estimate.
    pub estimated: u64,
    pub cache_hits: u64,
    /// Nearest-rank percentiles; `None` when no request had the measure.
    pub p50_latency_ms: Option<f64>,
    pub p99_latency_ms: Option<f64>,
    pub p50_ttft_ms: Option<f64>,
}

/// The connection pool as `/stats` shows it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections open, in use or not.
    pub size: usize,
    /// Connections open and free.
    pub available: usize,
    /// Operations waiting for a connection.
    pub waiting: usize,
    pub max_size: usize,
}

impl From<Status> for PoolStats {
    fn from(status: Status) -> Self {
        Self {
            size: status.size,
            available: status.available,
            waiting: status.waiting,
            max_size: status.max_size,
        }
    }
}

impl Store {
    /// Builds the pool for `settings.database`; `None` when it is `off`. Building a PostgreSQL
    /// pool does not connect, so the gateway starts while its database is down; a SQLite
    /// database is opened at once, so that a path that cannot be written fails the start.
    pub async fn open(settings: &DatabaseSettings) -> Result<Option<Store>, StoreError> {
        let database = settings.database.trim();
        if database == "off" {
            return Ok(None);
        }
        let pool = PoolSettings::new(settings)?;
        if let Some(path) = database.strip_prefix("sqlite:") {
            return Ok(Some(Store::Sqlite(SqliteStore::open(path, pool).await?)));
        }
        if database.starts_with("postgres://") || database.starts_with("postgresql://") {
            return Ok(Some(Store::Postgres(PostgresStore::open(database, pool)?)));
        }
        // Only the scheme: the rest may hold a password.
        let scheme = database.split(':').next().unwrap_or_default();
        Err(StoreError::Config(format!(
            "database \"{scheme}:…\" is not supported: use \"sqlite:PATH\", \
             \"postgres://user:pass@host:port/db\" or \"off\""
        )))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Applies the migrations this database has not seen yet, each once and in its own
    /// transaction; concurrent gateways starting on one database apply each exactly once.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(store) => store.migrate().await,
            Store::Postgres(store) => store.migrate().await,
        }
    }

    /// Opens `pool_min_connections` connections now, since the pool itself only opens them on
    /// demand.
    pub async fn warm(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(store) => store.warm().await,
            Store::Postgres(store) => store.warm().await,
        }
    }

    /// Closes the free connections idle longer than `idle_timeout_secs`, keeping
    /// `pool_min_connections` open; returns how many it closed. The caller runs it on a timer.
    pub fn retire_idle(&self) -> usize {
        match self {
            Store::Sqlite(store) => store.retire_idle(),
            Store::Postgres(store) => store.retire_idle(),
        }
    }

    /// Closes every connection now. A pooled SQLite connection is closed on the blocking
    /// thread pool, so this must run while the runtime still does: at shutdown, before the
    /// arbiters stop.
    pub fn close(&self) {
        match self {
            Store::Sqlite(store) => store.close(),
            Store::Postgres(store) => store.close(),
        }
    }

    /// Whether [`Store::close`] was called (the gateway stopped).
    pub fn is_closed(&self) -> bool {
        match self {
            Store::Sqlite(store) => store.is_closed(),
            Store::Postgres(store) => store.is_closed(),
        }
    }

    /// Writes one batch of records, all or none. Shared, not borrowed: SQLite writes on a
    /// blocking thread, which must own what it writes, and the caller keeps the batch to try
    /// again if the write fails.
    pub async fn insert_usage(&self, records: &Arc<Vec<UsageRecord>>) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        match self {
            Store::Sqlite(store) => store.insert_usage(records).await,
            Store::Postgres(store) => store.insert_usage(records).await,
        }
    }

    /// Sums the matching records per group, sorted by group (the records that have none
    /// first). An ungrouped report always has exactly one row, zeros when nothing matched.
    pub async fn usage_report(&self, query: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
        let rows = match self {
            Store::Sqlite(store) => store.usage_report(query).await?,
            Store::Postgres(store) => store.usage_report(query).await?,
        };
        Ok(report::finish(query, rows))
    }

    /// Every key, revoked ones included, by name.
    pub async fn load_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        match self {
            Store::Sqlite(store) => store.load_keys().await,
            Store::Postgres(store) => store.load_keys().await,
        }
    }

    /// Fails with [`StoreError::Conflict`] when the name is taken, even by a revoked key (the
    /// usage log names keys, so a name is never reused), or another key has the same secret.
    pub async fn insert_key(&self, key: &StoredKey) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(store) => store.insert_key(key).await,
            Store::Postgres(store) => store.insert_key(key).await,
        }
    }

    /// Replaces an unrevoked key's models and limits; `false` when there is no such key.
    pub async fn update_key(
        &self,
        name: &str,
        models: &[String],
        limits: &KeyLimits,
    ) -> Result<bool, StoreError> {
        let models = models_json(models);
        match self {
            Store::Sqlite(store) => store.update_key(name, models, limits).await,
            Store::Postgres(store) => store.update_key(name, &models, limits).await,
        }
    }

    /// Deletes up to [`PRUNE_ROWS`] usage records older than `before_ms`; answers how many (fewer
    /// than `PRUNE_ROWS`: none older is left). In slices, so a first prune of a large log holds
    /// the database's write lock (SQLite) for a slice at a time, not for all of it, and the
    /// batches of new records get their turn between slices (the usage log pauses between them).
    pub async fn prune_usage(&self, before_ms: i64) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(store) => store.prune_usage(before_ms).await,
            Store::Postgres(store) => store.prune_usage(before_ms).await,
        }
    }

    /// Marks a key revoked at `at_ms`; `false` when there is no such unrevoked key.
    pub async fn revoke_key(&self, name: &str, at_ms: i64) -> Result<bool, StoreError> {
        match self {
            Store::Sqlite(store) => store.revoke_key(name, at_ms).await,
            Store::Postgres(store) => store.revoke_key(name, at_ms).await,
        }
    }

    pub fn pool_stats(&self) -> PoolStats {
        match self {
            Store::Sqlite(store) => store.pool_stats(),
            Store::Postgres(store) => store.pool_stats(),
        }
    }
}

/// The settings every pool is built and maintained with, checked once.
#[derive(Debug, Clone, Copy)]
struct PoolSettings {
    min: usize,
    max: usize,
    max_uses: u64,
    idle_timeout: Duration,
    timeouts: Timeouts,
}

impl PoolSettings {
    fn new(settings: &DatabaseSettings) -> Result<Self, StoreError> {
        let at_least_one = [
            ("pool_max_connections", settings.pool_max_connections as u64),
            (
                "max_queries_per_connection",
                settings.max_queries_per_connection,
            ),
            ("connect_timeout_ms", settings.connect_timeout_ms),
        ];
        if let Some((key, _)) = at_least_one.iter().find(|(_, value)| *value == 0) {
            return Err(StoreError::Config(format!("{key} must be at least 1")));
        }
        let connect = Duration::from_millis(settings.connect_timeout_ms);
        Ok(Self {
            min: settings
                .pool_min_connections
                .min(settings.pool_max_connections),
            max: settings.pool_max_connections,
            max_uses: settings.max_queries_per_connection,
            idle_timeout: Duration::from_secs(settings.idle_timeout_secs),
            timeouts: Timeouts {
                wait: Some(Duration::from_millis(settings.acquire_timeout_ms)),
                create: Some(connect),
                recycle: Some(connect),
            },
        })
    }

    /// A pool of at most `max` connections instead.
    fn capped(self, max: usize) -> Self {
        Self {
            min: self.min.min(max),
            max: self.max.min(max),
            ..self
        }
    }

    /// Whether a connection has served its `max_queries_per_connection` uses: it has been handed
    /// out once when created and once per recycle since.
    fn worn_out(&self, metrics: &Metrics) -> bool {
        metrics.recycle_count as u64 + 1 >= self.max_uses
    }

    /// The predicate for `Pool::retain` that closes connections idle too long while more than
    /// `min` are open (`open` counts those in use too, which `retain` does not visit).
    fn keep_open(&self, mut open: usize) -> impl FnMut(Metrics) -> bool {
        let (min, idle_timeout) = (self.min, self.idle_timeout);
        move |metrics| {
            if open > min && metrics.last_used() > idle_timeout {
                open -= 1;
                false
            } else {
                true
            }
        }
    }
}

/// A stored value of a `u64`: the columns are signed 64-bit in both dialects.
fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// The models column: a JSON array, so one text column holds any list in both dialects.
fn models_json(models: &[String]) -> String {
    serde_json::Value::from(models).to_string()
}

fn parse_models(name: &str, json: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(json)
        .map_err(|e| StoreError::Query(format!("key '{name}': models column {json:?}: {e}")))
}

fn parse_digest(name: &str, digest: Vec<u8>) -> Result<[u8; 32], StoreError> {
    let len = digest.len();
    digest.try_into().map_err(|_| {
        StoreError::Query(format!(
            "key '{name}': secret digest is {len} bytes, not 32"
        ))
    })
}

fn key_name_taken(name: &str) -> StoreError {
    StoreError::Conflict(format!("an API key named '{name}' already exists"))
}

fn key_secret_taken(name: &str) -> StoreError {
    StoreError::Conflict(format!(
        "API key '{name}' has the same secret as another key"
    ))
}

fn limit_columns(limits: &KeyLimits) -> [Option<i64>; 4] {
    [
        limits.rpm,
        limits.tpm,
        limits.max_concurrent,
        limits.daily_tokens,
    ]
    .map(|l| l.map(to_i64))
}

/// An `api_keys` row as both drivers read it, before its digest and models are checked.
struct KeyRow {
    name: String,
    digest: Vec<u8>,
    models: String,
    limits: [Option<i64>; 4],
    created_ms: i64,
    revoked_ms: Option<i64>,
}

impl KeyRow {
    fn into_key(self) -> Result<StoredKey, StoreError> {
        let [rpm, tpm, max_concurrent, daily_tokens] = self.limits.map(|l| l.map(to_u64));
        Ok(StoredKey {
            secret_sha256: parse_digest(&self.name, self.digest)?,
            models: parse_models(&self.name, &self.models)?,
            limits: KeyLimits {
                rpm,
                tpm,
                max_concurrent,
                daily_tokens,
            },
            created_ms: self.created_ms,
            revoked_ms: self.revoked_ms,
            name: self.name,
        })
    }
}

/// What both backends' tests run: the same assertions against SQLite and PostgreSQL.
#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::usage::TokenUsage;

    /// 2026-11-28T00:00:00Z.
    const START_MS: i64 = 1_795_824_000_000;
    const HOUR_MS: i64 = 3_600_000;

    pub(crate) fn settings(database: &str) -> DatabaseSettings {
        DatabaseSettings {
            database: database.to_owned(),
            pool_min_connections: 2,
            pool_max_connections: 4,
            max_queries_per_connection: 50_000,
            idle_timeout_secs: 300,
            acquire_timeout_ms: 30_000,
            connect_timeout_ms: 5_000,
        }
    }

    /// Record `i` of 1,000: ten hours of 100 requests each, whose latencies are 1..=100 ms in
    /// every hour; four keys (one of them none), two models, three endpoints.
    fn record(i: usize) -> UsageRecord {
        let n = i as u64;
        UsageRecord {
            at_ms: START_MS + i as i64 * 36_000,
            request_id: format!("req-{i}"),
            key: ["alice", "bob", "carol"].get(i % 4).map(|&k| Arc::from(k)),
            model: Some(if i.is_multiple_of(5) { "big" } else { "small" }.to_owned()),
            endpoint: ["http://a:8000", "http://b:8000"]
                .get(i % 3)
                .map(|&e| Arc::from(e)),
            status: match i % 10 {
                0 => 500,
                1 => 429,
                _ => 200,
            },
            usage: TokenUsage {
                prompt: n,
                completion: 2,
                cached: if i.is_multiple_of(3) { 5 } else { 0 },
                estimated: i.is_multiple_of(7),
                cached_known: false,
            },
            ttft_ms: i.is_multiple_of(2).then_some((i % 100 + 1) as f64),
            latency_ms: (i % 100 + 1) as f64,
            cache_hit: i.is_multiple_of(8),
            retries: (i % 3) as u32,
            error: i.is_multiple_of(10).then_some("upstream_unreachable"),
        }
    }

    /// The sums a report row of `records` must show (its percentiles are checked apart).
    fn sums<'a>(group: Option<&str>, records: impl Iterator<Item = &'a UsageRecord>) -> UsageRow {
        let mut row = UsageRow {
            group: group.map(str::to_owned),
            ..UsageRow::default()
        };
        for r in records {
            row.requests += 1;
            row.errors += u64::from(r.status >= 400);
            row.prompt_tokens += r.usage.prompt;
            row.completion_tokens += r.usage.completion;
            row.cached_tokens += r.usage.cached;
            row.estimated += u64::from(r.usage.estimated);
            row.cache_hits += u64::from(r.cache_hit);
        }
        row
    }

    fn without_percentiles(row: &UsageRow) -> UsageRow {
        UsageRow {
            p50_latency_ms: None,
            p99_latency_ms: None,
            p50_ttft_ms: None,
            ..row.clone()
        }
    }

    /// Expects a freshly migrated, empty database.
    pub(crate) async fn exercise_usage(store: &Store) {
        let records: Vec<UsageRecord> = (0..1000).map(record).collect();
        for batch in records.chunks(250) {
            store.insert_usage(&Arc::new(batch.to_vec())).await.unwrap();
        }
        store.insert_usage(&Arc::new(Vec::new())).await.unwrap();

        let all = store.usage_report(&UsageQuery::default()).await.unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(without_percentiles(&all[0]), sums(None, records.iter()));
        assert_eq!(all[0].requests, 1000);
        assert_eq!(all[0].errors, 200);
        assert_eq!(all[0].prompt_tokens, 499_500);
        assert_eq!(all[0].p50_latency_ms, Some(50.0));
        assert_eq!(all[0].p99_latency_ms, Some(99.0));
        // Time to first token only of the even records: 1, 3, ..., 99, ten times each.
        assert_eq!(all[0].p50_ttft_ms, Some(49.0));

        let query = |group_by| UsageQuery {
            group_by: Some(group_by),
            ..UsageQuery::default()
        };
        let by_model = store.usage_report(&query(GroupBy::Model)).await.unwrap();
        let model_of = |r: &UsageRecord, m: &str| r.model.as_deref() == Some(m);
        assert_eq!(
            by_model.iter().map(without_percentiles).collect::<Vec<_>>(),
            vec![
                sums(Some("big"), records.iter().filter(|r| model_of(r, "big"))),
                sums(
                    Some("small"),
                    records.iter().filter(|r| model_of(r, "small"))
                ),
            ]
        );

        let by_key = store.usage_report(&query(GroupBy::Key)).await.unwrap();
        let groups: Vec<_> = by_key.iter().map(|row| row.group.as_deref()).collect();
        assert_eq!(groups, [None, Some("alice"), Some("bob"), Some("carol")]);
        assert!(by_key.iter().all(|row| row.requests == 250));
        let alice = records.iter().filter(|r| r.key.as_deref() == Some("alice"));
        assert_eq!(without_percentiles(&by_key[1]), sums(Some("alice"), alice));

        let by_endpoint = store.usage_report(&query(GroupBy::Endpoint)).await.unwrap();
        let groups: Vec<_> = by_endpoint.iter().map(|row| row.group.as_deref()).collect();
        assert_eq!(groups, [None, Some("http://a:8000"), Some("http://b:8000")]);

        let by_hour = store.usage_report(&query(GroupBy::Hour)).await.unwrap();
        assert_eq!(by_hour.len(), 10);
        assert_eq!(by_hour[0].group.as_deref(), Some("2026-11-28T00:00:00Z"));
        assert_eq!(by_hour[9].group.as_deref(), Some("2026-11-28T09:00:00Z"));
        for row in &by_hour {
            assert_eq!(row.requests, 100);
            assert_eq!(row.p50_latency_ms, Some(50.0));
            assert_eq!(row.p99_latency_ms, Some(99.0));
        }

        let window = UsageQuery {
            since_ms: Some(START_MS + 2 * HOUR_MS),
            until_ms: Some(START_MS + 5 * HOUR_MS),
            ..UsageQuery::default()
        };
        let in_window = |r: &&UsageRecord| {
            r.at_ms >= START_MS + 2 * HOUR_MS && r.at_ms < START_MS + 5 * HOUR_MS
        };
        let rows = store.usage_report(&window).await.unwrap();
        assert_eq!(rows[0].requests, 300);
        assert_eq!(
            without_percentiles(&rows[0]),
            sums(None, records.iter().filter(in_window))
        );

        let alice_in_window = UsageQuery {
            key: Some("alice".to_owned()),
            model: Some("small".to_owned()),
            group_by: Some(GroupBy::Hour),
            ..window
        };
        let rows = store.usage_report(&alice_in_window).await.unwrap();
        assert_eq!(rows.len(), 3);
        let expected = records
            .iter()
            .filter(in_window)
            .filter(|r| r.key.as_deref() == Some("alice") && r.model.as_deref() == Some("small"));
        assert_eq!(
            rows.iter().map(|row| row.requests).sum::<u64>(),
            expected.count() as u64
        );

        let nobody = UsageQuery {
            key: Some("nobody".to_owned()),
            ..UsageQuery::default()
        };
        assert_eq!(
            store.usage_report(&nobody).await.unwrap(),
            vec![UsageRow::default()]
        );
        let nobody_by_model = UsageQuery {
            group_by: Some(GroupBy::Model),
            ..nobody
        };
        assert!(store
            .usage_report(&nobody_by_model)
            .await
            .unwrap()
            .is_empty());

        // Past the retention: a day older than the rest, more than one prune's slice of them.
        let old: Vec<UsageRecord> = (0..PRUNE_ROWS as usize + 500)
            .map(|i| UsageRecord {
                at_ms: START_MS - 24 * HOUR_MS,
                ..record(i)
            })
            .collect();
        for batch in old.chunks(2500) {
            store.insert_usage(&Arc::new(batch.to_vec())).await.unwrap();
        }
        assert_eq!(store.prune_usage(START_MS).await.unwrap(), PRUNE_ROWS);
        assert_eq!(store.prune_usage(START_MS).await.unwrap(), 500);
        assert_eq!(store.prune_usage(START_MS).await.unwrap(), 0);
        let all = store.usage_report(&UsageQuery::default()).await.unwrap();
        assert_eq!(
            all[0].requests, 1000,
            "the records within the retention stay"
        );
        assert_eq!(
            store.prune_usage(START_MS + 5 * HOUR_MS).await.unwrap(),
            500
        );
        let all = store.usage_report(&UsageQuery::default()).await.unwrap();
        assert_eq!(all[0].requests, 500);
    }

    fn key(name: &str, secret: u8) -> StoredKey {
        StoredKey {
            name: name.to_owned(),
            secret_sha256: [secret; 32],
            models: vec!["big".to_owned(), "small".to_owned()],
            limits: KeyLimits {
                rpm: Some(60),
                tpm: None,
                max_concurrent: Some(4),
                daily_tokens: Some(u64::MAX),
            },
            created_ms: START_MS,
            revoked_ms: None,
        }
    }

    /// Expects a freshly migrated database with no keys.
    pub(crate) async fn exercise_keys(store: &Store) {
        assert!(store.load_keys().await.unwrap().is_empty());
        store.insert_key(&key("alice", 1)).await.unwrap();
        let conflict = store.insert_key(&key("alice", 2)).await.unwrap_err();
        assert!(
            matches!(&conflict, StoreError::Conflict(m) if m.contains("named 'alice'")),
            "{conflict}"
        );
        let conflict = store.insert_key(&key("bob", 1)).await.unwrap_err();
        assert!(
            matches!(&conflict, StoreError::Conflict(m) if m.contains("same secret")),
            "{conflict}"
        );
        store.insert_key(&key("bob", 2)).await.unwrap();

        let limits = KeyLimits {
            rpm: None,
            tpm: Some(1000),
            max_concurrent: None,
            daily_tokens: None,
        };
        assert!(store.update_key("bob", &[], &limits).await.unwrap());
        assert!(!store.update_key("nobody", &[], &limits).await.unwrap());
        assert!(store.revoke_key("alice", START_MS + 5).await.unwrap());
        assert!(!store.revoke_key("alice", START_MS + 6).await.unwrap());
        assert!(!store.revoke_key("nobody", START_MS).await.unwrap());
        assert!(!store.update_key("alice", &[], &limits).await.unwrap());
        // A revoked key's name stays taken: the usage log names keys.
        assert!(matches!(
            store.insert_key(&key("alice", 3)).await,
            Err(StoreError::Conflict(_))
        ));

        let mut alice = key("alice", 1);
        alice.revoked_ms = Some(START_MS + 5);
        // Stored as a signed 64-bit integer, saturating.
        alice.limits.daily_tokens = Some(i64::MAX as u64);
        let mut bob = key("bob", 2);
        bob.models = Vec::new();
        bob.limits = limits;
        assert_eq!(store.load_keys().await.unwrap(), vec![alice, bob]);
    }

    /// The gateway shares one store between its threads and may hand its work to
    /// `tokio::spawn`.
    #[test]
    fn store_and_its_futures_are_send() {
        fn send<T: Send>(_: T) {}
        fn shared<T: Clone + Send + Sync>() {}
        shared::<Store>();
        let _ = |records: Arc<Vec<UsageRecord>>, query: UsageQuery, key: StoredKey| {
            send(async move {
                let store = Store::open(&settings("off")).await?.unwrap();
                store.migrate().await?;
                store.warm().await?;
                store.insert_usage(&records).await?;
                store.usage_report(&query).await?;
                store.insert_key(&key).await?;
                store
                    .update_key(&key.name, &key.models, &key.limits)
                    .await?;
                store.revoke_key(&key.name, 0).await?;
                store.load_keys().await
            })
        };
    }

    #[actix_rt::test]
    async fn off_is_no_store_and_bad_settings_are_named() {
        assert!(Store::open(&settings("off")).await.unwrap().is_none());
        let err = Store::open(&settings("mysql://root:hunter2@db/x"))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, StoreError::Config(m) if m.contains("\"mysql:…\"")),
            "{err}"
        );
        assert!(!err.to_string().contains("hunter2"));
        let err = Store::open(&settings("postgres://u:p@host:notaport/db"))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, StoreError::Config(m) if m.contains("port")),
            "{err}"
        );
        let mut zero = settings("sqlite::memory:");
        zero.pool_max_connections = 0;
        let err = Store::open(&zero).await.err().unwrap();
        assert!(
            matches!(&err, StoreError::Config(m) if m.contains("pool_max_connections")),
            "{err}"
        );
    }

    #[actix_rt::test]
    async fn a_postgres_pool_opens_without_its_server() {
        let mut settings = settings("postgresql://nanogate@127.0.0.1:1/nanogate");
        settings.connect_timeout_ms = 2_000;
        let store = Store::open(&settings).await.unwrap().unwrap();
        assert_eq!(store.kind(), "postgres");
        assert_eq!(store.pool_stats().size, 0);
        let err = store.migrate().await.unwrap_err();
        assert!(matches!(&err, StoreError::Unavailable(_)), "{err}");
    }
}
