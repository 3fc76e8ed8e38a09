//! `nanogate loadtest --request-log FILE`: one JSON line per request, as the client saw it: when
//! it was due, its time to first token and latency, and the backend the gateway says answered it
//! (`x-nanogate-endpoint`). Beside the simulators' `--request-log` (which say when each request
//! reached a backend and how long the backend took to its first token) it says where a request's
//! time went: a client's time to first token far above the backend's is time spent in the gateway
//! or on the way, which the aggregate percentiles cannot tell from a slow backend.

use std::{
    fs::File,
    io::{self, BufWriter, Write},
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::time::Instant;

use super::client::Outcome;
use crate::request_log::{create, write_line};

/// One request, as written.
#[derive(Debug, Serialize)]
struct Record<'a> {
    /// The request's number in the run (what the workload built its body from).
    n: u64,
    /// When it was due to start, milliseconds since the Unix epoch (the simulators' clock).
    due_ms: f64,
    /// Due time to the first content event, ms; `None` when not streaming or when none came.
    ttft_ms: Option<f64>,
    /// Due time to the end of the answer (or of the failure), ms.
    latency_ms: f64,
    /// The gateway's `x-nanogate-endpoint` (the backend that answered), if the answer had one.
    endpoint: Option<&'a str>,
    /// The failure's cause (as in the summary's `failures`), `None` for a success.
    error: Option<String>,
}

pub(crate) struct RequestLog {
    file: BufWriter<File>,
    /// The run's start on the monotonic clock and on the wall clock, read together, so each due
    /// time maps to wall time without a clock read per request.
    start: (Instant, SystemTime),
}

impl RequestLog {
    /// Creates (or truncates) `path`, naming the flag when it cannot.
    pub fn create(path: &Path, start: Instant) -> io::Result<Self> {
        Ok(Self {
            file: BufWriter::new(create(path, "loadtest")?),
            start: (start, SystemTime::now()),
        })
    }

    pub fn record(&mut self, outcome: &Outcome) -> io::Result<()> {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let due = self.start.1 + outcome.due.saturating_duration_since(self.start.0);
        let record = Record {
            n: outcome.n,
            due_ms: ms(due.duration_since(UNIX_EPOCH).unwrap_or_default()),
            ttft_ms: outcome.ttft.map(ms),
            latency_ms: ms(outcome.latency),
            endpoint: outcome.endpoint.as_ref().and_then(|v| v.to_str().ok()),
            error: outcome.result.as_ref().err().map(|f| f.cause()),
        };
        write_line(&mut self.file, &record)
    }

    pub fn finish(mut self) -> io::Result<()> {
        self.file.flush()
    }
}
