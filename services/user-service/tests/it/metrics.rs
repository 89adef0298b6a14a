//! The admin port: Prometheus metrics and dependency health, scraped from
//! the binary as Prometheus would.

use std::time::Duration;

use secrecy::ExposeSecret as _;
use shop_contracts::user as pb;
use shop_contracts::user::user_service_client::UserServiceClient;
use shop_testkit::{ServiceProcess, TcpProxy, TestBroker, TestKeys, http_get, metric};

use crate::helpers::test_database;

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_calls_and_events_and_the_outbox_depth_follows_the_broker() {
    let db = test_database().await;
    let broker = TestBroker::new();
    let exchange = broker.exchange("user.events");
    // A queue that takes the events (the relay waits with events no queue
    // takes).
    let _consumer = broker.probe(&exchange, "#").await.unwrap();
    let proxy = TcpProxy::start(shop_testkit::amqp_addr().await).await.unwrap();
    proxy.refuse(true);
    let amqp = proxy.url_for(broker.config().url.expose_secret());
    let mut service = ServiceProcess::start(
        env!("CARGO_BIN_EXE_user-service"),
        &[
            ("DATABASE_URL", db.url().to_owned()),
            ("AMQP_URL", amqp),
            ("USER_EVENTS_EXCHANGE", exchange.clone()),
        ]
        .into_iter()
        .chain(TestKeys::shared().env())
        .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let admin = service.admin_addr.expect("admin address logged");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", service.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = UserServiceClient::new(shop_testkit::auth::with_token(
        channel,
        &TestKeys::shared().service_token(),
    ));
    let scrape = || async { http_get(admin, "/metrics").await.unwrap().1 };
    let exchange_label = [("exchange", exchange.as_str())];

    for i in 0..3 {
        client
            .create_user(pb::CreateUserRequest {
                email: format!("m{i}@example.com"),
                name: "Metric".to_owned(),
                request_id: String::new(),
            })
            .await
            .unwrap();
    }
    client
        .create_user(pb::CreateUserRequest::default())
        .await
        .unwrap_err();

    // The broker refuses the relay: the events wait in the outbox.
    shop_testkit::eventually("outbox depth 3", Duration::from_secs(20), || async {
        (metric(&scrape().await, "outbox_pending_events", &exchange_label) == Some(3.0)).then_some(())
    })
    .await;
    let metrics = scrape().await;
    assert!(metric(&metrics, "outbox_oldest_pending_seconds", &exchange_label).unwrap() > 0.0);
    let calls = |code| {
        metric(
            &metrics,
            "grpc_server_requests_total",
            &[
                ("service", "shop.user.v1.UserService"),
                ("method", "CreateUser"),
                ("code", code),
            ],
        )
    };
    assert_eq!(calls("OK"), Some(3.0));
    assert_eq!(calls("INVALID_ARGUMENT"), Some(1.0));
    assert!(
        metric(
            &metrics,
            "grpc_server_request_duration_seconds_count",
            &[("method", "CreateUser")]
        ) == Some(4.0)
    );
    let (status, health) = http_get(admin, "/health").await.unwrap();
    assert_eq!(status, 503, "{health}");
    assert!(
        health.contains("postgres up") && health.contains("rabbitmq (outbox relay) down"),
        "{health}"
    );

    // The broker is back: the relay publishes them and the depth drops.
    proxy.refuse(false);
    shop_testkit::eventually(
        "3 events published and depth 0",
        Duration::from_secs(30),
        || async {
            let metrics = scrape().await;
            (metric(&metrics, "outbox_events_published_total", &exchange_label) == Some(3.0)
                && metric(&metrics, "outbox_pending_events", &exchange_label) == Some(0.0))
            .then_some(())
        },
    )
    .await;
    let metrics = scrape().await;
    assert_eq!(
        metric(&metrics, "outbox_confirm_seconds_count", &exchange_label),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "dependency_up",
            &[("dependency", "rabbitmq (outbox relay)")]
        ),
        Some(1.0)
    );
    let (status, health) = http_get(admin, "/health").await.unwrap();
    assert_eq!(status, 200, "{health}");

    // A resync counts the snapshots it writes.
    assert_eq!(metric(&metrics, "user_resync_snapshots_total", &[]), Some(0.0));
    let mut progress = client
        .resync_users(pb::ResyncUsersRequest {
            selection: Some(pb::resync_users_request::Selection::All(true)),
            max_per_second: None,
        })
        .await
        .unwrap()
        .into_inner();
    while progress.message().await.unwrap().is_some() {}
    assert_eq!(
        metric(&scrape().await, "user_resync_snapshots_total", &[]),
        Some(3.0)
    );
    service.terminate().await.unwrap();
}
