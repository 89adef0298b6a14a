//! `spawn_app()`: the service in process on port 0, with typed clients.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use diesel::{ExpressionMethods as _, QueryDsl as _};
use diesel_async::RunQueryDsl as _;
use shop_contracts::user as pb;
use shop_contracts::user::user_service_client::UserServiceClient;
use shop_testkit::{AuthChannel, Running, TestBroker, TestDatabase, TestKeys};
use user_service::app::MIGRATIONS;
use user_service::{Application, Config};

pub fn migrations_dir() -> &'static Path {
    std::path::Path::new(user_service::app::MIGRATIONS_DIR)
}

pub async fn test_database() -> TestDatabase {
    TestDatabase::create(MIGRATIONS, migrations_dir())
        .await
        .expect("test database")
}

/// Settings for a service over `db`, publishing to this test's exchange,
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
    config.service.events_exchange = broker.exchange("user.events");
    config.host.relay.signing = shop_messaging::signing::SigningConfig::of(shop_testkit::keys::signing_key());
    config
}

/// A relay over the app's outbox, run by the test.
pub fn relay(app: &TestApp) -> shop_outbox::Relay {
    relay_with_batch(app, 1000)
}

/// A relay over the app's outbox publishing batches of `batch_size`.
pub fn relay_with_batch(app: &TestApp, batch_size: i64) -> shop_outbox::Relay {
    let mut settings = settings(&app.db, &app.broker);
    settings.host.relay.batch_size = batch_size;
    shop_host::relay(&settings, app.pool.clone()).expect("the test settings sign")
}

pub struct TestApp {
    pub addr: SocketAddr,
    /// Calls with a service token of every permission.
    pub client: UserServiceClient<AuthChannel>,
    pub exchange: String,
    pub running: Running,
    pub pool: shop_database::Pool,
    // Dropped last: the service must stop before its database goes.
    pub broker: TestBroker,
    pub db: TestDatabase,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
    shop_testkit::init_test_log();
    let db = test_database().await;
    let broker = TestBroker::new();
    let mut settings = settings(&db, &broker);
    adjust(&mut settings);
    let exchange = settings.service.events_exchange.clone();
    let app = Application::build(settings).await.expect("application builds");
    let addr = app.local_addr();
    let pool = app.pool().clone();
    let running = Running::spawn(|shutdown| app.run(shutdown));
    let client = UserServiceClient::new(shop_testkit::auth::with_token(
        channel(addr).await,
        &TestKeys::shared().service_token(),
    ));
    TestApp {
        addr,
        client,
        exchange,
        running,
        pool,
        broker,
        db,
    }
}

/// A plaintext channel to `addr`, connected.
pub async fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("an endpoint")
        .connect()
        .await
        .expect("client connects")
}

/// A client of `addr` calling with `token`.
pub async fn client_with_token(addr: SocketAddr, token: &str) -> UserServiceClient<AuthChannel> {
    UserServiceClient::new(shop_testkit::auth::with_token(channel(addr).await, token))
}

impl TestApp {
    pub async fn create_user(&self, email: &str, name: &str) -> pb::User {
        self.client
            .clone()
            .create_user(pb::CreateUserRequest {
                email: email.to_owned(),
                name: name.to_owned(),
                request_id: String::new(),
            })
            .await
            .expect("create user")
            .into_inner()
            .user
            .expect("user in response")
    }

    /// Rows in the outbox, oldest first: (event type, aggregate id, version).
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

    /// Outbox rows not yet published. Tests that end the database's
    /// sessions also end the pool's idle ones: a query that meets such a
    /// corpse (which the pool then drops) is tried again.
    pub async fn unpublished(&self) -> i64 {
        use shop_outbox::schema::outbox::dsl;
        let mut attempts = 0;
        loop {
            let mut conn = self.pool.get().await.unwrap();
            match dsl::outbox
                .filter(dsl::published_at.is_null())
                .count()
                .get_result(&mut conn)
                .await
            {
                Ok(count) => return count,
                Err(error) if attempts < 5 => {
                    attempts += 1;
                    tracing::debug!(%error, "counting unpublished rows again");
                }
                Err(error) => panic!("counting unpublished rows: {error}"),
            }
        }
    }

    pub async fn user_count(&self) -> i64 {
        use user_service::schema::users::dsl;
        let mut conn = self.pool.get().await.unwrap();
        dsl::users.count().get_result(&mut conn).await.unwrap()
    }
}

pub use shop_testkit::violated_fields;
