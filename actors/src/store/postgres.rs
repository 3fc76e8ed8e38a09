//! The shared store: PostgreSQL, for several gateways writing one usage log. Connections are
//! opened on demand, so a gateway starts (and serves) while its database is down; each statement
//! is prepared once per connection.

use bytes::{BufMut, Bytes, BytesMut};
use deadpool_postgres::tokio_postgres::config::SslMode;
use deadpool_postgres::tokio_postgres::error::SqlState;
use deadpool_postgres::tokio_postgres::types::ToSql;
use deadpool_postgres::tokio_postgres::{self, NoTls, Row};
use deadpool_postgres::{
    Client, Hook, HookError, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime,
    TimeoutType,
};
use futures_util::SinkExt;

use super::report::{self, Param};
use super::schema::{MIGRATIONS, MIGRATIONS_TABLE};
use super::{
    key_name_taken, key_secret_taken, limit_columns, models_json, to_i64, to_u64, GroupBy, KeyRow,
    PoolSettings, PoolStats, StoreError, UsageQuery, UsageRow,
};
use crate::clock::unix_ms;
use crate::keys::{KeyLimits, StoredKey};
use crate::usage::UsageRecord;

/// The transaction-scoped advisory lock that lets one gateway at a time migrate: "nanogate" in
/// ASCII.
const MIGRATION_LOCK: i64 = i64::from_be_bytes(*b"nanogate");

#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    settings: PoolSettings,
}

impl PostgresStore {
    /// Checks the URL and builds the pool; connects to nothing.
    pub(super) fn open(url: &str, settings: PoolSettings) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Config(format!("PostgreSQL URL: {}", describe(&e))))?;
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            return Err(StoreError::Config(
                "the PostgreSQL URL names no host".to_owned(),
            ));
        }
        if config.get_ssl_mode() == SslMode::Require {
            return Err(StoreError::Config(
                "the PostgreSQL URL asks for sslmode=require, but nanogate connects to \
                 PostgreSQL without TLS"
                    .to_owned(),
            ));
        }
        if let Some(timeout) = settings.timeouts.create {
            config.connect_timeout(timeout);
        }
        // So that pg_stat_activity tells the gateway's sessions apart.
        if config.get_application_name().is_none() {
            config.application_name("nanogate");
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.max)
            .timeouts(settings.timeouts)
            .runtime(Runtime::Tokio1)
            .pre_recycle(Hook::sync_fn(move |_, metrics| {
                if settings.worn_out(metrics) {
                    Err(HookError::message("served max_queries_per_connection"))
                } else {
                    Ok(())
                }
            }))
            .build()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        Ok(Self { pool, settings })
    }

    async fn client(&self) -> Result<Client, StoreError> {
        self.pool.get().await.map_err(|error| {
            let reason = match error {
                PoolError::Timeout(TimeoutType::Wait) => format!(
                    "no connection came free within {} ms",
                    self.settings.timeouts.wait.unwrap_or_default().as_millis()
                ),
                PoolError::Timeout(_) => format!(
                    "connecting timed out after {} ms",
                    self.settings
                        .timeouts
                        .create
                        .unwrap_or_default()
                        .as_millis()
                ),
                PoolError::Backend(e) => describe(&e),
                other => other.to_string(),
            };
            StoreError::Unavailable(format!("PostgreSQL: {reason}"))
        })
    }

    pub(super) async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        for migration in MIGRATIONS {
            let tx = client.transaction().await.map_err(query_error)?;
            async {
                // Held until commit: a second gateway starting now waits here, then finds the
                // migration applied. It also covers creating schema_migrations, which two
                // concurrent `CREATE TABLE IF NOT EXISTS` could otherwise both attempt.
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                    .await?;
                tx.batch_execute(MIGRATIONS_TABLE).await?;
                let applied = tx
                    .query_opt(
                        "SELECT 1 FROM schema_migrations WHERE version = $1",
                        &[&migration.version],
                    )
                    .await?
                    .is_some();
                if !applied {
                    tx.batch_execute(migration.postgres).await?;
                    tx.execute(
                        "INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)",
                        &[&migration.version, &unix_ms()],
                    )
                    .await?;
                }
                tx.commit().await
            }
            .await
            .map_err(query_error)?;
        }
        Ok(())
    }

    pub(super) async fn warm(&self) -> Result<(), StoreError> {
        // Held until all are open, so that each `get` opens another.
        let mut held = Vec::with_capacity(self.settings.min);
        for _ in 0..self.settings.min {
            held.push(self.client().await?);
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

    /// One batch by `COPY ... FROM STDIN BINARY`: the cheapest way in for the server (no
    /// statement to plan, no arrays to unpack), which shares the machine with the gateway often
    /// enough.
    pub(super) async fn insert_usage(&self, records: &[UsageRecord]) -> Result<(), StoreError> {
        let rows = copy_binary(records).freeze();
        let client = self.client().await?;
        async {
            let sink = client
                .copy_in::<_, Bytes>(
                    "COPY usage_log (at_ms, request_id, api_key, model, endpoint, status,
                         prompt_tokens, completion_tokens, cached_tokens, estimated, ttft_ms,
                         latency_ms, cache_hit, retries, error) FROM STDIN BINARY",
                )
                .await?;
            let mut sink = std::pin::pin!(sink);
            sink.as_mut().send(rows).await?;
            sink.finish().await
        }
        .await
        .map_err(query_error)?;
        Ok(())
    }

    pub(super) async fn usage_report(
        &self,
        query: &UsageQuery,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let (sql, params) = report::sql(query, |n| format!("${n}"));
        let values: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|param| match param {
                Param::Text(text) => text as &(dyn ToSql + Sync),
                Param::Int(int) => int as &(dyn ToSql + Sync),
            })
            .collect();
        let client = self.client().await?;
        async {
            let statement = client.prepare_cached(&sql).await?;
            client
                .query(&statement, &values)
                .await?
                .iter()
                .map(|row| report_row(row, query.group_by))
                .collect::<Result<Vec<_>, _>>()
        }
        .await
        .map_err(query_error)
    }

    pub(super) async fn load_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        let client = self.client().await?;
        let rows: Vec<KeyRow> = async {
            let statement = client
                .prepare_cached(
                    "SELECT name, secret_sha256, models, rpm, tpm, max_concurrent, daily_tokens,
                            created_ms, revoked_ms
                     FROM api_keys ORDER BY name",
                )
                .await?;
            client
                .query(&statement, &[])
                .await?
                .iter()
                .map(|row| {
                    Ok(KeyRow {
                        name: row.try_get(0)?,
                        digest: row.try_get(1)?,
                        models: row.try_get(2)?,
                        limits: [
                            row.try_get(3)?,
                            row.try_get(4)?,
                            row.try_get(5)?,
                            row.try_get(6)?,
                        ],
                        created_ms: row.try_get(7)?,
                        revoked_ms: row.try_get(8)?,
                    })
                })
                .collect::<Result<_, tokio_postgres::Error>>()
        }
        .await
        .map_err(query_error)?;
        rows.into_iter().map(KeyRow::into_key).collect()
    }

    pub(super) async fn insert_key(&self, key: &StoredKey) -> Result<(), StoreError> {
        let models = models_json(&key.models);
        let [rpm, tpm, max_concurrent, daily_tokens] = limit_columns(&key.limits);
        let client = self.client().await?;
        let inserted = async {
            let statement = client
                .prepare_cached(
                    "INSERT INTO api_keys (name, secret_sha256, models, rpm, tpm, max_concurrent,
                         daily_tokens, created_ms, revoked_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .await?;
            client
                .execute(
                    &statement,
                    &[
                        &key.name,
                        &&key.secret_sha256[..],
                        &models,
                        &rpm,
                        &tpm,
                        &max_concurrent,
                        &daily_tokens,
                        &key.created_ms,
                        &key.revoked_ms,
                    ],
                )
                .await
        }
        .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                let on_name = e
                    .as_db_error()
                    .and_then(|db| db.constraint())
                    .is_some_and(|constraint| constraint == "api_keys_pkey");
                Err(if on_name {
                    key_name_taken(&key.name)
                } else {
                    key_secret_taken(&key.name)
                })
            }
            Err(e) => Err(query_error(e)),
        }
    }

    pub(super) async fn update_key(
        &self,
        name: &str,
        models: &str,
        limits: &KeyLimits,
    ) -> Result<bool, StoreError> {
        let [rpm, tpm, max_concurrent, daily_tokens] = limit_columns(limits);
        let updated = self
            .execute(
                "UPDATE api_keys
                 SET models = $1, rpm = $2, tpm = $3, max_concurrent = $4, daily_tokens = $5
                 WHERE name = $6 AND revoked_ms IS NULL",
                &[&models, &rpm, &tpm, &max_concurrent, &daily_tokens, &name],
            )
            .await?;
        Ok(updated > 0)
    }

    pub(super) async fn prune_usage(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.execute(
            "DELETE FROM usage_log WHERE ctid = ANY(ARRAY(\
             SELECT ctid FROM usage_log WHERE at_ms < $1 LIMIT $2))",
            &[&before_ms, &(super::PRUNE_ROWS as i64)],
        )
        .await
    }

    pub(super) async fn revoke_key(&self, name: &str, at_ms: i64) -> Result<bool, StoreError> {
        let revoked = self
            .execute(
                "UPDATE api_keys SET revoked_ms = $1 WHERE name = $2 AND revoked_ms IS NULL",
                &[&at_ms, &name],
            )
            .await?;
        Ok(revoked > 0)
    }

    /// Runs one statement, prepared once per connection; returns the rows it changed.
    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        let client = self.client().await?;
        async {
            let statement = client.prepare_cached(sql).await?;
            client.execute(&statement, params).await
        }
        .await
        .map_err(query_error)
    }

    pub(super) fn pool_stats(&self) -> PoolStats {
        self.pool.status().into()
    }
}

/// An error and its causes on one line: tokio-postgres's own messages are terse ("db error") and
/// put the useful part in the source.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn report_row(row: &Row, group_by: Option<GroupBy>) -> Result<UsageRow, tokio_postgres::Error> {
    Ok(UsageRow {
        group: match group_by {
            None => None,
            Some(GroupBy::Hour) => Some(report::rfc3339(row.try_get(0)?)),
            Some(_) => row.try_get(0)?,
        },
        requests: to_u64(row.try_get(1)?),
        errors: to_u64(row.try_get(2)?),
        prompt_tokens: to_u64(row.try_get(3)?),
        completion_tokens: to_u64(row.try_get(4)?),
        cached_tokens: to_u64(row.try_get(5)?),
        estimated: to_u64(row.try_get(6)?),
        cache_hits: to_u64(row.try_get(7)?),
        p50_latency_ms: row.try_get(8)?,
        p99_latency_ms: row.try_get(9)?,
        p50_ttft_ms: row.try_get(10)?,
    })
}

/// Tells the server's state (connection lost, shutting down, out of resources) from a statement
/// it refused.
fn query_error(error: tokio_postgres::Error) -> StoreError {
    let reason = describe(&error);
    let unavailable = match error.code() {
        // Classes 08 (connection exception), 53 (insufficient resources), 57 (operator
        // intervention: shutdown, cancel).
        Some(code) => ["08", "53", "57"]
            .iter()
            .any(|class| code.code().starts_with(class)),
        None => {
            error.is_closed()
                || std::error::Error::source(&error).is_some_and(|s| s.is::<std::io::Error>())
        }
    };
    if unavailable {
        StoreError::Unavailable(format!("PostgreSQL: {reason}"))
    } else {
        StoreError::Query(reason)
    }
}

/// The records as `COPY ... FROM STDIN BINARY` data, in the column order of
/// [`PostgresStore::insert_usage`]: PostgreSQL's binary copy format (its manual, "COPY", "Binary
/// Format": a signature, two 32-bit zeros, then per row a 16-bit field count and each field as a
/// 32-bit length, -1 for NULL, and its bytes in network order; a count of -1 ends the data).
/// Written here rather than through `BinaryCopyInWriter`, which formats each field through `ToSql`
/// and awaits each row: ~3,000 instructions a record, a tenth of a JSON request's whole cost in
/// the gateway, against a few hundred.
fn copy_binary(records: &[UsageRecord]) -> BytesMut {
    const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
    const FIELDS: i16 = 15;
    let mut out = BytesMut::with_capacity(SIGNATURE.len() + 10 + records.len() * 192);
    out.put_slice(SIGNATURE);
    out.put_i32(0);
    out.put_i32(0);
    for r in records {
        out.put_i16(FIELDS);
        put_int8(&mut out, r.at_ms);
        put_text(&mut out, Some(&r.request_id));
        put_text(&mut out, r.key.as_deref());
        put_text(&mut out, r.model.as_deref());
        put_text(&mut out, r.endpoint.as_deref());
        put_int4(&mut out, i32::from(r.status));
        put_int8(&mut out, to_i64(r.usage.prompt));
        put_int8(&mut out, to_i64(r.usage.completion));
        put_int8(&mut out, to_i64(r.usage.cached));
        put_bool(&mut out, r.usage.estimated);
        match r.ttft_ms {
            Some(ttft) => put_float8(&mut out, ttft),
            None => out.put_i32(-1),
        }
        put_float8(&mut out, r.latency_ms);
        put_bool(&mut out, r.cache_hit);
        put_int4(&mut out, i32::try_from(r.retries).unwrap_or(i32::MAX));
        put_text(&mut out, r.error);
    }
    out.put_i16(-1);
    out
}

fn put_int8(out: &mut BytesMut, v: i64) {
    out.put_i32(8);
    out.put_i64(v);
}

fn put_int4(out: &mut BytesMut, v: i32) {
    out.put_i32(4);
    out.put_i32(v);
}

fn put_float8(out: &mut BytesMut, v: f64) {
    out.put_i32(8);
    out.put_f64(v);
}

fn put_bool(out: &mut BytesMut, v: bool) {
    out.put_i32(1);
    out.put_u8(u8::from(v));
}

/// PostgreSQL's text cannot hold NUL, which a client's model name may (escaped in its JSON), so
/// NULs become U+FFFD; a batch PostgreSQL refused would be dropped whole.
fn put_text(out: &mut BytesMut, v: Option<&str>) {
    let Some(text) = v else {
        out.put_i32(-1);
        return;
    };
    if memchr::memchr(0, text.as_bytes()).is_some() {
        put_text(out, Some(&text.replace('\0', "\u{fffd}")));
        return;
    }
    // A length that does not fit is a batch PostgreSQL refuses (and the log counts), never a
    // panic; nothing that reaches the log is near 2 GiB.
    out.put_i32(i32::try_from(text.len()).unwrap_or(i32::MAX));
    out.put_slice(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::super::tests::{exercise_keys, exercise_usage, settings};
    use super::super::Store;

    const DATABASE: &str = "nanogate_store_test";

    /// The copy data's layout, field by field, as PostgreSQL reads it.
    #[test]
    fn copy_binary_writes_postgres_binary_format() {
        use crate::usage::{TokenUsage, UsageRecord};
        use std::sync::Arc;
        let record = UsageRecord {
            at_ms: 1_764_300_000_123,
            request_id: "req-1".into(),
            key: Some(Arc::from("team-a")),
            model: Some("m\0x".into()),
            endpoint: None,
            status: 429,
            usage: TokenUsage {
                prompt: 12,
                completion: 3,
                cached: 8,
                estimated: true,
                cached_known: false,
            },
            ttft_ms: None,
            latency_ms: 1.5,
            cache_hit: false,
            retries: 2,
            error: Some("rate_limited"),
        };
        let data = super::copy_binary(&[record]);
        let mut expected: Vec<u8> = b"PGCOPY\n\xff\r\n\0".to_vec();
        expected.extend([0; 8]);
        expected.extend(15i16.to_be_bytes());
        let mut field = |bytes: Option<&[u8]>| match bytes {
            Some(b) => {
                expected.extend(i32::try_from(b.len()).unwrap().to_be_bytes());
                expected.extend(b);
            }
            None => expected.extend((-1i32).to_be_bytes()),
        };
        field(Some(&1_764_300_000_123i64.to_be_bytes()));
        field(Some(b"req-1"));
        field(Some(b"team-a"));
        field(Some("m\u{fffd}x".as_bytes()));
        field(None);
        field(Some(&429i32.to_be_bytes()));
        field(Some(&12i64.to_be_bytes()));
        field(Some(&3i64.to_be_bytes()));
        field(Some(&8i64.to_be_bytes()));
        field(Some(&[1]));
        field(None);
        field(Some(&1.5f64.to_be_bytes()));
        field(Some(&[0]));
        field(Some(&2i32.to_be_bytes()));
        field(Some(b"rate_limited"));
        expected.extend((-1i16).to_be_bytes());
        assert_eq!(&data[..], &expected[..]);
    }

    async fn open(url: &str, max_queries_per_connection: u64) -> Store {
        let mut settings = settings(url);
        settings.max_queries_per_connection = max_queries_per_connection;
        Store::open(&settings).await.unwrap().unwrap()
    }

    /// Runs against the server `NANOGATE_TEST_PG_URL` names
    /// (`postgres://user@host:port/database`), in a database of its own that it creates first
    /// and drops after.
    #[actix_rt::test]
    #[ignore = "needs a PostgreSQL server: set NANOGATE_TEST_PG_URL"]
    async fn keeps_usage_and_keys_in_postgres() {
        let url = std::env::var("NANOGATE_TEST_PG_URL").expect("NANOGATE_TEST_PG_URL");
        let Store::Postgres(admin) = open(&url, 50_000).await else {
            unreachable!()
        };
        let admin = admin.client().await.unwrap();
        let drop_database = format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)");
        admin.batch_execute(&drop_database).await.unwrap();
        let create_database = format!("CREATE DATABASE {DATABASE}");
        admin.batch_execute(&create_database).await.unwrap();
        let (server, _) = url.split('?').next().unwrap().rsplit_once('/').unwrap();
        let test_url = format!("{server}/{DATABASE}");

        // Two gateways starting at once: each migration applied once.
        let (a, b) = (open(&test_url, 50_000).await, open(&test_url, 3).await);
        let (migrated_a, migrated_b) = tokio::join!(a.migrate(), b.migrate());
        migrated_a.unwrap();
        migrated_b.unwrap();
        a.migrate().await.unwrap();
        let Store::Postgres(pg) = &a else {
            unreachable!()
        };
        let client = pg.client().await.unwrap();
        let migrations: i64 = client
            .query_one("SELECT COUNT(*) FROM schema_migrations", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(migrations, super::super::schema::MIGRATIONS.len() as i64);
        let sessions: i64 = client
            .query_one(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = 'nanogate'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(sessions >= 2, "{sessions}");
        drop(client);

        a.warm().await.unwrap();
        assert_eq!(a.pool_stats().size, 2);
        exercise_usage(&a).await;
        // b retires each connection after three uses.
        exercise_keys(&b).await;
        assert_eq!(a.retire_idle(), 0);

        drop((a, b));
        let drop_database = format!("DROP DATABASE {DATABASE} WITH (FORCE)");
        admin.batch_execute(&drop_database).await.unwrap();
    }
}
