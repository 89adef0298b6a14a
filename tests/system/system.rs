//! Both services in process, wired to each other through this test's
//! exchanges: the user service publishes to `<prefix>.user.events`, which
//! the order service consumes.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use shop_contracts::order::order_service_client::OrderServiceClient;
use shop_contracts::user::user_service_client::UserServiceClient;
use shop_testkit::{Running, TestBroker, TestDatabase};
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
    pub users: UserServiceClient<Channel>,
    pub orders: OrderServiceClient<Channel>,
    pub user_settings: user_service::Config,
    pub order_settings: order_service::Config,
    // Dropped in this order: the services stop before their names and
    // databases go.
    _user_service: Running,
    _order_service: Running,
    pub broker: TestBroker,
    _user_db: TestDatabase,
    _order_db: TestDatabase,
}

async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
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
    shop_testkit::init_test_log();
    let broker = TestBroker::new();
    let user_db = TestDatabase::create(
        user_service::app::MIGRATIONS,
        Path::new(user_service::app::MIGRATIONS_DIR),
    )
    .await
    .unwrap();
    let order_db = TestDatabase::create(
        order_service::app::MIGRATIONS,
        Path::new(order_service::app::MIGRATIONS_DIR),
    )
    .await
    .unwrap();
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));

    let mut user_settings = user_service::Config::defaults();
    user_settings.host.database = user_db.config();
    let amqp = amqp_url.map_or_else(|| broker.config(), shop_messaging::AmqpConfig::new);
    user_settings.host.amqp = amqp.clone();
    user_settings.host.grpc.addr = any_port;
    user_settings.host.admin_addr = any_port;
    user_settings.host.relay_enabled = user_relay;
    user_settings.host.relay.poll_interval = Duration::from_millis(200);
    user_settings.host.shutdown_grace = Duration::from_secs(5);
    user_settings.service.events_exchange = broker.exchange("user.events");
    let signing = shop_messaging::signing::SigningConfig::of(shop_testkit::keys::signing_key());
    user_settings.host.relay.signing = signing.clone();
    let mut order_settings = order_service::Config::defaults();
    order_settings.host.database = order_db.config();
    order_settings.host.amqp = amqp;
    order_settings.host.grpc.addr = any_port;
    order_settings.host.admin_addr = any_port;
    order_settings.host.relay.poll_interval = Duration::from_millis(200);
    order_settings.host.shutdown_grace = Duration::from_secs(5);
    order_settings.service.events_exchange = broker.exchange("order.events");
    order_settings.service.user_events_exchange = user_settings.service.events_exchange.clone();
    order_settings.service.user_events_queue = broker.queue("order-service.user-events");
    order_settings.service.consumer.retry_delays = vec![Duration::from_millis(200)];
    order_settings.host.relay.signing = signing;
    order_settings.service.user_events_keys = Some(shop_testkit::keys::trusted_keys());
    broker.track_topology(&order_settings.service.consumer().topology());

    let user_app = user_service::Application::build(user_settings.clone())
        .await
        .unwrap();
    let order_app = order_service::Application::build(order_settings.clone())
        .await
        .unwrap();
    let (user_addr, order_addr) = (user_app.local_addr(), order_app.local_addr());
    let user_service = Running::spawn(|shutdown| user_app.run(shutdown));
    let order_service = Running::spawn(|shutdown| order_app.run(shutdown));
    let system = System {
        user_addr,
        order_addr,
        users: UserServiceClient::new(channel(user_addr).await),
        orders: OrderServiceClient::new(channel(order_addr).await),
        user_settings,
        order_settings,
        _user_service: user_service,
        _order_service: order_service,
        broker,
        _user_db: user_db,
        _order_db: order_db,
    };
    system.wait_until_serving(order_addr).await;
    system
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

    /// The user service's outbox relay, run by the test.
    pub fn user_relay(&self) -> Running {
        let pool = shop_database::pool(&self.user_settings.host.database).unwrap();
        let relay = shop_host::relay(&self.user_settings, pool).unwrap();
        Running::spawn(|shutdown| relay.run(shutdown))
    }
}
