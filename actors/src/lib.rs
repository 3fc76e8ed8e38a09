//! The actors of nanogate and the typed messages they exchange. No HTTP routes live here: the
//! ingress (in the `nanogate` binary crate) calls into these actors and the snapshots they publish.
//!
//! # Layout
//! - [`pool_supervisor`]: admission (a resizable gate with a bounded queue) and the pool size
//!   decisions; [`worker`]: the reusable worker actors that carry one upstream exchange each.
//! - [`balancer`]: the single writer of the endpoint set and each endpoint's weight, health,
//!   circuit ([`breaker`]) and latency; it publishes a [`balancer::BalancerView`] that the request
//!   path reads without a mailbox round trip, and picks with one of the [`policy`] types.
//! - [`forwarding`]: carrying a request to a backend that answers (attempts, retries, failover,
//!   hang detection, hedging); [`retry_budget`]: the gateway-wide cap on retries;
//!   [`estimator`]: what the balancer learns of each endpoint; [`prefix_index`]: what each
//!   backend probably caches, for cache-aware routing.
//! - [`health_checker`]: probes each backend's `/health`, scrapes its `/metrics` load gauges and
//!   learns its `/v1/models`, and tells the balancer.
//! - [`cache`]: the response cache (LRU, TTL, entry and byte limits, coalescing of identical misses).
//! - [`metrics`]: counters and HDR histograms per endpoint and per model, Prometheus exposition.
//! - [`exchange`]: the relay of one upstream response to the client; [`report`]: the per-thread
//!   batches in which the request path tells the balancer and metrics what happened;
//!   [`upstream_io`]: the backend connections under the HTTP client (close-delimited bodies);
//!   [`buffers`]: the bounds and gauges of every byte held for a request in flight.
//! - Tenants: [`keys`] (API keys, published for the request path), [`limiter`] (each key's
//!   limits), [`account`] (whom a request is for, settled when its relay ends); [`usage`] (what a
//!   request cost in tokens) and [`usage_scan`] (reading it from answers and streams on their way
//!   to the client, and removing the usage chunk the gateway asked for); [`usage_log`] (the actor
//!   that writes one record per request in batches) and [`store`] (the database behind it and the
//!   admin API's keys: SQLite or PostgreSQL through deadpool).
//!
//! Every actor starts under an actix `Supervisor` and answers [`GetStats`] with a JSON object that
//! `/stats` shows as-is.

pub mod account;
pub mod balancer;
pub mod breaker;
pub mod buffers;
pub mod cache;
pub mod clock;
pub mod endpoint;
pub mod error;
pub mod estimator;
pub mod exchange;
pub mod forwarding;
pub mod health_checker;
pub mod keys;
pub mod limiter;
pub mod metrics;
pub mod policy;
pub mod pool_supervisor;
pub mod prefills;
pub mod prefix_index;
pub mod report;
pub mod response_homes;
pub mod retry_budget;
pub mod store;
pub mod upstream_io;
pub mod usage;
pub mod usage_log;
pub mod usage_scan;
pub mod worker;

use actix::{Message, MessageResponse};

/// Asks any actor for its statistics; each answers with its own serializable struct, as JSON.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Stats")]
pub struct GetStats;

/// One actor's statistics, as `/stats` shows them.
#[derive(MessageResponse, Debug, Clone, PartialEq)]
pub struct Stats(pub serde_json::Value);

impl Stats {
    /// Serializes an actor's own statistics struct.
    pub fn of<T: serde::Serialize>(stats: &T) -> Self {
        Self(serde_json::to_value(stats).unwrap_or_default())
    }
}

/// Makes an actor stop as if a fault had been detected, so that its supervisor restarts it. Used by
/// the tests that show the service keeps answering through an actor restart.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Fail;
