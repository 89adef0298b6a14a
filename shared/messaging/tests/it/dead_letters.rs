//! Listing, showing, selective replay and purge of dead letters.

use std::sync::atomic::Ordering;

use lapin::BasicProperties;
use shop_contracts::Event as _;
use shop_contracts::user::UserCreated;
use shop_messaging::dlq::{DeadLetters, Selection};
use uuid::Uuid;

use crate::support::{created, harness};

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_listed_by_reason_shown_replayed_selectively_and_purged() {
    let mut h = harness().await;
    h.behavior.reject.store(true, Ordering::SeqCst);
    h.start().await;
    let rejected = Uuid::now_v7();
    h.publish(&created("refused", 1), rejected).await;
    let undecodable = Uuid::now_v7().to_string();
    h.publish_raw(
        "user.created",
        b"\xff",
        BasicProperties::default()
            .with_type(UserCreated::TYPE_NAME.into())
            .with_message_id(undecodable.as_str().into()),
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
