//! The proxy routes: validate, answer from the cache when allowed, else forward through this
//! thread's worker pool and stream the backend's answer back as it arrives.

use std::borrow::Cow;
use std::rc::Rc;
use std::time::Instant;

use actix_web::body::SizedStream;
use actix_web::http::header::{self, HeaderName};
use actix_web::http::Method;
use actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder, ResponseError};
use bytes::BytesMut;
use futures_util::StreamExt;
use nanogate_actors::cache::{CachedResponse, FillGuard, Lookup, LookupResult};
use nanogate_actors::exchange::{Exchange, ExchangeBody};
use nanogate_actors::worker::{UpstreamRequest, WorkerPool};

use super::request::{classify, deadline, read_body, Classified, Operation};
use super::AppState;
use crate::error::GatewayError;

/// Response header saying whether the cache answered (`hit`) or was filled (`miss`).
pub const CACHE_HEADER: &str = "x-nanogate-cache";
/// Response header naming the endpoint (its id, as in `/stats` and `/admin/endpoints`) that answered.
pub const ENDPOINT_HEADER: &str = "x-nanogate-endpoint";

type Pool = web::Data<Rc<WorkerPool>>;
type Result<T> = std::result::Result<T, GatewayError>;

/// Any other `/v1/*` route goes to a backend as it is, routed by its `model` field if it has one.
pub async fn pass_through(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    pool: Pool,
) -> HttpResponse {
    let started = Instant::now();
    let answer = async {
        let body = read_body(req.headers(), payload, state.max_body_bytes).await?;
        let model = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("model").and_then(|m| m.as_str()).map(str::to_string))
            .unwrap_or_default();
        if !model.is_empty() && !state.view.table().knows_model(&model) {
            return Err(GatewayError::ModelNotFound(model));
        }
        let path = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.path().to_string(), |p| p.to_string());
        let mut upstream =
            upstream_request(&req, &state, req.method().clone(), path.into(), body, model);
        upstream.openai_route = false;
        Ok(relay(pool.forward(upstream).await?))
    };
    answer.await.unwrap_or_else(|e| fail(&state, started, e))
}

/// The OpenAI routes; which one is in the route's data.
pub async fn openai(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    pool: Pool,
) -> HttpResponse {
    let started = Instant::now();
    let Some(&operation) = req.app_data::<Operation>() else {
        return fail(
            &state,
            started,
            GatewayError::Internal("route without an operation".into()),
        );
    };
    match serve(operation, &req, payload, &state, &pool, started).await {
        Ok(response) => response,
        Err(e) => fail(&state, started, e),
    }
}

fn fail(state: &AppState, started: Instant, error: GatewayError) -> HttpResponse {
    state.observe_local(started, error.status_code().as_u16(), None, false);
    error.error_response()
}

async fn serve(
    operation: Operation,
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    pool: &Pool,
    started: Instant,
) -> Result<HttpResponse> {
    let body = read_body(req.headers(), payload, state.max_body_bytes).await?;
    let Classified {
        model,
        cacheable,
        affinity,
    } = classify(operation, &body, req.headers(), &state.affinity)?;
    if !state.view.table().knows_model(&model) {
        return Err(GatewayError::ModelNotFound(model));
    }
    let key = (cacheable && state.cache_enabled).then(|| cache_key(operation, &body));
    let path = Cow::Borrowed(operation.path());
    let mut upstream = upstream_request(req, state, Method::POST, path, body, model);
    upstream.affinity = affinity;
    let Some(key) = key else {
        return Ok(relay(pool.forward(upstream).await?));
    };
    let model = upstream.model.clone();
    match state.cache.send(Lookup { key }).await {
        Ok(LookupResult::Hit(hit)) => {
            state.observe_local(started, hit.status, Some(model), true);
            Ok(from_cache(&hit))
        }
        Ok(LookupResult::Wait(leader)) => match leader.await {
            Ok(Some(shared)) => {
                state.observe_local(started, shared.status, Some(model), true);
                Ok(from_cache(&shared))
            }
            _ => Ok(relay(pool.forward(upstream).await?)),
        },
        Ok(LookupResult::Lead(fill)) => fill_cache(pool.forward(upstream).await?, fill).await,
        Ok(LookupResult::Disabled) | Err(_) => Ok(relay(pool.forward(upstream).await?)),
    }
}

fn upstream_request(
    req: &HttpRequest,
    state: &AppState,
    method: Method,
    path: Cow<'static, str>,
    body: bytes::Bytes,
    model: String,
) -> UpstreamRequest {
    UpstreamRequest {
        method,
        path,
        body,
        content_type: req.headers().get(header::CONTENT_TYPE).cloned(),
        authorization: req.headers().get(header::AUTHORIZATION).cloned(),
        model,
        openai_route: true,
        affinity: None,
        deadline: deadline(req.headers(), state.request_timeout),
    }
}

/// The cache key: route and exact body, so only byte-identical requests share an answer.
fn cache_key(operation: Operation, body: &[u8]) -> String {
    let mut key = String::with_capacity(operation.path().len() + 1 + body.len());
    key.push_str(operation.path());
    key.push('\n');
    key.push_str(&String::from_utf8_lossy(body));
    key
}

/// Headers that belong to one connection, not to the response, and are not relayed.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-length"
            | "date"
    )
}

fn response_head(exchange: &Exchange) -> HttpResponseBuilder {
    let mut response = HttpResponse::build(exchange.status);
    for (name, value) in exchange.headers.iter() {
        if !hop_by_hop(name) {
            response.append_header((name.clone(), value.clone()));
        }
    }
    response.insert_header((ENDPOINT_HEADER, exchange.endpoint));
    response
}

/// Streams the backend's body to the client as it arrives (or answers with it at once when the
/// worker read it whole).
fn relay(mut exchange: Exchange) -> HttpResponse {
    let mut response = response_head(&exchange);
    if let ExchangeBody::Complete(body) = &mut exchange.body {
        return response.body(body.take().unwrap_or_default());
    }
    let length = exchange
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match length {
        Some(length) => response.body(SizedStream::new(length, exchange.body)),
        None => response.streaming(exchange.body),
    }
}

/// Reads the whole (non-streamed) answer, stores it when it is a success, and answers with it.
async fn fill_cache(mut exchange: Exchange, fill: FillGuard) -> Result<HttpResponse> {
    let mut body = BytesMut::new();
    while let Some(chunk) = exchange.body.next().await {
        let chunk = chunk.map_err(|e| {
            GatewayError::Forward(nanogate_actors::error::ForwardError::BadResponse {
                endpoint: exchange.endpoint.to_string(),
                reason: e.to_string(),
            })
        })?;
        body.extend_from_slice(&chunk);
    }
    let body = body.freeze();
    let mut response = response_head(&exchange);
    response.insert_header((CACHE_HEADER, "miss"));
    if exchange.status.is_success() {
        fill.fill(CachedResponse {
            status: exchange.status.as_u16(),
            content_type: exchange
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: body.clone(),
        });
    }
    Ok(response.body(body))
}

fn from_cache(cached: &CachedResponse) -> HttpResponse {
    let mut response = HttpResponse::build(
        actix_web::http::StatusCode::from_u16(cached.status)
            .unwrap_or(actix_web::http::StatusCode::OK),
    );
    if let Some(content_type) = &cached.content_type {
        response.insert_header((header::CONTENT_TYPE, content_type.as_str()));
    }
    response.insert_header((CACHE_HEADER, "hit"));
    response.body(cached.body.clone())
}
