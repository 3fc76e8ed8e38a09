//! Workers: reusable actors that each carry one upstream exchange at a time. Each actix-web
//! thread owns a [`WorkerPool`] (built in the `HttpServer` factory) holding its idle workers and
//! its keep-alive `awc` client, so forwarding a request never crosses threads: the request takes
//! a slot from the shared [`Admission`] gate, checks out an idle worker (starting one only when
//! the pool has grown past what this thread has made), and the worker picks an endpoint from the
//! balancer's published view and forwards. A worker goes back to the idle list when its response
//! exchange ends; workers beyond the pool size are stopped then, so a shrink takes effect.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use awc::error::SendRequestError;
use awc::http::header::{self, HeaderValue};
use awc::http::Method;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::endpoint::{Bits, PickRequest};
use crate::error::ForwardError;
use crate::exchange::{
    content_length, is_backend_failure, read_whole, relay, report_whole, Exchange, ExchangeBody,
    Head, Held, RelayError, RelayLimits, INLINE_BODY_MAX, RELAY_DEPTH,
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
    /// (HTTP/1.1), so this bounds the streams the gateway can hold.
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
            max_connections: 20_000,
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
    /// Path and query, e.g. `/v1/chat/completions`.
    pub path: String,
    pub body: Bytes,
    pub content_type: Option<HeaderValue>,
    /// The client's own `Authorization`, passed on when the endpoint has no key of its own.
    pub authorization: Option<HeaderValue>,
    pub model: String,
    /// Whether a 2xx answer must be JSON or SSE (the OpenAI routes); other paths pass through.
    pub openai_route: bool,
    /// Hash of the affinity key (session, user, or prompt prefix).
    pub affinity: Option<u64>,
    /// When the whole request must be done: the client's deadline or `request_timeout_ms`.
    pub deadline: Instant,
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
}

impl WorkerPool {
    /// `threads` is how many pools share `settings.max_connections`. Must be called on the HTTP
    /// thread that will use the pool (the `HttpServer` factory).
    pub fn new(
        admission: Admission,
        reporters: Reporters,
        settings: UpstreamSettings,
        retry_budget: Arc<RetryBudget>,
        threads: usize,
    ) -> Rc<Self> {
        let connector = awc::Connector::new()
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
        let (body, body_rx) = mpsc::channel(RELAY_DEPTH);
        worker
            .try_send(Forward {
                request,
                permit,
                head,
                body,
            })
            .map_err(|_| ForwardError::WorkerGone)?;
        let head = head_rx.await.map_err(|_| ForwardError::WorkerGone)??;
        let body = match head.body {
            Some(whole) => ExchangeBody::Complete(Some(whole)),
            None => ExchangeBody::Relayed(body_rx),
        };
        Ok(Exchange {
            status: head.status,
            headers: head.headers,
            endpoint: head.endpoint,
            body,
        })
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

/// Carries one request to a backend: the response head goes back on `head`, the body on `body`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Forward {
    request: UpstreamRequest,
    permit: Permit,
    head: oneshot::Sender<Result<Head, ForwardError>>,
    body: mpsc::Sender<Result<Bytes, RelayError>>,
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
                body,
            } = msg;
            let limits = RelayLimits {
                idle: Duration::from_millis(shared.settings.idle_timeout_ms),
                deadline: request.deadline,
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
            let answer = Head {
                status: response.status(),
                headers: response.headers().clone(),
                endpoint: held.in_flight.endpoint().id,
                body: whole,
            };
            if answer.body.is_some() {
                report_whole(held, answer.status.as_u16(), started);
                let _ = head.send(Ok(answer));
            } else if head.send(Ok(answer)).is_ok() {
                relay(response, body, held, started, limits).await;
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
        let first_byte = Duration::from_millis(shared.settings.first_byte_timeout_ms).min(left);
        if first_byte.is_zero() {
            return Err(ForwardError::Timeout {
                endpoint: endpoint.url.clone(),
                timeout: Duration::ZERO,
            });
        }
        let in_flight = endpoint.begin();
        let started = Instant::now();
        let mut upstream = shared
            .client
            .request(
                request.method.clone(),
                format!("{}{}", endpoint.url, request.path),
            )
            .timeout(first_byte);
        if let Some(content_type) = &request.content_type {
            upstream = upstream.insert_header((header::CONTENT_TYPE, content_type.clone()));
        }
        match (&endpoint.authorization, &request.authorization) {
            (Some(key), _) => {
                upstream = upstream.insert_header((header::AUTHORIZATION, key.as_str()))
            }
            (None, Some(client_key)) => {
                upstream = upstream.insert_header((header::AUTHORIZATION, client_key.clone()))
            }
            (None, None) => {}
        }
        // Whether a retry was already granted (a refused answer is dropped only once it is).
        let mut granted = None;
        let sent = upstream.send_body(request.body.clone()).await;
        if fresh_connection_retry
            && matches!(
                sent,
                Err(SendRequestError::Connect(_)
                    | SendRequestError::Send(_)
                    | SendRequestError::Response(_))
            )
        {
            fresh_connection_retry = false;
            pick.exclude.remove(slot);
            continue;
        }
        let error = match sent {
            Ok(response) => {
                let status = response.status();
                let content_type = response
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let sse = content_type.starts_with("text/event-stream");
                let json = content_type.starts_with("application/json");
                let garbage = request.openai_route
                    && ((status.is_success() && !(json || sse))
                        || (is_backend_failure(status.as_u16()) && !json));
                if !garbage && is_backend_failure(status.as_u16()) {
                    granted = Some(may_retry(attempt, &pick));
                }
                if garbage || granted == Some(true) {
                    ForwardError::BadResponse {
                        endpoint: endpoint.url.clone(),
                        reason: format!("status {status} with content type '{content_type}'"),
                    }
                } else {
                    let mut response = response;
                    let body = if inline(&response) {
                        match read_whole(&mut response, limits).await {
                            Ok(body) => Ok(Some(body)),
                            Err(reason) => Err(ForwardError::BadResponse {
                                endpoint: endpoint.url.clone(),
                                reason,
                            }),
                        }
                    } else {
                        Ok(None)
                    };
                    match body {
                        Ok(body) => {
                            let held = Held {
                                in_flight,
                                _permit: permit,
                                reports: shared.reports.clone(),
                                model: request.model,
                            };
                            return Ok(Connected {
                                response,
                                body,
                                held,
                                started,
                            });
                        }
                        Err(error) => error,
                    }
                }
            }
            Err(SendRequestError::Timeout) => ForwardError::Timeout {
                endpoint: endpoint.url.clone(),
                timeout: first_byte,
            },
            Err(SendRequestError::Connect(e)) => ForwardError::Connect {
                endpoint: endpoint.url.clone(),
                reason: e.to_string(),
            },
            Err(e) => ForwardError::BadResponse {
                endpoint: endpoint.url.clone(),
                reason: e.to_string(),
            },
        };
        log::warn!("{error}");
        shared.reports.outcome(endpoint.id, false, None);
        let retry = granted.unwrap_or_else(|| may_retry(attempt, &pick));
        last_error = Some(error);
        if !retry {
            break;
        }
        attempt += 1;
    }
    Err(last_error.unwrap_or(ForwardError::NoBackend {
        model: request.model,
    }))
}
