//! The order service's settings, from environment variables with defaults
//! that work against a local PostgreSQL and RabbitMQ (or `docker compose`).

use std::net::SocketAddr;
use std::time::Duration;

use shop_bootstrap::db::DatabaseSettings;
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
        let mut relay = RelayConfig::new(env::string("ORDER_EVENTS_EXCHANGE", "order.events"), SERVICE_NAME);
        relay.batch_size = env::parse("RELAY_BATCH_SIZE", relay.batch_size)?;
        relay.poll_interval = env::millis("RELAY_POLL_INTERVAL_MS", relay.poll_interval)?;
        relay.retention =
            Duration::from_secs(env::parse("OUTBOX_RETENTION_SECS", relay.retention.as_secs())?);
        let mut consumer = ConsumerConfig::new(
            env::string("USER_EVENTS_EXCHANGE", "user.events"),
            env::string("USER_EVENTS_QUEUE", "order-service.user-events"),
        );
        consumer.prefetch = env::parse("CONSUMER_PREFETCH", consumer.prefetch)?;
        consumer.concurrency = env::parse("CONSUMER_CONCURRENCY", consumer.concurrency)?;
        consumer.batch_size = env::parse("CONSUMER_BATCH_SIZE", consumer.batch_size)?;
        consumer.retry_delays = env::millis_list("CONSUMER_RETRY_DELAYS_MS", &consumer.retry_delays)?;
        consumer.max_attempts = env::parse("CONSUMER_MAX_ATTEMPTS", consumer.max_attempts)?;
        Ok(Self {
            database: DatabaseSettings {
                url: env::secret(
                    "DATABASE_URL",
                    "postgres://postgres:postgres@localhost:5432/orders",
                ),
                pool_size: env::parse("DATABASE_POOL_SIZE", 16)?,
                acquire_timeout: env::millis("DATABASE_ACQUIRE_TIMEOUT_MS", Duration::from_secs(5))?,
            },
            amqp: AmqpSettings {
                url: env::secret("AMQP_URL", "amqp://guest:guest@localhost:5672/%2f"),
            },
            grpc_addr: env::parse("GRPC_ADDR", SocketAddr::from(([0, 0, 0, 0], 50052)))?,
            relay_enabled: env::flag("RELAY_ENABLED", true)?,
            relay,
            consumer,
            shutdown_grace: env::millis("SHUTDOWN_GRACE_MS", Duration::from_secs(10))?,
        })
    }
}
