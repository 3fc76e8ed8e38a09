//! Routing policies: small types behind one [`Policy`] trait, chosen in config
//! (`[balancer] policy`). Each picks a table slot among the eligible endpoints (healthy, not
//! draining, circuit closed, serving the model) reading only the endpoints' atomics, so a pick
//! takes no lock and waits on no actor.
//!
//! - [`weighted`]: weighted random on the balancer's success/failure weights (the seed policy).
//! - [`round_robin`]: each endpoint in turn.
//! - [`p2c`]: power of two choices on the average time to first byte, the price of latency
//!   spikes and the wait for a batch slot.
//! - [`least_load`]: the less loaded of two by what the backends report about their own queues,
//!   blended with the gateway's in-flight count.
//! - [`affinity`]: consistent hashing with bounded load on a session/user/prompt-prefix key, so a
//!   backend's prefix cache is reused; falls back to p2c for requests without a key.
//! - [`cache_aware`]: the least expected time to first token, from what each backend probably
//!   caches of the prompt, its measured speed and its queue (the default).
//!
//! `p2c` and `least_load` (and `affinity` for requests without a key) weigh the endpoint whose
//! turn it is against one drawn at random ([`rotation`]).
//!
//! `p2c`, `least_load` and `cache_aware` weigh a backend's queue by its batch capacity
//! ([`cache_aware::queue_ms`]): a backend with room costs nothing extra, one whose batch is full
//! costs the wait for a slot, so none of them piles requests on a fast backend past its batch.

pub mod affinity;
pub mod cache_aware;
pub mod least_load;
pub mod p2c;
pub mod rotation;
pub mod round_robin;
pub mod weighted;

use std::fmt::Debug;
use std::sync::Arc;

use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::endpoint::{Eligible, Endpoint};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    Weighted,
    RoundRobin,
    P2c,
    LeastLoad,
    Affinity,
    CacheAware,
}

impl PolicyKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Weighted => "weighted",
            Self::RoundRobin => "round_robin",
            Self::P2c => "p2c",
            Self::LeastLoad => "least_load",
            Self::Affinity => "affinity",
            Self::CacheAware => "cache_aware",
        }
    }
}

/// Policy choice and tuning, as `[balancer]` in `config/default.toml` sets them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicySettings {
    pub policy: PolicyKind,
    /// Affinity: an endpoint takes a keyed request while its in-flight count stays within this
    /// factor of the average; beyond it the request spills to the next endpoint on the ring.
    pub affinity_load_factor: f64,
    /// Cache-aware: the most prompt blocks looked at.
    pub prefix_max_blocks: usize,
}

impl Default for PolicySettings {
    fn default() -> Self {
        Self {
            policy: PolicyKind::CacheAware,
            affinity_load_factor: 1.25,
            prefix_max_blocks: 512,
        }
    }
}

/// Chooses one slot of `eligible` (which is never empty).
pub trait Policy: Send + Sync + Debug {
    fn kind(&self) -> PolicyKind;
    fn pick(&self, eligible: &Eligible<'_>, rng: &mut dyn RngCore) -> Option<usize>;
}

pub fn build(settings: &PolicySettings, endpoints: &[Arc<Endpoint>]) -> Box<dyn Policy> {
    match settings.policy {
        PolicyKind::Weighted => Box::new(weighted::Weighted),
        PolicyKind::RoundRobin => Box::new(round_robin::RoundRobin::default()),
        PolicyKind::P2c => Box::new(p2c::P2c::default()),
        PolicyKind::LeastLoad => Box::new(least_load::LeastLoad::default()),
        PolicyKind::Affinity => Box::new(affinity::Affinity::new(
            endpoints,
            settings.affinity_load_factor,
        )),
        PolicyKind::CacheAware => Box::new(cache_aware::CacheAware),
    }
}

/// A uniform index below `n` (n > 0) from the object-safe RNG.
fn below(rng: &mut dyn RngCore, n: usize) -> usize {
    ((u64::from(rng.next_u32()) * n as u64) >> 32) as usize
}
