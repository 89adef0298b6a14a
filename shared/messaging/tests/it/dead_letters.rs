//! Listing, showing, selective replay and purge of dead letters.

use std::sync::atomic::Ordering;

use shop_contracts::Event as _;
use shop_contracts::user::UserCreated;
use shop_messaging::dlq::{DeadLetters, Selection};
use uuid::Uuid;

use crate::support::{created, harness, signable};

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_listed_by_reason_shown_replayed_selectively_and_purged() {
    let mut h = harness().await;
    h.behavior.reject.store(true, Ordering::SeqCst);
    h.start().await;
    let rejected = Uuid::now_v7();
    h.publish(&created("refused", 1), rejected).await;
    let undecodable = Uuid::now_v7().to_string();
    h.publish_raw_signed(
        "user.created",
        b"\xff",
        signable(UserCreated::TYPE_NAME, &undecodable, "garbled", 1),
    )
    .await;
    h.expect_dead_letters(2).await;
    let dlq = DeadLetters::connect(&h.broker.config(), &h.queue).await.unwrap();

    let summary = dlq.summary().await.unwrap();
    assert_eq!(summary.count, 2);
    assert_eq!(summary.by_reason.get("rejected"), Some(&1));
    assert_eq!(summary.by_reason.get("undecodable"), Some(&1));
    assert_eq!(summary.by_type.get(UserCreated::TYPE_NAME), Some(&2));
    // Listing does not consume.
    assert_eq!(dlq.summary().await.unwrap().count, 2);

    let shown = dlq.show(&rejected.to_string()).await.unwrap().expect("shown");
    assert_eq!(shown.reason, "rejected");
    let decoded = shop_contracts::describe_event(UserCreated::TYPE_NAME, &shown.body)
        .unwrap()
        .unwrap();
    assert!(decoded.contains("refused"), "{decoded}");
    assert!(dlq.show(&Uuid::now_v7().to_string()).await.unwrap().is_none());

    // Replay only the rejected one, now that the handler accepts it.
    h.behavior.reject.store(false, Ordering::SeqCst);
    let outcome = dlq
        .replay(&Selection {
            reason: Some("rejected".to_owned()),
            ..Selection::default()
        })
        .await
        .unwrap();
    assert_eq!((outcome.replayed, outcome.kept), (1, 1));
    let applied = h.expect_applied(1).await;
    assert_eq!(applied[0].0, rejected);

    let left = h.dead_letters().await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].message_id.as_deref(), Some(undecodable.as_str()));
    assert_eq!(dlq.purge().await.unwrap(), 1);
    assert!(h.dead_letters().await.is_empty());
    dlq.close().await;
}

/// A quorum queue counts every message handed back unacknowledged as a
/// delivery (`x-delivery-count`), and RabbitMQ 4 drops a message after 20 by
/// default: listing must never hand one back. After 25 listings the dead
/// letters are the same, in the same order, and none was ever redelivered.
#[tokio::test(flavor = "multi_thread")]
async fn listing_dead_letters_many_times_never_counts_as_a_delivery_and_keeps_their_order() {
    use lapin::options::{BasicGetOptions, BasicNackOptions};

    let mut h = harness().await;
    h.behavior.reject.store(true, Ordering::SeqCst);
    h.start().await;
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    for (n, id) in ids.iter().enumerate() {
        h.publish(&created(&format!("listed{n}"), 1), *id).await;
    }
    h.expect_dead_letters(3).await;
    let dlq = DeadLetters::connect(&h.broker.config(), &h.queue).await.unwrap();
    let listing = || async {
        dlq.browse()
            .await
            .unwrap()
            .into_iter()
            .filter_map(|letter| letter.message_id)
            .collect::<Vec<String>>()
    };
    // The order the partitions' workers dead-lettered them in.
    let first = listing().await;
    let mut sorted = first.clone();
    sorted.sort();
    assert_eq!(sorted, ids.iter().map(Uuid::to_string).collect::<Vec<_>>());
    for _ in 0..25 {
        assert_eq!(listing().await, first, "the same dead letters, in the same order");
    }
    dlq.close().await;

    let connection =
        lapin::Connection::connect(&shop_testkit::amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queue = shop_messaging::topology::dead_letter_queue(&h.queue);
    let message = channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("a dead letter");
    let headers = message.delivery.properties.headers().clone().unwrap_or_default();
    assert!(!message.delivery.redelivered, "never handed back");
    assert_eq!(
        shop_messaging::wire::header_i64(&headers, "x-delivery-count").unwrap_or(0),
        0,
        "no delivery counted"
    );
    message
        .delivery
        .acker
        .nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        })
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
}
