//! Workers: reusable actors that each carry one upstream exchange at a time. Each actix-web
//! thread owns a [`WorkerPool`] (built in the `HttpServer` factory) holding its idle workers and
//! its keep-alive `awc` client, so forwarding a request never crosses threads: the request takes
//! a slot from the shared [`Admission`] gate, checks out an idle worker (starting one only when
//! the pool has grown past what this thread has made), and the worker picks an endpoint from the
//! balancer's published view and forwards. A worker goes back to the idle list when its response
//! exchange ends; workers beyond the pool size are stopped then, so a shrink takes effect.

use std::borrow::Cow;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use awc::error::SendRequestError;
use awc::http::header::{self, HeaderName, HeaderValue};
use awc::http::Method;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::buffers::RelayBytes;
use crate::endpoint::{Bits, Endpoint, PickRequest};
use crate::error::ForwardError;
use crate::exchange::{
    content_length, is_backend_failure, read_whole, relay, relay_channel, report_whole, Exchange,
    ExchangeBody, Held, RelayLimits, StreamEnd, INLINE_BODY_MAX,
};
use crate::pool_supervisor::{Admission, Permit};
use crate::report::{Reporters, ThreadReports};
use crate::retry_budget::RetryBudget;

/// Upstream connection settings; defaults documented in `config/default.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSettings {
    pub connect_timeout_ms: u64,
    /// Until the response head arrives: for a non-streamed completion that is the whole
    /// generation, so it is long by default.
    pub first_byte_timeout_ms: u64,
    /// Upstream connections open at once, over all threads. Every concurrent stream needs one
    /// (HTTP/1.1), so this bounds the streams the gateway can hold. 0 in the configuration: the
    /// gateway sizes it from the open-file limit before the pools are built.
    pub max_connections: usize,
    pub keep_alive_secs: u64,
    pub connection_lifetime_secs: u64,
    /// Longest silence between two chunks of a response body before it is given up.
    pub idle_timeout_ms: u64,
    /// Longest a whole request may take (a client's deadline header may shorten it).
    pub request_timeout_ms: u64,
    /// Endpoints tried per request when one fails before any byte reached the client
    /// (connection refused or reset, no answer within the first-byte timeout, a 5xx or 429
    /// status, garbage instead of an OpenAI answer), within the request's deadline.
    pub attempts: usize,
    /// Retries allowed per request over time, gateway-wide (the retry budget).
    pub retry_ratio: f64,
    /// Retries available at once when the budget is full.
    pub retry_burst: u32,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 2000,
            first_byte_timeout_ms: 300_000,
            max_connections: 0,
            keep_alive_secs: 30,
            connection_lifetime_secs: 300,
            idle_timeout_ms: 60_000,
            request_timeout_ms: 600_000,
            attempts: 3,
            retry_ratio: 0.2,
            retry_burst: 20,
        }
    }
}

/// A request as the worker forwards it.
pub struct UpstreamRequest {
    pub method: Method,
    /// Path and query, e.g. `/v1/chat/completions` (static for the OpenAI routes).
    pub path: Cow<'static, str>,
    pub body: Bytes,
    /// The client's end-to-end headers as they go upstream (the ingress has removed hop-by-hop
    /// and the gateway's own headers and added `X-Forwarded-For`, `Forwarded` and
    /// `X-Request-Id`); `Authorization` is replaced by the endpoint's key where it has one.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The request's id (`X-Request-Id`), for the logs.
    pub request_id: HeaderValue,
    pub model: String,
    /// Whether a 2xx answer must be JSON or SSE (the API routes); other paths pass through.
    pub openai_route: bool,
    /// How a successful stream of this route ends.
    pub stream_end: StreamEnd,
    /// Hash of the affinity key (session, user, or prompt prefix).
    pub affinity: Option<u64>,
    /// When the whole request must be done: the client's deadline or `request_timeout_ms`.
    pub deadline: Instant,
    /// The time the deadline allowed (for error messages).
    pub budget: Duration,
    /// The client's limit on each read (the head, each next chunk), when it set one.
    pub read_timeout: Option<Duration>,
}

// ===== WorkerPool =====

/// One thread's idle workers and upstream client.
pub struct WorkerPool {
    idle: RefCell<Vec<Addr<Worker>>>,
    shared: Rc<WorkerShared>,
    admission: Admission,
}

struct WorkerShared {
    client: awc::Client,
    reports: Rc<ThreadReports>,
    settings: UpstreamSettings,
    retry_budget: Arc<RetryBudget>,
    relay_bytes: Arc<RelayBytes>,
    client_stall: Duration,
}

/// What every thread's [`WorkerPool`] is built from.
#[derive(Clone)]
pub struct WorkerPoolConfig {
    pub admission: Admission,
    pub reporters: Reporters,
    pub settings: UpstreamSettings,
    pub retry_budget: Arc<RetryBudget>,
    pub buffers: Arc<crate::buffers::Buffers>,
    /// Longest a client may leave its response unread before it is cut off.
    pub client_stall: Duration,
    /// How many pools share `settings.max_connections`.
    pub threads: usize,
}

impl WorkerPool {
    /// Must be called on the HTTP thread that will use the pool (the `HttpServer` factory).
    pub fn new(config: WorkerPoolConfig) -> Rc<Self> {
        let WorkerPoolConfig {
            admission,
            reporters,
            settings,
            retry_budget,
            buffers,
            client_stall,
            threads,
        } = config;
        let connector = crate::upstream_io::connector()
            .limit((settings.max_connections / threads.max(1)).max(1))
            .timeout(Duration::from_millis(settings.connect_timeout_ms))
            .conn_keep_alive(Duration::from_secs(settings.keep_alive_secs))
            .conn_lifetime(Duration::from_secs(settings.connection_lifetime_secs));
        let client = awc::Client::builder()
            .connector(connector)
            .timeout(Duration::from_millis(settings.first_byte_timeout_ms))
            .disable_redirects()
            .no_default_headers()
            .finish();
        Rc::new(Self {
            idle: RefCell::new(Vec::new()),
            shared: Rc::new(WorkerShared {
                client,
                reports: ThreadReports::start(reporters),
                settings,
                retry_budget,
                relay_bytes: buffers.thread_relay(),
                client_stall,
            }),
            admission,
        })
    }

    /// Admits the request, hands it to an idle worker and waits for the response head; the
    /// body follows through the returned [`Exchange`].
    pub async fn forward(
        self: &Rc<Self>,
        request: UpstreamRequest,
    ) -> Result<Exchange, ForwardError> {
        let permit = self.admission.admit(request.deadline).await?;
        let worker = self.checkout();
        let (head, head_rx) = oneshot::channel();
        worker
            .try_send(Forward {
                request,
                permit,
                head,
            })
            .map_err(|_| ForwardError::WorkerGone)?;
        head_rx.await.map_err(|_| ForwardError::WorkerGone)?
    }

    fn checkout(self: &Rc<Self>) -> Addr<Worker> {
        loop {
            let idle = self.idle.borrow_mut().pop();
            match idle {
                Some(worker) if worker.connected() => return worker,
                Some(_) => continue,
                None => {
                    self.admission
                        .gate_workers()
                        .fetch_add(1, Ordering::Relaxed);
                    let pool = self.clone();
                    return Worker::create(move |_| Worker { pool });
                }
            }
        }
    }

    /// A worker finished its exchange: it waits for the next one, or stops when the pool has
    /// shrunk below the workers alive.
    fn release(&self, ctx: &mut Context<Worker>) {
        let alive = self.admission.gate_workers();
        if alive.load(Ordering::Relaxed) > self.admission.capacity() {
            alive.fetch_sub(1, Ordering::Relaxed);
            ctx.stop();
        } else {
            self.idle.borrow_mut().push(ctx.address());
        }
    }
}

// ===== Worker =====

/// Carries one request to a backend; the answer (its head, and its body whole or as a relay)
/// goes back on `head`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Forward {
    request: UpstreamRequest,
    permit: Permit,
    head: oneshot::Sender<Result<Exchange, ForwardError>>,
}

pub struct Worker {
    pool: Rc<WorkerPool>,
}

impl Actor for Worker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1);
    }
}

impl Handler<Forward> for Worker {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, msg: Forward, _ctx: &mut Self::Context) -> Self::Result {
        let shared = self.pool.shared.clone();
        let work = async move {
            let Forward {
                request,
                permit,
                mut head,
            } = msg;
            let own_idle = Duration::from_millis(shared.settings.idle_timeout_ms);
            let limits = RelayLimits {
                idle: request
                    .read_timeout
                    .map_or(own_idle, |read| read.min(own_idle)),
                idle_is_clients: request.read_timeout.is_some_and(|read| read < own_idle),
                deadline: request.deadline,
                client_stall: shared.client_stall,
                stream_end: request.stream_end,
            };
            let connected = tokio::select! {
                answer = connect(&shared, request, permit, limits) => answer,
                () = head.closed() => return,
            };
            let Connected {
                response,
                body: whole,
                held,
                started,
            } = match connected {
                Ok(connected) => connected,
                Err(error) => {
                    let _ = head.send(Err(error));
                    return;
                }
            };
            let exchange = |body| Exchange {
                status: response.status(),
                headers: response.headers().clone(),
                endpoint: held.in_flight.endpoint().id,
                endpoint_header: held.in_flight.endpoint().id_header.clone(),
                body,
            };
            if let Some(whole) = whole {
                let answer = exchange(ExchangeBody::Complete(Some(whole)));
                report_whole(held, answer.status.as_u16(), started);
                let _ = head.send(Ok(answer));
                return;
            }
            let (link, relayed) = relay_channel(&shared.relay_bytes);
            if head
                .send(Ok(exchange(ExchangeBody::Relayed(relayed))))
                .is_ok()
            {
                relay(response, link, held, started, limits).await;
            }
        };
        Box::pin(
            work.into_actor(self)
                .map(|(), this, ctx| this.pool.release(ctx)),
        )
    }
}

/// A backend's answer: its head, its whole body when it was small and not a stream, and what the
/// exchange holds until it ends.
struct Connected {
    response: awc::ClientResponse,
    body: Option<Bytes>,
    held: Held,
    started: Instant,
}

/// Whether a response is read whole before the head goes back: not a stream, and small.
fn inline(response: &awc::ClientResponse) -> bool {
    let sse = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"));
    !sse && content_length(response).is_some_and(|l| l <= INLINE_BODY_MAX)
}

/// Picks an endpoint and sends the request, trying another endpoint when one fails before any
/// byte could reach the client (within the per-request attempt limit and the gateway-wide retry
/// budget); returns the response with its head read, and its body too when it is small and not
/// a stream, so that a backend failing in the middle of such a body is retried as well.
async fn connect(
    shared: &WorkerShared,
    request: UpstreamRequest,
    permit: Permit,
    limits: RelayLimits,
) -> Result<Connected, ForwardError> {
    let table = shared.reports.view().table_arc();
    let budget = &shared.retry_budget;
    budget.deposit();
    let mut pick = PickRequest {
        model: &request.model,
        exclude: Bits::default(),
        affinity: request.affinity,
    };
    let attempts = shared.settings.attempts.max(1);
    // A retry needs an attempt left, another endpoint, and a token from the gateway-wide budget.
    let may_retry = |attempt: usize, pick: &PickRequest<'_>| {
        attempt < attempts && table.has_alternative(pick) && budget.try_retry()
    };
    let mut last_error = None;
    // A backend's own refusal (5xx or 429) whose outcome waits for the next attempt: the same
    // status from another backend for the same request says the failure follows the request
    // (a prompt every backend rejects), not the backend, and neither counts towards ejection.
    let mut refused: Option<(usize, u16)> = None;
    let count_refusal = |refused: &mut Option<(usize, u16)>| {
        if let Some((endpoint, _)) = refused.take() {
            shared.reports.outcome(endpoint, false, None);
        }
    };
    // Servers close idle keep-alive connections on their own schedule, and the pool may hand out
    // one that was just closed: the first transport failure of a request is retried once on a
    // fresh connection, outside the attempt limit and the budget (nothing reached the backend's
    // model, and a dead backend fails the second time too).
    let mut fresh_connection_retry = true;
    let mut attempt = 1;
    while attempt <= attempts {
        let Some((slot, endpoint)) = table.pick(&pick, &mut rand::thread_rng()) else {
            break;
        };
        pick.exclude.insert(slot);
        let left = request.deadline.saturating_duration_since(Instant::now());
        let own_first_byte = Duration::from_millis(shared.settings.first_byte_timeout_ms);
        let clients = request.read_timeout.map_or(left, |read| read.min(left));
        let first_byte = own_first_byte.min(clients);
        if first_byte.is_zero() {
            count_refusal(&mut refused);
            return Err(ForwardError::DeadlinePassed {
                budget: request.budget,
            });
        }
        let in_flight = endpoint.begin();
        let started = Instant::now();
        let upstream = upstream_request(shared, &request, endpoint, first_byte);
        let sent = if request.body.is_empty()
            && !matches!(request.method, Method::POST | Method::PUT | Method::PATCH)
        {
            upstream.send_body(awc::body::None::new()).await
        } else {
            upstream.send_body(request.body.clone()).await
        };
        let transport_failure = matches!(
            sent,
            Err(SendRequestError::Connect(_)
                | SendRequestError::Send(_)
                | SendRequestError::Response(_))
        );
        if transport_failure && fresh_connection_retry {
            fresh_connection_retry = false;
            pick.exclude.remove(slot);
            continue;
        }
        let bad = |reason: String| ForwardError::BadResponse {
            endpoint: endpoint.id,
            reason,
        };
        let (error, retry) = match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                let follows_request = is_backend_failure(status)
                    && refused.is_some_and(|(other, s)| s == status && other != endpoint.id);
                match judge(response, request.openai_route, limits, || {
                    !follows_request && may_retry(attempt, &pick)
                })
                .await
                {
                    Judged::Usable(response, body) => {
                        if follows_request {
                            log::info!(
                                "request {:?}: two backends answered {status}; passing it on, counting neither",
                                request.request_id
                            );
                        } else {
                            count_refusal(&mut refused);
                        }
                        return Ok(Connected {
                            response,
                            body,
                            held: Held {
                                in_flight,
                                _permit: permit,
                                reports: shared.reports.clone(),
                                model: request.model,
                                counts: !follows_request,
                            },
                            started,
                        });
                    }
                    Judged::Retry(status) => {
                        log::warn!(
                            "request {:?}: {} answered {status}; trying another backend",
                            request.request_id,
                            endpoint.url
                        );
                        count_refusal(&mut refused);
                        refused = Some((endpoint.id, status.as_u16()));
                        attempt += 1;
                        continue;
                    }
                    Judged::Unusable(reason) => (bad(reason), may_retry(attempt, &pick)),
                }
            }
            // The client's own limit ran out (its deadline or read timeout): it would not wait
            // any longer, and the backend was not necessarily at fault, so it is not counted.
            Err(SendRequestError::Timeout) if first_byte < own_first_byte => {
                count_refusal(&mut refused);
                return Err(ForwardError::DeadlinePassed {
                    budget: if first_byte == left {
                        request.budget
                    } else {
                        first_byte
                    },
                });
            }
            Err(SendRequestError::Timeout) => (
                ForwardError::Timeout {
                    endpoint: endpoint.id,
                    timeout: first_byte,
                },
                may_retry(attempt, &pick),
            ),
            Err(SendRequestError::Connect(e)) => (
                ForwardError::Connect {
                    endpoint: endpoint.id,
                    reason: e.to_string(),
                },
                may_retry(attempt, &pick),
            ),
            Err(e) => (bad(e.to_string()), may_retry(attempt, &pick)),
        };
        log::warn!(
            "request {:?}: {}: {error}",
            request.request_id,
            endpoint.url
        );
        count_refusal(&mut refused);
        shared.reports.outcome(endpoint.id, false, None);
        last_error = Some(error);
        if !retry {
            break;
        }
        attempt += 1;
    }
    count_refusal(&mut refused);
    Err(last_error.unwrap_or(ForwardError::NoBackend {
        model: request.model,
    }))
}

/// The request to one endpoint: the client's body and end-to-end headers, and the endpoint's own
/// key (or else the client's) as authorization.
fn upstream_request(
    shared: &WorkerShared,
    request: &UpstreamRequest,
    endpoint: &Endpoint,
    first_byte: Duration,
) -> awc::ClientRequest {
    let mut upstream = shared
        .client
        .request(
            request.method.clone(),
            format!("{}{}", endpoint.url, request.path),
        )
        .timeout(first_byte);
    let headers = upstream.headers_mut();
    for (name, value) in &request.headers {
        headers.append(name.clone(), value.clone());
    }
    if let Some(key) = &endpoint.authorization {
        if let Ok(key) = HeaderValue::from_str(key) {
            upstream = upstream.insert_header((header::AUTHORIZATION, key));
        }
    }
    upstream
}

/// What a backend's answer is good for.
enum Judged {
    /// Relay it (with its whole body when it is small and not a stream).
    Usable(awc::ClientResponse, Option<Bytes>),
    /// The backend's own 5xx or 429, and a retry was granted: try another endpoint.
    Retry(awc::http::StatusCode),
    /// A 2xx that is not an answer of the API (not JSON or SSE), or a body that broke before the
    /// end: never relayed.
    Unusable(String),
}

/// Judges an answer. The backend's own refusal (5xx or 429, whatever its content type) is retried
/// when `retry_refusal` grants it, and relayed to the client otherwise, body and all: a 502 is
/// only for a backend that could not be reached or sent garbage with a 2xx.
async fn judge(
    mut response: awc::ClientResponse,
    openai_route: bool,
    limits: RelayLimits,
    retry_refusal: impl FnOnce() -> bool,
) -> Judged {
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let sse = content_type.starts_with("text/event-stream");
    let json = content_type.starts_with("application/json");
    let failed = is_backend_failure(status.as_u16());
    if openai_route && status.is_success() && !(json || sse) {
        return Judged::Unusable(format!(
            "status {status} with content type '{content_type}'"
        ));
    }
    if failed && retry_refusal() {
        return Judged::Retry(status);
    }
    if !inline(&response) {
        return Judged::Usable(response, None);
    }
    match read_whole(&mut response, limits).await {
        Ok(body) => Judged::Usable(response, Some(body)),
        Err(reason) => Judged::Unusable(reason),
    }
}
