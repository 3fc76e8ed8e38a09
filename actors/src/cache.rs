//! The response cache: identical deterministic requests answered from memory. Entries live at
//! most `ttl_secs`, and the least recently used go first when the entry or byte budget is full.
//! Identical requests that miss at the same time make one upstream call: the first becomes the
//! leader and fills the entry, the others wait for it. What may be cached (non-streaming, and
//! temperature 0 or a seed, or an explicit opt-in; never errors) is decided by the ingress.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::dev::MessageResponse;
use actix::prelude::*;
use bytes::Bytes;
use lru::LruCache;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::buffers::{BudgetStats, ByteBudget};
use crate::clock::SharedClock;
use crate::{Fail, GetStats, Stats};

/// Cache limits; defaults documented in `config/default.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    pub enabled: bool,
    pub ttl_secs: u64,
    pub max_entries: usize,
    pub max_bytes: usize,
    /// Largest answer stored; a longer one is streamed to its client and not cached.
    pub max_entry_bytes: usize,
    /// Bytes of answers being gathered to fill the cache, over all requests at once; a fill that
    /// would pass it streams instead.
    pub fill_buffer_bytes: usize,
    /// Whether an answer may go to another caller (another API key, or other credentials) than
    /// the one whose request filled it.
    pub shared: bool,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl_secs: 300,
            max_entries: 10_000,
            max_bytes: 64 * 1024 * 1024,
            max_entry_bytes: 4 * 1024 * 1024,
            fill_buffer_bytes: 64 * 1024 * 1024,
            shared: false,
        }
    }
}

/// A stored answer.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

/// What identifies a cached answer: the ingress builds it from the route, the credentials and the
/// exact body.
pub type Key = Vec<u8>;

struct Entry {
    response: Arc<CachedResponse>,
    stored_at: Instant,
    bytes: usize,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct CacheCounters {
    pub entries: usize,
    pub bytes: usize,
    pub hits: u64,
    pub misses: u64,
    pub coalesced: u64,
    pub insertions: u64,
    pub evictions: u64,
    pub expirations: u64,
}

// ===== ResponseCache =====

/// LRU with TTL and entry and byte limits; plain data, so its rules are tested without an actor.
pub struct ResponseCache {
    entries: LruCache<Key, Entry>,
    settings: CacheSettings,
    ttl: Duration,
    clock: SharedClock,
    counters: CacheCounters,
}

impl ResponseCache {
    pub fn new(settings: CacheSettings, clock: SharedClock) -> Self {
        Self {
            entries: LruCache::unbounded(),
            ttl: Duration::from_secs(settings.ttl_secs),
            settings,
            clock,
            counters: CacheCounters::default(),
        }
    }

    pub fn get(&mut self, key: &[u8]) -> Option<Arc<CachedResponse>> {
        let now = self.clock.now();
        let fresh = match self.entries.get(key) {
            Some(entry) => now.saturating_duration_since(entry.stored_at) < self.ttl,
            None => {
                self.counters.misses += 1;
                return None;
            }
        };
        if !fresh {
            self.remove(key);
            self.counters.expirations += 1;
            self.counters.misses += 1;
            return None;
        }
        self.counters.hits += 1;
        self.entries.get(key).map(|e| e.response.clone())
    }

    pub fn put(&mut self, key: Key, response: CachedResponse) -> Arc<CachedResponse> {
        let response = Arc::new(response);
        let bytes = key.len() + response.body.len();
        if bytes > self.settings.max_bytes || self.settings.max_entries == 0 {
            return response;
        }
        self.remove(&key);
        while self.entries.len() >= self.settings.max_entries
            || self.counters.bytes + bytes > self.settings.max_bytes
        {
            match self.entries.pop_lru() {
                Some((_, old)) => {
                    self.counters.bytes -= old.bytes;
                    self.counters.evictions += 1;
                }
                None => break,
            }
        }
        self.counters.bytes += bytes;
        self.counters.insertions += 1;
        self.entries.put(
            key,
            Entry {
                response: response.clone(),
                stored_at: self.clock.now(),
                bytes,
            },
        );
        response
    }

    fn remove(&mut self, key: &[u8]) {
        if let Some(old) = self.entries.pop(key) {
            self.counters.bytes -= old.bytes;
        }
    }

    /// Drops every expired entry, so memory is freed even for keys never asked for again.
    pub fn purge_expired(&mut self) {
        let now = self.clock.now();
        let expired: Vec<Key> = self
            .entries
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.stored_at) >= self.ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            self.remove(&key);
            self.counters.expirations += 1;
        }
    }

    pub fn counters(&self) -> CacheCounters {
        CacheCounters {
            entries: self.entries.len(),
            ..self.counters.clone()
        }
    }
}

// ===== messages =====

/// Looks a request up; the answer says whether to use a stored response, wait for an identical
/// request in flight, or go upstream and fill the entry.
#[derive(Message)]
#[rtype(result = "LookupResult")]
pub struct Lookup {
    pub key: Key,
}

#[derive(MessageResponse)]
pub enum LookupResult {
    Hit(Arc<CachedResponse>),
    /// An identical request is in flight; its response (or `None` if it failed) arrives here.
    Wait(oneshot::Receiver<Option<Arc<CachedResponse>>>),
    /// This request goes upstream; it must fill the entry (a failed one fills with `None`).
    Lead(FillGuard),
    Disabled,
}

/// The leader's answer for an entry: stores it and wakes the requests waiting on it.
#[derive(Message)]
#[rtype(result = "()")]
struct Fill {
    key: Key,
    response: Option<CachedResponse>,
}

/// The leader's duty to fill; dropping it unfilled (the leader failed or its client left)
/// releases the waiters so they go upstream themselves.
pub struct FillGuard {
    key: Option<Key>,
    cache: Addr<Cache>,
}

impl FillGuard {
    pub fn fill(mut self, response: CachedResponse) {
        if let Some(key) = self.key.take() {
            self.cache.do_send(Fill {
                key,
                response: Some(response),
            });
        }
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.cache.do_send(Fill {
                key,
                response: None,
            });
        }
    }
}

// ===== Cache =====

type Waiters = Vec<oneshot::Sender<Option<Arc<CachedResponse>>>>;

pub struct Cache {
    cache: ResponseCache,
    enabled: bool,
    in_flight: HashMap<Key, Waiters>,
    /// The bytes leaders are gathering to fill entries (the ingress reserves them).
    fills: Arc<ByteBudget>,
}

impl Cache {
    pub fn new(settings: CacheSettings, clock: SharedClock, fills: Arc<ByteBudget>) -> Self {
        Self {
            enabled: settings.enabled,
            cache: ResponseCache::new(settings, clock),
            in_flight: HashMap::new(),
            fills,
        }
    }
}

impl Actor for Cache {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
        ctx.run_interval(Duration::from_secs(10), |this, _| {
            this.cache.purge_expired()
        });
    }
}

impl Supervised for Cache {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        log::warn!("cache restarting; entries are kept, waiting requests are released");
        self.in_flight.clear();
    }
}

impl Handler<Lookup> for Cache {
    type Result = LookupResult;

    fn handle(&mut self, msg: Lookup, ctx: &mut Self::Context) -> LookupResult {
        if !self.enabled {
            return LookupResult::Disabled;
        }
        if let Some(hit) = self.cache.get(&msg.key) {
            return LookupResult::Hit(hit);
        }
        if let Some(waiters) = self.in_flight.get_mut(&msg.key) {
            let (tx, rx) = oneshot::channel();
            waiters.push(tx);
            self.cache.counters.coalesced += 1;
            return LookupResult::Wait(rx);
        }
        self.in_flight.insert(msg.key.clone(), Vec::new());
        LookupResult::Lead(FillGuard {
            key: Some(msg.key),
            cache: ctx.address(),
        })
    }
}

impl Handler<Fill> for Cache {
    type Result = ();

    fn handle(&mut self, msg: Fill, _ctx: &mut Self::Context) {
        let stored = msg.response.map(|r| self.cache.put(msg.key.clone(), r));
        for waiter in self.in_flight.remove(&msg.key).unwrap_or_default() {
            let _ = waiter.send(stored.clone());
        }
    }
}

#[derive(Serialize)]
struct CacheStats {
    enabled: bool,
    #[serde(flatten)]
    counters: CacheCounters,
    leaders_in_flight: usize,
    fill_buffer: BudgetStats,
}

impl Handler<GetStats> for Cache {
    type Result = Stats;

    fn handle(&mut self, _msg: GetStats, _ctx: &mut Self::Context) -> Stats {
        Stats::of(&CacheStats {
            enabled: self.enabled,
            counters: self.cache.counters(),
            leaders_in_flight: self.in_flight.len(),
            fill_buffer: self.fills.stats(),
        })
    }
}

impl Handler<Fail> for Cache {
    type Result = ();

    fn handle(&mut self, _msg: Fail, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn response(body: &'static str) -> CachedResponse {
        CachedResponse {
            status: 200,
            content_type: Some("application/json".into()),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    fn cache(max_entries: usize, max_bytes: usize) -> (ResponseCache, ManualClock) {
        let clock = ManualClock::default();
        let settings = CacheSettings {
            enabled: true,
            ttl_secs: 300,
            max_entries,
            max_bytes,
            ..CacheSettings::default()
        };
        (ResponseCache::new(settings, Arc::new(clock.clone())), clock)
    }

    #[test]
    fn entries_expire_after_ttl() {
        let (mut c, clock) = cache(10, 1 << 20);
        c.put("k".into(), response("v"));
        clock.advance(Duration::from_secs(299));
        assert!(c.get(b"k").is_some());
        clock.advance(Duration::from_secs(1));
        assert!(c.get(b"k").is_none());
        let counters = c.counters();
        assert_eq!(
            (counters.hits, counters.misses, counters.expirations),
            (1, 1, 1)
        );
        assert_eq!((counters.entries, counters.bytes), (0, 0));
    }

    #[test]
    fn least_recently_used_goes_first() {
        let (mut c, _) = cache(2, 1 << 20);
        c.put("a".into(), response("1"));
        c.put("b".into(), response("2"));
        assert!(c.get(b"a").is_some());
        c.put("c".into(), response("3"));
        assert!(c.get(b"b").is_none(), "b was least recently used");
        assert!(c.get(b"a").is_some());
        assert!(c.get(b"c").is_some());
        assert_eq!(c.counters().evictions, 1);
    }

    #[test]
    fn byte_budget_evicts_and_oversized_entries_are_not_stored() {
        let (mut c, _) = cache(100, 10);
        c.put("a".into(), response("1234"));
        c.put("b".into(), response("5678"));
        assert_eq!(c.counters().bytes, 10);
        c.put("c".into(), response("9"));
        assert!(c.get(b"a").is_none());
        assert_eq!(c.counters().bytes, 7);
        c.put("big".into(), response("0123456789"));
        assert!(c.get(b"big").is_none());
        assert_eq!(c.counters().entries, 2);
    }

    #[test]
    fn purge_frees_expired_entries() {
        let (mut c, clock) = cache(10, 1 << 20);
        c.put("a".into(), response("1"));
        clock.advance(Duration::from_secs(200));
        c.put("b".into(), response("2"));
        clock.advance(Duration::from_secs(150));
        c.purge_expired();
        let counters = c.counters();
        assert_eq!((counters.entries, counters.expirations), (1, 1));
    }

    #[actix_rt::test]
    async fn identical_concurrent_misses_share_one_leader() {
        let cache = Cache::new(
            CacheSettings::default(),
            crate::clock::system(),
            ByteBudget::new(1 << 20),
        )
        .start();
        let lookup = || cache.send(Lookup { key: "k".into() });
        let LookupResult::Lead(guard) = lookup().await.unwrap() else {
            panic!("first lookup leads");
        };
        let LookupResult::Wait(waiter) = lookup().await.unwrap() else {
            panic!("second lookup waits");
        };
        guard.fill(response("answer"));
        let shared = waiter.await.unwrap().unwrap();
        assert_eq!(shared.body, Bytes::from_static(b"answer"));
        assert!(matches!(lookup().await.unwrap(), LookupResult::Hit(_)));
    }

    #[actix_rt::test]
    async fn a_failed_leader_releases_its_waiters() {
        let cache = Cache::new(
            CacheSettings::default(),
            crate::clock::system(),
            ByteBudget::new(1 << 20),
        )
        .start();
        let LookupResult::Lead(guard) = cache.send(Lookup { key: "k".into() }).await.unwrap()
        else {
            panic!("first lookup leads");
        };
        let LookupResult::Wait(waiter) = cache.send(Lookup { key: "k".into() }).await.unwrap()
        else {
            panic!("second lookup waits");
        };
        drop(guard);
        assert!(waiter.await.unwrap().is_none());
        assert!(matches!(
            cache.send(Lookup { key: "k".into() }).await.unwrap(),
            LookupResult::Lead(_)
        ));
    }
}
