//! `nanogate demo`: the embedded default. Three simulated GPUs of unequal speed on free loopback
//! ports and a gateway in front of them, so a newcomer sees the whole system with one command.

use std::net::SocketAddr;

use nanogate_actors::endpoint::EndpointSpec;

use crate::config::Config;
use crate::gateway::Gateway;
use crate::signals;
use crate::simulator::{self, SimConfig};

/// The demo fleet: (name, speed, latency spike rate).
const FLEET: [(&str, f64, f64); 3] = [
    ("fast", 1.5, 0.0),
    ("medium", 1.0, 0.0),
    ("slow", 0.5, 0.05),
];

pub async fn run(listen: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let mut backends = Vec::new();
    let mut config = Config::defaults();
    for (name, speed, spike_rate) in FLEET {
        let sim = simulator::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            SimConfig {
                speed,
                spike_rate,
                ..SimConfig::default()
            },
        )
        .await?;
        log::info!("simulated GPU '{name}' (speed {speed}) at {}", sim.url());
        config.endpoints.push(EndpointSpec::new(sim.url()));
        backends.push(sim);
    }
    config.server.listen = listen.to_string();
    config.health.interval_ms = 2000;
    config.health.fall = 2;
    let gateway = Gateway::start(config).await?;
    signals::install(&gateway, None)?;
    let url = gateway.url();
    log::info!("nanogate listening on {url}");
    log::info!(
        "try: curl -s {url}/v1/chat/completions -H 'content-type: application/json' \
         -d '{{\"model\":\"sim\",\"messages\":[{{\"role\":\"user\",\"content\":\"hello\"}}]}}'"
    );
    log::info!(
        "stream: add \"stream\":true; watch: nanogate stats --url {url}  (or {url}/metrics)"
    );
    log::info!(
        "load: nanogate loadtest --url {url}/v1/chat/completions --requests 2000 --concurrency 64 --stream"
    );
    gateway.wait().await?;
    for sim in backends {
        sim.stop().await;
    }
    Ok(())
}
