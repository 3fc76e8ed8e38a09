//! The operator's views: liveness, readiness, the models on offer, `/stats` (one JSON section
//! per actor, as each actor reports itself) and `/metrics` (Prometheus text).

use std::sync::atomic::Ordering;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use nanogate_actors::metrics::RenderPrometheus;
use nanogate_actors::GetStats;
use serde_json::{json, Value};

use super::auth::authenticate;
use super::AppState;
use crate::error::GatewayError;

pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Ready when at least one backend is healthy and the gateway is not shutting down.
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let table = state.view.table();
    let healthy = table.endpoints.iter().filter(|e| e.is_healthy()).count();
    let stopping = state.shutting_down.load(Ordering::Relaxed);
    let ready = healthy > 0 && !stopping;
    let body = json!({"ready": ready, "shutting_down": stopping, "healthy_endpoints": healthy, "endpoints": table.endpoints.len()});
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("retry-after", "1"))
            .json(body)
    }
}

/// A model in OpenAI's shape.
fn model(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "nanogate"})
}

/// The union of the models the healthy backends serve, in the OpenAI list shape; with keys on,
/// only those the caller's key may use.
pub async fn models(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, GatewayError> {
    let key = authenticate(state.keys.as_deref(), &req)?;
    let data: Vec<Value> = state
        .view
        .table()
        .served_models()
        .iter()
        .filter(|id| key.as_ref().is_none_or(|k| k.allows(id)))
        .map(|id| model(id))
        .collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})))
}

/// One model, answered from the gateway's own list (as `client.models.retrieve` expects): 404
/// `model_not_found` when no healthy backend serves it (or the caller's key may not use it).
pub async fn one_model(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, GatewayError> {
    let key = authenticate(state.keys.as_deref(), &req)?;
    let id = id.into_inner();
    let allowed = key.as_ref().is_none_or(|k| k.allows(&id));
    if allowed && state.view.table().served_models().contains(&id) {
        Ok(HttpResponse::Ok().json(model(&id)))
    } else {
        Err(GatewayError::ModelNotFound(id))
    }
}

/// The sections of `/stats`, in order: one per actor, and the ingress's own counters.
const SECTIONS: [&str; 7] = [
    "ingress",
    "pool",
    "balancer",
    "health",
    "cache",
    "metrics",
    "usage_log",
];

async fn section(state: &AppState, name: &str) -> Option<Value> {
    let answer = match name {
        "ingress" => {
            return Some(json!({
                "connections": state.connections.stats(),
                "request_bodies": state.body_limits.budget.stats(),
            }))
        }
        "pool" => state.pool.send(GetStats).await,
        "balancer" => state.balancer.send(GetStats).await,
        "health" => state.health.send(GetStats).await,
        "cache" => state.cache.send(GetStats).await,
        "usage_log" => match &state.usage_log {
            Some(log) => log.send(GetStats).await,
            None => return Some(json!({"store": "off"})),
        },
        "metrics" => state.metrics.addr().send(GetStats).await,
        _ => return None,
    };
    Some(answer.map_or_else(
        |e| json!({"error": format!("the {name} actor did not answer: {e}")}),
        |stats| stats.0,
    ))
}

pub async fn stats(state: web::Data<AppState>) -> HttpResponse {
    let values = futures_util::future::join_all(SECTIONS.iter().map(|n| section(&state, n))).await;
    let body: serde_json::Map<String, Value> = SECTIONS
        .iter()
        .zip(values)
        .map(|(name, value)| (name.to_string(), value.unwrap_or(Value::Null)))
        .collect();
    HttpResponse::Ok().json(body)
}

pub async fn stats_of(
    state: web::Data<AppState>,
    actor: web::Path<String>,
) -> Result<HttpResponse, GatewayError> {
    match section(&state, &actor).await {
        Some(value) => Ok(HttpResponse::Ok().json(value)),
        None => Err(GatewayError::UnknownRoute {
            method: "GET".into(),
            path: format!("/stats/{actor} (sections: {})", SECTIONS.join(", ")),
        }),
    }
}

/// `/metrics` in the format the scraper asks for: OpenMetrics when its `Accept` names
/// `application/openmetrics-text` (Prometheus does when configured to), else the classic text
/// format that every tool reads (promtool, the Python client's parser).
pub async fn metrics(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, GatewayError> {
    let openmetrics = req.headers().get_all(header::ACCEPT).any(|v| {
        v.to_str()
            .is_ok_and(|v| v.contains("application/openmetrics-text"))
    });
    let text = state
        .metrics
        .addr()
        .send(RenderPrometheus { openmetrics })
        .await
        .map_err(|e| GatewayError::Internal(format!("the metrics actor did not answer: {e}")))?;
    let content_type = if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    };
    Ok(HttpResponse::Ok().content_type(content_type).body(text))
}
