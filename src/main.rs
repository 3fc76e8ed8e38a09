//! The `nanogate` command line: wiring only. See the library's `//! # Layout` for what each piece
//! is; each subcommand here parses its flags and calls into it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nanogate::config::Config;
use nanogate::gateway::{raise_open_file_limit, Gateway};
use nanogate::loadtest::{self, LoadtestArgs};
use nanogate::simulator::{self, SimConfig};
use nanogate::{demo, signals, stats_view};
use nanogate_actors::endpoint::EndpointSpec;

#[derive(Parser)]
#[command(
    name = "nanogate",
    version,
    about = "A high-concurrency gateway for OpenAI-compatible GPU inference servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway service.
    Serve {
        /// TOML config file (see config/default.toml for every key).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address; overrides server.listen.
        #[arg(long)]
        listen: Option<String>,
        /// Backend base URLs, comma separated; replaces the [[endpoints]] of the config.
        #[arg(long, value_delimiter = ',')]
        backends: Vec<String>,
    },
    /// Start three simulated GPU backends and a gateway in front of them.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Run one simulated GPU inference server (vLLM-like).
    Simulate {
        #[arg(long, default_value = "127.0.0.1:9101")]
        listen: SocketAddr,
        #[command(flatten)]
        sim: SimConfig,
    },
    /// Load a gateway (or any OpenAI-compatible server) and summarise latency and errors.
    Loadtest(LoadtestArgs),
    /// Show a running gateway's /stats in the terminal.
    Stats {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
    },
    /// Show the usage log's totals (GET /admin/usage) as a table.
    Usage {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The admin token ([admin] token).
        #[arg(long, env = "NANOGATE__ADMIN__TOKEN", hide_env_values = true)]
        token: String,
        /// key, model, endpoint or hour.
        #[arg(long)]
        group_by: Option<String>,
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        model: Option<String>,
        /// Unix milliseconds, or a UTC time like 2026-11-28T09:00:00Z.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
    },
}

fn main() -> ExitCode {
    nanogate::logging::RateLimitedLogger::install();
    let cli = Cli::parse();
    let limit = raise_open_file_limit();
    log::debug!("open-file limit {limit}");
    let system = actix_rt::System::new();
    let result = system.block_on(run(cli.command));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("nanogate: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Serve {
            config,
            listen,
            backends,
        } => {
            let file = config;
            let mut config = Config::load(file.as_deref()).map_err(|e| e.to_string())?;
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
            let reload_from = if backends.is_empty() { file } else { None };
            if !backends.is_empty() {
                config.endpoints = backends.into_iter().map(EndpointSpec::new).collect();
            }
            let gateway = Gateway::start(config).await.map_err(|e| e.to_string())?;
            signals::install(&gateway, reload_from).map_err(|e| e.to_string())?;
            log::info!("nanogate listening on {}", gateway.url());
            gateway.wait().await.map_err(|e| e.to_string())
        }
        Command::Demo { listen } => demo::run(listen).await.map_err(|e| e.to_string()),
        Command::Simulate { listen, sim } => {
            let handle = simulator::start(listen, sim)
                .await
                .map_err(|e| format!("simulator on {listen}: {e}"))?;
            log::info!("simulated GPU server at {}", handle.url());
            tokio::signal::ctrl_c().await.map_err(|e| e.to_string())?;
            handle.stop().await;
            Ok(())
        }
        Command::Loadtest(args) => {
            let summary = loadtest::run(&args).await.map_err(|e| e.to_string())?;
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&summary).map_err(|e| e.to_string())?
                );
            } else {
                println!("{}", summary.render());
            }
            if summary.ok == 0 && summary.requests > 0 {
                return Err("every request failed".into());
            }
            Ok(())
        }
        Command::Stats { url } => {
            println!("{}", stats_view::fetch(&url).await?);
            Ok(())
        }
        Command::Usage {
            url,
            token,
            group_by,
            key,
            model,
            since,
            until,
        } => {
            let query = [
                ("group_by", group_by),
                ("key", key),
                ("model", model),
                ("since", since),
                ("until", until),
            ];
            print!("{}", stats_view::usage(&url, &token, &query).await?);
            Ok(())
        }
    }
}
