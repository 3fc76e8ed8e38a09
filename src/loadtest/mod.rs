//! `nanogate loadtest`: a load generator for OpenAI-compatible chat endpoints.
//!
//! It exists so the gateway (or a backend directly) can be measured with the
//! same client behaviour every time: closed loop to find peak throughput, open
//! loop (`--rate`) to see latency at a given arrival rate without coordinated
//! omission, and `--stream` to measure time to first token. All requests run
//! as futures on the current thread, which keeps the generator's own overhead
//! predictable and needs no synchronisation around the statistics.
//! `--prefixes` (with `--zipf`, `--turns`) and `--unique` switch to the
//! workloads (see [`workload`]) that prefix-cache-aware routing is
//! benchmarked with.

mod client;
mod progress;
mod request_log;
mod sse;
mod summary;
#[cfg(test)]
mod tests;
mod workload;

use std::future;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::time::{Instant, MissedTickBehavior};

pub use summary::{Percentiles, Summary};

use client::Target;
use progress::Progress;
use request_log::RequestLog;
use summary::Recorder;

#[derive(clap::Args, Debug, Clone)]
pub struct LoadtestArgs {
    /// Full URL of the endpoint, e.g. http://127.0.0.1:8080/v1/chat/completions
    #[arg(long, value_parser = http_url)]
    pub url: String,
    /// Total requests to send.
    #[arg(long, default_value_t = 1000)]
    pub requests: u64,
    /// Requests in flight at once (closed loop).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Open loop: start requests at this rate per second instead of closed loop (concurrency then caps in-flight).
    #[arg(long, value_parser = positive)]
    pub rate: Option<f64>,
    /// How open-loop starts are spaced: `fixed` (one every 1/rate) or `poisson` (exponential
    /// gaps of mean 1/rate drawn from --seed: what many independent clients add up to).
    #[arg(long, value_enum, default_value_t = Arrivals::Fixed)]
    pub arrivals: Arrivals,
    /// Ask for SSE streams and measure time to first token.
    #[arg(long)]
    pub stream: bool,
    #[arg(long, default_value = "sim")]
    pub model: String,
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,
    /// Prompt text sent as the user message (when --prefixes is 0).
    #[arg(long, default_value = "Say hello")]
    pub prompt: String,
    /// Shared-prefix workload: this many distinct system prompts, each request sending one
    /// (picked uniformly) plus a unique user question; 0 sends --prompt every time.
    #[arg(long, default_value_t = 0)]
    pub prefixes: usize,
    /// Length of each system prompt in characters (8000 is about 2000 tokens).
    #[arg(long, default_value_t = 8000)]
    pub prefix_chars: usize,
    /// Zipf exponent of the system prompts' popularity (prompt k is picked with weight 1/k^s);
    /// 0 picks uniformly.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub zipf: f64,
    /// Multi-turn conversations of this many turns: each request is the next turn of one of
    /// --sessions conversations, its prompt the whole conversation so far; 1 = single requests.
    #[arg(long, default_value_t = 1)]
    pub turns: u32,
    /// Conversations going on at once (with --turns above 1); a session's next turn comes this
    /// many requests after its previous one.
    #[arg(long, default_value_t = 64)]
    pub sessions: u64,
    /// No shared prefix at all: every request has its own system prompt of --prefix-chars.
    #[arg(long, conflicts_with_all = ["prefixes", "turns"])]
    pub unique: bool,
    /// Seed of the system prompts' text and of the per-request picks, for reproducible runs.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 60.0, value_parser = positive)]
    pub timeout: f64,
    /// Bearer token to send, if any.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Print the summary as one JSON object instead of a table (for scripts).
    #[arg(long)]
    pub json: bool,
    /// No live progress line (for scripts and tests).
    #[arg(long)]
    pub quiet: bool,
    /// Write a JSON line per request to this file: its number, when it was due (ms since the
    /// epoch), time to first token, latency, the backend that answered (`x-nanogate-endpoint`)
    /// and the failure if any. Beside `simulate --request-log`, says where a request's time went.
    #[arg(long)]
    pub request_log: Option<PathBuf>,
}

/// Rejected at parse time so a typo fails fast instead of producing a run
/// where every request fails the same way.
fn http_url(s: &str) -> Result<String, String> {
    let uri: awc::http::Uri = s.parse().map_err(|e| format!("{e}"))?;
    if uri.scheme().is_none() || uri.authority().is_none() {
        return Err(
            "expected an absolute URL such as http://127.0.0.1:8080/v1/chat/completions".into(),
        );
    }
    Ok(s.to_owned())
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(_) => Err("must be zero or a positive number".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(_) => Err("must be a positive number".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Upper bound on any duration derived from user numbers, so values that skip
/// the CLI parsers (library callers) cannot overflow `Instant` arithmetic.
const FAR: Duration = Duration::from_secs(365 * 24 * 3600);

fn clamp_secs(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).map_or(FAR, |d| d.min(FAR))
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrivals {
    Fixed,
    Poisson,
}

/// When each open-loop request starts, in seconds from the run's start.
struct Schedule {
    arrivals: Arrivals,
    rate: f64,
    rng: SmallRng,
    /// The next start.
    next: f64,
}

impl Schedule {
    fn new(arrivals: Arrivals, rate: f64, seed: u64) -> Self {
        let mut schedule = Self {
            arrivals,
            rate,
            rng: SmallRng::seed_from_u64(seed),
            next: 0.0,
        };
        if arrivals == Arrivals::Poisson {
            schedule.next = schedule.exponential_gap();
        }
        schedule
    }

    fn exponential_gap(&mut self) -> f64 {
        -(1.0 - self.rng.gen::<f64>()).ln() / self.rate
    }

    /// Moves on to the start after the `started`-th.
    fn advance(&mut self, started: u64) {
        self.next = match self.arrivals {
            // Not a running sum, so a long run's starts do not drift by rounding.
            Arrivals::Fixed => started as f64 / self.rate,
            Arrivals::Poisson => self.next + self.exponential_gap(),
        };
    }
}

/// Runs the load (on the current actix/tokio runtime) and returns the summary. Shows a live
/// indicatif progress line unless quiet. Fails only when `--request-log` cannot be created.
pub async fn run(args: &LoadtestArgs) -> io::Result<Summary> {
    let target = Target::new(args, clamp_secs(args.timeout));
    let total = args.requests;
    // Library callers bypass the CLI parsers: zero concurrency would never
    // start anything, and a non-positive rate can only mean closed loop.
    let concurrency = args.concurrency.max(1);
    let mut schedule = args
        .rate
        .filter(|r| r.is_finite() && *r > 0.0)
        .map(|rate| Schedule::new(args.arrivals, rate, args.seed));

    let mut rec = Recorder::new();
    let progress = Progress::new(total, args.quiet);
    let mut ticker = tokio::time::interval(progress::REFRESH);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);

    let start = Instant::now();
    let mut log = args
        .request_log
        .as_deref()
        .map(|path| RequestLog::create(path, start))
        .transpose()?;
    let mut in_flight = FuturesUnordered::new();
    let mut started = 0u64;
    loop {
        // Start everything that is due and fits under the cap; remember when
        // the next one is due if it is not yet.
        let mut next_due = None;
        while started < total && in_flight.len() < concurrency {
            let due = match &schedule {
                None => Instant::now(),
                Some(schedule) => start + clamp_secs(schedule.next),
            };
            if due > Instant::now() {
                next_due = Some(due);
                break;
            }
            in_flight.push(target.send(started, due));
            started += 1;
            if let Some(schedule) = &mut schedule {
                schedule.advance(started);
            }
        }
        if in_flight.is_empty() && started >= total {
            break;
        }
        tokio::select! {
            Some(outcome) = in_flight.next(), if !in_flight.is_empty() => {
                rec.record(&outcome);
                if let Some(writer) = &mut log {
                    if let Err(e) = writer.record(&outcome) {
                        // The run goes on without it: the load matters more than its record.
                        log::warn!("loadtest: --request-log: {e}; stopped");
                        log = None;
                    }
                }
            }
            () = sleep_until(next_due) => {}
            _ = ticker.tick() => progress.update(&rec, start.elapsed()),
        }
    }
    let elapsed = start.elapsed();
    progress.update(&rec, elapsed);
    progress.finish();
    if let Some(Err(e)) = log.map(RequestLog::finish) {
        log::warn!("loadtest: --request-log: {e}");
    }
    Ok(rec.summary(elapsed))
}

/// Waits for the next scheduled start, or forever when nothing is scheduled.
async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => future::pending().await,
    }
}

#[cfg(test)]
mod schedule {
    use super::{Arrivals, Schedule};

    fn starts(arrivals: Arrivals, n: usize) -> Vec<f64> {
        let mut schedule = Schedule::new(arrivals, 100.0, 7);
        (1..=n as u64)
            .map(|started| {
                let at = schedule.next;
                schedule.advance(started);
                at
            })
            .collect()
    }

    #[test]
    fn fixed_starts_are_evenly_spaced() {
        let at = starts(Arrivals::Fixed, 1001);
        assert_eq!(at[0], 0.0);
        assert!(at.windows(2).all(|w| (w[1] - w[0] - 0.01).abs() < 1e-9));
        assert_eq!(at[1000], 10.0);
    }

    #[test]
    fn poisson_gaps_are_exponential_with_the_rate_as_mean_and_repeat_with_the_seed() {
        let at = starts(Arrivals::Poisson, 20_001);
        let gaps: Vec<f64> = at.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|&g| g >= 0.0));
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        assert!((mean - 0.01).abs() < 0.0005, "mean gap {mean}");
        // An exponential's share of gaps under its mean is 1 - 1/e (63 %); evenly spaced: none.
        let short = gaps.iter().filter(|&&g| g < 0.01).count() as f64 / gaps.len() as f64;
        assert!((short - 0.632).abs() < 0.02, "{short}");
        assert_eq!(at, starts(Arrivals::Poisson, 20_001));
    }
}

#[cfg(test)]
mod cli {
    use clap::Parser;

    use super::LoadtestArgs;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadtestArgs,
    }

    fn parse(argv: &[&str]) -> Result<LoadtestArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("loadtest").chain(argv.iter().copied()))
            .map(|cli| cli.args)
    }

    #[test]
    fn defaults_and_validation() {
        let a = parse(&["--url", "http://127.0.0.1:8080/v1/chat/completions"]).expect("valid");
        assert_eq!((a.requests, a.concurrency, a.max_tokens), (1000, 16, 16));
        assert_eq!((a.model.as_str(), a.timeout, a.rate), ("sim", 60.0, None));
        assert!(!a.stream && !a.json && !a.quiet && a.api_key.is_none());
        assert_eq!((a.prefixes, a.prefix_chars, a.seed), (0, 8000, 1));
        assert_eq!((a.zipf, a.turns, a.sessions, a.unique), (0.0, 1, 64, false));
        assert!(parse(&["--url", "http://h/", "--zipf", "-1"]).is_err());
        assert!(parse(&["--url", "http://h/", "--unique", "--prefixes", "4"]).is_err());

        let url = ["--url", "http://h/"];
        assert!(parse(&[&url[..], &["--rate", "0"]].concat()).is_err());
        assert!(parse(&[&url[..], &["--timeout", "-1"]].concat()).is_err());
        assert!(parse(&[&url[..], &["--rate", "2.5"]].concat()).is_ok());
        assert!(parse(&["--url", "/v1/chat/completions"]).is_err());
    }
}
