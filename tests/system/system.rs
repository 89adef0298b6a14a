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
    pub user_settings: user_service::Settings,
    pub order_settings: order_service::Settings,
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

    let mut relay = shop_outbox::RelayConfig::new(broker.exchange("user.events"), "user-service");
    relay.poll_interval = Duration::from_millis(200);
    let user_settings = user_service::Settings {
        database: user_db.settings(),
        amqp: broker.settings(),
        grpc_addr: any_port,
        admin_addr: any_port,
        grpc: shop_bootstrap::grpc::GrpcOptions::default(),
        relay_enabled: user_relay,
        relay: relay.clone(),
        shutdown_grace: Duration::from_secs(5),
    };
    let mut consumer = shop_messaging::consumer::ConsumerConfig::new(
        relay.exchange.clone(),
        broker.queue("order-service.user-events"),
    );
    consumer.retry_delays = vec![Duration::from_millis(200)];
    let mut order_relay = shop_outbox::RelayConfig::new(broker.exchange("order.events"), "order-service");
    order_relay.poll_interval = Duration::from_millis(200);
    let order_settings = order_service::Settings {
        database: order_db.settings(),
        amqp: broker.settings(),
        grpc_addr: any_port,
        admin_addr: any_port,
        grpc: shop_bootstrap::grpc::GrpcOptions::default(),
        relay_enabled: true,
        relay: order_relay,
        consumer,
        shutdown_grace: Duration::from_secs(5),
    };
    for queue in order_settings.consumer.queue_names() {
        broker.track_queue(&queue);
    }

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
    async fn wait_until_serving(&self, addr: SocketAddr) {
        use tonic_health::pb::health_check_response::ServingStatus;
        let health = tonic_health::pb::health_client::HealthClient::new(channel(addr).await);
        shop_testkit::eventually("the order service to serve", WAIT, || {
            let mut health = health.clone();
            async move {
                let request = tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                };
                let status = health.check(request).await.ok()?.into_inner().status;
                (status == ServingStatus::Serving as i32).then_some(())
            }
        })
        .await;
    }

    /// The user service's outbox relay, run by the test.
    pub fn user_relay(&self) -> Running {
        let pool = shop_bootstrap::db::pool(&self.user_settings.database).unwrap();
        let relay = user_service::app::relay(&self.user_settings, pool);
        Running::spawn(|shutdown| relay.run(shutdown))
    }
}
