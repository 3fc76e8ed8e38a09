//! The proxy routes: validate, answer from the cache when allowed, else forward through this
//! thread's worker pool and stream the backend's answer back as it arrives.

use std::borrow::Cow;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use actix_web::body::SizedStream;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::{ConnectionType, Method, StatusCode, Version};
use actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder, ResponseError};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use nanogate_actors::account::{Account, Admitted};
use nanogate_actors::cache::{CachedResponse, FillGuard, Key, Lookup, LookupResult};
use nanogate_actors::error::ForwardError;
use nanogate_actors::exchange::{has_known_length, Exchange, ExchangeBody, RelayError, StreamEnd};
use nanogate_actors::keys::ApiKey;
use nanogate_actors::limiter::RateState;
use nanogate_actors::metrics::{Cause, Observe, RequestFacts};
use nanogate_actors::response_homes;
use nanogate_actors::worker::{UpstreamRequest, WorkerPool};
use sha2::{Digest, Sha256};

use super::auth::{self, authenticate, KEY_HEADERS};
use super::connections::{admit, ConnectionSlot, PeerHeaders};
use super::path::normalize_v1;
use super::request::{
    classify_with_blocks, client_timeouts, named_model, read_body, with_stream_usage, Classified,
    Operation, TIMEOUT_HEADER,
};
use super::AppState;
use crate::error::{rate_limit_headers, GatewayError};
use nanogate_actors::clock::unix_ms;

/// Response header saying whether the cache answered (`hit`) or was filled (`miss`).
pub const CACHE_HEADER: &str = "x-nanogate-cache";
/// Response header naming the endpoint (its id, as in `/stats` and `/admin/endpoints`) that answered.
pub const ENDPOINT_HEADER: &str = "x-nanogate-endpoint";
/// The request's id, taken from the client or made up, on every answer and upstream request.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Request headers that make an answer someone's own: a cached answer is shared only between
/// requests that carry the same values. Every credential header a client SDK sends and the
/// gateway forwards when keys are off: OpenAI's (and its organization and project), Anthropic's
/// `x-api-key`, Azure OpenAI's `api-key`, Gemini's `x-goog-api-key`.
const CREDENTIAL_HEADERS: [HeaderName; 6] = [
    header::AUTHORIZATION,
    HeaderName::from_static("openai-organization"),
    HeaderName::from_static("openai-project"),
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
    HeaderName::from_static("x-goog-api-key"),
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
    let mut answered = Answered::new(request_id(&req));
    let early = before_body(&req, &state)
        .and_then(|key| Ok((key, normalize_v1(req.method().as_str(), req.uri().path())?)));
    let (key, path) = match early {
        Ok(checked) => checked,
        Err(refusal) => return answered.finish(&state, Err(refusal)),
    };
    // An OpenAI route spelled otherwise (`/v1//chat/completions`) is that route, with its
    // accounting: passed through, its stream's usage went uncounted and the key's token limits
    // unenforced.
    let operation = Operation::ALL
        .into_iter()
        .find(|op| req.method() == Method::POST && op.path() == path);
    if let Some(operation) = operation {
        let response = serve(operation, &req, payload, &state, &pool, &mut answered, key).await;
        return answered.finish(&state, response);
    }
    let answer = async {
        answered.key = key.as_ref().map(|k| k.name.clone());
        let (body, _reservation) = read_body(req.headers(), payload, &state.body_limits).await?;
        // Only `model`: the body is never built as a `serde_json::Value` (16 times its size).
        let model = named_model(&body).unwrap_or_default();
        // A passed-through route under keys must name a model the key may use: without one the
        // backend would pick its own (any model, for a key that may use only some), and the
        // stateful routes (files, batches, stored responses) are shared by every key, since all
        // reach the backend with its own key. Only a POST: a GET or DELETE of a stored object
        // (`/v1/files`, `/v1/batches/{id}`) ignores any body, model or not, and would reach any
        // key's objects.
        if key.is_some() && (model.is_empty() || req.method() != Method::POST) {
            return Err(GatewayError::ModelRequired(path));
        }
        let admitted = answered.admit(key, &model)?;
        if !model.is_empty() && !state.view.table().knows_model(&model) {
            return Err(GatewayError::ModelNotFound(model));
        }
        let response = response_homes::id_in_path(&path).map(str::to_string);
        let path = match req.uri().query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        let prompt_bytes = body.len();
        let mut upstream = upstream_request(
            &req,
            &state,
            req.method().clone(),
            path.into(),
            body,
            model,
            &answered.request_id,
        );
        upstream.openai_route = false;
        upstream.response = response;
        upstream.stream_end = StreamEnd::BodyEnd;
        upstream.account = Account {
            key: admitted,
            at_ms: answered.at_ms,
            strip_usage: false,
            prompt_bytes,
            estimate: false,
        };
        Ok(relay(&req, pool.forward(upstream).await?))
    };
    let response = answer.await;
    answered.finish(&state, response)
}

/// The OpenAI routes; which one is in the route's data.
pub async fn openai(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    pool: Pool,
) -> HttpResponse {
    let mut answered = Answered::new(request_id(&req));
    let key = match before_body(&req, &state) {
        Ok(key) => key,
        Err(refusal) => return answered.finish(&state, Err(refusal)),
    };
    let response = match req.app_data::<Operation>() {
        Some(&operation) => {
            serve(operation, &req, payload, &state, &pool, &mut answered, key).await
        }
        None => Err(GatewayError::Internal("route without an operation".into())),
    };
    answered.finish(&state, response)
}

/// The checks made before a request's body is read: a connection place, then its key. (A chunked
/// body left unread by a refusal here is held until the answer is out: [`super::unread`].)
fn before_body(req: &HttpRequest, state: &AppState) -> Result<Option<Arc<ApiKey>>> {
    admit(req)?;
    authenticate(state.keys.as_deref(), req)
}

/// What the handler learns of a request as it goes: for the record of an answer the gateway
/// gives itself, and for the headers of every answer.
struct Answered {
    started: Instant,
    at_ms: i64,
    request_id: HeaderValue,
    key: Option<Arc<str>>,
    rate: Option<RateState>,
}

impl Answered {
    fn new(request_id: HeaderValue) -> Self {
        Self {
            started: Instant::now(),
            at_ms: unix_ms(),
            request_id,
            key: None,
            rate: None,
        }
    }

    /// Admits the request under its key (when keys are on), keeping the limits' state for the
    /// answer's headers.
    fn admit(&mut self, key: Option<Arc<ApiKey>>, model: &str) -> Result<Option<Arc<Admitted>>> {
        let Some(key) = key else {
            return Ok(None);
        };
        let (admitted, rate) = auth::admit(key, model)?;
        self.rate = Some(rate);
        Ok(Some(admitted))
    }

    /// Records the gateway's own answer (a backend's is recorded when its relay ends) and adds
    /// the request id and the key's rate-limit headers.
    fn finish(self, state: &AppState, response: Result<HttpResponse>) -> HttpResponse {
        let mut response = response.unwrap_or_else(|error| {
            self.local(
                state,
                error.status_code().as_u16(),
                Some(error.cause()),
                None,
            );
            error.error_response()
        });
        let headers = response.headers_mut();
        if let Some(rate) = &self.rate {
            rate_limit_headers(headers, rate);
        }
        headers.insert(REQUEST_ID, self.request_id);
        response
    }

    fn local(&self, state: &AppState, status: u16, cause: Option<Cause>, model: Option<String>) {
        state.metrics.observe(Observe {
            endpoint: None,
            model,
            status,
            cause,
            latency: self.started.elapsed(),
            ttft: None,
            inter_token: None,
            cache_hit: cause.is_none(),
            usage: None,
            key: self.key.clone(),
            request: RequestFacts {
                id: Some(self.request_id.clone()),
                at_ms: self.at_ms,
                retries: 0,
            },
        });
    }
}

async fn serve(
    operation: Operation,
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    pool: &Pool,
    answered: &mut Answered,
    key: Option<Arc<ApiKey>>,
) -> Result<HttpResponse> {
    answered.key = key.as_ref().map(|k| k.name.clone());
    let (body, _reservation) = read_body(req.headers(), payload, &state.body_limits).await?;
    let Classified {
        model,
        cacheable,
        affinity,
        stream,
        blocks,
        stream_usage,
        prompt_bytes,
        previous_response,
    } = classify_with_blocks(
        operation,
        &body,
        req.headers(),
        &state.affinity,
        state.prefix_blocks,
    )?;
    let admitted = answered.admit(key, &model)?;
    if !state.view.table().knows_model(&model) {
        return Err(GatewayError::ModelNotFound(model));
    }
    let cache_key = (cacheable && state.cache_enabled)
        .then(|| cache_key(operation, req, state, answered, &body));
    // The stream's usage chunk, asked for on the client's behalf (see `with_stream_usage`).
    let asked = (stream
        && state.stream_usage
        && matches!(
            operation,
            Operation::ChatCompletions | Operation::Completions
        ))
    .then(|| with_stream_usage(&body, stream_usage))
    .flatten();
    let strip_usage = asked.is_some();
    let body = asked.unwrap_or(body);
    let path = Cow::Borrowed(operation.path());
    let request_id = answered.request_id.clone();
    let mut upstream = upstream_request(req, state, Method::POST, path, body, model, &request_id);
    upstream.affinity = affinity;
    upstream.response = previous_response;
    upstream.stream_end = operation.stream_end();
    upstream.stream = stream;
    upstream.blocks = blocks;
    upstream.account = Account {
        key: admitted,
        at_ms: answered.at_ms,
        strip_usage,
        prompt_bytes,
        estimate: true,
    };
    let Some(key) = cache_key else {
        return Ok(relay(req, pool.forward(upstream).await?));
    };
    let model = upstream.model.clone();
    match state.cache.send(Lookup { key }).await {
        Ok(LookupResult::Hit(hit)) => {
            answered.local(state, hit.status, None, Some(model));
            Ok(from_cache(&hit))
        }
        Ok(LookupResult::Wait(leader)) => match leader.await {
            Ok(Some(shared)) => {
                answered.local(state, shared.status, None, Some(model));
                Ok(from_cache(&shared))
            }
            _ => Ok(relay(req, pool.forward(upstream).await?)),
        },
        Ok(LookupResult::Lead(fill)) => {
            fill_cache(req, pool.forward(upstream).await?, fill, state).await
        }
        Ok(LookupResult::Disabled) | Err(_) => Ok(relay(req, pool.forward(upstream).await?)),
    }
}

fn upstream_request(
    req: &HttpRequest,
    state: &AppState,
    method: Method,
    path: Cow<'static, str>,
    body: Bytes,
    model: String,
    request_id: &HeaderValue,
) -> UpstreamRequest {
    let timeouts = client_timeouts(req.headers(), state.request_timeout);
    UpstreamRequest {
        method,
        path,
        body,
        headers: upstream_headers(req, request_id, state.keys.is_some()),
        request_id: request_id.clone(),
        model,
        openai_route: true,
        stream_end: StreamEnd::Done,
        stream: false,
        blocks: Vec::new(),
        hedge: hedge_choice(req),
        affinity: None,
        deadline: Instant::now() + timeouts.total,
        budget: timeouts.total,
        read_timeout: timeouts.read,
        head_deadline: timeouts.head.map(|head| Instant::now() + head),
        response: None,
        account: Account::default(),
    }
}

/// Request header turning hedging on or off for one request (`on` / `off`).
pub const HEDGE_HEADER: HeaderName = HeaderName::from_static("x-nanogate-hedge");

/// The client's own choice about hedging, if it made one.
fn hedge_choice(req: &HttpRequest) -> Option<bool> {
    let value = req.headers().get(HEDGE_HEADER)?.as_bytes();
    if value.eq_ignore_ascii_case(b"on") {
        Some(true)
    } else if value.eq_ignore_ascii_case(b"off") {
        Some(false)
    } else {
        None
    }
}

/// The request's id: the client's `X-Request-Id` when it sent a sane one, else a new random one.
/// It goes upstream, back on every answer, and into the log lines about the request.
fn request_id(req: &HttpRequest) -> HeaderValue {
    if let Some(id) = req.headers().get(REQUEST_ID) {
        let bytes = id.as_bytes();
        if !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(u8::is_ascii_graphic) {
            return id.clone();
        }
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let random: u128 = rand::random();
    let mut id = [0u8; 32];
    for (i, digit) in id.iter_mut().enumerate() {
        *digit = HEX[((random >> (4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_maybe_shared(Bytes::copy_from_slice(&id))
        .unwrap_or(HeaderValue::from_static("-"))
}

/// The client's headers as they go upstream: every end-to-end header (trace context, OpenAI
/// organization, project and beta, the user agent, anything a backend may use), without the
/// hop-by-hop ones (and those the client's `Connection` names), `Host` and `Content-Length`
/// (the HTTP client sets its own), `Accept-Encoding` (a compressed answer could not be checked or
/// cached), and the gateway's own request headers; with `X-Request-Id`, `X-Forwarded-For`,
/// `X-Forwarded-Proto` and `Forwarded` (RFC 7239) added for the backend's logs.
fn upstream_headers(
    req: &HttpRequest,
    request_id: &HeaderValue,
    keys_on: bool,
) -> Vec<(HeaderName, HeaderValue)> {
    let incoming = req.headers();
    let connection_lists = incoming.contains_key(header::CONNECTION);
    let named_by_connection = |name: &HeaderName| {
        incoming.get_all(header::CONNECTION).any(|v| {
            v.to_str().is_ok_and(|list| {
                list.split(',')
                    .any(|token| token.trim().eq_ignore_ascii_case(name.as_str()))
            })
        })
    };
    let mut headers = Vec::with_capacity(incoming.len() + 4);
    let (mut forwarded_for, mut forwarded, mut proto) = (None, None, false);
    for (name, value) in incoming.iter() {
        if *name == header::FORWARDED {
            forwarded = Some(value);
        } else if *name == X_FORWARDED_FOR {
            forwarded_for = Some(value);
        } else if *name == X_FORWARDED_PROTO {
            proto = true;
        }
        let own = name.as_str().starts_with("x-nanogate-")
            || name.as_str() == TIMEOUT_HEADER
            || *name == REQUEST_ID;
        let dropped = own
            || (keys_on && KEY_HEADERS.contains(name))
            || hop_by_hop(name)
            || *name == header::HOST
            || *name == header::ACCEPT_ENCODING
            || *name == header::EXPECT
            || *name == header::FORWARDED
            || *name == X_FORWARDED_FOR
            || (connection_lists && named_by_connection(name));
        if !dropped {
            headers.push((name.clone(), value.clone()));
        }
    }
    headers.push((REQUEST_ID, request_id.clone()));
    if let Some(peer) = req
        .conn_data::<ConnectionSlot>()
        .and_then(|s| s.peer.as_ref())
    {
        // The peer's own values were worked out when it connected; a proxy in front of the
        // gateway may have sent earlier hops, which the peer is appended to.
        let appended =
            |earlier: Option<&HeaderValue>, element: &dyn Fn() -> String, own: &HeaderValue| {
                match earlier.and_then(|v| v.to_str().ok()) {
                    Some(earlier) => HeaderValue::from_str(&format!("{earlier}, {}", element()))
                        .unwrap_or_else(|_| own.clone()),
                    None => own.clone(),
                }
            };
        headers.push((
            X_FORWARDED_FOR,
            appended(forwarded_for, &|| peer.ip.to_string(), &peer.forwarded_for),
        ));
        headers.push((
            header::FORWARDED,
            appended(
                forwarded,
                &|| PeerHeaders::forwarded_element(peer.ip),
                &peer.forwarded,
            ),
        ));
    }
    if !proto {
        headers.push((X_FORWARDED_PROTO, HeaderValue::from_static("http")));
    }
    headers
}

/// The cache key: a SHA-256 digest of the route, of the caller (its API key's name in keys
/// mode, else its credential headers; nothing when `cache.shared`), and of the exact body, so
/// only byte-identical requests by the same caller share an answer. A digest, not the body: the
/// key is held twice while its answer is gathered (the cache's in-flight set and the fill's
/// guard), which with a 32 MiB body put two uncounted copies beside the one the body budget
/// counts.
fn cache_key(
    operation: Operation,
    req: &HttpRequest,
    state: &AppState,
    answered: &Answered,
    body: &[u8],
) -> Key {
    let mut credentials = Sha256::new();
    if !state.cache_shared {
        match &answered.key {
            Some(key) => credentials.update(key.as_bytes()),
            None => {
                for name in &CREDENTIAL_HEADERS {
                    if let Some(value) = req.headers().get(name) {
                        credentials.update(value.as_bytes());
                    }
                    credentials.update([0]);
                }
            }
        }
    }
    let mut key = Sha256::new();
    key.update(operation.path().as_bytes());
    key.update(b"\n");
    key.update(credentials.finalize());
    key.update(body);
    key.finalize().to_vec()
}

/// Headers that belong to one connection, not to the message, and are never relayed (either
/// way); `Content-Length` and `Date` are set anew by whoever writes the message.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authorization"
            | "proxy-authenticate"
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
        // The gateway answers browsers by its own `[cors]`: a backend's (vLLM allows any origin
        // by default) would let pages read answers the gateway's settings refuse them.
        if !hop_by_hop(name) && !name.as_str().starts_with("access-control-") {
            response.append_header((name.clone(), value.clone()));
        }
    }
    response.insert_header((ENDPOINT_HEADER, exchange.endpoint_header.clone()));
    response
}

/// Streams the backend's body to the client as it arrives (or answers with it at once when the
/// worker read it whole).
fn relay(req: &HttpRequest, mut exchange: Exchange) -> HttpResponse {
    let mut response = response_head(&exchange);
    if let ExchangeBody::Complete(body) = &mut exchange.body {
        return response.body(body.take().unwrap_or_default());
    }
    // An event stream's length is not the backend's once the relay has removed the usage chunk
    // it asked for, or ended a broken stream with an error event: it goes as it comes.
    let event_stream = exchange
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let length = exchange
        .headers
        .get(header::CONTENT_LENGTH)
        .filter(|_| !event_stream)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match length {
        Some(length) => response.body(SizedStream::new(length, exchange.body)),
        None => streaming(req, &mut response, exchange.body),
    }
}

/// A body of unknown length: chunked for HTTP/1.1, and for an HTTP/1.0 client (which has no
/// chunked encoding) written as it comes and ended by closing the connection.
fn streaming<S>(req: &HttpRequest, response: &mut HttpResponseBuilder, body: S) -> HttpResponse
where
    S: futures_util::Stream<Item = std::result::Result<Bytes, RelayError>> + 'static,
{
    let mut response = response.streaming(body);
    if req.version() == Version::HTTP_10 {
        let head = response.head_mut();
        head.no_chunking(true);
        head.set_connection_type(ConnectionType::Close);
    }
    response
}

/// Gathers the (non-streamed) answer to fill the cache, within `cache.max_entry_bytes` and the
/// gateway-wide fill buffer; stores it when it is a complete JSON success, and answers with it.
/// An answer that outgrows either limit is streamed to the client from where the gathering
/// stopped, and not cached.
async fn fill_cache(
    req: &HttpRequest,
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
            return Ok(streaming(req, &mut response, gathered.chain(exchange.body)));
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
