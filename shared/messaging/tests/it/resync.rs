//! Re-synchronisation on the consumer's side: snapshots (a jump to their
//! version), version conflicts, and the gap policy acting on a gap past
//! `CONSUMER_GAP_TIMEOUT`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use shop_messaging::resync::{Requested, Resync};
use shop_messaging::sequence::{self, GapPolicy};
use shop_testkit::TestPublisher;
use uuid::Uuid;

use crate::ordered::{held, user, wait_parked};
use crate::support::{Harness, created, harness, harness_with, seen_by_user, snapshot, updated};

const WAIT: Duration = Duration::from_secs(30);

async fn position(h: &Harness, id: &str) -> sequence::Position {
    let mut conn = h.pool.get().await.unwrap();
    sequence::position(&mut conn, &h.queue, &user(id)).await.unwrap()
}

/// Waits until the handler has seen `user`'s `versions`, in order.
async fn wait_seen(h: &Harness, user_id: &str, versions: &[i64]) {
    shop_testkit::eventually(&format!("{user_id} seen at {versions:?}"), WAIT, || async {
        let seen = seen_by_user(&h.applied().await);
        (seen.get(user_id).map(Vec::as_slice) == Some(versions)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_above_the_position_jumps_to_it_and_releases_the_parked_follower_applied_once() {
    let mut h = harness().await;
    h.start().await;
    h.publish(&created("a", 1), Uuid::now_v7()).await;
    wait_seen(&h, "a", &[1]).await;
    h.publish(&updated("a", 5), Uuid::now_v7()).await;
    wait_parked(&h, "a", &[5]).await;

    let snapshot_id = Uuid::now_v7();
    h.publish(&snapshot("a", 4), snapshot_id).await;

    let applied = h.expect_applied(3).await;
    assert_eq!(seen_by_user(&applied)["a"], [1, 4, 5]);
    assert_eq!(applied[1].0, snapshot_id, "the snapshot itself, once");
    assert_eq!(position(&h, "a").await.last_version, 5);
    assert!(held(&h).await.is_empty(), "nothing left parked");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_at_or_below_the_position_is_a_duplicate_not_a_conflict() {
    let mut h = harness().await;
    h.start().await;
    h.publish(&created("a", 1), Uuid::now_v7()).await;
    h.publish(&updated("a", 2), Uuid::now_v7()).await;
    wait_seen(&h, "a", &[1, 2]).await;

    // Snapshots repeat versions with ids of their own.
    h.publish(&snapshot("a", 2), Uuid::now_v7()).await;
    h.publish(&snapshot("a", 1), Uuid::now_v7()).await;
    h.publish(&updated("a", 3), Uuid::now_v7()).await;

    let applied = h.expect_applied(3).await;
    assert_eq!(seen_by_user(&applied)["a"], [1, 2, 3]);
    let mut conn = h.pool.get().await.unwrap();
    assert!(
        sequence::conflicts(&mut conn, &h.queue).await.unwrap().is_empty(),
        "a snapshot repeating a version is no conflict"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_forgets_the_events_parked_below_it_which_are_never_applied() {
    let mut h = harness().await;
    h.start().await;
    h.publish(&created("a", 1), Uuid::now_v7()).await;
    wait_seen(&h, "a", &[1]).await;
    let three = Uuid::now_v7();
    h.publish(&updated("a", 3), three).await;
    h.publish(&updated("a", 4), Uuid::now_v7()).await;
    wait_parked(&h, "a", &[3, 4]).await;

    h.publish(&snapshot("a", 5), Uuid::now_v7()).await;
    h.publish(&updated("a", 6), Uuid::now_v7()).await;
    wait_seen(&h, "a", &[1, 5, 6]).await;
    assert!(held(&h).await.is_empty(), "3 and 4 forgotten");
    // Version 3 again, and the version 2 that never came: duplicates now.
    h.publish(&updated("a", 3), three).await;
    h.publish(&updated("a", 2), Uuid::now_v7()).await;

    let applied = h.expect_applied(3).await;
    assert_eq!(seen_by_user(&applied)["a"], [1, 5, 6]);
    assert_eq!(position(&h, "a").await.last_version, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_version_reused_with_another_event_id_is_a_conflict_recorded_once_and_not_applied() {
    let mut h = harness().await;
    h.start().await;
    let (one, two) = (Uuid::now_v7(), Uuid::now_v7());
    h.publish(&created("a", 1), one).await;
    h.publish(&updated("a", 2), two).await;
    wait_seen(&h, "a", &[1, 2]).await;

    // A redelivery of version 2 is a duplicate; another event claiming
    // version 2 (the producer restored and reused it) is a conflict.
    h.publish(&updated("a", 2), two).await;
    let reused = Uuid::now_v7();
    h.publish(&updated("a", 2), reused).await;
    h.publish(&updated("a", 2), reused).await;

    let conflicts = shop_testkit::eventually("the conflict recorded", WAIT, || async {
        let mut conn = h.pool.get().await.unwrap();
        let conflicts = sequence::conflicts(&mut conn, &h.queue).await.unwrap();
        (!conflicts.is_empty()).then_some(conflicts)
    })
    .await;
    let applied = h.expect_applied(2).await;
    assert_eq!(
        seen_by_user(&applied)["a"],
        [1, 2],
        "the reused version is not applied"
    );
    let mut conn = h.pool.get().await.unwrap();
    let conflicts_after = sequence::conflicts(&mut conn, &h.queue).await.unwrap();
    assert_eq!(conflicts_after.len(), 1, "recorded once: {conflicts_after:?}");
    let conflict = &conflicts[0];
    assert_eq!(conflict.aggregate, user("a"));
    assert_eq!(conflict.version, 2);
    assert_eq!(conflict.event_id, reused);
    assert_eq!(conflict.applied_event, two);
    assert_eq!(conflict.event_type, "shop.user.v1.UserUpdated");
}

/// A consumer with a 1 s gap timeout and a fast sweep, under `policy`.
async fn with_policy(policy: GapPolicy, resync: Option<Arc<dyn Resync>>) -> Harness {
    let mut h = harness_with(|mut config, _| {
        config.gap_timeout = Duration::from_secs(1);
        config.sweep_interval = Duration::from_millis(100);
        config.gap_policy = Some(policy);
        config
    })
    .await;
    h.resync = resync;
    h.start().await;
    h
}

/// Publishes versions 1 and 3 of `a` (2 never comes) and waits until 3 is
/// parked behind the gap.
async fn leave_a_gap(h: &Harness) {
    h.publish(&created("a", 1), Uuid::now_v7()).await;
    wait_seen(h, "a", &[1]).await;
    h.publish(&updated("a", 3), Uuid::now_v7()).await;
    wait_parked(h, "a", &[3]).await;
}

/// Waits until the gap policy has acted on `a` with `outcome`.
async fn wait_action(h: &Harness, outcome: &str) -> sequence::GapAction {
    shop_testkit::eventually(&format!("gap action {outcome}"), WAIT, || async {
        let mut conn = h.pool.get().await.unwrap();
        sequence::gap_action(&mut conn, &h.queue, &user("a"))
            .await
            .unwrap()
            .filter(|action| action.outcome.as_deref() == Some(outcome))
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn gap_policy_apply_next_applies_the_state_carrying_event_past_a_stuck_gap() {
    let mut h = with_policy(GapPolicy::ApplyNext, None).await;
    leave_a_gap(&h).await;

    let action = wait_action(&h, "applied").await;
    assert_eq!(action.action, "apply-next");
    let applied = h.expect_applied(2).await;
    assert_eq!(seen_by_user(&applied)["a"], [1, 3]);
    assert_eq!(position(&h, "a").await.last_version, 3);
    assert!(held(&h).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn gap_policy_wait_only_records_that_it_waited() {
    let h = with_policy(GapPolicy::Wait, None).await;
    leave_a_gap(&h).await;

    let action = wait_action(&h, "waited").await;
    assert_eq!(action.action, "wait");
    // Still there after a few more sweeps, and acted on once per timeout.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = wait_parked(&h, "a", &[3]).await;
    assert_eq!(still.position.last_version, 1);
    assert_eq!(
        still.gap_action.map(|action| action.at),
        Some(action.at),
        "not acted on again within CONSUMER_GAP_TIMEOUT"
    );
    assert_eq!(seen_by_user(&h.applied().await)["a"], [1]);
}

/// A producer that answers a resync by publishing a snapshot of each user
/// asked for at version 3, as the user service would through its outbox.
struct Republisher {
    publisher: TestPublisher,
    exchange: String,
    asked: Mutex<Vec<(String, Vec<String>)>>,
}

#[async_trait::async_trait]
impl Resync for Republisher {
    async fn request(&self, kind: &str, ids: &[String]) -> anyhow::Result<Requested> {
        self.asked.lock().unwrap().push((kind.to_owned(), ids.to_vec()));
        for id in ids {
            self.publisher
                .publish(&self.exchange, &snapshot(id, 3), Uuid::now_v7())
                .await?;
        }
        Ok(Requested::Written {
            written: ids.len() as i64,
            unknown_ids: Vec::new(),
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn gap_policy_resync_asks_the_producer_for_the_stuck_aggregate_and_its_snapshot_heals_the_gap() {
    let mut h = harness_with(|mut config, _| {
        config.gap_timeout = Duration::from_secs(1);
        config.sweep_interval = Duration::from_millis(100);
        config
    })
    .await;
    let producer = Arc::new(Republisher {
        publisher: TestPublisher::connect(&h.exchange).await.unwrap(),
        exchange: h.exchange.clone(),
        asked: Mutex::new(Vec::new()),
    });
    h.resync = Some(producer.clone());
    h.start().await;
    leave_a_gap(&h).await;

    let action = wait_action(&h, "requested").await;
    assert_eq!(action.action, "resync", "the default with a producer to ask");
    // The snapshot at 3 is applied; the update at 3 parked behind the gap
    // is forgotten, never applied.
    let applied = h.expect_applied(2).await;
    assert_eq!(seen_by_user(&applied)["a"], [1, 3]);
    assert_eq!(position(&h, "a").await.last_version, 3);
    assert!(held(&h).await.is_empty());
    assert_eq!(
        producer.asked.lock().unwrap().as_slice(),
        [("user".to_owned(), vec!["a".to_owned()])]
    );
}
