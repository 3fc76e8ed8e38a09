//! Why an upstream exchange failed. The ingress maps each variant to an HTTP status and an
//! OpenAI-shaped error body in one place.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Every worker is busy and the admission queue is full (or the wait outlived its limit).
    #[error("the gateway is at capacity ({queued} requests queued); retry shortly")]
    Overloaded {
        queued: usize,
        retry_after: Duration,
    },
    /// No healthy endpoint serves the model.
    #[error("no healthy backend is available for model '{model}'")]
    NoBackend { model: String },
    /// The connection to the backend could not be made or broke before any byte came back.
    #[error("backend {endpoint} is unreachable: {reason}")]
    Connect { endpoint: String, reason: String },
    /// The backend did not answer within the first-byte timeout.
    #[error("backend {endpoint} did not answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    /// The backend answered something that is not HTTP we can relay.
    #[error("backend {endpoint} sent an invalid response: {reason}")]
    BadResponse { endpoint: String, reason: String },
    /// The worker actor went away before answering (it is restarted; the request is not retried).
    #[error("the worker handling this request stopped")]
    WorkerGone,
}
