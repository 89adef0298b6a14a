//! Building and running the service: the pool (database created and migrated
//! on the way), the gRPC server on its bound listener, and the outbox relay.

use std::net::SocketAddr;

use shop_bootstrap::admin::DependencyHealth;
use shop_bootstrap::db::Pool;
use shop_bootstrap::grpc::{GrpcOptions, Prepared};
use shop_bootstrap::shutdown::{CancellationToken, TaskGroup};
use shop_contracts::user::user_service_server::UserServiceServer;
use shop_outbox::Relay;
use tonic::transport::server::TcpIncoming;

use crate::grpc::UserGrpc;
use crate::settings::Settings;

/// The migrations of `migrations/user-service`, compiled into the binary.
pub const MIGRATIONS: diesel_migrations::EmbeddedMigrations =
    diesel_migrations::embed_migrations!("../../migrations/user-service");

/// Where [`MIGRATIONS`] come from, for tools that read the files (the test
/// databases' templates are named after their contents).
pub const MIGRATIONS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations/user-service");

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

    /// Serves gRPC and runs the relay (unless disabled) until `shutdown`,
    /// then drains in-flight calls and the relay's batch within the grace
    /// period.
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
            serve(pool, incoming, self.settings.grpc.clone(), shutdown.clone()),
        );
        tracing::info!(addr = %local_addr, admin = %admin_addr, relay = self.settings.relay_enabled, "user service started");
        let outcome = tasks.run(self.settings.shutdown_grace).await;
        tracing::info!("user service stopped");
        outcome
    }
}

/// The outbox relay of the user service.
pub fn relay(settings: &Settings, pool: Pool) -> Relay {
    Relay::new(
        pool,
        settings.database.clone(),
        settings.amqp.clone(),
        settings.relay.clone(),
    )
}

/// Runs only the relay, for deployments that keep it out of the gRPC
/// processes.
pub async fn run_relay(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = shop_bootstrap::db::connect(&settings.database, MIGRATIONS).await?;
    let mut tasks = TaskGroup::new(shutdown.clone());
    tasks.spawn("outbox relay", relay(&settings, pool).run(shutdown));
    tasks.run(settings.shutdown_grace).await
}

async fn serve(
    pool: Pool,
    incoming: TcpIncoming,
    options: GrpcOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<UserServiceServer<UserGrpc>>().await;
    let stopping = async move {
        shutdown.cancelled().await;
        health.set_not_serving::<UserServiceServer<UserGrpc>>().await;
    };
    let service =
        UserServiceServer::new(UserGrpc::new(pool)).max_decoding_message_size(options.max_message_bytes);
    shop_bootstrap::grpc::serve(
        tonic::service::Routes::new(service),
        &[<UserServiceServer<UserGrpc> as tonic::server::NamedService>::NAME],
        health_service,
        incoming,
        &options,
        stopping,
    )
    .await
}
