//! The metrics actor: request counters and HDR histograms (total latency, time to first token,
//! inter-token gap) overall, per endpoint and per model, since start and over the last minute, a
//! per-second request rate window, errors by cause, and the Prometheus exposition (the classic
//! text format by default, OpenMetrics when asked for). Observations arrive fire-and-forget after
//! each request; a full mailbox drops them (counted) instead of slowing requests down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
// The maps every observation looks its series up in (endpoint, model, route, key): foldhash
// rather than std's SipHash: a request's record took 3,480 instructions with SipHash, 2,440 with
// foldhash. Their keys are the gateway's own (endpoint ids, served models, configured keys).
use foldhash::HashMap as FastMap;
use hdrhistogram::Histogram;
use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram as PromHistogram};
use prometheus_client::registry::Registry;
use serde::Serialize;

use awc::http::header::HeaderValue;

use crate::balancer::BalancerView;
use crate::buffers::{BufferStats, Buffers};
use crate::clock::SharedClock;
use crate::pool_supervisor::Admission;
use crate::retry_budget::RetryBudget;
use crate::usage::{TokenUsage, UsageRecord};
use crate::usage_log::{Records, UsageLog, UsageLogCounters};
use crate::{Fail, GetStats, Stats};

/// Seconds of history behind the requests-per-second figure.
const RATE_WINDOW_SECS: usize = 10;
/// Histograms cover 1 µs to one hour at 3 significant digits.
const HISTOGRAM_MAX_US: u64 = 3_600_000_000;
/// The recent window: this many slots of [`SLOT_SECS`] (the last minute).
const SLOTS: usize = 6;
const SLOT_SECS: u64 = 10;
/// Mailbox size; beyond it observations are dropped and counted.
const MAILBOX: usize = 65_536;

/// Why a request did not get a good answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The request was refused as the client's mistake (a 4xx), by the gateway or the backend.
    ClientError,
    /// The gateway was at capacity (pool and queue, connections, body buffer): 503.
    Overload,
    /// No healthy backend serves the model: 503.
    NoBackend,
    /// No backend answered in time, or the request's deadline passed: 504.
    Timeout,
    /// No backend could be reached: 502.
    Unreachable,
    /// A backend answered garbage, or its answer broke off mid-way.
    BadResponse,
    /// A backend's own 5xx or 429, passed on.
    Backend,
    /// The client went away, or stopped reading and was cut off.
    Cancelled,
    /// The gateway failed itself.
    Internal,
    /// The client's API key was over one of its limits: 429.
    RateLimited,
}

impl Cause {
    const ALL: [Cause; 10] = [
        Cause::ClientError,
        Cause::Overload,
        Cause::NoBackend,
        Cause::Timeout,
        Cause::Unreachable,
        Cause::BadResponse,
        Cause::Backend,
        Cause::Cancelled,
        Cause::Internal,
        Cause::RateLimited,
    ];

    /// Whether it is the gateway's or a backend's failure (what the error rate counts), rather
    /// than the client's doing.
    pub fn is_failure(self) -> bool {
        !matches!(
            self,
            Cause::ClientError | Cause::Cancelled | Cause::RateLimited
        )
    }

    fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Cause::ClientError => "client_error",
            Cause::Overload => "overload",
            Cause::NoBackend => "no_backend",
            Cause::Timeout => "timeout",
            Cause::Unreachable => "unreachable",
            Cause::BadResponse => "bad_response",
            Cause::Backend => "backend",
            Cause::Cancelled => "cancelled",
            Cause::Internal => "internal",
            Cause::RateLimited => "rate_limited",
        }
    }

    /// The cause of an answer a backend gave, by its status.
    pub fn of_status(status: u16) -> Option<Cause> {
        match status {
            0..=399 => None,
            429 | 500.. => Some(Cause::Backend),
            _ => Some(Cause::ClientError),
        }
    }
}

/// What happened to one request, as the metrics actor records it.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Observe {
    /// The endpoint that answered, or `None` when the gateway answered itself (cache, errors).
    pub endpoint: Option<usize>,
    /// The requested model, or `None` when the request never named a servable one.
    pub model: Option<String>,
    pub status: u16,
    /// Why it failed, if it did.
    pub cause: Option<Cause>,
    pub latency: Duration,
    /// Time until the first token of a stream (OpenTelemetry's TTFT: streams only).
    pub ttft: Option<Duration>,
    /// Mean gap between body chunks after the first, for a stream.
    pub inter_token: Option<Duration>,
    pub cache_hit: bool,
    /// Tokens the answer used (none when nothing was generated).
    pub usage: Option<TokenUsage>,
    /// The API key's name, when keys are on.
    pub key: Option<Arc<str>>,
    /// What the usage log keeps beyond the metrics.
    pub request: RequestFacts,
}

/// A request's identity for the usage log.
#[derive(Debug, Clone, Default)]
pub struct RequestFacts {
    /// `X-Request-Id`.
    pub id: Option<HeaderValue>,
    /// Arrival, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// Attempts beyond the first.
    pub retries: u32,
}

/// A thread's batch of observations.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Observations(pub Vec<Observe>);

/// The Prometheus exposition, in the format the scraper asked for.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "String")]
pub struct RenderPrometheus {
    /// OpenMetrics 1.0 (`application/openmetrics-text`) rather than the classic text format.
    pub openmetrics: bool,
}

/// Sends observations without waiting and counts the ones a full mailbox refused.
#[derive(Clone)]
pub struct MetricsHandle {
    addr: Addr<Metrics>,
    dropped: Arc<AtomicU64>,
}

impl MetricsHandle {
    pub fn observe(&self, observation: Observe) {
        if self.addr.try_send(observation).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn observe_all(&self, observations: Vec<Observe>) {
        let count = observations.len() as u64;
        if self.addr.try_send(Observations(observations)).is_err() {
            self.dropped.fetch_add(count, Ordering::Relaxed);
        }
    }

    pub fn addr(&self) -> &Addr<Metrics> {
        &self.addr
    }
}

// ===== Series =====

/// Counts by cause.
#[derive(Clone, Copy, Default, PartialEq, Debug)]
struct Causes([u64; Cause::ALL.len()]);

impl Causes {
    fn add(&mut self, cause: Cause) {
        self.0[cause.index()] += 1;
    }

    fn failures(&self) -> u64 {
        Cause::ALL
            .iter()
            .filter(|c| c.is_failure())
            .map(|c| self.0[c.index()])
            .sum()
    }

    fn get(&self, cause: Cause) -> u64 {
        self.0[cause.index()]
    }

    /// The non-zero counts, by cause name.
    fn named(&self) -> HashMap<&'static str, u64> {
        Cause::ALL
            .iter()
            .filter(|c| self.get(**c) > 0)
            .map(|c| (c.name(), self.get(*c)))
            .collect()
    }
}

/// One slot of the recent window.
struct Slot {
    /// Which ten seconds since the series began this slot holds.
    epoch: u64,
    requests: u64,
    tokens: Tokens,
    causes: Causes,
    latency: Histogram<u32>,
    ttft: Histogram<u32>,
}

impl Slot {
    fn new() -> Self {
        let histogram = || {
            Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 2)
                .expect("constant histogram bounds are valid")
        };
        Self {
            epoch: u64::MAX,
            requests: 0,
            tokens: Tokens::default(),
            causes: Causes::default(),
            latency: histogram(),
            ttft: histogram(),
        }
    }
}

/// Counters and histograms for one slice of traffic (all, one endpoint, one model).
struct Series {
    requests: u64,
    tokens: Tokens,
    causes: Causes,
    cache_hits: u64,
    latency: Histogram<u64>,
    ttft: Histogram<u64>,
    inter_token: Histogram<u64>,
    rate: RateWindow,
    /// The last minute, in slots that are reused as time moves on.
    recent: Vec<Slot>,
    origin: Option<Instant>,
}

impl Series {
    fn new() -> Self {
        let histogram = || {
            Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3)
                .expect("constant histogram bounds are valid")
        };
        Self {
            requests: 0,
            tokens: Tokens::default(),
            causes: Causes::default(),
            cache_hits: 0,
            latency: histogram(),
            ttft: histogram(),
            inter_token: histogram(),
            rate: RateWindow::default(),
            recent: (0..SLOTS).map(|_| Slot::new()).collect(),
            origin: None,
        }
    }

    fn epoch(&mut self, now: Instant) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        now.saturating_duration_since(origin).as_secs() / SLOT_SECS
    }

    fn record(&mut self, o: &Observe, now: Instant) {
        self.requests += 1;
        self.tokens.add(o.usage);
        self.rate.add(now);
        if let Some(cause) = o.cause {
            self.causes.add(cause);
        }
        self.cache_hits += u64::from(o.cache_hit);
        self.latency.saturating_record(micros(o.latency));
        if let Some(ttft) = o.ttft {
            self.ttft.saturating_record(micros(ttft));
        }
        if let Some(gap) = o.inter_token {
            self.inter_token.saturating_record(micros(gap));
        }
        let epoch = self.epoch(now);
        let slot = &mut self.recent[(epoch % SLOTS as u64) as usize];
        if slot.epoch != epoch {
            slot.epoch = epoch;
            slot.requests = 0;
            slot.tokens = Tokens::default();
            slot.causes = Causes::default();
            slot.latency.reset();
            slot.ttft.reset();
        }
        slot.requests += 1;
        slot.tokens.add(o.usage);
        if let Some(cause) = o.cause {
            slot.causes.add(cause);
        }
        slot.latency.saturating_record(micros(o.latency));
        if let Some(ttft) = o.ttft {
            slot.ttft.saturating_record(micros(ttft));
        }
    }

    fn stats(&mut self, now: Instant) -> SeriesStats {
        let epoch = self.epoch(now);
        let mut recent = RecentStats {
            seconds: SLOTS as u64 * SLOT_SECS,
            requests: 0,
            errors: 0,
            error_rate: 0.0,
            by_cause: HashMap::new(),
            latency_ms: None,
            ttft_ms: None,
            tokens: Tokens::default(),
            tokens_per_second: TokenRates::default(),
        };
        let mut causes = Causes::default();
        let mut latency: Option<Histogram<u32>> = None;
        let mut ttft: Option<Histogram<u32>> = None;
        for slot in self
            .recent
            .iter()
            .filter(|s| s.epoch <= epoch && epoch - s.epoch < SLOTS as u64)
        {
            recent.requests += slot.requests;
            recent.tokens.merge(&slot.tokens);
            for cause in Cause::ALL {
                causes.0[cause.index()] += slot.causes.get(cause);
            }
            for (merged, histogram) in [(&mut latency, &slot.latency), (&mut ttft, &slot.ttft)] {
                match merged {
                    Some(m) => {
                        let _ = m.add(histogram);
                    }
                    None => *merged = Some(histogram.clone()),
                }
            }
        }
        recent.errors = causes.failures();
        recent.error_rate = ratio(recent.errors, recent.requests);
        recent.by_cause = causes.named();
        recent.latency_ms = latency.as_ref().and_then(Summary::of);
        recent.ttft_ms = ttft.as_ref().and_then(Summary::of);
        recent.tokens_per_second = recent.tokens.per_second(recent.seconds);
        let errors = self.causes.failures();
        SeriesStats {
            requests: self.requests,
            errors,
            error_rate: ratio(errors, self.requests),
            client_errors: self.causes.get(Cause::ClientError),
            cancelled: self.causes.get(Cause::Cancelled),
            by_cause: self.causes.named(),
            cache_hits: self.cache_hits,
            rps: self.rate.per_second(now),
            latency_ms: Summary::of(&self.latency),
            ttft_ms: Summary::of(&self.ttft),
            inter_token_ms: Summary::of(&self.inter_token),
            tokens: self.tokens,
            last_minute: recent,
        }
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, HISTOGRAM_MAX_US)
}

/// Requests counted per whole second over the last [`RATE_WINDOW_SECS`] seconds.
#[derive(Default)]
struct RateWindow {
    origin: Option<Instant>,
    buckets: [(u64, u64); RATE_WINDOW_SECS],
}

impl RateWindow {
    fn second(&mut self, now: Instant) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        now.saturating_duration_since(origin).as_secs()
    }

    fn add(&mut self, now: Instant) {
        let second = self.second(now);
        let bucket = &mut self.buckets[second as usize % RATE_WINDOW_SECS];
        if bucket.0 != second {
            *bucket = (second, 0);
        }
        bucket.1 += 1;
    }

    /// Mean rate over the completed seconds of the window (the current partial second excluded).
    fn per_second(&self, now: Instant) -> f64 {
        let Some(origin) = self.origin else {
            return 0.0;
        };
        let current = now.saturating_duration_since(origin).as_secs();
        let span = current.min(RATE_WINDOW_SECS as u64);
        if span == 0 {
            return 0.0;
        }
        let count: u64 = self
            .buckets
            .iter()
            .filter(|(second, _)| *second < current && current - second <= span)
            .map(|(_, n)| n)
            .sum();
        count as f64 / span as f64
    }
}

#[derive(Serialize, Debug, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub min: f64,
    pub avg: f64,
    pub max: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Summary {
    fn of<T: hdrhistogram::Counter>(h: &Histogram<T>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Self {
            count: h.len(),
            min: ms(h.min()),
            avg: h.mean() / 1000.0,
            max: ms(h.max()),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
        })
    }
}

#[derive(Serialize)]
struct SeriesStats {
    requests: u64,
    /// The gateway's and backends' failures (everything but client errors and cancellations).
    errors: u64,
    error_rate: f64,
    client_errors: u64,
    cancelled: u64,
    by_cause: HashMap<&'static str, u64>,
    cache_hits: u64,
    rps: f64,
    latency_ms: Option<Summary>,
    ttft_ms: Option<Summary>,
    inter_token_ms: Option<Summary>,
    tokens: Tokens,
    last_minute: RecentStats,
}

/// Tokens counted from answers' usage.
#[derive(Serialize, Debug, Clone, Copy, Default, PartialEq)]
struct Tokens {
    prompt: u64,
    completion: u64,
    cached: u64,
    /// Answers whose usage the gateway estimated (the backend sent none).
    estimated_answers: u64,
}

impl Tokens {
    fn add(&mut self, usage: Option<TokenUsage>) {
        if let Some(u) = usage {
            self.prompt += u.prompt;
            self.completion += u.completion;
            self.cached += u.cached;
            self.estimated_answers += u64::from(u.estimated);
        }
    }

    fn merge(&mut self, other: &Tokens) {
        self.prompt += other.prompt;
        self.completion += other.completion;
        self.cached += other.cached;
        self.estimated_answers += other.estimated_answers;
    }

    fn per_second(&self, seconds: u64) -> TokenRates {
        let seconds = seconds.max(1) as f64;
        TokenRates {
            prompt: self.prompt as f64 / seconds,
            completion: self.completion as f64 / seconds,
        }
    }
}

#[derive(Serialize, Debug, Clone, Copy, Default, PartialEq)]
struct TokenRates {
    prompt: f64,
    completion: f64,
}

/// The same figures over the last minute only (since start, a p99 says little about now).
#[derive(Serialize)]
struct RecentStats {
    seconds: u64,
    requests: u64,
    errors: u64,
    error_rate: f64,
    by_cause: HashMap<&'static str, u64>,
    latency_ms: Option<Summary>,
    ttft_ms: Option<Summary>,
    tokens: Tokens,
    tokens_per_second: TokenRates,
}

// ===== Prometheus =====

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: String,
    model: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    endpoint: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointTokenLabels {
    endpoint: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelTokenLabels {
    model: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyTokenLabels {
    key: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyRequestLabels {
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UsageLogLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BufferLabels {
    buffer: &'static str,
}

/// Latency buckets, in seconds: 1 ms doubling to 524 s, and the default request timeout (600 s).
fn latency_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 20).chain([600.0]).collect()
}

struct Exposition {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    errors: Family<CauseLabels, Counter>,
    latency: Family<RouteLabels, PromHistogram>,
    ttft: Family<RouteLabels, PromHistogram>,
    inter_token: Family<RouteLabels, PromHistogram>,
    pool_size: Gauge,
    pool_busy: Gauge,
    pool_queued: Gauge,
    pool_refused: Counter,
    retries: Counter,
    retries_denied: Counter,
    failovers: Counter,
    hedges: Counter,
    hedges_won: Counter,
    endpoint_weight: Family<EndpointLabels, Gauge<f64, AtomicU64>>,
    endpoint_in_flight: Family<EndpointLabels, Gauge>,
    endpoint_healthy: Family<EndpointLabels, Gauge>,
    endpoint_ejections: Family<EndpointLabels, Counter>,
    dropped: Counter,
    buffered: Family<BufferLabels, Gauge>,
    endpoint_tokens: Family<EndpointTokenLabels, Counter>,
    model_tokens: Family<ModelTokenLabels, Counter>,
    key_tokens: Family<KeyTokenLabels, Counter>,
    key_requests: Family<KeyRequestLabels, Counter>,
    usage_log_records: Family<UsageLogLabels, Counter>,
    usage_log_buffered: Gauge,
}

impl Exposition {
    fn new() -> Self {
        let seconds = || -> Family<RouteLabels, PromHistogram> {
            Family::new_with_constructor(|| PromHistogram::new(latency_buckets()))
        };
        let mut e = Self {
            registry: Registry::with_prefix("nanogate"),
            requests: Family::default(),
            errors: Family::default(),
            latency: seconds(),
            ttft: seconds(),
            inter_token: Family::new_with_constructor(|| {
                PromHistogram::new(exponential_buckets(0.0005, 2.0, 14))
            }),
            pool_size: Gauge::default(),
            pool_busy: Gauge::default(),
            pool_queued: Gauge::default(),
            pool_refused: Counter::default(),
            retries: Counter::default(),
            retries_denied: Counter::default(),
            failovers: Counter::default(),
            hedges: Counter::default(),
            hedges_won: Counter::default(),
            endpoint_weight: Family::default(),
            endpoint_in_flight: Family::default(),
            endpoint_healthy: Family::default(),
            endpoint_ejections: Family::default(),
            dropped: Counter::default(),
            buffered: Family::default(),
            endpoint_tokens: Family::default(),
            model_tokens: Family::default(),
            key_tokens: Family::default(),
            key_requests: Family::default(),
            usage_log_records: Family::default(),
            usage_log_buffered: Gauge::default(),
        };
        let r = &mut e.registry;
        r.register(
            "requests",
            "Requests answered, by endpoint, model and status",
            e.requests.clone(),
        );
        r.register(
            "request_errors",
            "Requests that failed, by cause (client_error and cancelled are the client's doing)",
            e.errors.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Total request latency",
            e.latency.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "Time to the first token of a streamed answer",
            e.ttft.clone(),
        );
        r.register(
            "inter_token_latency_seconds",
            "Mean gap between streamed chunks per request",
            e.inter_token.clone(),
        );
        r.register(
            "pool_workers",
            "Worker pool size (admission slots)",
            e.pool_size.clone(),
        );
        r.register(
            "pool_busy",
            "Workers carrying a request",
            e.pool_busy.clone(),
        );
        r.register(
            "pool_queued",
            "Requests waiting for a worker",
            e.pool_queued.clone(),
        );
        r.register(
            "pool_refused",
            "Requests refused for overload",
            e.pool_refused.clone(),
        );
        r.register(
            "retries",
            "Requests retried on another backend",
            e.retries.clone(),
        );
        r.register(
            "retries_denied",
            "Retries the retry budget refused",
            e.retries_denied.clone(),
        );
        r.register(
            "failovers",
            "Requests moved off an endpoint found dead (no retry budget taken)",
            e.failovers.clone(),
        );
        r.register(
            "hedges",
            "Second attempts raced against a late first token",
            e.hedges.clone(),
        );
        r.register(
            "hedges_won",
            "Hedges that produced the first token first",
            e.hedges_won.clone(),
        );
        r.register(
            "endpoint_weight",
            "Balancer weight per endpoint",
            e.endpoint_weight.clone(),
        );
        r.register(
            "endpoint_in_flight",
            "Requests running per endpoint",
            e.endpoint_in_flight.clone(),
        );
        r.register(
            "endpoint_healthy",
            "1 when the endpoint is healthy",
            e.endpoint_healthy.clone(),
        );
        r.register(
            "endpoint_ejections",
            "Times live failures ejected the endpoint",
            e.endpoint_ejections.clone(),
        );
        r.register(
            "buffered_bytes",
            "Bytes held for requests in flight: request bodies, cache fills, relay channels",
            e.buffered.clone(),
        );
        r.register(
            "endpoint_tokens",
            "Tokens in answers per endpoint, by kind (prompt, completion, cached: prompt tokens the backend's prefix cache served)",
            e.endpoint_tokens.clone(),
        );
        r.register(
            "model_tokens",
            "Tokens in answers per model, by kind (prompt, completion, cached)",
            e.model_tokens.clone(),
        );
        r.register(
            "key_tokens",
            "Tokens in answers per API key, by kind (prompt, completion, cached)",
            e.key_tokens.clone(),
        );
        r.register(
            "key_requests",
            "Requests per API key",
            e.key_requests.clone(),
        );
        r.register(
            "usage_log_records",
            "Usage records written to the database, dropped on a full buffer, or deleted past the retention",
            e.usage_log_records.clone(),
        );
        r.register(
            "usage_log_buffered_records",
            "Usage records waiting to be written",
            e.usage_log_buffered.clone(),
        );
        r.register(
            "metrics_dropped_observations",
            "Observations dropped on a full mailbox",
            e.dropped.clone(),
        );
        e
    }
}

/// Sets a counter kept elsewhere (an atomic) to its current value.
fn sync_counter(counter: &Counter, value: u64) {
    let known = counter.get();
    if value > known {
        counter.inc_by(value - known);
    }
}

/// The classic Prometheus text format (0.0.4) from prometheus-client's OpenMetrics text: a
/// counter's `# HELP`/`# TYPE` name the `_total` samples, and OpenMetrics-only lines (`# UNIT`,
/// `# EOF`) go. Scrapers that do not ask for OpenMetrics (promtool, the Python client's text
/// parser, most tools) read this one.
fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => text.push_str(&line),
            None => text.push_str(line),
        }
        text.push('\n');
    }
    text
}

// ===== Metrics =====

pub struct Metrics {
    clock: SharedClock,
    view: BalancerView,
    admission: Admission,
    buffers: Arc<Buffers>,
    retry_budget: Arc<RetryBudget>,
    dropped: Arc<AtomicU64>,
    overall: Series,
    endpoints: FastMap<usize, Series>,
    models: FastMap<String, Series>,
    exposition: Exposition,
    /// Model → (endpoint, answered from cache, status) → its Prometheus series.
    routes: FastMap<String, FastMap<RouteKey, RouteMetrics>>,
    /// Per key: its series for `/stats` and its Prometheus counters, found with one lookup.
    keys: FastMap<Arc<str>, (Series, KeyMetrics)>,
    /// Endpoint URLs as the usage log's records share them.
    record_urls: FastMap<usize, Arc<str>>,
    /// Where each request's record goes, when the usage log is on.
    usage_log: Option<(Addr<UsageLog>, Arc<UsageLogCounters>)>,
    /// Records on their way to the usage log, sent once per batch of observations.
    records: Vec<UsageRecord>,
}

impl Metrics {
    pub fn new(
        clock: SharedClock,
        view: BalancerView,
        admission: Admission,
        buffers: Arc<Buffers>,
        retry_budget: Arc<RetryBudget>,
    ) -> Self {
        Self {
            clock,
            view,
            admission,
            buffers,
            retry_budget,
            dropped: Arc::new(AtomicU64::new(0)),
            overall: Series::new(),
            endpoints: FastMap::default(),
            models: FastMap::default(),
            exposition: Exposition::new(),
            routes: FastMap::default(),
            keys: FastMap::default(),
            record_urls: FastMap::default(),
            usage_log: None,
            records: Vec::new(),
        }
    }

    /// Sends every observation on to the usage log as a record.
    pub fn with_usage_log(mut self, log: Addr<UsageLog>, counters: Arc<UsageLogCounters>) -> Self {
        self.usage_log = Some((log, counters));
        self
    }

    /// Starts the actor under a supervisor on `arbiter` and returns the handle the request path
    /// uses (its drop counter is shared with this actor's stats).
    pub fn start_in(self, arbiter: &ArbiterHandle) -> MetricsHandle {
        let dropped = self.dropped.clone();
        let addr = Supervisor::start_in_arbiter(arbiter, move |_| self);
        MetricsHandle { addr, dropped }
    }

    fn endpoint_name(&self, id: Option<usize>, cache_hit: bool) -> String {
        match id {
            Some(id) => self
                .view
                .table()
                .by_id(id)
                .map(|e| e.url.clone())
                .unwrap_or_else(|| format!("#{id}")),
            None if cache_hit => "cache".to_string(),
            None => "gateway".to_string(),
        }
    }
}

impl Actor for Metrics {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
    }
}

impl Supervised for Metrics {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        log::warn!("metrics actor restarting; counters are kept");
    }
}

impl Handler<Observe> for Metrics {
    type Result = ();

    fn handle(&mut self, o: Observe, _ctx: &mut Self::Context) {
        self.record(o);
        self.send_records();
    }
}

impl Handler<Observations> for Metrics {
    type Result = ();

    fn handle(&mut self, batch: Observations, _ctx: &mut Self::Context) {
        for o in batch.0 {
            self.record(o);
        }
        self.send_records();
    }
}

/// The label of a model nobody is known to serve: such names come from clients, and must not
/// grow the number of series without bound.
const OTHER_MODEL: &str = "other";

impl Metrics {
    fn send_records(&mut self) {
        if let Some((log, _)) = &self.usage_log {
            if !self.records.is_empty() {
                log.do_send(Records(std::mem::take(&mut self.records)));
            }
        }
    }

    /// An endpoint's URL for the usage log, made once per endpoint rather than once per record.
    fn endpoint_url(&mut self, id: usize) -> Option<Arc<str>> {
        if let Some(url) = self.record_urls.get(&id) {
            return Some(url.clone());
        }
        let url: Arc<str> = Arc::from(self.view.table().by_id(id)?.url.as_str());
        self.record_urls.insert(id, url.clone());
        Some(url)
    }

    /// The usage log's record of an observation (before its model is folded into `other`).
    fn usage_record(&mut self, o: &Observe) -> UsageRecord {
        UsageRecord {
            at_ms: o.request.at_ms,
            // A header value holds no control characters, so UTF-8 is all that is left to check
            // (`to_str` checks each byte on its own, ~250 instructions for a UUID).
            request_id: o
                .request
                .id
                .as_ref()
                .and_then(|id| std::str::from_utf8(id.as_bytes()).ok())
                .unwrap_or_default()
                .to_string(),
            key: o.key.clone(),
            model: o.model.clone(),
            endpoint: o.endpoint.and_then(|id| self.endpoint_url(id)),
            status: o.status,
            usage: o.usage.unwrap_or_default(),
            ttft_ms: o.ttft.map(|d| d.as_secs_f64() * 1e3),
            latency_ms: o.latency.as_secs_f64() * 1e3,
            cache_hit: o.cache_hit,
            retries: o.request.retries,
            error: o.cause.map(Cause::name),
        }
    }

    fn record_key(&mut self, key: &Arc<str>, o: &Observe, now: Instant) {
        let (series, metrics) = match self.keys.get_mut(key) {
            Some(entry) => entry,
            None => {
                let e = &self.exposition;
                let metrics = KeyMetrics {
                    requests: e
                        .key_requests
                        .get_or_create(&KeyRequestLabels {
                            key: key.to_string(),
                        })
                        .clone(),
                    tokens: TOKEN_KINDS.map(|kind| {
                        e.key_tokens
                            .get_or_create(&KeyTokenLabels {
                                key: key.to_string(),
                                kind,
                            })
                            .clone()
                    }),
                };
                self.keys
                    .entry(key.clone())
                    .or_insert((Series::new(), metrics))
            }
        };
        series.record(o, now);
        metrics.requests.inc();
        if let Some(usage) = &o.usage {
            for (counter, count) in metrics.tokens.iter().zip(token_counts(usage)) {
                counter.inc_by(count);
            }
        }
    }

    fn record(&mut self, mut o: Observe) {
        let now = self.clock.now();
        if self.usage_log.is_some() {
            let record = self.usage_record(&o);
            self.records.push(record);
        }
        if o.model
            .as_deref()
            .is_some_and(|m| !self.view.table().serves(m))
        {
            o.model = Some(OTHER_MODEL.to_string());
        }
        self.overall.record(&o, now);
        if let Some(key) = &o.key {
            self.record_key(key, &o, now);
        }
        if let Some(id) = o.endpoint {
            self.endpoints
                .entry(id)
                .or_insert_with(Series::new)
                .record(&o, now);
        }
        if let Some(model) = &o.model {
            match self.models.get_mut(model) {
                Some(series) => series.record(&o, now),
                None => {
                    let mut series = Series::new();
                    series.record(&o, now);
                    self.models.insert(model.clone(), series);
                }
            }
        }
        if let Some(cause) = o.cause {
            self.exposition
                .errors
                .get_or_create(&CauseLabels {
                    cause: cause.name(),
                })
                .inc();
        }
        let metrics = self.route_metrics(&o);
        metrics.requests.inc();
        metrics.latency.observe(o.latency.as_secs_f64());
        if let Some(ttft) = o.ttft {
            metrics.ttft.observe(ttft.as_secs_f64());
        }
        if let Some(gap) = o.inter_token {
            metrics.inter_token.observe(gap.as_secs_f64());
        }
        if let Some(usage) = &o.usage {
            let counts = token_counts(usage);
            for (counter, count) in metrics.model_tokens.iter().flatten().zip(counts) {
                counter.inc_by(count);
            }
            for (counter, count) in metrics.endpoint_tokens.iter().flatten().zip(counts) {
                counter.inc_by(count);
            }
        }
    }
    /// The Prometheus series of an observation's labels, looked up once per label set: building
    /// label strings and hashing them for every request would cost more than the recording.
    fn route_metrics(&mut self, o: &Observe) -> &RouteMetrics {
        let model = o.model.as_deref().unwrap_or("-");
        let key = (o.endpoint, o.cache_hit, o.status);
        if !self.routes.get(model).is_some_and(|m| m.contains_key(&key)) {
            let route = RouteLabels {
                endpoint: self.endpoint_name(o.endpoint, o.cache_hit),
                model: model.to_string(),
            };
            let e = &self.exposition;
            let metrics = RouteMetrics {
                requests: e
                    .requests
                    .get_or_create(&RequestLabels {
                        endpoint: route.endpoint.clone(),
                        model: route.model.clone(),
                        status: o.status.to_string(),
                    })
                    .clone(),
                latency: e.latency.get_or_create(&route).clone(),
                ttft: e.ttft.get_or_create(&route).clone(),
                inter_token: e.inter_token.get_or_create(&route).clone(),
                endpoint_tokens: o.endpoint.map(|_| {
                    TOKEN_KINDS.map(|kind| {
                        e.endpoint_tokens
                            .get_or_create(&EndpointTokenLabels {
                                endpoint: route.endpoint.clone(),
                                kind,
                            })
                            .clone()
                    })
                }),
                model_tokens: o.model.as_ref().map(|_| {
                    TOKEN_KINDS.map(|kind| {
                        e.model_tokens
                            .get_or_create(&ModelTokenLabels {
                                model: route.model.clone(),
                                kind,
                            })
                            .clone()
                    })
                }),
            };
            self.routes
                .entry(model.to_string())
                .or_default()
                .insert(key, metrics);
        }
        &self.routes[model][&key]
    }
}

/// An observation's endpoint, whether the cache answered, and its status.
type RouteKey = (Option<usize>, bool, u16);

/// Handles on one label set's Prometheus series (they share state with the registry's).
struct RouteMetrics {
    requests: Counter,
    latency: PromHistogram,
    ttft: PromHistogram,
    inter_token: PromHistogram,
    /// By [`TOKEN_KINDS`]; the endpoint's only when an endpoint answered, the model's only when
    /// the request named one.
    endpoint_tokens: Option<[Counter; 3]>,
    model_tokens: Option<[Counter; 3]>,
}

/// The `kind` labels of the token counters, in [`token_counts`] order.
const TOKEN_KINDS: [&str; 3] = ["prompt", "completion", "cached"];

fn token_counts(usage: &TokenUsage) -> [u64; 3] {
    [usage.prompt, usage.completion, usage.cached]
}

/// A key's Prometheus series, looked up once.
struct KeyMetrics {
    requests: Counter,
    tokens: [Counter; 3],
}

impl Handler<RenderPrometheus> for Metrics {
    type Result = String;

    fn handle(&mut self, msg: RenderPrometheus, _ctx: &mut Self::Context) -> String {
        let e = &self.exposition;
        e.pool_size.set(self.admission.capacity() as i64);
        e.pool_busy.set(self.admission.busy() as i64);
        e.pool_queued.set(self.admission.queued() as i64);
        sync_counter(&e.pool_refused, self.admission.refused());
        sync_counter(&e.dropped, self.dropped.load(Ordering::Relaxed));
        let budget = self.retry_budget.stats();
        sync_counter(&e.retries, budget.retries);
        sync_counter(&e.retries_denied, budget.denied);
        sync_counter(&e.failovers, budget.failovers);
        sync_counter(&e.hedges, budget.hedges);
        sync_counter(&e.hedges_won, budget.hedges_won);
        let buffers = self.buffers.stats();
        for (buffer, bytes) in [
            ("request_bodies", buffers.request_bodies.bytes as i64),
            ("cache_fills", buffers.cache_fills.bytes as i64),
            ("relay", buffers.relay_bytes as i64),
        ] {
            e.buffered
                .get_or_create(&BufferLabels { buffer })
                .set(bytes);
        }
        // Only the endpoints of the table now: a removed one's last values would be exported for
        // good, and one added again under its URL counts its ejections from zero (a counter
        // reset, which scrapers handle).
        e.endpoint_weight.clear();
        e.endpoint_in_flight.clear();
        e.endpoint_healthy.clear();
        e.endpoint_ejections.clear();
        for endpoint in &self.view.table().endpoints {
            let labels = EndpointLabels {
                endpoint: endpoint.url.clone(),
            };
            e.endpoint_weight
                .get_or_create(&labels)
                .set(endpoint.weight());
            e.endpoint_in_flight
                .get_or_create(&labels)
                .set(i64::from(endpoint.in_flight()));
            e.endpoint_healthy
                .get_or_create(&labels)
                .set(i64::from(endpoint.is_healthy()));
            sync_counter(
                &e.endpoint_ejections.get_or_create(&labels),
                endpoint.ejections(),
            );
        }
        if let Some((_, counters)) = &self.usage_log {
            for (outcome, count) in [
                ("written", counters.written.load(Ordering::Relaxed)),
                ("dropped", counters.dropped.load(Ordering::Relaxed)),
                ("pruned", counters.pruned.load(Ordering::Relaxed)),
            ] {
                sync_counter(
                    &e.usage_log_records
                        .get_or_create(&UsageLogLabels { outcome }),
                    count,
                );
            }
            e.usage_log_buffered
                .set(counters.buffered.load(Ordering::Relaxed) as i64);
        }
        let mut text = String::new();
        if encode(&mut text, &e.registry).is_err() {
            log::error!("prometheus encoding failed");
        }
        if msg.openmetrics {
            text
        } else {
            classic_text(&text)
        }
    }
}

#[derive(Serialize)]
struct MetricsStats {
    overall: SeriesStats,
    endpoints: HashMap<String, SeriesStats>,
    models: HashMap<String, SeriesStats>,
    keys: HashMap<String, SeriesStats>,
    dropped_observations: u64,
    buffers: BufferStats,
}

impl Handler<GetStats> for Metrics {
    type Result = Stats;

    fn handle(&mut self, _msg: GetStats, _ctx: &mut Self::Context) -> Stats {
        let now = self.clock.now();
        let names: HashMap<usize, String> = self
            .endpoints
            .keys()
            .map(|&id| (id, self.endpoint_name(Some(id), false)))
            .collect();
        let stats = MetricsStats {
            overall: self.overall.stats(now),
            endpoints: self
                .endpoints
                .iter_mut()
                .map(|(id, s)| (names[id].clone(), s.stats(now)))
                .collect(),
            models: self
                .models
                .iter_mut()
                .map(|(m, s)| (m.clone(), s.stats(now)))
                .collect(),
            keys: self
                .keys
                .iter_mut()
                .map(|(k, (s, _))| (k.to_string(), s.stats(now)))
                .collect(),
            dropped_observations: self.dropped.load(Ordering::Relaxed),
            buffers: self.buffers.stats(),
        };
        Stats::of(&stats)
    }
}

impl Handler<Fail> for Metrics {
    type Result = ();

    fn handle(&mut self, _msg: Fail, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    #[test]
    fn rate_window_averages_completed_seconds() {
        let clock = ManualClock::default();
        let mut w = RateWindow::default();
        for _ in 0..30 {
            w.add(clock.now());
        }
        clock.advance(Duration::from_secs(1));
        for _ in 0..10 {
            w.add(clock.now());
        }
        clock.advance(Duration::from_secs(1));
        assert_eq!(w.per_second(clock.now()), 20.0);
        clock.advance(Duration::from_secs(20));
        assert_eq!(w.per_second(clock.now()), 0.0);
    }

    fn observe(status: u16, cause: Option<Cause>, ms: u64) -> Observe {
        Observe {
            endpoint: Some(0),
            model: Some("m".into()),
            status,
            cause,
            latency: Duration::from_millis(ms),
            ttft: Some(Duration::from_millis(2)),
            inter_token: None,
            cache_hit: false,
            usage: None,
            key: None,
            request: RequestFacts::default(),
        }
    }

    #[test]
    fn series_counts_failures_apart_from_client_errors_and_cancellations() {
        let mut s = Series::new();
        let now = Instant::now();
        s.record(&observe(200, None, 10), now);
        s.record(&observe(502, Some(Cause::Unreachable), 10), now);
        s.record(&observe(499, Some(Cause::Cancelled), 10), now);
        s.record(&observe(400, Some(Cause::ClientError), 10), now);
        let stats = s.stats(now);
        assert_eq!(stats.requests, 4);
        assert_eq!(
            (stats.errors, stats.client_errors, stats.cancelled),
            (1, 1, 1)
        );
        assert_eq!(stats.by_cause["unreachable"], 1);
        let latency = stats.latency_ms.unwrap();
        assert_eq!(latency.count, 4);
        assert!((latency.p50 - 10.0).abs() < 0.01);
        assert!((stats.ttft_ms.unwrap().max - 2.0).abs() < 0.01);
    }

    #[test]
    fn the_recent_window_forgets_what_is_older_than_a_minute() {
        let clock = ManualClock::default();
        let mut s = Series::new();
        for _ in 0..5 {
            s.record(&observe(200, None, 900), clock.now());
        }
        clock.advance(Duration::from_secs(45));
        s.record(&observe(503, Some(Cause::Overload), 5), clock.now());
        let stats = s.stats(clock.now());
        assert_eq!(stats.last_minute.requests, 6);
        clock.advance(Duration::from_secs(30));
        s.record(&observe(200, None, 5), clock.now());
        let stats = s.stats(clock.now());
        assert_eq!(stats.requests, 7, "totals keep everything");
        assert_eq!(
            stats.last_minute.requests, 2,
            "the first five are over a minute old"
        );
        assert_eq!(stats.last_minute.errors, 1);
        assert!(stats.last_minute.latency_ms.unwrap().max < 10.0);
        assert!(stats.latency_ms.unwrap().max > 800.0);
    }

    #[test]
    fn the_classic_format_names_counters_by_their_samples_and_drops_openmetrics_lines() {
        let openmetrics = "# HELP nanogate_requests Requests.\n# TYPE nanogate_requests counter\n\
            nanogate_requests_total{status=\"200\"} 3\n# HELP nanogate_pool_busy Busy.\n\
            # TYPE nanogate_pool_busy gauge\nnanogate_pool_busy 1\n# UNIT x seconds\n# EOF\n";
        assert_eq!(
            classic_text(openmetrics),
            "# HELP nanogate_requests_total Requests.\n# TYPE nanogate_requests_total counter\n\
             nanogate_requests_total{status=\"200\"} 3\n# HELP nanogate_pool_busy Busy.\n\
             # TYPE nanogate_pool_busy gauge\nnanogate_pool_busy 1\n"
        );
    }
}
