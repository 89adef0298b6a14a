//! `user-service [serve]` runs the gRPC server and the outbox relay;
//! `user-service relay` runs only the relay; `user-service healthcheck` exits
//! 0 when the server at `GRPC_ADDR` reports SERVING (for container health
//! checks).

use shop_bootstrap::shutdown::{self, CancellationToken};
use shop_telemetry::TelemetryConfig;
use user_service::settings::SERVICE_NAME;
use user_service::{Application, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = shop_telemetry::init(&TelemetryConfig::from_env(
        SERVICE_NAME,
        env!("CARGO_PKG_VERSION"),
    ))?;
    let outcome = run().await;
    if let Err(error) = &outcome {
        tracing::error!(error = format!("{error:#}"), "user service failed");
    }
    telemetry.shutdown();
    outcome
}

async fn run() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let shutdown = CancellationToken::new();
    shutdown::cancel_on_signal(shutdown.clone());
    match std::env::args().nth(1).as_deref() {
        None | Some("serve") => Application::build(settings).await?.run(shutdown).await,
        Some("relay") => user_service::app::run_relay(settings, shutdown).await,
        Some("healthcheck") => shop_bootstrap::grpc::check_health(settings.grpc_addr).await,
        Some(other) => {
            anyhow::bail!("unknown command {other:?}: expected serve (default), relay or healthcheck")
        }
    }
}
