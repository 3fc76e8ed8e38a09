//! Whom a request is for and what its end must settle: it travels with the request from the
//! ingress to the end of its relay, where the answer's tokens are charged to the key and the
//! request is reported with them.

use std::sync::Arc;

use crate::keys::ApiKey;
use crate::usage::TokenUsage;
use crate::usage_scan::estimate;

/// What the ingress knows of a request that its end needs.
#[derive(Clone, Default)]
pub struct Account {
    /// The API key, when keys are on; it holds one of the key's in-flight places until every
    /// copy of the account is gone (the relay's is the last).
    pub key: Option<Arc<Admitted>>,
    /// Arrival, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The gateway asked the backend for the stream's usage chunk, and removes it.
    pub strip_usage: bool,
    /// The prompt's size, for an estimate when the backend reports no usage.
    pub prompt_bytes: usize,
    /// Whether an answer without usage is counted by an estimate: on the OpenAI routes, not on
    /// passed-through ones (an audio upload or a file download is not tokens).
    pub estimate: bool,
}

/// A request admitted under a key's limits.
pub struct Admitted {
    pub key: Arc<ApiKey>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.key.limiter.release();
    }
}

impl Account {
    pub fn key_name(&self) -> Option<Arc<str>> {
        self.key.as_ref().map(|a| a.key.name.clone())
    }

    /// The usage to count: the backend's, else (where [`Account::estimate`]) an estimate from the
    /// prompt's size and the completion's (see [`estimate`]). Charged to the key's token limits.
    pub fn settle(
        &self,
        reported: Option<TokenUsage>,
        completion_estimate: u64,
    ) -> Option<TokenUsage> {
        let usage = reported.or_else(|| {
            self.estimate
                .then(|| estimate(self.prompt_bytes, completion_estimate))
        })?;
        if let Some(admitted) = &self.key {
            admitted.key.limiter.charge(usage.total());
        }
        Some(usage)
    }
}
