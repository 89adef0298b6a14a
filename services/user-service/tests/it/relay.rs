//! The outbox relay against the real broker.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use prost::Message as _;
use shop_contracts::Event as _;
use shop_contracts::user as pb;
use shop_messaging::AmqpConfig;
use shop_messaging::wire::{header_i64, header_str};
use shop_outbox::{BrokerError, RelayError};
use shop_testkit::{Running, TcpProxy};
use tokio_util::sync::CancellationToken;

use crate::helpers::{self, TestApp, spawn_app, spawn_app_with};

const WAIT: Duration = Duration::from_secs(15);

async fn spawn_app_without_relay() -> TestApp {
    spawn_app_with(|settings| settings.host.relay_enabled = false).await
}

#[tokio::test(flavor = "multi_thread")]
async fn every_committed_event_arrives_once_with_the_wire_properties() {
    let mut app = spawn_app().await;
    let mut probe = app.broker.probe(&app.exchange, "#").await.unwrap();
    let mut client = app.client.clone();

    let user = app.create_user("wire@example.com", "Wire").await;
    client
        .update_user(pb::UpdateUserRequest {
            id: user.id.clone(),
            expected_version: 1,
            email: None,
            name: Some("Wired".to_owned()),
        })
        .await
        .unwrap();
    client
        .delete_user(pb::DeleteUserRequest {
            id: user.id.clone(),
            expected_version: 2,
        })
        .await
        .unwrap();

    // Every row marked, the relay stopped: nothing more can come.
    wait_until_all_published(&app).await;
    app.running.stop().await.unwrap();
    let deliveries = probe.expect(3, WAIT).await;
    let expected = [
        (pb::UserCreated::TYPE_NAME, pb::UserCreated::ROUTING_KEY),
        (pb::UserUpdated::TYPE_NAME, pb::UserUpdated::ROUTING_KEY),
        (pb::UserDeleted::TYPE_NAME, pb::UserDeleted::ROUTING_KEY),
    ];
    let mut event_ids = HashSet::new();
    for ((delivery, (type_name, routing_key)), version) in deliveries.iter().zip(expected).zip(1..) {
        let p = &delivery.properties;
        assert_eq!(delivery.exchange.as_str(), app.exchange);
        assert_eq!(delivery.routing_key.as_str(), routing_key);
        assert_eq!(p.kind().as_ref().unwrap().as_str(), type_name);
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/x-protobuf"
        );
        assert_eq!(p.app_id().as_ref().unwrap().as_str(), "user-service");
        assert_eq!(*p.delivery_mode(), Some(2));
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(p.timestamp().unwrap().abs_diff(now) < 60);
        let id = uuid::Uuid::parse_str(p.message_id().as_ref().unwrap().as_str()).unwrap();
        assert_eq!(id.get_version_num(), 7, "event ids are UUIDv7");
        event_ids.insert(id);
        let headers = p.headers().as_ref().unwrap();
        assert_eq!(header_str(headers, "aggregate_id"), Some(user.id.as_str()));
        assert_eq!(header_str(headers, "aggregate_type"), Some("user"));
        assert_eq!(header_i64(headers, "aggregate_version"), Some(version));
    }
    assert_eq!(event_ids.len(), 3);

    let created = pb::UserCreated::decode(&*deliveries[0].data).unwrap();
    assert_eq!(
        (created.user_id.as_str(), created.version, created.email.as_str()),
        (user.id.as_str(), 1, "wire@example.com")
    );
    assert_eq!(created.name, "Wire");
    assert!(created.occurred_at.is_some());
    let updated = pb::UserUpdated::decode(&*deliveries[1].data).unwrap();
    assert_eq!(
        (updated.version, updated.name.as_str(), updated.email.as_str()),
        (2, "Wired", "wire@example.com")
    );
    let deleted = pb::UserDeleted::decode(&*deliveries[2].data).unwrap();
    assert_eq!((deleted.user_id.as_str(), deleted.version), (user.id.as_str(), 3));
}

async fn wait_until_all_published(app: &TestApp) {
    shop_testkit::eventually("every outbox row marked published", WAIT, || async {
        (app.unpublished().await == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_carries_its_trace_context_into_the_message_headers() {
    let mut app = spawn_app().await;
    let mut probe = app.broker.probe(&app.exchange, "#").await.unwrap();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(pb::CreateUserRequest {
        email: "traced@example.com".to_owned(),
        name: "Traced".to_owned(),
        request_id: String::new(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01").parse().unwrap(),
    );

    app.client.clone().create_user(request).await.unwrap();

    wait_until_all_published(&app).await;
    app.running.stop().await.unwrap();
    let delivery = probe.expect(1, WAIT).await.remove(0);
    let headers = delivery.properties.headers().as_ref().unwrap();
    let traceparent = header_str(headers, "traceparent").expect("traceparent header");
    assert!(
        traceparent.contains(trace_id),
        "{traceparent} continues the caller's trace"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_facing_a_closed_port_reports_a_broker_error_and_marks_nothing() {
    let app = spawn_app_without_relay().await;
    for i in 0..3 {
        app.create_user(&format!("wait{i}@example.com"), "Waiting").await;
    }
    let mut down = helpers::settings(&app.db, &app.broker);
    down.host.amqp = AmqpConfig::new("amqp://guest:guest@127.0.0.1:1/%2f");
    let mut unreachable = shop_host::relay(&down, app.pool.clone()).unwrap();

    let error = unreachable.run_once().await.unwrap_err();

    assert!(matches!(error, RelayError::Broker(_)), "{error}");
    assert_eq!(app.unpublished().await, 3);
}

/// The broker goes away under a running relay (its connection cut, new
/// ones refused) while events are committed, and comes back to the same
/// relay: nothing is marked while it is away, the relay keeps trying, and
/// once it is back every event is published exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_whose_broker_goes_away_and_comes_back_publishes_every_event_exactly_once() {
    let app = spawn_app_without_relay().await;
    let proxy = TcpProxy::start(shop_testkit::amqp_addr().await).await.unwrap();
    let mut probe = app.broker.probe(&app.exchange, "#").await.unwrap();
    let mut settings = helpers::settings(&app.db, &app.broker);
    settings.host.amqp = AmqpConfig::new(proxy.url_for(&shop_testkit::amqp_url()));
    let relay = shop_host::relay(&settings, app.pool.clone()).unwrap();
    let mut running = Running::spawn(|shutdown| relay.run(shutdown));
    let first = app.create_user("before@example.com", "Before").await;
    assert!(probe.next(WAIT).await.is_some(), "the relay publishes");
    wait_until_all_published(&app).await;

    proxy.refuse(true);
    proxy.cut();
    let mut waiting = Vec::new();
    for i in 0..3 {
        waiting.push(app.create_user(&format!("away{i}@example.com"), "Away").await);
    }
    let refused = proxy.refused();
    shop_testkit::eventually("three more attempts of the relay", WAIT, || async {
        (proxy.refused() >= refused + 3).then_some(())
    })
    .await;
    assert_eq!(
        app.unpublished().await,
        3,
        "nothing marked while the broker is away"
    );
    assert!(!running.is_finished(), "the relay keeps going");
    proxy.refuse(false);
    wait_until_all_published(&app).await;
    running.stop().await.unwrap();

    let deliveries = probe.expect(3, WAIT).await;
    let mut published: Vec<String> = deliveries
        .iter()
        .map(|d| {
            let headers = d.properties.headers().as_ref().unwrap();
            header_str(headers, "aggregate_id").unwrap().to_owned()
        })
        .collect();
    let mut expected: Vec<String> = waiting.iter().map(|user| user.id.clone()).collect();
    published.sort();
    expected.sort();
    assert_eq!(published, expected, "each event once, none again");
    assert!(!published.contains(&first.id));
}

/// A queue at its length limit with `x-overflow: reject-publish` makes the
/// broker nack what is routed to it: the relay marks only the confirmed
/// prefix of its batch, and the refused rows go out later, in order, once
/// the queue has room.
#[tokio::test(flavor = "multi_thread")]
async fn rows_the_broker_nacks_stay_unpublished_and_go_out_later_in_order() {
    let app = spawn_app_without_relay().await;
    let (connection, channel) = bounded_queue(&app, 2).await;
    let queue = app.broker.queue("bounded");
    let user = app.create_user("nacked@example.com", "Nacked").await;
    for version in 1..5 {
        app.client
            .clone()
            .update_user(pb::UpdateUserRequest {
                id: user.id.clone(),
                expected_version: version,
                email: None,
                name: Some(format!("Nacked v{}", version + 1)),
            })
            .await
            .unwrap();
    }
    let mut relay = helpers::relay(&app);
    let mut versions = Vec::new();

    let error = relay.run_once().await.unwrap_err();
    assert!(
        matches!(error, RelayError::Broker(BrokerError::Nack)),
        "{error:?}"
    );
    assert_eq!(app.unpublished().await, 3, "only the confirmed rows are marked");
    versions.extend(take_all(&channel, &queue).await);
    assert!(relay.run_once().await.is_err(), "two fit, the fifth is nacked");
    assert_eq!(app.unpublished().await, 1);
    versions.extend(take_all(&channel, &queue).await);
    let last = relay.run_once().await.unwrap();
    versions.extend(take_all(&channel, &queue).await);
    let _ = connection.close(200, "done".into()).await;

    assert_eq!((last.claimed, last.published), (1, 1));
    assert_eq!(app.unpublished().await, 0);
    assert_eq!(versions, [1, 2, 3, 4, 5], "each once, in version order");
}

/// The relay's publishing connection goes silent (frozen by the proxy)
/// mid-batch: no confirm comes within `RELAY_CONFIRM_TIMEOUT`, nothing is
/// marked, and the next batch publishes every row once on a new
/// connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_without_confirms_marks_nothing_and_goes_out_once_on_a_new_connection() {
    let app = spawn_app_without_relay().await;
    let proxy = TcpProxy::start(shop_testkit::amqp_addr().await).await.unwrap();
    let mut probe = app.broker.probe(&app.exchange, "#").await.unwrap();
    let mut settings = helpers::settings(&app.db, &app.broker);
    settings.host.amqp = AmqpConfig::new(proxy.url_for(&shop_testkit::amqp_url()));
    // Closing the frozen connection waits this long.
    settings.host.amqp.timeout = Duration::from_secs(2);
    settings.host.relay.confirm_timeout = Duration::from_secs(1);
    let mut relay = shop_host::relay(&settings, app.pool.clone()).unwrap();
    relay.run_once().await.unwrap();
    for i in 0..3 {
        app.create_user(&format!("silent{i}@example.com"), "Silent").await;
    }

    assert_eq!(proxy.freeze(), 1, "the relay's connection");
    let error = relay.run_once().await.unwrap_err();
    assert!(
        matches!(error, RelayError::Broker(BrokerError::ConfirmTimeout(_))),
        "{error:?}"
    );
    assert_eq!(app.unpublished().await, 3, "nothing marked without its confirm");
    let outcome = relay.run_once().await.unwrap();

    assert_eq!((outcome.claimed, outcome.published), (3, 3));
    assert_eq!(app.unpublished().await, 0);
    let deliveries = probe.expect(3, WAIT).await;
    let ids: HashSet<_> = deliveries
        .iter()
        .map(|d| d.properties.message_id().clone())
        .collect();
    assert_eq!(ids.len(), 3, "each event once");
}

/// A classic queue bound to the app's exchange that holds at most `limit`
/// messages and refuses (nacks) the rest.
async fn bounded_queue(app: &TestApp, limit: i64) -> (lapin::Connection, lapin::Channel) {
    let connection =
        lapin::Connection::connect(&shop_testkit::amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    shop_messaging::topology::declare_event_exchange(&channel, &app.exchange)
        .await
        .unwrap();
    let queue = app.broker.queue("bounded");
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(limit));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), arguments)
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            app.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (connection, channel)
}

/// The aggregate versions of every message in `queue`, taken off it.
async fn take_all(channel: &lapin::Channel, queue: &str) -> Vec<i64> {
    let mut versions = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .unwrap()
    {
        let headers = message.delivery.properties.headers().as_ref().unwrap();
        versions.push(header_i64(headers, "aggregate_version").unwrap());
        message.delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    versions
}

#[tokio::test(flavor = "multi_thread")]
async fn two_relays_publish_each_event_once_and_each_users_events_in_order() {
    const USERS: usize = 5;
    const UPDATES_PER_USER: i64 = 60;
    let app = spawn_app_without_relay().await;
    let mut probe = app.broker.probe(&app.exchange, "#").await.unwrap();
    let stop = CancellationToken::new();
    let relays: Vec<_> = (0..2)
        .map(|_| {
            // Small batches, so the relays take turns many times.
            tokio::spawn(helpers::relay_with_batch(&app, 7).run(stop.clone()))
        })
        .collect();

    let mut users = Vec::new();
    for i in 0..USERS {
        users.push(app.create_user(&format!("order{i}@example.com"), "Order").await);
    }
    let writers = users.iter().map(|user| {
        let mut client = app.client.clone();
        let id = user.id.clone();
        tokio::spawn(async move {
            for version in 1..=UPDATES_PER_USER {
                client
                    .update_user(pb::UpdateUserRequest {
                        id: id.clone(),
                        expected_version: version,
                        email: None,
                        name: Some(format!("Order v{}", version + 1)),
                    })
                    .await
                    .unwrap();
            }
        })
    });
    for writer in futures::future::join_all(writers).await {
        writer.unwrap();
    }

    let total = USERS * (1 + UPDATES_PER_USER as usize);
    shop_testkit::eventually("every row marked", Duration::from_secs(30), || async {
        (app.unpublished().await == 0).then_some(())
    })
    .await;
    stop.cancel();
    for relay in relays {
        relay.await.unwrap().unwrap();
    }
    let deliveries = probe.expect(total, Duration::from_secs(30)).await;

    let ids: HashSet<_> = deliveries
        .iter()
        .map(|d| d.properties.message_id().clone())
        .collect();
    assert_eq!(ids.len(), total, "no event published twice");
    let mut last_version: HashMap<String, i64> = HashMap::new();
    for delivery in &deliveries {
        let headers = delivery.properties.headers().as_ref().unwrap();
        let user = header_str(headers, "aggregate_id").unwrap().to_owned();
        let version = header_i64(headers, "aggregate_version").unwrap();
        let previous = last_version.insert(user.clone(), version).unwrap_or(0);
        assert_eq!(
            version,
            previous + 1,
            "user {user}: version {version} arrived after {previous}"
        );
    }
    assert_eq!(app.unpublished().await, 0);
}

/// Writes `versions` events for each of `aggregates` ids straight into the
/// outbox, version after version (so each batch interleaves aggregates).
async fn fill_outbox(app: &TestApp, aggregates: &[String], versions: i64) {
    let conn = app.pool.get().await.unwrap();
    for version in 1..=versions {
        for id in aggregates {
            let event = pb::UserUpdated {
                user_id: id.clone(),
                version,
                email: format!("{id}@example.com"),
                name: format!("v{version}"),
                occurred_at: None,
            };
            shop_outbox::enqueue(&conn, &event).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nacks_in_the_middle_of_a_batch_never_let_a_later_event_of_an_aggregate_overtake_an_earlier_one() {
    use futures::StreamExt as _;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};

    const AGGREGATES: usize = 12;
    const VERSIONS: i64 = 6;
    let app = spawn_app_without_relay().await;
    // A queue at its length limit refuses publishes (the broker nacks them)
    // while a slow consumer makes room now and then: nacks and acks
    // interleave inside every batch.
    let connection =
        lapin::Connection::connect(&shop_testkit::amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    shop_messaging::topology::declare_event_exchange(&channel, &app.exchange)
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(3));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.name().clone(),
            app.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut deliveries = channel
        .basic_consume(
            queue.name().clone(),
            "slow".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let total = AGGREGATES * VERSIONS as usize;
    let drain = tokio::spawn(async move {
        let mut seen: Vec<(String, i64)> = Vec::new();
        while seen.len() < total {
            let Ok(Some(Ok(delivery))) =
                tokio::time::timeout(Duration::from_secs(30), deliveries.next()).await
            else {
                break;
            };
            let headers = delivery.properties.headers().clone().unwrap_or_default();
            seen.push((
                header_str(&headers, "aggregate_id").unwrap().to_owned(),
                header_i64(&headers, "aggregate_version").unwrap(),
            ));
            tokio::time::sleep(Duration::from_millis(3)).await;
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        seen
    });

    let aggregates: Vec<String> = (0..AGGREGATES)
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    fill_outbox(&app, &aggregates, VERSIONS).await;
    let mut relay = helpers::relay(&app);
    let mut nacked_batches = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while app.unpublished().await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rows still unpublished after 60 s"
        );
        match relay.run_once().await {
            Err(RelayError::Broker(shop_outbox::BrokerError::Nack)) => nacked_batches += 1,
            Err(error) => panic!("{error}"),
            Ok(_) => {}
        }
    }
    let seen = drain.await.unwrap();
    assert!(nacked_batches > 0, "the queue refused some publishes");

    // Per aggregate, the first time each version reached the queue: 1, 2, …
    // in that order (a version may arrive twice, never before the one
    // ahead of it).
    let mut first_seen: HashMap<String, Vec<i64>> = HashMap::new();
    for (aggregate, version) in seen {
        let versions = first_seen.entry(aggregate).or_default();
        if !versions.contains(&version) {
            versions.push(version);
        }
    }
    assert_eq!(first_seen.len(), AGGREGATES);
    for (aggregate, versions) in first_seen {
        assert_eq!(
            versions,
            (1..=VERSIONS).collect::<Vec<_>>(),
            "{aggregate} reached the queue out of order"
        );
    }
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_no_queue_takes_wait_in_the_outbox_until_a_queue_is_bound() {
    let app = spawn_app_without_relay().await;
    for i in 0..3 {
        app.create_user(&format!("early{i}@example.com"), "Early").await;
    }
    let mut relay = helpers::relay(&app);

    // A fresh broker: the consumer has not declared its queue yet.
    for _ in 0..2 {
        let outcome = relay.run_once().await.unwrap();
        assert_eq!(
            (outcome.claimed, outcome.published, outcome.unroutable),
            (3, 0, 3)
        );
    }
    assert_eq!(app.unpublished().await, 3, "returned events stay unpublished");

    let mut probe = app.broker.probe(&app.exchange, "#").await.unwrap();
    let outcome = relay.run_once().await.unwrap();
    assert_eq!(
        (outcome.claimed, outcome.published, outcome.unroutable),
        (3, 3, 0)
    );
    probe.expect(3, WAIT).await;
    assert_eq!(app.unpublished().await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_relay_unroutable_drop_events_no_queue_takes_are_marked_published() {
    let app = spawn_app_without_relay().await;
    app.create_user("dropped@example.com", "Dropped").await;
    let mut settings = helpers::settings(&app.db, &app.broker);
    settings.host.relay.unroutable = shop_outbox::Unroutable::Drop;
    let mut relay = shop_host::relay(&settings, app.pool.clone()).unwrap();

    let outcome = relay.run_once().await.unwrap();
    assert_eq!(
        (outcome.claimed, outcome.published, outcome.unroutable),
        (1, 1, 0)
    );
    assert_eq!(app.unpublished().await, 0);
}

/// One aggregate's deep backlog under tight deadlines: 3,000 pending events
/// of one user, a 1 s confirm timeout, a 1 s statement timeout, and 1 ms
/// of latency each way to the broker (the test kit's proxy). Its events go
/// out one confirm at a time (never two unconfirmed of one aggregate), at
/// least 6 s of round trips, far more than a batch's transaction may last;
/// the batch ends in time (`RELAY_BATCH_TIME`), commits what the broker
/// confirmed, and the next one goes on from there: every event reaches the
/// queue once, in version order.
#[tokio::test(flavor = "multi_thread")]
async fn one_aggregates_deep_backlog_drains_once_in_order_within_the_batch_deadline() {
    const EVENTS: i64 = 3000;
    let app = spawn_app_without_relay().await;
    let (_connection, channel) = bounded_queue(&app, 1_000_000).await;
    let queue = app.broker.queue("bounded");
    let user = uuid::Uuid::now_v7().to_string();
    fill_outbox(&app, std::slice::from_ref(&user), EVENTS).await;
    const LATENCY: Duration = Duration::from_millis(1);
    let proxy = TcpProxy::start(shop_testkit::amqp_addr().await).await.unwrap();
    proxy.delay(LATENCY);
    let mut settings = helpers::settings(&app.db, &app.broker);
    settings.host.amqp = AmqpConfig::new(proxy.url_for(&shop_testkit::amqp_url()));
    // One batch could take the whole backlog, and its transaction may last
    // the statement timeout plus the confirm wait (and RELAY_BATCH_TIME).
    settings.host.relay.batch_size = 4000;
    settings.host.relay.confirm_timeout = Duration::from_secs(1);
    settings.host.database.statement_timeout = Duration::from_secs(1);
    let pool = shop_database::pool(&settings.host.database).unwrap();
    let relay = shop_host::relay(&settings, pool).unwrap();
    let stop = CancellationToken::new();

    let started = std::time::Instant::now();
    let running = tokio::spawn(relay.run(stop.clone()));
    let limit = Duration::from_secs(90);
    let mut left = app.unpublished().await;
    while left > 0 && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = app.unpublished().await;
    }
    let drained = started.elapsed();
    stop.cancel();
    running.await.unwrap().unwrap();
    let versions = take_all(&channel, &queue).await;

    let distinct: HashSet<i64> = versions.iter().copied().collect();
    eprintln!(
        "{EVENTS} events of one aggregate: {} unpublished after {drained:.1?}; the queue got {} copies of {} events",
        left,
        versions.len(),
        distinct.len()
    );
    assert!(proxy.accepted() > 0, "the relay went through the proxy");
    assert!(
        drained >= LATENCY * 2 * EVENTS as u32,
        "one round trip per event, each at least twice the latency: {drained:?}"
    );
    assert_eq!(left, 0, "every row marked published within {limit:?}");
    assert_eq!(
        versions.len(),
        EVENTS as usize,
        "each event published once ({} copies of {} events)",
        versions.len(),
        distinct.len()
    );
    assert_eq!(versions, (1..=EVENTS).collect::<Vec<_>>(), "in version order");
}

/// No trigger on the outbox: a burst of commands wakes the relays of other
/// processes with a few announcements (at most one `NOTIFY outbox` per
/// `OUTBOX_NOTIFY_INTERVAL`, naming the partitions), not one notification
/// per commit.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_commands_is_announced_in_fewer_notifications_than_commits() {
    use diesel_async::RunQueryDsl as _;
    use futures::StreamExt as _;
    const COMMANDS: usize = 40;
    let app = spawn_app_with(|settings| {
        settings.host.relay_enabled = false;
        settings.host.relay.notify_interval = Duration::from_secs(1);
    })
    .await;
    let mut listener = shop_database::establish(&app.db.config()).await.unwrap();
    diesel::sql_query("LISTEN outbox")
        .execute(&mut listener)
        .await
        .unwrap();

    let app = &app;
    futures::future::join_all(
        (0..COMMANDS)
            .map(|i| async move { app.create_user(&format!("burst-{i}@example.com"), "Burst").await }),
    )
    .await;

    let mut notifications = std::pin::pin!(listener.notifications_stream());
    let first = tokio::time::timeout(WAIT, notifications.next())
        .await
        .expect("the burst announced")
        .unwrap()
        .unwrap();
    assert!(!first.payload.is_empty(), "an announcement names its partitions");
    // Whatever else comes until the announcements have been quiet for a
    // while (the interval is a second): a collection window, not a check.
    let mut heard = 1;
    while let Ok(Some(notification)) =
        tokio::time::timeout(Duration::from_secs(3), notifications.next()).await
    {
        notification.unwrap();
        heard += 1;
    }
    assert!(
        heard < COMMANDS,
        "{heard} notifications for {COMMANDS} commits: one per commit"
    );
}

/// A relay of another process (here one the test runs beside an app without
/// its own) hears of each commit from the app's announcement, long before
/// its poll: the outbox's trigger is gone, so nothing else tells it.
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_in_another_process_publishes_each_command_without_waiting_for_its_poll() {
    let app = spawn_app_without_relay().await;
    let mut probe = app.broker.probe(&app.exchange, "#").await.unwrap();
    let mut settings = helpers::settings(&app.db, &app.broker);
    settings.host.relay.poll_interval = Duration::from_secs(3600);
    let relay = shop_host::relay(&settings, app.pool.clone()).unwrap();
    let mut running = Running::spawn(|shutdown| relay.run(shutdown));

    // Each command is published before the next is made: after the first,
    // the relay's start-up batch is over, and only a wake-up is left.
    for i in 0..3 {
        app.create_user(&format!("elsewhere-{i}@example.com"), "Elsewhere")
            .await;
        wait_until_all_published(&app).await;
    }
    running.stop().await.unwrap();
    probe.expect(3, WAIT).await;
}

/// The relay's claim and read run in one round trip, and its transaction
/// commits without waiting for the WAL flush (a mark lost in a crash of the
/// database only publishes again), while the next transaction on the same
/// pooled connection, a command's, waits for it as before.
#[tokio::test(flavor = "multi_thread")]
async fn the_relays_claim_reads_the_rows_and_makes_only_its_own_commit_asynchronous() {
    use diesel::QueryableByName;
    use diesel_async::{AsyncConnection as _, RunQueryDsl as _};
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        synchronous_commit: String,
    }
    #[derive(QueryableByName)]
    struct Claimed {
        #[diesel(sql_type = diesel::sql_types::Text)]
        aggregate_id: String,
    }
    async fn setting(conn: &mut diesel_async::AsyncPgConnection) -> String {
        diesel::sql_query("SHOW synchronous_commit")
            .get_result::<Setting>(conn)
            .await
            .unwrap()
            .synchronous_commit
    }
    let app = spawn_app_without_relay().await;
    let user = app.create_user("claimed@example.com", "Claimed").await;
    let mut conn = app.pool.get().await.unwrap();

    let (claimed, inside) = conn
        .transaction::<_, diesel::result::Error, _>(async |conn| {
            let claimed = diesel::sql_query("SELECT aggregate_id FROM outbox_claim(0, 1, 32, 1, 10)")
                .load::<Claimed>(conn)
                .await?;
            Ok((claimed, setting(conn).await))
        })
        .await
        .unwrap();
    let after = setting(&mut conn).await;

    assert_eq!(
        claimed
            .iter()
            .map(|row| row.aggregate_id.as_str())
            .collect::<Vec<_>>(),
        [user.id.as_str()]
    );
    assert_eq!(inside, "off", "the relay's batch commits asynchronously");
    assert_eq!(after, "on", "the next transaction on the connection is durable");
}
