//! Building and running a service: [`App`] prepares it (database, listeners)
//! and runs the parts every service has around what [`Service::start`] adds
//! to the [`Host`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context as _;
use shop_database::Pool;
use shop_database::retention::Retention;
use shop_outbox::{Relay, Wake};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::admin::DependencyHealth;
use crate::config::{Config, HostConfig};
use crate::shutdown::TaskGroup;
use crate::{Service, grpc};

/// A service ready to run: database created and migrated, gRPC and admin
/// listeners bound (their real addresses known, so tests can ask for port 0).
pub struct App<S: Service> {
    config: Config<S>,
    pool: Pool,
    incoming: TcpIncoming,
    local_addr: SocketAddr,
    admin: tokio::net::TcpListener,
    admin_addr: SocketAddr,
}

impl<S: Service> std::fmt::Debug for App<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("service", &S::NAME)
            .field("local_addr", &self.local_addr)
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

impl<S: Service> App<S> {
    /// Connects to (creating and migrating as needed) the database and binds
    /// the gRPC and admin listeners.
    pub async fn build(config: Config<S>) -> anyhow::Result<Self> {
        let config = config.complete();
        config.host.validate().map_err(|error| anyhow::anyhow!(error))?;
        config
            .validate_for_serving()
            .map_err(|error| anyhow::anyhow!(error))?;
        // Installed before anything records a metric.
        crate::admin::metrics_handle()?;
        let pool = shop_database::connect_granting(
            &config.host.database,
            S::MIGRATIONS,
            &S::database_grants(&config.service),
        )
        .await?;
        let incoming = config.host.grpc.bind()?;
        let local_addr = incoming
            .local_addr()
            .context("the bound gRPC listener has no address")?;
        let admin_addr = config.host.admin_addr;
        let admin = tokio::net::TcpListener::bind(admin_addr)
            .await
            .with_context(|| format!("failed to bind the admin address {admin_addr}"))?;
        let admin_addr = admin.local_addr()?;
        Ok(Self {
            config,
            pool,
            incoming,
            local_addr,
            admin,
            admin_addr,
        })
    }

    /// The address the gRPC server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the admin HTTP port (metrics, health).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The database pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config<S> {
        &self.config
    }

    /// Serves gRPC, runs the relay (unless disabled) and the service's own
    /// tasks until `shutdown` or until one of them ends, then drains within
    /// the grace period.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            config,
            pool,
            incoming,
            local_addr,
            admin,
            admin_addr,
        } = self;
        let health = DependencyHealth::default();
        // What the commands call after their commits, for the relays.
        let wake = Wake::new();
        // The database was reached and migrated a moment ago.
        let (database_ready, database) = watch::channel(true);
        let mut tasks = TaskGroup::new(shutdown.clone());
        tasks.spawn(
            "admin port",
            crate::admin::run(
                admin,
                pool.clone(),
                health.clone(),
                database_ready,
                shutdown.clone(),
            ),
        );
        let mut host = Host {
            config: config.host.clone(),
            pool: pool.clone(),
            routes: RoutesBuilder::default(),
            services: Vec::new(),
            tasks,
            health: health.clone(),
            statuses: Vec::new(),
            retentions: vec![outbox_retention(&config)],
            shutdown: shutdown.clone(),
            wake: wake.clone(),
        };
        S::start(&config.service, &mut host)?;
        let Host {
            routes,
            services,
            mut tasks,
            mut statuses,
            retentions,
            ..
        } = host;
        tasks.spawn(
            "retention",
            shop_database::retention::sweep_forever(
                pool.clone(),
                retentions,
                config.host.retention_interval,
                shutdown.clone(),
            ),
        );
        // The server and its services are ready while what their calls need,
        // the database, is: a broker outage does not take the API away.
        statuses.insert(
            0,
            (
                std::iter::once("").chain(services.iter().copied()).collect(),
                database,
            ),
        );
        // Relays of other processes (replicas, a relay of its own) hear of
        // this process's commits from these announcements.
        if !config.host.relay.notify_interval.is_zero() {
            tasks.spawn(
                "outbox announcements",
                wake.clone()
                    .announce(pool.clone(), config.host.relay.notify_interval, shutdown.clone()),
            );
        }
        if config.host.relay_enabled {
            let relay = relay(&config, pool)?.waking(wake);
            health.follow(
                "rabbitmq (outbox relay)".to_owned(),
                relay.connected(),
                shutdown.clone(),
            );
            tasks.spawn("outbox relay", relay.run(shutdown.clone()));
        }
        tasks.spawn(
            "grpc server",
            serve_grpc(
                routes,
                services,
                statuses,
                incoming,
                config.host.grpc.clone(),
                shutdown,
            ),
        );
        // "user service started": the line a supervisor (and the tests)
        // read the addresses from.
        let name = S::NAME.replace('-', " ");
        tracing::info!(
            service = S::NAME,
            addr = %local_addr,
            admin = %admin_addr,
            relay = config.host.relay_enabled,
            "{name} started"
        );
        let outcome = tasks.run(config.host.shutdown_grace).await;
        tracing::info!(service = S::NAME, "{name} stopped");
        outcome
    }
}

/// The outbox relay of service `S` over `pool`, signing with the key of
/// its settings (an error naming the setting without one).
pub fn relay<S: Service>(config: &Config<S>, pool: Pool) -> anyhow::Result<Relay> {
    let config = config.clone().complete();
    let key = config.host.signing_key().map_err(anyhow::Error::msg)?;
    Ok(Relay::new(
        pool,
        config.host.database,
        config.host.amqp,
        config.host.relay,
        key,
    ))
}

/// Published outbox rows are kept for `OUTBOX_RETENTION`.
fn outbox_retention<S: Service>(config: &Config<S>) -> Retention {
    Retention {
        table: "outbox",
        column: "published_at",
        window: config.host.relay.retention,
        consumer: None,
    }
}

/// Runs only the relay of `S`, for deployments that keep it out of the gRPC
/// processes (`<service> relay`).
pub async fn run_relay<S: Service>(config: Config<S>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = config.complete();
    // Refused before any database work: a relay that could not sign.
    config.host.signing_key().map_err(anyhow::Error::msg)?;
    let pool = shop_database::connect_granting(
        &config.host.database,
        S::MIGRATIONS,
        &S::database_grants(&config.service),
    )
    .await?;
    let mut tasks = TaskGroup::new(shutdown.clone());
    tasks.spawn(
        "retention",
        shop_database::retention::sweep_forever(
            pool.clone(),
            vec![outbox_retention(&config)],
            config.host.retention_interval,
            shutdown.clone(),
        ),
    );
    tasks.spawn("outbox relay", relay(&config, pool)?.run(shutdown));
    tasks.run(config.host.shutdown_grace).await
}

/// What a service adds its parts to in [`Service::start`].
pub struct Host {
    config: HostConfig,
    pool: Pool,
    routes: RoutesBuilder,
    services: Vec<&'static str>,
    tasks: TaskGroup,
    health: DependencyHealth,
    statuses: Vec<(Vec<&'static str>, watch::Receiver<bool>)>,
    retentions: Vec<Retention>,
    shutdown: CancellationToken,
    wake: Wake,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("services", &self.services)
            .finish_non_exhaustive()
    }
}

impl Host {
    /// What every service reads.
    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// The service's database pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// What the service's commands call after a commit that wrote events
    /// ([`Wake::committed`]), so the relays publish them at once.
    pub fn outbox_wake(&self) -> &Wake {
        &self.wake
    }

    /// Cancelled when the service is to stop.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Serves `service` over gRPC (listed by reflection, with a health
    /// status of its own).
    pub fn add_grpc_service<T>(&mut self, service: T)
    where
        T: tower::Service<http::Request<tonic::body::Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        T::Response: axum::response::IntoResponse,
        T::Future: Send + 'static,
    {
        self.services.push(T::NAME);
        self.routes.add_service(service);
    }

    /// Deletes the rows of a table that grows with traffic once they are
    /// older than its window (see [`shop_database::retention`]).
    pub fn retain(&mut self, retention: Retention) {
        self.retentions.push(retention);
    }

    /// Runs `task` until shutdown; if it ends before, the service stops.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.tasks.spawn(name, task);
    }

    /// Shows `dependency` as up or down, following `state`, on `/health` and
    /// in `dependency_up`.
    pub fn report(&self, dependency: impl Into<String>, state: watch::Receiver<bool>) {
        self.health
            .follow(dependency.into(), state, self.shutdown.clone());
    }

    /// Adds the gRPC health status `name` (a name of its own, not a served
    /// service: reflection does not list it), SERVING while `state` is true,
    /// for a part whose state orchestrators or peers wait on separately
    /// from the API's readiness (the order service's consumer).
    pub fn health_status(&mut self, name: &'static str, state: watch::Receiver<bool>) {
        self.statuses.push((vec![name], state));
    }
}

/// The gRPC server with its health statuses: each group of names SERVING
/// while its state says so, and NOT_SERVING from shutdown on.
async fn serve_grpc(
    routes: RoutesBuilder,
    services: Vec<&'static str>,
    statuses: Vec<(Vec<&'static str>, watch::Receiver<bool>)>,
    incoming: TcpIncoming,
    config: grpc::GrpcConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let mut followers = Vec::new();
    for (names, mut state) in statuses {
        let set = {
            let health = health.clone();
            move |up: bool| {
                let health = health.clone();
                let names = names.clone();
                async move {
                    let status = if up {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    for name in names {
                        health.set_service_status(name, status).await;
                    }
                }
            }
        };
        let initial = *state.borrow_and_update();
        set(initial).await;
        let shutdown = shutdown.clone();
        followers.push(tokio::spawn(async move {
            loop {
                let up = *state.borrow_and_update() && !shutdown.is_cancelled();
                set(up).await;
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    changed = state.changed() => if changed.is_err() {
                        // The sender is gone: its last word stands.
                        shutdown.cancelled().await;
                        break;
                    },
                }
            }
            set(false).await;
        }));
    }
    let served = grpc::serve(
        routes.routes(),
        &services,
        health_service,
        incoming,
        &config,
        shutdown.cancelled_owned(),
    )
    .await;
    for follower in followers {
        follower.abort();
    }
    served
}
