//! Cache-aware routing: each request goes to the endpoint expected to give its first token
//! soonest, counting what each endpoint probably holds in its prefix cache. For every candidate
//! the expected time to first token is
//!
//! ```text
//! warm  +  (uncached blocks × (1 + reuse) + prefill ahead × (1 + 15 × uncached share))
//!          × prefill per block
//!       +  queue ahead × slot time  +  in flight × a quarter slot time / capacity  +  tail
//! ```
//!
//! (`prefill ahead`: the uncached blocks of the streams sent to it that have not had their first
//! token yet. Every request waits behind them once: the backend's GPU computes them first, as
//! vLLM fills each step's token budget with the prompt chunks of the requests it runs before it
//! admits a new one, so a cached prompt leaves a home that has more to prefill than its own cold
//! prefill elsewhere. A new prompt pays them sixteen times over, by the share of its own prompt
//! that is uncached: what keeps the prefills of a burst apart, as round robin does by
//! construction, instead of stacking them on the backend that looked best.)
//!
//! (`reuse`: each uncached block is prefilled now and also evicts a block of the backend's cache,
//! which another request would have found there with the probability the backend's cache is
//! reused: a spill costs the cold prefill it pays and the one it causes later, which is what keeps
//! a hot prompt home through a short queue instead of copying it over every cache.)
//!
//! where `warm` (time to first token of a cached prompt) and the prefill per block are learned
//! from this endpoint's own streams ([`crate::estimator`]), the cached blocks come from its
//! [`crate::prefix_index::PrefixIndex`] (the blocks the gateway recently sent it, evicted as its
//! cache would), and the queue is what it runs beyond its batch capacity (the gateway's in-flight
//! count, or what the backend reports if more) times how long a request holds a slot. So a prompt
//! stays on the endpoint that holds it while that endpoint has room, which makes few requests in
//! flight all go to a prompt's home; it spills to a cold endpoint only when the queue there would
//! cost more than the prefill the spill pays; slow endpoints (a higher `warm` and prefill) get less;
//! and new prompts spread by load, which is what keeps the fleet's caches holding different
//! prompts. `tail` prices latency spikes: a backend that spikes may take the share of traffic
//! that keeps its spikes out of the fleet's slowest percent at a small cost (a quarter of its
//! lateness), and past that share it costs steeply more, so it serves what the steady ones cannot
//! take soon ([`crate::estimator`]): more for some prompts than for others, by a rank hashed from
//! the prompt, so it sheds whole prompts; where new prompts take turns, it sits out rounds instead.
//! Unmeasured endpoints take the measured ones' average, so nothing is starved or flooded before
//! it is known.
//!
//! A prompt that no endpoint caches much of is *placed*, among the endpoints within up to twice
//! the best expected time to first token (as much more as the fleet's prompts recur; when they
//! hardly recur, up to twice, taking turns like round robin, since no cache gains): at its home
//! if it has one there (the endpoint the index
//! knows it was sent to, though its cache has let it go since), so a prompt that comes and goes
//! from the caches keeps one home instead of evicting a different backend's prompts each time,
//! unless another cache keeps blocks more than twice as long as the prompt stayed away from home
//! (its home has more prompts than it holds, and would only evict another of them);
//! else at the endpoint whose cache keeps blocks longest (its size over the rate new blocks reach
//! it), as sglang-router sends an unmatched prompt to its smallest tree. New prompts then fill the
//! caches evenly instead of crowding the fastest backend's, and each prompt's home is where it
//! will last. After the pick, the routing table records the request's blocks in
//! the chosen endpoint's index. A prompt an endpoint caches keeps to it (when several do, to the
//! one that caches the longest prefix of it, as sglang-router's tree match does, and among those
//! by rendezvous hashing of its first block) unless another endpoint, warm or
//! cold, is cheaper by more than the copy it would make costs the caches: taking the cheapest
//! copy each time kept every copy warm, and spilling whenever a cold endpoint was a little
//! cheaper made new copies; either way the copies crowded other prompts out. sglang-router's
//! `cache_aware` keeps a radix tree of the text it sent to each worker instead, and balances by
//! a load threshold rather than by cost.

use std::time::Duration;

use rand::RngCore;

use super::affinity::stable_hash_seeded;
use super::{below, Policy, PolicyKind};
use crate::endpoint::rng_unit;
use crate::endpoint::{Eligible, Endpoint, Estimate};
use crate::estimator::tail_price_ms;

#[derive(Debug)]
pub struct CacheAware;

/// Batch capacity assumed for a backend that has not shown it (a queue while it runs N), nor run
/// more than this: low, so an unknown backend is not flooded before its queue shows (a scrape
/// later), and a larger batch is learned as soon as the backend reports running more.
pub const DEFAULT_CAPACITY: u32 = 8;

/// The batch capacity a published `capacity` stands for: itself, or [`DEFAULT_CAPACITY`] before
/// the balancer has published one (0).
pub fn batch_capacity(capacity: u32) -> u32 {
    if capacity > 0 {
        capacity
    } else {
        DEFAULT_CAPACITY
    }
}
/// Priors until the fleet has measured anything: a cached prompt's first token, the prefill of a
/// 64-byte block (16 tokens at about 20,000 tokens a second), and a request's slot time.
const PRIOR_WARM_MS: f64 = 20.0;
const PRIOR_BLOCK_MS: f64 = 0.8;
const PRIOR_SERVICE_MS: f64 = 1000.0;
/// What each request a backend already runs adds to a new one's start, in slot times over the
/// batch capacity: a batch step grows with the batch, so a new request starts sooner where fewer
/// run. Small (a cached prompt stays home until its home runs far more than the others: a request
/// costs a few ms, a cold prefill a hundred), but it is what spreads requests evenly where the
/// estimates differ only by noise: without it every tie went at random and the momentarily
/// cheapest endpoint took request after request until its batch was full, which on four equal
/// backends near their knee made the first token 2.5 times round robin's.
const OCCUPANCY_SHARE: f64 = 0.25;
/// What a block another stream is still prefilling on an endpoint costs a prompt that endpoint
/// does not cache, in prefill times of a block (a cached one pays it once, the wait itself). Far
/// more than the prefill it waits behind: a
/// stream that has not had its first token holds its batch slot for the whole of its decode
/// too, and it is the freshest sign of where the last arrivals went (the in-flight count says
/// how many, not how recently). Weighed once, cold prompts on four equal simulators at their
/// limit queued for slots (p99 time to first token 3.8 times round robin's, which spreads
/// arrivals by rotation); at 8 and 16 they spread about as evenly as round robin (p99 1.6 and 1.35
/// times) and the queues that made cached prompts spill and copy themselves over the caches
/// went (16 shared prompts: prefix hits 76 % → 93 %).
const PREFILL_AHEAD_WEIGHT: f64 = 16.0;
/// Costs within this much of the best are a tie, broken at random, so new prompts spread.
const TIE_MS: f64 = 1.0;
/// A prompt is placed when its best endpoint holds less than this share of it: at its home if
/// that costs at most `1 + HOME_SLACK` times the best (it has come back, so it will again: it may
/// start up to twice as slow where it will be found next time), else by cache residence among the
/// endpoints within `1 + PLACE_SLACK × reuse` times the best (a new prompt recurs only as much as
/// the fleet's prompts do).
const PLACE_BELOW: f64 = 0.5;

/// Whether sending an endpoint a prompt of `blocks` blocks, `cached` of them in its cache, places
/// the prompt there ([`PLACE_BELOW`]): what the rotation of new prompts counts.
pub fn places(cached: usize, blocks: usize) -> bool {
    (cached as f64) < PLACE_BELOW * blocks as f64
}

const HOME_SLACK: f64 = 1.0;
const PLACE_SLACK: f64 = 1.0;
/// Below this reuse (the share of what the fleet is sent that it was sent before), and before
/// the fleet has measured it, where a new prompt lands matters to no cache, and new prompts
/// rotate, as round robin does, over the endpoints within `1 + PLACE_SLACK` times the best cost:
/// the one sent a new prompt longest ago takes it, a slower one sitting out rounds
/// ([`rounds_per_turn`]). Each backend then gets its arrivals evenly spaced; the cheapest by a
/// few ms of noise in the estimates took bursts instead, and queued them (equal fleet, unique
/// prompts, fixed arrival intervals, one run each: p99 time to first token 115 ms, with rotation
/// 84, round robin 84).
const ROTATE_BELOW_REUSE: f64 = 0.1;
/// How much slower than the fastest a backend's measured prefill must be for it to take fewer
/// turns of the rotation. Four equal simulators driven past their compute with prompts that never
/// recur measured 3.1–4.4 ms a block (their prefills shared the GPU with a growing batch); taken
/// at face value, the slowest sat out a turn now and then, one backend ended the run a request
/// ahead of the others and the p99 one prefill later than round robin's (705 against 687 ms in 2
/// of 3 rounds).
const SLOWER_THAN_NOISE: f64 = 1.5;
/// How many times as long as a prompt stayed away from its home another endpoint's cache must keep
/// blocks for the prompt to be placed there instead of back home ([`place`]).
const ROOMIER: f64 = 2.0;
/// Tail cost at which a backend gets half the share of new prompts its cache residence earns.
const TAIL_HALF_MS: f64 = 100.0;
/// Residence counted for a cache nothing new reaches (an idle backend), ms.
const MAX_RESIDENCE_MS: f64 = 600_000.0;

/// The fleet's averages of what its endpoints have measured, standing in for what one has not.
#[derive(Debug, Clone, Copy)]
pub struct Priors {
    pub warm_ms: f64,
    pub block_ms: f64,
    pub service_ms: f64,
    /// How much of what the fleet is sent recurs (0: nothing, every prompt is new).
    pub reuse: f64,
    /// The least prefill time per block an endpoint has measured (`block_ms` if none has).
    pub fastest_block_ms: f64,
}

impl Priors {
    /// The averages over the eligible endpoints' estimates.
    pub fn of(eligible: &Eligible<'_>) -> Self {
        let mut sums = [(0.0, 0u32); 3];
        let (mut reuse, mut endpoints) = (0.0, 0u32);
        let mut fastest = f64::INFINITY;
        for slot in eligible.slots.iter() {
            let e = eligible.endpoint(slot).estimate();
            reuse += e.reuse;
            endpoints += 1;
            if e.block_ms > 0.0 {
                fastest = fastest.min(e.block_ms);
            }
            for (sum, value) in sums.iter_mut().zip([e.warm_ms, e.block_ms, e.service_ms]) {
                if value > 0.0 {
                    sum.0 += value;
                    sum.1 += 1;
                }
            }
        }
        let mean = |(sum, n): (f64, u32), prior: f64| {
            if n == 0 {
                prior
            } else {
                sum / f64::from(n)
            }
        };
        let block_ms = mean(sums[1], PRIOR_BLOCK_MS);
        Self {
            warm_ms: mean(sums[0], PRIOR_WARM_MS),
            block_ms,
            service_ms: mean(sums[2], PRIOR_SERVICE_MS),
            reuse: reuse / f64::from(endpoints.max(1)),
            fastest_block_ms: fastest.min(block_ms),
        }
    }

    /// The prefill time per block of an endpoint with `estimate`: learned, or the fleet's average.
    pub fn block_ms_of(&self, estimate: &Estimate) -> f64 {
        if estimate.block_ms > 0.0 {
            estimate.block_ms
        } else {
            self.block_ms
        }
    }
}

/// How long `e` should take to its first token when it must prefill `blocks` blocks: its learned
/// warm time and prefill per block, or the priors until it has learned them.
pub fn expected_prefill(estimate: &Estimate, blocks: u32) -> Duration {
    let known = |learned: f64, prior: f64| if learned > 0.0 { learned } else { prior };
    let ms = known(estimate.warm_ms, PRIOR_WARM_MS)
        + known(estimate.block_ms, PRIOR_BLOCK_MS) * f64::from(blocks);
    Duration::from_secs_f64(ms / 1000.0)
}

/// The wait before a new request gets going on `e`, ms: requests ahead of it (the gateway's in
/// flight and other clients', [`Endpoint::others`]) beyond the batch capacity, each freeing a
/// slot every `service / capacity` on average, counted twice (slots free in bursts: requests that
/// arrived together finish together, so the average is the best case of a queue, and a queue
/// also delays every later request); plus a small share of a slot time for each request it
/// already runs ([`OCCUPANCY_SHARE`]).
pub fn queue_ms(e: &Endpoint, estimate: &Estimate, service_ms: f64) -> f64 {
    let capacity = f64::from(batch_capacity(estimate.capacity));
    let in_flight = f64::from(e.in_flight());
    let ahead = (in_flight + e.others() + 1.0 - capacity).max(0.0);
    (2.0 * ahead + OCCUPANCY_SHARE * in_flight) * service_ms / capacity
}

/// The cost of sending `e` a request of `blocks` prompt blocks of which `cached` are in its
/// prefix cache, ms: its expected time to first token, plus the prefill its cold blocks will cost
/// others later (each evicts a block of the backend's cache, which comes back with probability
/// `reuse`).
pub fn expected_ttft_ms(
    e: &Endpoint,
    estimate: &Estimate,
    prompt: &[u64],
    cached: usize,
    priors: &Priors,
) -> f64 {
    let uncached = (prompt.len() - cached) as f64;
    first_token_ms(e, estimate, prompt, cached, priors)
        + uncached * priors.block_ms_of(estimate) * estimate.reuse
}

/// How long `e` should take to the first token of a request of `prompt`'s blocks of which
/// `cached` are in its prefix cache, ms: its warm time, the prefill of the rest, the prefills
/// ahead of it, its queue and its spikes' price.
fn first_token_ms(
    e: &Endpoint,
    estimate: &Estimate,
    prompt: &[u64],
    cached: usize,
    priors: &Priors,
) -> f64 {
    let blocks = prompt.len();
    let or = |value: f64, prior: f64| if value > 0.0 { value } else { prior };
    let service = or(estimate.service_ms, priors.service_ms);
    let block_ms = priors.block_ms_of(estimate);
    let uncached = (blocks - cached) as f64;
    or(estimate.warm_ms, priors.warm_ms)
        + uncached * block_ms
        + f64::from(e.prefill_blocks())
            * block_ms
            * (1.0 + (PREFILL_AHEAD_WEIGHT - 1.0) * uncached / blocks.max(1) as f64)
        + queue_ms(e, estimate, service)
        + tail_ms(e, estimate, prompt, priors)
}

/// What `e`'s latency spikes cost a request for `prompt` there, ms: the tail price of
/// [`crate::estimator`], for the prompt's own use of the tail budget, its endpoint's use scaled by
/// a rank drawn from 0 to 2 by hashing its first block with the endpoint. So a backend past its
/// budget sheds whole prompts, the same ones each time, and keeps the rest at a lower price:
/// priced alike, each of its prompts went elsewhere whenever the price peaked and came back as it
/// fell, which left copies of them over the fleet's caches and its own cache half empty (40
/// shared prompts, more than the caches hold, on the unequal fleet: 18–25 of the prompts on two
/// or three backends, 47–51 % of prompt tokens cached; with the rank, 54–57 %). Where prompts do
/// not recur there is no cache to keep whole, and such a backend sits out turns of the rotation
/// instead ([`rounds_per_turn`]).
fn tail_ms(e: &Endpoint, estimate: &Estimate, prompt: &[u64], priors: &Priors) -> f64 {
    let used = estimate.tail_budget_used();
    match prompt.first() {
        Some(&first) if used > 0.0 && priors.reuse >= ROTATE_BELOW_REUSE => {
            let rank =
                2.0 * stable_hash_seeded(first, &e.id.to_le_bytes()) as f64 / u64::MAX as f64;
            tail_price_ms(estimate.jitter_ms, used * rank)
        }
        _ => estimate.tail_ms,
    }
}

impl Policy for CacheAware {
    fn kind(&self) -> PolicyKind {
        PolicyKind::CacheAware
    }

    fn pick(&self, eligible: &Eligible<'_>, rng: &mut dyn RngCore) -> Option<usize> {
        let priors = Priors::of(eligible);
        let blocks = eligible.blocks;
        let mut best: Option<(usize, f64, usize)> = None;
        let mut ties = 0usize;
        // The endpoint that caches the most of the prompt, keyed by (cached blocks, rank), with
        // its slot and cost.
        let mut primary: Option<((usize, u64), usize, f64)> = None;
        for slot in eligible.slots.iter() {
            let e = eligible.endpoint(slot);
            let cached = e.prefix.matched(blocks).cached;
            let cost = expected_ttft_ms(e, &e.estimate(), blocks, cached, &priors);
            // The longest copy first: ranked by the first block alone, every conversation over
            // one system prompt kept to that prompt's favourite endpoint rather than to the one
            // holding its own history, and moved whenever the favourite was a little cheaper
            // (unequal fleet, multi-turn, 3 rounds: p99 114/71/115 ms, longest first 64/60/109).
            if !blocks.is_empty() && !places(cached, blocks.len()) {
                let key = (cached, stable_hash_seeded(blocks[0], &slot.to_le_bytes()));
                if primary.is_none_or(|(best, ..)| key > best) {
                    primary = Some((key, slot, cost));
                }
            }
            match best {
                Some((_, best_cost, _)) if cost > best_cost + TIE_MS => {}
                Some((_, best_cost, _)) if cost >= best_cost - TIE_MS => {
                    ties += 1;
                    if below(rng, ties) == 0 {
                        best = Some((slot, cost.min(best_cost), cached));
                    }
                }
                _ => {
                    best = Some((slot, cost, cached));
                    ties = 1;
                }
            }
        }
        let (slot, best_cost, cached) = best?;
        if let Some(((primary_cached, _), primary, cost)) = primary {
            // What going elsewhere costs the caches: the blocks the primary holds that the other
            // endpoint lacks and would take in, a second copy of each, evicting a block that
            // comes back with the fleet's reuse. A cold endpoint makes such a copy as much as a
            // warm one does, so the margin holds whichever is cheaper. Only the blocks the other
            // lacks: a system prompt every endpoint caches is no new copy, and priced whole, the
            // first turns of every conversation over it kept to one endpoint. Until the fleet
            // has measured its reuse (a second in), the prompt's own return is the evidence of
            // it: priced at none, a cold fleet's first requests copied each prompt to two or
            // three endpoints while its first prefill ran (four equal backends, conversations
            // over 8 system prompts, 700 requests: 18–22 cold prefills, 12–15 with this, against
            // sglang-router's 9–10; they set the p99).
            let reuse = if priors.reuse > 0.0 {
                priors.reuse
            } else {
                1.0
            };
            let copied = primary_cached.saturating_sub(cached) as f64;
            let margin = copied * priors.block_ms * reuse;
            if cost <= best_cost + margin {
                return Some(primary);
            }
        }
        if blocks.is_empty() || !places(cached, blocks.len()) {
            return Some(slot);
        }
        Some(place(eligible, &priors, best_cost, rng).unwrap_or(slot))
    }
}

/// The endpoint expected to give the first token soonest ([`first_token_ms`], ties at random),
/// with none of [`CacheAware`]'s care for the caches: where a hedge goes, whatever the routing
/// policy, since it races a first token that is already late.
pub fn soonest(eligible: &Eligible<'_>, rng: &mut dyn RngCore) -> Option<usize> {
    let priors = Priors::of(eligible);
    let mut best: Option<(usize, f64)> = None;
    let mut ties = 0usize;
    for slot in eligible.slots.iter() {
        let e = eligible.endpoint(slot);
        let cached = e.prefix.matched(eligible.blocks).cached;
        let ms = first_token_ms(e, &e.estimate(), eligible.blocks, cached, &priors);
        match best {
            Some((_, best_ms)) if ms > best_ms + TIE_MS => {}
            Some((_, best_ms)) if ms >= best_ms - TIE_MS => {
                ties += 1;
                if below(rng, ties) == 0 {
                    best = Some((slot, ms.min(best_ms)));
                }
            }
            _ => {
                best = Some((slot, ms));
                ties = 1;
            }
        }
    }
    best.map(|(slot, _)| slot)
}

/// Where a prompt no endpoint caches much of goes: of the endpoints that cache little of it, the
/// one within the home slack of `best_cost` that knows the longest prefix of it (its home; ties at
/// random), unless one within the placement slack keeps blocks [`ROOMIER`] times as long as the
/// prompt stayed away from that home (drawn as below); if none knows half of it, of those within
/// the placement slack, one drawn with chances in proportion to how long each one's cache keeps
/// blocks (or, when the fleet's prompts do not recur, the one sent a new prompt longest ago:
/// [`ROTATE_BELOW_REUSE`]). Drawn rather than the longest, because residence is measured once a
/// second and every prompt of that second would otherwise crowd one endpoint.
fn place(
    eligible: &Eligible<'_>,
    priors: &Priors,
    best_cost: f64,
    rng: &mut dyn RngCore,
) -> Option<usize> {
    let blocks = eligible.blocks;
    let half = PLACE_BELOW * blocks.len() as f64;
    let home_limit = best_cost * (1.0 + HOME_SLACK) + TIE_MS;
    let rotate = priors.reuse < ROTATE_BELOW_REUSE;
    let slack = PLACE_SLACK * if rotate { 1.0 } else { priors.reuse };
    let limit = best_cost * (1.0 + slack) + TIE_MS;
    let mut home: Option<(usize, usize)> = None;
    let mut home_ties = 0usize;
    let mut drawn = Draw::default();
    let mut rotated: Option<usize> = None;
    let mut oldest = u64::MAX;
    // The longest any cache keeps blocks: whether a roomier one than the home can exist at all.
    let mut roomiest = 0.0f64;
    let candidates = eligible.slots.len() as f64;
    for slot in eligible.slots.iter() {
        let e = eligible.endpoint(slot);
        let found = e.prefix.matched(blocks);
        let estimate = e.estimate();
        roomiest = roomiest.max(estimate.residence_ms);
        let cost = expected_ttft_ms(e, &estimate, blocks, found.cached, priors);
        // An endpoint that caches the prompt but costs more is one whose queue outweighs its
        // cache: the cost said no, so it is no place to put the prompt either.
        if !places(found.cached, blocks.len()) {
            continue;
        }
        if found.known as f64 >= half {
            if cost > home_limit {
                continue;
            }
            match home {
                Some((_, known)) if found.known < known => {}
                Some((_, known)) if found.known == known => {
                    home_ties += 1;
                    if below(rng, home_ties) == 0 {
                        home = Some((slot, known));
                    }
                }
                _ => {
                    home = Some((slot, found.known));
                    home_ties = 1;
                }
            }
        } else if home.is_none() && cost <= limit {
            if rotate {
                let slower = priors.block_ms_of(&estimate) / priors.fastest_block_ms;
                let rounds = rounds_per_turn(&estimate, slower);
                let waits = ((rounds - 1.0) * candidates) as u64;
                let turn = e.last_placed().saturating_add(waits);
                if turn < oldest {
                    oldest = turn;
                    rotated = Some(slot);
                }
                continue;
            }
            drawn.offer(slot, residence_weight(e, &estimate, blocks, priors), rng);
        }
    }
    let Some((home, _)) = home else {
        return rotated.or(drawn.slot);
    };
    if rotate {
        return Some(home);
    }
    let away_ms = away_ms(eligible.endpoint(home), blocks);
    if roomiest <= ROOMIER * away_ms {
        return Some(home);
    }
    // A home whose cache let the prompt go before it came back will again, and each prefill
    // there evicts another of its prompts: with more prompts homed on a backend than its cache
    // holds, they took turns evicting each other for the whole run (unequal fleet, 16 prompts,
    // 700 requests: 7 homed on a fast backend that holds 6, which prefilled them 37 times, while
    // the spiky one held 1). A cache that keeps blocks more than `ROOMIER` times as long as the
    // prompt stayed away keeps it instead, so the prompt moves once.
    let mut roomier = Draw::default();
    for slot in eligible.slots.iter() {
        let e = eligible.endpoint(slot);
        let estimate = e.estimate();
        if slot == home || estimate.residence_ms <= ROOMIER * away_ms {
            continue;
        }
        let found = e.prefix.matched(blocks);
        if !places(found.cached, blocks.len())
            || expected_ttft_ms(e, &estimate, blocks, found.cached, priors) > limit
        {
            continue;
        }
        roomier.offer(slot, residence_weight(e, &estimate, blocks, priors), rng);
    }
    Some(roomier.slot.unwrap_or(home))
}

/// One of the slots offered, drawn with chances in proportion to their weights, in one pass
/// (the first offer is taken without a draw).
#[derive(Default)]
struct Draw {
    slot: Option<usize>,
    total: f64,
}

impl Draw {
    fn offer(&mut self, slot: usize, weight: f64, rng: &mut dyn RngCore) {
        self.total += weight;
        if self.slot.is_none() || rng_unit(rng) * self.total < weight {
            self.slot = Some(slot);
        }
    }
}

/// How long ago the prompt of `blocks` was last sent to `e`, ms, from the blocks `e` missed since
/// ([`crate::prefix_index::PrefixIndex::misses_since`]) at the rate new blocks reach it; infinite
/// when nothing new reaches it or the index lost the prompt's head (nothing says it stayed away).
fn away_ms(e: &Endpoint, blocks: &[u64]) -> f64 {
    let residence_ms = e.estimate().residence_ms;
    match e.prefix.misses_since(blocks) {
        Some(misses) if residence_ms.is_finite() => {
            f64::from(misses) / e.prefix.cache_blocks().max(1) as f64 * residence_ms
        }
        _ => f64::INFINITY,
    }
}

/// What a new prompt's chance of being placed on `e` is in proportion to: how long its cache
/// keeps blocks, halved at [`TAIL_HALF_MS`] of tail price.
fn residence_weight(e: &Endpoint, estimate: &Estimate, blocks: &[u64], priors: &Priors) -> f64 {
    estimate.residence_ms.min(MAX_RESIDENCE_MS)
        / (1.0 + tail_ms(e, estimate, blocks, priors) / TAIL_HALF_MS)
}

/// How many rounds of the rotation of new prompts an endpoint takes one turn in: one in `slower`
/// when it prefills `slower` times as slowly as the fastest, as weighted round robin does (with
/// a turn in every round, a half-speed backend's cold prefills, twice the others', queued behind
/// each other and set the 99th percentile: 204–277 ms against 115 on the unequal fleet's unique
/// prompts); and, over its tail budget at `used` times it, `used²` times as few, as its tail's
/// price grows, so its share falls until its spikes fit the fleet's budget (its price alone did
/// not keep it out: where nothing recurs, every endpoint's cost is mostly the prefills it has
/// under way, which a spiky backend's tail only matched, and it kept a fifth of unique prompts).
/// At most one in 65 rounds, so it still gets some traffic and its estimates stay current.
/// Less than [`SLOWER_THAN_NOISE`] slower counts as alike.
fn rounds_per_turn(estimate: &Estimate, slower: f64) -> f64 {
    let used = estimate.tail_budget_used();
    let tail = if used > 1.0 { used * used } else { 1.0 };
    let slower = if slower >= SLOWER_THAN_NOISE {
        slower
    } else {
        1.0
    };
    (tail * slower).min(65.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::tests::table_with;
    use crate::endpoint::{Bits, PickRequest};
    use crate::prefix_index::block_keys;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    fn keys(prompt: &str) -> Vec<u64> {
        let mut out = Vec::new();
        block_keys(prompt.as_bytes(), 512, &mut out);
        out
    }

    fn fleet(n: usize) -> crate::endpoint::RoutingTable {
        table_with(PolicyKind::CacheAware, &vec![1.0; n], &vec![None; n])
    }

    /// `n` endpoints measured alike: 10 ms warm, 1 ms a block, a batch of `capacity`.
    fn measured_fleet(n: usize, capacity: u32) -> crate::endpoint::RoutingTable {
        let t = fleet(n);
        for e in &t.endpoints {
            measured(e, 10.0, 1.0, capacity);
        }
        t
    }

    fn measured(e: &Endpoint, warm_ms: f64, block_ms: f64, capacity: u32) {
        e.publish_estimate(Estimate {
            warm_ms,
            block_ms,
            jitter_ms: 0.0,
            spikes: 0.0,
            share: 0.25,
            tail_ms: 0.0,
            reuse: 0.0,
            service_ms: 400.0,
            capacity,
            capacity_known: true,
            residence_ms: f64::INFINITY,
            ramp: 1.0,
        });
    }

    /// Every endpoint of `t` has seen `reuse` of its prompt blocks before.
    fn recurring(t: &crate::endpoint::RoutingTable, reuse: f64) {
        for e in &t.endpoints {
            e.publish_estimate(Estimate {
                reuse,
                ..e.estimate()
            });
        }
    }

    /// Where 400 new prompts named after `round` go, one after another, on a fleet of four.
    fn turns(t: &crate::endpoint::RoutingTable, round: &str, rng: &mut SmallRng) -> [usize; 4] {
        let mut got = [0usize; 4];
        for i in 0..400 {
            let prompt = keys(&format!("{round} prompt {i} ").repeat(200));
            got[pick(t, &prompt, rng)] += 1;
        }
        got
    }

    fn pick(t: &crate::endpoint::RoutingTable, blocks: &[u64], rng: &mut SmallRng) -> usize {
        let request = PickRequest {
            model: "m",
            exclude: Bits::default(),
            affinity: None,
            blocks,
        };
        t.pick(&request, rng).unwrap().slot
    }

    #[test]
    fn a_prompt_stays_home_while_home_has_room_and_spills_when_the_queue_costs_more() {
        let t = measured_fleet(2, 4);
        recurring(&t, 0.1);
        let mut rng = SmallRng::seed_from_u64(1);
        let prompt = keys(&"system prompt ".repeat(1000));
        let home = pick(&t, &prompt, &mut rng);
        let mut running = vec![t.endpoints[home].begin()];
        for _ in 0..20 {
            assert_eq!(
                pick(&t, &prompt, &mut rng),
                home,
                "one in flight: home has room"
            );
        }
        running.extend((0..2).map(|_| t.endpoints[home].begin()));
        // Three in flight in a batch of 4: no queue, and a quarter slot time each (3 x 0.25 x
        // 400 / 4 = 75 ms) against a cold prefill of the 218 blocks elsewhere (218 ms): it stays.
        assert_eq!(pick(&t, &prompt, &mut rng), home);
        running.push(t.endpoints[home].begin());
        // Home is full: one ahead costs 2 x 400 / 4 = 200 ms of queue, plus 100 ms for the four it
        // runs, against 218 ms of prefill and twice 21.8 for the copy (a tenth of its blocks
        // recur): it spills.
        assert_ne!(pick(&t, &prompt, &mut rng), home);
    }

    #[test]
    fn a_cached_prompt_spills_to_a_cold_endpoint_only_when_that_saves_more_than_a_copy_costs() {
        let t = measured_fleet(2, 8);
        recurring(&t, 0.5);
        let prompt = keys(&"a cached system prompt ".repeat(600));
        let n = prompt.len() as f64;
        t.endpoints[0].prefix.insert(&prompt);
        let mut rng = SmallRng::seed_from_u64(8);
        // Cold on 1: 10 + n x 1.5 ms. On 0, ten in flight in a batch of 8: three ahead and ten
        // running cost (2 x 3 + 0.25 x 10) x 400 / 8 = 425 ms. More than the cold prefill, less
        // than it and the copy's cost (n x 0.5): it stays.
        let mut running: Vec<_> = (0..10).map(|_| t.endpoints[0].begin()).collect();
        assert!(425.0 > 1.5 * n && 425.0 <= 1.5 * n + 0.5 * n);
        assert_eq!(pick(&t, &prompt, &mut rng), 0);
        // Eleven: 537.5 ms of queue is more than both.
        running.push(t.endpoints[0].begin());
        assert!(537.5 > 1.5 * n + 0.5 * n);
        assert_eq!(pick(&t, &prompt, &mut rng), 1);
    }

    #[test]
    fn before_the_fleet_has_measured_its_reuse_a_prompt_sent_again_waits_for_its_home() {
        let t = measured_fleet(2, 4);
        let prompt = keys(&"the first system prompt ".repeat(300));
        let n = prompt.len() as f64;
        t.endpoints[0].prefix.insert(&prompt);
        // Its first request is still prefilling at home, beside two more: waiting there costs
        // that prefill and 0.25 x 3 x 400 / 4 = 75 ms, more than a cold prefill on the idle
        // endpoint, less than that and the copy priced as if every block recurred.
        let _first = t.endpoints[0].begin_prefill(prompt.len() as u32);
        let _running: Vec<_> = (0..2).map(|_| t.endpoints[0].begin()).collect();
        assert!(10.0 + n + 75.0 <= 10.0 + 2.0 * n);
        let mut rng = SmallRng::seed_from_u64(3);
        for _ in 0..20 {
            assert_eq!(pick(&t, &prompt, &mut rng), 0);
        }
        // Once a tenth of the fleet's blocks are seen to recur, the copy costs a tenth as much.
        recurring(&t, 0.1);
        assert!(10.0 + n + 75.0 > 10.0 + 1.2 * n);
        assert_eq!(pick(&t, &prompt, &mut rng), 1);
    }

    #[test]
    fn a_hedge_goes_where_the_first_token_comes_soonest_whatever_the_policy() {
        let t = table_with(PolicyKind::RoundRobin, &[1.0; 4], &[None, None, None, None]);
        measured(&t.endpoints[0], 10.0, 1.0, 8);
        measured(&t.endpoints[1], 200.0, 1.0, 8);
        measured(&t.endpoints[2], 10.0, 1.0, 8);
        measured(&t.endpoints[3], 10.0, 1.0, 8);
        // 3 is as fast as 2 but runs a full batch and four more.
        let _queued: Vec<_> = (0..12).map(|_| t.endpoints[3].begin()).collect();
        let mut exclude = Bits::default();
        exclude.insert(0);
        let request = PickRequest {
            model: "m",
            exclude,
            affinity: None,
            blocks: &[],
        };
        let mut rng = SmallRng::seed_from_u64(5);
        let rotation: Vec<usize> = (0..6)
            .map(|_| t.pick(&request, &mut rng).unwrap().slot)
            .collect();
        assert!(
            rotation.contains(&1) && rotation.contains(&3),
            "{rotation:?}"
        );
        for _ in 0..20 {
            assert_eq!(t.pick_soonest(&request, &mut rng).unwrap().slot, 2);
        }
    }

    #[test]
    fn a_new_prompt_does_not_queue_behind_another_prefill() {
        let t = measured_fleet(2, 16);
        let mut rng = SmallRng::seed_from_u64(3);
        // Both run three requests; one of endpoint 0's is still prefilling 200 blocks, so only the
        // prefill ahead tells them apart.
        let _running: Vec<_> = (0..2)
            .flat_map(|_| [t.endpoints[0].begin(), t.endpoints[1].begin()])
            .chain([t.endpoints[1].begin_prefill(0)])
            .collect();
        let _prefilling = t.endpoints[0].begin_prefill(200);
        for i in 0..20 {
            let prompt = keys(&format!("new prompt {i} ").repeat(200));
            assert_eq!(
                pick(&t, &prompt, &mut rng),
                1,
                "its prefill would wait 200 ms on 0"
            );
        }
    }

    #[test]
    fn a_cached_prompt_leaves_home_only_when_the_prefills_there_outlast_its_own() {
        let t = measured_fleet(2, 16);
        recurring(&t, 0.1);
        let prompt = keys(&"the cached system prompt ".repeat(300));
        t.endpoints[0].prefix.insert(&prompt);
        let mut rng = SmallRng::seed_from_u64(2);
        // Its home's GPU computes the prefills sent before it first (vLLM fills each step's token
        // budget in arrival order): 50 blocks there are sooner than its own 118 on the other.
        let prefilling = t.endpoints[0].begin_prefill(50);
        for _ in 0..20 {
            assert_eq!(pick(&t, &prompt, &mut rng), 0);
        }
        drop(prefilling);
        let _prefilling = t.endpoints[0].begin_prefill(200);
        for _ in 0..20 {
            assert_eq!(pick(&t, &prompt, &mut rng), 1, "200 blocks are not");
        }
    }

    #[test]
    fn a_prompt_its_home_keeps_letting_go_moves_to_a_cache_that_keeps_it() {
        for (other_residence_ms, expected) in [(2_000.0, 0), (10_000.0, 1)] {
            let t = measured_fleet(2, 16);
            recurring(&t, 0.9);
            for (e, residence_ms) in t.endpoints.iter().zip([1_000.0, other_residence_ms]) {
                e.prefix.resize(256);
                e.publish_estimate(Estimate {
                    residence_ms,
                    ..e.estimate()
                });
            }
            let prompt = keys(&"a prompt that keeps coming back ".repeat(200));
            let home = &t.endpoints[0].prefix;
            home.insert(&prompt);
            // 400 misses since: its home's 256-block cache let it go 1.5 s ago, by its churn.
            for i in 0..4 {
                home.insert(&keys(&format!("filler {i:03} ").repeat(64 * 100 / 11)));
            }
            let found = home.matched(&prompt);
            assert!(found.cached == 0 && found.known > 90, "{found:?}");
            let mut rng = SmallRng::seed_from_u64(5);
            assert_eq!(
                pick(&t, &prompt, &mut rng),
                expected,
                "a cache keeping blocks {other_residence_ms} ms"
            );
        }
    }

    #[test]
    fn a_prompt_cached_on_several_endpoints_keeps_to_one_of_them() {
        let t = measured_fleet(4, 16);
        let mut rng = SmallRng::seed_from_u64(4);
        for i in 0..8 {
            let prompt = keys(&format!("prompt {i} cached twice ").repeat(200));
            t.endpoints[1].prefix.insert(&prompt);
            t.endpoints[2].prefix.insert(&prompt);
            let first = pick(&t, &prompt, &mut rng);
            assert!(first == 1 || first == 2, "{first}");
            for _ in 0..20 {
                assert_eq!(
                    pick(&t, &prompt, &mut rng),
                    first,
                    "prompt {i}: equal costs go to the same copy, so the other can age out"
                );
            }
        }
    }

    #[test]
    fn a_queue_the_last_scrape_saw_of_the_gateways_own_requests_ends_with_them() {
        let t = measured_fleet(2, 16);
        let busy = &t.endpoints[0];
        let running: Vec<_> = (0..26).map(|_| busy.begin()).collect();
        busy.set_reported_load(16.0, 10.0, 1.0);
        assert_eq!(busy.others(), 0.0, "all 26 are the gateway's");
        drop(running);
        let mut rng = SmallRng::seed_from_u64(6);
        let mut counts = [0; 2];
        for i in 0..40 {
            counts[pick(&t, &keys(&format!("new prompt {i} ").repeat(200)), &mut rng)] += 1;
        }
        assert!(counts[0] >= 10, "drained since the scrape: {counts:?}");
        // Another client's queue stays counted until the next scrape.
        t.endpoints[1].set_reported_load(16.0, 10.0, 1.0);
        assert_eq!(t.endpoints[1].others(), 26.0);
        for i in 0..20 {
            let prompt = keys(&format!("newer prompt {i} ").repeat(200));
            assert_eq!(pick(&t, &prompt, &mut rng), 0);
        }
    }

    #[test]
    fn new_prompts_spread_and_slow_endpoints_get_less() {
        let t = fleet(3);
        measured(&t.endpoints[0], 10.0, 1.0, 32);
        measured(&t.endpoints[1], 10.0, 1.0, 32);
        measured(&t.endpoints[2], 40.0, 4.0, 32);
        let mut rng = SmallRng::seed_from_u64(7);
        let mut counts = [0; 3];
        for i in 0..30 {
            let prompt = keys(&format!("prompt {i} ").repeat(300));
            counts[pick(&t, &prompt, &mut rng)] += 1;
        }
        assert!(counts[0] >= 10 && counts[1] >= 10, "{counts:?}");
        assert_eq!(
            counts[2], 0,
            "the slow endpoint is never the cheaper one: {counts:?}"
        );
    }

    #[test]
    fn a_multi_turn_conversation_sticks_to_the_endpoint_that_holds_it() {
        let t = measured_fleet(4, 32);
        let mut rng = SmallRng::seed_from_u64(3);
        let mut conversation = String::from("You are a helpful assistant. ").repeat(40);
        let first = pick(&t, &keys(&conversation), &mut rng);
        for turn in 0..10 {
            conversation.push_str(&format!(" user turn {turn} and the answer to it. ").repeat(8));
            assert_eq!(
                pick(&t, &keys(&conversation), &mut rng),
                first,
                "turn {turn}"
            );
        }
    }

    #[test]
    fn conversations_over_a_system_prompt_every_endpoint_caches_keep_to_their_own_history() {
        let t = measured_fleet(4, 32);
        // Prompts recur: a copy of a conversation's history costs the caches.
        recurring(&t, 0.9);
        let system = "You are a helpful assistant. ".repeat(100);
        for e in &t.endpoints {
            e.prefix.insert(&keys(&system));
        }
        let mut rng = SmallRng::seed_from_u64(5);
        for conversation in 0..8 {
            // Its earlier turns went to `home`, which holds them, and which runs a few more
            // requests than the others: a little dearer than an endpoint holding only the system
            // prompt, by less than copying the history there would cost.
            let home = conversation % 4;
            let _busy: Vec<_> = (0..4).map(|_| t.endpoints[home].begin()).collect();
            let mut prompt = format!("{system}user {conversation}: ");
            prompt.push_str(&"an earlier question and its answer. ".repeat(10));
            t.endpoints[home].prefix.insert(&keys(&prompt));
            prompt.push_str("user: and one more question. ");
            assert_eq!(
                pick(&t, &keys(&prompt), &mut rng),
                home,
                "conversation {conversation}: the longest copy of it, not the system prompt's \
                 favourite endpoint"
            );
        }
    }

    #[test]
    fn unmeasured_endpoints_take_the_fleet_average() {
        let t = fleet(2);
        measured(&t.endpoints[0], 10.0, 1.0, 32);
        let priors = Priors {
            warm_ms: 10.0,
            block_ms: 1.0,
            service_ms: 400.0,
            reuse: 0.5,
            fastest_block_ms: 1.0,
        };
        let cost = |e: &Endpoint| expected_ttft_ms(e, &e.estimate(), &[7; 100], 0, &priors);
        assert_eq!(cost(&t.endpoints[0]), cost(&t.endpoints[1]));
    }

    #[test]
    fn a_cold_prompt_goes_home_if_it_has_one_else_where_the_cache_lasts() {
        let t = measured_fleet(3, 32);
        let prompt = keys(&"the prompt with a home ".repeat(400));
        t.endpoints[1].prefix.insert(&prompt);
        // More misses than endpoint 1's cache holds: the prompt is evicted there, still known.
        for i in 0..40 {
            t.endpoints[1]
                .prefix
                .insert(&keys(&format!("filler {i} ").repeat(800)));
        }
        let found = t.endpoints[1].prefix.matched(&prompt);
        assert_eq!(found.cached, 0, "{found:?}");
        assert!(found.known * 2 >= prompt.len(), "{found:?}");
        let mut rng = SmallRng::seed_from_u64(5);
        assert_eq!(pick(&t, &prompt, &mut rng), 1, "it goes back to its home");
        // New prompts of a fleet whose prompts recur: endpoint 2's cache keeps blocks ten times
        // longer than the others'.
        for (e, residence_ms) in t.endpoints.iter().zip([1_000.0, 1_000.0, 10_000.0]) {
            e.publish_estimate(Estimate {
                residence_ms,
                reuse: 0.5,
                ..e.estimate()
            });
        }
        let mut counts = [0; 3];
        for i in 0..120 {
            counts[pick(&t, &keys(&format!("new prompt {i} ").repeat(300)), &mut rng)] += 1;
        }
        assert!(counts[2] > counts[0] + counts[1], "{counts:?}");
        assert!(
            counts[0] > 0 && counts[1] > 0,
            "drawn, not all to one: {counts:?}"
        );
    }

    #[test]
    fn prompts_that_do_not_recur_take_turns_over_endpoints_that_cost_about_the_same() {
        let t = measured_fleet(4, 16);
        // Endpoint 3 prefills three times as slowly: more than twice the best cost.
        measured(&t.endpoints[3], 10.0, 3.0, 16);
        let mut rng = SmallRng::seed_from_u64(9);
        let mut order = Vec::new();
        for i in 0..30 {
            let prompt = keys(&format!("unique prompt {i} ").repeat(200));
            order.push(pick(&t, &prompt, &mut rng));
        }
        for turn in order.chunks(3) {
            let mut turn = turn.to_vec();
            turn.sort_unstable();
            assert_eq!(turn, [0, 1, 2], "{order:?}");
        }
    }

    #[test]
    fn a_cold_fleets_new_prompts_take_turns_whatever_returns_to_the_first() {
        let t = measured_fleet(4, 16);
        let mut rng = SmallRng::seed_from_u64(4);
        let first = keys(&"the first system prompt ".repeat(100));
        let home = pick(&t, &first, &mut rng);
        let mut got = [0usize; 4];
        got[home] += 1;
        for i in 1..8 {
            // The first prompt's conversations come back between each new prompt.
            assert_eq!(pick(&t, &first, &mut rng), home);
            let prompt = keys(&format!("system prompt {i} ").repeat(100));
            got[pick(&t, &prompt, &mut rng)] += 1;
        }
        assert_eq!(got, [2; 4]);
    }

    #[test]
    fn a_backend_that_prefills_slower_takes_fewer_turns_of_the_rotation() {
        let t = measured_fleet(4, 16);
        // Twice as slow: within twice the best cost, so in the rotation, a turn in two rounds.
        measured(&t.endpoints[3], 10.0, 2.0, 16);
        let got = turns(&t, "unique", &mut SmallRng::seed_from_u64(9));
        assert!((35..70).contains(&got[3]), "{got:?}");
        assert!(got[..3].iter().all(|&n| (105..125).contains(&n)), "{got:?}");
    }

    #[test]
    fn a_backend_measured_a_little_slower_still_takes_every_turn() {
        let t = measured_fleet(4, 16);
        measured(&t.endpoints[3], 10.0, 1.4, 16);
        let got = turns(&t, "unique", &mut SmallRng::seed_from_u64(9));
        assert_eq!(got, [100; 4]);
    }

    #[test]
    fn a_backend_over_its_tail_budget_sits_out_turns_of_the_rotation() {
        let t = measured_fleet(4, 16);
        let spiky = |spikes: f64| Estimate {
            spikes,
            jitter_ms: 200.0,
            tail_ms: 20.0,
            ..t.endpoints[3].estimate()
        };
        let mut rng = SmallRng::seed_from_u64(9);
        // Within its budget (a share of 0.25 of spikes at 0.01: half of it), it takes its turns.
        t.endpoints[3].publish_estimate(spiky(0.01));
        let within = turns(&t, "within", &mut rng);
        assert!(within.iter().all(|&n| n == 100), "{within:?}");
        // At 2.5 times its budget, one turn in about six rounds.
        t.endpoints[3].publish_estimate(spiky(0.05));
        let over = turns(&t, "over", &mut rng);
        assert!((10..30).contains(&over[3]), "{over:?}");
        assert!(
            over[..3].iter().all(|&n| (120..135).contains(&n)),
            "{over:?}"
        );
    }

    #[test]
    fn a_backend_over_its_tail_budget_sheds_whole_prompts_the_same_ones_each_time() {
        // Each of 60 prompts of about 190 blocks (a cold prefill of about 200 ms) cached on the
        // spiky endpoint only, asked for once on a fresh fleet whose prompts recur: which of them
        // it keeps.
        let kept = |spikes: f64| -> Vec<bool> {
            (0..60)
                .map(|i| {
                    let t = measured_fleet(4, 32);
                    recurring(&t, 0.5);
                    t.endpoints[3].publish_estimate(Estimate {
                        spikes,
                        jitter_ms: 200.0,
                        ..t.endpoints[3].estimate()
                    });
                    let prompt = keys(&format!("system prompt {i} ").repeat(700));
                    t.endpoints[3].prefix.insert(&prompt);
                    let mut rng = SmallRng::seed_from_u64(i);
                    pick(&t, &prompt, &mut rng) == 3
                })
                .collect()
        };
        // Twice its budget (spikes 0.04 at a share of 0.25): priced alike, all of them would
        // leave (twice the lateness, 400 ms, against a cold prefill of about 200); by rank, some
        // stay.
        let over = kept(0.04);
        let stay = over.iter().filter(|&&k| k).count();
        assert!((10..40).contains(&stay), "{stay} of 60 stay");
        // The same prompts each time, and the ones it keeps past its budget it keeps within it.
        assert_eq!(kept(0.04), over);
        let within = kept(0.01);
        assert!(over.iter().zip(&within).all(|(&o, &w)| !o || w));
        assert!(within.iter().filter(|&&k| k).count() > stay);
    }

    #[test]
    fn a_backend_with_latency_spikes_costs_its_tail() {
        let t = measured_fleet(2, 32);
        t.endpoints[1].publish_estimate(Estimate {
            jitter_ms: 220.0,
            tail_ms: 220.0,
            ..t.endpoints[1].estimate()
        });
        let prompt = keys(&"shared system prompt ".repeat(300));
        for e in &t.endpoints {
            e.prefix.insert(&prompt);
        }
        let mut rng = SmallRng::seed_from_u64(9);
        for _ in 0..20 {
            assert_eq!(pick(&t, &prompt, &mut rng), 0);
        }
    }

    /// The llama.cpp case: one cold prefill of 5 s on a backend made every estimate of it huge,
    /// it got no more traffic, so nothing could correct it. With time the estimate loses its
    /// weight and the backend is priced like the fleet again.
    #[test]
    fn a_backend_priced_out_by_one_slow_answer_gets_traffic_back_as_it_fades() {
        use crate::clock::{Clock, ManualClock};
        use crate::estimator::{CacheReport, Estimator, Sample};
        use std::time::Duration;

        let tau = Duration::from_secs(10);
        let clock = ManualClock::default();
        let t = fleet(2);
        let mut estimators = [Estimator::default(), Estimator::default()];
        let sample = |first_ms: u64| Sample {
            stream: true,
            first: Duration::from_millis(first_ms),
            total: Duration::from_millis(first_ms + 200),
            blocks: 40,
            cached: 0,
            report: CacheReport::Unknown,
            load: 0.0,
        };
        estimators[0].observe(sample(5000), clock.now(), tau);
        for _ in 0..20 {
            estimators[1].observe(sample(60), clock.now(), tau);
            clock.advance(Duration::from_millis(50));
        }
        let publish = |estimators: &[Estimator; 2]| {
            for (e, estimator) in t.endpoints.iter().zip(estimators) {
                e.publish_estimate(estimator.published(1.0, 4096, 0.5));
            }
        };
        publish(&estimators);
        let mut rng = SmallRng::seed_from_u64(11);
        let spread = |rng: &mut SmallRng, round: usize| {
            let mut counts = [0; 2];
            for i in 0..40 {
                let prompt = keys(&format!("round {round}, cold prompt {i} ").repeat(200));
                counts[pick(&t, &prompt, rng)] += 1;
            }
            counts
        };
        assert_eq!(spread(&mut rng, 0)[0], 0, "right after the slow answer");
        clock.advance(Duration::from_secs(60));
        for estimator in &mut estimators {
            estimator.decay(clock.now(), tau);
        }
        publish(&estimators);
        let counts = spread(&mut rng, 1);
        assert!(
            counts[0] >= 5,
            "a minute later it takes its share again: {counts:?}"
        );
    }
}
