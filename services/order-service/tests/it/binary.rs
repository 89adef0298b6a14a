//! The binary as an operator runs it.

use shop_testkit::{ServiceProcess, TestBroker, TestDatabase};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_without_a_collector_serves_logs_no_errors_and_stops_on_sigterm() {
    let db = TestDatabase::create(
        order_service::app::MIGRATIONS,
        std::path::Path::new(order_service::app::MIGRATIONS_DIR),
    )
    .await
    .unwrap();
    let broker = TestBroker::new();
    let queue = broker.queue("order-service.user-events");
    let user_events = broker.event_exchange(&broker.config(), "user.events").await;
    let mut defaults = order_service::Config::defaults();
    defaults.service.user_events_exchange.clone_from(&user_events);
    defaults.service.user_events_queue.clone_from(&queue);
    broker.track_topology(&defaults.service.consumer().topology());
    let mut service = ServiceProcess::start(
        env!("CARGO_BIN_EXE_order-service"),
        &[
            ("DATABASE_URL", db.url().to_owned()),
            ("AMQP_URL", shop_testkit::amqp_url()),
            ("USER_EVENTS_EXCHANGE", user_events),
            ("ORDER_EVENTS_EXCHANGE", broker.exchange("order.events")),
            ("USER_EVENTS_QUEUE", queue),
        ]
        .into_iter()
        .chain(shop_testkit::TestKeys::shared().env())
        .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", service.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel);

    shop_testkit::eventually("SERVING", std::time::Duration::from_secs(20), || {
        let mut health = health.clone();
        async move {
            let status = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .ok()?
                .into_inner()
                .status;
            (status == ServingStatus::Serving as i32).then_some(())
        }
    })
    .await;
    let status = service.terminate().await.unwrap();

    assert!(status.success(), "exit status {status}");
    for line in service.lines() {
        let value: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        let level = value["level"].as_str().unwrap_or_default();
        assert!(
            level != "WARN" && level != "ERROR",
            "unexpected {level} line: {line}"
        );
    }
}

#[test]
fn without_the_user_services_public_keys_the_order_service_refuses_to_start_in_one_line() {
    let keys = shop_testkit::keys::KeyFiles::write().unwrap();
    let key = keys.private_key.to_string_lossy().into_owned();
    // Everything else set, so the keys are what is missing.
    let signing = [
        ("GRPC_AUTH", "none"),
        ("EVENT_SIGNING_KEY_FILE", key.as_str()),
        ("EVENT_SIGNING_KEY_ID", keys.key_id.as_str()),
    ];
    shop_testkit::command_line::assert_refused(
        env!("CARGO_BIN_EXE_order-service"),
        &[],
        &signing,
        "USER_EVENTS_KEYS_FILE",
    );
    // A file that lists no key is refused too, not taken as "trust none".
    let empty = keys.trusted.with_extension("empty");
    std::fs::write(&empty, "# no keys yet\n").unwrap();
    let empty = empty.to_string_lossy().into_owned();
    let mut settings = signing.to_vec();
    settings.push(("USER_EVENTS_KEYS_FILE", empty.as_str()));
    shop_testkit::command_line::assert_refused(
        env!("CARGO_BIN_EXE_order-service"),
        &[],
        &settings,
        "USER_EVENTS_KEYS_FILE",
    );
}

#[test]
fn the_command_line_answers_help_version_and_print_config_and_refuses_bad_settings_in_one_line() {
    shop_testkit::command_line::assert_command_line(
        env!("CARGO_BIN_EXE_order-service"),
        &[
            "DATABASE_URL",
            "USER_EVENTS_QUEUE",
            "ORDER_EVENTS_EXCHANGE",
            "CONSUMER_RETRY_DELAYS",
            "INBOX_RETENTION",
        ],
    );
}
