//! Configuration: `config/default.toml` (embedded, so the binary always has every default), then
//! the file given with `--config`, then `NANOGATE__SECTION__KEY` environment variables, read into
//! typed structs and validated in one place so a mistake stops start-up with the key's name.

use std::net::SocketAddr;
use std::path::Path;

use actix_web::http::header::HeaderName;
use actix_web::http::Uri;
use nanogate_actors::balancer::BalancerSettings;
use nanogate_actors::cache::CacheSettings;
use nanogate_actors::endpoint::{EndpointSpec, MAX_ENDPOINTS};
use nanogate_actors::health_checker::HealthSettings;
use nanogate_actors::keys::{digest, KeyLimits, StoredKey};
use nanogate_actors::pool_supervisor::PoolSettings;
use nanogate_actors::store::DatabaseSettings;
use nanogate_actors::usage_log::UsageLogSettings;
use nanogate_actors::worker::{HedgeSettings, UpstreamSettings};
use serde::Deserialize;

/// The documented defaults, compiled in.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub pool: PoolSettings,
    pub balancer: BalancerSettings,
    pub health: HealthSettings,
    pub cache: CacheSettings,
    pub hedge: HedgeSettings,
    pub affinity: AffinitySettings,
    pub admin: AdminSettings,
    pub cors: CorsSettings,
    pub auth: AuthSettings,
    pub usage: UsageSettings,
    #[serde(default)]
    pub keys: Vec<KeySpec>,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
}

/// Who may use the gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub mode: AuthMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Off,
    Keys,
}

/// A key from `[[keys]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    pub name: String,
    #[serde(default)]
    pub secret: Option<String>,
    /// The environment variable that holds the secret (kept out of the file).
    #[serde(default)]
    pub secret_env: Option<String>,
    #[serde(default)]
    pub models: Vec<String>,
    /// Signed, so that a negative limit is refused by name rather than by a parse error.
    #[serde(default)]
    pub rpm: Option<i64>,
    #[serde(default)]
    pub tpm: Option<i64>,
    #[serde(default)]
    pub max_concurrent: Option<i64>,
    #[serde(default)]
    pub daily_tokens: Option<i64>,
}

impl KeySpec {
    /// The key as stored, its secret read (from the environment if so configured) and hashed.
    pub fn resolve(&self, index: usize) -> Result<StoredKey, ConfigError> {
        let at = |field: &str| format!("keys[{index}].{field}");
        if !valid_key_name(&self.name) {
            return Err(invalid(
                at("name"),
                format!(
                    "'{}' must be 1 to 64 letters, digits, '-', '_' or '.'",
                    self.name
                ),
            ));
        }
        let secret = match (&self.secret, &self.secret_env) {
            (Some(secret), None) => secret.clone(),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                invalid(
                    at("secret_env"),
                    format!("the environment variable {var} is not set"),
                )
            })?,
            _ => {
                return Err(invalid(
                    at("secret"),
                    "give exactly one of secret and secret_env",
                ))
            }
        };
        if secret.len() < 8 {
            return Err(invalid(at("secret"), "must be at least 8 characters"));
        }
        let limits = key_limits(
            [self.rpm, self.tpm, self.max_concurrent, self.daily_tokens],
            |field| at(field),
        )?;
        Ok(StoredKey {
            name: self.name.clone(),
            secret_sha256: digest(secret.as_bytes()),
            models: self.models.clone(),
            limits,
            created_ms: 0,
            revoked_ms: None,
        })
    }
}

/// A key's name: what the admin API's URLs, `/metrics` labels and the usage log carry.
pub fn valid_key_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Limits in the order rpm, tpm, max_concurrent, daily_tokens; each at least 1 when set.
pub fn key_limits(
    values: [Option<i64>; 4],
    key: impl Fn(&str) -> String,
) -> Result<KeyLimits, ConfigError> {
    const FIELDS: [&str; 4] = ["rpm", "tpm", "max_concurrent", "daily_tokens"];
    let mut checked = [None; 4];
    for ((field, value), out) in FIELDS.iter().zip(values).zip(&mut checked) {
        *out = match value {
            None => None,
            Some(v) if v >= 1 => Some(v as u64),
            Some(v) => {
                return Err(invalid(
                    key(field),
                    format!("{v} is not a limit: it must be at least 1 (leave it out for none)"),
                ))
            }
        };
    }
    Ok(KeyLimits {
        rpm: checked[0],
        tpm: checked[1],
        max_concurrent: checked[2],
        daily_tokens: checked[3],
    })
}

/// The longest `usage.retention_days` (a hundred years: longer is a typo, not a policy).
const MAX_RETENTION_DAYS: u64 = 36_500;

/// `[usage]`: the usage log, its database and pool, and token accounting of streams.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageSettings {
    pub database: String,
    pub batch_records: usize,
    pub flush_interval_ms: u64,
    pub buffer_records: usize,
    pub retry_interval_ms: u64,
    pub retention_days: u64,
    pub stream_usage: bool,
    pub pool_min_connections: usize,
    pub pool_max_connections: usize,
    pub max_queries_per_connection: u64,
    pub idle_timeout_secs: u64,
    pub acquire_timeout_ms: u64,
    pub connect_timeout_ms: u64,
}

impl UsageSettings {
    pub fn database(&self) -> DatabaseSettings {
        DatabaseSettings {
            database: self.database.clone(),
            pool_min_connections: self.pool_min_connections,
            pool_max_connections: self.pool_max_connections,
            max_queries_per_connection: self.max_queries_per_connection,
            idle_timeout_secs: self.idle_timeout_secs,
            acquire_timeout_ms: self.acquire_timeout_ms,
            connect_timeout_ms: self.connect_timeout_ms,
        }
    }

    pub fn log(&self) -> UsageLogSettings {
        UsageLogSettings {
            batch_records: self.batch_records,
            flush_interval_ms: self.flush_interval_ms,
            buffer_records: self.buffer_records,
            retry_interval_ms: self.retry_interval_ms,
            retention_days: self.retention_days,
        }
    }
}

/// Which browser origins may call the gateway (CORS); none by default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsSettings {
    /// Origins such as `https://chat.example.com`, or `*` for any.
    pub allowed_origins: Vec<String>,
    /// How long a browser may keep a preflight's answer.
    pub max_age_secs: usize,
}

/// Where a request's affinity key comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AffinitySettings {
    /// Session headers, the first present wins; parsed once here rather than on every request.
    #[serde(deserialize_with = "header_names")]
    pub headers: Vec<HeaderName>,
    pub prefix_bytes: usize,
}

fn header_names<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<HeaderName>, D::Error> {
    Vec::<String>::deserialize(d)?
        .into_iter()
        .map(|name| {
            HeaderName::try_from(name.as_str()).map_err(|_| {
                serde::de::Error::custom(format!("'{name}' is not a valid HTTP header name"))
            })
        })
        .collect()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Empty: the admin routes are off.
    pub token: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: String,
    pub workers: usize,
    pub max_body_bytes: usize,
    /// Request bodies held at once over all requests (being read, or waiting to go upstream).
    pub body_buffer_bytes: usize,
    /// Client connections carrying API requests; 0: as many as the open-file limit allows.
    pub max_connections: usize,
    /// Connections beyond `max_connections` that may still reach /health, /ready, /metrics and
    /// /stats.
    pub ops_connections: usize,
    pub backlog: u32,
    pub keep_alive_secs: u64,
    /// Time for a client to send a request's head.
    pub head_timeout_ms: u64,
    /// Time for a client to send a whole request body, and the longest pause within it.
    pub body_timeout_ms: u64,
    pub body_idle_timeout_ms: u64,
    /// Longest a client may leave its response unread (the relay full) before it is cut off.
    pub client_stall_timeout_ms: u64,
    pub shutdown_delay_ms: u64,
    pub shutdown_grace_secs: u64,
}

/// The largest prefix index an endpoint may have: 12 bytes per block.
const MAX_PREFIX_INDEX_BLOCKS: usize = 1 << 22;

impl Config {
    /// Defaults, then `file`, then the environment; not yet validated.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            if !path.exists() {
                return Err(invalid(
                    "--config",
                    format!("file {} does not exist", path.display()),
                ));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("NANOGATE")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        Ok(builder.build()?.try_deserialize()?)
    }

    /// The defaults alone, for the embedded demo and tests.
    pub fn defaults() -> Self {
        toml_defaults().expect("the embedded config/default.toml is valid")
    }

    /// Checks what types cannot: ranges, addresses, URLs, and that there is a backend.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        let s = &self.server;
        if s.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", "must be at least 1"));
        }
        if s.body_buffer_bytes < s.max_body_bytes {
            return Err(invalid(
                "server.body_buffer_bytes",
                format!(
                    "{} is below server.max_body_bytes ({}): no request of the largest size could be read",
                    s.body_buffer_bytes, s.max_body_bytes
                ),
            ));
        }
        for (key, value) in [
            ("server.head_timeout_ms", s.head_timeout_ms),
            ("server.body_timeout_ms", s.body_timeout_ms),
            ("server.body_idle_timeout_ms", s.body_idle_timeout_ms),
            ("server.client_stall_timeout_ms", s.client_stall_timeout_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        for (i, origin) in self.cors.allowed_origins.iter().enumerate() {
            let valid = origin == "*"
                || (origin.starts_with("http://") || origin.starts_with("https://"))
                    && origin.parse::<Uri>().is_ok()
                    && !origin.ends_with('/');
            if !valid {
                return Err(invalid(
                    format!("cors.allowed_origins[{i}]"),
                    format!("'{origin}' is not an origin like https://app.example.com (or *)"),
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, key) in self.keys.iter().enumerate() {
            key.resolve(i)?;
            if !names.insert(key.name.as_str()) {
                return Err(invalid(
                    format!("keys[{i}].name"),
                    format!("'{}' names another key too", key.name),
                ));
            }
        }
        let u = &self.usage;
        let database = u.database.as_str();
        let known_store = database == "off"
            || database.starts_with("sqlite:")
            || database.starts_with("postgres://")
            || database.starts_with("postgresql://");
        if !known_store || database == "sqlite:" {
            // Only what comes before "://": the rest may hold a password.
            let scheme = database.split("://").next().unwrap_or_default();
            return Err(invalid(
                "usage.database",
                format!("'{scheme}...' is not sqlite:PATH, postgres://... or off"),
            ));
        }
        for (key, value) in [
            ("usage.batch_records", u.batch_records as u64),
            ("usage.flush_interval_ms", u.flush_interval_ms),
            ("usage.buffer_records", u.buffer_records as u64),
            ("usage.retry_interval_ms", u.retry_interval_ms),
            ("usage.pool_max_connections", u.pool_max_connections as u64),
            (
                "usage.max_queries_per_connection",
                u.max_queries_per_connection,
            ),
            ("usage.acquire_timeout_ms", u.acquire_timeout_ms),
            ("usage.connect_timeout_ms", u.connect_timeout_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if u.pool_min_connections > u.pool_max_connections {
            return Err(invalid(
                "usage.pool_min_connections",
                format!(
                    "{} is above usage.pool_max_connections ({})",
                    u.pool_min_connections, u.pool_max_connections
                ),
            ));
        }
        if u.retention_days > MAX_RETENTION_DAYS {
            return Err(invalid(
                "usage.retention_days",
                format!("must be at most {MAX_RETENTION_DAYS} (0 keeps every record)"),
            ));
        }
        if u.buffer_records < u.batch_records {
            return Err(invalid(
                "usage.buffer_records",
                "must be at least usage.batch_records",
            ));
        }
        let c = &self.cache;
        if c.max_entry_bytes == 0 || c.max_entry_bytes > c.fill_buffer_bytes {
            return Err(invalid(
                "cache.max_entry_bytes",
                "must be at least 1 and at most cache.fill_buffer_bytes",
            ));
        }
        let p = &self.pool;
        if p.min_workers == 0 {
            return Err(invalid("pool.min_workers", "must be at least 1"));
        }
        if p.max_workers < p.min_workers {
            return Err(invalid(
                "pool.max_workers",
                format!(
                    "{} is below pool.min_workers ({})",
                    p.max_workers, p.min_workers
                ),
            ));
        }
        if !(p.shrink_below < p.grow_above && p.shrink_below >= 0.0) {
            return Err(invalid(
                "pool.shrink_below",
                "must be at least 0 and below pool.grow_above",
            ));
        }
        if p.resize_interval_ms == 0 {
            return Err(invalid("pool.resize_interval_ms", "must be at least 1"));
        }
        let b = &self.balancer;
        let h = &self.hedge;
        if !(0.0..=1.0).contains(&h.max_share) {
            return Err(invalid("hedge.max_share", "must be in [0, 1]"));
        }
        if h.min_ms > h.max_ms {
            return Err(invalid("hedge.min_ms", "must be at most hedge.max_ms"));
        }
        if b.success_factor.is_nan() || b.success_factor < 1.0 {
            return Err(invalid("balancer.success_factor", "must be at least 1.0"));
        }
        if !(b.failure_factor > 0.0 && b.failure_factor <= 1.0) {
            return Err(invalid("balancer.failure_factor", "must be in (0, 1]"));
        }
        if !(b.min_weight > 0.0 && b.min_weight <= b.max_weight && b.max_weight.is_finite()) {
            return Err(invalid(
                "balancer.min_weight",
                "must be above 0 and at most balancer.max_weight, which must be finite",
            ));
        }
        if b.mailbox == 0 {
            return Err(invalid("balancer.mailbox", "must be at least 1"));
        }
        if b.affinity_load_factor.is_nan() || b.affinity_load_factor < 1.0 {
            return Err(invalid(
                "balancer.affinity_load_factor",
                "must be at least 1.0",
            ));
        }
        if b.eject_after_failures == 0 {
            return Err(invalid(
                "balancer.eject_after_failures",
                "must be at least 1",
            ));
        }
        if b.prefix_index_max_blocks > MAX_PREFIX_INDEX_BLOCKS {
            return Err(invalid(
                "balancer.prefix_index_max_blocks",
                format!("must be at most {MAX_PREFIX_INDEX_BLOCKS} (48 MiB per endpoint)"),
            ));
        }
        if b.prefix_index_blocks > b.prefix_index_max_blocks {
            return Err(invalid(
                "balancer.prefix_index_blocks",
                "must be at most balancer.prefix_index_max_blocks",
            ));
        }
        if b.max_ejection_cooldown_ms < b.ejection_cooldown_ms {
            return Err(invalid(
                "balancer.max_ejection_cooldown_ms",
                "must be at least balancer.ejection_cooldown_ms",
            ));
        }
        let h = &self.health;
        if h.interval_ms == 0 || h.timeout_ms == 0 {
            return Err(invalid(
                "health.interval_ms",
                "health.interval_ms and health.timeout_ms must be at least 1",
            ));
        }
        if h.rise == 0 || h.fall == 0 {
            return Err(invalid(
                "health.rise",
                "health.rise and health.fall must be at least 1",
            ));
        }
        let u = &self.upstream;
        if u.attempts == 0 {
            return Err(invalid("upstream.attempts", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&u.retry_ratio) {
            return Err(invalid("upstream.retry_ratio", "must be between 0 and 1"));
        }
        // Infinite (as one might write to turn overdue probes off) or past `u64::MAX` seconds
        // once multiplied, it made no `Duration` and every forwarded request panicked.
        if !(u.overdue_multiple.is_finite() && u.overdue_multiple >= 1.0) {
            return Err(invalid(
                "upstream.overdue_multiple",
                "must be a finite number, at least 1 (the p95 itself)",
            ));
        }
        for (key, value) in [
            ("upstream.idle_timeout_ms", u.idle_timeout_ms),
            ("upstream.request_timeout_ms", u.request_timeout_ms),
            ("upstream.first_byte_timeout_ms", u.first_byte_timeout_ms),
            ("upstream.connect_timeout_ms", u.connect_timeout_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(invalid(
                "endpoints",
                format!(
                    "{} configured; at most {MAX_ENDPOINTS} are supported",
                    self.endpoints.len()
                ),
            ));
        }
        if self.endpoints.is_empty() {
            return Err(invalid(
                "endpoints",
                "no backend configured: add an [[endpoints]] table with a url (or use --backends)",
            ));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            check_endpoint(e, &format!("endpoints[{i}]"))?;
        }
        Ok(())
    }

    /// Only the `[[endpoints]]` of `file`, validated: what SIGHUP reloads.
    pub fn reload_endpoints(file: &Path) -> Result<Vec<EndpointSpec>, ConfigError> {
        let config = Self::load(Some(file))?;
        config.validate()?;
        Ok(config.endpoints)
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.listen.parse().map_err(|e| {
            invalid(
                "server.listen",
                format!(
                    "'{}' is not an address like 127.0.0.1:8080 ({e})",
                    self.server.listen
                ),
            )
        })
    }

    /// HTTP worker threads, resolving 0 to the number of cores.
    pub fn worker_threads(&self) -> usize {
        match self.server.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }
}

/// Checks one endpoint spec; `key` names it in the message (`endpoints[2]`, or the admin body).
pub fn check_endpoint(e: &EndpointSpec, key: &str) -> Result<(), ConfigError> {
    let url_key = format!("{key}.url");
    if !e.url.starts_with("http://") {
        return Err(invalid(
            url_key,
            format!("'{}' must start with http://", e.url),
        ));
    }
    let uri: Uri = e
        .url
        .parse()
        .map_err(|err| invalid(&url_key, format!("'{}' is not a valid URL: {err}", e.url)))?;
    let Some(authority) = uri.authority() else {
        return Err(invalid(url_key, format!("'{}' has no host", e.url)));
    };
    if authority.as_str().contains('@') {
        return Err(invalid(
            url_key,
            format!(
                "'{}' carries credentials in the URL; give the key as api_key instead",
                e.url
            ),
        ));
    }
    if authority.host().is_empty() {
        return Err(invalid(url_key, format!("'{}' has no host", e.url)));
    }
    if uri.query().is_some() || e.url.contains('#') {
        return Err(invalid(
            url_key,
            format!("'{}' must be a base URL without query or fragment", e.url),
        ));
    }
    if !(e.weight > 0.0 && e.weight.is_finite()) {
        return Err(invalid(format!("{key}.weight"), "must be above 0"));
    }
    if e.cache_blocks.is_some_and(|b| b > MAX_PREFIX_INDEX_BLOCKS) {
        return Err(invalid(
            format!("{key}.cache_blocks"),
            format!("must be at most {MAX_PREFIX_INDEX_BLOCKS} (48 MiB)"),
        ));
    }
    Ok(())
}

fn toml_defaults() -> Result<Config, config::ConfigError> {
    config::Config::builder()
        .add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ))
        .build()?
        .try_deserialize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_actor_defaults() {
        let c = Config::defaults();
        assert_eq!(c.pool, PoolSettings::default());
        assert_eq!(c.balancer, BalancerSettings::default());
        assert_eq!(c.health, HealthSettings::default());
        assert_eq!(c.cache, CacheSettings::default());
        assert_eq!(c.upstream, UpstreamSettings::default());
        assert_eq!(c.server.max_body_bytes, 32 * 1024 * 1024);
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = Config::defaults();
        let message = c.validate().unwrap_err().to_string();
        assert!(message.contains("`endpoints`"), "{message}");
        c.endpoints.push(EndpointSpec::new("ftp://x"));
        let message = c.validate().unwrap_err().to_string();
        assert!(message.contains("endpoints[0].url"), "{message}");
        for bad in [
            "http://a b/",
            "http://user:pw@host:8000",
            "http://",
            "http://h/?x=1",
        ] {
            c.endpoints[0].url = bad.into();
            let message = c.validate().unwrap_err().to_string();
            assert!(message.contains("endpoints[0].url"), "{bad}: {message}");
        }
        c.endpoints[0].url = "http://127.0.0.1:9000".into();
        c.validate().unwrap();
        c.pool.max_workers = 1;
        let message = c.validate().unwrap_err().to_string();
        assert!(message.contains("pool.max_workers"), "{message}");
        c.pool.max_workers = 100;
        c.hedge.max_share = 1.5;
        let message = c.validate().unwrap_err().to_string();
        assert!(message.contains("hedge.max_share"), "{message}");
        c.hedge.max_share = 0.05;
        c.usage.retention_days = 100_000;
        let message = c.validate().unwrap_err().to_string();
        assert!(message.contains("usage.retention_days"), "{message}");
        c.usage.retention_days = 0;
        c.validate().unwrap();
        c.hedge.min_ms = 5000;
        let message = c.validate().unwrap_err().to_string();
        assert!(message.contains("hedge.min_ms"), "{message}");
        c.hedge.min_ms = 50;
        c.balancer.max_weight = f64::INFINITY;
        let message = c.validate().unwrap_err().to_string();
        assert!(message.contains("balancer.min_weight"), "{message}");
        c.balancer.max_weight = Config::defaults().balancer.max_weight;
        for bad in [f64::INFINITY, f64::NAN, 0.5] {
            c.upstream.overdue_multiple = bad;
            let message = c.validate().unwrap_err().to_string();
            assert!(message.contains("upstream.overdue_multiple"), "{message}");
        }
        c.upstream.overdue_multiple = 3.0;
        c.server.listen = "nowhere".into();
        let message = c.validate().unwrap_err().to_string();
        assert!(message.contains("server.listen"), "{message}");
    }

    #[test]
    fn a_bad_affinity_header_is_named() {
        let dir = std::env::temp_dir().join(format!("nanogate-config-h-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[affinity]\nheaders = [\"not a header\"]\n").unwrap();
        let message = Config::load(Some(&bad)).unwrap_err().to_string();
        assert!(
            message.contains("header") && message.contains("not a valid HTTP header name"),
            "{message}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_file_overrides_defaults_and_unknown_or_mistyped_keys_are_named() {
        let dir = std::env::temp_dir().join(format!("nanogate-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(
            &good,
            "[server]\nlisten = \"127.0.0.1:9999\"\n[[endpoints]]\nurl = \"http://127.0.0.1:9101\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&good)).unwrap();
        c.validate().unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:9999");
        assert_eq!(c.pool.min_workers, 10);
        let typo = dir.join("typo.toml");
        std::fs::write(&typo, "[pool]\nmin_wokers = 3\n").unwrap();
        let message = Config::load(Some(&typo)).unwrap_err().to_string();
        assert!(message.contains("min_wokers"), "{message}");
        let mistyped = dir.join("mistyped.toml");
        std::fs::write(&mistyped, "[pool]\nmin_workers = \"many\"\n").unwrap();
        let message = Config::load(Some(&mistyped)).unwrap_err().to_string();
        assert!(message.contains("min_workers"), "{message}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn keys_and_the_usage_log_are_checked_by_name() {
        let mut c = Config::defaults();
        c.endpoints.push(EndpointSpec::new("http://127.0.0.1:9000"));
        let key = KeySpec {
            name: "team-a".into(),
            secret: Some("ng-0123456789".into()),
            secret_env: None,
            models: Vec::new(),
            rpm: Some(60),
            tpm: None,
            max_concurrent: None,
            daily_tokens: None,
        };
        c.keys = vec![key.clone()];
        c.validate().unwrap();
        let cases: [(KeySpec, &str); 5] = [
            (
                KeySpec {
                    rpm: Some(0),
                    ..key.clone()
                },
                "keys[0].rpm",
            ),
            (
                KeySpec {
                    tpm: Some(-5),
                    ..key.clone()
                },
                "keys[0].tpm",
            ),
            (
                KeySpec {
                    secret: None,
                    ..key.clone()
                },
                "keys[0].secret",
            ),
            (
                KeySpec {
                    secret: None,
                    secret_env: Some("NANOGATE_TEST_UNSET_SECRET".into()),
                    ..key.clone()
                },
                "keys[0].secret_env",
            ),
            (
                KeySpec {
                    name: "a b".into(),
                    ..key.clone()
                },
                "keys[0].name",
            ),
        ];
        for (bad, named) in cases {
            c.keys = vec![bad];
            let message = c.validate().unwrap_err().to_string();
            assert!(message.contains(named), "{named}: {message}");
        }
        c.keys = vec![key.clone(), key];
        let message = c.validate().unwrap_err().to_string();
        assert!(message.contains("keys[1].name"), "{message}");
        c.keys.clear();
        for (database, ok) in [
            ("off", true),
            ("sqlite:/tmp/x.db", true),
            ("postgres://u@h/db", true),
            ("mysql://h/db", false),
            ("sqlite:", false),
        ] {
            c.usage.database = database.into();
            let result = c.validate();
            assert_eq!(result.is_ok(), ok, "{database}: {result:?}");
            if !ok {
                assert!(result.unwrap_err().to_string().contains("usage.database"));
            }
        }
    }
}
