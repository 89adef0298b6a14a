//! The order service as the host runs it: its name, migrations, defaults,
//! settings, its gRPC service and the consumer of user events, whose state
//! has a gRPC health name of its own ([`CONSUMER_HEALTH`]).

use shop_contracts::order::order_service_server::OrderServiceServer;
use shop_contracts::user::{UserCreated, UserDeleted, UserSnapshot, UserUpdated};
use shop_database::Pool;
use shop_database::retention::Retention;
use shop_host::{Host, ServiceDefaults};
use shop_messaging::AmqpConfig;
use shop_messaging::consumer::{Consumer, ConsumerConfig};
use shop_messaging::signing::TrustedKeys;

use crate::grpc::OrderGrpc;
use crate::projection::UserProjection;

/// The migrations of `migrations/order-service`, compiled into the binary.
pub const MIGRATIONS: diesel_migrations::EmbeddedMigrations =
    diesel_migrations::embed_migrations!("../../migrations/order-service");

/// Where [`MIGRATIONS`] come from, for tools that read the files (the test
/// databases' templates are named after their contents).
pub const MIGRATIONS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations/order-service");

/// The service name: `app_id` of its events, `service.name` of its traces.
pub const SERVICE_NAME: &str = "order-service";

/// The gRPC health name that is SERVING while the consumer of user events
/// is connected (its queue declared and bound). The service itself (`""`,
/// `shop.order.v1.OrderService`) follows the database only: a broker outage
/// leaves the order API up.
pub const CONSUMER_HEALTH: &str = "order-service.consumer";

/// The order service, for the host.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderService;

/// What the order service reads besides the host's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct OrderConfig {
    /// Topic exchange the order events are published to (the default is
    /// the one their `.proto` declares).
    #[arg(
        long = "order-events-exchange",
        env = "ORDER_EVENTS_EXCHANGE",
        value_name = "NAME",
        default_value = <shop_contracts::order::OrderCreated as shop_contracts::Event>::DEFAULT_EXCHANGE
    )]
    pub events_exchange: String,
    /// Topic exchange the user events are consumed from (by default the
    /// one their `.proto` declares).
    #[arg(
        long = "user-events-exchange",
        env = "USER_EVENTS_EXCHANGE",
        value_name = "NAME",
        default_value = <UserCreated as shop_contracts::Event>::DEFAULT_EXCHANGE
    )]
    pub user_events_exchange: String,
    /// The order service's queue of user events, shared by its replicas.
    #[arg(
        long = "user-events-queue",
        env = "USER_EVENTS_QUEUE",
        value_name = "NAME",
        default_value = "order-service.user-events"
    )]
    pub user_events_queue: String,
    /// The public keys of the user service's event signing keys, a file of
    /// `<key id> <public key in base64>` lines (see
    /// `shop_messaging::signing`): only user events signed by one of them
    /// are applied. Required (unless `CONSUMER_ACCEPT_UNSIGNED_UNTIL` opens
    /// a window for a rolling upgrade).
    #[arg(
        long = "user-events-keys-file",
        env = "USER_EVENTS_KEYS_FILE",
        value_name = "FILE",
        value_parser = shop_messaging::signing::trusted_keys_file
    )]
    pub user_events_keys: Option<TrustedKeys>,
    /// How the user events are consumed.
    #[command(flatten)]
    pub consumer: ConsumerConfig,
    /// Where to ask for the users the consumer misses.
    #[command(flatten)]
    pub resync: crate::resync::ResyncConfig,
}

impl OrderConfig {
    /// The consumer's settings with its exchange and queue.
    pub fn consumer(&self) -> ConsumerConfig {
        let mut consumer = self.consumer.clone();
        consumer.exchange.clone_from(&self.user_events_exchange);
        consumer.queue.clone_from(&self.user_events_queue);
        consumer.trusted_keys = self.user_events_keys.clone().unwrap_or_default();
        consumer
    }
}

/// The whole configuration of the order service.
pub type Config = shop_host::Config<OrderService>;

/// The order service, prepared to run.
pub type Application = shop_host::App<OrderService>;

impl shop_host::Service for OrderService {
    type Config = OrderConfig;

    const NAME: &'static str = SERVICE_NAME;
    const ABOUT: &'static str =
        "The order service: orders over gRPC, and a projection of users from the user service's events.";
    const MIGRATIONS: diesel_migrations::EmbeddedMigrations = MIGRATIONS;
    const DEFAULTS: ServiceDefaults = ServiceDefaults {
        database_url: "postgres://postgres:postgres@localhost:5432/orders",
        grpc_addr: "0.0.0.0:50052",
        admin_addr: "0.0.0.0:9102",
        // Nothing in the system consumes `order.events` yet: with `wait` the
        // order outbox would never drain. A deployment that adds a consumer
        // sets RELAY_UNROUTABLE=wait.
        relay_unroutable: "drop",
    };

    fn events_exchange(config: &OrderConfig) -> &str {
        &config.events_exchange
    }

    fn validate(config: &OrderConfig) -> Result<(), String> {
        if config.user_events_keys.is_none() && config.consumer.accept_unsigned_until.is_none() {
            return Err(
                "USER_EVENTS_KEYS_FILE is not set: the order service applies only user events signed by \
                 one of the user service's keys listed there (`shop event-keys new` prints a key's line)"
                    .to_owned(),
            );
        }
        config.resync.validate()?;
        if config.consumer.gap_policy == Some(shop_messaging::sequence::GapPolicy::Resync)
            && config.resync.url.is_none()
        {
            return Err(
                "CONSUMER_GAP_POLICY=resync needs CONSUMER_RESYNC_URL (the user service to ask for \
                 snapshots) and CONSUMER_RESYNC_TOKEN_FILE"
                    .to_owned(),
            );
        }
        Ok(())
    }

    fn start(config: &OrderConfig, host: &mut Host) -> anyhow::Result<()> {
        host.retain(Retention {
            table: "create_order_requests",
            column: "created_at",
            window: host.config().request_id_retention,
            consumer: None,
        });
        host.retain(Retention {
            table: "inbox",
            column: "processed_at",
            window: config.consumer.inbox_retention,
            consumer: Some(config.user_events_queue.clone()),
        });
        // Crash counts a crash left for events that never came back
        // (shop_messaging::consumer, `inbox_crashes`).
        host.retain(Retention {
            table: "inbox_crashes",
            column: "counted_at",
            window: config.consumer.inbox_retention,
            consumer: Some(config.user_events_queue.clone()),
        });
        let consumer = user_events_consumer(config, host.pool().clone(), host.config().amqp.clone())?;
        let connected = consumer.connected();
        host.report(
            format!("rabbitmq (consumer {})", config.user_events_queue),
            connected.clone(),
        );
        host.health_status(CONSUMER_HEALTH, connected);
        let shutdown = host.shutdown().clone();
        host.spawn("user events consumer", consumer.run(shutdown));
        let grpc = OrderServiceServer::new(OrderGrpc::new(host.pool().clone(), host.outbox_wake().clone()))
            .max_decoding_message_size(host.config().grpc.max_message_size());
        host.add_grpc_service(grpc);
        Ok(())
    }

    fn database_grants(config: &OrderConfig) -> Vec<shop_database::Grant> {
        config.consumer.database_grants()
    }
}

/// The consumer of `user.events` that keeps the users projection, asking
/// the user service for snapshots of the users stuck behind a gap when
/// `CONSUMER_RESYNC_URL` is set.
pub fn user_events_consumer(config: &OrderConfig, pool: Pool, amqp: AmqpConfig) -> anyhow::Result<Consumer> {
    let consumer = Consumer::new(config.consumer(), pool, amqp)
        .subscribe::<UserCreated, _>(UserProjection)
        .subscribe::<UserUpdated, _>(UserProjection)
        .subscribe::<UserDeleted, _>(UserProjection)
        .subscribe::<UserSnapshot, _>(UserProjection);
    Ok(match config.resync.client()? {
        Some(client) => consumer.resync(std::sync::Arc::new(client)),
        None => consumer,
    })
}
