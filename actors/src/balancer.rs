//! The balancer: single writer of endpoint weights, health and the model map, publishing a
//! [`BalancerView`] that workers pick from without waiting on this actor's mailbox.
//!
//! Policy `weighted`: every endpoint starts at its configured weight (1.0 by default); a success
//! multiplies it by `success_factor` (capped at `max_weight`), a failure by `failure_factor`
//! (floored at `min_weight`); a pick is weighted random among healthy endpoints serving the model.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::endpoint::{Endpoint, EndpointSpec, RoutingTable};
use crate::{Fail, GetStats, Stats};

/// Tuning of the weighted policy; defaults documented in `config/default.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancerSettings {
    pub success_factor: f64,
    pub failure_factor: f64,
    pub max_weight: f64,
    pub min_weight: f64,
    /// Mailbox size; outcomes beyond it are dropped and counted rather than queued without bound.
    pub mailbox: usize,
}

impl Default for BalancerSettings {
    fn default() -> Self {
        Self {
            success_factor: 1.1,
            failure_factor: 0.5,
            max_weight: 10.0,
            min_weight: 0.1,
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
}

// ===== BalancerView =====

/// What the request path reads: the current routing table, swapped whole when it changes.
#[derive(Debug, Clone)]
pub struct BalancerView {
    table: Arc<ArcSwap<RoutingTable>>,
    dropped_outcomes: Arc<AtomicU64>,
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
    pub endpoint: usize,
    pub success: bool,
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

/// The models an endpoint reported on its `/v1/models`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct ModelsLearned {
    pub endpoint: usize,
    pub models: Vec<String>,
}

// ===== Balancer =====

pub struct Balancer {
    settings: BalancerSettings,
    view: BalancerView,
    /// Known models per endpoint (`None` until configured or learned).
    models: Vec<Option<Vec<String>>>,
    outcomes: u64,
}

impl Balancer {
    /// Builds the actor and the view it publishes.
    pub fn new(settings: BalancerSettings, specs: &[EndpointSpec]) -> Self {
        let endpoints: Vec<Arc<Endpoint>> = specs
            .iter()
            .enumerate()
            .map(|(id, spec)| Arc::new(Endpoint::new(id, spec)))
            .collect();
        let models: Vec<Option<Vec<String>>> = specs
            .iter()
            .map(|spec| (!spec.models.is_empty()).then(|| spec.models.clone()))
            .collect();
        let table = RoutingTable::new(endpoints, &models);
        Self {
            settings,
            view: BalancerView {
                table: Arc::new(ArcSwap::from_pointee(table)),
                dropped_outcomes: Arc::new(AtomicU64::new(0)),
            },
            models,
            outcomes: 0,
        }
    }

    pub fn view(&self) -> BalancerView {
        self.view.clone()
    }

    fn endpoint(&self, id: usize) -> Option<Arc<Endpoint>> {
        self.view.table().endpoints.get(id).cloned()
    }
}

impl Actor for Balancer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.settings.mailbox);
    }
}

impl Supervised for Balancer {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        log::warn!("balancer restarting; endpoint weights and health are kept");
    }
}

impl Handler<Outcomes> for Balancer {
    type Result = ();

    fn handle(&mut self, msg: Outcomes, _ctx: &mut Self::Context) {
        let table = self.view.table();
        for outcome in msg.0 {
            self.outcomes += 1;
            if let Some(endpoint) = table.endpoints.get(outcome.endpoint) {
                endpoint.set_weight(
                    self.settings
                        .next_weight(endpoint.weight(), outcome.success),
                );
            }
        }
    }
}

impl Handler<HealthChanged> for Balancer {
    type Result = ();

    fn handle(&mut self, msg: HealthChanged, _ctx: &mut Self::Context) {
        if let Some(endpoint) = self.endpoint(msg.endpoint) {
            log::info!(
                "endpoint {} is now {}",
                endpoint.url,
                if msg.healthy { "healthy" } else { "unhealthy" }
            );
            endpoint.set_healthy(msg.healthy);
        }
    }
}

impl Handler<ModelsLearned> for Balancer {
    type Result = ();

    fn handle(&mut self, msg: ModelsLearned, _ctx: &mut Self::Context) {
        let Some(slot) = self.models.get_mut(msg.endpoint) else {
            return;
        };
        if slot.as_ref() == Some(&msg.models) {
            return;
        }
        *slot = Some(msg.models);
        let endpoints = self.view.table().endpoints.clone();
        self.view
            .table
            .store(Arc::new(RoutingTable::new(endpoints, &self.models)));
    }
}

#[derive(Serialize)]
struct EndpointStats {
    url: String,
    weight: f64,
    in_flight: u32,
    healthy: bool,
    models: Option<Vec<String>>,
}

#[derive(Serialize)]
struct BalancerStats {
    policy: &'static str,
    endpoints: Vec<EndpointStats>,
    outcomes: u64,
    dropped_outcomes: u64,
}

impl Handler<GetStats> for Balancer {
    type Result = Stats;

    fn handle(&mut self, _msg: GetStats, _ctx: &mut Self::Context) -> Stats {
        let table = self.view.table();
        let stats = BalancerStats {
            policy: "weighted",
            endpoints: table
                .endpoints
                .iter()
                .zip(&self.models)
                .map(|(e, models)| EndpointStats {
                    url: e.url.clone(),
                    weight: e.weight(),
                    in_flight: e.in_flight(),
                    healthy: e.is_healthy(),
                    models: models.clone(),
                })
                .collect(),
            outcomes: self.outcomes,
            dropped_outcomes: self.view.dropped_outcomes.load(Ordering::Relaxed),
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

    #[test]
    fn a_failure_undoes_about_seven_successes() {
        let s = BalancerSettings::default();
        let mut w = 1.0;
        w = s.next_weight(w, false);
        for _ in 0..7 {
            w = s.next_weight(w, true);
        }
        assert!((w - 0.5 * 1.1f64.powi(7)).abs() < 1e-12);
        assert!(w < 1.0);
    }

    #[actix_rt::test]
    async fn outcomes_and_health_reach_the_published_view() {
        let specs = vec![EndpointSpec::new("http://a"), EndpointSpec::new("http://b")];
        let balancer = Balancer::new(BalancerSettings::default(), &specs);
        let view = balancer.view();
        let addr = balancer.start();
        addr.send(Outcomes(vec![Outcome {
            endpoint: 0,
            success: false,
        }]))
        .await
        .unwrap();
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
        assert_eq!(table.endpoints[0].weight(), 0.5);
        assert!(!table.endpoints[1].is_healthy());
        assert!(table.knows_model("m"));
        assert_eq!(table.served_models(), vec!["m".to_string()]);
    }
}
