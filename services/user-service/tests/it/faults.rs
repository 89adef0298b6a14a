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
    assert_eq!(distinct_events(&deliveries), 3, "each event published once");
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

/// The relay's database outages, as the server makes them, with its
/// messages in `language` when given: its session ended by an
/// administrator while its statement runs (SQLSTATE 57P01), then its role
/// refused any session (`CONNECTION LIMIT` reached: 53300). Each is seen
/// to happen (the session ended, the refusal's SQLSTATE, the relay's own
/// failed batches); nothing is published while the rows cannot be marked,
/// and every event is published exactly once afterwards.
async fn relay_database_outages(language: Option<&str>) {
    use diesel::sql_types::BigInt;
    use diesel_async::{
        AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _, SimpleAsyncConnection as _,
    };

    #[derive(diesel::QueryableByName)]
    struct Waiting {
        #[diesel(sql_type = BigInt)]
        sessions: i64,
    }
    #[derive(diesel::QueryableByName)]
    struct Ended {
        #[diesel(sql_type = BigInt)]
        ended: i64,
    }

    let roles = shop_testkit::TestRoles::create(&[("relay", "")]).await.unwrap();
    let app = spawn_app_with(|config| config.host.relay_enabled = false).await;
    if let Some(language) = language {
        app.db.set_message_language(language).await.unwrap();
    }
    let role = roles.name("relay");
    let mut admin = AsyncPgConnection::establish(app.db.url()).await.unwrap();
    admin
        .batch_execute(&format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}; \
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}"
        ))
        .await
        .unwrap();
    let mut probe = app.broker.probe(&app.exchange, "#").await.unwrap();
    for i in 0..3 {
        app.create_user(&format!("held-{i}@example.com"), "Held").await;
    }
    let failures = || {
        let metrics = shop_host::admin::metrics_handle().unwrap().render();
        shop_testkit::metric(
            &metrics,
            "outbox_batch_failures_total",
            &[("exchange", app.exchange.as_str())],
        )
        .unwrap_or(0.0)
    };

    // 57P01: the relay's read of the outbox waits behind the test's lock;
    // its session is ended there.
    admin
        .batch_execute("BEGIN; LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut database = app.db.config();
    database.url = roles.url("relay", &app.db).into();
    let pool = shop_database::pool(&database).unwrap();
    let mut settings = crate::helpers::settings(&app.db, &app.broker);
    settings.host.relay.batch_size = 1000;
    let relay = shop_host::relay(&settings, pool).unwrap();
    let mut relay = shop_testkit::Running::spawn(|shutdown| relay.run(shutdown));
    let lanes = i64::from(settings.host.relay.lanes);
    let waiting = format!(
        "SELECT count(*) AS sessions FROM pg_stat_activity WHERE usename = '{role}' AND wait_event_type = 'Lock'"
    );
    shop_testkit::eventually(
        "every lane's statement waiting for the outbox",
        Duration::from_secs(10),
        || async {
            let mut watcher = AsyncPgConnection::establish(app.db.url()).await.ok()?;
            let waiting = diesel::sql_query(waiting.as_str())
                .get_result::<Waiting>(&mut watcher)
                .await
                .ok()?;
            (waiting.sessions == lanes).then_some(())
        },
    )
    .await;
    let before = failures();
    // Every lane's session that waits there (a lane ended early comes back
    // to wait again, and is ended again).
    let ended = std::sync::atomic::AtomicI64::new(0);
    shop_testkit::eventually("every lane's session ended", Duration::from_secs(10), || async {
        let mut watcher = AsyncPgConnection::establish(app.db.url()).await.ok()?;
        let now: Ended = diesel::sql_query(format!(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) AS ended FROM pg_stat_activity \
             WHERE usename = '{role}' AND wait_event_type = 'Lock'"
        ))
        .get_result(&mut watcher)
        .await
        .ok()?;
        let total = ended.fetch_add(now.ended, std::sync::atomic::Ordering::SeqCst) + now.ended;
        (total >= lanes).then_some(())
    })
    .await;
    shop_testkit::eventually("the relay's batch failed", Duration::from_secs(10), || async {
        (failures() > before).then_some(())
    })
    .await;

    // 53300: no session for the relay's role, its idle ones ended.
    admin
        .batch_execute(&format!(
            "ALTER ROLE {role} CONNECTION LIMIT 0; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'; \
             COMMIT"
        ))
        .await
        .unwrap();
    let refused = tokio_postgres::connect(&roles.url("relay", &app.db), tokio_postgres::NoTls)
        .await
        .map(drop)
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS),
        "{refused}"
    );
    let before = failures();
    shop_testkit::eventually("three refused batches", Duration::from_secs(20), || async {
        (failures() >= before + 3.0).then_some(())
    })
    .await;
    assert_eq!(app.unpublished().await, 3, "nothing marked during the outages");
    probe.expect_nothing_more().await;

    admin
        .batch_execute(&format!("ALTER ROLE {role} CONNECTION LIMIT -1"))
        .await
        .unwrap();
    shop_testkit::eventually("every row marked", Duration::from_secs(20), || async {
        (app.unpublished().await == 0).then_some(())
    })
    .await;
    relay.stop().await.unwrap();
    let deliveries = probe.expect(3, Duration::from_secs(20)).await;
    assert_eq!(distinct_events(&deliveries), 3, "each event published once");
    probe.expect_nothing_more().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_whose_session_is_ended_and_whose_connections_are_refused_publishes_each_event_once_after() {
    relay_database_outages(None).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a PostgreSQL server with the de_DE.UTF-8 locale (.ci/install-tools generates it); run: cargo test -p user-service --test it another_message_language -- --ignored"]
async fn the_relays_database_outages_in_another_message_language_publish_each_event_once_after() {
    relay_database_outages(Some("de_DE.UTF-8")).await;
}

/// How many distinct events (by message id) `deliveries` hold.
fn distinct_events(deliveries: &[lapin::message::Delivery]) -> usize {
    deliveries
        .iter()
        .map(|d| d.properties.message_id().as_ref().unwrap().to_string())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}
