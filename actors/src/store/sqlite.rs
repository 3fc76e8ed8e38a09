//! The embedded store: one SQLite file in WAL mode, so that reports read while a batch is
//! written. SQLite runs on blocking threads (`interact`), never on the actor threads.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_sqlite::rusqlite::{
    self, ffi, params, Connection, ErrorCode, OptionalExtension, ToSql, TransactionBehavior,
};
use deadpool_sqlite::{Config, Hook, HookError, Manager, Pool, PoolError, Runtime, TimeoutType};

use super::report::{self, Param};
use super::schema::{MIGRATIONS, MIGRATIONS_TABLE};
use super::{
    key_name_taken, key_secret_taken, limit_columns, models_json, to_i64, to_u64, GroupBy, KeyRow,
    PoolSettings, PoolStats, StoreError, UsageQuery, UsageRow,
};
use crate::clock::unix_ms;
use crate::keys::{KeyLimits, StoredKey};
use crate::usage::UsageRecord;

/// SQLite takes one writer at a time whatever the pool size; beyond a few readers more
/// connections only add file handles and page caches.
const MAX_CONNECTIONS: usize = 4;

/// How long a statement waits for another connection's write lock (this process's or another
/// gateway's on the same file) before failing as busy.
const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);

/// Distinguishes the in-memory databases of several stores in one process.
static MEMORY_DATABASES: AtomicU64 = AtomicU64::new(0);

#[derive(Clone)]
pub struct SqliteStore {
    pool: Pool,
    settings: PoolSettings,
    /// What errors name the database by: its absolute path, or `:memory:`.
    label: Arc<str>,
    /// Keeps an in-memory database alive: SQLite drops it with its last connection, and the pool
    /// closes connections (idle, worn out) whenever it likes.
    _memory_keeper: Option<Arc<Mutex<Connection>>>,
}

impl SqliteStore {
    /// Builds the pool and opens one connection at once, so that a path that cannot be created
    /// or written fails the gateway's start rather than its first flush.
    pub(super) async fn open(path: &str, settings: PoolSettings) -> Result<Self, StoreError> {
        let (file, label, memory_keeper, settings) = if path == ":memory:" {
            // One database shared by the pool's connections: a plain ":memory:" would give each
            // connection its own. One connection, since shared-cache writers lock out readers.
            let uri = format!(
                "file:nanogate-{}-{}?mode=memory&cache=shared",
                std::process::id(),
                MEMORY_DATABASES.fetch_add(1, Ordering::Relaxed)
            );
            let keeper = Connection::open(&uri)
                .map_err(|e| StoreError::Unavailable(format!("in-memory SQLite database: {e}")))?;
            let keeper = Some(Arc::new(Mutex::new(keeper)));
            (
                PathBuf::from(uri),
                ":memory:".to_owned(),
                keeper,
                settings.capped(1),
            )
        } else if path.is_empty() {
            return Err(StoreError::Config(
                "\"sqlite:\" needs a path, such as \"sqlite:nanogate.db\"".to_owned(),
            ));
        } else {
            // Absolute now, so that the database stays where it was if the working directory
            // changes.
            let file = std::path::absolute(path)
                .map_err(|e| StoreError::Config(format!("SQLite path {path}: {e}")))?;
            let label = file.display().to_string();
            (file, label, None, settings.capped(MAX_CONNECTIONS))
        };
        let pool = Pool::builder(Manager::from_config(&Config::new(file), Runtime::Tokio1))
            .max_size(settings.max)
            .timeouts(settings.timeouts)
            .runtime(Runtime::Tokio1)
            .post_create(Hook::async_fn(|conn, _| {
                Box::pin(async move {
                    conn.interact(configure)
                        .await
                        .map_err(|e| HookError::message(e.to_string()))?
                        .map_err(HookError::Backend)
                })
            }))
            .pre_recycle(Hook::sync_fn(move |_, metrics| {
                if settings.worn_out(metrics) {
                    Err(HookError::message("served max_queries_per_connection"))
                } else {
                    Ok(())
                }
            }))
            .build()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        let store = Self {
            pool,
            settings,
            label: label.into(),
            _memory_keeper: memory_keeper,
        };
        // SQLite opens a file it may not write read-only, silently.
        if store
            .run(|conn| conn.is_readonly("main"))
            .await?
            .map_err(query_error)?
        {
            return Err(StoreError::Unavailable(format!(
                "SQLite database {} is read-only",
                store.label
            )));
        }
        Ok(store)
    }

    /// Runs `f` on a pooled connection on a blocking thread. The outer error is the pool's, the
    /// inner one SQLite's, for the callers that tell some of SQLite's errors apart.
    async fn run<T, F>(&self, f: F) -> Result<rusqlite::Result<T>, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.pool.get().await.map_err(|e| self.pool_error(e))?;
        conn.interact(f)
            .await
            .map_err(|e| StoreError::Query(format!("a SQLite call failed: {e}")))
    }

    async fn query<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.run(f).await?.map_err(query_error)
    }

    fn pool_error(&self, error: PoolError) -> StoreError {
        let reason = match error {
            PoolError::Timeout(TimeoutType::Wait) => format!(
                "no connection came free within {} ms",
                self.settings.timeouts.wait.unwrap_or_default().as_millis()
            ),
            PoolError::Timeout(_) => "opening a connection timed out".to_owned(),
            PoolError::Backend(e) => e.to_string(),
            PoolError::PostCreateHook(HookError::Backend(e)) => e.to_string(),
            other => other.to_string(),
        };
        StoreError::Unavailable(format!("SQLite database {}: {reason}", self.label))
    }

    pub(super) async fn migrate(&self) -> Result<(), StoreError> {
        self.query(|conn| {
            for migration in MIGRATIONS {
                // Immediate: the write lock first, so that another gateway on the same file
                // waits here instead of applying the same migration.
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                tx.execute_batch(MIGRATIONS_TABLE)?;
                let applied = tx
                    .query_row(
                        "SELECT 1 FROM schema_migrations WHERE version = ?1",
                        [migration.version],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some();
                if !applied {
                    tx.execute_batch(migration.sqlite)?;
                    tx.execute(
                        "INSERT INTO schema_migrations (version, applied_ms) VALUES (?1, ?2)",
                        [migration.version, unix_ms()],
                    )?;
                }
                tx.commit()?;
            }
            Ok(())
        })
        .await
    }

    pub(super) async fn warm(&self) -> Result<(), StoreError> {
        // Held until all are open, so that each `get` opens another.
        let mut held = Vec::with_capacity(self.settings.min);
        for _ in 0..self.settings.min {
            held.push(self.pool.get().await.map_err(|e| self.pool_error(e))?);
        }
        Ok(())
    }

    pub(super) fn close(&self) {
        self.pool.close();
    }

    pub(super) fn is_closed(&self) -> bool {
        self.pool.is_closed()
    }

    pub(super) fn retire_idle(&self) -> usize {
        let mut keep = self.settings.keep_open(self.pool.status().size);
        self.pool.retain(|_, metrics| keep(metrics)).removed.len()
    }

    pub(super) async fn insert_usage(
        &self,
        records: &Arc<Vec<UsageRecord>>,
    ) -> Result<(), StoreError> {
        let records = records.clone();
        self.query(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO usage_log (at_ms, request_id, api_key, model, endpoint, status,
                         prompt_tokens, completion_tokens, cached_tokens, estimated, ttft_ms,
                         latency_ms, cache_hit, retries, error)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                )?;
                for record in records.iter() {
                    insert.execute(params![
                        record.at_ms,
                        record.request_id,
                        record.key.as_deref(),
                        record.model,
                        record.endpoint.as_deref(),
                        record.status,
                        to_i64(record.usage.prompt),
                        to_i64(record.usage.completion),
                        to_i64(record.usage.cached),
                        record.usage.estimated,
                        record.ttft_ms,
                        record.latency_ms,
                        record.cache_hit,
                        record.retries,
                        record.error,
                    ])?;
                }
            }
            tx.commit()
        })
        .await
    }

    pub(super) async fn usage_report(
        &self,
        query: &UsageQuery,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let (sql, params) = report::sql(query, |n| format!("?{n}"));
        let group_by = query.group_by;
        self.query(move |conn| {
            let values: Vec<&dyn ToSql> = params
                .iter()
                .map(|param| match param {
                    Param::Text(text) => text as &dyn ToSql,
                    Param::Int(int) => int as &dyn ToSql,
                })
                .collect();
            let mut statement = conn.prepare_cached(&sql)?;
            let rows = statement.query_map(values.as_slice(), |row| {
                Ok(UsageRow {
                    group: match group_by {
                        None => None,
                        Some(GroupBy::Hour) => Some(report::rfc3339(row.get(0)?)),
                        Some(_) => row.get(0)?,
                    },
                    requests: to_u64(row.get(1)?),
                    errors: to_u64(row.get(2)?),
                    prompt_tokens: to_u64(row.get(3)?),
                    completion_tokens: to_u64(row.get(4)?),
                    cached_tokens: to_u64(row.get(5)?),
                    estimated: to_u64(row.get(6)?),
                    cache_hits: to_u64(row.get(7)?),
                    p50_latency_ms: row.get(8)?,
                    p99_latency_ms: row.get(9)?,
                    p50_ttft_ms: row.get(10)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    pub(super) async fn load_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        let rows = self
            .query(|conn| {
                let mut statement = conn.prepare_cached(
                    "SELECT name, secret_sha256, models, rpm, tpm, max_concurrent, daily_tokens,
                            created_ms, revoked_ms
                     FROM api_keys ORDER BY name",
                )?;
                let rows = statement.query_map([], |row| {
                    Ok(KeyRow {
                        name: row.get(0)?,
                        digest: row.get(1)?,
                        models: row.get(2)?,
                        limits: [row.get(3)?, row.get(4)?, row.get(5)?, row.get(6)?],
                        created_ms: row.get(7)?,
                        revoked_ms: row.get(8)?,
                    })
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        rows.into_iter().map(KeyRow::into_key).collect()
    }

    pub(super) async fn insert_key(&self, key: &StoredKey) -> Result<(), StoreError> {
        let key = key.clone();
        let name = key.name.clone();
        let models = models_json(&key.models);
        let inserted = self
            .run(move |conn| {
                let [rpm, tpm, max_concurrent, daily_tokens] = limit_columns(&key.limits);
                conn.prepare_cached(
                    "INSERT INTO api_keys (name, secret_sha256, models, rpm, tpm, max_concurrent,
                         daily_tokens, created_ms, revoked_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(params![
                    key.name,
                    &key.secret_sha256[..],
                    models,
                    rpm,
                    tpm,
                    max_concurrent,
                    daily_tokens,
                    key.created_ms,
                    key.revoked_ms,
                ])
            })
            .await?;
        match inserted {
            Ok(_) => Ok(()),
            Err(e) => Err(match e.sqlite_extended_error_code() {
                Some(ffi::SQLITE_CONSTRAINT_PRIMARYKEY) => key_name_taken(&name),
                Some(ffi::SQLITE_CONSTRAINT_UNIQUE) => key_secret_taken(&name),
                _ => query_error(e),
            }),
        }
    }

    pub(super) async fn update_key(
        &self,
        name: &str,
        models: String,
        limits: &KeyLimits,
    ) -> Result<bool, StoreError> {
        let name = name.to_owned();
        let [rpm, tpm, max_concurrent, daily_tokens] = limit_columns(limits);
        let updated = self
            .query(move |conn| {
                conn.prepare_cached(
                    "UPDATE api_keys
                     SET models = ?1, rpm = ?2, tpm = ?3, max_concurrent = ?4, daily_tokens = ?5
                     WHERE name = ?6 AND revoked_ms IS NULL",
                )?
                .execute(params![
                    models,
                    rpm,
                    tpm,
                    max_concurrent,
                    daily_tokens,
                    name
                ])
            })
            .await?;
        Ok(updated > 0)
    }

    pub(super) async fn prune_usage(&self, before_ms: i64) -> Result<u64, StoreError> {
        let pruned = self
            .query(move |conn| {
                conn.prepare_cached(
                    "DELETE FROM usage_log WHERE rowid IN \
                     (SELECT rowid FROM usage_log WHERE at_ms < ?1 LIMIT ?2)",
                )?
                .execute(params![before_ms, super::PRUNE_ROWS as i64])
            })
            .await?;
        Ok(pruned as u64)
    }

    pub(super) async fn revoke_key(&self, name: &str, at_ms: i64) -> Result<bool, StoreError> {
        let name = name.to_owned();
        let revoked = self
            .query(move |conn| {
                conn.prepare_cached(
                    "UPDATE api_keys SET revoked_ms = ?1 WHERE name = ?2 AND revoked_ms IS NULL",
                )?
                .execute(params![at_ms, name])
            })
            .await?;
        Ok(revoked > 0)
    }

    pub(super) fn pool_stats(&self) -> PoolStats {
        self.pool.status().into()
    }
}

/// Every new connection's settings: they are per connection, not stored in the file (WAL is, but
/// setting it again is a no-op).
fn configure(conn: &mut Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
    conn.execute_batch("PRAGMA synchronous = NORMAL")
}

/// SQLite's errors that say the file cannot be used now, not that the statement is wrong.
fn query_error(error: rusqlite::Error) -> StoreError {
    let reason = error.to_string();
    match error.sqlite_error_code() {
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::CannotOpen
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::ReadOnly
            | ErrorCode::PermissionDenied,
        ) => StoreError::Unavailable(reason),
        _ => StoreError::Query(reason),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::tests::{exercise_keys, exercise_usage, settings};
    use super::super::{Store, StoreError};

    /// A database file in the temporary directory, removed (with its WAL files) when dropped.
    struct TempDatabase(String);

    impl TempDatabase {
        fn new(name: &str) -> Self {
            let file = std::env::temp_dir().join(format!(
                "nanogate-store-{name}-{}-{}.db",
                std::process::id(),
                crate::clock::unix_ms()
            ));
            Self(file.display().to_string())
        }

        fn url(&self) -> String {
            format!("sqlite:{}", self.0)
        }
    }

    impl Drop for TempDatabase {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", self.0));
            }
        }
    }

    #[actix_rt::test]
    async fn keeps_usage_and_keys_in_a_file() {
        let file = TempDatabase::new("file");
        let store = Store::open(&settings(&file.url())).await.unwrap().unwrap();
        assert_eq!(store.kind(), "sqlite");
        store.migrate().await.unwrap();
        store.migrate().await.unwrap();
        store.warm().await.unwrap();
        let stats = store.pool_stats();
        assert_eq!((stats.size, stats.max_size), (2, 4));
        exercise_usage(&store).await;
        exercise_keys(&store).await;
        // Nothing has been idle for 300 s.
        assert_eq!(store.retire_idle(), 0);

        // Another gateway on the same file sees it migrated and filled.
        let other = Store::open(&settings(&file.url())).await.unwrap().unwrap();
        other.migrate().await.unwrap();
        assert_eq!(other.load_keys().await.unwrap().len(), 2);
    }

    #[actix_rt::test]
    async fn an_in_memory_database_outlives_its_connections() {
        let mut settings = settings("sqlite::memory:");
        // Every connection is retired after one use, so none outlives an operation.
        settings.max_queries_per_connection = 1;
        let store = Store::open(&settings).await.unwrap().unwrap();
        assert_eq!(store.pool_stats().max_size, 1);
        store.migrate().await.unwrap();
        exercise_keys(&store).await;
        exercise_usage(&store).await;
    }

    #[actix_rt::test]
    async fn idle_connections_beyond_the_minimum_are_closed() {
        let file = TempDatabase::new("idle");
        let mut settings = settings(&file.url());
        settings.pool_min_connections = 1;
        settings.idle_timeout_secs = 0;
        let store = Store::open(&settings).await.unwrap().unwrap();
        let Store::Sqlite(sqlite) = &store else {
            unreachable!()
        };
        let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| sqlite.pool.get()))
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        drop(held);
        assert_eq!(store.pool_stats().size, 3);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(store.retire_idle(), 2);
        assert_eq!(store.pool_stats().size, 1);
    }

    #[actix_rt::test]
    async fn a_path_that_cannot_be_written_is_named() {
        let missing_dir =
            std::env::temp_dir().join(format!("nanogate-missing-{}", crate::clock::unix_ms()));
        let in_missing_dir = missing_dir.join("nanogate.db");
        for path in [Path::new("/proc/nanogate.db"), in_missing_dir.as_path()] {
            let url = format!("sqlite:{}", path.display());
            let err = Store::open(&settings(&url)).await.err().unwrap();
            assert!(
                matches!(&err, StoreError::Unavailable(m) if m.contains(&*path.to_string_lossy())),
                "{err}"
            );
        }
        assert!(!missing_dir.exists());
    }
}
