//! The order service's settings, from environment variables with defaults
//! that work against a local PostgreSQL and RabbitMQ (or `docker compose`).

use std::net::SocketAddr;
use std::time::Duration;

use shop_bootstrap::db::DatabaseSettings;
use shop_bootstrap::grpc::GrpcOptions;
use shop_bootstrap::settings as env;
use shop_messaging::AmqpSettings;
use shop_messaging::consumer::ConsumerConfig;
use shop_outbox::RelayConfig;

/// The service name: `app_id` of its events, `service.name` of its traces.
pub const SERVICE_NAME: &str = "order-service";

/// Everything the order service reads at start-up.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `DATABASE_URL` (default `postgres://postgres:postgres@localhost:5432/orders`),
    /// `DATABASE_POOL_SIZE` (16), `DATABASE_ACQUIRE_TIMEOUT_MS` (5000).
    pub database: DatabaseSettings,
    /// `AMQP_URL` (default `amqp://guest:guest@localhost:5672/%2f`).
    pub amqp: AmqpSettings,
    /// `GRPC_ADDR` (default `0.0.0.0:50052`).
    pub grpc_addr: SocketAddr,
    /// `ADMIN_ADDR` (default `0.0.0.0:9102`): HTTP `/metrics` (Prometheus)
    /// and `/health` (dependencies).
    pub admin_addr: SocketAddr,
    /// `GRPC_MAX_IN_FLIGHT`, `GRPC_MAX_MESSAGE_BYTES`, `GRPC_TLS_CERT`,
    /// `GRPC_TLS_KEY`.
    pub grpc: GrpcOptions,
    /// `RELAY_ENABLED` (default `true`).
    pub relay_enabled: bool,
    /// `ORDER_EVENTS_EXCHANGE` (default `order.events`), `RELAY_BATCH_SIZE`,
    /// `RELAY_POLL_INTERVAL_MS`, `OUTBOX_RETENTION_SECS`.
    pub relay: RelayConfig,
    /// `USER_EVENTS_EXCHANGE` (default `user.events`), `USER_EVENTS_QUEUE`
    /// (`order-service.user-events`), `CONSUMER_PREFETCH` (200),
    /// `CONSUMER_CONCURRENCY` (2), `CONSUMER_BATCH_SIZE` (100),
    /// `CONSUMER_RETRY_DELAYS_MS` (`1000,10000,60000`),
    /// `CONSUMER_MAX_ATTEMPTS` (4).
    pub consumer: ConsumerConfig,
    /// `SHUTDOWN_GRACE_MS` (default 10000).
    pub shutdown_grace: Duration,
}

impl Settings {
    /// Reads the settings; fails on a malformed value, naming the variable.
    pub fn from_env() -> anyhow::Result<Self> {
        Ok(Self {
            database: DatabaseSettings::from_env("orders")?,
            amqp: AmqpSettings::from_env(),
            grpc_addr: env::parse("GRPC_ADDR", SocketAddr::from(([0, 0, 0, 0], 50052)))?,
            admin_addr: env::parse("ADMIN_ADDR", SocketAddr::from(([0, 0, 0, 0], 9102)))?,
            grpc: GrpcOptions::from_env()?,
            relay_enabled: env::flag("RELAY_ENABLED", true)?,
            relay: RelayConfig::from_env("ORDER_EVENTS_EXCHANGE", "order.events", SERVICE_NAME)?,
            consumer: ConsumerConfig::from_env(
                ("USER_EVENTS_EXCHANGE", "user.events"),
                ("USER_EVENTS_QUEUE", "order-service.user-events"),
            )?,
            shutdown_grace: env::millis("SHUTDOWN_GRACE_MS", Duration::from_secs(10))?,
        })
    }
}
