//! nanogate: one binary in front of several OpenAI-compatible GPU inference servers, routing each
//! request to a live, lightly loaded backend.
//!
//! # Layout
//! - [`ingress`]: the actix-web routes (OpenAI API, `/health`, `/ready`, `/stats`, `/metrics`),
//!   request validation and the one place errors become HTTP ([`error`]).
//! - [`gateway`]: wiring of the actors (crate `nanogate-actors`) and the HTTP server;
//!   [`signals`]: graceful shutdown on SIGTERM and endpoint reload on SIGHUP;
//!   [`config`]: typed, validated configuration over `config/default.toml`; [`logging`]: log
//!   lines rate-limited per source.
//! - [`simulator`]: a fake GPU inference server (continuous batching, SSE, vLLM metrics, faults)
//!   so everything runs and is tested without a GPU; [`demo`] starts three of them behind a gateway.
//! - [`loadtest`]: the load generator; [`stats_view`]: a terminal view of a gateway's `/stats`;
//!   [`request_log`]: the JSON-lines files both tools write with `--request-log`.

pub mod config;
pub mod demo;
pub mod error;
pub mod gateway;
pub mod ingress;
pub mod loadtest;
pub mod logging;
mod request_log;
pub mod signals;
pub mod simulator;
pub mod stats_view;
