//! `spawn_app()`: the order service in process on port 0, consuming this
//! test's user exchange.

use std::net::SocketAddr;
use std::time::Duration;

use diesel::{ExpressionMethods as _, QueryDsl as _};
use diesel_async::RunQueryDsl as _;
use order_service::app::MIGRATIONS;
use order_service::schema::known_users;
use order_service::{Application, Config};
use shop_contracts::Event;
use shop_contracts::order as pb;
use shop_contracts::order::order_service_client::OrderServiceClient;
use shop_contracts::user::UserCreated;
use shop_testkit::{AuthChannel, Running, TestBroker, TestDatabase, TestKeys, TestPublisher};
use tonic::transport::Channel;
use uuid::Uuid;

pub const WAIT: Duration = Duration::from_secs(15);

/// Settings for a service over `db` and this test's exchanges and queues,
/// accepting tokens of the test process's keys ([`TestKeys::shared`]).
pub fn settings(db: &TestDatabase, broker: &TestBroker) -> Config {
    let mut config = Config::defaults();
    config.host.grpc.auth = TestKeys::shared().auth_config();
    config.host.database = db.config();
    config.host.amqp = broker.config();
    config.host.grpc.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.host.admin_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.host.relay.poll_interval = Duration::from_millis(200);
    config.host.shutdown_grace = Duration::from_secs(5);
    config.service.events_exchange = broker.exchange("order.events");
    config.service.user_events_exchange = broker.exchange("user.events");
    config.service.user_events_queue = broker.queue("order-service.user-events");
    config.service.consumer.retry_delays = vec![Duration::from_millis(200), Duration::from_millis(400)];
    config.service.consumer.max_attempts = 3;
    // Every application recorded, for the tests to count.
    config.service.consumer.ledger = true;
    config.host.relay.signing = shop_messaging::signing::SigningConfig::of(shop_testkit::keys::signing_key());
    config.service.user_events_keys = Some(shop_testkit::keys::trusted_keys());
    config
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// Calls with a service token of every permission.
    pub client: OrderServiceClient<AuthChannel>,
    pub settings: Config,
    pub publisher: TestPublisher,
    pub running: Running,
    pub pool: shop_database::Pool,
    pub broker: TestBroker,
    pub db: TestDatabase,
}

pub async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// The service, started, its consumer connected (so its queue exists and
/// user events published from now on reach it).
pub async fn spawn_app() -> TestApp {
    let app = spawn_app_with(|_| {}).await;
    app.wait_for_consumer().await;
    app
}

/// The service, started with adjusted settings; not waited for.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
    shop_testkit::init_test_log();
    let db = TestDatabase::create(
        MIGRATIONS,
        std::path::Path::new(order_service::app::MIGRATIONS_DIR),
    )
    .await
    .unwrap();
    let broker = TestBroker::new();
    let mut settings = settings(&db, &broker);
    adjust(&mut settings);
    broker.track_topology(&settings.service.consumer().topology());
    let publisher = TestPublisher::connect(&settings.service.user_events_exchange)
        .await
        .unwrap();
    let app = Application::build(settings.clone()).await.unwrap();
    let addr = app.local_addr();
    let admin = app.admin_addr();
    let pool = app.pool().clone();
    let running = Running::spawn(|shutdown| app.run(shutdown));
    let client = OrderServiceClient::new(shop_testkit::auth::with_token(
        channel(addr).await,
        &TestKeys::shared().service_token(),
    ));
    TestApp {
        addr,
        admin,
        client,
        settings,
        publisher,
        running,
        pool,
        broker,
        db,
    }
}

/// What the projection holds about a user (all it holds: no email, no
/// name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownUser {
    pub version: i64,
    pub deleted: bool,
}

impl TestApp {
    /// Waits until the consumer serves (its queue declared and bound).
    pub async fn wait_for_consumer(&self) {
        shop_testkit::eventually("the order service's consumer to serve", WAIT, || async {
            shop_host::healthcheck::check_at(self.addr, order_service::app::CONSUMER_HEALTH)
                .await
                .ok()
        })
        .await;
    }

    pub async fn publish_user_event<E: Event>(&self, event: &E) -> Uuid {
        let id = Uuid::now_v7();
        self.publish_user_event_with_id(event, id).await;
        id
    }

    pub async fn publish_user_event_with_id<E: Event>(&self, event: &E, id: Uuid) {
        self.publisher
            .publish(&self.settings.service.user_events_exchange, event, id)
            .await
            .unwrap();
    }

    pub async fn known_user(&self, user_id: Uuid) -> Option<KnownUser> {
        let mut conn = self.pool.get().await.unwrap();
        known_users::table
            .find(user_id)
            .select((known_users::version, known_users::deleted))
            .first::<(i64, bool)>(&mut conn)
            .await
            .ok()
            .map(|(version, deleted)| KnownUser { version, deleted })
    }

    /// Waits until the projection holds `user_id` at `version`.
    pub async fn wait_for_user_version(&self, user_id: Uuid, version: i64) -> KnownUser {
        shop_testkit::eventually(&format!("user {user_id} at version {version}"), WAIT, || async {
            self.known_user(user_id)
                .await
                .filter(|user| user.version == version)
        })
        .await
    }

    /// A user the projection knows (published `user.created` and waited).
    pub async fn known_user_id(&self) -> Uuid {
        let id = Uuid::now_v7();
        self.publish_user_event(&UserCreated {
            user_id: id.to_string(),
            version: 1,
            email: format!("{id}@example.com"),
            name: "Buyer".to_owned(),
            occurred_at: None,
        })
        .await;
        self.wait_for_user_version(id, 1).await;
        id
    }

    pub async fn create_order(&self, user_id: Uuid, items: &[(&str, i32)]) -> pb::Order {
        self.client
            .clone()
            .create_order(create_request(user_id, items))
            .await
            .unwrap()
            .into_inner()
            .order
            .unwrap()
    }

    /// (event type, aggregate id, version) of every outbox row, oldest first.
    pub async fn outbox(&self) -> Vec<(String, String, i64)> {
        use shop_outbox::schema::outbox::dsl;
        let mut conn = self.pool.get().await.unwrap();
        dsl::outbox
            .order(dsl::seq.asc())
            .select((dsl::event_type, dsl::aggregate_id, dsl::aggregate_version))
            .load(&mut conn)
            .await
            .unwrap()
    }

    /// The aggregates with parked events (ahead of their next version).
    pub async fn held(&self) -> Vec<shop_messaging::sequence::Held> {
        let mut conn = self.pool.get().await.unwrap();
        shop_messaging::sequence::held(&mut conn, &self.settings.service.user_events_queue)
            .await
            .unwrap()
    }

    /// Waits until `user`'s events at `versions` are parked.
    pub async fn wait_for_parked(&self, user: Uuid, versions: &[i64]) {
        shop_testkit::eventually(&format!("user {user} parked at {versions:?}"), WAIT, || async {
            let held = self.held().await;
            let parked = held.iter().find(|held| held.aggregate.id == user.to_string())?;
            let parked: Vec<i64> = parked.parked.iter().map(|p| p.version).collect();
            (parked == versions).then_some(())
        })
        .await;
    }

    /// Stops the service (gRPC, relay, consumer), within its grace period.
    pub async fn stop(&mut self) {
        self.running.stop().await.unwrap();
    }

    /// Outbox rows not yet marked published.
    pub async fn unpublished(&self) -> i64 {
        use shop_outbox::schema::outbox::dsl;
        let mut conn = self.pool.get().await.unwrap();
        dsl::outbox
            .filter(dsl::published_at.is_null())
            .count()
            .get_result(&mut conn)
            .await
            .unwrap()
    }

    /// How many times the consumer handed `event_id` to the projection, in
    /// committed transactions (its ledger).
    pub async fn applications_of(&self, event_id: Uuid) -> i64 {
        let Ok(mut conn) = self.pool.get().await else {
            return 0;
        };
        diesel::sql_query("SELECT count(*) AS n FROM inbox_ledger WHERE consumer = $1 AND event_id = $2")
            .bind::<diesel::sql_types::Text, _>(&self.settings.service.user_events_queue)
            .bind::<diesel::sql_types::Uuid, _>(event_id)
            .get_result::<Count>(&mut conn)
            .await
            .map_or(0, |count| count.n)
    }

    /// `consumer_events_total{outcome}` of this test's queue (0 before the
    /// first one): how many events the consumer handed to the projection
    /// (`applied`) or skipped as already applied (`duplicate`).
    pub fn consumer_events(&self, outcome: &str) -> u64 {
        let metrics = shop_host::admin::metrics_handle().unwrap().render();
        shop_testkit::metric(
            &metrics,
            "consumer_events_total",
            &[
                ("queue", self.settings.service.user_events_queue.as_str()),
                ("outcome", outcome),
            ],
        )
        .map_or(0, |value| value as u64)
    }

    /// How many applications the consumer made (its ledger).
    pub async fn applications(&self) -> i64 {
        let mut conn = self.pool.get().await.unwrap();
        diesel::sql_query("SELECT count(*) AS n FROM inbox_ledger WHERE consumer = $1")
            .bind::<diesel::sql_types::Text, _>(&self.settings.service.user_events_queue)
            .get_result::<Count>(&mut conn)
            .await
            .unwrap()
            .n
    }
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

pub fn create_request(user_id: Uuid, items: &[(&str, i32)]) -> pb::CreateOrderRequest {
    pb::CreateOrderRequest {
        user_id: user_id.to_string(),
        items: items
            .iter()
            .map(|(product_id, quantity)| pb::OrderItem {
                product_id: (*product_id).to_owned(),
                quantity: *quantity,
            })
            .collect(),
        request_id: String::new(),
    }
}

pub use shop_testkit::violated_fields;
