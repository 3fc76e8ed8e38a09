//! The proxy routes: validate, answer from the cache when allowed, else forward through this
//! thread's worker pool and stream the backend's answer back as it arrives.

use std::borrow::Cow;
use std::rc::Rc;
use std::time::Instant;

use actix_web::body::SizedStream;
use actix_web::http::header::{self, HeaderName};
use actix_web::http::{Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder, ResponseError};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use nanogate_actors::cache::{CachedResponse, FillGuard, Key, Lookup, LookupResult};
use nanogate_actors::error::ForwardError;
use nanogate_actors::exchange::{has_known_length, Exchange, ExchangeBody};
use nanogate_actors::worker::{UpstreamRequest, WorkerPool};
use sha2::{Digest, Sha256};

use super::connections::admit;
use super::path::normalize_v1;
use super::request::{classify, read_body, time_budget, Classified, Operation};
use super::AppState;
use crate::error::GatewayError;

/// Response header saying whether the cache answered (`hit`) or was filled (`miss`).
pub const CACHE_HEADER: &str = "x-nanogate-cache";
/// Response header naming the endpoint (its id, as in `/stats` and `/admin/endpoints`) that answered.
pub const ENDPOINT_HEADER: &str = "x-nanogate-endpoint";

/// Request headers that make an answer someone's own: a cached answer is shared only between
/// requests that carry the same values.
const CREDENTIAL_HEADERS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    HeaderName::from_static("openai-organization"),
    HeaderName::from_static("openai-project"),
];

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
        admit(&req)?;
        let path = normalize_v1(req.method().as_str(), req.uri().path())?;
        let (body, _reservation) = read_body(req.headers(), payload, &state.body_limits).await?;
        let model = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("model").and_then(|m| m.as_str()).map(str::to_string))
            .unwrap_or_default();
        if !model.is_empty() && !state.view.table().knows_model(&model) {
            return Err(GatewayError::ModelNotFound(model));
        }
        let path = match req.uri().query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
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
    admit(req)?;
    let (body, _reservation) = read_body(req.headers(), payload, &state.body_limits).await?;
    let Classified {
        model,
        cacheable,
        affinity,
    } = classify(operation, &body, req.headers(), &state.affinity)?;
    if !state.view.table().knows_model(&model) {
        return Err(GatewayError::ModelNotFound(model));
    }
    let key = (cacheable && state.cache_enabled).then(|| cache_key(operation, req, &body));
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
        Ok(LookupResult::Lead(fill)) => {
            fill_cache(pool.forward(upstream).await?, fill, state).await
        }
        Ok(LookupResult::Disabled) | Err(_) => Ok(relay(pool.forward(upstream).await?)),
    }
}

fn upstream_request(
    req: &HttpRequest,
    state: &AppState,
    method: Method,
    path: Cow<'static, str>,
    body: Bytes,
    model: String,
) -> UpstreamRequest {
    let budget = time_budget(req.headers(), state.request_timeout);
    UpstreamRequest {
        method,
        path,
        body,
        content_type: req.headers().get(header::CONTENT_TYPE).cloned(),
        authorization: req.headers().get(header::AUTHORIZATION).cloned(),
        model,
        openai_route: true,
        affinity: None,
        deadline: Instant::now() + budget,
        budget,
    }
}

/// The cache key: route, a digest of the credentials, and the exact body, so only byte-identical
/// requests by the same caller share an answer.
fn cache_key(operation: Operation, req: &HttpRequest, body: &[u8]) -> Key {
    let mut credentials = Sha256::new();
    for name in &CREDENTIAL_HEADERS {
        if let Some(value) = req.headers().get(name) {
            credentials.update(value.as_bytes());
        }
        credentials.update([0]);
    }
    let path = operation.path().as_bytes();
    let mut key = Vec::with_capacity(path.len() + 33 + body.len());
    key.extend_from_slice(path);
    key.push(b'\n');
    key.extend_from_slice(&credentials.finalize());
    key.extend_from_slice(body);
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

/// Gathers the (non-streamed) answer to fill the cache, within `cache.max_entry_bytes` and the
/// gateway-wide fill buffer; stores it when it is a complete JSON success, and answers with it.
/// An answer that outgrows either limit is streamed to the client from where the gathering
/// stopped, and not cached.
async fn fill_cache(
    mut exchange: Exchange,
    fill: FillGuard,
    state: &AppState,
) -> Result<HttpResponse> {
    let mut reservation = state.cache_fills.reservation();
    let mut body = BytesMut::new();
    while let Some(chunk) = exchange.body.next().await {
        let chunk = chunk.map_err(|e| {
            GatewayError::Forward(ForwardError::BadResponse {
                endpoint: exchange.endpoint,
                reason: e.to_string(),
            })
        })?;
        if body.len() + chunk.len() > state.max_cache_entry_bytes || !reservation.grow(chunk.len())
        {
            drop(fill);
            drop(reservation);
            let mut response = response_head(&exchange);
            response.insert_header((CACHE_HEADER, "miss"));
            let gathered = futures_util::stream::iter([Ok(body.freeze()), Ok(chunk)]);
            return Ok(response.streaming(gathered.chain(exchange.body)));
        }
        body.extend_from_slice(&chunk);
    }
    let body = body.freeze();
    let mut response = response_head(&exchange);
    response.insert_header((CACHE_HEADER, "miss"));
    if let Some(stored) = storable(&exchange, &body) {
        fill.fill(stored);
    }
    Ok(response.body(body))
}

/// The answer as the cache would store it, if it may be: a 2xx whose end was known (not a body
/// the backend ended by closing the connection) and a non-empty JSON body that parses.
fn storable(exchange: &Exchange, body: &Bytes) -> Option<CachedResponse> {
    let content_type = exchange
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let complete =
        matches!(exchange.body, ExchangeBody::Complete(_)) || has_known_length(&exchange.headers);
    let json = content_type.is_some_and(|t| t.starts_with("application/json"))
        && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok();
    (exchange.status.is_success() && complete && json).then(|| CachedResponse {
        status: exchange.status.as_u16(),
        content_type: content_type.map(str::to_string),
        body: body.clone(),
    })
}

fn from_cache(cached: &CachedResponse) -> HttpResponse {
    let mut response =
        HttpResponse::build(StatusCode::from_u16(cached.status).unwrap_or(StatusCode::OK));
    if let Some(content_type) = &cached.content_type {
        response.insert_header((header::CONTENT_TYPE, content_type.as_str()));
    }
    response.insert_header((CACHE_HEADER, "hit"));
    response.body(cached.body.clone())
}
