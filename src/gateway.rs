//! Wiring: starts the actors under supervisors on one control-plane arbiter, then the actix-web
//! server whose per-thread factory builds each thread's worker pool and upstream client. Used by
//! `nanogate serve`, `nanogate demo` and the integration tests alike.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::{Arbiter, Supervisor};
use actix_cors::Cors;
use actix_web::dev::ServerHandle;
use actix_web::middleware::Condition;
use actix_web::{web, App, HttpServer};
use nanogate_actors::balancer::Balancer;
use nanogate_actors::buffers::Buffers;
use nanogate_actors::cache::Cache;
use nanogate_actors::clock;
use nanogate_actors::health_checker::HealthChecker;
use nanogate_actors::metrics::Metrics;
use nanogate_actors::policy::PolicyKind;
use nanogate_actors::pool_supervisor::{Admission, PoolSupervisor};
use nanogate_actors::report::Reporters;
use nanogate_actors::retry_budget::RetryBudget;
use nanogate_actors::worker::{WorkerPool, WorkerPoolConfig};

use crate::config::{AuthMode, Config, ConfigError, CorsSettings};
use crate::ingress::connections::ConnectionLimit;
use crate::ingress::request::BodyLimits;
use crate::ingress::{self, AppState};
use nanogate_actors::clock::unix_ms;
use nanogate_actors::keys::{digest, ApiKey, KeyRegistry, KeySource};
use nanogate_actors::store::{Store, StoreError};
use nanogate_actors::usage_log::{Flush, UsageLog, UsageLogCounters};

/// Descriptors kept for everything but client and upstream connections: listeners, the runtime's
/// epoll and event descriptors, health probes and load scrapes (up to two per endpoint), logs.
const RESERVED_FILES: usize = 768;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("configuration key `usage.database`: {0}")]
    Usage(StoreError),
}

/// A running gateway.
pub struct Gateway {
    pub addr: SocketAddr,
    pub state: AppState,
    server: ServerHandle,
    running: actix_rt::task::JoinHandle<io::Result<()>>,
    control: Arbiter,
    shutdown_delay: Duration,
}

/// Longest a stopping gateway waits for the usage log to write what it holds.
const USAGE_FLUSH_WAIT: Duration = Duration::from_secs(5);

impl Gateway {
    /// Validates `config`, starts the actors and the HTTP server on the current actix system.
    /// Signals are not handled here (see `signals`), so tests can run many gateways at once.
    pub async fn start(mut config: Config) -> Result<Self, StartError> {
        config.validate()?;
        let listen = config.listen_addr()?;
        let (client_connections, upstream_connections) = connection_limits(&config)?;
        config.upstream.max_connections = upstream_connections;
        let connections = ConnectionLimit::new(client_connections, config.server.ops_connections);
        let buffers = Buffers::new(
            config.server.body_buffer_bytes,
            config.cache.fill_buffer_bytes,
        );
        let (store, migrated) = open_store(&config).await?;
        let keys = match config.auth.mode {
            AuthMode::Off => None,
            AuthMode::Keys => Some(key_registry(&config, store.as_ref(), migrated).await?),
        };
        let control = Arbiter::new();
        let arbiter = control.handle();
        let clock = clock::system();

        let admission = Admission::new(&config.pool);
        let retry_budget = RetryBudget::new(
            config.upstream.retry_ratio,
            config.upstream.retry_min_concurrency,
        );
        let balancer = Balancer::new(
            config.balancer.clone(),
            &config.endpoints,
            clock.clone(),
            retry_budget.clone(),
        );
        let view = balancer.view();
        let balancer = Supervisor::start_in_arbiter(&arbiter, move |_| balancer);
        let pool = {
            let (settings, admission) = (config.pool.clone(), admission.clone());
            Supervisor::start_in_arbiter(&arbiter, move |_| {
                PoolSupervisor::new(settings, admission)
            })
        };
        let health = {
            let (settings, view, balancer) =
                (config.health.clone(), view.clone(), balancer.clone());
            Supervisor::start_in_arbiter(&arbiter, move |_| {
                HealthChecker::new(settings, view, balancer)
            })
        };
        let cache = {
            let (settings, clock, fills) = (
                config.cache.clone(),
                clock.clone(),
                buffers.cache_fills.clone(),
            );
            Supervisor::start_in_arbiter(&arbiter, move |_| Cache::new(settings, clock, fills))
        };
        let usage_log = store.clone().map(|store| {
            let counters = Arc::new(UsageLogCounters::default());
            let (settings, shared) = (config.usage.log(), counters.clone());
            let log = Supervisor::start_in_arbiter(&arbiter, move |_| {
                UsageLog::new(store, settings, migrated, shared)
            });
            (log, counters)
        });
        let mut metrics = Metrics::new(
            clock,
            view.clone(),
            admission.clone(),
            buffers.clone(),
            retry_budget.clone(),
        );
        if let Some((log, counters)) = &usage_log {
            metrics = metrics.with_usage_log(log.clone(), counters.clone());
        }
        let metrics = metrics.start_in(&arbiter);
        let usage_log = usage_log.map(|(log, _)| log);

        let state = AppState {
            view: view.clone(),
            balancer: balancer.clone(),
            pool,
            health: health.clone(),
            cache,
            cache_enabled: config.cache.enabled,
            cache_fills: buffers.cache_fills.clone(),
            max_cache_entry_bytes: config.cache.max_entry_bytes,
            metrics: metrics.clone(),
            body_limits: BodyLimits {
                max_bytes: config.server.max_body_bytes,
                total: Duration::from_millis(config.server.body_timeout_ms),
                idle: Duration::from_millis(config.server.body_idle_timeout_ms),
                budget: buffers.request_bodies.clone(),
            },
            connections: connections.clone(),
            affinity: config.affinity.clone(),
            prefix_blocks: if config.balancer.policy == PolicyKind::CacheAware {
                config.balancer.prefix_max_blocks
            } else {
                0
            },
            request_timeout: Duration::from_millis(config.upstream.request_timeout_ms),
            admin_authorization: (!config.admin.token.is_empty())
                .then(|| digest(format!("Bearer {}", config.admin.token).as_bytes())),
            shutting_down: Arc::new(AtomicBool::new(false)),
            keys,
            store,
            usage_log,
            stream_usage: config.usage.stream_usage,
            cache_shared: config.cache.shared,
        };
        let reporters = Reporters {
            balancer,
            view,
            metrics,
        };
        let threads = config.worker_threads();
        let client_stall = Duration::from_millis(config.server.client_stall_timeout_ms);
        let pools = WorkerPoolConfig {
            admission,
            reporters,
            settings: config.upstream.clone(),
            hedge: config.hedge.clone(),
            retry_budget,
            health: health.clone(),
            buffers,
            client_stall,
            threads,
            homes: Default::default(),
        };
        let app_state = web::Data::new(state.clone());
        let cors = config.cors.clone();
        let server = HttpServer::new(move || {
            App::new()
                .wrap(Condition::new(
                    !cors.allowed_origins.is_empty(),
                    cors_policy(&cors),
                ))
                // Outermost, so it also holds what the CORS middleware refuses itself.
                .wrap(ingress::unread::HoldUnread)
                .app_data(app_state.clone())
                .app_data(web::Data::new(WorkerPool::new(pools.clone())))
                .configure(ingress::routes)
        })
        .workers(threads)
        .backlog(config.server.backlog)
        .max_connections(connections.per_thread(threads))
        .keep_alive(Duration::from_secs(config.server.keep_alive_secs))
        .client_request_timeout(Duration::from_millis(config.server.head_timeout_ms))
        // A client that closes its side of the connection has gone: the request it left is
        // dropped at once, which releases its pool slot or queue place and cancels the upstream
        // request, at any stage (nginx and HAProxy's `abortonclose` read a close the same way).
        .h1_allow_half_closed(false)
        .shutdown_timeout(config.server.shutdown_grace_secs)
        .on_connect(move |connection, data| {
            let tcp = connection.downcast_ref::<actix_web::rt::net::TcpStream>();
            let peer = tcp.and_then(|tcp| tcp.peer_addr().ok()).map(|a| a.ip());
            data.insert(connections.open(peer));
            if let Some(tcp) = tcp {
                // Responses are written as they come (SSE chunks, a body's last bytes): Nagle's
                // algorithm would hold small writes back for the client's delayed ACK, up to 40 ms.
                let _ = tcp.set_nodelay(true);
                // A client that stops reading (its window stays closed) or vanishes without a
                // word is dropped by the kernel after the stall timeout, which frees what its
                // connection holds (nginx's send_timeout): actix has no write timeout of its own.
                let _ = socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(client_stall));
            }
        })
        .disable_signals();
        let server = server.bind(listen).map_err(|source| StartError::Bind {
            addr: listen,
            source,
        })?;
        let addr = server.addrs().first().copied().unwrap_or(listen);
        let server = server.run();
        let handle = server.handle();
        let running = actix_rt::spawn(server);
        Ok(Self {
            addr,
            state,
            server: handle,
            running,
            control,
            shutdown_delay: Duration::from_millis(config.server.shutdown_delay_ms),
        })
    }

    /// The base URL, e.g. `http://127.0.0.1:8080`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Runs until the server stops (on a signal, for the service).
    pub async fn wait(self) -> io::Result<()> {
        let result = match self.running.await {
            Ok(result) => result,
            Err(e) => Err(io::Error::other(e)),
        };
        flush_usage(&self.state).await;
        self.control.stop();
        result
    }

    /// Stops the server, letting in-flight requests finish when `graceful`.
    pub async fn stop(self, graceful: bool) {
        self.server.stop(graceful).await;
        flush_usage(&self.state).await;
        self.control.stop();
    }

    /// A handle that begins the graceful shutdown from elsewhere (a signal handler, a test):
    /// `/ready` turns 503, no new connections are accepted, and in-flight requests get
    /// `server.shutdown_grace_secs` to finish before the server stops.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            server: self.server.clone(),
            shutting_down: self.state.shutting_down.clone(),
            delay: self.shutdown_delay,
        }
    }
}

#[derive(Clone)]
pub struct ShutdownHandle {
    server: ServerHandle,
    shutting_down: Arc<AtomicBool>,
    delay: Duration,
}

impl ShutdownHandle {
    /// Turns `/ready` 503, keeps serving for `server.shutdown_delay_ms` so load balancers take
    /// the instance out, then stops accepting and waits for in-flight requests (at most
    /// `server.shutdown_grace_secs`).
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        actix_rt::time::sleep(self.delay).await;
        self.server.stop(true).await;
    }
}

/// Writes what the usage log still holds, for at most [`USAGE_FLUSH_WAIT`] (a database that is
/// down by then loses what is buffered, and the log says how many), and closes the database.
async fn flush_usage(state: &AppState) {
    write_usage(state).await;
    if let Some(store) = &state.store {
        store.close();
    }
}

async fn write_usage(state: &AppState) {
    let Some(log) = &state.usage_log else {
        return;
    };
    let until = std::time::Instant::now() + USAGE_FLUSH_WAIT;
    while std::time::Instant::now() < until {
        match log.send(Flush).await {
            Ok(0) | Err(_) => return,
            Ok(_) => actix_rt::time::sleep(Duration::from_millis(20)).await,
        }
    }
    if let Ok(left) = log.send(Flush).await {
        log::error!("usage log: {left} records not written at shutdown (the database did not take them in time)");
    }
}

/// The usage log's database, and whether its schema is in place. SQLite that cannot be opened
/// or migrated stops the start, naming the file; PostgreSQL that does not answer does not:
/// routing does not depend on the log, which buffers and migrates once the server answers.
async fn open_store(config: &Config) -> Result<(Option<Store>, bool), StartError> {
    let settings = config.usage.database();
    let Some(store) = Store::open(&settings).await.map_err(StartError::Usage)? else {
        return Ok((None, false));
    };
    let wait = Duration::from_millis(settings.connect_timeout_ms.saturating_mul(2));
    let migrated = match tokio::time::timeout(wait, store.migrate()).await {
        Ok(Ok(())) => {
            if let Err(e) = store.warm().await {
                log::warn!("usage log: opening usage.pool_min_connections connections failed: {e}");
            }
            true
        }
        Ok(Err(e)) if store.kind() == "sqlite" => return Err(StartError::Usage(e)),
        Ok(Err(e)) => {
            log::error!("usage log: the {} database is not available ({e}); starting anyway, records are buffered (usage.buffer_records) and keys made through the admin API load once it answers", store.kind());
            false
        }
        Err(_) => {
            log::error!("usage log: the {} database did not answer in {wait:?}; starting anyway, records are buffered (usage.buffer_records) and keys made through the admin API load once it answers", store.kind());
            false
        }
    };
    Ok((Some(store), migrated))
}

/// The keys of `[[keys]]`, and those the admin API made (from the database; when it is down at
/// start they load in the background once it answers).
async fn key_registry(
    config: &Config,
    store: Option<&Store>,
    migrated: bool,
) -> Result<Arc<KeyRegistry>, StartError> {
    let registry = Arc::new(KeyRegistry::default());
    for (i, spec) in config.keys.iter().enumerate() {
        let mut stored = spec.resolve(i)?;
        stored.created_ms = unix_ms();
        registry
            .insert(ApiKey::new(stored, KeySource::Config))
            .map_err(|e| ConfigError::Invalid {
                key: format!("keys[{i}]"),
                reason: e.to_string(),
            })?;
    }
    if store.is_none() && registry.is_empty() {
        log::warn!(
            "[auth] mode = \"keys\" with no [[keys]] and usage.database = \"off\" (where the \
             admin API keeps the keys it makes): every API request will be refused with 401"
        );
    }
    if let Some(store) = store {
        if migrated {
            sync_stored_keys(store, &registry).await;
        }
        // Gateways sharing a database see each other's keys (made, changed, revoked) within
        // KEYS_SYNC_EVERY; one whose database was down at start loads them once it answers.
        let (store, registry) = (store.clone(), registry.clone());
        actix_rt::spawn(async move {
            while !store.is_closed() {
                actix_rt::time::sleep(KEYS_SYNC_EVERY).await;
                if !store.is_closed() && store.migrate().await.is_ok() {
                    sync_stored_keys(&store, &registry).await;
                }
            }
        });
    }
    Ok(registry)
}

/// How often the admin API's keys are read back from the database.
const KEYS_SYNC_EVERY: Duration = Duration::from_secs(10);

/// Brings `registry` in line with the database's keys.
async fn sync_stored_keys(store: &Store, registry: &KeyRegistry) {
    match store.load_keys().await {
        Ok(keys) => {
            let changed = registry.sync(keys);
            if changed > 0 {
                log::info!(
                    "keys: {changed} keys taken from the {} database",
                    store.kind()
                );
            }
        }
        Err(e) => log::error!("keys: reading the admin API's keys failed ({e}); retrying"),
    }
}

/// The CORS policy of `[cors]`: the allowed origins, any method and request header (the OpenAI
/// SDKs send several of their own), and the gateway's response headers exposed to the page.
fn cors_policy(settings: &CorsSettings) -> Cors {
    let mut cors = Cors::default()
        .allow_any_method()
        .allow_any_header()
        .expose_headers([
            "x-request-id",
            "x-nanogate-endpoint",
            "x-nanogate-cache",
            "retry-after",
        ])
        .max_age(settings.max_age_secs);
    for origin in &settings.allowed_origins {
        cors = if origin == "*" {
            cors.allow_any_origin()
        } else {
            cors.allowed_origin(origin)
        };
    }
    cors
}

/// How many client connections (for API requests) and upstream connections the gateway may hold:
/// as configured, or (0) what the open-file limit allows once [`RESERVED_FILES`] are set aside,
/// half each since every proxied request holds one of both. A configuration that cannot fit in
/// the limit is refused, naming the key.
fn connection_limits(config: &Config) -> Result<(usize, usize), ConfigError> {
    let files = usize::try_from(raise_open_file_limit()).unwrap_or(usize::MAX);
    let available = files.saturating_sub(RESERVED_FILES).max(64);
    let ops = config.server.ops_connections;
    let client = match config.server.max_connections {
        0 => (available / 2).saturating_sub(ops).max(1),
        n => n,
    };
    let upstream = match config.upstream.max_connections {
        0 => available.saturating_sub(client + ops).max(1),
        n => n,
    };
    if client + ops + upstream > available {
        return Err(ConfigError::Invalid {
            key: "server.max_connections".into(),
            reason: format!(
                "{client} client + {ops} ops (server.ops_connections) + {upstream} upstream \
                 (upstream.max_connections) connections do not fit in the open-file limit of \
                 {files} (with {RESERVED_FILES} kept for listeners, probes and logs); lower them \
                 or leave them at 0 to size them from the limit"
            ),
        });
    }
    Ok((client, upstream))
}

/// Raises this process's open-file limit to the hard limit, so thousands of client and upstream
/// sockets fit whatever the shell's soft limit was. Returns the limit in force.
pub fn raise_open_file_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            log::warn!("could not raise the open-file limit: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    }
}
