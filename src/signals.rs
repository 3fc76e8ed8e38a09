//! Process signals for `nanogate serve` and `nanogate demo`: SIGTERM and SIGINT begin the
//! graceful shutdown (`/ready` turns 503, no new connections, in-flight requests and streams get
//! `server.shutdown_grace_secs`); SIGHUP reloads `[[endpoints]]` from the config file without
//! touching requests in flight.

use std::path::PathBuf;

use nanogate_actors::balancer::ReplaceEndpoints;
use nanogate_actors::health_checker::ProbeNow;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::gateway::Gateway;

/// Installs the handlers on the current actix system. `reload_from` is the config file whose
/// endpoints SIGHUP applies (`None`: SIGHUP is logged and ignored).
pub fn install(gateway: &Gateway, reload_from: Option<PathBuf>) -> std::io::Result<()> {
    let shutdown = gateway.shutdown_handle();
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    actix_rt::spawn(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        log::info!("{name}: shutting down; /ready is 503 and in-flight requests are finishing");
        shutdown.shutdown().await;
    });
    let mut hangup = signal(SignalKind::hangup())?;
    let (balancer, health) = (gateway.state.balancer.clone(), gateway.state.health.clone());
    actix_rt::spawn(async move {
        while hangup.recv().await.is_some() {
            let Some(file) = &reload_from else {
                log::warn!("SIGHUP: no config file to reload endpoints from (started without --config, or with --backends)");
                continue;
            };
            match Config::reload_endpoints(file) {
                Ok(specs) => match balancer.send(ReplaceEndpoints(specs)).await {
                    Ok(r) => {
                        log::info!(
                            "SIGHUP: endpoints reloaded from {}: added {:?}, removed {:?}, kept {}",
                            file.display(),
                            r.added,
                            r.removed,
                            r.kept
                        );
                        // Added endpoints take traffic once a probe passes: probe now.
                        health.do_send(ProbeNow {
                            endpoint: None,
                            urgent: false,
                        });
                    }
                    Err(e) => log::error!("SIGHUP: the balancer did not answer: {e}"),
                },
                Err(e) => log::error!("SIGHUP: endpoints unchanged, the config is invalid: {e}"),
            }
        }
    });
    Ok(())
}
