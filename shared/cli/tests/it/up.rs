//! `shop up`, then the CLI, as the README tells a newcomer: authentication
//! is on, and the commands work with the credentials `shop up` made.

use std::time::Duration;

use assert_cmd::Command;
use shop_testkit::{ServiceProcess, TestBroker, TestDatabase};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread")]
async fn shop_up_makes_credentials_the_cli_uses_and_refuses_callers_without_them() {
    let user_db = TestDatabase::create(
        user_service::app::MIGRATIONS,
        std::path::Path::new(user_service::app::MIGRATIONS_DIR),
    )
    .await
    .unwrap();
    let order_db = TestDatabase::create(
        order_service::app::MIGRATIONS,
        std::path::Path::new(order_service::app::MIGRATIONS_DIR),
    )
    .await
    .unwrap();
    let broker = TestBroker::new();
    let queue = broker.queue("order-service.user-events");
    broker.track_topology(
        &shop_messaging::consumer::ConsumerConfig::new(broker.exchange("user.events"), queue.clone())
            .topology(),
    );
    let state = std::env::temp_dir().join(format!("shop-up-{}", uuid::Uuid::new_v4().simple()));
    let (user_port, order_port) = (free_port(), free_port());
    let mut up = ServiceProcess::start_with_args(
        env!("CARGO_BIN_EXE_shop"),
        &["up"],
        &[
            ("SHOP_STATE_DIR", state.display().to_string()),
            ("USER_DATABASE_URL", user_db.url().to_owned()),
            ("ORDER_DATABASE_URL", order_db.url().to_owned()),
            ("USER_GRPC_ADDR", format!("127.0.0.1:{user_port}")),
            ("ORDER_GRPC_ADDR", format!("127.0.0.1:{order_port}")),
            ("USER_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
            ("ORDER_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
            ("AMQP_URL", shop_testkit::amqp_url()),
            ("USER_EVENTS_EXCHANGE", broker.exchange("user.events")),
            ("ORDER_EVENTS_EXCHANGE", broker.exchange("order.events")),
            ("USER_EVENTS_QUEUE", queue),
        ],
    )
    .await
    .unwrap();
    let shop = |token: bool| {
        let mut command = Command::cargo_bin("shop").unwrap();
        command
            .env("SHOP_USER_ENDPOINT", format!("http://127.0.0.1:{user_port}"))
            .env("SHOP_ORDER_ENDPOINT", format!("http://127.0.0.1:{order_port}"))
            .env_remove("SHOP_TOKEN")
            .env_remove("SHOP_TOKEN_FILE")
            .timeout(Duration::from_secs(30));
        if token {
            command.env("SHOP_STATE_DIR", &state);
        } else {
            command.env("SHOP_STATE_DIR", "/nonexistent/shop-state");
        }
        command
    };

    let created = shop_testkit::eventually("shop up to serve", Duration::from_secs(60), || async {
        let output = shop(true)
            .args([
                "--json",
                "users",
                "create",
                "--email",
                "up@example.com",
                "--name",
                "Up",
            ])
            .output()
            .unwrap();
        output.status.success().then_some(output)
    })
    .await;
    let refused = shop(false).args(["users", "list"]).output().unwrap();
    let signing_key = std::fs::metadata(state.join("jwt-signing-key.pem"));
    up.terminate().await.unwrap();
    std::fs::remove_dir_all(&state).ok();

    let user: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    assert_eq!(user["email"], "up@example.com");
    assert_eq!(refused.status.code(), Some(6), "{refused:?}");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(signing_key.unwrap().permissions().mode() & 0o777, 0o600);
    assert!(
        up.lines().iter().all(|line| !line.contains("GRPC_AUTH=none")),
        "authentication is on"
    );
}
