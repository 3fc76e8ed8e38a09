//! What a request cost in tokens, and the record of it that the usage log keeps.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Tokens one request used, as its answer's `usage` said, or as estimated when the backend sent
/// no usage at all (llama-cpp-python's server, some mock servers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    pub prompt: u64,
    pub completion: u64,
    /// Prompt tokens the backend served from its prefix cache
    /// (`usage.prompt_tokens_details.cached_tokens` and its equivalents).
    pub cached: u64,
    /// Whether the backend said how many prompt tokens it had cached: vLLM leaves
    /// `prompt_tokens_details` out unless started with `--enable-prompt-tokens-details`, and a
    /// `cached` of 0 then means nothing.
    #[serde(default)]
    pub cached_known: bool,
    /// Counted by the gateway's estimate, not reported by the backend.
    pub estimated: bool,
}

impl TokenUsage {
    /// Saturating: the counts are what a backend reported, which may be anything.
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// One request as the usage log stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    /// When the request arrived, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    pub request_id: String,
    /// The API key's name, when keys are on and the request carried a known one.
    pub key: Option<Arc<str>>,
    pub model: Option<String>,
    /// The URL of the endpoint that answered; `None` when the gateway answered itself.
    pub endpoint: Option<Arc<str>>,
    pub status: u16,
    pub usage: TokenUsage,
    /// Time to first token, for streams.
    pub ttft_ms: Option<f64>,
    pub latency_ms: f64,
    pub cache_hit: bool,
    /// Attempts beyond the first (retries, failovers and hedges).
    pub retries: u32,
    /// Why it failed, as `/metrics` labels it (`timeout`, `upstream_unreachable`, ...).
    pub error: Option<&'static str>,
}
