//! The outbox relay against the real broker.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use prost::Message as _;
use shop_contracts::Event as _;
use shop_contracts::user as pb;
use shop_messaging::AmqpConfig;
use shop_messaging::wire::{header_i64, header_str};
use shop_outbox::RelayError;
use tokio_util::sync::CancellationToken;

use crate::helpers::{self, TestApp, spawn_app, spawn_app_with};

const WAIT: Duration = Duration::from_secs(15);
const QUIET: Duration = Duration::from_millis(500);

async fn spawn_app_without_relay() -> TestApp {
    spawn_app_with(|settings| settings.host.relay_enabled = false).await
}

#[tokio::test(flavor = "multi_thread")]
async fn every_committed_event_arrives_once_with_the_wire_properties() {
    let app = spawn_app().await;
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

    let deliveries = probe.expect(3, WAIT, QUIET).await;
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

    wait_until_all_published(&app).await;
}

async fn wait_until_all_published(app: &TestApp) {
    shop_testkit::eventually("every outbox row marked published", WAIT, || async {
        (app.unpublished().await == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_carries_its_trace_context_into_the_message_headers() {
    let app = spawn_app().await;
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

    let delivery = probe.expect(1, WAIT, QUIET).await.remove(0);
    let headers = delivery.properties.headers().as_ref().unwrap();
    let traceparent = header_str(headers, "traceparent").expect("traceparent header");
    assert!(
        traceparent.contains(trace_id),
        "{traceparent} continues the caller's trace"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_facing_a_closed_port_loses_nothing_and_publishes_once_the_broker_is_back() {
    let app = spawn_app_without_relay().await;
    for i in 0..3 {
        app.create_user(&format!("wait{i}@example.com"), "Waiting").await;
    }
    let mut down = helpers::settings(&app.db, &app.broker);
    down.host.amqp = AmqpConfig::new("amqp://guest:guest@127.0.0.1:1/%2f");
    let mut unreachable = shop_host::relay(&down, app.pool.clone());

    let error = unreachable.run_once().await.unwrap_err();
    assert!(matches!(error, RelayError::Broker(_)), "{error}");
    // Running against the closed port keeps retrying without losing rows or
    // ending the task.
    let stop = CancellationToken::new();
    let running = tokio::spawn(unreachable.run(stop.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!running.is_finished());
    stop.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(app.unpublished().await, 3);

    let mut probe = app.broker.probe(&app.exchange, "#").await.unwrap();
    let mut relay = helpers::relay(&app);
    let outcome = relay.run_once().await.unwrap();

    assert_eq!((outcome.claimed, outcome.published), (3, 3));
    let deliveries = probe.expect(3, WAIT, QUIET).await;
    assert!(
        deliveries
            .iter()
            .all(|d| d.routing_key.as_str() == "user.created")
    );
    assert_eq!(app.unpublished().await, 0);
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
    let deliveries = probe
        .expect(total, Duration::from_secs(30), Duration::from_secs(1))
        .await;
    stop.cancel();
    for relay in relays {
        relay.await.unwrap().unwrap();
    }

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
    probe.expect(3, WAIT, QUIET).await;
    assert_eq!(app.unpublished().await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_relay_unroutable_drop_events_no_queue_takes_are_marked_published() {
    let app = spawn_app_without_relay().await;
    app.create_user("dropped@example.com", "Dropped").await;
    let mut settings = helpers::settings(&app.db, &app.broker);
    settings.host.relay.unroutable = shop_outbox::Unroutable::Drop;
    let mut relay = shop_host::relay(&settings, app.pool.clone());

    let outcome = relay.run_once().await.unwrap();
    assert_eq!(
        (outcome.claimed, outcome.published, outcome.unroutable),
        (1, 1, 0)
    );
    assert_eq!(app.unpublished().await, 0);
}
