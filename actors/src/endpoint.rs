//! Backends as the request path sees them: a published, immutable [`RoutingTable`] of
//! [`Endpoint`]s whose fast-changing facts (weight, health, in-flight count, reported load) are
//! atomics. The balancer actor is the only writer of weight, health and load; workers only
//! increment and decrement in-flight counts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use rand::Rng;
use serde::{Deserialize, Serialize};

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
    /// Sent upstream as `Authorization: Bearer ...` when set.
    #[serde(default)]
    pub api_key: Option<String>,
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
            api_key: None,
        }
    }
}

/// A backend's live state, shared between the balancer (writer) and the request path (reader).
#[derive(Debug)]
pub struct Endpoint {
    pub id: usize,
    /// Base URL without a trailing slash.
    pub url: String,
    /// The full `Authorization` header value to send upstream, when configured.
    pub authorization: Option<String>,
    in_flight: AtomicU32,
    weight_bits: AtomicU64,
    healthy: AtomicBool,
}

impl Endpoint {
    pub fn new(id: usize, spec: &EndpointSpec) -> Self {
        Self {
            id,
            url: spec.url.trim_end_matches('/').to_string(),
            authorization: spec.api_key.as_ref().map(|key| format!("Bearer {key}")),
            in_flight: AtomicU32::new(0),
            weight_bits: AtomicU64::new(spec.weight.to_bits()),
            healthy: AtomicBool::new(true),
        }
    }

    pub fn weight(&self) -> f64 {
        f64::from_bits(self.weight_bits.load(Ordering::Relaxed))
    }

    pub(crate) fn set_weight(&self, weight: f64) {
        self.weight_bits.store(weight.to_bits(), Ordering::Relaxed);
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request as running on this endpoint until the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// One request running on an endpoint; dropping it ends the count, however the request ended.
#[derive(Debug)]
pub struct InFlight(Arc<Endpoint>);

impl InFlight {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The immutable snapshot the request path routes with. Rebuilt by the balancer only when the set
/// of endpoints or the models they serve change; everything else changes through atomics.
#[derive(Debug, Default)]
pub struct RoutingTable {
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Model name → indices into `endpoints` of the backends known to serve it.
    by_model: HashMap<String, Vec<usize>>,
    /// Backends whose models are not known yet: they are tried for any model.
    unknown_models: Vec<usize>,
    /// Every backend, for requests that name no model (pass-through routes).
    all: Vec<usize>,
}

impl RoutingTable {
    /// `models[i]` is what endpoint `i` is known to serve; `None` means not known yet.
    pub fn new(endpoints: Vec<Arc<Endpoint>>, models: &[Option<Vec<String>>]) -> Self {
        let mut by_model: HashMap<String, Vec<usize>> = HashMap::new();
        let mut unknown_models = Vec::new();
        for (index, served) in models.iter().enumerate().take(endpoints.len()) {
            match served {
                Some(names) => {
                    for name in names {
                        by_model.entry(name.clone()).or_default().push(index);
                    }
                }
                None => unknown_models.push(index),
            }
        }
        Self {
            all: (0..endpoints.len()).collect(),
            endpoints,
            by_model,
            unknown_models,
        }
    }

    /// The endpoints that may serve `model`; an empty model means any endpoint.
    fn candidates<'a>(&'a self, model: &str) -> impl Iterator<Item = &'a Arc<Endpoint>> + 'a {
        let (known, unknown) = if model.is_empty() {
            (Some(&self.all), &[][..])
        } else {
            (self.by_model.get(model), &self.unknown_models[..])
        };
        known
            .into_iter()
            .flatten()
            .chain(unknown.iter())
            .map(move |&index| &self.endpoints[index])
    }

    /// Whether any backend (healthy or not) may serve `model`: the difference between a 404 and a 503.
    pub fn knows_model(&self, model: &str) -> bool {
        self.candidates(model).next().is_some()
    }

    /// The models the healthy backends are known to serve, sorted.
    pub fn served_models(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .by_model
            .iter()
            .filter(|(_, indices)| indices.iter().any(|&i| self.endpoints[i].is_healthy()))
            .map(|(name, _)| name.clone())
            .collect();
        names.sort();
        names
    }

    /// Weighted random choice among the healthy endpoints serving `model`, skipping those whose
    /// id is set in `exclude` (a bit per endpoint id, for trying another endpoint).
    pub fn pick_weighted<R: Rng>(
        &self,
        model: &str,
        exclude: u64,
        rng: &mut R,
    ) -> Option<&Arc<Endpoint>> {
        let eligible =
            |e: &&Arc<Endpoint>| e.is_healthy() && (e.id >= 64 || exclude & (1 << e.id) == 0);
        let total: f64 = self
            .candidates(model)
            .filter(eligible)
            .map(|e| e.weight())
            .sum();
        if total <= 0.0 {
            return None;
        }
        let mut point = rng.gen_range(0.0..total);
        let mut last = None;
        for endpoint in self.candidates(model).filter(eligible) {
            let weight = endpoint.weight();
            if point < weight {
                return Some(endpoint);
            }
            point -= weight;
            last = Some(endpoint);
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    fn table(weights: &[f64], models: &[Option<Vec<String>>]) -> RoutingTable {
        let endpoints = weights
            .iter()
            .enumerate()
            .map(|(id, &weight)| {
                let mut spec = EndpointSpec::new(format!("http://127.0.0.1:{}", 9000 + id));
                spec.weight = weight;
                Arc::new(Endpoint::new(id, &spec))
            })
            .collect();
        RoutingTable::new(endpoints, models)
    }

    #[test]
    fn weighted_pick_follows_weights() {
        let t = table(&[1.0, 3.0], &[None, None]);
        let mut rng = SmallRng::seed_from_u64(7);
        let mut counts = [0u32; 2];
        for _ in 0..40_000 {
            counts[t.pick_weighted("m", 0, &mut rng).unwrap().id] += 1;
        }
        let share = counts[1] as f64 / 40_000.0;
        assert!(
            (share - 0.75).abs() < 0.02,
            "share of the heavier endpoint: {share}"
        );
    }

    #[test]
    fn unhealthy_and_excluded_endpoints_are_skipped() {
        let t = table(&[1.0, 1.0, 1.0], &[None, None, None]);
        t.endpoints[0].set_healthy(false);
        let mut rng = SmallRng::seed_from_u64(1);
        for _ in 0..1000 {
            assert_eq!(t.pick_weighted("m", 1 << 1, &mut rng).unwrap().id, 2);
        }
        t.endpoints[2].set_healthy(false);
        assert!(t.pick_weighted("m", 1 << 1, &mut rng).is_none());
    }

    #[test]
    fn models_restrict_candidates() {
        let t = table(
            &[1.0, 1.0],
            &[Some(vec!["a".into()]), Some(vec!["b".into()])],
        );
        let mut rng = SmallRng::seed_from_u64(3);
        assert_eq!(t.pick_weighted("b", 0, &mut rng).unwrap().id, 1);
        assert!(t.pick_weighted("c", 0, &mut rng).is_none());
        assert!(
            t.pick_weighted("", 0, &mut rng).is_some(),
            "no model: any endpoint"
        );
        assert!(!t.knows_model("c"));
        assert_eq!(t.served_models(), vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn in_flight_guard_counts_down_on_drop() {
        let t = table(&[1.0], &[None]);
        let guard = t.endpoints[0].begin();
        assert_eq!(t.endpoints[0].in_flight(), 1);
        drop(guard);
        assert_eq!(t.endpoints[0].in_flight(), 0);
    }
}
