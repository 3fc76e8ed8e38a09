//! The live progress line on stderr.
//!
//! It is refreshed from the scheduler's ticker rather than per completion, so
//! a run at tens of thousands of requests per second does not spend its time
//! formatting a line nobody can read that fast. Stderr keeps stdout clean for
//! `--json`.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::summary::{rate, Recorder};

/// How often the line is redrawn: fast enough to feel live, slow enough to be legible.
pub(crate) const REFRESH: Duration = Duration::from_millis(200);

pub(crate) struct Progress {
    bar: ProgressBar,
}

impl Progress {
    pub fn new(total: u64, quiet: bool) -> Self {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            let style = ProgressStyle::with_template("{pos}/{len} done  {msg}  {elapsed_precise}")
                .expect("constant template is valid");
            ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(5))
                .with_style(style)
        };
        Self { bar }
    }

    pub fn update(&self, rec: &Recorder, elapsed: Duration) {
        let done = rec.ok() + rec.failed();
        self.bar.set_position(done);
        self.bar.set_message(format!(
            "failed {}  {:.1} req/s",
            rec.failed(),
            rate(done, elapsed.as_secs_f64())
        ));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
