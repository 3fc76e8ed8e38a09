//! The health checker: probes each endpoint on an interval with a short timeout (a vLLM that is
//! still loading accepts connections but does not answer, so a timeout means "not ready"),
//! applies rise/fall thresholds so one lost probe does not flap an endpoint, and tells the
//! balancer when an endpoint's verdict changes. Not every server has `/health` (Ollama, hosted
//! APIs, llama-cpp-python, many mock servers): the automatic probe falls back to `/v1/models`,
//! then to any answer at all, because a missing route is not a sick backend; an endpoint can also
//! name its own path or ask for a TCP connect. Any 2xx counts, whatever the body (vLLM and TGI
//! answer `/health` with an empty 200). It also reads the load gauges vLLM, SGLang, TGI and
//! llama.cpp publish on `/metrics` (on a shorter interval, for the `least_load` policy; less and
//! less often from a server that has none), and learns the models of endpoints configured without
//! a model list from their `/v1/models` (sending the endpoint's key), whatever the probe says.
//! It probes whatever endpoints the balancer's published table holds, so endpoints added or
//! removed at runtime are picked up on the next round.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use serde::{Deserialize, Serialize};

use crate::balancer::{BackendLoad, Balancer, BalancerView, HealthChanged, ModelsLearned};
use crate::endpoint::{Endpoint, Probe};

/// How often the schedule is looked at (each endpoint has its own due time).
const PROBE_TICK: Duration = Duration::from_millis(50);
use crate::{Fail, GetStats, Stats};

/// Probe schedule and thresholds; defaults documented in `config/default.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// How often an unhealthy endpoint is probed, to bring it back soon after it recovers.
    pub unhealthy_interval_ms: u64,
    /// Timeout of the out-of-band probe of an endpoint whose request is overdue: short, since a
    /// hung backend is what it is looking for.
    pub urgent_timeout_ms: u64,
    /// Consecutive good probes that bring an unhealthy endpoint back.
    pub rise: u32,
    /// Consecutive bad probes that take a healthy endpoint out.
    pub fall: u32,
    /// How often healthy backends' `/metrics` load gauges are read (0: never). The `least_load`
    /// policy routes on them, so this is much shorter than the health interval. Between reads,
    /// a backend sent more than its batch is guessed to hold is read at once
    /// ([`crate::endpoint::Endpoint::begin_prefill`]).
    pub load_interval_ms: u64,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            interval_ms: 30_000,
            timeout_ms: 5_000,
            unhealthy_interval_ms: 2_000,
            urgent_timeout_ms: 1_000,
            rise: 2,
            fall: 3,
            load_interval_ms: 1_000,
        }
    }
}

/// Load a backend reports about itself, summed over its label sets.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ScrapedLoad {
    pub running: f64,
    pub waiting: f64,
    pub kv_cache_usage: Option<f64>,
    /// Tokens its KV cache holds: vLLM's `num_gpu_blocks` x `block_size` from
    /// `vllm:cache_config_info`, SGLang's `max_total_num_tokens`.
    pub cache_tokens: Option<f64>,
    /// It is llama.cpp's server (its gauges are named `llamacpp:`), which keeps a prompt's KV in
    /// the slot that computed it until that request ends: see [`crate::prefills`].
    pub binds_slots: bool,
}

/// Gauge names per server: (running, waiting, kv-cache use).
const RUNNING: &[&str] = &[
    "vllm:num_requests_running",
    "sglang:num_running_reqs",
    "tgi_batch_current_size",
    "llamacpp:requests_processing",
];
const WAITING: &[&str] = &[
    "vllm:num_requests_waiting",
    "sglang:num_queue_reqs",
    "tgi_queue_size",
    "llamacpp:requests_deferred",
];
const KV_CACHE: &[&str] = &[
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "sglang:token_usage",
];

/// The value of label `name` on a Prometheus text line (values with escaped quotes are not
/// needed for the numbers read here).
fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let labels = line.split_once('{')?.1.split_once('}')?.0;
    labels.split(',').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key.trim() == name).then(|| value.trim().trim_matches('"'))
    })
}

impl ScrapedLoad {
    /// Reads the known gauges from Prometheus text; `None` when the text has none of them.
    pub fn parse(text: &str) -> Option<Self> {
        let mut load = Self::default();
        let mut found = false;
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let name = line
                .split(|c: char| c == '{' || c.is_whitespace())
                .next()
                .unwrap_or("");
            let Some(value) = line
                .rsplit(char::is_whitespace)
                .next()
                .and_then(|v| v.parse::<f64>().ok())
            else {
                continue;
            };
            if name == "vllm:cache_config_info" {
                let blocks = label(line, "num_gpu_blocks").and_then(|v| v.parse::<f64>().ok());
                let size = label(line, "block_size").and_then(|v| v.parse::<f64>().ok());
                if let (Some(blocks), Some(size)) = (blocks, size) {
                    load.cache_tokens = Some(blocks * size);
                }
                continue;
            } else if name == "sglang:max_total_num_tokens" {
                load.cache_tokens = Some(value);
                continue;
            } else if RUNNING.contains(&name) {
                load.binds_slots |= name.starts_with("llamacpp:");
                load.running += value;
            } else if WAITING.contains(&name) {
                load.waiting += value;
            } else if KV_CACHE.contains(&name) {
                load.kv_cache_usage = Some(load.kv_cache_usage.unwrap_or(0.0).max(value));
            } else {
                continue;
            }
            found = true;
        }
        found.then_some(load)
    }
}

/// The verdict of one probe round for one endpoint.
#[derive(Debug, Clone)]
struct ProbeResult {
    ok: bool,
    detail: String,
    models: Option<Vec<String>>,
    /// What an automatic probe found to work, to go straight to next time.
    resolved: Option<Resolved>,
}

/// What an automatic probe settled on for an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolved {
    /// `/health` answers.
    Health,
    /// `/health` is missing (404) but `/v1/models` answers.
    Models,
    /// Neither route exists: any HTTP answer other than a 5xx or 429 means it is up.
    AnyAnswer,
}

/// Rise/fall bookkeeping for one endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeState {
    pub url: String,
    pub healthy: bool,
    /// Not probed yet and not taking traffic (added at runtime): the first good probe admits it.
    pub pending: bool,
    pub consecutive_successes: u32,
    pub consecutive_failures: u32,
    pub probes: u64,
    pub last_probe_unix_ms: Option<u128>,
    pub last_result: Option<String>,
    /// For `probe = "auto"`: which check the endpoint answers.
    pub resolved: Option<Resolved>,
    pub load: Option<ScrapedLoad>,
    /// `/metrics` is read again only after this many ms when it had no load gauges (a server
    /// without them, or without `/metrics`), doubling each time up to five minutes.
    pub load_backoff_ms: u64,
    #[serde(skip)]
    next_scrape: Option<std::time::Instant>,
    /// A read of its `/metrics` is on its way.
    #[serde(skip)]
    scraping: bool,
    /// When the last read of its `/metrics` started.
    #[serde(skip)]
    last_read: Option<std::time::Instant>,
    /// The most any read found it running, and whether the last read raised it: its requests'
    /// asks are then chasing a load that grows, not a gauge that never shows it, and are not
    /// spaced. A new most, not just more than the read before: a gauge going up and down below
    /// what the gateway sends would otherwise earn a read every other tick for as long as it
    /// is busy, where each new most raises the guessed batch past it.
    #[serde(skip)]
    most_running: f64,
    #[serde(skip)]
    running_grew: bool,
    /// When the next scheduled probe is due (`None`: now), and whether one is on its way.
    #[serde(skip)]
    next_probe: Option<std::time::Instant>,
    #[serde(skip)]
    probing: bool,
}

impl ProbeState {
    /// A new endpoint's record, starting from the verdict it has now.
    pub fn new(url: String, healthy: bool) -> Self {
        Self {
            url,
            healthy,
            pending: !healthy,
            consecutive_successes: 0,
            consecutive_failures: 0,
            probes: 0,
            last_probe_unix_ms: None,
            last_result: None,
            resolved: None,
            load: None,
            load_backoff_ms: 0,
            next_scrape: None,
            scraping: false,
            most_running: 0.0,
            running_grew: false,
            last_read: None,
            next_probe: None,
            probing: false,
        }
    }

    /// Counts a probe; returns the new verdict when it changed.
    pub fn record(&mut self, ok: bool, settings: &HealthSettings) -> Option<bool> {
        self.probes += 1;
        let pending = std::mem::take(&mut self.pending);
        if ok {
            self.consecutive_successes += 1;
            self.consecutive_failures = 0;
            if !self.healthy && (pending || self.consecutive_successes >= settings.rise.max(1)) {
                self.healthy = true;
                return Some(true);
            }
        } else {
            self.consecutive_failures += 1;
            self.consecutive_successes = 0;
            if self.healthy && self.consecutive_failures >= settings.fall.max(1) {
                self.healthy = false;
                return Some(false);
            }
        }
        None
    }

    /// Notes how a `/metrics` read went: a failure pushes the next one back.
    fn scraped(&mut self, found: bool, now: std::time::Instant) {
        self.load_backoff_ms = if found {
            0
        } else {
            (self.load_backoff_ms * 2).clamp(5_000, MAX_LOAD_BACKOFF_MS)
        };
        self.next_scrape = Some(now + Duration::from_millis(self.load_backoff_ms));
    }

    fn scrape_due(&self, now: std::time::Instant) -> bool {
        self.next_scrape.is_none_or(|at| now >= at)
    }

    /// Whether a read may start now: none on its way, and past the back-off of a `/metrics`
    /// without load gauges.
    fn read_due(&self, now: std::time::Instant) -> bool {
        !self.scraping && self.scrape_due(now)
    }

    /// Takes what a read of its `/metrics` found.
    fn read(&mut self, load: ScrapedLoad) {
        self.running_grew = load.running > self.most_running;
        self.most_running = self.most_running.max(load.running);
        self.load = Some(load);
    }

    /// Whether a read its requests asked for may start now: [`read_due`](Self::read_due), and
    /// [`WANTED_READ_SPACING`] after the last unless that one found the load growing.
    fn wanted_read_due(&self, now: std::time::Instant) -> bool {
        self.read_due(now)
            && (self.running_grew
                || self
                    .last_read
                    .is_none_or(|at| now.saturating_duration_since(at) >= WANTED_READ_SPACING))
    }

    /// When to look again at a read asked for that may not start `now`: at the end of the
    /// spacing, or of the back-off of a `/metrics` without gauges if that is later; `None` while
    /// a read is on its way (its end looks again).
    fn wanted_read_at(&self, now: std::time::Instant) -> Option<std::time::Instant> {
        if self.scraping {
            return None;
        }
        let spaced = self.last_read.map_or(now, |at| at + WANTED_READ_SPACING);
        Some(self.next_scrape.map_or(spaced, |at| at.max(spaced)))
    }
}

/// What becomes of an endpoint's ask for a read of its load ([`HealthChecker::scrape_wanted`]).
#[derive(Debug, PartialEq, Eq)]
enum Ask {
    /// Out of rotation, it gets no requests to price: the ask is dropped, so that the next one,
    /// once it is back, wakes the checker again.
    Drop,
    /// Read now.
    Read,
    /// Not taken before the read can start: the ask waits for the spacing, a read on its way, or
    /// the back-off rather than being lost (a burst that asked once and then held steady would go
    /// unread until the interval). Looked at again then ([`ProbeState::wanted_read_at`]), or, for
    /// `None`, by the end of the read on its way.
    Wait(Option<std::time::Instant>),
}

impl Ask {
    fn of(healthy: bool, state: Option<&ProbeState>, now: std::time::Instant) -> Self {
        if !healthy {
            return Self::Drop;
        }
        match state {
            Some(s) if !s.wanted_read_due(now) => Self::Wait(s.wanted_read_at(now)),
            _ => Self::Read,
        }
    }
}

/// Reads asked for by requests ([`Endpoint::take_wants_load`]) start at most this often per
/// endpoint, unless the last found it running more than any before: a backend whose gauges
/// never show what it runs (a running count stuck at 0) would otherwise be read on every tick for
/// as long as it is busy. Spaced while the load grew, each read raised the guessed batch a
/// quarter (8, 12, 17 for a batch of 16) a quarter of a second apart, and every request that
/// found its prompt's home at the guess was priced as queued there and went elsewhere, copying
/// the prompt (four equal backends, conversations over 8 system prompts: 2 to 4 copies in the
/// first second).
const WANTED_READ_SPACING: Duration = Duration::from_millis(250);

/// The longest wait between two reads of a `/metrics` that had no load gauges.
const MAX_LOAD_BACKOFF_MS: u64 = 300_000;

// ===== HealthChecker =====

pub struct HealthChecker {
    settings: HealthSettings,
    balancer: Addr<Balancer>,
    view: BalancerView,
    /// Probe state per endpoint id.
    states: HashMap<usize, ProbeState>,
    client: Option<awc::Client>,
    /// The look again at reads asked for that could not start yet, and when it is due.
    wanted_recheck: Option<(std::time::Instant, SpawnHandle)>,
}

impl HealthChecker {
    pub fn new(settings: HealthSettings, view: BalancerView, balancer: Addr<Balancer>) -> Self {
        Self {
            settings,
            balancer,
            view,
            states: HashMap::new(),
            client: None,
            wanted_recheck: None,
        }
    }

    fn client(&mut self) -> awc::Client {
        let timeout = Duration::from_millis(self.settings.timeout_ms);
        self.client
            .get_or_insert_with(|| {
                awc::Client::builder()
                    .connector(crate::upstream_io::connector().timeout(timeout))
                    .timeout(timeout)
                    .no_default_headers()
                    .finish()
            })
            .clone()
    }

    /// Probes the endpoints whose probe is due: healthy ones every `interval_ms`, unhealthy
    /// ones every `unhealthy_interval_ms`.
    fn probe_due(&mut self, ctx: &mut Context<Self>) {
        let now = std::time::Instant::now();
        let table = self.view.table_arc();
        for endpoint in &table.endpoints {
            let due = self
                .states
                .get(&endpoint.id)
                .is_none_or(|s| !s.probing && s.next_probe.is_none_or(|at| now >= at));
            if due {
                self.probe(Some(endpoint.id), false, ctx);
            }
        }
    }

    /// Probes one endpoint, or all of them, now.
    fn probe(&mut self, only: Option<usize>, urgent: bool, ctx: &mut Context<Self>) {
        let client = self.client();
        let table = self.view.table_arc();
        let timeout = Duration::from_millis(if urgent {
            self.settings.urgent_timeout_ms
        } else {
            self.settings.timeout_ms
        });
        self.states
            .retain(|id, _| table.endpoints.iter().any(|e| e.id == *id));
        for endpoint in &table.endpoints {
            if only.is_some_and(|id| id != endpoint.id) {
                continue;
            }
            let state = self
                .states
                .entry(endpoint.id)
                .or_insert_with(|| ProbeState::new(endpoint.url.clone(), endpoint.is_healthy()));
            state.probing = true;
            let target = Target {
                client: client.clone(),
                url: state.url.clone(),
                authorization: endpoint.authorization.clone(),
                learn_models: endpoint.learns_models && !urgent,
                timeout,
            };
            let probe = probe(target, endpoint.probe.clone(), state.resolved.clone());
            let endpoint = endpoint.clone();
            ctx.spawn(probe.into_actor(self).map(move |result, this, _| {
                this.apply(&endpoint, result, urgent);
            }));
        }
    }

    fn scrape_all(&mut self, ctx: &mut Context<Self>) {
        let now = std::time::Instant::now();
        let table = self.view.table_arc();
        for endpoint in &table.endpoints {
            self.scrape(endpoint, now, ctx);
        }
    }

    /// Reads the load of the endpoints whose requests asked for it now
    /// ([`Endpoint::take_wants_load`]), between the interval's reads. Woken by the ask itself
    /// ([`BalancerView::load_wanted`]), by the end of a read, and by a timer for an ask that had to
    /// wait: a tick every 10 ms that looked for asks cost an idle gateway twice its CPU.
    fn scrape_wanted(&mut self, ctx: &mut Context<Self>) {
        let now = std::time::Instant::now();
        let table = self.view.table_arc();
        let mut recheck: Option<std::time::Instant> = None;
        for endpoint in &table.endpoints {
            // Looked at first: a swap of an unset flag would still write the line the request
            // path reads, and most endpoints have not asked.
            if !endpoint.wants_load() {
                continue;
            }
            match Ask::of(endpoint.is_healthy(), self.states.get(&endpoint.id), now) {
                Ask::Drop => {
                    endpoint.take_wants_load();
                }
                Ask::Read => {
                    if endpoint.take_wants_load() {
                        self.scrape(endpoint, now, ctx);
                    }
                }
                Ask::Wait(Some(at)) => {
                    recheck = Some(recheck.map_or(at, |earlier| earlier.min(at)));
                }
                Ask::Wait(None) => {}
            }
        }
        if let Some(at) = recheck {
            self.recheck_wanted_at(at, ctx);
        }
    }

    /// Looks at the reads asked for again at `at`, unless a look is already due by then.
    fn recheck_wanted_at(&mut self, at: std::time::Instant, ctx: &mut Context<Self>) {
        if let Some((due, handle)) = self.wanted_recheck {
            if due <= at {
                return;
            }
            ctx.cancel_future(handle);
        }
        let wait = at.saturating_duration_since(std::time::Instant::now());
        let handle = ctx.run_later(wait, |this, ctx| {
            this.wanted_recheck = None;
            this.scrape_wanted(ctx);
        });
        self.wanted_recheck = Some((at, handle));
    }

    /// Reads an endpoint's `/metrics` unless it is out, a read of it is on its way, or it had no
    /// load gauges lately (then it waits for its back-off).
    fn scrape(&mut self, endpoint: &Endpoint, now: std::time::Instant, ctx: &mut Context<Self>) {
        let due = self
            .states
            .get(&endpoint.id)
            .is_none_or(|s| s.read_due(now));
        if !endpoint.is_healthy() || !due {
            return;
        }
        if let Some(state) = self.states.get_mut(&endpoint.id) {
            state.scraping = true;
            state.last_read = Some(now);
        }
        let id = endpoint.id;
        let scrape = scrape(self.client(), endpoint.url.clone());
        ctx.spawn(scrape.into_actor(self).map(move |load, this, ctx| {
            this.scraped(id, load, ctx);
        }));
    }

    /// Takes what a read of endpoint `id`'s `/metrics` found, then looks at the reads asked for
    /// meanwhile (one of its own may have waited for this one).
    fn scraped(&mut self, id: usize, load: Option<ScrapedLoad>, ctx: &mut Context<Self>) {
        if let Some(state) = self.states.get_mut(&id) {
            state.scraping = false;
            state.scraped(load.is_some(), std::time::Instant::now());
            if load.is_none() && state.load_backoff_ms == 5_000 {
                log::debug!(
                    "{} has no load gauges on /metrics; reading it less often",
                    state.url
                );
            }
        }
        if let Some(load) = load {
            self.balancer.do_send(BackendLoad {
                endpoint: id,
                running: load.running,
                waiting: load.waiting,
                kv_cache: load.kv_cache_usage.unwrap_or(0.0),
                cache_tokens: load.cache_tokens,
                binds_slots: load.binds_slots,
            });
            if let Some(state) = self.states.get_mut(&id) {
                state.read(load);
            }
        }
        self.scrape_wanted(ctx);
    }

    /// Applies a probe's result. An urgent probe that fails takes the endpoint out at once; the
    /// balancer then wakes the requests waiting on it. Otherwise they are woken here.
    fn apply(&mut self, endpoint: &Endpoint, result: ProbeResult, urgent: bool) {
        let id = endpoint.id;
        let Some(state) = self.states.get_mut(&id) else {
            endpoint.probe_done();
            return;
        };
        state.probing = false;
        let settings = if urgent && !result.ok {
            &HealthSettings {
                fall: 1,
                ..self.settings.clone()
            }
        } else {
            &self.settings
        };
        match state.record(result.ok, settings) {
            Some(healthy) => {
                if !healthy {
                    log::warn!("{}: health probe failed: {}", state.url, result.detail);
                }
                self.balancer.do_send(HealthChanged {
                    endpoint: id,
                    healthy,
                });
            }
            None => endpoint.probe_done(),
        }
        let interval = if state.healthy {
            self.settings.interval_ms
        } else {
            self.settings
                .unhealthy_interval_ms
                .min(self.settings.interval_ms)
        };
        state.next_probe = Some(std::time::Instant::now() + Duration::from_millis(interval));
        state.last_probe_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| d.as_millis());
        state.last_result = Some(result.detail);
        state.resolved = result.resolved;
        if let Some(models) = result.models {
            self.balancer.do_send(ModelsLearned {
                endpoint: id,
                models,
            });
        }
    }
}

/// Where one probe goes.
struct Target {
    client: awc::Client,
    url: String,
    authorization: Option<String>,
    learn_models: bool,
    timeout: Duration,
}

/// What one `GET` got: a status and (for `/v1/models`) the model ids, or why there was no answer.
enum Answer {
    Status(u16, Option<Vec<String>>),
    Failed(String),
}

impl Target {
    /// `GET {url}{path}`, with no body and no `Content-Length` (some servers log an error for a
    /// GET that has one); `/v1/models` goes with the endpoint's key and its model ids are read.
    async fn get(&self, path: &str) -> Answer {
        let models = path == "/v1/models";
        let mut request = self
            .client
            .get(format!("{}{path}", self.url))
            .timeout(self.timeout);
        if models {
            if let Some(key) = &self.authorization {
                request = request.insert_header((awc::http::header::AUTHORIZATION, key.as_str()));
            }
        }
        match request.send_body(awc::body::None::new()).await {
            Ok(mut response) => {
                let status = response.status().as_u16();
                let ids = if models && response.status().is_success() {
                    response
                        .json::<ModelList>()
                        .limit(4 * 1024 * 1024)
                        .await
                        .ok()
                        .map(|list| list.data.into_iter().map(|m| m.id).collect())
                } else {
                    None
                };
                Answer::Status(status, ids)
            }
            Err(e) => Answer::Failed(e.to_string()),
        }
    }

    /// Whether a TCP connection to the endpoint opens.
    async fn connect(&self) -> Result<(), String> {
        let authority = self
            .url
            .parse::<awc::http::Uri>()
            .ok()
            .and_then(|uri| {
                let host = uri.host()?.to_string();
                Some(format!("{host}:{}", uri.port_u16().unwrap_or(80)))
            })
            .ok_or_else(|| format!("no host:port in {}", self.url))?;
        let connect = actix_rt::net::TcpStream::connect(authority);
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("connect timed out".into()),
        }
    }
}

/// Statuses that say a route is missing rather than the server being unwell.
fn missing(status: u16) -> bool {
    status == 404 || status == 405
}

/// Statuses a live server answers when it is up (if not for this request).
fn alive(status: u16) -> bool {
    status < 500 && status != 429
}

async fn probe(target: Target, kind: Probe, resolved: Option<Resolved>) -> ProbeResult {
    let verdict = |ok: bool, detail: String, resolved: Option<Resolved>| ProbeResult {
        ok,
        detail,
        models: None,
        resolved,
    };
    let mut result = match kind {
        Probe::Tcp => match target.connect().await {
            Ok(()) => verdict(true, "connected".into(), None),
            Err(e) => verdict(false, e, None),
        },
        Probe::Path(path) => match target.get(&path).await {
            Answer::Status(status, _) if (200..300).contains(&status) => {
                verdict(true, format!("{path}: {status}"), None)
            }
            Answer::Status(status, _) => verdict(false, format!("{path}: status {status}"), None),
            Answer::Failed(e) => verdict(false, format!("{path}: {e}"), None),
        },
        Probe::Auto => probe_auto(&target, resolved).await,
    };
    if result.models.is_none() && target.learn_models {
        if let Answer::Status(_, Some(models)) = target.get("/v1/models").await {
            result.models = Some(models);
        }
    }
    result
}

/// `/health`; where it is missing, `/v1/models`; where that is missing too, any answer at all.
/// Starts from what worked last time, so a settled endpoint costs one request a round.
async fn probe_auto(target: &Target, resolved: Option<Resolved>) -> ProbeResult {
    let failed = |detail: String| ProbeResult {
        ok: false,
        detail,
        models: None,
        resolved: resolved.clone(),
    };
    if resolved != Some(Resolved::Models) {
        match target.get("/health").await {
            Answer::Status(status, _) if (200..300).contains(&status) => {
                return ProbeResult {
                    ok: true,
                    detail: format!("/health: {status}"),
                    models: None,
                    resolved: Some(Resolved::Health),
                }
            }
            Answer::Status(status, _)
                if missing(status) && resolved == Some(Resolved::AnyAnswer) =>
            {
                return ProbeResult {
                    ok: true,
                    detail: format!("/health: {status}; the server answers"),
                    models: None,
                    resolved,
                }
            }
            Answer::Status(status, _) if !missing(status) => {
                return failed(format!("/health: status {status}"))
            }
            Answer::Status(..) => {}
            Answer::Failed(e) => return failed(format!("/health: {e}")),
        }
    }
    match target.get("/v1/models").await {
        Answer::Status(status, models) if alive(status) && !missing(status) => ProbeResult {
            ok: true,
            detail: format!("/v1/models: {status}"),
            models,
            resolved: Some(Resolved::Models),
        },
        Answer::Status(status, _) if missing(status) => ProbeResult {
            ok: true,
            detail: format!("/health and /v1/models: {status}; the server answers"),
            models: None,
            resolved: Some(Resolved::AnyAnswer),
        },
        Answer::Status(status, _) => failed(format!("/v1/models: status {status}")),
        Answer::Failed(e) => failed(format!("/v1/models: {e}")),
    }
}

async fn scrape(client: awc::Client, url: String) -> Option<ScrapedLoad> {
    let mut response = client
        .get(format!("{url}/metrics"))
        .send_body(awc::body::None::new())
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body = response.body().limit(4 * 1024 * 1024).await.ok()?;
    ScrapedLoad::parse(&String::from_utf8_lossy(&body))
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    id: String,
}

impl Actor for HealthChecker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.probe_due(ctx);
        ctx.run_interval(PROBE_TICK, Self::probe_due);
        if self.settings.load_interval_ms > 0 {
            self.scrape_all(ctx);
            ctx.add_stream(asks(self.view.load_wanted()));
            ctx.run_interval(
                Duration::from_millis(self.settings.load_interval_ms.max(10)),
                Self::scrape_all,
            );
        }
    }
}

impl Supervised for HealthChecker {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        log::warn!("health checker restarting; probing resumes");
        self.client = None;
        self.wanted_recheck = None;
        // The probes and reads on their way went with the old context: none will report back.
        for state in self.states.values_mut() {
            state.probing = false;
            state.scraping = false;
        }
    }
}

/// One item each time a request asks for an endpoint's load to be read: a permit stored by
/// [`tokio::sync::Notify::notify_one`] while no one waits is taken by the next wait, so an ask
/// between two looks is not lost.
fn asks(load_wanted: Arc<tokio::sync::Notify>) -> impl Stream<Item = ()> {
    futures_util::stream::unfold(load_wanted, |notify| async move {
        notify.notified().await;
        Some(((), notify))
    })
}

/// A request asked for a read ([`asks`]).
impl StreamHandler<()> for HealthChecker {
    fn handle(&mut self, (): (), ctx: &mut Self::Context) {
        self.scrape_wanted(ctx);
    }
}

/// Probes at once instead of waiting for the interval: one endpoint (a request on it failed, or is
/// overdue), or all of them (endpoints were added at runtime, so they take traffic as soon as they
/// answer).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct ProbeNow {
    pub endpoint: Option<usize>,
    /// A request is overdue on the endpoint: the probe has `urgent_timeout_ms`, and if it fails
    /// the endpoint is out at once (requests waiting on it fail over), whatever `fall` says.
    pub urgent: bool,
}

impl Handler<ProbeNow> for HealthChecker {
    type Result = ();

    fn handle(&mut self, msg: ProbeNow, ctx: &mut Self::Context) {
        let probing = msg
            .endpoint
            .and_then(|id| self.states.get(&id))
            .is_some_and(|s| s.probing);
        if probing && !msg.urgent {
            return;
        }
        self.probe(msg.endpoint, msg.urgent, ctx);
    }
}

impl Handler<GetStats> for HealthChecker {
    type Result = Stats;

    fn handle(&mut self, _msg: GetStats, _ctx: &mut Self::Context) -> Stats {
        let mut endpoints: Vec<(&usize, &ProbeState)> = self.states.iter().collect();
        endpoints.sort_by_key(|(id, _)| **id);
        let endpoints: Vec<serde_json::Value> = endpoints
            .into_iter()
            .map(|(id, state)| {
                let mut v = serde_json::to_value(state).unwrap_or_default();
                v["id"] = (*id).into();
                v
            })
            .collect();
        Stats(serde_json::json!({
            "interval_ms": self.settings.interval_ms,
            "timeout_ms": self.settings.timeout_ms,
            "load_interval_ms": self.settings.load_interval_ms,
            "rise": self.settings.rise,
            "fall": self.settings.fall,
            "endpoints": endpoints,
        }))
    }
}

impl Handler<Fail> for HealthChecker {
    type Result = ();

    fn handle(&mut self, _msg: Fail, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> ProbeState {
        ProbeState::new("http://a".into(), true)
    }

    /// A state whose last read started at the returned instant, and half a spacing after it.
    fn read_just_now() -> (ProbeState, std::time::Instant, std::time::Instant) {
        let mut s = state();
        let start = std::time::Instant::now();
        s.last_read = Some(start);
        (s, start, start + WANTED_READ_SPACING / 2)
    }

    #[test]
    fn reads_asked_for_by_requests_are_spaced() {
        let mut s = state();
        let start = std::time::Instant::now();
        assert!(s.wanted_read_due(start), "never read");
        s.last_read = Some(start);
        assert!(!s.wanted_read_due(start + WANTED_READ_SPACING / 2));
        assert!(s.wanted_read_due(start + WANTED_READ_SPACING));
        s.read(running(12.0));
        assert!(
            s.wanted_read_due(start),
            "the last read found the load growing"
        );
    }

    /// An ask that cannot be read yet is looked at again when it can: at the end of the spacing,
    /// at the end of the back-off of the endpoint's `/metrics`, and by the read's own end while
    /// one is on its way. Nothing else wakes the checker for it.
    #[test]
    fn an_ask_that_must_wait_is_looked_at_again_when_it_may_be_read() {
        let (mut s, start, soon) = read_just_now();
        assert!(!s.wanted_read_due(soon));
        assert_eq!(s.wanted_read_at(soon), Some(start + WANTED_READ_SPACING));
        s.scraping = true;
        assert_eq!(s.wanted_read_at(soon), None, "the read's end looks again");
        s.scraping = false;
        s.next_scrape = Some(start + Duration::from_secs(5));
        assert_eq!(s.wanted_read_at(soon), Some(start + Duration::from_secs(5)));
    }

    #[test]
    fn an_ask_is_read_when_due_kept_while_it_must_wait_and_dropped_while_out_of_rotation() {
        let (mut s, start, soon) = read_just_now();
        assert_eq!(Ask::of(false, Some(&s), soon), Ask::Drop);
        assert_eq!(Ask::of(true, None, soon), Ask::Read, "never read before");
        assert_eq!(
            Ask::of(true, Some(&s), soon),
            Ask::Wait(Some(start + WANTED_READ_SPACING))
        );
        assert_eq!(
            Ask::of(true, Some(&s), start + WANTED_READ_SPACING),
            Ask::Read
        );
        s.scraping = true;
        assert_eq!(Ask::of(true, Some(&s), soon), Ask::Wait(None));
    }

    fn running(running: f64) -> ScrapedLoad {
        ScrapedLoad {
            running,
            ..ScrapedLoad::default()
        }
    }

    #[test]
    fn only_a_new_most_running_lets_asked_for_reads_through_unspaced() {
        let (mut s, _, soon) = read_just_now();
        for (found, unspaced) in [(5.0, true), (2.0, false), (5.0, false), (6.0, true)] {
            s.read(running(found));
            assert_eq!(s.wanted_read_due(soon), unspaced, "read {found} running");
        }
        s.read(running(0.0));
        assert!(!s.wanted_read_due(soon), "a gauge stuck at 0 is spaced");
    }

    #[test]
    fn falls_after_three_failures_and_rises_after_two_successes() {
        let settings = HealthSettings::default();
        let mut s = state();
        assert_eq!(s.record(false, &settings), None);
        assert_eq!(s.record(false, &settings), None);
        assert_eq!(s.record(false, &settings), Some(false));
        assert_eq!(s.record(false, &settings), None);
        assert_eq!(s.record(true, &settings), None);
        assert_eq!(
            s.record(false, &settings),
            None,
            "a failure resets the rise count"
        );
        assert_eq!(s.record(true, &settings), None);
        assert_eq!(s.record(true, &settings), Some(true));
        assert_eq!(s.probes, 8);
    }

    #[test]
    fn an_endpoint_added_at_runtime_is_admitted_by_its_first_good_probe() {
        let settings = HealthSettings::default();
        let mut s = ProbeState::new("http://a".into(), false);
        assert!(s.pending);
        assert_eq!(s.record(true, &settings), Some(true));
        let mut failing = ProbeState::new("http://b".into(), false);
        assert_eq!(failing.record(false, &settings), None);
        assert_eq!(
            failing.record(true, &settings),
            None,
            "once probed, the rise threshold applies"
        );
    }

    #[test]
    fn parses_vllm_sglang_and_tgi_gauges() {
        let vllm = "# HELP vllm:num_requests_running x\n# TYPE vllm:num_requests_running gauge\n\
            vllm:num_requests_running{model_name=\"a\"} 3.0\nvllm:num_requests_waiting{model_name=\"a\"} 7\n\
            vllm:kv_cache_usage_perc{model_name=\"a\"} 0.42\nvllm:other 9\n";
        assert_eq!(
            ScrapedLoad::parse(vllm),
            Some(ScrapedLoad {
                running: 3.0,
                waiting: 7.0,
                kv_cache_usage: Some(0.42),
                cache_tokens: None,
                binds_slots: false,
            })
        );
        let info = "vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"2048\"} 1.0\n\
            vllm:num_requests_running 0\n";
        assert_eq!(
            ScrapedLoad::parse(info).unwrap().cache_tokens,
            Some(32768.0)
        );
        let unset = "vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"None\"} 1\n";
        assert_eq!(ScrapedLoad::parse(unset), None);
        let sglang_size = "sglang:max_total_num_tokens 500000\nsglang:num_queue_reqs 0\n";
        assert_eq!(
            ScrapedLoad::parse(sglang_size).unwrap().cache_tokens,
            Some(500000.0)
        );
        let sglang =
            "sglang:num_running_reqs{a=\"b\"} 2\nsglang:num_queue_reqs 1\nsglang:token_usage 0.5\n";
        assert_eq!(ScrapedLoad::parse(sglang).unwrap().waiting, 1.0);
        assert_eq!(
            ScrapedLoad::parse("tgi_queue_size 4\n").unwrap().waiting,
            4.0
        );
        assert_eq!(ScrapedLoad::parse("process_cpu_seconds_total 1\n"), None);
        let llama = "llamacpp:requests_processing 2\nllamacpp:requests_deferred 1\n";
        let llama = ScrapedLoad::parse(llama).unwrap();
        assert!(llama.binds_slots);
        assert_eq!((llama.running, llama.waiting), (2.0, 1.0));
        assert!(
            !ScrapedLoad::parse("vllm:num_requests_running 0\n")
                .unwrap()
                .binds_slots
        );
    }
}
