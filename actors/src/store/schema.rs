//! The schema, as numbered migrations in both dialects. A migration, once released, never
//! changes: a database records in `schema_migrations` which versions it has, and a change is a
//! new migration appended here.
//!
//! The usage log has no key of its own and one index, on time: every index is paid for on each of
//! thousands of inserts a second, and a report (by key, model or endpoint) reads a time range, which
//! that index finds; its other filters are applied to the rows of the range. In PostgreSQL the time
//! index is a BRIN index: rows arrive in time order, so a block range summary finds them at a
//! fraction of a B-tree's cost per insert. Version 1 also had a B-tree on (api_key, at_ms): it cost
//! PostgreSQL 1.3 of its 4.1 µs of CPU per row written by COPY (a third), for a report that is read
//! by a person now and then; version 2 drops it. A deployment that reports by key over long ranges
//! often can create it again (`CREATE INDEX CONCURRENTLY`) and pay that cost knowingly.
//!
//! Column names and meanings are the same in both dialects, and times are `BIGINT` Unix
//! milliseconds in both, so that one report query serves both. Unsigned counts are stored as
//! signed 64-bit integers, saturating.

/// One step of the schema.
pub(super) struct Migration {
    pub version: i64,
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

/// Created before any migration runs, in both dialects (`IF NOT EXISTS`: every start runs it).
pub(super) const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version BIGINT PRIMARY KEY,
    applied_ms BIGINT NOT NULL
)";

pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sqlite: "
        CREATE TABLE usage_log (
            at_ms INTEGER NOT NULL,
            request_id TEXT NOT NULL,
            api_key TEXT,
            model TEXT,
            endpoint TEXT,
            status INTEGER NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            cached_tokens INTEGER NOT NULL,
            estimated INTEGER NOT NULL,
            ttft_ms REAL,
            latency_ms REAL NOT NULL,
            cache_hit INTEGER NOT NULL,
            retries INTEGER NOT NULL,
            error TEXT
        );
        CREATE INDEX usage_log_at_ms ON usage_log (at_ms);
        CREATE INDEX usage_log_api_key_at_ms ON usage_log (api_key, at_ms);
        CREATE TABLE api_keys (
            name TEXT PRIMARY KEY,
            secret_sha256 BLOB NOT NULL UNIQUE,
            models TEXT NOT NULL,
            rpm INTEGER,
            tpm INTEGER,
            max_concurrent INTEGER,
            daily_tokens INTEGER,
            created_ms INTEGER NOT NULL,
            revoked_ms INTEGER
        );",
        postgres: "
        CREATE TABLE usage_log (
            at_ms BIGINT NOT NULL,
            request_id TEXT NOT NULL,
            api_key TEXT,
            model TEXT,
            endpoint TEXT,
            status INTEGER NOT NULL,
            prompt_tokens BIGINT NOT NULL,
            completion_tokens BIGINT NOT NULL,
            cached_tokens BIGINT NOT NULL,
            estimated BOOLEAN NOT NULL,
            ttft_ms DOUBLE PRECISION,
            latency_ms DOUBLE PRECISION NOT NULL,
            cache_hit BOOLEAN NOT NULL,
            retries INTEGER NOT NULL,
            error TEXT
        );
        CREATE INDEX usage_log_at_ms ON usage_log USING brin (at_ms);
        CREATE INDEX usage_log_api_key_at_ms ON usage_log (api_key, at_ms);
        CREATE TABLE api_keys (
            name TEXT PRIMARY KEY,
            secret_sha256 BYTEA NOT NULL UNIQUE,
            models TEXT NOT NULL,
            rpm BIGINT,
            tpm BIGINT,
            max_concurrent BIGINT,
            daily_tokens BIGINT,
            created_ms BIGINT NOT NULL,
            revoked_ms BIGINT
        );",
    },
    Migration {
        version: 2,
        sqlite: "DROP INDEX IF EXISTS usage_log_api_key_at_ms;",
        postgres: "DROP INDEX IF EXISTS usage_log_api_key_at_ms;",
    },
];
