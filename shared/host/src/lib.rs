//! The service host: everything a service does the same way as every other
//! service, so a service crate holds only its handlers, validation, storage,
//! errors and projections, and its `main.rs` is one call.
//!
//! A service implements [`Service`]: its name, its migrations, the defaults
//! that differ from other services, its own settings, and [`Service::start`],
//! which adds its gRPC services and background tasks to a [`Host`]. The host
//! does the rest:
//!
//! - [`config`]: one typed configuration per service ([`Config`]), read from
//!   environment variables (each also a flag) through `clap`, validated at
//!   start-up with one line naming a bad variable; see `shop-config`.
//! - [`cli`]: the command line of every service binary: `serve` (the
//!   default), `relay`, `healthcheck`, `--help`, `--version` and
//!   `--print-config`.
//! - [`App`]: the database created and migrated, the gRPC and admin
//!   listeners bound (port 0 works, for tests), then the gRPC server
//!   ([`grpc`]: reflection, health, limits, TLS, the trace layer, and
//!   [`auth`]: who may call, checked before a request's body is read), the admin
//!   port ([`admin`]: metrics and dependency health), the outbox relay and the
//!   service's own tasks, until SIGINT/SIGTERM and a bounded drain
//!   ([`shutdown`]).
//! - [`validate`]: field violations and the request checks both services
//!   share; [`limit`]: load shedding past a bound on calls in flight.
//!
//! # Nothing dies silently
//!
//! Inside a task, a part that ends unexpectedly is started again after a
//! backoff and counted in `task_restarts_total{task}`: a relay lane (its
//! partitions would otherwise never be published again) and a consumer
//! worker (its session is replaced). A whole task of the service (the gRPC
//! server, the relay, the consumer, the admin port, the retention sweep)
//! that ends before shutdown is fatal: the others are stopped, the error is
//! logged, and the process exits non-zero for its supervisor (Kubernetes,
//! compose's `restart: unless-stopped`) to restart it. Settings are checked
//! before anything starts ([`config`]).
#![forbid(unsafe_code)]

pub mod admin;
mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod grpc;
pub mod healthcheck;
pub mod limit;
pub mod require_tls;
pub mod shutdown;
pub mod validate;

pub use app::{App, Host, relay, run_relay};
pub use config::{Config, HostConfig, ServiceDefaults};
pub use tokio_util::sync::CancellationToken;

/// Arms the fault points named in `FAILPOINTS` (`relay-lane=1*panic`,
/// `relay-after-confirm=return`, `consumer-after-commit=return`): only in
/// builds with the `failpoints` feature, which only the tests turn on, so a
/// released binary ignores the variable. Call it once, at the start of a
/// process.
pub fn arm_fault_points() {
    #[cfg(feature = "failpoints")]
    std::mem::forget(fail::FailScenario::setup());
}

/// The version of every service binary (the workspace's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A service the host can run.
pub trait Service: Send + Sync + Sized + 'static {
    /// The settings the service reads besides the host's.
    type Config: clap::Args + clap::FromArgMatches + Clone + std::fmt::Debug + Send + Sync + 'static;

    /// The binary's name, the `app_id` of its events and the `service.name`
    /// of its traces (`user-service`).
    const NAME: &'static str;

    /// One line on what the service does, for `--help`.
    const ABOUT: &'static str;

    /// Its migrations, applied at start-up.
    const MIGRATIONS: diesel_migrations::EmbeddedMigrations;

    /// The defaults that differ between services (its database, its ports).
    const DEFAULTS: ServiceDefaults;

    /// The exchange its outbox relay publishes to.
    fn events_exchange(config: &Self::Config) -> &str;

    /// Adds the service's gRPC services and background tasks to `host`.
    fn start(config: &Self::Config, host: &mut Host) -> anyhow::Result<()>;

    /// What roles other than the service's own may do in its database,
    /// granted by its migrator at every start (see
    /// [`shop_database::connect_granting`]). None by default.
    fn database_grants(config: &Self::Config) -> Vec<shop_database::Grant> {
        let _ = config;
        Vec::new()
    }

    /// The checks of the service's own settings that span several of them
    /// or that serving needs (a consumer's trusted keys): one line naming
    /// the variable when one fails. Run before serving starts.
    fn validate(config: &Self::Config) -> Result<(), String> {
        let _ = config;
        Ok(())
    }
}
