//! Carrying one request to a backend that answers it: picking an endpoint, sending, judging the
//! answer, and trying elsewhere whenever nothing has reached the client yet.
//!
//! - An attempt ends when its answer is usable: the head of a small JSON answer with its whole
//!   body, or the head of a stream with its first event. A stream's head is held until that first
//!   event, so a backend that answers 200 and then fails or goes silent before its first token is
//!   retried like one that failed before its head.
//! - A backend's refusal (5xx, 429) is retried elsewhere within `upstream.attempts` and the retry
//!   budget; the same refusal from a second backend follows the request, not the backend: it is
//!   passed on, and counts against neither.
//! - A backend that refuses a fresh connection is dead: ejected at once, and its requests fail
//!   over to others without taking retry budget. A request whose answer is overdue (beyond
//!   `upstream.overdue_multiple` × its endpoint's recent p95, at least `overdue_floor_ms`) asks
//!   for an out-of-band probe of its endpoint (one at a time per endpoint); a probe that fails
//!   takes the endpoint out, and every request waiting on it fails over, its stuck connection
//!   dropped. A probe that passes means the backend is only slow: its requests keep waiting.
//! - With hedging on, a stream whose first token is later than its endpoint's p95 time to first
//!   token gets one hedge on the best other endpoint; the first to produce a token wins and the
//!   other is dropped at once, which cancels it on its backend.

use std::cell::Cell;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use awc::error::{ConnectError, SendRequestError};
use awc::http::header::{self, HeaderValue};
use awc::http::{Method, StatusCode};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::balancer::Verdict;
use crate::endpoint::{Bits, Endpoint, InFlight, PickRequest, Picked, RoutingTable};
use crate::error::ForwardError;
use crate::exchange::{
    content_length, is_backend_failure, read_whole, Dispatch, Held, RelayLimits, INLINE_BODY_MAX,
};
use crate::health_checker::ProbeNow;
use crate::metrics::RequestFacts;
use crate::policy::cache_aware::expected_prefill;
use crate::pool_supervisor::Permit;
use crate::response_homes;
use crate::worker::{UpstreamRequest, WorkerShared};

/// A backend's answer ready to go to the client.
pub(crate) struct Connected {
    pub response: awc::ClientResponse,
    /// The whole body, when it was small and not a stream.
    pub body: Option<Bytes>,
    /// A stream's first event (and what came with it), read before the head goes to the client.
    pub first: Vec<Bytes>,
    /// When that first event arrived.
    pub first_at: Option<Instant>,
    pub held: Held,
    pub started: Instant,
}

/// A usable answer from one attempt.
struct Ready {
    response: awc::ClientResponse,
    body: Option<Bytes>,
    first: Vec<Bytes>,
    first_at: Option<Instant>,
}

/// How an attempt ended.
enum Tried {
    Ready(Ready),
    /// The backend's own refusal (5xx or 429), its body not read yet.
    Refused(awc::ClientResponse),
    Failed(Failure),
}

struct Failure {
    error: ForwardError,
    kind: FailureKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureKind {
    /// The connection broke before an answer: perhaps a pooled connection the backend had closed.
    Stale,
    /// The backend failed this request (timeout, garbage, a broken answer).
    Live,
    /// The backend is gone (a refused fresh connection, a failed probe).
    Dead,
    /// A limit the client chose ran out.
    ClientLimit,
}

impl Failure {
    fn new(error: ForwardError, kind: FailureKind) -> Self {
        Self { error, kind }
    }
}

/// The attempt in progress on one endpoint.
struct Attempt {
    /// Its endpoint's slot in the routing table, to exclude it from the next pick.
    slot: usize,
    endpoint: Arc<Endpoint>,
    in_flight: InFlight,
    dispatch: Dispatch,
    started: Instant,
}

/// Picks endpoints and sends until an answer can go to the client (see the module doc).
pub(crate) async fn connect(
    shared: &WorkerShared,
    request: UpstreamRequest,
    permit: Permit,
    limits: RelayLimits,
) -> Result<Connected, ForwardError> {
    let table = shared.reports.view().table_arc();
    let budget = &shared.retry_budget;
    let mut pick = PickRequest {
        model: &request.model,
        exclude: Bits::default(),
        affinity: request.affinity,
        blocks: &request.blocks,
    };
    let attempts = shared.settings.attempts.max(1);
    let own_first_byte = Duration::from_millis(shared.settings.first_byte_timeout_ms);
    let mut last_error = None;
    // A backend's refusal whose outcome waits for the next attempt (see the module doc).
    let mut refused: Option<(usize, u16)> = None;
    // The retry (or failover) in flight, holding its budget until the request has its answer.
    let mut _retry = None;
    // Servers close idle keep-alive connections on their own schedule, and the pool may hand out
    // one that was just closed: the first connection that breaks before an answer is tried once
    // more, outside the attempt limit and the budget, unless the endpoint is known dead.
    let mut stale_retry = true;
    // The endpoint holding the stored response the request is about, while it takes traffic:
    // another one would not know it.
    let home = request
        .response
        .as_deref()
        .and_then(|id| shared.homes.home(id))
        .and_then(|id| table.endpoints.iter().position(|e| e.id == id))
        .filter(|&slot| table.endpoints[slot].is_available());
    let mut attempt = 1;
    while attempt <= attempts {
        let picked = match home.filter(|&slot| !pick.exclude.contains(slot)) {
            Some(slot) => Some(table.picked(slot, &request.blocks)),
            None => table.pick(&pick, &mut rand::thread_rng()),
        };
        let Some(picked) = picked else {
            break;
        };
        pick.exclude.insert(picked.slot);
        // A long prefix of its prompt being prefilled there for another stream: wait for that
        // prefill to end rather than compute the same tokens beside it (see `crate::prefills`).
        let hold = Duration::from_millis(shared.settings.prefill_hold_ms)
            .min(request.deadline.saturating_duration_since(Instant::now()));
        picked
            .endpoint
            .prefills
            .wait_for(&request.blocks, hold)
            .await;
        let left = request.deadline.saturating_duration_since(Instant::now());
        let head = request
            .head_deadline
            .map(|at| at.saturating_duration_since(Instant::now()));
        let clients = [request.read_timeout, head]
            .into_iter()
            .flatten()
            .fold(left, Duration::min);
        let first_byte = own_first_byte.min(clients);
        if first_byte.is_zero() {
            count_refusal(shared, &mut refused);
            return Err(ForwardError::DeadlinePassed {
                budget: request.budget,
            });
        }
        // A request bound to its stored response's home is not hedged: another backend would
        // answer 404 at once, and win the race.
        let hedge_at = home
            .is_none()
            .then(|| hedge_after(shared, &request, picked.endpoint))
            .flatten();
        let first = start(&picked, &request);
        let head_wait = HeadWait {
            wait: first_byte,
            clients: clients < own_first_byte,
        };
        let tried = run(
            shared,
            &request,
            first,
            head_wait,
            limits,
            hedge_at.map(|after| (after, &table, pick.exclude)),
        )
        .await;
        let (tried, attempt_state, hedged) = tried;
        // A hedge that lost by failing is no place for the next attempt either.
        if let Some(slot) = hedged {
            pick.exclude.insert(slot);
        }
        let endpoint = attempt_state.endpoint.clone();
        let slot = attempt_state.slot;
        match tried {
            Tried::Ready(ready) => {
                count_refusal(shared, &mut refused);
                return Ok(connected(
                    shared,
                    &request,
                    attempt_state,
                    ready,
                    permit,
                    (true, (attempt - 1) as u32),
                ));
            }
            Tried::Refused(response) => {
                let status = response.status().as_u16();
                let follows_request =
                    refused.is_some_and(|(other, s)| s == status && other != endpoint.id);
                if !follows_request {
                    let retry = attempt < attempts
                        && table.has_alternative(&pick)
                        && may_retry(shared, budget, &mut _retry);
                    if retry {
                        log::warn!(
                            "request {:?}: {} answered {status}; trying another backend",
                            request.request_id,
                            endpoint.url
                        );
                        count_refusal(shared, &mut refused);
                        refused = Some((endpoint.id, status));
                        attempt += 1;
                        continue;
                    }
                    count_refusal(shared, &mut refused);
                } else {
                    log::info!(
                        "request {:?}: two backends answered {status}; passing it on, counting neither",
                        request.request_id
                    );
                }
                let mut response = response;
                let body = if inline(&response) {
                    match read_whole(&mut response, limits).await {
                        Ok(body) => Some(body),
                        Err(reason) => {
                            let error = ForwardError::BadResponse {
                                endpoint: endpoint.id,
                                reason,
                            };
                            shared.reports.outcome(endpoint.id, Verdict::Failure);
                            return Err(error);
                        }
                    }
                } else {
                    None
                };
                let ready = Ready {
                    response,
                    body,
                    first: Vec::new(),
                    first_at: None,
                };
                return Ok(connected(
                    shared,
                    &request,
                    attempt_state,
                    ready,
                    permit,
                    (!follows_request, (attempt - 1) as u32),
                ));
            }
            Tried::Failed(failure) => {
                log::warn!(
                    "request {:?}: {}: {}",
                    request.request_id,
                    endpoint.url,
                    failure.error
                );
                let Failure { error, kind } = failure;
                match kind {
                    FailureKind::ClientLimit => {
                        count_refusal(shared, &mut refused);
                        return Err(error);
                    }
                    FailureKind::Stale if stale_retry && endpoint.is_healthy() => {
                        stale_retry = false;
                        pick.exclude.remove(slot);
                        continue;
                    }
                    FailureKind::Dead | FailureKind::Stale => {
                        // A connection that breaks again on the retry, or a refused fresh one:
                        // the endpoint is gone, and its requests fail over without budget.
                        shared.reports.outcome(endpoint.id, Verdict::Dead);
                        count_refusal(shared, &mut refused);
                        last_error = Some(error);
                        if table.has_alternative(&pick) {
                            budget.failover();
                            attempt += 1;
                            continue;
                        }
                        break;
                    }
                    FailureKind::Live => {
                        shared.reports.outcome(endpoint.id, Verdict::Failure);
                        probe(shared, &endpoint, false);
                        count_refusal(shared, &mut refused);
                        last_error = Some(error);
                        let retry = attempt < attempts
                            && table.has_alternative(&pick)
                            && may_retry(shared, budget, &mut _retry);
                        if !retry {
                            break;
                        }
                        attempt += 1;
                    }
                }
            }
        }
    }
    count_refusal(shared, &mut refused);
    Err(last_error.unwrap_or(ForwardError::NoBackend {
        model: request.model,
    }))
}

/// Takes a place in the retry budget for the next attempt, keeping it until the request is done.
fn may_retry(
    shared: &WorkerShared,
    budget: &Arc<crate::retry_budget::RetryBudget>,
    held: &mut Option<crate::retry_budget::RetryPermit>,
) -> bool {
    if held.is_some() {
        return true;
    }
    *held = budget.try_retry(shared.admission.busy());
    held.is_some()
}

/// Reports a refusal held back for the next attempt as the endpoint's failure.
fn count_refusal(shared: &WorkerShared, refused: &mut Option<(usize, u16)>) {
    if let Some((endpoint, _)) = refused.take() {
        shared.reports.outcome(endpoint, Verdict::Failure);
    }
}

/// Asks for a probe of `endpoint` now, unless one is on its way: `urgent` for a request that is
/// overdue (a short timeout, and a failed probe takes the endpoint out at once).
fn probe(shared: &WorkerShared, endpoint: &Endpoint, urgent: bool) {
    if endpoint.claim_probe() {
        shared.health.do_send(ProbeNow {
            endpoint: Some(endpoint.id),
            urgent,
        });
    }
}

fn start(picked: &Picked<'_>, request: &UpstreamRequest) -> Attempt {
    let (endpoint, cached) = (picked.endpoint, picked.cached);
    let estimate = endpoint.estimate();
    // How full the batch it joins is: a late answer to a loaded backend may be queueing.
    let capacity = estimate.capacity.max(1);
    let (_, waiting, _) = endpoint.reported_load();
    let load = if waiting > 0.0 {
        1.0
    } else {
        f64::from(endpoint.in_flight()) / f64::from(capacity)
    };
    // A stream's first token ends its prefill; a whole answer's head comes only at its end, so
    // its prefill's end is unknown and it is counted by the in-flight count alone.
    let prefill = if request.stream {
        request.blocks.len().saturating_sub(cached) as u32
    } else {
        0
    };
    let mut in_flight = endpoint.begin_prefill(prefill);
    // A stream's prefill ends at its first token, which others may wait for; where slots bind
    // (llama.cpp), any request holds its prompt until it ends.
    if request.stream || endpoint.binds_slots() {
        in_flight.share_prefill(
            &request.blocks,
            cached,
            expected_prefill(&estimate, prefill),
        );
    }
    Attempt {
        slot: picked.slot,
        in_flight,
        endpoint: endpoint.clone(),
        dispatch: Dispatch {
            blocks: request.blocks.len() as u32,
            cached: cached as u32,
            load,
        },
        started: Instant::now(),
    }
}

fn connected(
    shared: &WorkerShared,
    request: &UpstreamRequest,
    attempt: Attempt,
    ready: Ready,
    permit: Permit,
    (counts, retries): (bool, u32),
) -> Connected {
    let mut in_flight = attempt.in_flight;
    in_flight.first_token();
    if request.method == Method::POST && request.path == "/v1/responses" {
        let first = ready
            .body
            .as_deref()
            .or(ready.first.first().map(|b| &b[..]));
        if let Some(id) = first.and_then(response_homes::response_id) {
            shared.homes.remember(id, attempt.endpoint.id);
        }
    }
    Connected {
        response: ready.response,
        body: ready.body,
        first: ready.first,
        first_at: ready.first_at,
        held: Held {
            in_flight,
            _permit: permit,
            reports: shared.reports.clone(),
            model: request.model.clone(),
            counts,
            dispatch: attempt.dispatch,
            account: request.account.clone(),
            request: RequestFacts {
                id: Some(request.request_id.clone()),
                at_ms: request.account.at_ms,
                retries,
            },
        },
        started: attempt.started,
    }
}

/// How many hedges one HTTP thread may send now: each stream that could be hedged earns
/// `[hedge] max_share` of a hedge, and each hedge spends one, with at most [`HEDGE_RESERVE`] saved
/// up (and as many to start with: an idle thread has saved them up, and a gateway's first late
/// streams are hedged). A hedge fires at its endpoint's p95 time to first token, so about one
/// stream in twenty is late enough by construction, and more while the p95 windows lag a changing
/// load: without a bound, round robin on the unequal fleet sent 7 % more requests to the backends
/// than clients sent it.
#[derive(Debug)]
pub struct HedgeCredit {
    share: f64,
    credit: Cell<f64>,
}

/// Hedges one thread may save up while few streams are late.
const HEDGE_RESERVE: f64 = 2.0;

impl HedgeCredit {
    pub fn new(share: f64) -> Self {
        Self {
            share,
            credit: Cell::new(if share > 0.0 { HEDGE_RESERVE } else { 0.0 }),
        }
    }

    /// A stream that may be hedged started.
    pub fn earn(&self) {
        self.credit
            .set((self.credit.get() + self.share).min(HEDGE_RESERVE));
    }

    pub fn can_spend(&self) -> bool {
        self.credit.get() >= 1.0
    }

    /// A hedge was sent.
    pub fn spend(&self) {
        self.credit.set(self.credit.get() - 1.0);
    }
}

/// When to hedge a request on `endpoint`, if hedging applies to it: a stream whose endpoint has a
/// measured p95 time to first token, clamped to the configured bounds.
fn hedge_after(
    shared: &WorkerShared,
    request: &UpstreamRequest,
    endpoint: &Endpoint,
) -> Option<Duration> {
    let hedging = request.hedge.unwrap_or(shared.hedge.enabled);
    if !hedging || !request.stream {
        return None;
    }
    shared.hedge_credit.earn();
    let (ttft_p95, _) = endpoint.p95_ms();
    let ms = if ttft_p95 > 0.0 {
        ttft_p95
    } else {
        shared.hedge.max_ms as f64
    };
    Some(Duration::from_secs_f64(
        ms.clamp(shared.hedge.min_ms as f64, shared.hedge.max_ms as f64) / 1000.0,
    ))
}

/// How long an attempt waits for its answer's head, and whether that wait is the client's own
/// limit (its deadline or read timeout) rather than the gateway's: running out of it is then the
/// client's timeout, not the backend's failure, on the first attempt and on a hedge alike (a
/// hedge waits only what is left of the first attempt's wait, so its own length says nothing of
/// whose limit it is).
#[derive(Debug, Clone, Copy)]
struct HeadWait {
    wait: Duration,
    clients: bool,
}

/// Runs the first attempt, watched for hangs, and (with `hedge`) races a hedge against it once
/// its first token is late. Returns how it ended, the attempt it ended on, and the hedge's slot
/// when one was sent (a failure then means both failed).
async fn run(
    shared: &WorkerShared,
    request: &UpstreamRequest,
    first: Attempt,
    head_wait: HeadWait,
    limits: RelayLimits,
    hedge: Option<(Duration, &Arc<RoutingTable>, Bits)>,
) -> (Tried, Attempt, Option<usize>) {
    let first_endpoint = first.endpoint.clone();
    let primary = watched(shared, request, &first_endpoint, head_wait, limits);
    let mut primary = pin!(primary);
    let Some((after, table, exclude)) = hedge else {
        return (primary.await, first, None);
    };
    tokio::select! {
        tried = &mut primary => return (tried, first, None),
        () = tokio::time::sleep(after) => {}
    }
    let hedge_pick = PickRequest {
        model: &request.model,
        exclude,
        affinity: request.affinity,
        blocks: &request.blocks,
    };
    if !shared.hedge_credit.can_spend() {
        return (primary.await, first, None);
    }
    let permit = shared
        .retry_budget
        .try_hedge(shared.admission.busy())
        .and_then(|permit| {
            Some((
                permit,
                table.pick_soonest(&hedge_pick, &mut rand::thread_rng())?,
            ))
        });
    let Some((_permit, picked)) = permit else {
        return (primary.await, first, None);
    };
    shared.hedge_credit.spend();
    log::debug!(
        "request {:?}: no first token from {} after {after:?}; hedging on {}",
        request.request_id,
        first.endpoint.url,
        picked.endpoint.url
    );
    let second = start(&picked, request);
    let hedge_slot = Some(second.slot);
    let left = HeadWait {
        wait: head_wait.wait.saturating_sub(first.started.elapsed()),
        ..head_wait
    };
    let second_endpoint = second.endpoint.clone();
    let hedged = watched(shared, request, &second_endpoint, left, limits);
    let mut hedged = pin!(hedged);
    tokio::select! {
        tried = &mut primary => match tried {
            Tried::Ready(_) => (tried, first, hedge_slot),
            failed => {
                report_loser(shared, &first, failed);
                (hedged.await, second, hedge_slot)
            }
        },
        tried = &mut hedged => match tried {
            Tried::Ready(_) => {
                shared.retry_budget.hedge_won();
                (tried, second, hedge_slot)
            }
            failed => {
                report_loser(shared, &second, failed);
                (primary.await, first, hedge_slot)
            }
        },
    }
}

/// The outcome of an attempt that lost a hedged race by failing (a slower attempt that was merely
/// dropped says nothing about its endpoint).
fn report_loser(shared: &WorkerShared, attempt: &Attempt, tried: Tried) {
    let verdict = match tried {
        Tried::Failed(Failure {
            kind: FailureKind::Dead,
            ..
        }) => Verdict::Dead,
        Tried::Failed(Failure {
            kind: FailureKind::ClientLimit,
            ..
        }) => return,
        _ => Verdict::Failure,
    };
    shared.reports.outcome(attempt.endpoint.id, verdict);
}

/// Sends the request to `endpoint` ([`send`]), and once it is overdue asks for a probe of the
/// endpoint: a failed probe (the endpoint is found unhealthy) ends the attempt as dead; a passing
/// one lets it go on.
async fn watched(
    shared: &WorkerShared,
    request: &UpstreamRequest,
    endpoint: &Endpoint,
    head_wait: HeadWait,
    limits: RelayLimits,
) -> Tried {
    let mut attempt = pin!(send(shared, request, endpoint, head_wait, limits));
    let overdue = overdue_after(shared, endpoint, request.stream);
    tokio::select! {
        tried = &mut attempt => return tried,
        () = tokio::time::sleep(overdue) => {}
    }
    let verdict = endpoint.verdict();
    let mut verdict = pin!(verdict);
    let dead = || {
        Tried::Failed(Failure::new(
            ForwardError::Unresponsive {
                endpoint: endpoint.id,
            },
            FailureKind::Dead,
        ))
    };
    if !endpoint.is_healthy() {
        return dead();
    }
    probe(shared, endpoint, true);
    tokio::select! {
        tried = &mut attempt => tried,
        () = &mut verdict => {
            if endpoint.is_healthy() {
                attempt.await
            } else {
                dead()
            }
        }
    }
}

/// When a request on `endpoint` is overdue: a multiple of its recent p95 time to first token (a
/// stream) or whole answer (not a stream), at least the floor.
fn overdue_after(shared: &WorkerShared, endpoint: &Endpoint, stream: bool) -> Duration {
    let (ttft, full) = endpoint.p95_ms();
    let p95 = if stream { ttft } else { full };
    let floor = shared.settings.overdue_floor_ms as f64;
    Duration::try_from_secs_f64((p95 * shared.settings.overdue_multiple).max(floor) / 1000.0)
        .unwrap_or(Duration::MAX)
}

/// Sends the request to `endpoint` and judges the answer, reading a small body whole and a
/// stream's first event, waiting at most `head_wait` for its head.
async fn send(
    shared: &WorkerShared,
    request: &UpstreamRequest,
    endpoint: &Endpoint,
    HeadWait {
        wait: first_byte,
        clients: client_bound,
    }: HeadWait,
    limits: RelayLimits,
) -> Tried {
    let started = Instant::now();
    let upstream = upstream_request(shared, request, endpoint, first_byte);
    let has_body = !request.body.is_empty()
        || matches!(request.method, Method::POST | Method::PUT | Method::PATCH);
    let sent = if has_body {
        upstream.send_body(request.body.clone()).await
    } else {
        upstream.send_body(awc::body::None::new()).await
    };
    let bad = |reason: String| ForwardError::BadResponse {
        endpoint: endpoint.id,
        reason,
    };
    let response = match sent {
        Ok(response) => response,
        // The client's own limit ran out: it would not wait any longer, and the backend was not
        // necessarily at fault.
        Err(SendRequestError::Timeout) if client_bound => {
            let left = request.deadline.saturating_duration_since(started);
            let budget = if first_byte >= left {
                request.budget
            } else {
                first_byte
            };
            return Tried::Failed(Failure::new(
                ForwardError::DeadlinePassed { budget },
                FailureKind::ClientLimit,
            ));
        }
        Err(SendRequestError::Timeout) => {
            return Tried::Failed(Failure::new(
                ForwardError::Timeout {
                    endpoint: endpoint.id,
                    timeout: first_byte,
                },
                FailureKind::Live,
            ))
        }
        // The pooled connection was found closed as the request went out: a stale one.
        Err(e @ SendRequestError::Connect(ConnectError::Disconnected)) => {
            return Tried::Failed(Failure::new(bad(e.to_string()), FailureKind::Stale))
        }
        Err(SendRequestError::Connect(e)) => {
            return Tried::Failed(Failure::new(
                ForwardError::Connect {
                    endpoint: endpoint.id,
                    reason: e.to_string(),
                },
                FailureKind::Dead,
            ))
        }
        Err(e @ (SendRequestError::Send(_) | SendRequestError::Response(_))) => {
            return Tried::Failed(Failure::new(bad(e.to_string()), FailureKind::Stale))
        }
        Err(e) => return Tried::Failed(Failure::new(bad(e.to_string()), FailureKind::Live)),
    };
    judge(response, request, endpoint, started + first_byte, limits).await
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

/// Whether a response is read whole before the head goes back: not a stream, and small.
fn inline(response: &awc::ClientResponse) -> bool {
    !is_sse(response) && content_length(response).is_some_and(|l| l <= INLINE_BODY_MAX)
}

fn is_sse(response: &awc::ClientResponse) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"))
}

/// Judges an answer: a 2xx of an API route must be JSON or SSE; a refusal (5xx or 429, whatever
/// its content type) goes back for the caller to retry or pass on; a stream must bring its first
/// event by `first_event_by`, and a small body must arrive whole.
async fn judge(
    mut response: awc::ClientResponse,
    request: &UpstreamRequest,
    endpoint: &Endpoint,
    first_event_by: Instant,
    limits: RelayLimits,
) -> Tried {
    let status = response.status();
    let bad = |reason: String| {
        Tried::Failed(Failure::new(
            ForwardError::BadResponse {
                endpoint: endpoint.id,
                reason,
            },
            FailureKind::Live,
        ))
    };
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let sse = content_type.starts_with("text/event-stream");
    let json = content_type.starts_with("application/json");
    if request.openai_route && status.is_success() && !(json || sse) {
        return bad(format!(
            "status {status} with content type '{content_type}'"
        ));
    }
    // Every valid status is within 100–599 (RFC 9110 §15), and clients act on its class.
    if status.as_u16() > 599 {
        return bad(format!(
            "status {}, outside HTTP's 100-599",
            status.as_u16()
        ));
    }
    if is_backend_failure(status.as_u16()) {
        return Tried::Refused(response);
    }
    if sse && status == StatusCode::OK {
        return match first_event(&mut response, first_event_by).await {
            Ok(first) => Tried::Ready(Ready {
                response,
                body: None,
                first,
                first_at: Some(Instant::now()),
            }),
            Err(reason) => bad(reason),
        };
    }
    if !inline(&response) {
        return Tried::Ready(Ready {
            response,
            body: None,
            first: Vec::new(),
            first_at: None,
        });
    }
    match read_whole(&mut response, limits).await {
        Ok(body) => Tried::Ready(Ready {
            response,
            body: Some(body),
            first: Vec::new(),
            first_at: None,
        }),
        Err(reason) => bad(reason),
    }
}

/// The most of a stream held back while waiting for its first event.
const FIRST_EVENT_MAX: usize = 64 * 1024;

/// Reads a stream until its first event (a line other than an SSE comment) has arrived, by
/// `deadline`; returns what was read.
async fn first_event(
    response: &mut awc::ClientResponse,
    deadline: Instant,
) -> Result<Vec<Bytes>, String> {
    let mut chunks = Vec::new();
    let mut held = 0;
    loop {
        let next = tokio::time::timeout_at(deadline.into(), response.next()).await;
        match next {
            Ok(Some(Ok(chunk))) => {
                held += chunk.len();
                let event = has_event(&chunk);
                chunks.push(chunk);
                if event || held >= FIRST_EVENT_MAX {
                    return Ok(chunks);
                }
            }
            Ok(Some(Err(e))) => {
                return Err(format!("the stream broke before its first event: {e}"))
            }
            Ok(None) => return Err("the stream ended before its first event".into()),
            Err(_) => return Err("no first event in time".into()),
        }
    }
}

/// Whether a chunk holds an SSE line other than a comment (`:` keep-alives, which TGI sends while
/// it waits, are not a first token).
fn has_event(chunk: &[u8]) -> bool {
    chunk
        .split(|b| *b == b'\n')
        .any(|line| !line.trim_ascii().is_empty() && !line.starts_with(b":"))
}

#[cfg(test)]
mod tests {
    use super::{has_event, HedgeCredit};

    #[test]
    fn hedges_are_at_most_their_share_of_the_streams_that_could_be_hedged() {
        let credit = HedgeCredit::new(0.05);
        let mut sent = 0;
        for _ in 0..1000 {
            credit.earn();
            if credit.can_spend() {
                credit.spend();
                sent += 1;
            }
        }
        // A twentieth of 1,000 and the two it starts with (the last may be a rounding error short).
        let most = 52;
        assert!((most - 1..=most).contains(&sent), "{sent}");
        let none = HedgeCredit::new(0.0);
        none.earn();
        assert!(!none.can_spend());
    }

    #[test]
    fn keep_alive_comments_are_not_a_first_event() {
        assert!(!has_event(b": keep-alive\n\n"));
        assert!(!has_event(b"\n"));
        assert!(has_event(b": ping\n\ndata: {}\n\n"));
        assert!(has_event(b"event: response.created\n"));
    }
}
