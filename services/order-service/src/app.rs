//! Building and running the service: the pool (database created and migrated
//! on the way), the gRPC server, the outbox relay and the consumer of user
//! events. Health is NOT_SERVING until the consumer is connected.

use std::net::SocketAddr;

use shop_bootstrap::admin::DependencyHealth;
use shop_bootstrap::db::Pool;
use shop_bootstrap::grpc::{GrpcOptions, Prepared};
use shop_bootstrap::shutdown::{CancellationToken, TaskGroup};
use shop_contracts::order::order_service_server::OrderServiceServer;
use shop_contracts::user::{UserCreated, UserDeleted, UserUpdated};
use shop_messaging::consumer::Consumer;
use shop_outbox::Relay;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::grpc::OrderGrpc;
use crate::projection::UserProjection;
use crate::settings::Settings;

/// The migrations of `migrations/order-service`, compiled into the binary.
pub const MIGRATIONS: diesel_migrations::EmbeddedMigrations =
    diesel_migrations::embed_migrations!("../../migrations/order-service");

/// Where [`MIGRATIONS`] come from, for tools that read the files (the test
/// databases' templates are named after their contents).
pub const MIGRATIONS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations/order-service");

/// A service ready to run: database migrated, listener bound.
pub struct Application {
    settings: Settings,
    prepared: Prepared,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("local_addr", &self.prepared.local_addr)
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Connects to (and if needed creates and migrates) the database and
    /// binds the gRPC listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let prepared = Prepared::new(
            &settings.database,
            MIGRATIONS,
            settings.grpc_addr,
            settings.admin_addr,
        )
        .await?;
        Ok(Self { settings, prepared })
    }

    /// The address the gRPC server listens on (the real port when the
    /// settings asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.prepared.local_addr
    }

    /// The address of the admin HTTP port (metrics, health).
    pub fn admin_addr(&self) -> SocketAddr {
        self.prepared.admin_addr
    }

    /// The database pool.
    pub fn pool(&self) -> &Pool {
        &self.prepared.pool
    }

    /// Serves gRPC, consumes user events and runs the relay (unless
    /// disabled) until `shutdown`, then drains within the grace period.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut tasks = TaskGroup::new(shutdown.clone());
        let health = DependencyHealth::default();
        let Prepared {
            pool,
            incoming,
            local_addr,
            admin,
            admin_addr,
        } = self.prepared;
        tasks.spawn(
            "admin port",
            shop_bootstrap::admin::run(admin, pool.clone(), health.clone(), shutdown.clone()),
        );
        let consumer = user_events_consumer(&self.settings, pool.clone()).with_health(health.clone());
        let connected = consumer.connected();
        tasks.spawn("user events consumer", consumer.run(shutdown.clone()));
        if self.settings.relay_enabled {
            tasks.spawn(
                "outbox relay",
                relay(&self.settings, pool.clone())
                    .with_health(health)
                    .run(shutdown.clone()),
            );
        }
        tasks.spawn(
            "grpc server",
            serve(
                pool,
                incoming,
                connected,
                self.settings.grpc.clone(),
                shutdown.clone(),
            ),
        );
        tracing::info!(addr = %local_addr, admin = %admin_addr, relay = self.settings.relay_enabled, "order service started");
        let outcome = tasks.run(self.settings.shutdown_grace).await;
        tracing::info!("order service stopped");
        outcome
    }
}

/// The consumer of `user.events` that keeps the users projection.
pub fn user_events_consumer(settings: &Settings, pool: Pool) -> Consumer {
    Consumer::new(settings.consumer.clone(), pool, settings.amqp.clone())
        .subscribe::<UserCreated, _>(UserProjection)
        .subscribe::<UserUpdated, _>(UserProjection)
        .subscribe::<UserDeleted, _>(UserProjection)
}

/// The outbox relay of the order service.
pub fn relay(settings: &Settings, pool: Pool) -> Relay {
    Relay::new(
        pool,
        settings.database.clone(),
        settings.amqp.clone(),
        settings.relay.clone(),
    )
}

/// Runs only the relay.
pub async fn run_relay(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = shop_bootstrap::db::connect(&settings.database, MIGRATIONS).await?;
    let mut tasks = TaskGroup::new(shutdown.clone());
    tasks.spawn("outbox relay", relay(&settings, pool).run(shutdown));
    tasks.run(settings.shutdown_grace).await
}

async fn serve(
    pool: Pool,
    incoming: TcpIncoming,
    mut connected: watch::Receiver<bool>,
    options: GrpcOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let set = move |serving: bool| {
        let health = health.clone();
        async move {
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
            health
                .set_service_status(
                    <OrderServiceServer<OrderGrpc> as tonic::server::NamedService>::NAME,
                    status,
                )
                .await;
        }
    };
    set(false).await;
    // Serving exactly while the consumer is connected, until shutdown.
    let follow = {
        let shutdown = shutdown.clone();
        let set = set.clone();
        async move {
            loop {
                let serving = *connected.borrow_and_update();
                set(serving && !shutdown.is_cancelled()).await;
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    changed = connected.changed() => if changed.is_err() { break },
                }
            }
            set(false).await;
        }
    };
    let follower = tokio::spawn(follow);
    let service =
        OrderServiceServer::new(OrderGrpc::new(pool)).max_decoding_message_size(options.max_message_bytes);
    let served = shop_bootstrap::grpc::serve(
        tonic::service::Routes::new(service),
        &[<OrderServiceServer<OrderGrpc> as tonic::server::NamedService>::NAME],
        health_service,
        incoming,
        &options,
        shutdown.cancelled_owned(),
    )
    .await;
    follower.abort();
    served
}
