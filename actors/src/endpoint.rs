//! Backends as the request path sees them: a published, immutable [`RoutingTable`] of
//! [`Endpoint`]s whose fast-changing facts (weight, health, circuit, latency estimate, reported
//! load, in-flight count) are atomics. The balancer actor is the only writer of those facts except
//! the in-flight count, which workers move as requests start and end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::prefills::Prefills;
use crate::prefix_index::PrefixIndex;

use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::breaker::Circuit;
use crate::estimator::TAIL_BUDGET;
use crate::policy::cache_aware::batch_capacity;
use crate::policy::{self, Policy, PolicyKind};

/// Most endpoints a routing table holds; [`Bits`] has one bit per table slot.
pub const MAX_ENDPOINTS: usize = 256;

/// One backend as configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// Base URL, e.g. `http://10.0.0.5:8000`; request paths are appended to it.
    pub url: String,
    /// Starting weight for the weighted policy.
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Models this backend serves; empty means "learn them from its `/v1/models`".
    #[serde(default)]
    pub models: Vec<String>,
    /// Prompt blocks (64 bytes, about 16 tokens) its prefix cache holds, if known: cache-aware
    /// routing's index for it is this big, whatever the backend reports about itself.
    #[serde(default)]
    pub cache_blocks: Option<usize>,
    /// Sent upstream as `Authorization: Bearer ...` when set (also to its `/v1/models`).
    #[serde(default, skip_serializing)]
    pub api_key: Option<String>,
    /// How its health is probed: `auto` (`/health`, else `/v1/models`, else any HTTP answer),
    /// `tcp` (a connection), or a path to `GET` (e.g. Ollama's `/api/version`).
    #[serde(default)]
    pub probe: Probe,
}

/// How an endpoint's health is probed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Probe {
    /// `GET /health`; where that route is missing (404), `GET /v1/models`; where that is missing
    /// too, any HTTP answer other than a 5xx or 429 counts: a missing route is not a sick backend.
    #[default]
    Auto,
    /// A TCP connection that opens.
    Tcp,
    /// `GET` this path; a 2xx is healthy.
    Path(String),
}

impl Serialize for Probe {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Probe::Auto => s.serialize_str("auto"),
            Probe::Tcp => s.serialize_str("tcp"),
            Probe::Path(path) => s.serialize_str(path),
        }
    }
}

impl<'de> Deserialize<'de> for Probe {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "auto" => Ok(Probe::Auto),
            "tcp" => Ok(Probe::Tcp),
            path if path.starts_with('/') && !path.contains(char::is_whitespace) => {
                Ok(Probe::Path(path.to_string()))
            }
            other => Err(serde::de::Error::custom(format!(
                "probe '{other}' is not \"auto\", \"tcp\" or a path starting with /"
            ))),
        }
    }
}

fn default_weight() -> f64 {
    1.0
}

impl EndpointSpec {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            weight: default_weight(),
            models: Vec::new(),
            cache_blocks: None,
            api_key: None,
            probe: Probe::Auto,
        }
    }

    /// The URL without a trailing slash: the identity of a backend across reloads.
    pub fn base_url(&self) -> &str {
        self.url.trim_end_matches('/')
    }
}

/// A backend's live state, shared between the balancer (writer) and the request path (reader).
#[derive(Debug)]
pub struct Endpoint {
    /// Stable for the endpoint's life, also across config reloads and admin changes.
    pub id: usize,
    /// Base URL without a trailing slash.
    pub url: String,
    /// Its id as a header value, for the `x-nanogate-endpoint` of every answer it gives.
    pub id_header: awc::http::header::HeaderValue,
    /// The full `Authorization` header value to send upstream, when configured.
    pub authorization: Option<String>,
    /// Whether its models come from its `/v1/models` rather than from the config.
    pub learns_models: bool,
    pub probe: Probe,
    in_flight: AtomicU32,
    /// Uncached prompt blocks of the streams sent to it that have not had their first token: the
    /// prefill a new request waits behind.
    prefill_blocks: AtomicU32,
    weight_bits: AtomicU64,
    healthy: AtomicBool,
    draining: AtomicBool,
    /// Keeps a prompt's KV in the slot that computed it until that request ends (llama.cpp).
    binds_slots: AtomicBool,
    circuit: AtomicU8,
    consecutive_failures: AtomicU32,
    /// Times live failures ejected it, since it was added.
    ejections: AtomicU64,
    latency_ms_bits: AtomicU64,
    latency_mean_ms_bits: AtomicU64,
    reported_running_bits: AtomicU64,
    reported_waiting_bits: AtomicU64,
    others_bits: AtomicU64,
    kv_cache_bits: AtomicU64,
    /// What the balancer estimates of it (time to first token warm and per uncached block,
    /// whole-request time, recent 95th percentiles, batch capacity, slow-start share).
    estimates: Estimates,
    /// A health probe of it is on its way (at most one out-of-band probe at a time).
    probe_pending: AtomicBool,
    /// A request found more in flight on it than its batch capacity is guessed to be, and that
    /// capacity is not known yet: the health checker reads its load at once (see
    /// [`Endpoint::begin_prefill`]).
    wants_load: AtomicBool,
    /// Told when `wants_load` is set: the health checker's wake-up, shared by the balancer's
    /// endpoints (none in tests that build endpoints alone).
    load_wanted: Option<Arc<Notify>>,
    /// Woken when a probe's verdict on it arrives, for requests waiting on it.
    verdicts: Notify,
    /// When a pick last sent it a prompt it cached less than half of, on [`PLACE_CLOCK`].
    last_placed: AtomicU64,
    /// The prompt blocks it was recently sent (cache-aware routing only).
    pub prefix: PrefixIndex,
    /// The streams' prompts it is prefilling now, which requests sharing them wait for.
    pub prefills: Prefills,
}

/// The balancer's published estimates of one endpoint, as atomics.
#[derive(Debug)]
struct Estimates {
    warm_ms: AtomicU64,
    block_ms: AtomicU64,
    jitter_ms: AtomicU64,
    spikes: AtomicU64,
    share: AtomicU64,
    tail_ms: AtomicU64,
    reuse: AtomicU64,
    service_ms: AtomicU64,
    residence_ms: AtomicU64,
    ttft_p95_ms: AtomicU64,
    full_p95_ms: AtomicU64,
    capacity: AtomicU32,
    capacity_known: AtomicBool,
    ramp: AtomicU64,
}

/// What a cost model needs to know about an endpoint, read once per pick.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    /// Time to first token of a request whose prompt it has cached, ms (0: not measured).
    pub warm_ms: f64,
    /// Prefill time per uncached prompt block, ms (0: not measured).
    pub block_ms: f64,
    /// Root mean square of how much later than those two predict its first tokens came, ms.
    pub jitter_ms: f64,
    /// The share of its first tokens that were spikes, and its share of the fleet's answers.
    pub spikes: f64,
    pub share: f64,
    /// What its tail adds to an expected time to first token, ms: its lateness, weighed by how
    /// much of the fleet's tail budget its spikes use.
    pub tail_ms: f64,
    /// The share of the prompt blocks sent to it that it had been sent before: how much its
    /// prompts recur (whether or not its cache still held them).
    pub reuse: f64,
    /// Time a request holds a batch slot, ms (0: not measured).
    pub service_ms: f64,
    /// Requests it runs at once before it queues (0: not known).
    pub capacity: u32,
    /// Whether `capacity` is what the backend was seen to run while others waited, rather than
    /// a guess above what it ran so far.
    pub capacity_known: bool,
    /// How long its prefix cache keeps a block it is sent: its size over the rate new blocks
    /// arrive, ms (infinite while nothing arrives).
    pub residence_ms: f64,
    /// Its share of traffic while it ramps up after coming back (1: full).
    pub ramp: f64,
}

impl Estimate {
    /// How much of the fleet's tail budget its spikes use (1: all it may): its share of spikes
    /// times its share of the fleet's answers, over [`TAIL_BUDGET`].
    pub fn tail_budget_used(&self) -> f64 {
        self.spikes * self.share / TAIL_BUDGET
    }
}

impl Endpoint {
    /// `healthy`: whether it takes traffic before its first probe. Configured endpoints do (the
    /// gateway can serve from its first request); endpoints added at runtime wait for a probe.
    pub fn new(id: usize, spec: &EndpointSpec, healthy: bool) -> Self {
        Self {
            id,
            url: spec.base_url().to_string(),
            id_header: awc::http::header::HeaderValue::from(id),
            authorization: spec.api_key.as_ref().map(|key| format!("Bearer {key}")),
            learns_models: spec.models.is_empty(),
            probe: spec.probe.clone(),
            in_flight: AtomicU32::new(0),
            prefill_blocks: AtomicU32::new(0),
            weight_bits: AtomicU64::new(spec.weight.to_bits()),
            healthy: AtomicBool::new(healthy),
            draining: AtomicBool::new(false),
            binds_slots: AtomicBool::new(false),
            circuit: AtomicU8::new(Circuit::Closed.as_u8()),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU64::new(0),
            latency_ms_bits: AtomicU64::new(0f64.to_bits()),
            latency_mean_ms_bits: AtomicU64::new(0f64.to_bits()),
            reported_running_bits: AtomicU64::new(0f64.to_bits()),
            reported_waiting_bits: AtomicU64::new(0f64.to_bits()),
            others_bits: AtomicU64::new(0f64.to_bits()),
            kv_cache_bits: AtomicU64::new(0f64.to_bits()),
            estimates: Estimates {
                warm_ms: AtomicU64::new(0f64.to_bits()),
                block_ms: AtomicU64::new(0f64.to_bits()),
                jitter_ms: AtomicU64::new(0f64.to_bits()),
                spikes: AtomicU64::new(0f64.to_bits()),
                share: AtomicU64::new(0f64.to_bits()),
                tail_ms: AtomicU64::new(0f64.to_bits()),
                reuse: AtomicU64::new(0f64.to_bits()),
                service_ms: AtomicU64::new(0f64.to_bits()),
                residence_ms: AtomicU64::new(f64::INFINITY.to_bits()),
                ttft_p95_ms: AtomicU64::new(0f64.to_bits()),
                full_p95_ms: AtomicU64::new(0f64.to_bits()),
                capacity: AtomicU32::new(0),
                capacity_known: AtomicBool::new(false),
                ramp: AtomicU64::new(1f64.to_bits()),
            },
            probe_pending: AtomicBool::new(false),
            wants_load: AtomicBool::new(false),
            load_wanted: None,
            verdicts: Notify::new(),
            last_placed: AtomicU64::new(0),
            prefix: PrefixIndex::new(0),
            prefills: Prefills::default(),
        }
    }

    /// The same endpoint with a prefix index of `blocks` slots (cache-aware routing).
    pub fn with_prefix_index(mut self, blocks: usize) -> Self {
        self.prefix = PrefixIndex::new(blocks);
        self
    }

    /// The same endpoint, telling `notify` when a request asks for its load to be read.
    pub fn with_load_wanted(mut self, notify: Arc<Notify>) -> Self {
        self.load_wanted = Some(notify);
        self
    }

    /// What the cost models read of it.
    pub fn estimate(&self) -> Estimate {
        let e = &self.estimates;
        Estimate {
            warm_ms: load_f64(&e.warm_ms),
            block_ms: load_f64(&e.block_ms),
            jitter_ms: load_f64(&e.jitter_ms),
            spikes: load_f64(&e.spikes),
            share: load_f64(&e.share),
            tail_ms: load_f64(&e.tail_ms),
            reuse: load_f64(&e.reuse),
            service_ms: load_f64(&e.service_ms),
            capacity: e.capacity.load(Ordering::Relaxed),
            capacity_known: e.capacity_known.load(Ordering::Relaxed),
            residence_ms: load_f64(&e.residence_ms),
            ramp: load_f64(&e.ramp),
        }
    }

    pub(crate) fn publish_estimate(&self, estimate: Estimate) {
        let e = &self.estimates;
        store_f64(&e.warm_ms, estimate.warm_ms);
        store_f64(&e.block_ms, estimate.block_ms);
        store_f64(&e.jitter_ms, estimate.jitter_ms);
        store_f64(&e.spikes, estimate.spikes);
        store_f64(&e.share, estimate.share);
        store_f64(&e.tail_ms, estimate.tail_ms);
        store_f64(&e.reuse, estimate.reuse);
        store_f64(&e.service_ms, estimate.service_ms);
        store_f64(&e.residence_ms, estimate.residence_ms);
        e.capacity.store(estimate.capacity, Ordering::Relaxed);
        e.capacity_known
            .store(estimate.capacity_known, Ordering::Relaxed);
        store_f64(&e.ramp, estimate.ramp);
    }

    /// Recent 95th percentiles of time to first token (streams) and of whole answers (not
    /// streamed), ms (0: not measured).
    pub fn p95_ms(&self) -> (f64, f64) {
        (
            load_f64(&self.estimates.ttft_p95_ms),
            load_f64(&self.estimates.full_p95_ms),
        )
    }

    pub(crate) fn set_p95_ms(&self, ttft: f64, full: f64) {
        store_f64(&self.estimates.ttft_p95_ms, ttft);
        store_f64(&self.estimates.full_p95_ms, full);
    }

    /// Claims the one out-of-band probe of this endpoint; `false` when one is on its way.
    pub fn claim_probe(&self) -> bool {
        !self.probe_pending.swap(true, Ordering::AcqRel)
    }

    /// Whether a request asked for its load to be read at once (see [`Self::take_wants_load`]).
    pub(crate) fn wants_load(&self) -> bool {
        self.wants_load.load(Ordering::Relaxed)
    }

    /// Whether a request asked for its load to be read at once since the last call.
    pub(crate) fn take_wants_load(&self) -> bool {
        self.wants_load.swap(false, Ordering::Relaxed)
    }

    /// A probe's verdict arrived: frees the claim and wakes the requests waiting for it.
    pub(crate) fn probe_done(&self) {
        self.probe_pending.store(false, Ordering::Release);
        self.verdicts.notify_waiters();
    }

    /// Resolves at the next probe verdict on this endpoint.
    pub fn verdict(&self) -> tokio::sync::futures::Notified<'_> {
        self.verdicts.notified()
    }

    pub fn weight(&self) -> f64 {
        load_f64(&self.weight_bits)
    }

    pub(crate) fn set_weight(&self, weight: f64) {
        store_f64(&self.weight_bits, weight);
    }

    /// The health checker's verdict.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    pub fn circuit(&self) -> Circuit {
        Circuit::from_u8(self.circuit.load(Ordering::Relaxed))
    }

    pub(crate) fn set_circuit(&self, circuit: Circuit, consecutive_failures: u32) {
        self.circuit.store(circuit.as_u8(), Ordering::Relaxed);
        self.consecutive_failures
            .store(consecutive_failures, Ordering::Relaxed);
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    pub(crate) fn count_ejection(&self) {
        self.ejections.fetch_add(1, Ordering::Relaxed);
    }

    /// Peak-EWMA of time to first byte, in milliseconds (0 until measured).
    pub fn latency_ms(&self) -> f64 {
        load_f64(&self.latency_ms_bits)
    }

    pub(crate) fn set_latency_ms(&self, ms: f64) {
        store_f64(&self.latency_ms_bits, ms);
    }

    /// The long-run average time to first byte, in milliseconds (0 until 8 answers): what the
    /// peak-EWMA returns to, without its peaks.
    pub fn latency_mean_ms(&self) -> f64 {
        load_f64(&self.latency_mean_ms_bits)
    }

    pub(crate) fn set_latency_mean_ms(&self, ms: f64) {
        store_f64(&self.latency_mean_ms_bits, ms);
    }

    /// What the backend says it runs and queues (from its `/metrics`), and its KV-cache use.
    pub fn reported_load(&self) -> (f64, f64, f64) {
        (
            load_f64(&self.reported_running_bits),
            load_f64(&self.reported_waiting_bits),
            load_f64(&self.kv_cache_bits),
        )
    }

    /// Requests the backend ran or queued at its last scrape beyond the gateway's own in flight
    /// at that moment: other clients' (another replica, direct callers). The live in-flight count
    /// plus these is its load now; the scrape's own counts are up to a scrape interval old, and
    /// pricing a backend by a queue it reported a second ago (drained since, as it got nothing
    /// more) kept it out until the next scrape while the others took every request.
    pub fn others(&self) -> f64 {
        load_f64(&self.others_bits)
    }

    pub(crate) fn set_reported_load(&self, running: f64, waiting: f64, kv_cache: f64) {
        store_f64(&self.reported_running_bits, running);
        store_f64(&self.reported_waiting_bits, waiting);
        let ours = f64::from(self.in_flight());
        store_f64(&self.others_bits, (running + waiting - ours).max(0.0));
        store_f64(&self.kv_cache_bits, kv_cache);
    }

    /// Whether a prompt's KV stays in the slot that computed it until that request ends, as in
    /// llama.cpp's server (known from its `/metrics` names): another request of the prompt finds
    /// it only then, so a prefill registered here is waited for until its request ends.
    pub fn binds_slots(&self) -> bool {
        self.binds_slots.load(Ordering::Relaxed)
    }

    pub(crate) fn set_binds_slots(&self, binds: bool) {
        self.binds_slots.store(binds, Ordering::Relaxed);
    }

    /// When a pick last sent it a prompt it cached less than half of (a placement): comparable
    /// between endpoints, larger is later; 0 never.
    pub fn last_placed(&self) -> u64 {
        self.last_placed.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Takes traffic: healthy, not draining, circuit closed, or half-open with no request on it
    /// (the one trial request).
    pub fn is_available(&self) -> bool {
        self.is_healthy()
            && !self.is_draining()
            && match self.circuit() {
                Circuit::Closed => true,
                Circuit::Open => false,
                Circuit::HalfOpen => self.in_flight() == 0,
            }
    }

    /// Counts a request as running on this endpoint until the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.begin_prefill(0)
    }

    /// Counts a request as running on this endpoint until the returned guard drops, and its
    /// `blocks` uncached prompt blocks as prefill ahead of later requests until its first token
    /// ([`InFlight::first_token`]) or its end.
    ///
    /// At the batch capacity guessed for a backend that has not shown it, it asks for the
    /// backend's load to be read now rather than at the next interval: until then the guess (the
    /// default of 8 before the first read) made every backend look queued. A gateway that started
    /// under load misrouted its first second so (in the routing benchmark, which starts a gateway
    /// for each run, a tenth of the requests). At it, not past it: the next request is priced as
    /// queued there, so a prompt whose home had just filled the guess went elsewhere, and its
    /// home never got the request that would have asked (four equal backends, conversations over
    /// 8 system prompts: one prompt copied to the three others within 25 ms). Each read raises
    /// the guess past what the backend runs, so this asks again only as the load grows.
    pub fn begin_prefill(self: &Arc<Self>, blocks: u32) -> InFlight {
        let running = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        let e = &self.estimates;
        // Stored only when not already asked: every request past the guess would otherwise write
        // the same shared cache line from every HTTP thread.
        if !e.capacity_known.load(Ordering::Relaxed)
            && running >= batch_capacity(e.capacity.load(Ordering::Relaxed))
            && !self.wants_load.load(Ordering::Relaxed)
        {
            self.wants_load.store(true, Ordering::Relaxed);
            if let Some(load_wanted) = &self.load_wanted {
                load_wanted.notify_one();
            }
        }
        self.prefill_blocks.fetch_add(blocks, Ordering::Relaxed);
        InFlight {
            endpoint: self.clone(),
            prefill: blocks,
            registered: None,
        }
    }

    /// Uncached prompt blocks sent to it still waiting for their first token.
    pub fn prefill_blocks(&self) -> u32 {
        self.prefill_blocks.load(Ordering::Relaxed)
    }
}

/// A uniform number in [0, 1) from the object-safe RNG.
pub(crate) fn rng_unit(rng: &mut dyn RngCore) -> f64 {
    f64::from(rng.next_u32()) / (f64::from(u32::MAX) + 1.0)
}

fn load_f64(a: &AtomicU64) -> f64 {
    f64::from_bits(a.load(Ordering::Relaxed))
}

fn store_f64(a: &AtomicU64, v: f64) {
    a.store(v.to_bits(), Ordering::Relaxed);
}

/// One request running on an endpoint; dropping it ends the count, however the request ended.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    /// Its prefill blocks still counted on the endpoint.
    prefill: u32,
    /// Its prefill as registered in the endpoint's [`Prefills`], for others to wait for, and
    /// whether the registration lasts until the request ends rather than its first token.
    registered: Option<(u64, bool)>,
}

impl InFlight {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// Registers its prompt's prefill of `blocks[cached..]`, expected to take `expected`, for
    /// requests sharing the prompt to wait for (see [`crate::prefills`]), until its first token or
    /// its end. On an endpoint that binds slots (llama.cpp) the whole prompt, cached or not, is
    /// bound to this request's slot until it ends: registered whole, until then, with no due
    /// time (that end comes for sure; the first requests on a server have only priors, ~50 ms
    /// for a 5 s prefill), the waiters' own limits bounding the wait.
    pub fn share_prefill(&mut self, blocks: &[u64], cached: usize, expected: Duration) {
        let until_end = self.endpoint.binds_slots();
        let (from, due) = if until_end {
            (0, None)
        } else {
            (cached, Some(expected))
        };
        self.registered = self
            .endpoint
            .prefills
            .begin(blocks, from, due)
            .map(|id| (id, until_end));
    }

    /// Its first token arrived: its prefill no longer delays anyone (unless registered until its
    /// end: where slots bind, its prompt is free for others only then).
    pub fn first_token(&mut self) {
        let blocks = std::mem::take(&mut self.prefill);
        self.endpoint
            .prefill_blocks
            .fetch_sub(blocks, Ordering::Relaxed);
        if let Some((id, false)) = self.registered {
            self.registered = None;
            self.endpoint.prefills.end(id);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.first_token();
        if let Some((id, _)) = self.registered.take() {
            self.endpoint.prefills.end(id);
        }
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

// ===== Bits =====

/// A set of routing-table slots, on the stack: picks allocate nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bits([u64; MAX_ENDPOINTS / 64]);

impl Bits {
    pub fn insert(&mut self, i: usize) {
        if i < MAX_ENDPOINTS {
            self.0[i / 64] |= 1 << (i % 64);
        }
    }

    pub fn remove(&mut self, i: usize) {
        if i < MAX_ENDPOINTS {
            self.0[i / 64] &= !(1 << (i % 64));
        }
    }

    pub fn contains(&self, i: usize) -> bool {
        i < MAX_ENDPOINTS && self.0[i / 64] & (1 << (i % 64)) != 0
    }

    /// A hash of the set, the same for equal sets (splitmix64's finalizer over the words).
    pub fn fingerprint(&self) -> u64 {
        let mut h = self.0.iter().fold(0x9E37_79B9_7F4A_7C15u64, |h, &w| {
            (h ^ w).wrapping_mul(0x100_0000_01B3)
        });
        h ^= h >> 30;
        h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h ^= h >> 27;
        h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
        h ^ (h >> 31)
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(word, bits)| {
            let mut bits = *bits;
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let bit = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    word * 64 + bit
                })
            })
        })
    }
}

// ===== RoutingTable =====

/// What a pick is for.
#[derive(Debug, Clone, Copy)]
pub struct PickRequest<'a> {
    pub model: &'a str,
    /// Table slots already tried by this request.
    pub exclude: Bits,
    /// Hash of the request's affinity key (session, user or prompt prefix), when it has one.
    pub affinity: Option<u64>,
    /// The chained keys of the prompt's blocks (cache-aware routing; empty otherwise).
    pub blocks: &'a [u64],
}

/// The endpoints a pick may choose from, as table slots.
pub struct Eligible<'a> {
    pub table: &'a RoutingTable,
    pub slots: Bits,
    pub affinity: Option<u64>,
    pub blocks: &'a [u64],
}

/// The endpoint a pick chose.
#[derive(Debug, Clone, Copy)]
pub struct Picked<'a> {
    pub slot: usize,
    pub endpoint: &'a Arc<Endpoint>,
    /// How many of the prompt's blocks it probably caches (as known before this request).
    pub cached: usize,
}

impl Eligible<'_> {
    pub fn endpoint(&self, slot: usize) -> &Arc<Endpoint> {
        &self.table.endpoints[slot]
    }
}

/// Counts placements, process-wide (so their order survives a table rebuilt on a configuration
/// change): which of several endpoints was sent a new prompt longest ago.
static PLACE_CLOCK: AtomicU64 = AtomicU64::new(0);

/// The immutable snapshot the request path routes with. Rebuilt by the balancer only when the set
/// of endpoints or the models they serve change; everything else changes through atomics.
#[derive(Debug)]
pub struct RoutingTable {
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Model name → the slots of the backends known to serve it.
    by_model: HashMap<String, Bits>,
    /// Names a backend answers to without listing them: Ollama lists `llama3.2:latest` and takes
    /// `llama3.2` for it (its own OpenAI examples send the short name).
    aliases: HashMap<String, Bits>,
    /// Backends whose models are not known yet: they are tried for any model.
    unknown_models: Bits,
    policy: Box<dyn Policy>,
}

impl RoutingTable {
    /// `models[i]` is what endpoint `i` is known to serve; `None` means not known yet. Endpoints
    /// beyond [`MAX_ENDPOINTS`] are ignored (configuration refuses them).
    pub fn new(
        endpoints: Vec<Arc<Endpoint>>,
        models: &[Option<Vec<String>>],
        policy: &policy::PolicySettings,
    ) -> Self {
        let mut endpoints = endpoints;
        endpoints.truncate(MAX_ENDPOINTS);
        let mut by_model: HashMap<String, Bits> = HashMap::new();
        let mut aliases: HashMap<String, Bits> = HashMap::new();
        let mut unknown_models = Bits::default();
        for (slot, served) in models.iter().enumerate().take(endpoints.len()) {
            match served {
                Some(names) => {
                    for name in names {
                        by_model.entry(name.clone()).or_default().insert(slot);
                        if let Some(short) = name.strip_suffix(":latest") {
                            aliases.entry(short.to_string()).or_default().insert(slot);
                        }
                    }
                }
                None => unknown_models.insert(slot),
            }
        }
        let policy = policy::build(policy, &endpoints);
        Self {
            endpoints,
            by_model,
            aliases,
            unknown_models,
            policy,
        }
    }

    /// The policy this table picks with.
    pub fn policy(&self) -> PolicyKind {
        self.policy.kind()
    }

    pub fn by_id(&self, id: usize) -> Option<&Arc<Endpoint>> {
        self.endpoints.iter().find(|e| e.id == id)
    }

    /// The slots that may serve `model` (any endpoint when `model` is empty).
    fn serving(&self, model: &str) -> Bits {
        if model.is_empty() {
            let mut all = Bits::default();
            (0..self.endpoints.len()).for_each(|i| all.insert(i));
            return all;
        }
        let mut slots = self.unknown_models;
        if let Some(known) = self.by_model.get(model).or_else(|| self.aliases.get(model)) {
            for (word, bits) in slots.0.iter_mut().zip(known.0) {
                *word |= bits;
            }
        }
        slots
    }

    /// Whether some backend is known to serve `model` (configured, or learned from its
    /// `/v1/models`); unlike [`Self::knows_model`], not true of any name while a backend's models
    /// are still unknown.
    pub fn serves(&self, model: &str) -> bool {
        self.by_model.contains_key(model) || self.aliases.contains_key(model)
    }

    /// Whether any backend (healthy or not) may serve `model`: the difference between a 404 and
    /// a 503.
    pub fn knows_model(&self, model: &str) -> bool {
        !self.serving(model).is_empty()
    }

    /// The models the healthy backends are known to serve, sorted.
    pub fn served_models(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .by_model
            .iter()
            .filter(|(_, slots)| slots.iter().any(|i| self.endpoints[i].is_healthy()))
            .map(|(name, _)| name.clone())
            .collect();
        names.sort();
        names
    }

    fn eligible(&self, request: &PickRequest<'_>, accept: impl Fn(&Endpoint) -> bool) -> Bits {
        let mut slots = Bits::default();
        for slot in self.serving(request.model).iter() {
            if !request.exclude.contains(slot) && accept(&self.endpoints[slot]) {
                slots.insert(slot);
            }
        }
        slots
    }

    /// Chooses an endpoint with the table's policy among the available ones serving the model.
    /// When every such endpoint is ejected by its circuit breaker (but still passes health
    /// checks), the least-bad one is tried rather than refusing everything. An endpoint ramping
    /// up after coming back (slow start) keeps a pick only with the probability of its share, so
    /// it takes that share of the traffic it would otherwise get.
    pub fn pick(&self, request: &PickRequest<'_>, rng: &mut dyn RngCore) -> Option<Picked<'_>> {
        self.pick_with(
            |eligible, rng| self.policy.pick(eligible, rng),
            request,
            rng,
        )
    }

    /// Chooses the endpoint expected to give the request's first token soonest, whatever the
    /// table's policy ([`policy::cache_aware::soonest`]): a hedge races a late first token, so
    /// where it goes is a matter of time alone. Round robin's next endpoint was as likely the
    /// half-speed or the spiky backend as a fast one (on the unequal fleet 20 of 52 hedges won).
    pub fn pick_soonest(
        &self,
        request: &PickRequest<'_>,
        rng: &mut dyn RngCore,
    ) -> Option<Picked<'_>> {
        self.pick_with(policy::cache_aware::soonest, request, rng)
    }

    fn pick_with(
        &self,
        choose: impl Fn(&Eligible<'_>, &mut dyn RngCore) -> Option<usize>,
        request: &PickRequest<'_>,
        rng: &mut dyn RngCore,
    ) -> Option<Picked<'_>> {
        let mut slots = self.eligible(request, Endpoint::is_available);
        if slots.is_empty() {
            let ejected = self.eligible(request, |e| e.is_healthy() && !e.is_draining());
            return ejected
                .iter()
                .min_by_key(|&slot| {
                    let e = &self.endpoints[slot];
                    (e.consecutive_failures(), e.in_flight())
                })
                .map(|slot| self.picked(slot, request.blocks));
        }
        loop {
            let eligible = Eligible {
                table: self,
                slots,
                affinity: request.affinity,
                blocks: request.blocks,
            };
            let slot = choose(&eligible, rng)?;
            let ramp = self.endpoints[slot].estimate().ramp;
            if ramp < 1.0 && slots.len() > 1 && rng_unit(rng) >= ramp {
                slots.remove(slot);
                continue;
            }
            let picked = self.picked(slot, request.blocks);
            // Only `cache_aware` reads it: the other policies' picks skip the shared counter.
            // Placements only: stamped by every pick, an endpoint busy with its first prompt's
            // returns was never the one picked longest ago, and a cold fleet's new prompts went
            // to the others (four equal backends, conversations over 8 system prompts: 3 on one
            // backend and 1 on another, then copied over the fleet to even out the load).
            if self.policy.kind() == PolicyKind::CacheAware
                && crate::policy::cache_aware::places(picked.cached, request.blocks.len())
            {
                let now = PLACE_CLOCK.fetch_add(1, Ordering::Relaxed) + 1;
                picked.endpoint.last_placed.store(now, Ordering::Relaxed);
            }
            // What the endpoint will hold once it has this request's prompt.
            picked.endpoint.prefix.insert(request.blocks);
            return Some(picked);
        }
    }

    /// The endpoint at `slot`, as a pick of it for a prompt of `blocks` (a request bound to it).
    pub fn picked(&self, slot: usize, blocks: &[u64]) -> Picked<'_> {
        Picked {
            slot,
            endpoint: &self.endpoints[slot],
            cached: self.endpoints[slot].prefix.matched(blocks).cached,
        }
    }

    /// Whether a pick could find another endpoint for this request.
    pub fn has_alternative(&self, request: &PickRequest<'_>) -> bool {
        !self
            .eligible(request, |e| e.is_healthy() && !e.is_draining())
            .is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::policy::PolicySettings;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    pub fn table_with(
        policy: PolicyKind,
        weights: &[f64],
        models: &[Option<Vec<String>>],
    ) -> RoutingTable {
        let endpoints = weights
            .iter()
            .enumerate()
            .map(|(id, &weight)| {
                let mut spec = EndpointSpec::new(format!("http://127.0.0.1:{}", 9000 + id));
                spec.weight = weight;
                let index = if policy == PolicyKind::CacheAware {
                    4096
                } else {
                    0
                };
                Arc::new(Endpoint::new(id, &spec, true).with_prefix_index(index))
            })
            .collect();
        let settings = PolicySettings {
            policy,
            ..PolicySettings::default()
        };
        RoutingTable::new(endpoints, models, &settings)
    }

    pub fn request(model: &str) -> PickRequest<'_> {
        PickRequest {
            model,
            exclude: Bits::default(),
            affinity: None,
            blocks: &[],
        }
    }

    #[test]
    fn bits_iterate_in_order() {
        let mut b = Bits::default();
        for i in [3, 64, 200, 0] {
            b.insert(i);
        }
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 3, 64, 200]);
        assert_eq!(b.len(), 4);
        assert!(b.contains(64) && !b.contains(65));
        b.remove(64);
        assert!(!b.contains(64) && b.len() == 3);
    }

    #[test]
    fn unavailable_and_excluded_endpoints_are_skipped() {
        let t = table_with(PolicyKind::Weighted, &[1.0, 1.0, 1.0], &[None, None, None]);
        t.endpoints[0].set_healthy(false);
        let mut rng = SmallRng::seed_from_u64(1);
        let mut r = request("m");
        r.exclude.insert(1);
        for _ in 0..100 {
            assert_eq!(t.pick(&r, &mut rng).unwrap().slot, 2);
        }
        t.endpoints[2].set_draining(true);
        assert!(t.pick(&r, &mut rng).is_none());
        assert!(!t.has_alternative(&r));
    }

    #[test]
    fn when_every_endpoint_is_ejected_the_least_bad_is_tried() {
        let t = table_with(PolicyKind::Weighted, &[1.0, 1.0], &[None, None]);
        t.endpoints[0].set_circuit(Circuit::Open, 7);
        t.endpoints[1].set_circuit(Circuit::Open, 3);
        let mut rng = SmallRng::seed_from_u64(1);
        assert_eq!(t.pick(&request("m"), &mut rng).unwrap().slot, 1);
        t.endpoints[1].set_healthy(false);
        assert_eq!(t.pick(&request("m"), &mut rng).unwrap().slot, 0);
        t.endpoints[0].set_healthy(false);
        assert!(
            t.pick(&request("m"), &mut rng).is_none(),
            "health-check failures are not tried"
        );
    }

    #[test]
    fn a_half_open_endpoint_takes_one_trial_request_at_a_time() {
        let t = table_with(PolicyKind::Weighted, &[1.0], &[None]);
        t.endpoints[0].set_circuit(Circuit::HalfOpen, 3);
        assert!(t.endpoints[0].is_available());
        let trial = t.endpoints[0].begin();
        assert!(!t.endpoints[0].is_available());
        drop(trial);
        assert!(t.endpoints[0].is_available());
    }

    #[test]
    fn models_restrict_candidates() {
        let t = table_with(
            PolicyKind::Weighted,
            &[1.0, 1.0],
            &[Some(vec!["a".into()]), Some(vec!["b".into()])],
        );
        let mut rng = SmallRng::seed_from_u64(3);
        assert_eq!(t.pick(&request("b"), &mut rng).unwrap().slot, 1);
        assert!(t.pick(&request("c"), &mut rng).is_none());
        assert!(
            t.pick(&request(""), &mut rng).is_some(),
            "no model: any endpoint"
        );
        assert!(!t.knows_model("c"));
        assert_eq!(t.served_models(), vec!["a".to_string(), "b".to_string()]);

        // Ollama lists `llama3.2:latest` and answers to `llama3.2`; the list keeps its own name.
        let t = table_with(
            PolicyKind::Weighted,
            &[1.0, 1.0],
            &[Some(vec!["llama3.2:latest".into()]), Some(vec!["b".into()])],
        );
        assert_eq!(t.pick(&request("llama3.2"), &mut rng).unwrap().slot, 0);
        assert!(t.serves("llama3.2") && !t.knows_model("llama3.2:8b"));
        assert_eq!(
            t.served_models(),
            vec!["b".to_string(), "llama3.2:latest".to_string()]
        );
    }

    #[test]
    fn in_flight_guard_counts_down_on_drop() {
        let t = table_with(PolicyKind::Weighted, &[1.0], &[None]);
        let guard = t.endpoints[0].begin();
        assert_eq!(t.endpoints[0].in_flight(), 1);
        drop(guard);
        assert_eq!(t.endpoints[0].in_flight(), 0);
    }

    #[test]
    fn prefill_counts_until_the_first_token_or_the_end() {
        let t = table_with(PolicyKind::CacheAware, &[1.0], &[None]);
        let e = &t.endpoints[0];
        let mut started = e.begin_prefill(100);
        let abandoned = e.begin_prefill(30);
        assert_eq!(e.prefill_blocks(), 130);
        started.first_token();
        started.first_token();
        assert_eq!((e.prefill_blocks(), e.in_flight()), (30, 2));
        drop(abandoned);
        drop(started);
        assert_eq!((e.prefill_blocks(), e.in_flight()), (0, 0));
    }

    #[test]
    fn a_shared_prefill_ends_at_the_first_token_or_where_slots_bind_at_the_end() {
        let t = table_with(PolicyKind::CacheAware, &[1.0], &[None]);
        let e = &t.endpoints[0];
        let prompt: Vec<u64> = (1..=40).collect();
        let held = |e: &Endpoint| e.prefills.computing(&prompt).is_some();
        let mut request = e.begin_prefill(40);
        request.share_prefill(&prompt, 0, Duration::from_secs(60));
        assert!(held(e));
        request.first_token();
        assert!(
            !held(e),
            "a vLLM-like backend has the prompt's blocks once prefilled"
        );

        e.set_binds_slots(true);
        let mut request = e.begin_prefill(40);
        request.share_prefill(&prompt, 0, Duration::from_secs(60));
        request.first_token();
        assert!(
            held(e),
            "llama.cpp keeps them in the request's slot until it ends"
        );
        drop(request);
        assert!(!held(e));
    }
}
