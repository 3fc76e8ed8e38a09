//! Wiring: starts the actors under supervisors on one control-plane arbiter, then the actix-web
//! server whose per-thread factory builds each thread's worker pool and upstream client. Used by
//! `nanogate serve`, `nanogate demo` and the integration tests alike.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::{Arbiter, Supervisor};
use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpServer};
use nanogate_actors::balancer::Balancer;
use nanogate_actors::cache::Cache;
use nanogate_actors::clock;
use nanogate_actors::health_checker::HealthChecker;
use nanogate_actors::metrics::Metrics;
use nanogate_actors::pool_supervisor::{Admission, PoolSupervisor};
use nanogate_actors::report::Reporters;
use nanogate_actors::retry_budget::RetryBudget;
use nanogate_actors::worker::WorkerPool;

use crate::config::{Config, ConfigError};
use crate::ingress::{self, AppState};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
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

impl Gateway {
    /// Validates `config`, starts the actors and the HTTP server on the current actix system.
    /// Signals are not handled here (see `signals`), so tests can run many gateways at once.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        let listen = config.listen_addr()?;
        let control = Arbiter::new();
        let arbiter = control.handle();
        let clock = clock::system();

        let admission = Admission::new(&config.pool);
        let retry_budget = Arc::new(RetryBudget::new(
            config.upstream.retry_ratio,
            config.upstream.retry_burst,
        ));
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
            let (settings, clock) = (config.cache.clone(), clock.clone());
            Supervisor::start_in_arbiter(&arbiter, move |_| Cache::new(settings, clock))
        };
        let metrics = Metrics::new(clock, view.clone(), admission.clone()).start_in(&arbiter);

        let state = AppState {
            view: view.clone(),
            balancer: balancer.clone(),
            pool,
            health,
            cache,
            cache_enabled: config.cache.enabled,
            metrics: metrics.clone(),
            max_body_bytes: config.server.max_body_bytes,
            affinity: config.affinity.clone(),
            request_timeout: Duration::from_millis(config.upstream.request_timeout_ms),
            admin_authorization: (!config.admin.token.is_empty())
                .then(|| format!("Bearer {}", config.admin.token)),
            shutting_down: Arc::new(AtomicBool::new(false)),
        };
        let reporters = Reporters {
            balancer,
            view,
            metrics,
        };
        let threads = config.worker_threads();
        let upstream = config.upstream.clone();
        let app_state = web::Data::new(state.clone());
        let server = HttpServer::new(move || {
            let pool = WorkerPool::new(
                admission.clone(),
                reporters.clone(),
                upstream.clone(),
                retry_budget.clone(),
                threads,
            );
            App::new()
                .app_data(app_state.clone())
                .app_data(web::Data::new(pool))
                .configure(ingress::routes)
        })
        .workers(threads)
        .backlog(config.server.backlog)
        .max_connections(config.server.max_connections)
        .keep_alive(Duration::from_secs(config.server.keep_alive_secs))
        .shutdown_timeout(config.server.shutdown_grace_secs)
        .on_connect(|connection, _| {
            // Responses are written as they come (SSE chunks, a body's last bytes): Nagle's
            // algorithm would hold small writes back for the client's delayed ACK, up to 40 ms.
            if let Some(tcp) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() {
                let _ = tcp.set_nodelay(true);
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
        self.control.stop();
        result
    }

    /// Stops the server, letting in-flight requests finish when `graceful`.
    pub async fn stop(self, graceful: bool) {
        self.server.stop(graceful).await;
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

/// Raises this process's open-file limit to the hard limit, so thousands of client and upstream
/// sockets fit whatever the shell's soft limit was.
pub fn raise_open_file_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            log::warn!("could not raise the open-file limit: {e}");
            0
        }
    }
}
