//! Why an upstream exchange failed. The ingress maps each variant to an HTTP status and an
//! OpenAI-shaped error body in one place. Endpoints are named by id (as in `/stats` and
//! `/admin/endpoints`): their URLs are internal and go to the logs only.

use std::fmt;
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
    #[error("backend #{endpoint} is unreachable: {reason}")]
    Connect { endpoint: usize, reason: String },
    /// The backend did not answer within the first-byte timeout.
    #[error("backend #{endpoint} did not answer within {}", Seconds(*timeout))]
    Timeout { endpoint: usize, timeout: Duration },
    /// The request's whole deadline passed before a backend answered.
    #[error("no backend answered within the request's deadline of {}", Seconds(*budget))]
    DeadlinePassed { budget: Duration },
    /// The backend stopped answering: a health probe found it unresponsive while this request
    /// waited on it.
    #[error("backend #{endpoint} stopped answering (a health probe found it unresponsive)")]
    Unresponsive { endpoint: usize },
    /// The backend answered something that is not HTTP we can relay.
    #[error("backend #{endpoint} sent an invalid response: {reason}")]
    BadResponse { endpoint: usize, reason: String },
    /// The worker actor went away before answering (it is restarted; the request is not retried).
    #[error("the worker handling this request stopped")]
    WorkerGone,
}

/// A duration as people read it in an error message: `1.5 s`, `300 ms`.
pub struct Seconds(pub Duration);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms < 1000 {
            write!(f, "{ms} ms")
        } else {
            let tenths = format!("{:.1}", self.0.as_secs_f64());
            write!(f, "{} s", tenths.trim_end_matches(".0"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_say_their_budget() {
        let e = ForwardError::Timeout {
            endpoint: 2,
            timeout: Duration::from_millis(1499),
        };
        assert_eq!(e.to_string(), "backend #2 did not answer within 1.5 s");
        assert_eq!(Seconds(Duration::from_secs(300)).to_string(), "300 s");
        let e = ForwardError::DeadlinePassed {
            budget: Duration::from_millis(300),
        };
        assert!(e.to_string().ends_with("deadline of 300 ms"));
    }
}
