//! Faults production brings that are harder to see than a closed
//! connection: connections that go silent, a database that refuses writes.

use std::time::{Duration, Instant};

use prost::Message as _;
use shop_contracts::user as pb;
use shop_messaging::AmqpConfig;
use shop_testkit::TcpProxy;
use tonic::Code;

use crate::helpers::{TestApp, spawn_app_with};

/// Creates a user, retrying while the service answers `UNAVAILABLE` (or
/// the call times out), as the client SDK does, until `deadline`.
async fn create_until_accepted(app: &TestApp, email: &str, deadline: Instant) -> pb::User {
    loop {
        let mut request = tonic::Request::new(pb::CreateUserRequest {
            email: email.to_owned(),
            name: "Silent".to_owned(),
            request_id: uuid::Uuid::new_v4().to_string(),
        });
        request.set_timeout(Duration::from_secs(10));
        match app.client.clone().create_user(request).await {
            Ok(response) => return response.into_inner().user.unwrap(),
            Err(status)
                if matches!(
                    status.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
                ) =>
            {
                assert!(Instant::now() < deadline, "{email} still refused: {status:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => panic!("{email}: {status:?}"),
        }
    }
}

/// Every connection the user service holds (its pool, the relay's lanes and
/// `LISTEN` session, the relay's broker connections) stops carrying bytes
/// without being closed; new connections work. Commands must be answered
/// again, and their events published, within 30 s.
#[tokio::test(flavor = "multi_thread")]
async fn a_service_whose_connections_go_silent_replaces_them_and_publishes_within_30s() {
    let database_proxy = TcpProxy::start(shop_testkit::postgres_addr().await)
        .await
        .unwrap();
    let broker_proxy = TcpProxy::start(shop_testkit::amqp_addr().await).await.unwrap();
    let app = spawn_app_with(|config| {
        config.host.amqp = AmqpConfig::new(broker_proxy.url_for(&shop_testkit::amqp_url()));
        let url = config.host.database.url.clone();
        config.host.database.url = database_proxy
            .url_for(secrecy::ExposeSecret::expose_secret(&url))
            .into();
    })
    .await;
    let mut probe = app.broker.probe(&app.exchange, "#").await.unwrap();
    let before = create_until_accepted(
        &app,
        "before@example.com",
        Instant::now() + Duration::from_secs(10),
    )
    .await;
    let first = probe
        .next(Duration::from_secs(10))
        .await
        .expect("the first event");
    assert!(first.properties.message_id().is_some());

    let frozen = database_proxy.freeze() + broker_proxy.freeze();
    let frozen_at = Instant::now();
    assert!(frozen >= 3, "the service held connections to freeze ({frozen})");
    let deadline = frozen_at + Duration::from_secs(30);
    let mut created = Vec::new();
    for i in 0..3 {
        created.push(create_until_accepted(&app, &format!("after-{i}@example.com"), deadline).await);
    }
    eprintln!(
        "silent connections: commands answered again {:?} after the freeze",
        frozen_at.elapsed()
    );
    let mut seen = std::collections::HashSet::new();
    while seen.len() < created.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(delivery) = probe.next(left).await else {
            panic!(
                "only {} of {} events published 30 s after the freeze",
                seen.len(),
                created.len()
            );
        };
        let user = pb::UserCreated::decode(delivery.data.as_slice()).unwrap();
        if created.iter().any(|c| c.id == user.user_id) {
            seen.insert(user.user_id);
        }
    }
    eprintln!(
        "silent connections: events published again {:?} after the freeze",
        frozen_at.elapsed()
    );
    assert_ne!(before.id, created[0].id);
    assert!(
        database_proxy.accepted() > 1 && broker_proxy.accepted() > 1,
        "connections were replaced"
    );
}

/// The database switches to read-only (a failover onto a standby) while
/// events wait in the outbox: commands are answered `UNAVAILABLE` (a
/// retryable code, never `INTERNAL`), the relay publishes nothing it could
/// not mark (no event is published twice), and everything goes out once the
/// database takes writes again.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_database_makes_commands_unavailable_and_the_relay_wait_without_republishing() {
    let app = spawn_app_with(|config| config.host.relay_enabled = false).await;
    let mut probe = app.broker.probe(&app.exchange, "#").await.unwrap();
    for i in 0..3 {
        app.create_user(&format!("waiting-{i}@example.com"), "Waiting")
            .await;
    }

    app.db.set_read_only(true).await.unwrap();
    let refused = app
        .client
        .clone()
        .create_user(pb::CreateUserRequest {
            email: "refused@example.com".to_owned(),
            name: "Refused".to_owned(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let relay = crate::helpers::relay(&app);
    let mut relay = shop_testkit::Running::spawn(|shutdown| relay.run(shutdown));
    // Three batches tried (and failed) against the read-only database; had
    // any of them published, its message would be ahead of the marker.
    let failures = || async {
        let metrics = shop_host::admin::metrics_handle().unwrap().render();
        shop_testkit::metric(
            &metrics,
            "outbox_batch_failures_total",
            &[("exchange", app.exchange.as_str())],
        )
        .unwrap_or(0.0)
    };
    shop_testkit::eventually("three failed batches", Duration::from_secs(20), || async {
        (failures().await >= 3.0).then_some(())
    })
    .await;
    probe.expect_nothing_more().await;

    app.db.set_read_only(false).await.unwrap();
    shop_testkit::eventually("every row marked", Duration::from_secs(20), || async {
        (app.unpublished().await == 0).then_some(())
    })
    .await;
    relay.stop().await.unwrap();
    let deliveries = probe.expect(3, Duration::from_secs(20)).await;
    let mut ids: Vec<String> = deliveries
        .iter()
        .map(|d| d.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "each event published once");
}

/// A relay lane that dies (a panic, a bug) would leave its share of the
/// partitions unpublished for good: it is started again, counted in
/// `task_restarts_total`, and every event is still published.
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_lane_that_panics_is_restarted_and_counted_and_every_event_still_published() {
    let db = crate::helpers::test_database().await;
    let broker = shop_testkit::TestBroker::new();
    let exchange = broker.exchange("user.events");
    let mut probe = broker.probe(&exchange, "#").await.unwrap();
    let mut service = shop_testkit::ServiceProcess::start(
        env!("CARGO_BIN_EXE_user-service"),
        &[
            ("DATABASE_URL", db.url().to_owned()),
            ("AMQP_URL", shop_testkit::amqp_url()),
            ("USER_EVENTS_EXCHANGE", exchange.clone()),
            ("RELAY_POLL_INTERVAL", "200ms".to_owned()),
            // The first time any lane goes round, it panics.
            ("FAILPOINTS", "relay-lane=1*panic".to_owned()),
        ]
        .into_iter()
        .chain(shop_testkit::TestKeys::shared().env())
        .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let mut client =
        crate::helpers::client_with_token(service.addr, &shop_testkit::TestKeys::shared().service_token())
            .await;

    for i in 0..20 {
        client
            .create_user(pb::CreateUserRequest {
                email: format!("lane-{i}@example.com"),
                name: "Lane".to_owned(),
                request_id: String::new(),
            })
            .await
            .unwrap();
    }

    let mut deliveries = Vec::new();
    while deliveries.len() < 20 {
        let Some(delivery) = probe.next(Duration::from_secs(20)).await else {
            panic!("{} of 20 events published", deliveries.len());
        };
        deliveries.push(delivery);
    }
    shop_testkit::eventually("every row marked", Duration::from_secs(20), || async {
        (unpublished(&db).await == 0).then_some(())
    })
    .await;
    let admin = service.admin_addr.unwrap();
    let (_, metrics) = shop_testkit::http_get(admin, "/metrics").await.unwrap();
    assert_eq!(
        shop_testkit::metric(&metrics, "task_restarts_total", &[("task", "outbox relay lane")]),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        service
            .lines()
            .iter()
            .any(|line| line.contains("outbox relay lane ended")),
        "the restart is logged"
    );
    // Every row marked and the service stopped: nothing more can come, and
    // nothing more came.
    service.terminate().await.unwrap();
    probe.expect_nothing_more().await;
}

/// Outbox rows not yet marked published in `db`.
async fn unpublished(db: &shop_testkit::TestDatabase) -> i64 {
    let (client, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .query_one("SELECT count(*) FROM outbox WHERE published_at IS NULL", &[])
        .await
        .unwrap()
        .get(0)
}
