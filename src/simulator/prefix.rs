//! The simulated automatic prefix cache (like vLLM's): why a prompt whose beginning this GPU has
//! seen recently starts faster, which is what cache-aware routing is measured against.
//!
//! Faithful to vLLM's v1 KV-cache manager where it matters for routing:
//! - A prompt's text is cut into [`BLOCK_CHARS`]-character blocks ([`BLOCK_TOKENS`] tokens at
//!   the simulator's four characters per token, vLLM's default block size). Only full blocks
//!   count: vLLM never shares a partial last block.
//! - A block's key hashes the block *and the key before it* (vLLM chains its block hashes the
//!   same way), so a block matches only when the whole prefix up to it matches, and a request's
//!   hit is the run of its leading blocks already present.
//! - The cache has a fixed capacity in blocks (vLLM's `num_gpu_blocks`). Blocks held by a running
//!   request are pinned (reference counted, shared by requests with the same prefix); only free
//!   blocks are evicted, least recently freed first. A finished request frees its blocks last
//!   block first, so under pressure a prompt loses its tail before its head and the surviving
//!   head still matches.
//! - A block is in the cache from the moment a request takes it, but its KV exists only when that
//!   request's prefill ends: a request that finds blocks another is still computing starts its own
//!   prefill then (vLLM caches a block's hash when it schedules the block, and a request arriving
//!   during the step that computes it is scheduled after that step).
//!
//! Where it differs: capacity never blocks admission (vLLM would preempt or queue a request that
//! finds no free block; here the batch limit alone bounds concurrency), so a request that finds
//! every block pinned still runs, and the blocks that did not fit are simply not kept. Generated
//! tokens are not cached (vLLM caches full blocks of the output too; a multi-turn conversation
//! here hits up to its previous prompt, not through the previous answer).

use std::{
    collections::{hash_map::DefaultHasher, HashMap, VecDeque},
    hash::Hasher,
    time::Instant,
};

/// Characters per cache block: 16 tokens at the simulator's four characters per token.
pub const BLOCK_CHARS: usize = 64;

/// Tokens one cached block saves.
pub const BLOCK_TOKENS: u32 = 16;

/// Turns prompt text, fed in pieces (message after message), into chained block keys.
#[derive(Default)]
pub struct BlockHasher {
    keys: Vec<u64>,
    /// Key of the last full block, the seed of the next (0 before the first).
    chain: u64,
    /// The partial block so far; pieces are concatenated across message boundaries.
    pending: String,
    pending_chars: usize,
}

impl BlockHasher {
    pub fn feed(&mut self, mut text: &str) {
        while !text.is_empty() {
            let need = BLOCK_CHARS - self.pending_chars;
            let (end, took) = match text.char_indices().nth(need) {
                Some((end, _)) => (end, need),
                None => (text.len(), text.chars().count()),
            };
            self.pending.push_str(&text[..end]);
            self.pending_chars += took;
            text = &text[end..];
            if self.pending_chars == BLOCK_CHARS {
                let mut hasher = DefaultHasher::new();
                hasher.write_u64(self.chain);
                hasher.write(self.pending.as_bytes());
                self.chain = hasher.finish();
                self.keys.push(self.chain);
                self.pending.clear();
                self.pending_chars = 0;
            }
        }
    }

    /// The keys of the full blocks, in prompt order.
    pub fn finish(self) -> Vec<u64> {
        self.keys
    }
}

/// One cached block: how many running requests hold it, when it was last freed, and when the
/// prefill that computes it ends (`None`: computed).
#[derive(Clone, Copy)]
struct Block {
    refs: u32,
    freed: u64,
    computed_at: Option<Instant>,
}

/// A fixed number of block places (0 = caching off); see the module doc for the policy.
///
/// The free list is a queue of (key, stamp) in the order blocks were freed; a block taken again
/// or freed again leaves its old entry stale, eviction skips stale entries, and the queue is
/// compacted when stale entries outnumber live ones, so every operation is amortised O(1).
pub struct PrefixCache {
    capacity: usize,
    blocks: HashMap<u64, Block>,
    free: VecDeque<(u64, u64)>,
    clock: u64,
}

/// What [`PrefixCache::acquire`] found and took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquired {
    /// Leading blocks that were already cached: their prefill is skipped.
    pub hits: usize,
    /// Leading blocks now pinned for the request (hits plus the new ones that found a place),
    /// to be given back with [`PrefixCache::release`].
    pub held: usize,
}

impl PrefixCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            blocks: HashMap::new(),
            free: VecDeque::new(),
            clock: 0,
        }
    }

    /// Counts the leading `keys` already cached and pins as many of them as find a place: the
    /// cached ones, then new ones while a place is empty or a free block can be evicted.
    pub fn acquire(&mut self, keys: &[u64]) -> Acquired {
        let hits = keys
            .iter()
            .take_while(|key| self.blocks.contains_key(key))
            .count();
        let mut held = 0;
        for &key in keys {
            if let Some(block) = self.blocks.get_mut(&key) {
                block.refs += 1;
            } else if self.blocks.len() < self.capacity || self.evict_one() {
                self.blocks.insert(
                    key,
                    Block {
                        refs: 1,
                        freed: 0,
                        computed_at: None,
                    },
                );
            } else {
                break;
            }
            held += 1;
        }
        Acquired { hits, held }
    }

    /// When the last of these cached blocks is computed, if a prefill still computes one: a
    /// request that finds them in the cache while another request's prefill computes them can
    /// use them only once that prefill's step ends (vLLM), so its own prefill starts then.
    pub fn computed_at(&self, keys: &[u64]) -> Option<Instant> {
        keys.iter()
            .filter_map(|key| self.blocks.get(key)?.computed_at)
            .max()
    }

    /// Marks `keys` (blocks a request just took) as computed when its prefill ends, at `at`.
    pub fn computing(&mut self, keys: &[u64], at: Instant) {
        for key in keys {
            if let Some(block) = self.blocks.get_mut(key) {
                block.computed_at = Some(at);
            }
        }
    }

    /// Unpins `keys` (the `held` leading keys of an [`acquire`](Self::acquire)), last first, so
    /// the head of the prompt is the most recently freed and the last to be evicted.
    pub fn release(&mut self, keys: &[u64]) {
        for &key in keys.iter().rev() {
            let Some(block) = self.blocks.get_mut(&key) else {
                continue;
            };
            block.refs = block.refs.saturating_sub(1);
            if block.refs == 0 {
                self.clock += 1;
                block.freed = self.clock;
                self.free.push_back((key, self.clock));
            }
        }
        if self.free.len() > 2 * self.blocks.len() + 64 {
            let blocks = &self.blocks;
            self.free
                .retain(|(key, stamp)| Self::is_free(blocks, *key, *stamp));
        }
    }

    /// Forgets every free block; pinned ones stay until their requests end, as in vLLM's
    /// `reset_prefix_cache`, which refuses while blocks are in use.
    pub fn clear(&mut self) {
        self.blocks.retain(|_, block| block.refs > 0);
        self.free.clear();
    }

    fn is_free(blocks: &HashMap<u64, Block>, key: u64, stamp: u64) -> bool {
        blocks
            .get(&key)
            .is_some_and(|b| b.refs == 0 && b.freed == stamp)
    }

    /// Evicts the least recently freed block; false when every block is pinned.
    fn evict_one(&mut self) -> bool {
        while let Some((key, stamp)) = self.free.pop_front() {
            if Self::is_free(&self.blocks, key, stamp) {
                self.blocks.remove(&key);
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn keys(text: &str) -> Vec<u64> {
        let mut hasher = BlockHasher::default();
        hasher.feed(text);
        hasher.finish()
    }

    /// `blocks` blocks of text, each starting with `tag` and its index.
    fn text(tag: &str, blocks: usize) -> String {
        (0..blocks)
            .map(|i| format!("{tag}{i:<width$}", width = BLOCK_CHARS - tag.len()))
            .collect()
    }

    #[test]
    fn only_full_blocks_get_keys_and_pieces_join_across_messages() {
        assert!(keys(&"x".repeat(BLOCK_CHARS - 1)).is_empty());
        let whole = text("s", 3) + "tail";
        assert_eq!(keys(&whole).len(), 3);
        let mut pieces = BlockHasher::default();
        let (a, b) = whole.split_at(100);
        pieces.feed(a);
        pieces.feed(b);
        assert_eq!(pieces.finish(), keys(&whole));
        // Multi-byte characters count as one character each.
        assert_eq!(keys(&"é".repeat(BLOCK_CHARS)).len(), 1);
    }

    /// A request that runs and finishes: its hits.
    fn run(cache: &mut PrefixCache, keys: &[u64]) -> usize {
        let got = cache.acquire(keys);
        cache.release(&keys[..got.held]);
        got.hits
    }

    #[test]
    fn shared_prefix_hits_up_to_where_prompts_differ() {
        let mut cache = PrefixCache::new(100);
        let first = keys(&(text("sys", 4) + &text("user-a", 2)));
        let second = keys(&(text("sys", 4) + &text("user-b", 2)));
        assert_eq!(run(&mut cache, &first), 0);
        assert_eq!(run(&mut cache, &second), 4);
        assert_eq!(run(&mut cache, &second), 6);
    }

    #[test]
    fn a_different_first_block_matches_nothing() {
        let mut cache = PrefixCache::new(100);
        assert_eq!(run(&mut cache, &keys(&text("a", 4))), 0);
        // Same later blocks, different first: chaining makes every key differ.
        let mut other = text("b", 1);
        other.push_str(&text("a", 4)[BLOCK_CHARS..]);
        assert_eq!(run(&mut cache, &keys(&other)), 0);
    }

    #[test]
    fn least_recently_freed_blocks_are_evicted_tail_first() {
        let mut cache = PrefixCache::new(6);
        let a = keys(&text("a", 4));
        let b = keys(&text("b", 4));
        run(&mut cache, &a);
        // b needs 4 of the 6 places: a loses its last two blocks, keeps its head.
        run(&mut cache, &b);
        assert_eq!(cache.blocks.len(), 6);
        assert_eq!(run(&mut cache, &a), 2);
        // That run made a the most recently freed, so b lost its tail in turn.
        assert_eq!(run(&mut cache, &b), 2);
    }

    #[test]
    fn blocks_of_running_requests_are_never_evicted() {
        let mut cache = PrefixCache::new(4);
        let a = keys(&text("a", 4));
        let b = keys(&text("b", 4));
        let first = cache.acquire(&a);
        let second = cache.acquire(&a);
        assert_eq!((first.held, second.hits, second.held), (4, 4, 4));
        // Every place is pinned twice: b runs uncached and keeps nothing.
        assert_eq!(cache.acquire(&b), Acquired { hits: 0, held: 0 });
        cache.release(&a);
        assert_eq!(cache.acquire(&b).held, 0, "a is still held once");
        cache.release(&a);
        assert_eq!(cache.acquire(&b), Acquired { hits: 0, held: 4 });
        cache.release(&b);
        assert_eq!(run(&mut cache, &a), 0);
    }

    #[test]
    fn blocks_a_prefill_still_computes_are_there_when_it_ends() {
        let mut cache = PrefixCache::new(16);
        let a = keys(&text("a", 4));
        let now = Instant::now();
        let first = cache.acquire(&a);
        assert_eq!(cache.computed_at(&a[..first.hits]), None);
        cache.computing(&a[first.hits..first.held], now + Duration::from_millis(100));
        // A second request of the prompt finds every block, usable when the first's prefill ends.
        let second = cache.acquire(&a);
        assert_eq!(second.hits, 4);
        assert_eq!(
            cache.computed_at(&a[..second.hits]),
            Some(now + Duration::from_millis(100))
        );
        // A prompt that shares none of them waits for nothing.
        let b = keys(&text("b", 4));
        let third = cache.acquire(&b);
        assert_eq!(cache.computed_at(&b[..third.hits]), None);
    }

    #[test]
    fn a_request_keeps_the_leading_blocks_that_found_a_place() {
        let mut cache = PrefixCache::new(4);
        let a = keys(&text("a", 2));
        let b = keys(&text("b", 4));
        let pinned = cache.acquire(&a);
        assert_eq!(cache.acquire(&b), Acquired { hits: 0, held: 2 });
        cache.release(&b[..2]);
        cache.release(&a[..pinned.held]);
        assert_eq!(run(&mut cache, &b), 2);
    }

    #[test]
    fn capacity_zero_disables_and_clear_keeps_pinned_blocks() {
        let a = keys(&text("a", 2));
        let b = keys(&text("b", 2));
        let mut off = PrefixCache::new(0);
        run(&mut off, &a);
        assert_eq!((run(&mut off, &a), off.blocks.len()), (0, 0));
        let mut cache = PrefixCache::new(10);
        run(&mut cache, &a);
        let held = cache.acquire(&b);
        cache.clear();
        assert_eq!(run(&mut cache, &a), 0);
        assert_eq!(cache.acquire(&b).hits, 2);
        assert_eq!(held.held, 2);
    }

    #[test]
    fn repeated_runs_keep_the_free_queue_bounded() {
        let mut cache = PrefixCache::new(4);
        let a = keys(&text("a", 2));
        for _ in 0..10_000 {
            run(&mut cache, &a);
        }
        assert!(cache.free.len() <= 2 * cache.blocks.len() + 64);
        assert_eq!(run(&mut cache, &a), 2);
    }
}
