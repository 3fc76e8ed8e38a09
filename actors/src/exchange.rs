//! One proxied response on its way to the client. A small non-streamed answer is read whole by
//! the worker ([`read_whole`]); anything else is relayed chunk by chunk through a small bounded
//! channel into [`ExchangeBody`], which the ingress streams to the client: nothing is buffered
//! beyond a few chunks, a slow client slows the upstream read, a client that stops reading
//! altogether is cut off after `client_stall_timeout_ms`, and a client that goes away closes the
//! channel, which makes the worker drop the upstream connection at once (freeing the GPU).
//! Either way the exchange measures time to first chunk and the gaps between chunks, and reports
//! the outcome to the balancer and the metrics actor when it ends, however it ends.

use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use awc::http::header::HeaderMap;
use awc::http::StatusCode;
use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;

use crate::account::Account;
use crate::balancer::Verdict;
use crate::buffers::RelayBytes;
use crate::endpoint::InFlight;
use crate::estimator::{CacheReport, Sample};
use crate::metrics::{Cause, Observe, RequestFacts};
use crate::pool_supervisor::Permit;
use crate::report::ThreadReports;
use crate::usage::TokenUsage;
use crate::usage_scan::{usage_of_body, UsageScan};

/// Chunks that may wait between the upstream read and the client write.
pub(crate) const RELAY_DEPTH: usize = 16;

/// A response from a backend: head received, body still to come.
pub struct Exchange {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub endpoint: usize,
    /// `endpoint` as a header value, made once per endpoint.
    pub endpoint_header: awc::http::header::HeaderValue,
    pub body: ExchangeBody,
}

/// A non-streamed answer whose `Content-Length` is at most this is read whole by the worker
/// and handed over with the head: a backend sends such a JSON answer in one piece anyway, and it
/// saves the relay and the extra wake-ups of the client connection per request.
pub const INLINE_BODY_MAX: u64 = 256 * 1024;

/// How long a stream's response stays open after its `data: [DONE]` for the backend to end the
/// body: a backend that held the stream open after it held the client's response open for the
/// whole idle timeout (60 s by default), though the client had every event. Backends end the body
/// with the `[DONE]` chunk, so a normal stream never waits for this.
const AFTER_DONE: Duration = Duration::from_millis(500);

/// The body was cut off mid-way: the client's connection is closed rather than the response
/// ended as if it were complete.
#[derive(Debug, thiserror::Error)]
#[error("the response was cut off: {0}")]
pub struct RelayError(String);

/// The client side of the relay.
pub enum ExchangeBody {
    /// Read whole by the worker.
    Complete(Option<Bytes>),
    /// Relayed chunk by chunk as it arrives.
    Relayed(Relayed),
}

/// The receiving end of a relay.
pub struct Relayed {
    chunks: mpsc::Receiver<Result<Bytes, RelayError>>,
    gauge: Arc<RelayBytes>,
    /// Set by the relay when its last item reached the channel: the body ended on purpose.
    delivered_end: Arc<AtomicBool>,
    ended: bool,
}

impl Stream for ExchangeBody {
    type Item = Result<Bytes, RelayError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match &mut *self {
            ExchangeBody::Complete(body) => Poll::Ready(body.take().map(Ok)),
            ExchangeBody::Relayed(relayed) => relayed.poll_chunk(cx),
        }
    }
}

impl Relayed {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, RelayError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match std::task::ready!(self.chunks.poll_recv(cx)) {
            Some(Ok(chunk)) => {
                self.gauge.sub(chunk.len());
                Poll::Ready(Some(Ok(chunk)))
            }
            Some(Err(e)) => {
                self.ended = true;
                Poll::Ready(Some(Err(e)))
            }
            None => {
                self.ended = true;
                if self.delivered_end.load(Ordering::Acquire) {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Err(RelayError(
                        "the relay ended without finishing the body".into(),
                    ))))
                }
            }
        }
    }
}

impl Drop for Relayed {
    fn drop(&mut self) {
        self.chunks.close();
        while let Ok(item) = self.chunks.try_recv() {
            if let Ok(chunk) = item {
                self.gauge.sub(chunk.len());
            }
        }
    }
}

/// The sending end of a relay.
pub(crate) struct RelayLink {
    chunks: mpsc::Sender<Result<Bytes, RelayError>>,
    gauge: Arc<RelayBytes>,
    delivered_end: Arc<AtomicBool>,
}

/// A relay channel for one exchange, counted in this thread's relay gauge.
pub(crate) fn relay_channel(gauge: &Arc<RelayBytes>) -> (RelayLink, Relayed) {
    let (sender, receiver) = mpsc::channel(RELAY_DEPTH);
    let delivered_end = Arc::new(AtomicBool::new(false));
    (
        RelayLink {
            chunks: sender,
            gauge: gauge.clone(),
            delivered_end: delivered_end.clone(),
        },
        Relayed {
            chunks: receiver,
            gauge: gauge.clone(),
            delivered_end,
            ended: false,
        },
    )
}

/// How handing one chunk to the client side went.
enum Delivery {
    Delivered,
    /// The client went away.
    Gone,
    /// The client left the channel full for the stall timeout, or past the deadline.
    Stalled(&'static str),
}

impl RelayLink {
    /// Hands a chunk over; up to [`RELAY_DEPTH`] pass without waiting (the client connection
    /// drains them all into one write when it next runs). When the channel is full, waits for the
    /// client, but not past the stall timeout or the deadline.
    async fn deliver(
        &self,
        chunk: Bytes,
        closed: Pin<&mut impl std::future::Future<Output = ()>>,
        limits: &RelayLimits,
    ) -> Delivery {
        let bytes = chunk.len();
        match self.chunks.try_send(Ok(chunk)) {
            Ok(()) => {
                self.gauge.add(bytes);
                Delivery::Delivered
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Delivery::Gone,
            Err(mpsc::error::TrySendError::Full(item)) => {
                let stall = Instant::now() + limits.client_stall;
                let give_up = stall.min(limits.deadline);
                tokio::select! {
                    sent = self.chunks.send(item) => match sent {
                        Ok(()) => {
                            self.gauge.add(bytes);
                            Delivery::Delivered
                        }
                        Err(_) => Delivery::Gone,
                    },
                    () = closed => Delivery::Gone,
                    () = tokio::time::sleep_until(give_up.into()) => Delivery::Stalled(
                        if give_up == stall {
                            "the client stopped reading"
                        } else {
                            "the request's deadline passed while the client was not reading"
                        },
                    ),
                }
            }
        }
    }

    /// Ends the body on purpose: with this last item when there is room for it, otherwise (the
    /// client is not reading) by cutting the connection.
    fn end_with(&self, last: Option<Result<Bytes, RelayError>>) {
        let delivered = match last {
            None => true,
            Some(item) => {
                let bytes = item.as_ref().map_or(0, Bytes::len);
                let sent = self.chunks.try_send(item).is_ok();
                if sent {
                    self.gauge.add(bytes);
                }
                sent
            }
        };
        self.delivered_end.store(delivered, Ordering::Release);
    }
}

/// What the relay holds until the exchange ends: the endpoint's in-flight count and the worker
/// slot are released when it drops.
pub(crate) struct Held {
    pub in_flight: InFlight,
    /// The worker slot, given back when the exchange ends.
    pub _permit: Permit,
    pub reports: Rc<ThreadReports>,
    pub model: String,
    /// Whether the outcome counts for the endpoint (the balancer's weights and circuit): not
    /// when the answer is a refusal that followed the request from backend to backend.
    pub counts: bool,
    pub dispatch: Dispatch,
    pub account: Account,
    pub request: RequestFacts,
}

/// What was known when the request was sent, for what its outcome teaches about the endpoint.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Dispatch {
    /// Prompt blocks, and how many the endpoint was estimated to cache.
    pub blocks: u32,
    pub cached: u32,
    /// How full the endpoint's batch was (see [`crate::estimator::Sample::load`]).
    pub load: f64,
}

/// How a successful stream of an API ends, so that a stream cut short (a backend that died in a
/// way the HTTP client reads as a normal end) is told from a finished one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Chat Completions and Completions: a final `data: [DONE]`.
    Done,
    /// The Responses API: an `event: response.completed` (or `.failed`, `.incomplete`, `error`).
    ResponseCompleted,
    /// Anthropic's Messages API: an `event: message_stop` (or `error`).
    MessageStop,
    /// Any other route: a clean end of the body.
    BodyEnd,
}

impl StreamEnd {
    /// Whether a stream whose tail and last event name are these ended as its API says.
    fn reached(self, tail: &StreamTail, last_event: &LastEvent) -> bool {
        let event = last_event.name();
        match self {
            StreamEnd::Done => tail.is_done(),
            StreamEnd::ResponseCompleted => {
                tail.open_lines() == 0
                    && matches!(
                        event,
                        b"response.completed"
                            | b"response.failed"
                            | b"response.incomplete"
                            | b"error"
                    )
            }
            StreamEnd::MessageStop => {
                tail.open_lines() == 0 && matches!(event, b"message_stop" | b"error")
            }
            StreamEnd::BodyEnd => true,
        }
    }

    /// The event a stream ends with when its backend fails mid-way, in the API's own error
    /// shape, so its SDKs raise it as an error instead of returning a silently truncated answer.
    fn error_event(self) -> &'static [u8] {
        match self {
            StreamEnd::Done | StreamEnd::BodyEnd => b"data: {\"error\":{\"message\":\"the backend failed while streaming the response\",\"type\":\"server_error\",\"param\":null,\"code\":\"upstream_stream_error\"}}\n\n",
            StreamEnd::ResponseCompleted => b"event: error\ndata: {\"type\":\"error\",\"code\":\"upstream_stream_error\",\"message\":\"the backend failed while streaming the response\",\"param\":null,\"sequence_number\":0}\n\n",
            StreamEnd::MessageStop => b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"the backend failed while streaming the response\"}}\n\n",
        }
    }

    /// Whether the relay must follow `event:` lines to know the end.
    fn follows_events(self) -> bool {
        matches!(self, StreamEnd::ResponseCompleted | StreamEnd::MessageStop)
    }
}

/// Limits on a relay: the longest silence between chunks, the request's deadline, and the longest
/// a client may leave the relay full without reading; and how its stream must end.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RelayLimits {
    pub idle: Duration,
    /// Whether `idle` is the client's read timeout rather than the gateway's own.
    pub idle_is_clients: bool,
    pub deadline: Instant,
    pub client_stall: Duration,
    pub stream_end: StreamEnd,
}

/// Reads a small non-streamed body whole, within the idle timeout and the deadline. An error
/// means the backend failed before any byte reached the client, so the request may be retried.
pub(crate) async fn read_whole(
    upstream: &mut awc::ClientResponse,
    limits: RelayLimits,
) -> Result<Bytes, String> {
    let wait = limits
        .idle
        .min(limits.deadline.saturating_duration_since(Instant::now()));
    let expected = content_length(upstream);
    let read = upstream.body().limit(INLINE_BODY_MAX as usize);
    match tokio::time::timeout(wait, read).await {
        Ok(Ok(body)) => match expected {
            Some(length) if (body.len() as u64) < length => Err(format!(
                "the backend closed the connection after {} of {length} bytes",
                body.len()
            )),
            // A chunked body beside a `Content-Length` (the HTTP client reads the chunks): the
            // backend and the gateway disagree on where the answer ends.
            Some(length) if body.len() as u64 > length => Err(format!(
                "the backend sent {} bytes under a Content-Length of {length}",
                body.len()
            )),
            _ => Ok(body),
        },
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the backend went silent while sending its answer".into()),
    }
}

/// The `Content-Length` a response announced. The HTTP client reads a connection closed early
/// as the end of the body, so a body is checked against it to tell a truncated answer.
pub(crate) fn content_length(response: &awc::ClientResponse) -> Option<u64> {
    response
        .headers()
        .get(awc::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Whether an answer's end can be told from a truncation: it has a `Content-Length` or is chunked.
/// A body delimited by the backend closing the connection cannot (see `upstream_io`), so it is
/// relayed but never cached.
pub fn has_known_length(headers: &HeaderMap) -> bool {
    headers.contains_key(awc::http::header::CONTENT_LENGTH)
        || headers.contains_key(awc::http::header::TRANSFER_ENCODING)
}

/// Reports an exchange whose body was read whole.
pub(crate) fn report_whole(held: Held, status: u16, started: Instant, body: &Bytes) {
    let first = started.elapsed();
    let timing = Timing {
        first_chunk: Some(first),
        last_chunk: None,
        gaps: Duration::ZERO,
        chunks: 1,
    };
    let usage = (status < 300)
        .then(|| {
            held.account
                .settle(usage_of_body(body), estimate_from_bytes(body.len() as u64))
        })
        .flatten();
    report(
        held,
        false,
        status,
        Ending::Complete,
        &timing,
        started,
        usage,
    );
}

/// Completion tokens of a JSON answer without usage: about four bytes a token, the JSON around
/// the text counted in (an estimate, and the record says so).
fn estimate_from_bytes(bytes: u64) -> u64 {
    bytes.div_ceil(4)
}

/// The tail of a non-streamed body, where its `usage` object is (vLLM, SGLang and OpenAI write
/// it after the choices).
#[derive(Default)]
struct BodyTail {
    bytes: Vec<u8>,
}

impl BodyTail {
    const KEEP: usize = 4096;

    fn push(&mut self, chunk: &[u8]) {
        self.bytes
            .extend_from_slice(&chunk[chunk.len().saturating_sub(Self::KEEP)..]);
        let excess = self.bytes.len().saturating_sub(Self::KEEP);
        self.bytes.drain(..excess);
    }
}

/// Copies the upstream body into the channel until it ends, fails, stalls, passes its deadline,
/// or the client goes away or stops reading.
pub(crate) async fn relay(
    mut upstream: awc::ClientResponse,
    link: RelayLink,
    held: Held,
    started: Instant,
    limits: RelayLimits,
    first: Vec<Bytes>,
    first_at: Option<Instant>,
) {
    let status = upstream.status().as_u16();
    let sse = upstream
        .headers()
        .get(awc::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let expected = content_length(&upstream);
    let mut received = 0u64;
    let mut timing = Timing::default();
    let mut tail = StreamTail::default();
    let mut last_event = LastEvent::default();
    let follow_events = sse && limits.stream_end.follows_events();
    let ends_at_done = sse && limits.stream_end == StreamEnd::Done;
    let mut scan = UsageScan::new(sse && held.account.strip_usage, ends_at_done);
    let mut body_tail = BodyTail::default();
    // One timer for the whole relay, re-armed only when it fires early (a chunk came since it
    // was set), not on every chunk; one `closed` future, polled whenever the relay waits.
    let idle = tokio::time::sleep(
        limits
            .idle
            .min(limits.deadline.saturating_duration_since(started)),
    );
    tokio::pin!(idle);
    let closed = link.chunks.closed();
    tokio::pin!(closed);
    let mut last_activity = Instant::now();
    // When the stream's `data: [DONE]` passed: it is over, whatever the backend sends on.
    let mut done_at: Option<Instant> = None;
    let mut first = first.into_iter();
    if let Some(at) = first_at {
        timing.first_chunk = Some(at - started);
        timing.last_chunk = Some(at);
    }
    let ending = loop {
        // What was read while waiting for the first event goes first (timed when it was read).
        // A chunk the upstream already has buffered is taken without arming any wake-up; only
        // when it has none does the relay wait on the upstream, the client and the timer.
        let early = first.next();
        let read_early = early.is_some();
        let next = match early {
            Some(chunk) => Some(Ok(chunk)),
            None => match upstream.next().now_or_never() {
                Some(next) => next,
                None => tokio::select! {
                    biased;
                    next = upstream.next() => next,
                    () = &mut closed => break Ending::Cancelled,
                    () = &mut idle => {
                        let now = Instant::now();
                        let wake = (last_activity + limits.idle).min(limits.deadline);
                        let wake = done_at.map_or(wake, |at| wake.min(at + AFTER_DONE));
                        if now < wake {
                            idle.as_mut().reset(wake.into());
                            continue;
                        }
                        // A backend that keeps a stream open after its `[DONE]` (past
                        // `AFTER_DONE`) has still answered it whole.
                        if done_at.is_some() {
                            None
                        } else {
                            let (why, ending) = if now >= limits.deadline {
                                ("the request's deadline passed", Ending::Expired)
                            } else if limits.idle_is_clients {
                                ("the client's read timeout passed", Ending::Expired)
                            } else {
                                ("the backend went silent", Ending::Broken)
                            };
                            log::warn!("{why} after {} chunks; ending the response", timing.chunks);
                            link.end_with(Some(failure(sse, &tail, limits.stream_end, why)));
                            break ending;
                        }
                    }
                },
            },
        };
        // After `[DONE]` nothing more is part of the stream: a failure ends it there, as
        // complete, without an error event; more bytes (a backend that sends on, which would hold
        // the response open for as long as it liked) end it once the scan has passed what of them
        // closes the `[DONE]` event (its blank line may come in this chunk).
        let done = done_at.is_some();
        let ends_here = done && matches!(&next, Some(Ok(chunk)) if !chunk.trim_ascii().is_empty());
        let next = match next {
            Some(Err(_)) if done => None,
            next => next,
        };
        match next {
            Some(Ok(chunk)) => {
                if read_early {
                    timing.chunks += 1;
                } else {
                    timing.chunk(started);
                }
                received += chunk.len() as u64;
                let chunk = if sse {
                    tail.push(&chunk);
                    if follow_events {
                        last_event.push(&chunk);
                    }
                    let chunk = scan.pass(chunk);
                    if !done && ends_at_done && (scan.done() || tail.is_done()) {
                        let at = Instant::now();
                        done_at = Some(at);
                        idle.as_mut()
                            .reset((at + AFTER_DONE).min(limits.deadline).into());
                    }
                    chunk
                } else {
                    body_tail.push(&chunk);
                    chunk
                };
                if !chunk.is_empty() {
                    match link.deliver(chunk, closed.as_mut(), &limits).await {
                        Delivery::Delivered => last_activity = Instant::now(),
                        Delivery::Gone => break Ending::Cancelled,
                        Delivery::Stalled(why) => {
                            log::debug!("{why}; cutting the response off");
                            break Ending::Stalled;
                        }
                    }
                }
                if ends_here {
                    log::debug!("the backend sent more after [DONE]; the response ends there");
                    link.end_with(None);
                    break Ending::Complete;
                }
            }
            Some(Err(error)) => {
                log::warn!(
                    "upstream body failed after {} chunks: {error}",
                    timing.chunks
                );
                link.end_with(Some(failure(
                    sse,
                    &tail,
                    limits.stream_end,
                    &error.to_string(),
                )));
                break Ending::Broken;
            }
            None if sse
                && status < 300
                && !done
                && !limits.stream_end.reached(&tail, &last_event) =>
            {
                log::warn!(
                    "upstream stream ended before its final event ({:?}) after {} chunks",
                    limits.stream_end,
                    timing.chunks
                );
                link.end_with(Some(failure(
                    sse,
                    &tail,
                    limits.stream_end,
                    "the stream ended early",
                )));
                break Ending::Broken;
            }
            None if !done && expected.is_some_and(|length| received < length) => {
                log::warn!("upstream body ended after {received} of {expected:?} bytes");
                link.end_with(Some(failure(
                    sse,
                    &tail,
                    limits.stream_end,
                    "the body ended early",
                )));
                break Ending::Broken;
            }
            None => {
                if let Some(rest) = scan.finish() {
                    if let Delivery::Gone | Delivery::Stalled(_) =
                        link.deliver(rest, closed.as_mut(), &limits).await
                    {
                        break Ending::Cancelled;
                    }
                }
                link.end_with(None);
                break Ending::Complete;
            }
        }
    };
    let generated = match ending {
        Ending::Complete => status < 300,
        _ => sse && scan.events() > 0,
    };
    let reported = if sse {
        scan.usage()
    } else {
        usage_of_body(&body_tail.bytes)
    };
    let usage = (generated || reported.is_some())
        .then(|| {
            let estimate = if sse {
                u64::from(scan.events())
            } else {
                estimate_from_bytes(received)
            };
            held.account.settle(reported, estimate)
        })
        .flatten();
    report(held, sse, status, ending, &timing, started, usage);
}

/// What the client gets when the body fails mid-way: an SSE error event for a stream (after
/// ending the line and event the backend left open, so parsers see it as an event of its own),
/// a broken body (the connection is closed) otherwise.
fn failure(
    sse: bool,
    tail: &StreamTail,
    stream_end: StreamEnd,
    why: &str,
) -> Result<Bytes, RelayError> {
    if !sse {
        return Err(RelayError(why.to_string()));
    }
    let open = tail.open_lines();
    let error = stream_end.error_event();
    let mut event = BytesMut::with_capacity(open + error.len());
    event.extend_from_slice(&b"\n\n"[..open]);
    event.extend_from_slice(error);
    Ok(event.freeze())
}

/// The name of the last `event:` line of an SSE stream (the Responses and Messages APIs name
/// their events; the final one says whether the stream finished). Lines are found with memchr;
/// only a line that could be an `event:` line is kept, at most 64 bytes of it.
#[derive(Default)]
pub struct LastEvent {
    name: Vec<u8>,
    line: Vec<u8>,
    /// The current line cannot be an `event:` line (it started otherwise or ran long).
    skipping: bool,
}

impl LastEvent {
    const KEEP: usize = 64;
    const FIELD: &'static [u8] = b"event:";

    pub fn push(&mut self, mut chunk: &[u8]) {
        loop {
            match memchr::memchr(b'\n', chunk) {
                Some(end) => {
                    self.feed(&chunk[..end]);
                    self.end_line();
                    chunk = &chunk[end + 1..];
                }
                None => {
                    self.feed(chunk);
                    return;
                }
            }
        }
    }

    fn feed(&mut self, part: &[u8]) {
        if self.skipping || part.is_empty() {
            return;
        }
        let room = Self::KEEP - self.line.len();
        if part.len() > room {
            self.skipping = true;
            return;
        }
        self.line.extend_from_slice(part);
        let known = self.line.len().min(Self::FIELD.len());
        if self.line[..known] != Self::FIELD[..known] {
            self.skipping = true;
        }
    }

    fn end_line(&mut self) {
        if !self.skipping {
            if let Some(name) = self.line.strip_prefix(Self::FIELD) {
                self.name.clear();
                self.name.extend_from_slice(name.trim_ascii());
            }
        }
        self.line.clear();
        self.skipping = false;
    }

    /// The last event name seen (empty before any).
    pub fn name(&self) -> &[u8] {
        &self.name
    }
}

/// The last bytes of an SSE stream. A backend that dies mid-stream may close the connection in a
/// way the HTTP client reads as a normal end, so a successful OpenAI stream is recognised by its
/// final `data: [DONE]` event.
#[derive(Default)]
pub struct StreamTail {
    bytes: Vec<u8>,
}

impl StreamTail {
    const KEEP: usize = 16;

    pub fn push(&mut self, chunk: &[u8]) {
        self.bytes
            .extend_from_slice(&chunk[chunk.len().saturating_sub(Self::KEEP)..]);
        let excess = self.bytes.len().saturating_sub(Self::KEEP);
        self.bytes.drain(..excess);
    }

    pub fn is_done(&self) -> bool {
        let trimmed = self.bytes.trim_ascii_end();
        trimmed.ends_with(b"data: [DONE]") || trimmed.ends_with(b"data:[DONE]")
    }

    /// Line ends needed to close what the stream left open: 0 after a blank line (the event is
    /// complete), 1 after a line end (the event is open), 2 in the middle of a line.
    pub fn open_lines(&self) -> usize {
        let bytes = self.bytes.as_slice();
        let trailing = bytes
            .iter()
            .rev()
            .take_while(|b| **b == b'\n' || **b == b'\r')
            .count();
        if trailing == bytes.len() {
            return 0;
        }
        // Line ends in the trailing run, a CRLF counting as one.
        let run = &bytes[bytes.len() - trailing..];
        let line_ends = run.len() - run.windows(2).filter(|w| w == b"\r\n").count();
        2usize.saturating_sub(line_ends)
    }
}

enum Ending {
    Complete,
    Broken,
    /// A limit the client chose ran out (its deadline or read timeout): ended like a broken
    /// body, but not counted against the backend.
    Expired,
    Cancelled,
    /// The client stopped reading and was cut off.
    Stalled,
}

#[derive(Default)]
struct Timing {
    first_chunk: Option<Duration>,
    last_chunk: Option<Instant>,
    gaps: Duration,
    chunks: u32,
}

impl Timing {
    /// Counts a chunk arriving now.
    fn chunk(&mut self, started: Instant) {
        let now = Instant::now();
        match self.last_chunk {
            None => self.first_chunk = Some(now - started),
            Some(last) => self.gaps += now - last,
        }
        self.last_chunk = Some(now);
        self.chunks += 1;
    }
}

fn report(
    held: Held,
    sse: bool,
    status: u16,
    ending: Ending,
    timing: &Timing,
    started: Instant,
    usage: Option<TokenUsage>,
) {
    let endpoint = held.in_flight.endpoint().id;
    let total = started.elapsed();
    let (status, cause) = match ending {
        Ending::Complete => {
            if held.counts {
                let verdict = if is_backend_failure(status) {
                    Verdict::Failure
                } else {
                    Verdict::Success(Sample {
                        stream: sse,
                        first: timing.first_chunk.unwrap_or(total),
                        total,
                        blocks: held.dispatch.blocks,
                        cached: held.dispatch.cached,
                        report: cache_report(&held.dispatch, usage.as_ref()),
                        load: held.dispatch.load,
                    })
                };
                held.reports.outcome(endpoint, verdict);
            }
            (status, Cause::of_status(status))
        }
        Ending::Broken => {
            held.reports.outcome(endpoint, Verdict::Failure);
            (502, Some(Cause::BadResponse))
        }
        Ending::Expired => (504, Some(Cause::Timeout)),
        Ending::Cancelled | Ending::Stalled => (499, Some(Cause::Cancelled)),
    };
    held.reports.observe(Observe {
        endpoint: Some(endpoint),
        model: (!held.model.is_empty()).then_some(held.model),
        status,
        cause,
        latency: total,
        ttft: timing.first_chunk.filter(|_| sse),
        inter_token: (timing.chunks > 1).then(|| timing.gaps / (timing.chunks - 1)),
        cache_hit: false,
        usage,
        key: held.account.key_name(),
        request: held.request,
    });
}

/// What `usage` says the backend had cached of the request's prompt, in prompt blocks: the share
/// of the prompt's tokens it reported cached.
fn cache_report(dispatch: &Dispatch, usage: Option<&TokenUsage>) -> CacheReport {
    match usage {
        Some(u) if !u.estimated && u.prompt > 0 => {
            if u.cached_known {
                let share = u.cached.min(u.prompt) as f64 / u.prompt as f64;
                CacheReport::Blocks((f64::from(dispatch.blocks) * share).round() as u32)
            } else {
                CacheReport::Silent
            }
        }
        _ => CacheReport::Unknown,
    }
}

/// Statuses that say the backend, not the client, is at fault.
pub fn is_backend_failure(status: u16) -> bool {
    status >= 500 || status == 429
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_usage_says_what_share_of_the_prompt_was_cached() {
        let dispatch = Dispatch {
            blocks: 100,
            cached: 90,
            load: 0.0,
        };
        let reported = |cached, cached_known| TokenUsage {
            prompt: 2000,
            completion: 16,
            cached,
            cached_known,
            estimated: false,
        };
        let report = |usage: Option<TokenUsage>| cache_report(&dispatch, usage.as_ref());
        assert_eq!(report(Some(reported(500, true))), CacheReport::Blocks(25));
        assert_eq!(report(Some(reported(0, true))), CacheReport::Blocks(0));
        assert_eq!(
            report(Some(reported(9_999, true))),
            CacheReport::Blocks(100),
            "more than the prompt is all of it"
        );
        assert_eq!(report(Some(reported(0, false))), CacheReport::Silent);
        assert_eq!(report(None), CacheReport::Unknown);
        let estimated = crate::usage_scan::estimate(8000, 16);
        assert_eq!(report(Some(estimated)), CacheReport::Unknown);
    }

    #[test]
    fn stream_tail_sees_done_across_chunks() {
        let mut tail = StreamTail::default();
        tail.push(b"data: {\"choices\":[]}\n\ndata: [DO");
        assert!(!tail.is_done());
        tail.push(b"NE]\n\n");
        assert!(tail.is_done());
        tail.push(b"data: {}\n\n");
        assert!(!tail.is_done());
    }

    #[test]
    fn an_error_event_first_closes_the_line_and_event_left_open() {
        let open = |bytes: &[u8]| {
            let mut tail = StreamTail::default();
            tail.push(bytes);
            tail.open_lines()
        };
        assert_eq!(open(b""), 0);
        assert_eq!(open(b"data: {}\n\n"), 0);
        assert_eq!(open(b"data: {}\r\n\r\n"), 0);
        assert_eq!(open(b"data: {}\n"), 1);
        assert_eq!(open(b"data: {}\r\n"), 1);
        assert_eq!(open(b"data: {\"par"), 2);
        let mut tail = StreamTail::default();
        tail.push(b"data: {\"par");
        let event = failure(true, &tail, StreamEnd::Done, "x").unwrap();
        assert!(event.starts_with(b"\n\ndata: {\"error\""));
    }

    #[test]
    fn the_last_event_name_is_followed_across_chunks() {
        let mut last = LastEvent::default();
        last.push(b"event: response.output_text.delta\ndata: {\"delta\":\"x\"}\n\nevent: respo");
        assert_eq!(last.name(), b"response.output_text.delta");
        last.push(b"nse.completed\r\ndata: {\"response\":{\"output\":\"");
        last.push(
            "a long line that is not an event line: event: fake\n"
                .repeat(50)
                .as_bytes(),
        );
        last.push(b"\"}}\n\n");
        assert_eq!(last.name(), b"response.completed");
        let mut tail = StreamTail::default();
        tail.push(b"\"}}\n\n");
        assert!(StreamEnd::ResponseCompleted.reached(&tail, &last));
        assert!(!StreamEnd::MessageStop.reached(&tail, &last));
        assert!(!StreamEnd::Done.reached(&tail, &last));
        assert!(StreamEnd::BodyEnd.reached(&tail, &last));
    }
}
