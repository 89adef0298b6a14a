//! `shop up` provisions the event signing keys at its first start, in a
//! state directory of its own, and both services run signed with them.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use shop_messaging::signing::TrustedKeys;
use shop_testkit::{ServiceProcess, TestBroker, TestDatabase};

fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// `shop up` as a process, its services on `addrs` (user gRPC, order gRPC).
async fn shop_up(
    state: &Path,
    user_db: &TestDatabase,
    order_db: &TestDatabase,
    broker: &TestBroker,
    addrs: (SocketAddr, SocketAddr),
) -> ServiceProcess {
    let admin = (free_addr(), free_addr());
    ServiceProcess::start_with_args(
        env!("CARGO_BIN_EXE_shop"),
        &["up"],
        &[
            ("SHOP_STATE_DIR", state.display().to_string()),
            ("USER_DATABASE_URL", user_db.url().to_owned()),
            ("ORDER_DATABASE_URL", order_db.url().to_owned()),
            ("USER_GRPC_ADDR", addrs.0.to_string()),
            ("ORDER_GRPC_ADDR", addrs.1.to_string()),
            ("USER_ADMIN_ADDR", admin.0.to_string()),
            ("ORDER_ADMIN_ADDR", admin.1.to_string()),
            ("AMQP_URL", shop_testkit::amqp_url()),
            ("USER_EVENTS_EXCHANGE", broker.exchange("user.events")),
            ("ORDER_EVENTS_EXCHANGE", broker.exchange("order.events")),
            ("USER_EVENTS_QUEUE", broker.queue("order-service.user-events")),
            // Keys from the environment would not do: `shop up` gives each
            // service its own, from its state directory.
            ("EVENT_SIGNING_KEY_FILE", "/nonexistent/key".to_owned()),
            ("USER_EVENTS_KEYS_FILE", "/nonexistent/keys".to_owned()),
            ("RUST_LOG", "info,lapin=off".to_owned()),
        ],
    )
    .await
    .unwrap()
}

/// Creates a user on the user service and waits until the order service
/// takes an order for them (its event signed, verified and applied), with
/// the token `shop up` wrote in `state`.
async fn user_can_order(state: &Path, addrs: (SocketAddr, SocketAddr), email: &str) {
    let token = shop_testkit::eventually("shop up's token", Duration::from_secs(30), || async {
        std::fs::read_to_string(state.join("token")).ok()
    })
    .await;
    let config = |addr: SocketAddr| {
        shop_client::ClientConfig::new(format!("http://{addr}"))
            .with_token(shop_client::SecretString::from(token.trim().to_owned()))
    };
    let users = shop_client::UserClient::connect(config(addrs.0)).unwrap();
    let orders = shop_client::OrderClient::connect(config(addrs.1)).unwrap();
    let user = shop_testkit::eventually("the user service", Duration::from_secs(60), || async {
        users.create_user(email, "Up").await.ok()
    })
    .await;
    shop_testkit::eventually("an order for the new user", Duration::from_secs(30), || async {
        orders.create_order(&user.id, &[("sku-1", 1)]).await.ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shop_up_makes_its_event_keys_at_the_first_start_and_keeps_them() {
    shop_testkit::init_test_log();
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
    let broker = TestBroker::new();
    let mut consumer = shop_messaging::consumer::ConsumerConfig::new(
        broker.exchange("user.events"),
        broker.queue("order-service.user-events"),
    );
    consumer.retry_delays = vec![
        Duration::from_secs(1),
        Duration::from_secs(10),
        Duration::from_secs(60),
    ];
    broker.track_topology(&consumer.topology());
    let state = std::env::temp_dir().join(format!("shop-up-state-{}", uuid::Uuid::new_v4().simple()));
    let addrs = (free_addr(), free_addr());

    let mut up = shop_up(&state, &user_db, &order_db, &broker, addrs).await;
    user_can_order(&state, addrs, "first-start@example.com").await;
    up.terminate().await.unwrap();

    let private = state.join("event-keys/user-service/event-signing.key");
    let made = std::fs::read(&private).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&private).unwrap().permissions().mode() & 0o777,
        0o600,
        "the private key is its owner's alone"
    );
    let public = std::fs::read_to_string(state.join("event-keys/public/user-events.keys")).unwrap();
    let trusted = TrustedKeys::parse(&public).unwrap();
    assert_eq!(trusted.ids().collect::<Vec<_>>(), ["user-service-local"]);
    assert!(state.join("event-keys/order-service/event-signing.key").exists());

    // The second start finds the keys and keeps them.
    let mut up = shop_up(&state, &user_db, &order_db, &broker, addrs).await;
    user_can_order(&state, addrs, "second-start@example.com").await;
    up.terminate().await.unwrap();
    assert_eq!(std::fs::read(&private).unwrap(), made, "the same key");
    assert_eq!(
        std::fs::read_to_string(state.join("event-keys/public/user-events.keys")).unwrap(),
        public
    );
    let _ = std::fs::remove_dir_all(&state);
}
