//! The user service as the host runs it: its name, migrations, defaults,
//! settings, and the gRPC service it adds.

use shop_contracts::user::user_service_server::UserServiceServer;
use shop_database::retention::Retention;
use shop_host::{Host, ServiceDefaults};

use crate::grpc::UserGrpc;

/// The migrations of `migrations/user-service`, compiled into the binary.
pub const MIGRATIONS: diesel_migrations::EmbeddedMigrations =
    diesel_migrations::embed_migrations!("../../migrations/user-service");

/// Where [`MIGRATIONS`] come from, for tools that read the files (the test
/// databases' templates are named after their contents).
pub const MIGRATIONS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations/user-service");

/// The service name: `app_id` of its events, `service.name` of its traces.
pub const SERVICE_NAME: &str = "user-service";

/// The user service, for the host.
#[derive(Debug, Clone, Copy, Default)]
pub struct UserService;

/// What the user service reads besides the host's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct UserConfig {
    /// Topic exchange the user events are published to (the default is
    /// the one their `.proto` declares).
    #[arg(
        long = "user-events-exchange",
        env = "USER_EVENTS_EXCHANGE",
        value_name = "NAME",
        default_value = <shop_contracts::user::UserCreated as shop_contracts::Event>::DEFAULT_EXCHANGE
    )]
    pub events_exchange: String,
    /// Most `UserSnapshot`s a `ResyncUsers` call writes per second: its
    /// default, and the most a caller may ask for.
    #[arg(
        long = "resync-max-per-second",
        env = "RESYNC_MAX_PER_SECOND",
        value_name = "N",
        default_value_t = crate::resync::DEFAULT_MAX_PER_SECOND,
        value_parser = clap::value_parser!(u32).range(1..=100_000)
    )]
    pub resync_max_per_second: u32,
}

/// The whole configuration of the user service.
pub type Config = shop_host::Config<UserService>;

/// The user service, prepared to run.
pub type Application = shop_host::App<UserService>;

impl shop_host::Service for UserService {
    type Config = UserConfig;

    const NAME: &'static str = SERVICE_NAME;
    const ABOUT: &'static str = "The user service: users over gRPC, each change published as an event.";
    const MIGRATIONS: diesel_migrations::EmbeddedMigrations = MIGRATIONS;
    const DEFAULTS: ServiceDefaults = ServiceDefaults {
        database_url: "postgres://postgres:postgres@localhost:5432/users",
        grpc_addr: "0.0.0.0:50051",
        admin_addr: "0.0.0.0:9101",
        relay_unroutable: "wait",
    };

    fn events_exchange(config: &UserConfig) -> &str {
        &config.events_exchange
    }

    fn start(config: &UserConfig, host: &mut Host) -> anyhow::Result<()> {
        host.retain(Retention {
            table: "create_user_requests",
            column: "created_at",
            window: host.config().request_id_retention,
            consumer: None,
        });
        let grpc = UserServiceServer::new(
            UserGrpc::new(host.pool().clone(), host.outbox_wake().clone())
                .with_resync_max_per_second(config.resync_max_per_second),
        )
        .max_decoding_message_size(host.config().grpc.max_message_size());
        host.add_grpc_service(grpc);
        // Present from the start, so a dashboard shows 0 before a resync.
        metrics::counter!("user_resync_snapshots_total").increment(0);
        Ok(())
    }
}
