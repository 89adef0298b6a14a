//! The user service's settings, from environment variables with defaults
//! that work against a local PostgreSQL and RabbitMQ (or `docker compose`).

use std::net::SocketAddr;
use std::time::Duration;

use shop_bootstrap::db::DatabaseSettings;
use shop_bootstrap::grpc::GrpcOptions;
use shop_bootstrap::settings as env;
use shop_messaging::AmqpSettings;
use shop_outbox::RelayConfig;

/// Everything the user service reads at start-up.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `DATABASE_URL` (default `postgres://postgres:postgres@localhost:5432/users`),
    /// `DATABASE_POOL_SIZE` (16), `DATABASE_ACQUIRE_TIMEOUT_MS` (5000).
    pub database: DatabaseSettings,
    /// `AMQP_URL` (default `amqp://guest:guest@localhost:5672/%2f`).
    pub amqp: AmqpSettings,
    /// `GRPC_ADDR` (default `0.0.0.0:50051`); port 0 picks a free port.
    pub grpc_addr: SocketAddr,
    /// `ADMIN_ADDR` (default `0.0.0.0:9101`): HTTP `/metrics` (Prometheus)
    /// and `/health` (dependencies).
    pub admin_addr: SocketAddr,
    /// `GRPC_MAX_IN_FLIGHT`, `GRPC_MAX_MESSAGE_BYTES`, `GRPC_TLS_CERT`,
    /// `GRPC_TLS_KEY`.
    pub grpc: GrpcOptions,
    /// `RELAY_ENABLED` (default `true`): run the outbox relay in this
    /// process. Turn it off to run it as its own process
    /// (`user-service relay`).
    pub relay_enabled: bool,
    /// `USER_EVENTS_EXCHANGE` (default `user.events`), `RELAY_BATCH_SIZE`
    /// (2000), `RELAY_LANES` (2), `RELAY_POLL_INTERVAL_MS` (1000), `OUTBOX_RETENTION_SECS`
    /// (86400).
    pub relay: RelayConfig,
    /// `SHUTDOWN_GRACE_MS` (default 10000): how long in-flight calls and the
    /// relay's last batch may take after SIGTERM.
    pub shutdown_grace: Duration,
}

/// The service name: `app_id` of its events, `service.name` of its traces.
pub const SERVICE_NAME: &str = "user-service";

impl Settings {
    /// Reads the settings; fails on a malformed value, naming the variable.
    pub fn from_env() -> anyhow::Result<Self> {
        Ok(Self {
            database: DatabaseSettings::from_env("users")?,
            amqp: AmqpSettings::from_env(),
            grpc_addr: env::parse("GRPC_ADDR", SocketAddr::from(([0, 0, 0, 0], 50051)))?,
            admin_addr: env::parse("ADMIN_ADDR", SocketAddr::from(([0, 0, 0, 0], 9101)))?,
            grpc: GrpcOptions::from_env()?,
            relay_enabled: env::flag("RELAY_ENABLED", true)?,
            relay: RelayConfig::from_env("USER_EVENTS_EXCHANGE", "user.events", SERVICE_NAME)?,
            shutdown_grace: env::millis("SHUTDOWN_GRACE_MS", Duration::from_secs(10))?,
        })
    }
}
