//! The balancer: single writer of the endpoint set and of each endpoint's weight, health,
//! circuit, latency estimate and reported load. It publishes a [`BalancerView`] (an `ArcSwap` of
//! the [`RoutingTable`]) that workers pick from without waiting on this actor's mailbox; facts
//! arrive as fire-and-forget messages (outcome batches from the HTTP threads, verdicts and load
//! from the health checker) and operators change the endpoint set through the admin API and
//! config reloads.
//!
//! Weights (policy `weighted`): every endpoint starts at its configured weight; a success
//! multiplies it by `success_factor` (capped at `max_weight`), a failure by `failure_factor`
//! (floored at `min_weight`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::breaker::{Breaker, BreakerSettings, Circuit};
use crate::clock::SharedClock;
use crate::endpoint::{Endpoint, EndpointSpec, RoutingTable, MAX_ENDPOINTS};
use crate::estimator::{Churn, Estimator, Sample};
use crate::policy::{PolicyKind, PolicySettings};
use crate::retry_budget::RetryBudget;
use crate::{Fail, GetStats, Stats};

/// How often open circuits are checked for the end of their cool-down (and slow-start ramps move).
const BREAKER_TICK: Duration = Duration::from_millis(50);
/// Tokens per prefix-index block: 64 bytes of English text.
const TOKENS_PER_BLOCK: f64 = 16.0;

/// How often every estimate decays toward its long-run value.
const ESTIMATE_TICK: Duration = Duration::from_secs(1);

/// Routing policy and its tuning; defaults documented in `config/default.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancerSettings {
    pub policy: PolicyKind,
    pub affinity_load_factor: f64,
    /// Cache-aware routing: prompt blocks the gateway indexes per endpoint until the backend
    /// reports its cache's size (in 64-byte blocks of about 16 tokens), the most it indexes
    /// whatever the backend reports, and the most blocks of a prompt it looks at.
    pub prefix_index_blocks: usize,
    pub prefix_index_max_blocks: usize,
    pub prefix_max_blocks: usize,
    /// An endpoint that comes back takes a share of traffic that ramps up over this long.
    pub slow_start_ms: u64,
    /// Time constant of the latency estimate's decay.
    pub latency_decay_ms: u64,
    pub success_factor: f64,
    pub failure_factor: f64,
    pub max_weight: f64,
    pub min_weight: f64,
    pub eject_after_failures: u32,
    pub ejection_cooldown_ms: u64,
    pub max_ejection_cooldown_ms: u64,
    /// Mailbox size; outcome batches beyond it are dropped and counted rather than queued
    /// without bound.
    pub mailbox: usize,
}

impl Default for BalancerSettings {
    fn default() -> Self {
        let policy = PolicySettings::default();
        let breaker = BreakerSettings::default();
        Self {
            policy: policy.policy,
            affinity_load_factor: policy.affinity_load_factor,
            prefix_index_blocks: 8192,
            prefix_index_max_blocks: 262_144,
            prefix_max_blocks: 512,
            slow_start_ms: 30_000,
            latency_decay_ms: 10_000,
            success_factor: 1.1,
            failure_factor: 0.5,
            max_weight: 10.0,
            min_weight: 0.1,
            eject_after_failures: breaker.eject_after_failures,
            ejection_cooldown_ms: breaker.cooldown_ms,
            max_ejection_cooldown_ms: breaker.max_cooldown_ms,
            mailbox: 65_536,
        }
    }
}

impl BalancerSettings {
    /// The weight after one outcome.
    pub fn next_weight(&self, weight: f64, success: bool) -> f64 {
        if success {
            (weight * self.success_factor).min(self.max_weight)
        } else {
            (weight * self.failure_factor).max(self.min_weight)
        }
    }

    pub fn policy_settings(&self) -> PolicySettings {
        PolicySettings {
            policy: self.policy,
            affinity_load_factor: self.affinity_load_factor,
            prefix_max_blocks: self.prefix_max_blocks,
        }
    }

    pub fn breaker_settings(&self) -> BreakerSettings {
        BreakerSettings {
            eject_after_failures: self.eject_after_failures,
            cooldown_ms: self.ejection_cooldown_ms,
            max_cooldown_ms: self.max_ejection_cooldown_ms,
        }
    }
}

// ===== BalancerView =====

/// What the request path reads: the current routing table, swapped whole when it changes.
#[derive(Debug, Clone)]
pub struct BalancerView {
    table: Arc<ArcSwap<RoutingTable>>,
    dropped_outcomes: Arc<AtomicU64>,
    /// Told when a request asks for an endpoint's load to be read
    /// ([`Endpoint::begin_prefill`]): what wakes the health checker for it.
    load_wanted: Arc<tokio::sync::Notify>,
}

impl BalancerView {
    /// A short-lived borrow of the current table; hold it only within synchronous code.
    pub fn table(&self) -> arc_swap::Guard<Arc<RoutingTable>> {
        self.table.load()
    }

    /// An owned reference to the current table, for holding across an `await`.
    pub fn table_arc(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// What the endpoints tell when a request asks for a read of their load.
    pub fn load_wanted(&self) -> Arc<tokio::sync::Notify> {
        self.load_wanted.clone()
    }

    /// Sends outcomes without waiting; when the mailbox is full they are dropped and counted.
    pub fn report(&self, balancer: &Addr<Balancer>, outcomes: Outcomes) {
        let count = outcomes.0.len() as u64;
        if balancer.try_send(outcomes).is_err() {
            self.dropped_outcomes.fetch_add(count, Ordering::Relaxed);
        }
    }
}

// ===== messages =====

/// How one request went on one endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// The endpoint's id.
    pub endpoint: usize,
    pub verdict: Verdict,
}

/// What an outcome says about its endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// It answered; what the answer teaches about it.
    Success(Sample),
    /// It failed live (5xx, timeout, garbage, a broken answer).
    Failure,
    /// It is gone: it refused a fresh connection, or a probe found it hung. Ejected at once.
    Dead,
}

impl Verdict {
    pub fn is_success(&self) -> bool {
        matches!(self, Verdict::Success(_))
    }
}

/// A thread's batch of outcomes, in the order they happened.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Outcomes(pub Vec<Outcome>);

/// The health checker's verdict changed.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct HealthChanged {
    pub endpoint: usize,
    pub healthy: bool,
}

/// The probe that decided it was an out-of-band one (requests may be waiting for its verdict).
impl HealthChanged {
    fn log(&self, url: &str) {
        let state = if self.healthy { "healthy" } else { "unhealthy" };
        log::info!("endpoint {url} is now {state}");
    }
}

/// The models an endpoint reported on its `/v1/models`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct ModelsLearned {
    pub endpoint: usize,
    pub models: Vec<String>,
}

/// The load an endpoint reported on its `/metrics`.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct BackendLoad {
    pub endpoint: usize,
    pub running: f64,
    pub waiting: f64,
    pub kv_cache: f64,
    pub cache_tokens: Option<f64>,
    pub binds_slots: bool,
}

/// Adds an endpoint; answers its id.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<usize, String>")]
pub struct AddEndpoint(pub EndpointSpec);

/// Removes an endpoint: no new requests; requests on it finish. Answers whether it existed.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "bool")]
pub struct RemoveEndpoint(pub usize);

/// Stops new requests to an endpoint while its in-flight ones finish (or, with `false`, lets it
/// take traffic again). Answers whether it existed.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "bool")]
pub struct DrainEndpoint {
    pub endpoint: usize,
    pub drain: bool,
}

/// Makes the endpoint set equal to `specs` (a config reload): endpoints whose spec is unchanged
/// keep their state, new ones are added, missing ones are removed, and one whose spec changed (a
/// rotated `api_key`, other models) is replaced, counted as removed and added.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reloaded")]
pub struct ReplaceEndpoints(pub Vec<EndpointSpec>);

/// The configured specs of the current endpoints, for the admin API's listing.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Vec<(usize, EndpointSpec)>")]
pub struct ListEndpoints;

#[derive(MessageResponse, Debug, Clone, Default, PartialEq, Serialize)]
pub struct Reloaded {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub kept: usize,
}

// ===== Balancer =====

/// Takes a removed endpoint out of the routing tables that requests in flight still hold (each
/// loads the table once, and its retries and hedges pick from that one): draining, it is picked
/// no more, and its requests in flight end as they would.
fn retire(entry: &Entry) {
    entry.endpoint.set_draining(true);
}

/// The same backend, configured the same: its URL up to a trailing slash, and every setting.
fn unchanged(new: &EndpointSpec, old: &EndpointSpec) -> bool {
    let settings = |spec: &EndpointSpec| EndpointSpec {
        url: spec.base_url().to_string(),
        ..spec.clone()
    };
    settings(new) == settings(old)
}

/// What the balancer knows about one endpoint beyond what it publishes.
struct Entry {
    endpoint: Arc<Endpoint>,
    spec: EndpointSpec,
    /// Known models (`None` until configured or learned).
    models: Option<Vec<String>>,
    breaker: Breaker,
    estimator: Estimator,
    /// Since when it has been ramping up after coming back (slow start).
    ramping_since: Option<Instant>,
    /// Its share of the fleet's answers, as of the last estimate tick.
    share: f64,
}

pub struct Balancer {
    settings: BalancerSettings,
    clock: SharedClock,
    view: BalancerView,
    entries: Vec<Entry>,
    next_id: usize,
    retry_budget: Arc<RetryBudget>,
    outcomes: u64,
}

impl Balancer {
    /// Builds the actor and the view it publishes.
    pub fn new(
        settings: BalancerSettings,
        specs: &[EndpointSpec],
        clock: SharedClock,
        retry_budget: Arc<RetryBudget>,
    ) -> Self {
        let empty = RoutingTable::new(Vec::new(), &[], &settings.policy_settings());
        let mut balancer = Self {
            view: BalancerView {
                table: Arc::new(ArcSwap::from_pointee(empty)),
                dropped_outcomes: Arc::new(AtomicU64::new(0)),
                load_wanted: Arc::new(tokio::sync::Notify::new()),
            },
            settings,
            clock,
            entries: Vec::new(),
            next_id: 0,
            retry_budget,
            outcomes: 0,
        };
        for spec in specs {
            balancer.insert(spec.clone(), true);
        }
        balancer.publish();
        balancer
    }

    pub fn view(&self) -> BalancerView {
        self.view.clone()
    }

    /// Adds an endpoint; `healthy` says whether it takes traffic before its first probe.
    fn insert(&mut self, spec: EndpointSpec, healthy: bool) -> usize {
        let id = self.next_id;
        self.next_id += 1;
        self.entries.push(Entry {
            endpoint: Arc::new(
                Endpoint::new(id, &spec, healthy)
                    .with_prefix_index(if self.settings.policy == PolicyKind::CacheAware {
                        spec.cache_blocks
                            .unwrap_or(self.settings.prefix_index_blocks)
                    } else {
                        0
                    })
                    .with_load_wanted(self.view.load_wanted()),
            ),
            models: (!spec.models.is_empty()).then(|| spec.models.clone()),
            spec,
            breaker: Breaker::default(),
            estimator: Estimator::default(),
            ramping_since: None,
            share: 0.0,
        });
        id
    }

    /// Rebuilds the routing table after the endpoint set or a model list changed.
    fn publish(&mut self) {
        let endpoints = self.entries.iter().map(|e| e.endpoint.clone()).collect();
        let models: Vec<Option<Vec<String>>> =
            self.entries.iter().map(|e| e.models.clone()).collect();
        let table = RoutingTable::new(endpoints, &models, &self.settings.policy_settings());
        self.view.table.store(Arc::new(table));
    }

    fn entry(&mut self, id: usize) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.endpoint.id == id)
    }

    fn record(&mut self, outcome: Outcome) {
        self.outcomes += 1;
        let now = self.clock.now();
        let settings = &self.settings;
        let tau = Duration::from_millis(settings.latency_decay_ms.max(1));
        let breaker = settings.breaker_settings();
        let slow_start = Duration::from_millis(settings.slow_start_ms);
        let Some(entry) = self
            .entries
            .iter_mut()
            .find(|e| e.endpoint.id == outcome.endpoint)
        else {
            return;
        };
        let endpoint = entry.endpoint.clone();
        let success = outcome.verdict.is_success();
        endpoint.set_weight(settings.next_weight(endpoint.weight(), success));
        let changed = match outcome.verdict {
            Verdict::Success(sample) => {
                entry.estimator.observe(sample, now, tau);
                publish_latency(entry);
                entry.breaker.record(true, now, &breaker)
            }
            Verdict::Failure => entry.breaker.record(false, now, &breaker),
            Verdict::Dead => entry.breaker.eject(now, &breaker),
        };
        endpoint.set_circuit(
            entry.breaker.circuit(),
            entry.breaker.consecutive_failures(),
        );
        if let Some(circuit) = changed {
            match circuit {
                Circuit::Open => endpoint.count_ejection(),
                Circuit::Closed => entry.ramping_since = Some(now),
                Circuit::HalfOpen => {}
            }
            log_circuit(&endpoint, circuit);
        }
        publish_estimate(entry, now, slow_start);
    }

    /// Decays every estimate for the time gone by, and moves slow-start ramps along.
    fn tick_estimates(&mut self) {
        let now = self.clock.now();
        let tau = Duration::from_millis(self.settings.latency_decay_ms.max(1));
        let slow_start = Duration::from_millis(self.settings.slow_start_ms);
        let rates: Vec<f64> = self
            .entries
            .iter_mut()
            .map(|entry| entry.estimator.rate_tick(now, tau))
            .collect();
        let total: f64 = rates.iter().sum();
        for (entry, rate) in self.entries.iter_mut().zip(rates) {
            entry.share = if total > 0.0 { rate / total } else { 0.0 };
            entry.estimator.decay(now, tau);
            let prefix = &entry.endpoint.prefix;
            entry.estimator.cache_churn(
                Churn {
                    misses: prefix.misses(),
                    sent: prefix.sent(),
                    recurred: prefix.recurred(),
                },
                now,
                tau,
            );
            publish_latency(entry);
            publish_estimate(entry, now, slow_start);
        }
    }
}

/// Publishes an endpoint's time to first byte: the peak-EWMA (`affinity`) and its average (`p2c`).
fn publish_latency(entry: &Entry) {
    entry
        .endpoint
        .set_latency_ms(entry.estimator.first_byte_ms());
    entry
        .endpoint
        .set_latency_mean_ms(entry.estimator.first_byte_mean_ms());
}

/// Publishes an endpoint's estimates, with its slow-start share at `now`.
fn publish_estimate(entry: &mut Entry, now: Instant, slow_start: Duration) {
    let ramp = match entry.ramping_since {
        Some(since) if !slow_start.is_zero() => {
            let share =
                now.saturating_duration_since(since).as_secs_f64() / slow_start.as_secs_f64();
            if share >= 1.0 {
                entry.ramping_since = None;
            }
            share.clamp(0.05, 1.0)
        }
        _ => 1.0,
    };
    let cache_blocks = entry.endpoint.prefix.cache_blocks();
    entry
        .endpoint
        .publish_estimate(entry.estimator.published(ramp, cache_blocks, entry.share));
    let (ttft, full) = entry.estimator.p95_ms();
    entry.endpoint.set_p95_ms(ttft, full);
}

fn log_circuit(endpoint: &Endpoint, circuit: Circuit) {
    match circuit {
        Circuit::Open => log::warn!("endpoint {} ejected after live failures", endpoint.url),
        Circuit::HalfOpen => log::info!("endpoint {} half-open: one trial request", endpoint.url),
        Circuit::Closed => log::info!("endpoint {} back in rotation", endpoint.url),
    }
}

impl Actor for Balancer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.settings.mailbox);
        ctx.run_interval(ESTIMATE_TICK, |this, _| this.tick_estimates());
        ctx.run_interval(BREAKER_TICK, |this, _| {
            let now = this.clock.now();
            let slow_start = Duration::from_millis(this.settings.slow_start_ms);
            for entry in &mut this.entries {
                if entry.ramping_since.is_some() {
                    publish_estimate(entry, now, slow_start);
                }
                if let Some(circuit) = entry.breaker.tick(now) {
                    entry
                        .endpoint
                        .set_circuit(circuit, entry.breaker.consecutive_failures());
                    log_circuit(&entry.endpoint, circuit);
                }
            }
        });
    }
}

impl Supervised for Balancer {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        log::warn!("balancer restarting; endpoints and their state are kept");
    }
}

impl Handler<Outcomes> for Balancer {
    type Result = ();

    fn handle(&mut self, msg: Outcomes, _ctx: &mut Self::Context) {
        for outcome in msg.0 {
            self.record(outcome);
        }
    }
}

impl Handler<HealthChanged> for Balancer {
    type Result = ();

    fn handle(&mut self, msg: HealthChanged, _ctx: &mut Self::Context) {
        let now = self.clock.now();
        if let Some(entry) = self.entry(msg.endpoint) {
            msg.log(&entry.endpoint.url);
            if msg.healthy && !entry.endpoint.is_healthy() {
                entry.ramping_since = Some(now);
            }
            entry.endpoint.set_healthy(msg.healthy);
            // Requests waiting on a probe's verdict see the new health at once.
            entry.endpoint.probe_done();
        }
    }
}

impl Handler<ModelsLearned> for Balancer {
    type Result = ();

    fn handle(&mut self, msg: ModelsLearned, _ctx: &mut Self::Context) {
        let Some(entry) = self.entry(msg.endpoint) else {
            return;
        };
        if entry.models.as_ref() == Some(&msg.models) {
            return;
        }
        entry.models = Some(msg.models);
        self.publish();
    }
}

impl Handler<BackendLoad> for Balancer {
    type Result = ();

    fn handle(&mut self, msg: BackendLoad, _ctx: &mut Self::Context) {
        let cache_aware = self.settings.policy == PolicyKind::CacheAware;
        let max_blocks = self.settings.prefix_index_max_blocks.max(1);
        let now = self.clock.now();
        let slow_start = Duration::from_millis(self.settings.slow_start_ms);
        if let Some(entry) = self.entry(msg.endpoint) {
            entry
                .endpoint
                .set_reported_load(msg.running, msg.waiting, msg.kv_cache);
            entry.endpoint.set_binds_slots(msg.binds_slots);
            let capacity = entry.endpoint.estimate().capacity;
            entry.estimator.reported(msg.running, msg.waiting);
            // A capacity learned or guessed anew counts at once, not at the next tick: it is
            // what a read asked for by requests past the old guess was for.
            if entry.estimator.capacity() != capacity {
                publish_estimate(entry, now, slow_start);
            }
            let configured = entry.spec.cache_blocks.is_some();
            if let Some(tokens) = msg.cache_tokens.filter(|_| !configured) {
                let blocks = (tokens / TOKENS_PER_BLOCK) as usize;
                let blocks = blocks.clamp(1, max_blocks);
                if cache_aware && entry.endpoint.prefix.resize(blocks) {
                    log::info!(
                        "{}: indexing {blocks} prompt blocks, the size of its prefix cache",
                        entry.endpoint.url
                    );
                }
            }
        }
    }
}

impl Handler<AddEndpoint> for Balancer {
    type Result = Result<usize, String>;

    fn handle(&mut self, msg: AddEndpoint, _ctx: &mut Self::Context) -> Self::Result {
        let url = msg.0.base_url().to_string();
        if self.entries.iter().any(|e| e.endpoint.url == url) {
            return Err(format!("an endpoint with url {url} exists already"));
        }
        if self.entries.len() >= MAX_ENDPOINTS {
            return Err(format!("at most {MAX_ENDPOINTS} endpoints are supported"));
        }
        let id = self.insert(msg.0, false);
        self.publish();
        log::info!("endpoint {url} added as #{id}; it takes traffic once a health probe passes");
        Ok(id)
    }
}

impl Handler<RemoveEndpoint> for Balancer {
    type Result = bool;

    fn handle(&mut self, msg: RemoveEndpoint, _ctx: &mut Self::Context) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| {
            let keep = e.endpoint.id != msg.0;
            if !keep {
                retire(e);
            }
            keep
        });
        let removed = self.entries.len() < before;
        if removed {
            self.publish();
            log::info!("endpoint #{} removed", msg.0);
        }
        removed
    }
}

impl Handler<DrainEndpoint> for Balancer {
    type Result = bool;

    fn handle(&mut self, msg: DrainEndpoint, _ctx: &mut Self::Context) -> bool {
        match self.entry(msg.endpoint) {
            Some(entry) => {
                entry.endpoint.set_draining(msg.drain);
                true
            }
            None => false,
        }
    }
}

impl Handler<ReplaceEndpoints> for Balancer {
    type Result = Reloaded;

    fn handle(&mut self, msg: ReplaceEndpoints, _ctx: &mut Self::Context) -> Reloaded {
        let mut reloaded = Reloaded::default();
        self.entries.retain(|e| {
            let keep = msg.0.iter().any(|spec| unchanged(spec, &e.spec));
            if !keep {
                retire(e);
                reloaded.removed.push(e.endpoint.url.clone());
            }
            keep
        });
        for spec in msg.0.into_iter().take(MAX_ENDPOINTS) {
            match self
                .entries
                .iter()
                .position(|e| e.endpoint.url == spec.base_url())
            {
                Some(_) => reloaded.kept += 1,
                None => {
                    reloaded.added.push(spec.base_url().to_string());
                    self.insert(spec, false);
                }
            }
        }
        self.publish();
        log::info!(
            "endpoints reloaded: {} added, {} removed, {} kept",
            reloaded.added.len(),
            reloaded.removed.len(),
            reloaded.kept
        );
        reloaded
    }
}

impl Handler<ListEndpoints> for Balancer {
    type Result = MessageResult<ListEndpoints>;

    fn handle(&mut self, _msg: ListEndpoints, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(
            self.entries
                .iter()
                .map(|e| (e.endpoint.id, e.spec.clone()))
                .collect(),
        )
    }
}

#[derive(Serialize)]
struct EndpointStats {
    id: usize,
    url: String,
    weight: f64,
    in_flight: u32,
    healthy: bool,
    draining: bool,
    circuit: Circuit,
    consecutive_failures: u32,
    /// Ejections in a row without a success (they set the cool-down).
    ejections: u32,
    /// Ejections since the endpoint was added.
    ejections_total: u64,
    reopens_in_ms: Option<u128>,
    latency_ewma_ms: f64,
    /// Running and waiting requests and KV-cache use, as the backend last reported them.
    reported: ReportedLoad,
    /// What the cost models read (a residence of `null` means no block has been sent lately).
    estimate: crate::endpoint::Estimate,
    ttft_p95_ms: f64,
    full_p95_ms: f64,
    prefix_index: PrefixIndexStats,
    /// Requests that waited for a prefill of their prompt's prefix here (see `crate::prefills`).
    prefill_holds: u64,
    models: Option<Vec<String>>,
}

#[derive(Serialize)]
struct PrefixIndexStats {
    cache_blocks: usize,
    slots: usize,
    bytes: usize,
    misses: u64,
}

#[derive(Serialize)]
struct ReportedLoad {
    running: f64,
    waiting: f64,
    kv_cache: f64,
    /// A llama.cpp server: a prompt stays in its request's slot until that request ends.
    binds_slots: bool,
}

#[derive(Serialize)]
struct BalancerStats {
    policy: &'static str,
    endpoints: Vec<EndpointStats>,
    outcomes: u64,
    dropped_outcomes: u64,
    retry_budget: crate::retry_budget::RetryBudgetStats,
}

impl Handler<GetStats> for Balancer {
    type Result = Stats;

    fn handle(&mut self, _msg: GetStats, _ctx: &mut Self::Context) -> Stats {
        let now = self.clock.now();
        let stats = BalancerStats {
            policy: self.view.table().policy().name(),
            endpoints: self
                .entries
                .iter()
                .map(|entry| {
                    let e = &entry.endpoint;
                    EndpointStats {
                        id: e.id,
                        url: e.url.clone(),
                        weight: e.weight(),
                        in_flight: e.in_flight(),
                        healthy: e.is_healthy(),
                        draining: e.is_draining(),
                        circuit: entry.breaker.circuit(),
                        consecutive_failures: entry.breaker.consecutive_failures(),
                        ejections: entry.breaker.ejections(),
                        ejections_total: e.ejections(),
                        reopens_in_ms: entry.breaker.reopens_in(now).map(|d| d.as_millis()),
                        latency_ewma_ms: e.latency_ms(),
                        reported: {
                            let (running, waiting, kv_cache) = e.reported_load();
                            ReportedLoad {
                                running,
                                waiting,
                                kv_cache,
                                binds_slots: e.binds_slots(),
                            }
                        },
                        estimate: e.estimate(),
                        ttft_p95_ms: e.p95_ms().0,
                        full_p95_ms: e.p95_ms().1,
                        prefix_index: PrefixIndexStats {
                            cache_blocks: e.prefix.cache_blocks(),
                            slots: e.prefix.slots(),
                            bytes: e.prefix.bytes(),
                            misses: e.prefix.misses(),
                        },
                        prefill_holds: e.prefills.holds(),
                        models: entry.models.clone(),
                    }
                })
                .collect(),
            outcomes: self.outcomes,
            dropped_outcomes: self.view.dropped_outcomes.load(Ordering::Relaxed),
            retry_budget: self.retry_budget.stats(),
        };
        Stats::of(&stats)
    }
}

impl Handler<Fail> for Balancer {
    type Result = ();

    fn handle(&mut self, _msg: Fail, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{system, ManualClock};
    use crate::estimator::CacheReport;

    fn budget() -> Arc<RetryBudget> {
        RetryBudget::new(0.2, 10)
    }

    #[test]
    fn weight_grows_by_a_tenth_and_caps() {
        let s = BalancerSettings::default();
        assert!((s.next_weight(1.0, true) - 1.1).abs() < 1e-12);
        assert_eq!(s.next_weight(9.5, true), 10.0);
        assert_eq!(s.next_weight(10.0, true), 10.0);
    }

    #[test]
    fn weight_halves_and_floors() {
        let s = BalancerSettings::default();
        assert_eq!(s.next_weight(1.0, false), 0.5);
        assert_eq!(s.next_weight(0.15, false), 0.1);
        assert_eq!(s.next_weight(0.1, false), 0.1);
    }

    fn outcome(endpoint: usize, success: bool) -> Outcomes {
        let verdict = if success {
            Verdict::Success(Sample {
                stream: true,
                first: Duration::from_millis(100),
                total: Duration::from_millis(400),
                blocks: 0,
                cached: 0,
                report: CacheReport::Unknown,
                load: 0.0,
            })
        } else {
            Verdict::Failure
        };
        Outcomes(vec![Outcome { endpoint, verdict }])
    }

    #[actix_rt::test]
    async fn outcomes_health_and_models_reach_the_published_view() {
        let specs = vec![EndpointSpec::new("http://a"), EndpointSpec::new("http://b")];
        let balancer = Balancer::new(BalancerSettings::default(), &specs, system(), budget());
        let view = balancer.view();
        let addr = balancer.start();
        addr.send(outcome(0, true)).await.unwrap();
        assert_eq!(view.table().endpoints[0].latency_ms(), 100.0);
        assert!((view.table().endpoints[0].weight() - 1.1).abs() < 1e-12);
        addr.send(outcome(0, false)).await.unwrap();
        addr.send(HealthChanged {
            endpoint: 1,
            healthy: false,
        })
        .await
        .unwrap();
        addr.send(ModelsLearned {
            endpoint: 0,
            models: vec!["m".into()],
        })
        .await
        .unwrap();
        let table = view.table();
        assert!((table.endpoints[0].weight() - 0.55).abs() < 1e-12);
        assert!(!table.endpoints[1].is_healthy());
        assert!(table.knows_model("m"));
        assert_eq!(table.served_models(), vec!["m".to_string()]);
    }

    #[actix_rt::test]
    async fn requests_past_a_guessed_capacity_ask_for_a_read_whose_capacity_counts_at_once() {
        let specs = vec![EndpointSpec::new("http://a")];
        let balancer = Balancer::new(BalancerSettings::default(), &specs, system(), budget());
        let view = balancer.view();
        let addr = balancer.start();
        let endpoint = view.table().endpoints[0].clone();
        let load = |running: f64, waiting: f64| BackendLoad {
            endpoint: 0,
            running,
            waiting,
            kv_cache: 0.1,
            cache_tokens: None,
            binds_slots: false,
        };
        let mut running: Vec<_> = (0..7).map(|_| endpoint.begin()).collect();
        assert!(!endpoint.take_wants_load(), "within the default guess of 8");
        running.push(endpoint.begin());
        assert!(
            endpoint.take_wants_load(),
            "8 in flight fill the guess: the next would be priced as queued"
        );
        running.extend((0..4).map(|_| endpoint.begin()));
        assert!(endpoint.take_wants_load(), "12 in flight, past the guess");
        assert!(!endpoint.take_wants_load(), "asked once");

        addr.send(load(12.0, 0.0)).await.unwrap();
        let e = endpoint.estimate();
        assert_eq!(
            (e.capacity, e.capacity_known),
            (17, false),
            "a quarter more than it runs, and 2, before the next tick"
        );
        running.extend((0..4).map(|_| endpoint.begin()));
        assert!(
            !endpoint.take_wants_load(),
            "16 in flight: within the new guess"
        );
        running.push(endpoint.begin());
        assert!(endpoint.take_wants_load(), "17 fill it");

        addr.send(load(16.0, 3.0)).await.unwrap();
        let e = endpoint.estimate();
        assert_eq!(
            (e.capacity, e.capacity_known),
            (16, true),
            "it queued at 16"
        );
        running.extend((0..10).map(|_| endpoint.begin()));
        assert!(
            !endpoint.take_wants_load(),
            "a known capacity needs no read"
        );
    }

    #[actix_rt::test]
    async fn consecutive_failures_eject_and_the_cooldown_brings_a_trial() {
        let clock = ManualClock::default();
        let specs = vec![EndpointSpec::new("http://a")];
        let balancer = Balancer::new(
            BalancerSettings::default(),
            &specs,
            Arc::new(clock.clone()),
            budget(),
        );
        let view = balancer.view();
        let addr = balancer.start();
        for _ in 0..3 {
            addr.send(outcome(0, false)).await.unwrap();
        }
        assert_eq!(view.table().endpoints[0].circuit(), Circuit::Open);
        assert!(!view.table().endpoints[0].is_available());
        clock.advance(Duration::from_secs(2));
        actix_rt::time::sleep(BREAKER_TICK * 3).await;
        assert_eq!(view.table().endpoints[0].circuit(), Circuit::HalfOpen);
        addr.send(outcome(0, true)).await.unwrap();
        assert_eq!(view.table().endpoints[0].circuit(), Circuit::Closed);
    }

    #[actix_rt::test]
    async fn endpoints_are_added_drained_removed_and_reloaded_keeping_state() {
        let specs = vec![
            EndpointSpec::new("http://a"),
            EndpointSpec::new("http://b/"),
        ];
        let balancer = Balancer::new(BalancerSettings::default(), &specs, system(), budget());
        let view = balancer.view();
        let addr = balancer.start();
        addr.send(outcome(1, false)).await.unwrap();
        let c = addr
            .send(AddEndpoint(EndpointSpec::new("http://c")))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c, 2);
        assert!(addr
            .send(AddEndpoint(EndpointSpec::new("http://c/")))
            .await
            .unwrap()
            .is_err());
        assert!(addr
            .send(DrainEndpoint {
                endpoint: 0,
                drain: true
            })
            .await
            .unwrap());
        assert!(view.table().by_id(0).unwrap().is_draining());
        // What a request in flight holds: the table it loaded before the reload.
        let held = view.table();
        let reloaded = addr
            .send(ReplaceEndpoints(vec![
                EndpointSpec::new("http://b"),
                EndpointSpec::new("http://d"),
            ]))
            .await
            .unwrap();
        assert_eq!(reloaded.added, vec!["http://d".to_string()]);
        assert_eq!(
            reloaded.removed,
            vec!["http://a".to_string(), "http://c".to_string()]
        );
        assert_eq!(reloaded.kept, 1);
        let table = view.table();
        let urls: Vec<&str> = table.endpoints.iter().map(|e| e.url.as_str()).collect();
        assert_eq!(urls, vec!["http://b", "http://d"]);
        assert_eq!(
            table.by_id(1).unwrap().weight(),
            0.5,
            "a kept endpoint keeps its state"
        );
        assert!(
            held.by_id(2).unwrap().is_draining(),
            "a removed endpoint is picked no more from a table a request still holds"
        );
        assert!(!held.by_id(1).unwrap().is_draining());
        let mut changed = EndpointSpec::new("http://d");
        changed.models = vec!["m".into()];
        let reloaded = addr
            .send(ReplaceEndpoints(vec![
                EndpointSpec::new("http://b"),
                changed,
            ]))
            .await
            .unwrap();
        assert_eq!(
            (reloaded.added, reloaded.removed, reloaded.kept),
            (
                vec!["http://d".to_string()],
                vec!["http://d".to_string()],
                1
            ),
            "a changed spec replaces its endpoint"
        );
        assert!(view.table().knows_model("m"));
        assert!(addr.send(RemoveEndpoint(1)).await.unwrap());
        assert!(held.by_id(1).unwrap().is_draining());
        assert!(!addr.send(RemoveEndpoint(1)).await.unwrap());
        assert_eq!(view.table().endpoints.len(), 1);
    }
}
