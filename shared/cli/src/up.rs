//! `shop up`: the whole system in one process, against the local
//! PostgreSQL and RabbitMQ, until Ctrl-C.

use shop_bootstrap::settings as env;
use shop_bootstrap::shutdown::{self, CancellationToken, TaskGroup};
use shop_telemetry::TelemetryConfig;

/// Runs both services (or only `service`); each creates and migrates its
/// database and declares its exchanges and queues. Log lines name their
/// service in their target (`user_service::…`, `order_service::…`).
pub(crate) async fn run(service: Option<&str>) -> anyhow::Result<()> {
    let name = service.map_or("shop".to_owned(), |service| format!("{service}-service"));
    let telemetry = shop_telemetry::init(&TelemetryConfig::from_env(&name, env!("CARGO_PKG_VERSION")))?;
    let outcome = match service {
        None => run_services().await,
        Some(service) => serve(service).await,
    };
    if let Err(error) = &outcome {
        tracing::error!(error = format!("{error:#}"), "shop up failed");
    }
    telemetry.shutdown();
    outcome
}

async fn run_services() -> anyhow::Result<()> {
    let mut users = user_service::Settings::from_env()?;
    users.database.url = env::secret(
        "USER_DATABASE_URL",
        "postgres://postgres:postgres@localhost:5432/users",
    );
    let mut orders = order_service::Settings::from_env()?;
    orders.database.url = env::secret(
        "ORDER_DATABASE_URL",
        "postgres://postgres:postgres@localhost:5432/orders",
    );
    // One GRPC_ADDR/ADMIN_ADDR cannot serve two servers: each keeps its own
    // default port unless given its own variable.
    users.grpc_addr = env::parse(
        "USER_GRPC_ADDR",
        std::net::SocketAddr::from(([0, 0, 0, 0], 50051)),
    )?;
    orders.grpc_addr = env::parse(
        "ORDER_GRPC_ADDR",
        std::net::SocketAddr::from(([0, 0, 0, 0], 50052)),
    )?;
    users.admin_addr = env::parse(
        "USER_ADMIN_ADDR",
        std::net::SocketAddr::from(([0, 0, 0, 0], 9101)),
    )?;
    orders.admin_addr = env::parse(
        "ORDER_ADMIN_ADDR",
        std::net::SocketAddr::from(([0, 0, 0, 0], 9102)),
    )?;
    let grace = users.shutdown_grace.max(orders.shutdown_grace);

    let user_app = user_service::Application::build(users).await?;
    let order_app = order_service::Application::build(orders).await?;
    let shutdown = CancellationToken::new();
    shutdown::cancel_on_signal(shutdown.clone());
    tracing::info!(
        user_service = %user_app.local_addr(),
        order_service = %order_app.local_addr(),
        "shop is up; Ctrl-C stops both services"
    );
    let mut tasks = TaskGroup::new(shutdown.clone());
    tasks.spawn("user service", user_app.run(shutdown.clone()));
    tasks.spawn("order service", order_app.run(shutdown));
    // Each service drains within its own grace period; this adds a margin.
    tasks.run(grace + std::time::Duration::from_secs(2)).await
}

/// One service, configured from the environment exactly as its own binary
/// is (`DATABASE_URL`, `GRPC_ADDR`, …), until SIGINT/SIGTERM.
pub async fn serve(service: &str) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    shutdown::cancel_on_signal(shutdown.clone());
    match service {
        "user" => {
            user_service::Application::build(user_service::Settings::from_env()?)
                .await?
                .run(shutdown)
                .await
        }
        "order" => {
            order_service::Application::build(order_service::Settings::from_env()?)
                .await?
                .run(shutdown)
                .await
        }
        other => Err(anyhow::anyhow!(
            "unknown service {other:?}: expected user or order"
        )),
    }
}
