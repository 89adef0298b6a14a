//! A consumer group's routing on the real broker: every event reaches the
//! partition queue of its aggregate exactly once, whichever way it carries
//! its partition, and a group bound the way of an older release is re-bound.

use std::time::Duration;

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use shop_messaging::topology::ConsumerTopology;
use shop_messaging::wire;
use shop_testkit::{TestBroker, TestPublisher, amqp_url};
use uuid::Uuid;

use crate::support::created;

fn topology(broker: &TestBroker, partitions: u16) -> ConsumerTopology {
    let topology = ConsumerTopology {
        partitions,
        routing_keys: vec!["user.created".to_owned()],
        ..crate::support::config(broker).topology()
    };
    broker.track_topology(&topology);
    topology
}

/// How many messages each partition queue holds.
async fn counts(channel: &lapin::Channel, topology: &ConsumerTopology) -> Vec<u32> {
    let mut counts = Vec::new();
    for index in 0..topology.partition_count() {
        let queue = channel
            .queue_declare(
                topology.partition_queue(index).as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        counts.push(queue.message_count());
    }
    counts
}

/// Waits until `count` messages are in the group's partition queues (a
/// publish confirm means routed, but a quorum queue counts it a moment
/// later), then how many each holds, and empties them. (Partition queues
/// have a single active consumer, which rules out `basic.get`.)
async fn take(channel: &lapin::Channel, topology: &ConsumerTopology, count: u32) -> Vec<u32> {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while counts(channel, topology).await.iter().sum::<u32>() < count && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Anything more would be a copy.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let taken = counts(channel, topology).await;
    for index in 0..topology.partition_count() {
        channel
            .queue_purge(
                topology.partition_queue(index).as_str().into(),
                QueuePurgeOptions::default(),
            )
            .await
            .unwrap();
    }
    taken
}

/// The counts of `take` when one event lands on queue `index`.
fn one_on(topology: &ConsumerTopology, index: u16) -> Vec<u32> {
    (0..topology.partition_count())
        .map(|queue| u32::from(queue == index))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_event_reaches_its_aggregates_partition_queue_once_by_cc_by_header_or_on_partition_zero() {
    let (broker, _connection, channel) = connect().await;
    let topology = topology(&broker, 4);
    // The producer declares its exchange; the group only looks it up.
    let publisher = TestPublisher::connect(&topology.exchange).await.unwrap();
    topology.declare(&channel).await.unwrap();

    // As the relay publishes: the partition in the CC header and in the
    // `partition` header.
    let users: Vec<String> = (0..40).map(|i| format!("user-{i}")).collect();
    for user in &users {
        publisher
            .publish(&topology.exchange, &created(user, 1), Uuid::now_v7())
            .await
            .unwrap();
    }
    // Written down, not computed with the code under test: FNV-1a (32-bit)
    // of `user-0` … `user-39` modulo 32 is 7, 20, 13, 26, 27, 8, 1, 14, 15,
    // 28, 12, 31, 18, 5, 0, 19, 6, 25, 4, 23, 7, 20, 13, 26, 27, 8, 1, 14,
    // 15, 28, 30, 17, 24, 11, 10, 29, 4, 23, 6, 25; modulo the 4 queues:
    assert_eq!(take(&channel, &topology, 40).await, [11, 9, 9, 11]);

    // A producer that sets only the `partition` header (an older relay):
    // the headers exchange behind the direct one routes it.
    publish_without_cc(&publisher, &topology, "old-relay", Some(7)).await;
    assert_eq!(
        take(&channel, &topology, 1).await,
        one_on(&topology, topology.queue_of(7))
    );

    // Neither: partition 0.
    publish_without_cc(&publisher, &topology, "no-partition", None).await;
    assert_eq!(take(&channel, &topology, 1).await, one_on(&topology, 0));
}

/// Publishes an event of `aggregate_id` without the `CC` header, with the
/// `partition` header when given.
async fn publish_without_cc(
    publisher: &TestPublisher,
    topology: &ConsumerTopology,
    aggregate_id: &str,
    partition: Option<i16>,
) {
    let mut headers = FieldTable::default();
    headers.insert(wire::AGGREGATE_ID.into(), wire::long_string(aggregate_id));
    if let Some(partition) = partition {
        headers.insert(wire::PARTITION.into(), AMQPValue::ShortInt(partition));
    }
    publisher
        .publish_raw(
            &topology.exchange,
            "user.created",
            b"",
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap();
}

/// A fresh namespace and a connection to the broker.
async fn connect() -> (TestBroker, Connection, lapin::Channel) {
    shop_testkit::init_test_log();
    let broker = TestBroker::new();
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    (broker, connection, channel)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_bound_the_old_way_is_rebound_to_the_direct_exchange_only() {
    let (broker, _connection, channel) = connect().await;
    let topology = topology(&broker, 2);
    // The layout before the direct exchange: the producer's exchange bound
    // straight to the group's headers exchange.
    shop_messaging::topology::declare_event_exchange(&channel, &topology.exchange)
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "alternate-exchange".into(),
        wire::long_string(&topology.unpartitioned()),
    );
    channel
        .exchange_declare(
            topology.router().as_str().into(),
            ExchangeKind::Custom("headers".into()),
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            args,
        )
        .await
        .unwrap();
    channel
        .exchange_bind(
            topology.router().as_str().into(),
            topology.exchange.as_str().into(),
            "user.created".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    topology.declare(&channel).await.unwrap();
    let publisher = TestPublisher::connect(&topology.exchange).await.unwrap();
    publisher
        .publish(&topology.exchange, &created("once", 1), Uuid::now_v7())
        .await
        .unwrap();
    // FNV-1a of `once` modulo 32 is 4: queue 0 of 4.
    assert_eq!(take(&channel, &topology, 1).await, one_on(&topology, 0));

    // Every event now passes the direct exchange alone: without it,
    // nothing reaches the group (the old binding to the headers exchange,
    // which would cost the broker a comparison per partition, is gone).
    channel
        .exchange_delete(topology.route().as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    publisher
        .publish(&topology.exchange, &created("twice", 1), Uuid::now_v7())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(take(&channel, &topology, 0).await, one_on(&topology, u16::MAX));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_never_declares_its_producers_exchange_and_waits_for_it() {
    let (broker, connection, channel) = connect().await;
    let topology = topology(&broker, 2);

    let missing = topology.declare(&channel).await.unwrap_err();

    assert!(
        missing.to_string().contains("NOT_FOUND") || format!("{missing:?}").contains("NotFound"),
        "{missing:?}"
    );
    // Still not there: the group did not create it.
    let probe = connection.create_channel().await.unwrap();
    assert!(
        shop_messaging::topology::ensure_event_exchange(&probe, &topology.exchange)
            .await
            .is_err()
    );
    // Once its producer has declared it, the group's declaration goes through.
    let _publisher = TestPublisher::connect(&topology.exchange).await.unwrap();
    let retry = connection.create_channel().await.unwrap();
    topology.declare(&retry).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_of_partition_queues_that_dead_lettered_through_the_default_exchange_move_to_the_new_ones() {
    let (broker, connection, channel) = connect().await;
    let topology = topology(&broker, 2);
    let publisher = TestPublisher::connect(&topology.exchange).await.unwrap();
    // The layout before `<group>.queues`: partition queues `<group>.p<i>`
    // dead-lettering through the default exchange, bound to the group's
    // exchanges, holding messages.
    topology.declare(&channel).await.unwrap();
    let old: Vec<String> = (0..2)
        .map(|index| format!("{}.p{index}", topology.queue))
        .collect();
    for (index, queue) in old.iter().enumerate() {
        broker.track_queue(queue);
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        args.insert(
            "x-dead-letter-routing-key".into(),
            wire::long_string(&topology.dead_letter_queue()),
        );
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .unwrap();
        for partition in (0..wire::PARTITIONS).filter(|p| usize::from(p.unsigned_abs() % 2) == index) {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    topology.route().as_str().into(),
                    wire::partition_routing_key(partition).as_str().into(),
                    lapin::options::QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
    }
    let users: Vec<String> = (0..10).map(|i| format!("old-{i}")).collect();
    // Unbind the new queues for a moment, so the events land on the old ones
    // only, as they did before the upgrade.
    for index in 0..2 {
        for partition in 0..wire::PARTITIONS {
            channel
                .queue_unbind(
                    topology.partition_queue(index).as_str().into(),
                    topology.route().as_str().into(),
                    wire::partition_routing_key(partition).as_str().into(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
    }
    for user in &users {
        publisher
            .publish(&topology.exchange, &created(user, 1), Uuid::now_v7())
            .await
            .unwrap();
    }
    topology.declare(&channel).await.unwrap();

    let user = shop_messaging::AmqpConfig::new(amqp_url()).user();
    let moved = topology.retire(&connection, &user).await.unwrap();

    assert_eq!(moved, users.len());
    // FNV-1a of `old-0` … `old-9` modulo 32: 3, 16, 9, 22, 15, 28, 21, 2,
    // 27, 8; five odd, five even.
    assert_eq!(take(&channel, &topology, 10).await, [5, 5]);
    for queue in &old {
        let probe = connection.create_channel().await.unwrap();
        let gone = probe
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        assert!(gone.is_err(), "{queue} is still there");
    }
}
