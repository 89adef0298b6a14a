//! The benchmark's own databases, exchanges and queues, and the services it
//! runs as child processes.

use std::time::Duration;

use shop_database::{DatabaseConfig, Pool};
use shop_messaging::AmqpConfig;
use shop_messaging::consumer::ConsumerConfig;
use shop_messaging::signing::{SigningKey, TrustedKeys};
use shop_outbox::RelayConfig;
use shop_testkit::ServiceProcess;
use shop_testkit::TestKeys;
use shop_testkit::keys::KeyFiles;

/// Everything a run creates, with unique names.
pub(crate) struct Bench {
    admin_url: String,
    pub(crate) user_db: String,
    pub(crate) order_db: String,
    pub(crate) amqp_url: String,
    pub(crate) user_exchange: String,
    pub(crate) order_exchange: String,
    pub(crate) consumer_queue: String,
    pub(crate) user_pool: Pool,
    pub(crate) order_pool: Pool,
    /// The event signing key's files, for the services run as processes.
    keys: KeyFiles,
}

fn with_database(url: &str, name: &str) -> String {
    let base = url.rsplit_once('/').map_or(url, |(base, _)| base);
    format!("{base}/{name}")
}

/// A pool of 8 on `url`.
fn settings(url: &str) -> DatabaseConfig {
    let mut config = DatabaseConfig::new(url);
    config.pool_size = 8;
    config.acquire_timeout = Duration::from_secs(30);
    config
}

/// A pool of 8 on each database, as one instance of a service has; migrates
/// them (a no-op after the first).
async fn pools(user_db: &str, order_db: &str) -> anyhow::Result<(Pool, Pool)> {
    let user_pool = shop_database::connect(&settings(user_db), user_service::app::MIGRATIONS).await?;
    let order_pool = shop_database::connect(&settings(order_db), order_service::app::MIGRATIONS).await?;
    Ok((user_pool, order_pool))
}

impl Bench {
    /// Creates and migrates two databases and picks the broker names.
    pub(crate) async fn prepare(options: &crate::Options) -> anyhow::Result<Self> {
        let admin_url = options.database_url.clone();
        let amqp_url = options.amqp_url.clone();
        let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let user_db = with_database(&admin_url, &format!("bench_users_{id}"));
        let order_db = with_database(&admin_url, &format!("bench_orders_{id}"));
        let (user_pool, order_pool) = pools(&user_db, &order_db).await?;
        let user_exchange = format!("bench-{id}.user.events");
        // As the broker definitions do in a deployment: the consumer only
        // looks its producer's exchange up, and some stages start it first.
        let connection =
            shop_messaging::connection::connect(&AmqpConfig::new(amqp_url.clone()), "bench").await?;
        shop_messaging::topology::declare_event_exchange(&connection.create_channel().await?, &user_exchange)
            .await?;
        let _ = connection.close(200, "declared".into()).await;
        Ok(Self {
            admin_url,
            user_db,
            order_db,
            amqp_url,
            keys: KeyFiles::write()?,
            user_exchange,
            order_exchange: format!("bench-{id}.order.events"),
            consumer_queue: format!("bench-{id}.order-service.user-events"),
            user_pool,
            order_pool,
        })
    }

    /// The user service's database, as the relay's `LISTEN` session needs it.
    pub(crate) fn user_database(&self) -> DatabaseConfig {
        settings(&self.user_db)
    }

    /// Pools of another instance on the same databases.
    pub(crate) async fn new_pools(&self) -> anyhow::Result<(Pool, Pool)> {
        pools(&self.user_db, &self.order_db).await
    }

    pub(crate) fn amqp(&self) -> AmqpConfig {
        AmqpConfig::new(self.amqp_url.clone())
    }

    /// The relay's configuration as the user service reads it (so
    /// `RELAY_BATCH_SIZE` and `RELAY_LANES` apply), publishing to the
    /// benchmark's exchange.
    pub(crate) fn relay_config(&self) -> anyhow::Result<RelayConfig> {
        let mut config = user_service::Config::from_env_and_flags(Vec::<String>::new())?
            .host
            .relay;
        config.exchange = self.user_exchange.clone();
        Ok(config)
    }

    pub(crate) fn consumer_config(&self, prefetch: u16) -> ConsumerConfig {
        let mut config = ConsumerConfig::new(self.user_exchange.clone(), self.consumer_queue.clone());
        config.prefetch = prefetch;
        config.trusted_keys = self.trusted_keys();
        config
    }

    /// The key the benchmark's relays sign with (made for the run).
    pub(crate) fn signing_key(&self) -> SigningKey {
        shop_testkit::keys::signing_key().clone()
    }

    /// What the benchmark's consumers trust: [`Self::signing_key`].
    pub(crate) fn trusted_keys(&self) -> TrustedKeys {
        shop_testkit::keys::trusted_keys()
    }

    /// The user service as a child process, with authentication on (bearer
    /// tokens of the benchmark's keys, [`with_token`]); `relay` says whether
    /// it runs its relay.
    pub(crate) async fn spawn_user_service(&self, relay: bool) -> anyhow::Result<ServiceProcess> {
        self.spawn_user_service_with(relay, Authentication::Jwt).await
    }

    /// [`Bench::spawn_user_service`], authenticating callers as `auth` says.
    pub(crate) async fn spawn_user_service_with(
        &self,
        relay: bool,
        auth: Authentication,
    ) -> anyhow::Result<ServiceProcess> {
        let auth = match auth {
            Authentication::Jwt => TestKeys::shared().env(),
            // Only to measure what authentication costs, beside the same
            // service with it on.
            Authentication::None => vec![("GRPC_AUTH", "none".to_owned())],
        };
        ServiceProcess::start_with_args(
            &std::env::current_exe()?.to_string_lossy(),
            &["serve", "user"],
            &[
                ("DATABASE_URL", self.user_db.clone()),
                ("AMQP_URL", self.amqp_url.clone()),
                ("USER_EVENTS_EXCHANGE", self.user_exchange.clone()),
                ("RELAY_ENABLED", relay.to_string()),
                ("DATABASE_POOL_SIZE", crate::stages::SERVICE_POOL.to_string()),
                ("RUST_LOG", "info".to_owned()),
            ]
            .into_iter()
            .chain(auth)
            .chain(self.keys.envs())
            .collect::<Vec<_>>(),
        )
        .await
    }

    /// The gRPC server that does nothing ([`crate::noop`]) as a child
    /// process.
    pub(crate) async fn spawn_noop(&self) -> anyhow::Result<ServiceProcess> {
        ServiceProcess::start_with_args(
            &std::env::current_exe()?.to_string_lossy(),
            &["serve", "noop"],
            &self.keys.envs(),
        )
        .await
    }

    /// The order service as a child process, with authentication on.
    pub(crate) async fn spawn_order_service(&self, prefetch: u16) -> anyhow::Result<ServiceProcess> {
        ServiceProcess::start_with_args(
            &std::env::current_exe()?.to_string_lossy(),
            &["serve", "order"],
            &[
                ("DATABASE_URL", self.order_db.clone()),
                ("AMQP_URL", self.amqp_url.clone()),
                ("USER_EVENTS_EXCHANGE", self.user_exchange.clone()),
                ("ORDER_EVENTS_EXCHANGE", self.order_exchange.clone()),
                ("USER_EVENTS_QUEUE", self.consumer_queue.clone()),
                ("CONSUMER_PREFETCH", prefetch.to_string()),
                ("RUST_LOG", "info".to_owned()),
            ]
            .into_iter()
            .chain(TestKeys::shared().env())
            .chain(self.keys.envs())
            .collect::<Vec<_>>(),
        )
        .await
    }

    /// Empties the tables the stages fill.
    pub(crate) async fn reset_tables(&self) -> anyhow::Result<()> {
        use diesel_async::RunQueryDsl as _;
        let mut users = self.user_pool.get().await?;
        diesel::sql_query("TRUNCATE users, create_user_requests, outbox")
            .execute(&mut users)
            .await?;
        let mut orders = self.order_pool.get().await?;
        diesel::sql_query("TRUNCATE known_users, inbox, outbox")
            .execute(&mut orders)
            .await?;
        Ok(())
    }

    /// Drops the databases, exchanges and queues of the run.
    pub(crate) async fn clean_up(&self) {
        self.user_pool.close();
        self.order_pool.close();
        if let Ok((client, connection)) =
            tokio_postgres::connect(&self.admin_url, tokio_postgres::NoTls).await
        {
            tokio::spawn(connection);
            for url in [&self.user_db, &self.order_db] {
                if let Some((_, name)) = url.rsplit_once('/') {
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .await;
                }
            }
        }
        if let Ok(connection) =
            lapin::Connection::connect(&self.amqp_url, lapin::ConnectionProperties::default()).await
        {
            let raw = crate::stages::raw_topology(self, 1);
            let mut queues = self.consumer_config(1).queue_names();
            queues.extend(crate::stages::raw_queues(self));
            queues.extend(raw.queue_names());
            for queue in queues {
                if let Ok(channel) = connection.create_channel().await {
                    let _ = channel
                        .queue_delete(queue.as_str().into(), Default::default())
                        .await;
                }
            }
            let mut exchanges = self.consumer_config(1).topology().exchange_names();
            exchanges.extend(raw.exchange_names());
            exchanges.extend([
                self.user_exchange.clone(),
                self.order_exchange.clone(),
                raw.exchange.clone(),
            ]);
            for exchange in &exchanges {
                if let Ok(channel) = connection.create_channel().await {
                    let _ = channel
                        .exchange_delete(exchange.as_str().into(), Default::default())
                        .await;
                }
            }
            let _ = connection.close(200, "bench done".into()).await;
        }
    }
}

/// How a benchmarked service authenticates its callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Authentication {
    /// Bearer tokens, as deployed.
    Jwt,
    /// `GRPC_AUTH=none`: the baseline of the authentication's cost.
    None,
}

/// `channel` calling with a token of the benchmark's keys (a service with
/// every permission; one token for the whole run, as a client keeps its
/// token until it expires).
pub(crate) fn with_token(channel: tonic::transport::Channel) -> shop_testkit::AuthChannel {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    shop_testkit::auth::with_token(channel, TOKEN.get_or_init(|| TestKeys::shared().service_token()))
}

/// `bench serve user|order`: one service, configured from the environment
/// like its own binary.
pub(crate) async fn serve(service: &str) -> anyhow::Result<()> {
    if service == "noop" {
        return crate::noop::serve().await;
    }
    shop_cli::up::serve(service).await
}
