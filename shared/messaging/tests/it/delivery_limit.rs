//! The broker's delivery limit is no poison rule: returns (hand-overs,
//! self-fencing, restarts) never dead-letter an event, partition queues of
//! the layout that had a limit of 20 are moved over in order, and a message
//! that kills its consumer every time is dead-lettered by the consumer's
//! own count, kept in its database.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt as _;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use shop_messaging::AmqpConfig;
use shop_messaging::topology::ConsumerTopology;
use shop_messaging::wire;
use shop_testkit::{TcpProxy, TestBroker, TestPublisher, amqp_url};
use uuid::Uuid;

use crate::support::{Harness, created, depth, harness_with, updated};

/// A group of one partition queue, declared, with its producer's exchange.
async fn declared(broker: &TestBroker) -> (ConsumerTopology, Connection, TestPublisher) {
    shop_testkit::init_test_log();
    let topology = ConsumerTopology {
        partitions: 1,
        routing_keys: vec!["user.created".to_owned(), "user.updated".to_owned()],
        ..crate::support::config(broker).topology()
    };
    broker.track_topology(&topology);
    let publisher = TestPublisher::connect(&topology.exchange).await.unwrap();
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    topology.declare(&channel).await.unwrap();
    (topology, connection, publisher)
}

/// Declares `queue` again as a quorum queue with `args`: the broker refuses
/// (and closes the channel) when they differ from the queue's own.
async fn redeclare(connection: &Connection, queue: &str, mut args: FieldTable) -> lapin::Result<()> {
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    let channel = connection.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await;
    if channel.status().connected() {
        let _ = channel.close(200, "declared".into()).await;
    }
    declared.map(|_| ())
}

/// A partition queue's `x-delivery-limit` is one no return reaches: the
/// broker accepts the queue again with exactly that limit and refuses it
/// with the limit of the layout before (20) or none (RabbitMQ 3.10, here,
/// checks the argument's equivalence, so this reads the queue's argument).
#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_partition_queue_has_a_delivery_limit_no_return_reaches() {
    let broker = TestBroker::new();
    let (topology, connection, _publisher) = declared(&broker).await;
    let queue = topology.partition_queue(0);
    assert!(queue.ends_with(".ordered.0"), "{queue}");

    let mut args = topology.partition_queue_args();
    assert_eq!(
        args.inner().get("x-delivery-limit"),
        Some(&AMQPValue::LongInt(i32::MAX))
    );
    redeclare(&connection, &queue, args.clone()).await.unwrap();
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(20));
    let refused = redeclare(&connection, &queue, args.clone()).await;
    assert!(refused.is_err(), "a limit of 20 accepted: {refused:?}");
    let mut without = FieldTable::default();
    for (key, value) in args.inner() {
        if key.as_str() != "x-delivery-limit" {
            without.insert(key.clone(), value.clone());
        }
    }
    let refused = redeclare(&connection, &queue, without).await;
    assert!(refused.is_err(), "no limit accepted: {refused:?}");
}

/// Hand-overs return the prefetch: a consumer takes the messages into its
/// prefetch and is cancelled (a hand-over) or its channel closed (a
/// replica fencing itself, or dying), 30 times over, more than the old
/// limit of 20. The broker counts every return (`x-delivery-count`), and
/// dead-letters nothing.
#[tokio::test(flavor = "multi_thread")]
async fn thirty_hand_overs_with_messages_in_the_prefetch_dead_letter_nothing() {
    let broker = TestBroker::new();
    let (topology, connection, publisher) = declared(&broker).await;
    let queue = topology.partition_queue(0);
    for user in 0..5 {
        publisher
            .publish(
                &topology.exchange,
                &created(&format!("hand-over-{user}"), 1),
                Uuid::now_v7(),
            )
            .await
            .unwrap();
    }

    let mut delivery_counts = Vec::new();
    for round in 0..30 {
        let channel = connection.create_channel().await.unwrap();
        channel
            .basic_qos(10, BasicQosOptions { global: false })
            .await
            .unwrap();
        let tag = format!("hand-over-{round}");
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut taken = Vec::new();
        while taken.len() < 5 {
            match tokio::time::timeout(Duration::from_secs(5), consumer.next()).await {
                Ok(Some(Ok(delivery))) => taken.push(delivery),
                _ => break,
            }
        }
        assert_eq!(
            taken.len(),
            5,
            "round {round}: the messages are all still in the queue"
        );
        delivery_counts.push(
            taken
                .iter()
                .map(|delivery| {
                    delivery
                        .properties
                        .headers()
                        .as_ref()
                        .and_then(|headers| wire::header_i64(headers, "x-delivery-count"))
                        .unwrap_or(0)
                })
                .min()
                .unwrap_or(0),
        );
        if round % 2 == 0 {
            // A hand-over: the consumer cancelled, then its channel closed.
            channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions { nowait: false })
                .await
                .unwrap();
        }
        channel.close(200, "handed over".into()).await.unwrap();
    }

    // The fault really happened: every round got the messages back, the
    // broker counting each return.
    assert_eq!(delivery_counts.first(), Some(&0));
    assert!(
        delivery_counts.last().copied().unwrap_or(0) >= 29,
        "returns counted: {delivery_counts:?}"
    );
    assert_eq!(depth(&queue).await, Some(5));
    assert_eq!(depth(&topology.dead_letter_queue()).await, Some(0));
}

/// The layout before: `<group>.partition.<i>` with a delivery limit of
/// 20, holding a backlog. The next start moves it to the new queue in its
/// order and deletes it.
#[tokio::test(flavor = "multi_thread")]
async fn a_partition_queue_of_the_layout_with_a_delivery_limit_is_moved_over_in_order() {
    let broker = TestBroker::new();
    let (topology, connection, publisher) = declared(&broker).await;
    let old = format!("{}.partition.0", topology.queue);
    broker.track_queue(&old);
    let channel = connection.create_channel().await.unwrap();
    let mut args = topology.partition_queue_args();
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(20));
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    channel
        .queue_declare(
            old.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .unwrap();
    // Before the upgrade, the events reached the old queue only.
    for partition in 0..wire::PARTITIONS {
        let key = wire::partition_routing_key(partition);
        channel
            .queue_bind(
                old.as_str().into(),
                topology.route().as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_unbind(
                topology.partition_queue(0).as_str().into(),
                topology.route().as_str().into(),
                key.as_str().into(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    publisher
        .publish(&topology.exchange, &created("moved", 1), Uuid::now_v7())
        .await
        .unwrap();
    for version in 2..=10 {
        publisher
            .publish(&topology.exchange, &updated("moved", version), Uuid::now_v7())
            .await
            .unwrap();
    }
    shop_testkit::eventually(
        "the backlog in the old queue",
        Duration::from_secs(10),
        || async { (depth(&old).await == Some(10)).then_some(()) },
    )
    .await;

    topology.declare(&channel).await.unwrap();
    let user = AmqpConfig::new(amqp_url()).user();
    let moved = topology.retire(&connection, &user).await.unwrap();

    assert_eq!(moved, 10);
    assert_eq!(depth(&old).await, None, "{old} is deleted");
    let consuming = connection.create_channel().await.unwrap();
    let mut consumer = consuming
        .basic_consume(
            topology.partition_queue(0).as_str().into(),
            "moved".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut versions = Vec::new();
    while versions.len() < 10 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("the moved events")
            .unwrap()
            .unwrap();
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        versions.push(wire::header_i64(&headers, wire::AGGREGATE_VERSION).unwrap_or(0));
    }
    assert_eq!(versions, (1..=10).collect::<Vec<i64>>(), "in their order");
}

/// A message that takes its consumer down every time (its handler never
/// returns, and the process is killed: task dropped, connections cut) is
/// redelivered after each restart; the consumer counts each start of its
/// handling in its database, and past `CONSUMER_MAX_ATTEMPTS` (3 here)
/// dead-letters it as `crashed`, its aggregate's next event parked behind
/// it, nothing else dead-lettered. The broker's limit never gets there.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_that_kills_its_consumer_every_time_is_dead_lettered_by_the_consumers_own_count() {
    let mut h = harness_with(|mut config, _| {
        config.partitions = 1;
        config
    })
    .await;
    let (broker_proxy, database_proxy) = killable(&mut h).await;
    *h.behavior.hang_user.lock().unwrap() = Some("poison".to_owned());
    h.start_with(AmqpConfig::new(broker_proxy.url_for(&amqp_url())))
        .await;
    let poison = Uuid::now_v7();
    h.publish(&created("poison", 1), poison).await;
    h.publish(&updated("poison", 2), Uuid::now_v7()).await;
    h.publish(&created("innocent", 1), Uuid::now_v7()).await;

    let mut kills = 0;
    // Killed whenever the poison is being handled, until it is
    // dead-lettered instead (or, as the broker's limit of 20 would have it,
    // never: the test stops at 6 kills).
    while kills <= 6 {
        let calls = kills + 1;
        let handling = shop_testkit::eventually(
            "the poison handled or dead-lettered",
            Duration::from_secs(20),
            || async {
                if handlings(&h.behavior, "poison") >= calls {
                    Some(true)
                } else if !h.dead_letters().await.is_empty() {
                    Some(false)
                } else {
                    None
                }
            },
        )
        .await;
        if !handling {
            break;
        }
        h.crash().await;
        broker_proxy.cut();
        database_proxy.cut();
        kills += 1;
        shop_testkit::eventually(
            "the killed consumer's messages back in the queue",
            Duration::from_secs(10),
            || async { (h.waiting().await == 3).then_some(()) },
        )
        .await;
        h.restart().await;
    }

    let letters = h.expect_dead_letters(1).await;
    assert_eq!(
        letters[0].message_id.as_deref(),
        Some(poison.to_string().as_str())
    );
    assert_eq!(letters[0].reason, "crashed");
    assert!(
        letters[0]
            .error
            .as_deref()
            .is_some_and(|error| error.starts_with("crashed the consumer 4 times")),
        "{:?}",
        letters[0].error
    );
    // Killed on its first handling and on three counted ones; the fifth
    // start found it past the limit and did not call the handler.
    assert_eq!(kills, 4);
    assert_eq!(handlings(&h.behavior, "poison"), 4);
    let applied = h.expect_applied(1).await;
    assert_eq!(applied[0].1, "innocent");
    let parked = count(
        &h,
        "SELECT count(*) AS n FROM inbox_parked WHERE aggregate_id = 'poison'",
    )
    .await;
    assert_eq!(parked, 1, "poison v2 waits behind its dead letter");
    assert_eq!(
        count(&h, "SELECT count(*) AS n FROM inbox_crashes").await,
        0,
        "counts forgotten"
    );
    assert_eq!(
        std::sync::atomic::AtomicU32::load(&h.behavior.calls, Ordering::SeqCst),
        5,
        "4 poison, 1 innocent"
    );
}

/// Proxies to the broker and to the database for the consumer of `h`,
/// whose connections the test cuts when it kills the consumer (as a killed
/// process's go).
async fn killable(h: &mut Harness) -> (TcpProxy, TcpProxy) {
    let broker_proxy = TcpProxy::start(shop_testkit::amqp_addr().await).await.unwrap();
    let database_proxy = TcpProxy::start(shop_testkit::postgres_addr().await)
        .await
        .unwrap();
    h.consumer_pool = shop_database::pool(&h.db.config_via(&database_proxy)).unwrap();
    (broker_proxy, database_proxy)
}

/// Handler calls for `user` so far.
fn handlings(behavior: &crate::support::Behavior, user: &str) -> usize {
    behavior
        .deliveries
        .lock()
        .unwrap()
        .iter()
        .filter(|(id, _, _)| id == user)
        .count()
}

/// The single `n` of `query`, on the test's own connection.
async fn count(h: &Harness, query: &str) -> i64 {
    use diesel_async::RunQueryDsl as _;
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = h.pool.get().await.unwrap();
    diesel::sql_query(query)
        .get_result::<Count>(&mut conn)
        .await
        .unwrap()
        .n
}

/// The case: a replica killed and restarted 25 times (more than the
/// old limit of 20) with a backlog in its prefetch, while its database is
/// locked (the positions and the crash counts, so nothing can be applied or
/// counted): every kill returns the whole backlog to the broker. Once the
/// lock goes, everything is applied and nothing was dead-lettered, by the
/// broker or by the consumer.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_killed_25_times_with_a_backlog_and_its_database_locked_loses_nothing_to_a_delivery_limit()
{
    use diesel_async::RunQueryDsl as _;
    let mut h = harness_with(|mut config, _| {
        config.partitions = 1;
        // The killed replica's partition moves to its successor after this.
        config.member_timeout = Duration::from_millis(500);
        config
    })
    .await;
    let (broker_proxy, database_proxy) = killable(&mut h).await;
    // A connection of its own, outside the pools (whose
    // idle-in-transaction timeout would end the lock), closed with the test
    // even when it fails.
    let mut locker =
        <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(h.db.url())
            .await
            .unwrap();
    diesel::sql_query("BEGIN").execute(&mut locker).await.unwrap();
    diesel::sql_query("LOCK TABLE inbox_sequence, inbox_crashes IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    h.start_with(AmqpConfig::new(broker_proxy.url_for(&amqp_url())))
        .await;
    h.publish(&created("backlog", 1), Uuid::now_v7()).await;
    for version in 2..=30 {
        h.publish(&updated("backlog", version), Uuid::now_v7()).await;
    }

    // Generous deadlines: with a member timeout of 500 ms, a loaded machine
    // may fence and rejoin the restarted replica a few times before it
    // keeps its partition.
    for kill in 0..25 {
        shop_testkit::eventually(
            &format!("the backlog in the prefetch before kill {kill}"),
            Duration::from_secs(60),
            || async { (h.waiting().await == 0).then_some(()) },
        )
        .await;
        h.crash().await;
        broker_proxy.cut();
        database_proxy.cut();
        shop_testkit::eventually(
            &format!("the backlog returned by kill {kill}"),
            Duration::from_secs(60),
            || async {
                let waiting = h.waiting().await;
                (waiting == 30).then_some(())
            },
        )
        .await;
        h.restart().await;
    }
    assert!(h.applied().await.is_empty(), "nothing applied while locked");
    diesel::sql_query("ROLLBACK").execute(&mut locker).await.unwrap();

    let applied = h.expect_applied(30).await;
    let versions: Vec<i64> = applied.iter().map(|(_, _, version)| *version).collect();
    assert_eq!(versions, (1..=30).collect::<Vec<i64>>());
    assert!(h.dead_letters().await.is_empty());
    assert!(
        h.behavior
            .deliveries
            .lock()
            .unwrap()
            .iter()
            .all(|(_, _, redelivered)| *redelivered),
        "handled after the broker had them back"
    );
    assert_eq!(count(&h, "SELECT count(*) AS n FROM inbox_crashes").await, 0);
}
