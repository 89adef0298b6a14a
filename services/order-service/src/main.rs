//! `order-service [serve|relay|healthcheck]`; see `order-service --help`.

use clap::Parser as _;
use order_service::cli::{Cli, Command};
use order_service::settings::SERVICE_NAME;
use order_service::{Application, Settings};
use shop_bootstrap::shutdown::{self, CancellationToken};
use shop_telemetry::TelemetryConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = TelemetryConfig::from_env(SERVICE_NAME, env!("CARGO_PKG_VERSION"));
    if matches!(cli.command, Some(Command::Healthcheck)) {
        // A one-shot probe: only problems are logged.
        config.log_filter = "warn".to_owned();
        config.otlp_endpoint = None;
    }
    let telemetry = shop_telemetry::init(&config)?;
    let outcome = run(cli).await;
    if let Err(error) = &outcome {
        tracing::error!(error = format!("{error:#}"), "order service failed");
    }
    telemetry.shutdown();
    outcome
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let shutdown = CancellationToken::new();
    shutdown::cancel_on_signal(shutdown.clone());
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => Application::build(settings).await?.run(shutdown).await,
        Command::Relay => order_service::app::run_relay(settings, shutdown).await,
        Command::Healthcheck => shop_bootstrap::grpc::check_health(settings.grpc_addr).await,
    }
}
