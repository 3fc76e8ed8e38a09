//! The ingress: actix-web routes. It validates and classifies each OpenAI request
//! ([`request`]), answers from the cache or hands it to this thread's worker pool ([`proxy`]),
//! and serves the operator's views: `/health`, `/ready`, `/v1/models`, `/stats`, `/metrics`
//! ([`status`]) and the token-protected `/admin/endpoints` ([`admin`]).

pub mod admin;
pub mod connections;
pub mod path;
pub mod proxy;
pub mod request;
pub mod status;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use nanogate_actors::balancer::{Balancer, BalancerView};
use nanogate_actors::buffers::ByteBudget;
use nanogate_actors::cache::Cache;
use nanogate_actors::health_checker::HealthChecker;
use nanogate_actors::metrics::{Cause, MetricsHandle, Observe};
use nanogate_actors::pool_supervisor::PoolSupervisor;

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
}

impl AppState {
    /// Records a request the gateway answered itself (an error, or a cache hit when `cause` is
    /// `None`).
    pub fn observe_local(
        &self,
        started: Instant,
        status: u16,
        cause: Option<Cause>,
        model: Option<String>,
    ) {
        self.metrics.observe(Observe {
            endpoint: None,
            model,
            status,
            cause,
            latency: started.elapsed(),
            ttft: None,
            inter_token: None,
            cache_hit: cause.is_none(),
        });
    }
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
