//! What a backend probably holds in its prefix cache, and where the gateway last sent each
//! prompt: an approximate index of the prompt blocks recently sent to one backend, modelled on
//! vLLM's automatic prefix caching. A prompt is cut into blocks of [`BLOCK_BYTES`] and each
//! block's key chains the one before it (as vLLM's block hashes do), so a key stands for the whole
//! prefix up to its block, and the longest prefix of a prompt the index holds is the last of its
//! keys it holds.
//!
//! Whether a block is still *cached* follows LRU's stack distance: the backend evicts a block once
//! as many new blocks as its cache holds have come in since the block was last used. So the index
//! counts the blocks it sends that the backend does not have (its misses), stamps every block it
//! sends with that count, and a block is cached while fewer than the cache's size of misses have
//! come since its stamp. The table itself holds [`HOME_FACTOR`] times as many blocks as the cache:
//! a prompt the backend has evicted is still *known* there, which is what keeps a prompt's home
//! stable while it comes and goes from the caches (the home is where it will be warm again soonest
//! after one prefill, and moving it would evict another prompt elsewhere). The misses per second,
//! over the cache's size, also say how long a block stays cached there ([`PrefixIndex::misses`]).
//!
//! The table is set-associative, of atomics, like a CPU cache: each key lives in one set of
//! [`WAYS`] slots chosen by its high bits, and inserting into a full set evicts the slot with the
//! oldest stamp. Blocks are inserted last first, so a prompt's first blocks are the most recent
//! and its tail goes first, which is how vLLM frees a finished request's blocks. Reads and writes
//! take no lock and allocate nothing: HTTP threads on every core pick with it while others insert;
//! two threads writing one set at the same moment may lose one write, which an approximate index
//! can afford. Memory is [`PrefixIndex::bytes`], 12 bytes per slot; the table is sized once the
//! backend tells its cache's size (vLLM's `num_gpu_blocks`) and replaced whole when resized,
//! which forgets what it held, as a restarted backend would.

use std::sync::{
    atomic::{AtomicU32, AtomicU64, Ordering},
    Arc,
};

use arc_swap::ArcSwap;

/// Prompt bytes per block: about 16 tokens of English, vLLM's default block size.
pub const BLOCK_BYTES: usize = 64;
/// Slots per set.
pub const WAYS: usize = 4;
/// Slots per block of the backend's cache: how much longer than the cache the index remembers.
pub const HOME_FACTOR: usize = 4;
/// Blocks looked at past a missing one before a prefix is taken to end there.
const GAP: usize = 4;

/// One set: its keys (0 = empty) and the miss count when each was last sent.
#[derive(Default)]
struct Set {
    keys: [AtomicU64; WAYS],
    stamps: [AtomicU32; WAYS],
}

pub struct PrefixIndex {
    table: ArcSwap<Table>,
    /// Blocks sent that the backend did not have cached, ever.
    misses: AtomicU64,
    /// Blocks sent, ever.
    sent: AtomicU64,
    /// Blocks sent that it had been sent before (cached or since evicted), ever.
    recurred: AtomicU64,
}

impl std::fmt::Debug for PrefixIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixIndex")
            .field("cache_blocks", &self.cache_blocks())
            .field("slots", &self.slots())
            .finish_non_exhaustive()
    }
}

/// How much of a prompt an endpoint has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Match {
    /// Leading blocks it probably still caches.
    pub cached: usize,
    /// Leading blocks it was sent before, cached or since evicted.
    pub known: usize,
}

struct Table {
    /// The backend's cache size in blocks: a block is cached while fewer misses than this came
    /// since its stamp.
    cache_blocks: u32,
    sets: Box<[Set]>,
}

impl Table {
    /// For a cache of `blocks` blocks; 0 holds nothing.
    fn new(blocks: usize) -> Self {
        let cache_blocks = blocks.min(u32::MAX as usize / HOME_FACTOR);
        let sets = (cache_blocks * HOME_FACTOR).div_ceil(WAYS);
        Self {
            cache_blocks: cache_blocks as u32,
            sets: (0..sets).map(|_| Set::default()).collect(),
        }
    }

    /// The key's set: its high 32 bits scaled to the number of sets (a multiply and a shift
    /// rather than a modulo, so any number of sets is as cheap as a power of two).
    fn set(&self, key: u64) -> Option<&Set> {
        let n = self.sets.len() as u64;
        (n > 0).then(|| &self.sets[(((key >> 32) * n) >> 32) as usize])
    }

    /// The stamp of `key`, if held.
    fn stamp(&self, key: u64) -> Option<u32> {
        let set = self.set(key)?;
        (0..WAYS)
            .find(|&w| set.keys[w].load(Ordering::Relaxed) == key)
            .map(|w| set.stamps[w].load(Ordering::Relaxed))
    }

    fn cached(&self, stamp: u32, now: u32) -> bool {
        now.wrapping_sub(stamp) < self.cache_blocks
    }
}

/// The longest prefix of `len` blocks for which `holds(i)` is true of block `i - 1`, given that
/// it is true of every block before one it is true of.
fn longest(len: usize, holds: impl Fn(usize) -> bool) -> usize {
    let (mut low, mut high) = (0, len);
    while low < high {
        let mid = (low + high).div_ceil(2);
        if holds(mid - 1) {
            low = mid;
        } else {
            high = mid - 1;
        }
    }
    low
}

/// The chained keys of a prompt's full blocks, at most `max_blocks` of them, into `out`.
pub fn block_keys(prompt: &[u8], max_blocks: usize, out: &mut Vec<u64>) {
    block_keys_of(&[prompt], max_blocks, out);
}

/// The chained keys of the full blocks of `parts` taken as one prompt (a system prompt, then the
/// messages), at most `max_blocks` of them, into `out`.
pub fn block_keys_of(parts: &[&[u8]], max_blocks: usize, out: &mut Vec<u64>) {
    let mut key = 0u64;
    let mut carry = [0u8; BLOCK_BYTES];
    let mut carried = 0;
    let mut push = |block: &[u8], out: &mut Vec<u64>| {
        key = crate::policy::affinity::stable_hash_seeded(key, block);
        out.push(key | 1);
    };
    for part in parts {
        let mut part = *part;
        if carried > 0 {
            let take = (BLOCK_BYTES - carried).min(part.len());
            carry[carried..carried + take].copy_from_slice(&part[..take]);
            carried += take;
            part = &part[take..];
            if carried < BLOCK_BYTES {
                continue;
            }
            if out.len() >= max_blocks {
                return;
            }
            push(&carry, out);
        }
        let mut blocks = part.chunks_exact(BLOCK_BYTES);
        for block in &mut blocks {
            if out.len() >= max_blocks {
                return;
            }
            push(block, out);
        }
        let rest = blocks.remainder();
        carry[..rest.len()].copy_from_slice(rest);
        carried = rest.len();
    }
}

impl PrefixIndex {
    /// An index for a backend cache of `blocks` blocks; 0 makes an index that holds nothing.
    pub fn new(blocks: usize) -> Self {
        Self {
            table: ArcSwap::from_pointee(Table::new(blocks)),
            misses: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            recurred: AtomicU64::new(0),
        }
    }

    /// The backend cache size it models, in blocks.
    pub fn cache_blocks(&self) -> usize {
        self.table.load().cache_blocks as usize
    }

    /// Its slots: [`HOME_FACTOR`] per cached block.
    pub fn slots(&self) -> usize {
        self.table.load().sets.len() * WAYS
    }

    /// Its memory, in bytes.
    pub fn bytes(&self) -> usize {
        self.table.load().sets.len() * std::mem::size_of::<Set>()
    }

    /// Blocks sent that the backend did not have cached, ever: their rate over the cache's size
    /// is how fast the cache turns over.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Blocks sent, ever.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Blocks sent that it had been sent before, cached or since evicted, ever: over
    /// [`sent`](Self::sent), how much of what this backend is sent recurs. Counted apart from the
    /// hits because a cache that thrashes hits little though its prompts do recur, and routing
    /// that took its low hit rate for prompts that never come back would spread them further.
    pub fn recurred(&self) -> u64 {
        self.recurred.load(Ordering::Relaxed)
    }

    /// Remodels it for a cache of `blocks` blocks, empty; false (and nothing forgotten) when that
    /// is the size it has.
    pub fn resize(&self, blocks: usize) -> bool {
        let table = Table::new(blocks);
        let current = self.table.load();
        if table.cache_blocks == current.cache_blocks && table.sets.len() == current.sets.len() {
            return false;
        }
        self.table.store(Arc::new(table));
        true
    }

    /// How many of the leading blocks `keys` it knows, and how many of those are probably still
    /// cached. A block's key chains every block before it, so holding block `i` means the whole
    /// prefix up to `i` was sent here, and (the head of a prompt being sent last) was used at
    /// least as recently as block `i`: both counts are where the last such block is. Binary
    /// searches, looking [`GAP`] blocks ahead at each step, so a block or three the table lost to
    /// a full set do not cut the prefix short.
    pub fn matched(&self, keys: &[u64]) -> Match {
        let table = self.table.load();
        let now = self.misses.load(Ordering::Relaxed) as u32;
        // The furthest block within GAP of block `i` (and before `end`) it holds, with `ok` stamp.
        let furthest = |i: usize, end: usize, ok: &dyn Fn(u32) -> bool| {
            (i..end.min(i + GAP))
                .rev()
                .find(|&j| table.stamp(keys[j]).is_some_and(ok))
        };
        let last = |end: usize, ok: &dyn Fn(u32) -> bool| match longest(end, |i| {
            furthest(i, end, ok).is_some()
        }) {
            0 => 0,
            found => furthest(found - 1, end, ok).map_or(found, |j| j + 1),
        };
        // Most endpoints of a large fleet were never sent the prompt: its first blocks settle that
        // in a few probes, where the binary search would take about seven steps of `GAP` each.
        if furthest(0, keys.len(), &|_| true).is_none() {
            return Match::default();
        }
        let known = last(keys.len(), &|_| true);
        let cached = last(known, &|stamp| table.cached(stamp, now));
        Match { cached, known }
    }

    /// Blocks it missed since the prompt of `keys` was last sent here (over the cache's size, how
    /// many times over its cache has turned since), or `None` if none of its first blocks is
    /// held. The head is sent last, so its stamp says when the prompt was last here. Apart from
    /// [`matched`](Self::matched), which every pick calls for every endpoint: only placing a
    /// prompt its home has let go needs it.
    pub fn misses_since(&self, keys: &[u64]) -> Option<u32> {
        let table = self.table.load();
        let now = self.misses.load(Ordering::Relaxed) as u32;
        keys.iter()
            .take(GAP)
            .find_map(|&key| table.stamp(key))
            .map(|stamp| now.wrapping_sub(stamp))
    }

    /// Records that `keys` were just sent: each block the backend probably lacks counts a miss;
    /// every block gets the miss count as its stamp, inserted (evicting the oldest stamp of its
    /// set) if not held. The last block goes first, so the first is the most recent.
    pub fn insert(&self, keys: &[u64]) {
        let table = self.table.load();
        if table.sets.is_empty() {
            return;
        }
        self.sent.fetch_add(keys.len() as u64, Ordering::Relaxed);
        for &key in keys.iter().rev() {
            let Some(set) = table.set(key) else { return };
            let held = (0..WAYS).find(|&w| set.keys[w].load(Ordering::Relaxed) == key);
            if held.is_some() {
                self.recurred.fetch_add(1, Ordering::Relaxed);
            }
            let now = self.misses.load(Ordering::Relaxed) as u32;
            let hit =
                held.is_some_and(|w| table.cached(set.stamps[w].load(Ordering::Relaxed), now));
            let stamp = if hit {
                now
            } else {
                self.misses.fetch_add(1, Ordering::Relaxed).wrapping_add(1) as u32
            };
            let way = held.unwrap_or_else(|| {
                (0..WAYS)
                    .max_by_key(|&w| {
                        let empty = set.keys[w].load(Ordering::Relaxed) == 0;
                        (
                            empty,
                            stamp.wrapping_sub(set.stamps[w].load(Ordering::Relaxed)),
                        )
                    })
                    .unwrap_or(0)
            });
            set.keys[way].store(key, Ordering::Relaxed);
            set.stamps[way].store(stamp, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> Vec<u64> {
        let mut out = Vec::new();
        block_keys(text.as_bytes(), 1024, &mut out);
        out
    }

    #[test]
    fn keys_chain_so_equal_blocks_after_different_prefixes_differ() {
        let a = keys(&format!("{}{}", "a".repeat(64), "x".repeat(64)));
        let b = keys(&format!("{}{}", "b".repeat(64), "x".repeat(64)));
        assert_eq!(a.len(), 2);
        assert_ne!(
            a[1], b[1],
            "the same second block after another first block"
        );
        assert_eq!(keys(&"a".repeat(100)).len(), 1, "only full blocks");
    }

    #[test]
    fn parts_are_keyed_as_one_prompt() {
        let whole = "x".repeat(100) + &"y".repeat(100);
        let mut split = Vec::new();
        block_keys_of(
            &["x".repeat(100).as_bytes(), "y".repeat(100).as_bytes()],
            64,
            &mut split,
        );
        assert_eq!(split, keys(&whole));
        let mut capped = Vec::new();
        block_keys_of(&[whole.as_bytes()], 2, &mut capped);
        assert_eq!(capped.len(), 2);
    }

    #[test]
    fn the_longest_cached_prefix_is_found() {
        let index = PrefixIndex::new(1024);
        let system = "s".repeat(64 * 10);
        let first = keys(&format!("{system}{}", "q".repeat(64 * 3)));
        index.insert(&first);
        assert_eq!(
            index.matched(&first),
            Match {
                cached: 13,
                known: 13
            }
        );
        assert_eq!(index.misses(), 13);
        let second = keys(&format!("{system}{}", "r".repeat(64 * 3)));
        assert_eq!(
            index.matched(&second).cached,
            10,
            "the shared system prompt"
        );
        assert_eq!(index.matched(&keys(&"t".repeat(640))), Match::default());
        assert_eq!(index.matched(&[]), Match::default());
        index.insert(&second);
        assert_eq!(index.misses(), 16, "only the new blocks missed");
    }

    #[test]
    fn a_prefix_whose_first_blocks_the_table_lost_is_found_up_to_the_gap() {
        let prompt = keys(&"p".repeat(64 * 20));
        // Its first three blocks lost to full sets: still found, in a few probes.
        let index = PrefixIndex::new(1024);
        index.insert(&prompt[3..]);
        assert_eq!(index.matched(&prompt).known, 20);
        // Its first `GAP`: taken as never sent, as by most endpoints of a large fleet.
        let index = PrefixIndex::new(1024);
        index.insert(&prompt[GAP..]);
        assert_eq!(index.matched(&prompt), Match::default());
    }

    #[test]
    fn a_prompt_leaves_the_cache_after_a_cache_of_misses_but_stays_known() {
        let index = PrefixIndex::new(256);
        assert_eq!((index.cache_blocks(), index.slots()), (256, 1024));
        let old = keys(&"o".repeat(64 * 40));
        index.insert(&old);
        // 230 more misses: block i of the old prompt (stamped 40 - i, the head last) has seen
        // 230 + i misses since, so the first 26 are still within the cache's 256.
        index.insert(&keys(&"n".repeat(64 * 230)));
        let after = index.matched(&old);
        // (A full set may have dropped a block or two: the index is approximate.)
        assert!(
            (20..=26).contains(&after.cached) && after.known >= 35,
            "the head survives longer than the tail: {after:?}"
        );
        index.insert(&keys(&"m".repeat(64 * 256)));
        let evicted = index.matched(&old);
        assert_eq!(
            evicted.cached, 0,
            "256 newer misses push it out of a 256-block cache"
        );
        assert!(
            evicted.known > 30,
            "but the index still knows it went there: {evicted:?}"
        );
        assert!(
            index
                .misses_since(&old)
                .is_some_and(|since| (486..=490).contains(&since)),
            "its cache turned about twice since: {evicted:?}"
        );
        // Sending it again misses every block and makes it cached again.
        let misses = index.misses();
        index.insert(&old);
        assert_eq!(index.misses() - misses, 40);
        assert_eq!(index.matched(&old).cached, 40);
    }

    #[test]
    fn the_index_forgets_what_its_slots_cannot_hold() {
        let index = PrefixIndex::new(16);
        let old = keys(&"o".repeat(64 * 40));
        index.insert(&old);
        for i in 0..8 {
            index.insert(&keys(&format!("{i}").repeat(64 * 40)));
        }
        assert!(
            index.matched(&old).known < 40,
            "320 newer blocks through 64 slots push most of the old prompt out"
        );
    }

    #[test]
    fn a_resize_forgets_and_the_same_size_keeps() {
        let index = PrefixIndex::new(1000);
        assert_eq!((index.cache_blocks(), index.slots()), (1000, 4000));
        let k = keys(&"a".repeat(640));
        index.insert(&k);
        assert!(!index.resize(1000));
        assert_eq!(index.matched(&k).cached, 10);
        assert!(index.resize(4096));
        assert_eq!(index.cache_blocks(), 4096);
        assert_eq!(index.matched(&k), Match::default());
    }

    #[test]
    fn an_empty_index_holds_nothing() {
        let index = PrefixIndex::new(0);
        let k = keys(&"a".repeat(640));
        index.insert(&k);
        assert_eq!(index.matched(&k), Match::default());
        assert_eq!(index.bytes(), 0);
    }

    #[test]
    fn concurrent_readers_and_writers_need_no_lock() {
        let index = std::sync::Arc::new(PrefixIndex::new(4096));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let index = index.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let k = keys(&format!("{t}-{}", i % 10).repeat(200));
                        index.insert(&k);
                        let found = index.matched(&k);
                        assert!(found.cached <= found.known && found.known <= k.len());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(index.matched(&keys(&"0-9".repeat(200))).cached > 0);
    }
}
