//! `shop-node user|order`: one service, configured from the environment like
//! its own binary, for the tests that run services as processes they can
//! kill.

fn main() -> anyhow::Result<()> {
    let service = std::env::args().nth(1).unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let config = shop_telemetry::TelemetryConfig::from_env(
            &format!("{service}-service"),
            env!("CARGO_PKG_VERSION"),
        );
        let telemetry = shop_telemetry::init(&config)?;
        let outcome = shop_cli::up::serve(&service).await;
        telemetry.shutdown();
        outcome
    })
}
