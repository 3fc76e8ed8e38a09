//! The metrics actor: request counters and HDR histograms (total latency, time to first token,
//! inter-token gap) overall, per endpoint and per model, a per-second request rate window, and the
//! Prometheus exposition. Observations arrive fire-and-forget after each request; a full mailbox
//! drops them (counted) instead of slowing requests down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use hdrhistogram::Histogram;
use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram as PromHistogram};
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::balancer::BalancerView;
use crate::buffers::{BufferStats, Buffers};
use crate::clock::SharedClock;
use crate::pool_supervisor::Admission;
use crate::{Fail, GetStats, Stats};

/// Seconds of history behind the requests-per-second figure.
const RATE_WINDOW_SECS: usize = 10;
/// Histograms cover 1 µs to one hour at 3 significant digits.
const HISTOGRAM_MAX_US: u64 = 3_600_000_000;
/// Mailbox size; beyond it observations are dropped and counted.
const MAILBOX: usize = 65_536;

/// What happened to one request, as the metrics actor records it.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Observe {
    /// The endpoint that answered, or `None` when the gateway answered itself (cache, errors).
    pub endpoint: Option<usize>,
    /// The requested model, or `None` when the request never named a servable one.
    pub model: Option<String>,
    pub status: u16,
    pub latency: Duration,
    /// Time until the first body chunk came back (the first token, for a stream).
    pub ttft: Option<Duration>,
    /// Mean gap between body chunks after the first, for a stream.
    pub inter_token: Option<Duration>,
    pub cache_hit: bool,
    /// The client went away before the response ended.
    pub cancelled: bool,
}

/// A thread's batch of observations.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Observations(pub Vec<Observe>);

/// Renders the Prometheus text exposition.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "String")]
pub struct RenderPrometheus;

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

/// Counters and histograms for one slice of traffic (all, one endpoint, one model).
struct Series {
    requests: u64,
    errors: u64,
    cancelled: u64,
    cache_hits: u64,
    latency: Histogram<u64>,
    ttft: Histogram<u64>,
    inter_token: Histogram<u64>,
    rate: RateWindow,
}

impl Series {
    fn new() -> Self {
        let histogram = || {
            Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3)
                .expect("constant histogram bounds are valid")
        };
        Self {
            requests: 0,
            errors: 0,
            cancelled: 0,
            cache_hits: 0,
            latency: histogram(),
            ttft: histogram(),
            inter_token: histogram(),
            rate: RateWindow::default(),
        }
    }

    fn record(&mut self, o: &Observe, now: Instant) {
        self.requests += 1;
        self.rate.add(now);
        if o.status >= 400 && !o.cancelled {
            self.errors += 1;
        }
        self.cancelled += u64::from(o.cancelled);
        self.cache_hits += u64::from(o.cache_hit);
        self.latency.saturating_record(micros(o.latency));
        if let Some(ttft) = o.ttft {
            self.ttft.saturating_record(micros(ttft));
        }
        if let Some(gap) = o.inter_token {
            self.inter_token.saturating_record(micros(gap));
        }
    }

    fn stats(&self, now: Instant) -> SeriesStats {
        SeriesStats {
            requests: self.requests,
            errors: self.errors,
            error_rate: if self.requests == 0 {
                0.0
            } else {
                self.errors as f64 / self.requests as f64
            },
            cancelled: self.cancelled,
            cache_hits: self.cache_hits,
            rps: self.rate.per_second(now),
            latency_ms: Summary::of(&self.latency),
            ttft_ms: Summary::of(&self.ttft),
            inter_token_ms: Summary::of(&self.inter_token),
        }
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
    fn of(h: &Histogram<u64>) -> Option<Self> {
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
    errors: u64,
    error_rate: f64,
    cancelled: u64,
    cache_hits: u64,
    rps: f64,
    latency_ms: Option<Summary>,
    ttft_ms: Option<Summary>,
    inter_token_ms: Option<Summary>,
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

struct Exposition {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, PromHistogram>,
    ttft: Family<RouteLabels, PromHistogram>,
    inter_token: Family<RouteLabels, PromHistogram>,
    pool_size: Gauge,
    pool_busy: Gauge,
    pool_queued: Gauge,
    pool_refused: Gauge,
    endpoint_weight: Family<EndpointLabels, Gauge<f64, AtomicU64>>,
    endpoint_in_flight: Family<EndpointLabels, Gauge>,
    endpoint_healthy: Family<EndpointLabels, Gauge>,
    dropped: Gauge,
    buffered: Family<BufferLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BufferLabels {
    buffer: &'static str,
}

impl Exposition {
    fn new() -> Self {
        let seconds = || -> Family<RouteLabels, PromHistogram> {
            Family::new_with_constructor(|| PromHistogram::new(exponential_buckets(0.001, 2.0, 18)))
        };
        let mut e = Self {
            registry: Registry::with_prefix("nanogate"),
            requests: Family::default(),
            latency: seconds(),
            ttft: seconds(),
            inter_token: Family::new_with_constructor(|| {
                PromHistogram::new(exponential_buckets(0.0005, 2.0, 14))
            }),
            pool_size: Gauge::default(),
            pool_busy: Gauge::default(),
            pool_queued: Gauge::default(),
            pool_refused: Gauge::default(),
            endpoint_weight: Family::default(),
            endpoint_in_flight: Family::default(),
            endpoint_healthy: Family::default(),
            dropped: Gauge::default(),
            buffered: Family::default(),
        };
        let r = &mut e.registry;
        r.register(
            "requests",
            "Requests answered, by endpoint, model and status",
            e.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Total request latency",
            e.latency.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "Time to the first response chunk",
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
            "Requests refused for overload since start",
            e.pool_refused.clone(),
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
            "buffered_bytes",
            "Bytes held for requests in flight: request bodies, cache fills, relay channels",
            e.buffered.clone(),
        );
        r.register(
            "metrics_dropped_observations",
            "Observations dropped on a full mailbox",
            e.dropped.clone(),
        );
        e
    }
}

// ===== Metrics =====

pub struct Metrics {
    clock: SharedClock,
    view: BalancerView,
    admission: Admission,
    buffers: Arc<Buffers>,
    dropped: Arc<AtomicU64>,
    overall: Series,
    endpoints: HashMap<usize, Series>,
    models: HashMap<String, Series>,
    exposition: Exposition,
    /// Model → (endpoint, answered from cache, status) → its Prometheus series.
    routes: HashMap<String, HashMap<RouteKey, RouteMetrics>>,
}

impl Metrics {
    pub fn new(
        clock: SharedClock,
        view: BalancerView,
        admission: Admission,
        buffers: Arc<Buffers>,
    ) -> Self {
        Self {
            clock,
            view,
            admission,
            buffers,
            dropped: Arc::new(AtomicU64::new(0)),
            overall: Series::new(),
            endpoints: HashMap::new(),
            models: HashMap::new(),
            exposition: Exposition::new(),
            routes: HashMap::new(),
        }
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
    }
}

impl Handler<Observations> for Metrics {
    type Result = ();

    fn handle(&mut self, batch: Observations, _ctx: &mut Self::Context) {
        for o in batch.0 {
            self.record(o);
        }
    }
}

impl Metrics {
    fn record(&mut self, o: Observe) {
        let now = self.clock.now();
        self.overall.record(&o, now);
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
        let metrics = self.route_metrics(&o);
        metrics.requests.inc();
        metrics.latency.observe(o.latency.as_secs_f64());
        if let Some(ttft) = o.ttft {
            metrics.ttft.observe(ttft.as_secs_f64());
        }
        if let Some(gap) = o.inter_token {
            metrics.inter_token.observe(gap.as_secs_f64());
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
}

impl Handler<RenderPrometheus> for Metrics {
    type Result = String;

    fn handle(&mut self, _msg: RenderPrometheus, _ctx: &mut Self::Context) -> String {
        let e = &self.exposition;
        e.pool_size.set(self.admission.capacity() as i64);
        e.pool_busy.set(self.admission.busy() as i64);
        e.pool_queued.set(self.admission.queued() as i64);
        e.pool_refused.set(self.admission.refused() as i64);
        e.dropped.set(self.dropped.load(Ordering::Relaxed) as i64);
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
        }
        let mut text = String::new();
        if encode(&mut text, &e.registry).is_err() {
            log::error!("prometheus encoding failed");
        }
        text
    }
}

#[derive(Serialize)]
struct MetricsStats {
    overall: SeriesStats,
    endpoints: HashMap<String, SeriesStats>,
    models: HashMap<String, SeriesStats>,
    dropped_observations: u64,
    buffers: BufferStats,
}

impl Handler<GetStats> for Metrics {
    type Result = Stats;

    fn handle(&mut self, _msg: GetStats, _ctx: &mut Self::Context) -> Stats {
        let now = self.clock.now();
        let stats = MetricsStats {
            overall: self.overall.stats(now),
            endpoints: self
                .endpoints
                .iter()
                .map(|(&id, s)| (self.endpoint_name(Some(id), false), s.stats(now)))
                .collect(),
            models: self
                .models
                .iter()
                .map(|(m, s)| (m.clone(), s.stats(now)))
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

    #[test]
    fn series_counts_errors_but_not_cancellations() {
        let mut s = Series::new();
        let now = Instant::now();
        let observe = |status, cancelled| Observe {
            endpoint: Some(0),
            model: Some("m".into()),
            status,
            latency: Duration::from_millis(10),
            ttft: Some(Duration::from_millis(2)),
            inter_token: None,
            cache_hit: false,
            cancelled,
        };
        s.record(&observe(200, false), now);
        s.record(&observe(502, false), now);
        s.record(&observe(499, true), now);
        let stats = s.stats(now);
        assert_eq!(stats.requests, 3);
        assert_eq!(stats.errors, 1);
        assert_eq!(stats.cancelled, 1);
        let latency = stats.latency_ms.unwrap();
        assert_eq!(latency.count, 3);
        assert!((latency.p50 - 10.0).abs() < 0.01);
        assert!((stats.ttft_ms.unwrap().max - 2.0).abs() < 0.01);
    }
}
