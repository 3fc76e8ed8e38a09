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
use awc::http::header::{HeaderName, HeaderValue};
use awc::http::Method;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::account::Account;
use crate::buffers::RelayBytes;
use crate::error::ForwardError;
use crate::exchange::{
    relay, relay_channel, report_whole, Exchange, ExchangeBody, RelayLimits, StreamEnd,
};
use crate::forwarding::{connect, Connected, HedgeCredit};
use crate::health_checker::HealthChecker;
use crate::pool_supervisor::{Admission, Permit};
use crate::report::{Reporters, ThreadReports};
use crate::response_homes::ResponseHomes;
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
    /// The retry budget: retries in flight may be this share of the requests in flight...
    pub retry_ratio: f64,
    /// ...or this many, whichever is more.
    pub retry_min_concurrency: usize,
    /// A request is overdue after this multiple of its endpoint's recent 95th percentile time to
    /// first token (streams) or whole answer (not streamed), and not before `overdue_floor_ms`:
    /// its endpoint is then probed at once.
    pub overdue_multiple: f64,
    pub overdue_floor_ms: u64,
    /// Longest a request waits for the prefill of its prompt's prefix that its endpoint is
    /// computing for another stream (see [`crate::prefills`]); 0: never waits.
    pub prefill_hold_ms: u64,
}

/// Hedged first tokens; defaults documented in `config/default.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HedgeSettings {
    /// Whether streams are hedged unless they ask otherwise (`x-nanogate-hedge: on|off`).
    pub enabled: bool,
    /// A stream is hedged once its first token is later than its endpoint's p95 time to first
    /// token, but not before `min_ms` nor after `max_ms`.
    pub min_ms: u64,
    pub max_ms: u64,
    /// Hedges sent, at most this share of the streams that could be hedged (each HTTP thread
    /// keeps its own account, [`HedgeCredit`]).
    pub max_share: f64,
}

impl Default for HedgeSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            min_ms: 50,
            max_ms: 2000,
            max_share: 0.05,
        }
    }
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
            retry_min_concurrency: 10,
            overdue_multiple: 3.0,
            overdue_floor_ms: 3000,
            prefill_hold_ms: 10_000,
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
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// The chained keys of the prompt's blocks (cache-aware routing; empty otherwise).
    pub blocks: Vec<u64>,
    /// The client's own choice about hedging, if it made one.
    pub hedge: Option<bool>,
    /// Hash of the affinity key (session, user, or prompt prefix).
    pub affinity: Option<u64>,
    /// When the whole request must be done: the client's deadline or `request_timeout_ms`.
    pub deadline: Instant,
    /// The time the deadline allowed (for error messages).
    pub budget: Duration,
    /// The client's limit on each read (the head, each next chunk), when it set one.
    pub read_timeout: Option<Duration>,
    /// When the client stops waiting for the answer's head, when it set that apart.
    pub head_deadline: Option<Instant>,
    /// The stored Responses API answer it continues or is about: it goes to the endpoint that
    /// made it (see [`crate::response_homes`]).
    pub response: Option<String>,
    /// Whom it is for, and what its end settles (tokens charged to the key, the usage record).
    pub account: Account,
}

// ===== WorkerPool =====

/// One thread's idle workers and upstream client.
pub struct WorkerPool {
    idle: RefCell<Vec<Addr<Worker>>>,
    shared: Rc<WorkerShared>,
    admission: Admission,
}

/// What every worker of a thread shares.
pub(crate) struct WorkerShared {
    pub client: awc::Client,
    pub reports: Rc<ThreadReports>,
    pub settings: UpstreamSettings,
    pub hedge: HedgeSettings,
    pub hedge_credit: HedgeCredit,
    pub retry_budget: Arc<RetryBudget>,
    pub relay_bytes: Arc<RelayBytes>,
    pub client_stall: Duration,
    /// Asked for out-of-band probes of endpoints whose requests are overdue.
    pub health: Addr<HealthChecker>,
    /// How many requests are in flight, for the retry budget.
    pub admission: Admission,
    pub homes: Arc<ResponseHomes>,
}

/// What every thread's [`WorkerPool`] is built from.
#[derive(Clone)]
pub struct WorkerPoolConfig {
    pub admission: Admission,
    pub reporters: Reporters,
    pub settings: UpstreamSettings,
    pub hedge: HedgeSettings,
    pub retry_budget: Arc<RetryBudget>,
    pub health: Addr<HealthChecker>,
    pub buffers: Arc<crate::buffers::Buffers>,
    /// Longest a client may leave its response unread before it is cut off.
    pub client_stall: Duration,
    /// How many pools share `settings.max_connections`.
    pub threads: usize,
    /// Which endpoint holds each stored Responses API answer, shared by every thread.
    pub homes: Arc<ResponseHomes>,
}

impl WorkerPool {
    /// Must be called on the HTTP thread that will use the pool (the `HttpServer` factory).
    pub fn new(config: WorkerPoolConfig) -> Rc<Self> {
        let WorkerPoolConfig {
            admission,
            reporters,
            settings,
            hedge,
            retry_budget,
            health,
            buffers,
            client_stall,
            threads,
            homes,
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
                hedge_credit: HedgeCredit::new(hedge.max_share),
                hedge,
                retry_budget,
                relay_bytes: buffers.thread_relay(),
                client_stall,
                health,
                admission: admission.clone(),
                homes,
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
                first,
                first_at,
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
                let answer = exchange(ExchangeBody::Complete(Some(whole.clone())));
                report_whole(held, answer.status.as_u16(), started, &whole);
                let _ = head.send(Ok(answer));
                return;
            }
            let (link, relayed) = relay_channel(&shared.relay_bytes);
            if head
                .send(Ok(exchange(ExchangeBody::Relayed(relayed))))
                .is_ok()
            {
                relay(response, link, held, started, limits, first, first_at).await;
            }
        };
        Box::pin(
            work.into_actor(self)
                .map(|(), this, ctx| this.pool.release(ctx)),
        )
    }
}
