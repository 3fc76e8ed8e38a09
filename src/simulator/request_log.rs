//! `nanogate simulate --request-log FILE`: one JSON line per request that reached its first
//! token, saying when it arrived, how long it waited for a batch slot, what the prefix cache
//! served and when its first token came. A router's aggregate figures say how often prompts were
//! found cached; this says where each prompt went and why it was cold there, which is what a
//! routing benchmark needs to explain a loss (`scripts/routing-requests.py` reads it: prompts per
//! simulator, prompts sent to more than one, moves). `/sim/flush` starts the file afresh, so a
//! benchmark that renames it after each run gets one file per run.

use std::{
    fs::File,
    io::{self, LineWriter},
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use serde::Serialize;

use crate::request_log::{create, write_line};

/// One request, as written.
#[derive(Debug, Serialize)]
pub struct Record {
    /// Arrival, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Time queued for a batch slot, ms.
    pub wait_ms: f64,
    /// Arrival to first token, ms (the wait, the prefill of what was not cached, any spike).
    pub ttft_ms: f64,
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    /// The drawn latency spike included in `ttft_ms`, ms.
    pub spike_ms: f64,
    /// The key of the prompt's first 64-byte block (hex), which names a shared system prompt;
    /// `None` for a prompt shorter than a block.
    pub prompt: Option<String>,
}

pub struct RequestLog {
    path: PathBuf,
    /// `None` once writing failed: the simulator keeps serving, the log stops.
    file: Mutex<Option<LineWriter<File>>>,
}

impl RequestLog {
    /// Creates (or truncates) `path`; fails at start-up when it cannot be written.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = create(path, "simulator")?;
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(Some(LineWriter::new(file))),
        })
    }

    /// Starts the file afresh at its path (after the caller renamed the old one, or over it).
    pub fn restart(&self) {
        let file = create(&self.path, "simulator")
            .map(LineWriter::new)
            .map_err(|e| log::warn!("{e}; stopped"))
            .ok();
        *self.lock() = file;
    }

    pub fn record(&self, record: &Record) {
        let mut file = self.lock();
        let Some(writer) = file.as_mut() else { return };
        if let Err(e) = write_line(writer, record) {
            log::warn!("request log {}: {e}; stopped", self.path.display());
            *file = None;
        }
    }

    /// A panic while holding the lock leaves at worst a torn line: the writer is used as is.
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<LineWriter<File>>> {
        self.file.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
