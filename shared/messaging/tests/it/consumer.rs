//! Inbox, retries, poison messages and reconnection.

use std::sync::atomic::Ordering;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use shop_contracts::Event as _;
use shop_contracts::user::{UserCreated, UserUpdated};
use shop_messaging::AmqpConfig;
use shop_messaging::wire::CONTENT_TYPE;
use shop_testkit::TcpProxy;
use uuid::Uuid;

use crate::support::{created, harness, signable};

#[tokio::test(flavor = "multi_thread")]
async fn the_same_event_delivered_three_times_is_applied_once() {
    let mut h = harness().await;
    h.start().await;
    let event_id = Uuid::now_v7();

    for _ in 0..3 {
        h.publish(&created("u1", 1), event_id).await;
    }
    h.publish(&created("u2", 1), Uuid::now_v7()).await;

    let applied = h.expect_applied(2).await;
    assert_eq!(applied.iter().filter(|(id, ..)| *id == event_id).count(), 1);
    assert_eq!(
        h.behavior.calls.load(Ordering::SeqCst),
        2,
        "the handler ran twice"
    );
    assert!(h.dead_letters().await.is_empty());
}

/// The consumer commits an event but its acknowledgement never reaches the
/// broker (the connection went silent, then dropped): the broker delivers
/// the event again to the consumer's next session, which acknowledges it
/// without a second application.
#[tokio::test(flavor = "multi_thread")]
async fn a_redelivery_after_a_reconnection_is_acknowledged_without_a_second_effect() {
    let mut h = harness().await;
    let proxy = TcpProxy::start(shop_testkit::amqp_addr().await).await.unwrap();
    *h.behavior.hold_user.lock().unwrap() = Some("u1".to_owned());
    h.start_with(AmqpConfig::new(proxy.url_for(&shop_testkit::amqp_url())))
        .await;
    let event_id = Uuid::now_v7();
    h.publish(&created("u1", 1), event_id).await;
    shop_testkit::eventually("the handler to hold u1", Duration::from_secs(10), || async {
        (h.behavior.calls.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;

    // Silence first, so the acknowledgement after the commit is lost.
    assert!(proxy.freeze() >= 1);
    h.behavior.release.notify_one();
    shop_testkit::eventually("u1 committed", Duration::from_secs(10), || async {
        (h.applied().await.len() == 1).then_some(())
    })
    .await;
    let connections = proxy.accepted();
    proxy.cut();
    h.publish(&created("u3", 1), Uuid::now_v7()).await;

    let applied = h.expect_applied(2).await;
    assert_eq!(applied[0].0, event_id);
    assert_eq!(applied[1].1, "u3");
    assert!(
        proxy.accepted() > connections,
        "the consumer reconnected ({} connections)",
        proxy.accepted()
    );
    assert_eq!(
        h.behavior.calls.load(Ordering::SeqCst),
        2,
        "the redelivered u1 never reached the handler"
    );
}

/// Acknowledged only after the commit: the consumer is killed (its task
/// dropped, its broker and database connections cut, as a killed process's
/// are) while its handler holds the event inside the transaction. Nothing
/// was committed, so nothing may have been acknowledged: the broker has the
/// event back and delivers it again, flagged as a redelivery, and the next
/// session applies it once. A consumer that acknowledged before committing
/// loses the event here.
#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_killed_inside_its_transaction_gets_the_event_again_and_applies_it_once() {
    let mut h = harness().await;
    let broker_proxy = TcpProxy::start(shop_testkit::amqp_addr().await).await.unwrap();
    let database_proxy = TcpProxy::start(shop_testkit::postgres_addr().await)
        .await
        .unwrap();
    h.consumer_pool = shop_database::pool(&h.db.config_via(&database_proxy)).unwrap();
    *h.behavior.hold_user.lock().unwrap() = Some("u1".to_owned());
    h.start_with(AmqpConfig::new(broker_proxy.url_for(&shop_testkit::amqp_url())))
        .await;
    let event_id = Uuid::now_v7();
    h.publish(&created("u1", 1), event_id).await;
    shop_testkit::eventually("the handler to hold u1", Duration::from_secs(10), || async {
        (h.behavior.calls.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    shop_testkit::eventually(
        "the consumer's transaction open",
        Duration::from_secs(10),
        || async { (h.sessions_in_transaction().await == 1).then_some(()) },
    )
    .await;

    h.crash().await;
    let (broker_connections, database_connections) = (broker_proxy.live(), database_proxy.live());
    broker_proxy.cut();
    database_proxy.cut();
    assert!(
        broker_connections >= 1 && database_connections >= 1,
        "the killed consumer held connections to drop (broker {broker_connections}, database {database_connections})"
    );
    shop_testkit::eventually(
        "the open transaction rolled back",
        Duration::from_secs(10),
        || async { (h.sessions_in_transaction().await == 0).then_some(()) },
    )
    .await;
    shop_testkit::eventually(
        "u1 back in its queue, unacknowledged",
        Duration::from_secs(10),
        || async { (h.waiting().await == 1).then_some(()) },
    )
    .await;
    assert!(h.applied().await.is_empty(), "nothing committed");

    h.restart().await;
    let applied = h.expect_applied(1).await;
    assert_eq!(applied[0].0, event_id);
    assert_eq!(
        *h.behavior.deliveries.lock().unwrap(),
        [("u1".to_owned(), 1, false), ("u1".to_owned(), 1, true)],
        "delivered, then redelivered by the broker"
    );
    assert!(h.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_go_to_the_dead_letter_queue_at_once_and_the_next_message_is_applied() {
    let mut h = harness().await;
    h.start().await;
    let props = |kind: Option<&str>, id: Option<String>| {
        let mut p = BasicProperties::default().with_content_type(CONTENT_TYPE.into());
        if let Some(kind) = kind {
            p = p.with_type(kind.into());
        }
        if let Some(id) = id {
            p = p.with_message_id(id.as_str().into());
        }
        p
    };

    // Signed by the producer, so each meets the check it fails.
    let id = || Uuid::now_v7().to_string();
    h.publish_raw_signed(
        "user.created",
        b"\xff\xff\xff not protobuf",
        signable(UserCreated::TYPE_NAME, &id(), "poison-1", 1),
    )
    .await;
    h.publish_raw_signed(
        "user.created",
        b"",
        signable("shop.user.v1.Nonsense", &id(), "poison-2", 1),
    )
    .await;
    h.publish_raw_signed(
        "user.created",
        b"",
        signable(UserCreated::TYPE_NAME, "not-a-uuid", "poison-3", 1),
    )
    .await;
    // Without a message id it cannot be signed: a stranger's.
    h.publish_raw("user.created", b"", props(Some(UserCreated::TYPE_NAME), None))
        .await;
    h.publish(&created("good", 1), Uuid::now_v7()).await;

    let applied = h.expect_applied(1).await;
    assert_eq!(applied[0].1, "good");
    let letters = h.expect_dead_letters(4).await;
    // Two workers: the order in the dead-letter queue is not the publish order.
    let mut reasons: Vec<_> = letters.iter().map(|l| l.reason.as_str()).collect();
    reasons.sort_unstable();
    assert_eq!(
        reasons,
        [
            "missing-message-id",
            "unauthenticated",
            "undecodable",
            "unknown-type"
        ]
    );
    for letter in &letters {
        assert_eq!(letter.original_exchange.as_deref(), Some(h.exchange.as_str()));
        assert_eq!(letter.original_routing_key.as_deref(), Some("user.created"));
        assert_eq!(letter.attempts, Some(1));
        assert!(letter.error.as_deref().is_some_and(|e| !e.is_empty()));
        assert!(letter.dead_lettered_at.is_some());
        assert_eq!(
            letter.headers.get("original_queue").map(String::as_str),
            Some(h.queue.as_str())
        );
    }
    let undecodable = letters.iter().find(|l| l.reason == "undecodable").unwrap();
    assert!(
        undecodable
            .error
            .as_deref()
            .unwrap()
            .contains("not a valid shop.user.v1.UserCreated")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_failing_twice_then_succeeding_is_applied_once_after_retries() {
    let mut h = harness().await;
    h.behavior.fail_times.store(2, Ordering::SeqCst);
    h.start().await;
    let started = tokio::time::Instant::now();

    h.publish(&created("flaky", 1), Uuid::now_v7()).await;

    let applied = h.expect_applied(1).await;
    assert_eq!(applied[0].1, "flaky");
    assert_eq!(h.behavior.calls.load(Ordering::SeqCst), 3);
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "waited out both delays (200 ms + 400 ms)"
    );
    assert!(h.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_message_does_not_hold_up_the_others() {
    let mut h = harness().await;
    *h.behavior.fail_user.lock().unwrap() = Some("stuck".to_owned());
    h.start().await;

    h.publish(&created("stuck", 1), Uuid::now_v7()).await;
    for i in 0..20 {
        h.publish(&created(&format!("next-{i}"), 1), Uuid::now_v7()).await;
    }

    let applied = h.expect_applied(20).await;
    assert!(applied.iter().all(|(_, user, _)| user != "stuck"));
    let letters = h.expect_dead_letters(1).await;
    assert_eq!(letters[0].reason, "max-attempts");
    assert_eq!(letters[0].error.as_deref(), Some("failing on purpose for stuck"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_that_always_fails_is_dead_lettered_after_the_last_attempt_with_every_header() {
    let mut h = harness().await;
    h.behavior.always_fail.store(true, Ordering::SeqCst);
    h.start().await;
    let event_id = Uuid::now_v7();

    h.publish(&created("doomed", 1), event_id).await;

    let letters = h.expect_dead_letters(1).await;
    let letter = &letters[0];
    assert_eq!(letter.reason, "max-attempts");
    assert_eq!(letter.attempts, Some(3));
    assert_eq!(letter.error.as_deref(), Some("failing on purpose"));
    assert_eq!(letter.message_id.as_deref(), Some(event_id.to_string().as_str()));
    assert_eq!(letter.type_name.as_deref(), Some(UserCreated::TYPE_NAME));
    assert_eq!(letter.original_exchange.as_deref(), Some(h.exchange.as_str()));
    assert_eq!(
        letter.original_routing_key.as_deref(),
        Some(UserCreated::ROUTING_KEY)
    );
    assert!(letter.dead_lettered_at.is_some());
    assert_eq!(h.behavior.calls.load(Ordering::SeqCst), 3);
    assert!(h.applied().await.is_empty());

    // Fixed: replay applies it once.
    h.behavior.always_fail.store(false, Ordering::SeqCst);
    let dlq = shop_messaging::dlq::DeadLetters::connect(&h.broker.config(), &h.queue)
        .await
        .unwrap();
    let outcome = dlq.replay(&Default::default()).await.unwrap();
    dlq.close().await;
    assert_eq!((outcome.replayed, outcome.kept), (1, 0));
    let applied = h.expect_applied(1).await;
    assert_eq!(applied[0].0, event_id);
    assert!(h.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_handler_error_is_dead_lettered_at_once() {
    let mut h = harness().await;
    h.behavior.reject.store(true, Ordering::SeqCst);
    h.start().await;

    h.publish(&created("refused", 1), Uuid::now_v7()).await;

    let letters = h.expect_dead_letters(1).await;
    assert_eq!(letters[0].reason, "rejected");
    assert_eq!(letters[0].attempts, Some(1));
    assert_eq!(h.behavior.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_consumer_resumes_after_its_broker_connection_is_cut_and_applies_every_event_once() {
    let mut h = harness().await;
    let proxy = TcpProxy::start(shop_testkit::amqp_addr().await).await.unwrap();
    h.start_with(AmqpConfig::new(proxy.url_for(&shop_testkit::amqp_url())))
        .await;
    let mut connected = h.connected.clone();
    let mut ids = Vec::new();

    for i in 0..200 {
        let id = Uuid::now_v7();
        ids.push(id);
        h.publish(&created(&format!("user-{i}"), 1), id).await;
        if i == 50 || i == 120 {
            // Mid-stream: cut, and let it reconnect before going on.
            proxy.cut();
            tokio::time::timeout(Duration::from_secs(10), connected.wait_for(|c| !*c))
                .await
                .unwrap()
                .unwrap();
            tokio::time::timeout(Duration::from_secs(20), connected.wait_for(|c| *c))
                .await
                .unwrap()
                .unwrap();
        }
    }
    // Updates published while disconnected wait in the queue.
    proxy.cut();
    for i in 0..20 {
        let id = Uuid::now_v7();
        ids.push(id);
        h.publish(
            &UserUpdated {
                user_id: format!("user-{i}"),
                version: 2,
                email: String::new(),
                name: String::new(),
                occurred_at: None,
            },
            id,
        )
        .await;
    }

    tokio::time::timeout(Duration::from_secs(20), connected.wait_for(|c| *c))
        .await
        .unwrap()
        .unwrap();
    assert!(
        proxy.accepted() >= 3,
        "the consumer reconnected ({} connections)",
        proxy.accepted()
    );

    let applied = h.expect_applied(220).await;
    let mut seen: Vec<_> = applied.iter().map(|(id, ..)| *id).collect();
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids, "every event applied exactly once");
    assert!(h.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_consumer_reports_disconnected_while_the_broker_refuses_it() {
    let mut h = harness().await;
    let proxy = TcpProxy::start(shop_testkit::amqp_addr().await).await.unwrap();
    h.start_with(AmqpConfig::new(proxy.url_for(&shop_testkit::amqp_url())))
        .await;
    let mut connected = h.connected.clone();

    proxy.refuse(true);
    proxy.cut();
    tokio::time::timeout(Duration::from_secs(10), connected.wait_for(|c| !*c))
        .await
        .unwrap()
        .unwrap();
    proxy.refuse(false);
    tokio::time::timeout(Duration::from_secs(20), connected.wait_for(|c| *c))
        .await
        .unwrap()
        .unwrap();

    h.publish(&created("after", 1), Uuid::now_v7()).await;
    h.expect_applied(1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_queue_is_bound_only_to_the_subscribed_routing_keys() {
    let mut h = harness().await;
    h.start().await;
    let mut headers = FieldTable::default();
    headers.insert("aggregate_id".into(), AMQPValue::LongString("x".into()));

    // Not subscribed: never reaches the queue (no dead letter either).
    h.publish_raw(
        "user.deleted",
        b"",
        BasicProperties::default().with_headers(headers),
    )
    .await;
    h.publish(&created("bound", 1), Uuid::now_v7()).await;

    h.expect_applied(1).await;
    assert!(h.dead_letters().await.is_empty());
}
