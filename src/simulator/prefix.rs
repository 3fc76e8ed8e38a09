//! The simulated automatic prefix cache (like vLLM's): why a prompt whose beginning this GPU has
//! seen recently starts faster, which is what cache-aware routing is measured against.
//!
//! A prompt's text is cut into [`BLOCK_CHARS`]-character blocks (only full blocks count, as in
//! vLLM, whose partial last block is never shared). A block's key hashes the block *and the key
//! before it*, so a block matches only when the whole prefix up to it matches. The cache is an LRU
//! set of block keys; a request's hit is the run of its leading blocks already present.

use std::{
    collections::{hash_map::DefaultHasher, HashMap, VecDeque},
    hash::Hasher,
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

/// An LRU set of block keys with a fixed capacity (0 = caching off).
///
/// Recency is a stamp per key plus a queue of (key, stamp) in touch order; a touch pushes a new
/// entry and leaves the old one stale, eviction skips stale entries, and the queue is compacted
/// when stale entries outnumber live ones, so every operation is amortised O(1) without a crate.
pub struct PrefixCache {
    capacity: usize,
    stamps: HashMap<u64, u64>,
    order: VecDeque<(u64, u64)>,
    clock: u64,
}

impl PrefixCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            stamps: HashMap::new(),
            order: VecDeque::new(),
            clock: 0,
        }
    }

    /// Counts the leading `blocks` already cached, then caches them all. They are touched last
    /// block first, so the prompt's first block is the most recent: under pressure a prompt loses
    /// its tail before its head (as vLLM frees a request's blocks in reverse), and the surviving
    /// head still matches.
    pub fn lookup_and_insert(&mut self, blocks: &[u64]) -> usize {
        if self.capacity == 0 {
            return 0;
        }
        let hits = blocks
            .iter()
            .take_while(|key| self.stamps.contains_key(key))
            .count();
        for &key in blocks.iter().rev() {
            self.touch(key);
        }
        hits
    }

    pub fn clear(&mut self) {
        self.stamps.clear();
        self.order.clear();
    }

    fn touch(&mut self, key: u64) {
        self.clock += 1;
        self.stamps.insert(key, self.clock);
        self.order.push_back((key, self.clock));
        while self.stamps.len() > self.capacity {
            match self.order.pop_front() {
                Some((old, stamp)) if self.stamps.get(&old) == Some(&stamp) => {
                    self.stamps.remove(&old);
                }
                Some(_) => {}
                // Every live key has a queue entry, so the queue cannot run dry first.
                None => break,
            }
        }
        if self.order.len() > 2 * self.stamps.len() + 64 {
            let stamps = &self.stamps;
            self.order
                .retain(|(key, stamp)| stamps.get(key) == Some(stamp));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn shared_prefix_hits_up_to_where_prompts_differ() {
        let mut cache = PrefixCache::new(100);
        let first = keys(&(text("sys", 4) + &text("user-a", 2)));
        let second = keys(&(text("sys", 4) + &text("user-b", 2)));
        assert_eq!(cache.lookup_and_insert(&first), 0);
        assert_eq!(cache.lookup_and_insert(&second), 4);
        assert_eq!(cache.lookup_and_insert(&second), 6);
    }

    #[test]
    fn a_different_first_block_matches_nothing() {
        let mut cache = PrefixCache::new(100);
        assert_eq!(cache.lookup_and_insert(&keys(&text("a", 4))), 0);
        // Same later blocks, different first: chaining makes every key differ.
        let mut other = text("b", 1);
        other.push_str(&text("a", 4)[BLOCK_CHARS..]);
        assert_eq!(cache.lookup_and_insert(&keys(&other)), 0);
    }

    #[test]
    fn least_recent_blocks_are_evicted_tail_first() {
        let mut cache = PrefixCache::new(6);
        let a = keys(&text("a", 4));
        let b = keys(&text("b", 4));
        cache.lookup_and_insert(&a);
        // b needs 4 of the 6 places: a loses its last two blocks, keeps its head.
        cache.lookup_and_insert(&b);
        assert_eq!(cache.stamps.len(), 6);
        assert_eq!(cache.lookup_and_insert(&a), 2);
        // That touch made a most recent again, so b lost its tail in turn.
        assert_eq!(cache.lookup_and_insert(&b), 2);
    }

    #[test]
    fn capacity_zero_disables_and_clear_empties() {
        let a = keys(&text("a", 2));
        let mut off = PrefixCache::new(0);
        off.lookup_and_insert(&a);
        assert_eq!((off.lookup_and_insert(&a), off.stamps.len()), (0, 0));
        let mut cache = PrefixCache::new(10);
        cache.lookup_and_insert(&a);
        cache.clear();
        assert_eq!(cache.lookup_and_insert(&a), 0);
    }

    #[test]
    fn repeated_touches_keep_the_queue_bounded() {
        let mut cache = PrefixCache::new(4);
        let a = keys(&text("a", 2));
        for _ in 0..10_000 {
            cache.lookup_and_insert(&a);
        }
        assert!(cache.order.len() <= 2 * cache.stamps.len() + 64);
        assert_eq!(cache.lookup_and_insert(&a), 2);
    }
}
