//! A fake GPU inference server that behaves like vLLM, so routing, streaming and failover can be
//! tested and measured without GPUs (`nanogate simulate`, `nanogate demo`, integration tests).
//!
//! # Layout
//! - [`engine`]: the continuous-batching timing model (batch slots, time to first token, decode
//!   steps) and the per-sequence drop guards that keep the counters right when clients vanish.
//! - [`prefix`]: the automatic prefix cache (chained block keys, LRU) that shortens prefill.
//! - [`control`]: runtime switches (down, hang, garbage, stall, reset, error rate) and the
//!   counters behind
//!   `/sim/stats` and `/metrics`.
//! - [`faults`]: the per-request random draws (error, hang, latency spike).
//! - [`wire`]: OpenAI request parsing and non-streaming response shapes.
//! - [`sse`]: the OpenAI streaming chunk format and the token stream fed to the HTTP body.
//! - [`metrics`]: vLLM-named Prometheus text.
//! - [`request_log`]: `--request-log`, one JSON line per request for routing analysis.
//! - [`routes`]: the HTTP surface and the gate middleware that makes the server look down or hung.

mod control;
mod engine;
mod faults;
mod metrics;
mod prefix;
mod request_log;
mod routes;
mod sse;
mod wire;

#[cfg(test)]
mod tests;

use std::{io, net::SocketAddr, path::PathBuf, sync::Arc};

use actix_web::{dev::ServerHandle, middleware, web, App, HttpServer};

pub use control::{SimControl, SimStats};

/// Knobs of one simulated GPU; also the `nanogate simulate` command-line flags.
#[derive(clap::Args, Debug, Clone)]
pub struct SimConfig {
    /// Model names served (comma separated on the CLI).
    #[arg(long, value_delimiter = ',', default_value = "sim")]
    pub models: Vec<String>,
    /// Speed multiplier: 2.0 = twice as fast as the baseline GPU.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Max sequences decoded at once (continuous batching); the rest queue.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Prefill time per prompt token, microseconds (baseline).
    #[arg(long, default_value_t = 50)]
    pub prefill_us_per_token: u64,
    /// Fixed overhead before the first token, ms.
    #[arg(long, default_value_t = 5)]
    pub ttft_base_ms: u64,
    /// Decode step time with a batch of one, ms.
    #[arg(long, default_value_t = 10)]
    pub decode_step_ms: u64,
    /// Fractional slowdown of a decode step per extra running sequence (0.02 = +2% each).
    #[arg(long, default_value_t = 0.02)]
    pub batch_slowdown: f64,
    /// Default completion length when the request gives no max_tokens.
    #[arg(long, default_value_t = 16)]
    pub default_max_tokens: u32,
    /// Fraction of requests answered with a 500 error.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Fraction of requests that get an extra latency spike before the first token.
    #[arg(long, default_value_t = 0.0)]
    pub spike_rate: f64,
    /// Length of a latency spike, ms.
    #[arg(long, default_value_t = 1000)]
    pub spike_ms: u64,
    /// Fraction of requests that hang forever (never answer).
    #[arg(long, default_value_t = 0.0)]
    pub hang_rate: f64,
    /// Prefix-cache capacity in blocks of 64 prompt characters (16 tokens); 0 turns it off.
    /// Prompts whose leading blocks are cached skip their prefill.
    #[arg(long, default_value_t = 4096)]
    pub prefix_cache_blocks: usize,
    /// For this long after start, and after each `/sim/up`, the GPU runs `--warmup-factor` times
    /// slower, like a server whose CUDA graphs and caches are still cold; 0 = never.
    #[arg(long, default_value_t = 0)]
    pub warmup_ms: u64,
    /// How much slower prefill and decode are while warming up.
    #[arg(long, default_value_t = 5.0)]
    pub warmup_factor: f64,
    /// Write one JSON line per request reaching its first token to this file (arrival, wait for
    /// a slot, cached tokens, time to first token, the prompt's first block); `/sim/flush` starts
    /// it afresh. Off by default.
    #[arg(long)]
    pub request_log: Option<PathBuf>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            models: vec!["sim".to_owned()],
            speed: 1.0,
            max_batch: 32,
            prefill_us_per_token: 50,
            ttft_base_ms: 5,
            decode_step_ms: 10,
            batch_slowdown: 0.02,
            default_max_tokens: 16,
            error_rate: 0.0,
            spike_rate: 0.0,
            spike_ms: 1000,
            hang_rate: 0.0,
            prefix_cache_blocks: 4096,
            warmup_ms: 0,
            warmup_factor: 5.0,
            request_log: None,
        }
    }
}

impl SimConfig {
    /// Rejects knobs that would make the timing arithmetic meaningless (or panic in `Duration`),
    /// so a bad command line fails at start-up instead of on the first request.
    fn validate(&self) -> io::Result<()> {
        let invalid = |msg: &str| Err(io::Error::new(io::ErrorKind::InvalidInput, msg.to_owned()));
        if self.models.is_empty() || self.models.iter().any(|m| m.is_empty()) {
            return invalid("simulator: --models needs at least one non-empty name");
        }
        // Below a thousandth, a step of a few ms becomes longer than a `Duration` holds.
        if !(self.speed.is_finite() && (1e-3..=1e6).contains(&self.speed)) {
            return invalid("simulator: --speed must be between 0.001 and 1000000");
        }
        if self.max_batch == 0 {
            return invalid("simulator: --max-batch must be at least 1");
        }
        if !(self.batch_slowdown.is_finite() && self.batch_slowdown >= 0.0) {
            return invalid("simulator: --batch-slowdown must be zero or positive");
        }
        if !(self.warmup_factor.is_finite() && self.warmup_factor >= 1.0) {
            return invalid("simulator: --warmup-factor must be a number of at least 1");
        }
        if self.default_max_tokens == 0 {
            return invalid("simulator: --default-max-tokens must be at least 1");
        }
        let rates = [self.error_rate, self.spike_rate, self.hang_rate];
        if rates.iter().any(|r| !(0.0..=1.0).contains(r)) {
            return invalid(
                "simulator: --error-rate, --spike-rate and --hang-rate must be in 0..=1",
            );
        }
        Ok(())
    }
}

/// A running simulator.
pub struct SimHandle {
    pub addr: SocketAddr,
    pub control: Arc<SimControl>,
    server: ServerHandle,
}

impl SimHandle {
    /// Base URL for clients, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops at once, dropping in-flight connections the way a killed GPU server would.
    pub async fn stop(self) {
        self.server.stop(false).await;
    }
}

/// Enough for 10,000 concurrent client connections plus slack for reconnect churn.
const MAX_CONNECTIONS: usize = 25_000;

/// Accept queue deep enough that a burst of thousands of connects is not refused by the kernel.
const BACKLOG: u32 = 4096;

/// Binds `listen` (port 0 = ephemeral) and serves on the current actix system with one worker:
/// every request is a cheap timer-driven future, so one thread holds thousands of streams.
pub async fn start(listen: SocketAddr, cfg: SimConfig) -> io::Result<SimHandle> {
    cfg.validate()?;
    let control = Arc::new(SimControl::new(cfg.error_rate));
    let request_log = cfg
        .request_log
        .as_deref()
        .map(request_log::RequestLog::create)
        .transpose()?;
    let engine =
        Arc::new(engine::Engine::new(cfg, Arc::clone(&control)).with_request_log(request_log));
    let data = web::Data::from(engine);
    let server = HttpServer::new(move || {
        App::new()
            .wrap(middleware::from_fn(routes::gate))
            .configure(routes::configure(data.clone()))
    })
    .workers(1)
    .disable_signals()
    .backlog(BACKLOG)
    .max_connections(MAX_CONNECTIONS)
    .max_connection_rate(MAX_CONNECTIONS)
    // Without this a client that hangs up while its non-streaming answer is being computed
    // would keep its batch slot until the answer is ready; vLLM aborts such requests.
    .h1_allow_half_closed(false)
    // As the servers it stands for: uvicorn (vLLM, SGLang) and llama.cpp's server set
    // TCP_NODELAY. Without it a stream's role chunk and first token, written one after the other,
    // went out as two segments and the second waited for the reader's delayed ACK: up to 40 ms
    // added to a time to first token the simulator had already logged as served.
    .on_connect(|connection, _| {
        if let Some(tcp) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() {
            let _ = tcp.set_nodelay(true);
        }
    })
    .bind(listen)?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| io::Error::other("simulator: bind produced no address"))?;
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok(SimHandle {
        addr,
        control,
        server: handle,
    })
}
