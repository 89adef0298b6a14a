//! Both services in process, wired to each other through this test's
//! exchanges: the user service publishes to `<prefix>.user.events`, which
//! the order service consumes.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use shop_contracts::order::order_service_client::OrderServiceClient;
use shop_contracts::user::user_service_client::UserServiceClient;
use shop_testkit::{AuthChannel, Running, TestBroker, TestDatabase, TestKeys};
use tonic::transport::Channel;

#[allow(dead_code)] // not every test binary waits
pub const WAIT: Duration = Duration::from_secs(20);

fn migrations(service: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migrations")
        .join(service)
}

pub struct System {
    pub user_addr: SocketAddr,
    pub order_addr: SocketAddr,
    /// Call with a service token of every permission.
    pub users: UserServiceClient<AuthChannel>,
    pub orders: OrderServiceClient<AuthChannel>,
    pub user_settings: user_service::Config,
    pub order_settings: order_service::Config,
    /// The order service's admin address (`/metrics`).
    pub order_admin: SocketAddr,
    // Dropped in this order: the services stop before their names and
    // databases go.
    _user_service: Running,
    _order_service: Running,
    pub broker: TestBroker,
    _user_db: TestDatabase,
    _order_db: TestDatabase,
}

pub async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A fresh, migrated database for each service: the user service's, the
/// order service's.
pub async fn databases() -> (TestDatabase, TestDatabase) {
    let users = TestDatabase::create(
        user_service::app::MIGRATIONS,
        Path::new(user_service::app::MIGRATIONS_DIR),
    );
    let orders = TestDatabase::create(
        order_service::app::MIGRATIONS,
        Path::new(order_service::app::MIGRATIONS_DIR),
    );
    let (users, orders) = tokio::join!(users, orders);
    (users.unwrap(), orders.unwrap())
}

/// Both services; `user_relay` says whether the user service publishes its
/// outbox (off: the test runs the relay itself when it wants the events to
/// flow).
pub async fn start(user_relay: bool) -> System {
    start_on(None, user_relay).await
}

/// [`start`] against the broker at `amqp_url` (a private node of the test's
/// own), or the shared one.
pub async fn start_on(amqp_url: Option<String>, user_relay: bool) -> System {
    start_with(Options {
        amqp: amqp_url.map(shop_messaging::AmqpConfig::new),
        user_relay,
        ..Options::default()
    })
    .await
}

/// How [`start_with`] runs the services; the defaults are [`start`]'s.
#[derive(Default)]
pub struct Options {
    /// The broker of both services (else the shared one, as the test
    /// identity).
    pub amqp: Option<shop_messaging::AmqpConfig>,
    /// The broker settings of the order service, when it connects as
    /// another user than the user service.
    pub order_amqp: Option<shop_messaging::AmqpConfig>,
    /// Whether the user service runs its relay.
    pub user_relay: bool,
    /// The services' databases, migrated by the services themselves (as
    /// `DATABASE_MIGRATION_URL` says), with their settings: else databases
    /// copied from the migrated templates, reached as the test identity.
    pub databases: Option<[(TestDatabase, shop_database::DatabaseConfig); 2]>,
    /// The names of the event exchanges and the consumer group as
    /// deployed (`user.events`, …), for a broker of the test's own:
    /// otherwise this test's prefixed names.
    pub deployed_names: bool,
    /// The role the order service grants the dead-letter commands.
    pub dlq_database_role: Option<String>,
    /// Changes to the order service's settings, made last.
    pub adjust_order: Option<AdjustSettings<order_service::Config>>,
}

/// A change to a service's settings.
pub type AdjustSettings<C> = Box<dyn FnOnce(&mut C) + Send>;

/// Both services as `options` say.
pub async fn start_with(options: Options) -> System {
    shop_testkit::init_test_log();
    let broker = TestBroker::new();
    let [(user_db, user_database), (order_db, order_database)] = match options.databases {
        Some(databases) => databases,
        None => {
            let (user_db, order_db) = databases().await;
            let (user, order) = (user_db.config(), order_db.config());
            [(user_db, user), (order_db, order)]
        }
    };
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    let amqp = options.amqp.unwrap_or_else(|| broker.config());
    let order_amqp = options.order_amqp.unwrap_or_else(|| amqp.clone());
    let named = |base: &str| {
        if options.deployed_names {
            base.to_owned()
        } else {
            broker.exchange(base)
        }
    };

    let mut user_settings = user_service::Config::defaults();
    user_settings.host.grpc.auth = TestKeys::shared().auth_config();
    user_settings.host.database = user_database;
    user_settings.host.amqp = amqp.clone();
    user_settings.host.grpc.addr = any_port;
    user_settings.host.admin_addr = any_port;
    user_settings.host.relay_enabled = options.user_relay;
    user_settings.host.relay.poll_interval = Duration::from_millis(200);
    user_settings.host.shutdown_grace = Duration::from_secs(5);
    // Declared now: the order service's consumer only looks its producer's
    // exchange up, and the user service's relay may be off. (A broker of
    // the test's own with the deployed names has it from its definitions.)
    user_settings.service.events_exchange = if options.deployed_names {
        "user.events".to_owned()
    } else {
        broker.event_exchange(&amqp, "user.events").await
    };
    let signing = shop_messaging::signing::SigningConfig::of(shop_testkit::keys::signing_key());
    user_settings.host.relay.signing = signing.clone();
    let mut order_settings = order_service::Config::defaults();
    order_settings.host.grpc.auth = TestKeys::shared().auth_config();
    order_settings.host.database = order_database;
    order_settings.host.amqp = order_amqp;
    order_settings.host.grpc.addr = any_port;
    order_settings.host.admin_addr = any_port;
    order_settings.host.relay.poll_interval = Duration::from_millis(200);
    order_settings.host.shutdown_grace = Duration::from_secs(5);
    order_settings.service.events_exchange = named("order.events");
    order_settings.service.user_events_exchange = user_settings.service.events_exchange.clone();
    order_settings.service.user_events_queue = if options.deployed_names {
        "order-service.user-events".to_owned()
    } else {
        broker.queue("order-service.user-events")
    };
    order_settings.service.consumer.retry_delays = vec![Duration::from_millis(200)];
    order_settings.service.consumer.dlq_database_role = options.dlq_database_role;
    order_settings.host.relay.signing = signing;
    order_settings.service.user_events_keys = Some(shop_testkit::keys::trusted_keys());
    if let Some(adjust) = options.adjust_order {
        adjust(&mut order_settings);
    }
    if !options.deployed_names {
        broker.track_topology(&order_settings.service.consumer().topology());
    }

    let user_app = user_service::Application::build(user_settings.clone())
        .await
        .unwrap();
    let order_app = order_service::Application::build(order_settings.clone())
        .await
        .unwrap();
    let (user_addr, order_addr) = (user_app.local_addr(), order_app.local_addr());
    let order_admin = order_app.admin_addr();
    let user_service = Running::spawn(|shutdown| user_app.run(shutdown));
    let order_service = Running::spawn(|shutdown| order_app.run(shutdown));
    let system = System {
        user_addr,
        order_addr,
        users: UserServiceClient::new(with_service_token(channel(user_addr).await)),
        orders: OrderServiceClient::new(with_service_token(channel(order_addr).await)),
        user_settings,
        order_settings,
        order_admin,
        _user_service: user_service,
        _order_service: order_service,
        broker,
        _user_db: user_db,
        _order_db: order_db,
    };
    system.wait_until_serving(order_addr).await;
    system
}

/// `channel` calling with a service token of every permission.
pub fn with_service_token(channel: Channel) -> AuthChannel {
    shop_testkit::auth::with_token(channel, &TestKeys::shared().service_token())
}

impl System {
    /// Waits until the order service's consumer is connected (its queue
    /// declared and bound).
    async fn wait_until_serving(&self, addr: SocketAddr) {
        shop_testkit::eventually("the order service's consumer to serve", WAIT, || async move {
            shop_host::healthcheck::check_at(addr, order_service::app::CONSUMER_HEALTH)
                .await
                .ok()
        })
        .await;
    }

    /// The order service's database, for reading its projection.
    pub fn order_db_url(&self) -> &str {
        self._order_db.url()
    }

    /// The user service's database, as the test identity.
    pub fn user_db_url(&self) -> &str {
        self._user_db.url()
    }

    /// The order service's database.
    pub fn order_database(&self) -> &TestDatabase {
        &self._order_db
    }

    /// The user service's database.
    pub fn user_database(&self) -> &TestDatabase {
        &self._user_db
    }

    /// Stops the order service (its pool closed with it).
    pub async fn stop_order_service(&mut self) {
        self._order_service.stop().await.unwrap();
    }

    /// Starts the order service again, with `settings`, on new ports;
    /// returns once its consumer serves.
    pub async fn start_order_service(&mut self, settings: order_service::Config) {
        let app = order_service::Application::build(settings.clone()).await.unwrap();
        (self.order_addr, self.order_admin) = (app.local_addr(), app.admin_addr());
        self._order_service = Running::spawn(|shutdown| app.run(shutdown));
        self.orders = OrderServiceClient::new(with_service_token(channel(self.order_addr).await));
        self.order_settings = settings;
        self.wait_until_serving(self.order_addr).await;
    }

    /// Stops the user service (its pool and relay with it).
    pub async fn stop_user_service(&mut self) {
        self._user_service.stop().await.unwrap();
    }

    /// Starts the user service again, with its settings, on a new port.
    pub async fn start_user_service(&mut self) {
        let app = user_service::Application::build(self.user_settings.clone())
            .await
            .unwrap();
        self.user_addr = app.local_addr();
        self._user_service = Running::spawn(|shutdown| app.run(shutdown));
        self.users = UserServiceClient::new(with_service_token(channel(self.user_addr).await));
    }

    /// The user service's outbox relay, run by the test.
    pub fn user_relay(&self) -> Running {
        let pool = shop_database::pool(&self.user_settings.host.database).unwrap();
        let relay = shop_host::relay(&self.user_settings, pool).unwrap();
        Running::spawn(|shutdown| relay.run(shutdown))
    }
}
