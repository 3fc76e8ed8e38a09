//! The ingress: actix-web routes. It validates and classifies each OpenAI request
//! ([`request`]), answers from the cache or hands it to this thread's worker pool ([`proxy`]),
//! and serves the operator's views: `/health`, `/ready`, `/v1/models`, `/stats`, `/metrics`
//! ([`status`]) and the token-protected `/admin/endpoints` ([`admin`]).

pub mod admin;
pub mod admin_keys;
pub mod auth;
pub mod connections;
pub mod path;
pub mod proxy;
pub mod request;
pub mod status;
pub mod unread;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use nanogate_actors::balancer::{Balancer, BalancerView};
use nanogate_actors::buffers::ByteBudget;
use nanogate_actors::cache::Cache;
use nanogate_actors::health_checker::HealthChecker;
use nanogate_actors::keys::KeyRegistry;
use nanogate_actors::metrics::MetricsHandle;
use nanogate_actors::pool_supervisor::PoolSupervisor;
use nanogate_actors::store::Store;
use nanogate_actors::usage_log::UsageLog;

use crate::config::AffinitySettings;
use crate::error::GatewayError;
use connections::ConnectionLimit;
use request::{BodyLimits, Operation};

/// What every handler shares, across threads.
#[derive(Clone)]
pub struct AppState {
    pub view: BalancerView,
    pub balancer: Addr<Balancer>,
    pub pool: Addr<PoolSupervisor>,
    pub health: Addr<HealthChecker>,
    pub cache: Addr<Cache>,
    pub cache_enabled: bool,
    /// Bytes gathered to fill the cache, over all requests.
    pub cache_fills: Arc<ByteBudget>,
    pub max_cache_entry_bytes: usize,
    pub metrics: MetricsHandle,
    pub body_limits: BodyLimits,
    pub connections: Arc<ConnectionLimit>,
    pub affinity: AffinitySettings,
    /// Prompt blocks keyed per request for cache-aware routing (0 under other policies).
    pub prefix_blocks: usize,
    pub request_timeout: Duration,
    /// The SHA-256 digest of `Bearer <token>` for the admin routes; `None` turns them off.
    pub admin_authorization: Option<[u8; 32]>,
    /// Set when shutdown begins: `/ready` answers 503 from then on.
    pub shutting_down: Arc<AtomicBool>,
    /// The API keys, when `[auth] mode = "keys"`.
    pub keys: Option<Arc<KeyRegistry>>,
    /// The usage log's and admin keys' database, unless `usage.database = "off"`.
    pub store: Option<Store>,
    pub usage_log: Option<Addr<UsageLog>>,
    /// Ask backends for streams' usage on the clients' behalf (`usage.stream_usage`).
    pub stream_usage: bool,
    pub cache_shared: bool,
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    for operation in Operation::ALL {
        cfg.service(
            web::resource(operation.path())
                .app_data(operation)
                .route(web::post().to(proxy::openai))
                .default_service(web::to(unknown_route)),
        );
    }
    cfg.route("/v1/models", web::get().to(status::models))
        .route("/v1/models/{id:.+}", web::get().to(status::one_model))
        .service(
            web::resource("/health")
                .route(web::get().to(status::health))
                .route(web::head().to(status::health)),
        )
        .service(
            web::resource("/ready")
                .route(web::get().to(status::ready))
                .route(web::head().to(status::ready)),
        )
        .route("/stats", web::get().to(status::stats))
        .route("/stats/{actor}", web::get().to(status::stats_of))
        .service(
            web::resource("/metrics")
                .route(web::get().to(status::metrics))
                .route(web::head().to(status::metrics)),
        )
        .configure(admin::routes)
        .service(web::resource("/v1/{rest:.*}").to(proxy::pass_through))
        .default_service(web::to(unknown_route));
}

/// What OpenAI answers for a path or method it does not serve.
async fn unknown_route(req: HttpRequest) -> HttpResponse {
    GatewayError::UnknownRoute {
        method: req.method().to_string(),
        path: req.path().to_string(),
    }
    .error_response()
}
