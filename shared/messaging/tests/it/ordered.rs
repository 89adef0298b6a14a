//! Ordered consumption: the handler sees each aggregate's events once, in
//! version order, with no gaps — through duplicates, out-of-order arrival,
//! retries, dead letters, gaps, and replicas that come and go. The test
//! handler records every application in order (`applied.seq`), so each
//! test compares what it saw, per user, with 1, 2, 3, …

use std::collections::BTreeMap;
use std::time::Duration;

use diesel::{ExpressionMethods as _, QueryDsl as _};
use diesel_async::RunQueryDsl as _;
use shop_messaging::dlq::{DeadLetters, Selection};
use shop_messaging::sequence::{self, Aggregate, Held};
use uuid::Uuid;

use crate::support::{Harness, created, harness, harness_with, seen_by_user, updated};

const WAIT: Duration = Duration::from_secs(30);

pub(crate) fn user(id: &str) -> Aggregate {
    Aggregate {
        kind: "user".to_owned(),
        id: id.to_owned(),
    }
}

/// Publishes version `version` of `user` (1 is its creation) as event `id`.
async fn publish(h: &Harness, user: &str, version: i64, id: Uuid) {
    if version == 1 {
        h.publish(&created(user, 1), id).await;
    } else {
        h.publish(&updated(user, version), id).await;
    }
}

/// Waits until the handler has seen exactly `expected` (per user, in
/// order), and checks that nothing more is parked.
async fn expect_seen(h: &Harness, expected: &[(&str, &[i64])]) {
    let expected: BTreeMap<String, Vec<i64>> = expected
        .iter()
        .map(|(user, versions)| ((*user).to_owned(), versions.to_vec()))
        .collect();
    let total: usize = expected.values().map(Vec::len).sum();
    shop_testkit::eventually(&format!("{total} applications"), WAIT, || async {
        (h.applied().await.len() >= total).then_some(())
    })
    .await;
    assert_eq!(seen_by_user(&h.applied().await), expected);
}

pub(crate) async fn held(h: &Harness) -> Vec<Held> {
    let mut conn = h.pool.get().await.unwrap();
    sequence::held(&mut conn, &h.queue).await.unwrap()
}

/// Waits until `user` has exactly `versions` parked.
pub(crate) async fn wait_parked(h: &Harness, user_id: &str, versions: &[i64]) -> Held {
    shop_testkit::eventually(&format!("{user_id} parked at {versions:?}"), WAIT, || async {
        let held = held(h)
            .await
            .into_iter()
            .find(|held| held.aggregate.id == user_id)?;
        let parked: Vec<i64> = held.parked.iter().map(|p| p.version).collect();
        (parked == versions).then_some(held)
    })
    .await
}

async fn nothing_parked(h: &Harness) {
    shop_testkit::eventually("nothing parked", WAIT, || async {
        held(h).await.is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_that_arrive_out_of_order_and_twice_reach_the_handler_once_in_order() {
    let mut h = harness().await;
    h.start().await;
    let ids: Vec<Uuid> = (0..=8).map(|_| Uuid::now_v7()).collect();
    for version in [3, 1, 1, 5, 2, 8, 4, 3, 7, 6, 2, 8] {
        publish(&h, "a", version, ids[version as usize]).await;
    }
    publish(&h, "b", 2, Uuid::now_v7()).await;
    publish(&h, "b", 1, Uuid::now_v7()).await;

    expect_seen(&h, &[("a", &[1, 2, 3, 4, 5, 6, 7, 8]), ("b", &[1, 2])]).await;
    nothing_parked(&h).await;
    assert!(h.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_of_version_2_while_version_3_is_queued_is_applied_before_it() {
    let mut h = harness().await;
    h.behavior
        .fail_first_attempt
        .lock()
        .unwrap()
        .insert(("a".to_owned(), 2));
    h.start().await;
    for version in 1..=3 {
        publish(&h, "a", version, Uuid::now_v7()).await;
    }
    publish(&h, "b", 1, Uuid::now_v7()).await;

    expect_seen(&h, &[("a", &[1, 2, 3]), ("b", &[1])]).await;
    let attempts = h.behavior.attempts.lock().unwrap().clone();
    assert!(
        attempts.contains(&("a".to_owned(), 2, 2)),
        "version 2 came back from its delay queue: {attempts:?}"
    );
    nothing_parked(&h).await;
    assert!(h.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_lettered_version_parks_its_followers_while_others_flow_and_a_replay_applies_them_in_order() {
    let mut h = harness().await;
    h.behavior
        .reject_versions
        .lock()
        .unwrap()
        .insert(("a".to_owned(), 2));
    h.start().await;
    let ids: Vec<Uuid> = (0..=5).map(|_| Uuid::now_v7()).collect();
    for version in 1..=5 {
        publish(&h, "a", version, ids[version as usize]).await;
    }
    for version in 1..=3 {
        publish(&h, "b", version, Uuid::now_v7()).await;
    }

    let parked = wait_parked(&h, "a", &[3, 4, 5]).await;
    assert_eq!(parked.position.last_version, 1);
    assert_eq!(
        parked.position.dead_letter,
        Some((ids[2], 2)),
        "held by the dead letter"
    );
    expect_seen(&h, &[("a", &[1]), ("b", &[1, 2, 3])]).await;
    let letters = h.expect_dead_letters(1).await;
    assert_eq!(
        letters[0].message_id.as_deref(),
        Some(ids[2].to_string().as_str())
    );
    assert_eq!(letters[0].sequenced, Some((user("a"), 2)));

    h.behavior.reject_versions.lock().unwrap().clear();
    let dlq = DeadLetters::connect(&h.broker.config(), &h.queue).await.unwrap();
    let replayed = dlq
        .replay(&Selection {
            message_id: Some(ids[2].to_string()),
            ..Selection::default()
        })
        .await
        .unwrap();
    dlq.close().await;
    assert_eq!(replayed.replayed, 1);

    expect_seen(&h, &[("a", &[1, 2, 3, 4, 5]), ("b", &[1, 2, 3])]).await;
    nothing_parked(&h).await;
    assert!(h.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn skipping_a_dead_letter_releases_its_followers_without_applying_it() {
    let mut h = harness().await;
    h.behavior
        .reject_versions
        .lock()
        .unwrap()
        .insert(("a".to_owned(), 2));
    h.start().await;
    let ids: Vec<Uuid> = (0..=4).map(|_| Uuid::now_v7()).collect();
    for version in 1..=4 {
        publish(&h, "a", version, ids[version as usize]).await;
    }
    wait_parked(&h, "a", &[3, 4]).await;
    h.expect_dead_letters(1).await;

    // What `shop dlq skip` does.
    let mut conn = h.pool.get().await.unwrap();
    let (before, released) = sequence::release(&mut conn, &h.queue, &user("a"), 2)
        .await
        .unwrap();
    assert_eq!(before.last_version, 1);
    assert_eq!(
        released.iter().map(|p| p.aggregate_version).collect::<Vec<_>>(),
        [3]
    );
    let dlq = DeadLetters::connect(&h.broker.config(), &h.queue).await.unwrap();
    dlq.send_back(&released).await.unwrap();
    assert_eq!(dlq.take(&ids[2].to_string()).await.unwrap().len(), 1);
    dlq.close().await;

    expect_seen(&h, &[("a", &[1, 3, 4])]).await;
    nothing_parked(&h).await;
    assert!(h.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gap_that_never_fills_holds_the_followers_until_it_is_released_and_the_sweep_sends_them() {
    let mut h = harness().await;
    h.start().await;
    for version in [1, 3, 4] {
        publish(&h, "a", version, Uuid::now_v7()).await;
    }
    let parked = wait_parked(&h, "a", &[3, 4]).await;
    assert_eq!(parked.position.last_version, 1);
    assert_eq!(parked.position.dead_letter, None, "a gap, not a dead letter");
    expect_seen(&h, &[("a", &[1])]).await;

    // What `shop dlq release user/a` does, without sending anything back:
    // the consumer's sweep does it.
    let mut conn = h.pool.get().await.unwrap();
    let (_, released) = sequence::release(&mut conn, &h.queue, &user("a"), 2)
        .await
        .unwrap();
    assert_eq!(released.len(), 1);
    // Marked released long enough ago for the sweep to send it again.
    diesel::update(sequence::inbox_parked::table)
        .filter(sequence::inbox_parked::consumer.eq(&h.queue))
        .set(sequence::inbox_parked::released_at.eq(chrono::Utc::now() - chrono::Duration::minutes(1)))
        .execute(&mut conn)
        .await
        .unwrap();

    expect_seen(&h, &[("a", &[1, 3, 4])]).await;
    nothing_parked(&h).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_share_the_partitions_and_one_crashed_and_one_added_lose_and_reorder_nothing() {
    let mut h = harness_with(|mut config, _| {
        config.partitions = 4;
        config.member_timeout = Duration::from_secs(1);
        config.prefetch = 5;
        config.batch_size = 5;
        config
    })
    .await;
    h.start().await;
    let (crashing, _) = h.spawn_replica("second");
    let (_third, _third_stop) = h.spawn_replica("third");
    let members = || async {
        let mut conn = h.pool.get().await.unwrap();
        diesel::sql_query("SELECT 1 FROM consumer_members WHERE seen_at > now() - interval '1 second'")
            .execute(&mut conn)
            .await
            .unwrap()
    };
    shop_testkit::eventually("three live members", WAIT, || async {
        (members().await == 3).then_some(())
    })
    .await;

    let users: Vec<String> = (0..30).map(|n| format!("u{n}")).collect();
    let mut fourth = None;
    for version in 1..=12 {
        for user in &users {
            publish(&h, user, version, Uuid::now_v7()).await;
        }
        if version == 4 {
            // A crash: no clean-up, its connections dropped mid-batch.
            crashing.abort();
        }
        if version == 8 {
            fourth = Some(h.spawn_replica("fourth"));
        }
    }

    let every: Vec<i64> = (1..=12).collect();
    let expected: Vec<(&str, &[i64])> = users
        .iter()
        .map(|user| (user.as_str(), every.as_slice()))
        .collect();
    expect_seen(&h, &expected).await;
    nothing_parked(&h).await;
    assert!(h.dead_letters().await.is_empty());

    let mut conn = h.pool.get().await.unwrap();
    let instances: Vec<String> = crate::support::applied::table
        .select(crate::support::applied::instance)
        .distinct()
        .load(&mut conn)
        .await
        .unwrap();
    assert!(
        instances.len() >= 2,
        "the replicas shared the partitions: {instances:?}"
    );
    drop(fourth);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_version_that_fills_a_gap_releases_what_waits_behind_it_though_its_position_is_remembered() {
    // No sweep after the first: only the transaction that applies version 2
    // can release version 3.
    let mut h = harness_with(|mut config, _| {
        config.sweep_interval = Duration::from_secs(3600);
        config
    })
    .await;
    h.start().await;
    publish(&h, "a", 1, Uuid::now_v7()).await;
    expect_seen(&h, &[("a", &[1])]).await;
    publish(&h, "a", 3, Uuid::now_v7()).await;
    wait_parked(&h, "a", &[3]).await;

    // This replica committed a's position 1: version 2 is decided from
    // memory, and moving the position must still release version 3.
    publish(&h, "a", 2, Uuid::now_v7()).await;
    expect_seen(&h, &[("a", &[1, 2, 3])]).await;
    nothing_parked(&h).await;

    // b's version 2 arrives first and parks; version 1 is taken to be new
    // (no position read), and creating the position must release version 2.
    publish(&h, "b", 2, Uuid::now_v7()).await;
    wait_parked(&h, "b", &[2]).await;
    publish(&h, "b", 1, Uuid::now_v7()).await;
    expect_seen(&h, &[("a", &[1, 2, 3]), ("b", &[1, 2])]).await;
    nothing_parked(&h).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_position_another_replica_moved_is_read_again_not_trusted_from_memory() {
    let mut h = harness().await;
    h.start().await;
    publish(&h, "a", 1, Uuid::now_v7()).await;
    publish(&h, "a", 2, Uuid::now_v7()).await;
    expect_seen(&h, &[("a", &[1, 2])]).await;

    // Another replica held the partition meanwhile (handed over and back)
    // and applied version 3 without acknowledging it: the position says 3,
    // the queue delivers 3 again, and this replica last committed 2.
    {
        let mut conn = h.pool.get().await.unwrap();
        let moved = diesel::sql_query(
            "UPDATE inbox_sequence SET last_version = 3 WHERE consumer = $1 AND aggregate_id = 'a'",
        )
        .bind::<diesel::sql_types::Text, _>(&h.queue)
        .execute(&mut conn)
        .await
        .unwrap();
        assert_eq!(moved, 1);
    }
    publish(&h, "a", 3, Uuid::now_v7()).await;
    publish(&h, "a", 4, Uuid::now_v7()).await;
    publish(&h, "b", 1, Uuid::now_v7()).await;

    expect_seen(&h, &[("a", &[1, 2, 4]), ("b", &[1])]).await;
    let mut conn = h.pool.get().await.unwrap();
    let position = sequence::position(&mut conn, &h.queue, &user("a")).await.unwrap();
    assert_eq!(position.last_version, 4);
    nothing_parked(&h).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn positions_rewritten_under_the_consumer_move_on_from_where_they_are() {
    let mut h = harness().await;
    h.start().await;
    // a's position row first in the table, then b's, c's and d's.
    publish(&h, "a", 1, Uuid::now_v7()).await;
    expect_seen(&h, &[("a", &[1])]).await;
    for user in ["b", "c", "d"] {
        publish(&h, user, 1, Uuid::now_v7()).await;
    }
    let at_1: &[i64] = &[1];
    expect_seen(&h, &[("a", at_1), ("b", at_1), ("c", at_1), ("d", at_1)]).await;

    // a's row is rewritten behind the others, then the table is compacted:
    // where the consumer remembers a's row is now another aggregate's, at
    // the same version.
    {
        let mut conn = h.pool.get().await.unwrap();
        diesel::sql_query("UPDATE inbox_sequence SET updated_at = now() WHERE aggregate_id = 'a'")
            .execute(&mut conn)
            .await
            .unwrap();
        diesel::sql_query("VACUUM FULL inbox_sequence")
            .execute(&mut conn)
            .await
            .unwrap();
    }
    publish(&h, "a", 2, Uuid::now_v7()).await;
    expect_seen(&h, &[("a", &[1, 2]), ("b", at_1), ("c", at_1), ("d", at_1)]).await;
    let mut conn = h.pool.get().await.unwrap();
    for (user, version) in [("a", 2), ("b", 1), ("c", 1), ("d", 1)] {
        let position = sequence::position(&mut conn, &h.queue, &self::user(user))
            .await
            .unwrap();
        assert_eq!(position.last_version, version, "{user}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_version_1_of_an_aggregate_with_a_position_is_a_duplicate_though_this_replica_never_saw_it() {
    let mut h = harness().await;
    // Positions seeded from an existing projection (or written by a replica
    // that came before): a is at 1, which this replica has never seen.
    {
        let mut conn = h.pool.get().await.unwrap();
        diesel::sql_query(
            "INSERT INTO inbox_sequence (consumer, aggregate_type, aggregate_id, last_version) \
             VALUES ($1, 'user', 'a', 1)",
        )
        .bind::<diesel::sql_types::Text, _>(&h.queue)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    h.start().await;
    publish(&h, "a", 1, Uuid::now_v7()).await;
    publish(&h, "b", 1, Uuid::now_v7()).await;
    publish(&h, "a", 2, Uuid::now_v7()).await;

    expect_seen(&h, &[("a", &[2]), ("b", &[1])]).await;
    nothing_parked(&h).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_waiting_for_an_aggregates_lock_reads_the_position_its_holder_committed() {
    use diesel::sql_types::BigInt;
    use diesel_async::{AsyncConnection as _, AsyncPgConnection, SimpleAsyncConnection as _};

    #[derive(diesel::QueryableByName, Debug, PartialEq)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        last_version: i64,
    }
    const LOCK: &str = "SELECT last_version FROM inbox_sequence_lock('c', ARRAY['user'], ARRAY['u1'])";

    let h = harness().await;
    let mut holder = AsyncPgConnection::establish(h.db.url()).await.unwrap();
    let mut waiter = AsyncPgConnection::establish(h.db.url()).await.unwrap();
    // A batch holds u1 and moves it to version 1, not yet committed.
    holder.batch_execute("BEGIN").await.unwrap();
    let before: Vec<Row> = diesel::sql_query(LOCK).load(&mut holder).await.unwrap();
    assert!(before.is_empty(), "no position yet");
    holder
        .batch_execute(
            "INSERT INTO inbox_sequence (consumer, aggregate_type, aggregate_id, last_version) \
             VALUES ('c', 'user', 'u1', 1)",
        )
        .await
        .unwrap();

    // The next batch over u1 waits for the lock, then must read version 1:
    // a read with a snapshot from before the lock would see no position and
    // apply version 1 a second time.
    let next = tokio::spawn(async move {
        waiter.batch_execute("BEGIN").await.unwrap();
        let rows: Vec<Row> = diesel::sql_query(LOCK).load(&mut waiter).await.unwrap();
        waiter.batch_execute("COMMIT").await.unwrap();
        rows
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !next.is_finished(),
        "the second batch waits for the aggregate's lock"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), next)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen, vec![Row { last_version: 1 }]);
}

/// When `user`'s parked `version` was last marked released (sent back).
async fn released_at(h: &Harness, user_id: &str, version: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    held(h)
        .await
        .into_iter()
        .find(|held| held.aggregate.id == user_id)?
        .parked
        .into_iter()
        .find(|parked| parked.version == version)?
        .released_at
}

/// Marks every parked event of the consumer released a minute ago: due for
/// the sweep, had it not been sent (the grace is 10 s).
async fn released_a_minute_ago(h: &Harness) -> chrono::DateTime<chrono::Utc> {
    use chrono::SubsecRound as _;
    // In PostgreSQL's precision, to compare with what it reads back.
    let then = (chrono::Utc::now() - chrono::Duration::minutes(1)).trunc_subsecs(6);
    let mut conn = h.pool.get().await.unwrap();
    let marked = diesel::update(sequence::inbox_parked::table)
        .filter(sequence::inbox_parked::consumer.eq(&h.queue))
        .set(sequence::inbox_parked::released_at.eq(then))
        .execute(&mut conn)
        .await
        .unwrap();
    assert!(marked > 0);
    then
}

/// b's version 3 parked behind a gap and released without being sent back
/// (as by a process that died between its commit and the publish): the
/// sweep's to send, so a sweep that ran shows on it.
async fn released_but_not_sent(h: &Harness, user_id: &str) {
    publish(h, user_id, 1, Uuid::now_v7()).await;
    publish(h, user_id, 3, Uuid::now_v7()).await;
    wait_parked(h, user_id, &[3]).await;
    let mut conn = h.pool.get().await.unwrap();
    let (_, released) = sequence::release(&mut conn, &h.queue, &user(user_id), 2)
        .await
        .unwrap();
    assert_eq!(released.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sweep_never_sends_again_a_released_event_whose_dead_letter_holds_the_aggregate() {
    let mut h = harness_with(|mut config, _| {
        config.sweep_interval = Duration::from_millis(200);
        config
    })
    .await;
    h.behavior
        .reject_versions
        .lock()
        .unwrap()
        .insert(("a".to_owned(), 2));
    h.start().await;
    // a's version 2 parks; version 1 releases it; the handler refuses it:
    // dead-lettered, it holds a, and its parked row stays, released.
    let second = Uuid::now_v7();
    publish(&h, "a", 2, second).await;
    wait_parked(&h, "a", &[2]).await;
    publish(&h, "a", 1, Uuid::now_v7()).await;
    h.expect_dead_letters(1).await;
    shop_testkit::eventually("a held by its dead letter", WAIT, || async {
        let held = held(&h).await.into_iter().find(|held| held.aggregate.id == "a")?;
        (held.position.dead_letter == Some((second, 2))).then_some(())
    })
    .await;
    released_but_not_sent(&h, "b").await;

    let then = released_a_minute_ago(&h).await;
    // As if a's send back had not been recorded (the database away right
    // then): only its dead letter tells the sweep to leave it.
    {
        let mut conn = h.pool.get().await.unwrap();
        let forgotten = diesel::update(sequence::inbox_parked::table)
            .filter(sequence::inbox_parked::consumer.eq(&h.queue))
            .filter(sequence::inbox_parked::aggregate_id.eq("a"))
            .set(sequence::inbox_parked::sent_at.eq(None::<chrono::DateTime<chrono::Utc>>))
            .execute(&mut conn)
            .await
            .unwrap();
        assert_eq!(forgotten, 1);
    }
    // The sweep sends b's version 3 (it is applied)…
    expect_seen(&h, &[("a", &[1]), ("b", &[1, 3])]).await;

    // …and in the same statement would have taken a's version 2 again.
    assert_eq!(
        released_at(&h, "a", 2).await,
        Some(then),
        "the sweep left a's dead-lettered version alone"
    );
    let letters = h.dead_letters().await;
    assert_eq!(letters.len(), 1, "one dead letter, no copy");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_released_event_waiting_behind_a_backlog_is_not_sent_again() {
    // One partition, one message per batch: c's held version 1 keeps a's
    // released version 2 waiting in the queue behind it.
    let mut h = harness_with(|mut config, _| {
        config.sweep_interval = Duration::from_millis(200);
        config.partitions = 1;
        config.batch_size = 1;
        config
    })
    .await;
    h.start().await;
    released_but_not_sent(&h, "b").await;
    publish(&h, "a", 2, Uuid::now_v7()).await;
    wait_parked(&h, "a", &[2]).await;
    *h.behavior.hold_user.lock().unwrap() = Some("c".to_owned());
    publish(&h, "a", 1, Uuid::now_v7()).await;
    publish(&h, "c", 1, Uuid::now_v7()).await;
    // a's version 1 is applied and sends version 2 back, behind c's
    // version 1, which the handler holds.
    shop_testkit::eventually("c's version 1 held", WAIT, || async {
        h.behavior.hold_user.lock().unwrap().is_none().then_some(())
    })
    .await;
    assert!(released_at(&h, "a", 2).await.is_some(), "a's version 2 released");

    let then = released_a_minute_ago(&h).await;
    // A sweep ran: it sent b's version 3 again (marked released anew)…
    shop_testkit::eventually("the sweep sends b's version 3", WAIT, || async {
        released_at(&h, "b", 3)
            .await
            .is_some_and(|at| at > then)
            .then_some(())
    })
    .await;
    // …and in the same statement would have taken a's version 2, which is
    // in the queue, sent and confirmed.
    assert_eq!(
        released_at(&h, "a", 2).await,
        Some(then),
        "a's version 2, sent back and waiting in the queue, is not sent again"
    );

    h.behavior.release.notify_one();
    expect_seen(&h, &[("a", &[1, 2]), ("b", &[1, 3]), ("c", &[1])]).await;
    nothing_parked(&h).await;
}

/// A dead letter that holds its aggregate and is no longer in the queue
/// (purged by hand, `rabbitmqctl purge_queue`, lost with the queue): the
/// position still names it. `shop dlq skip` finds the aggregate by it, and
/// `shop dlq release` gives up on it; `shop dlq purge` refuses to delete a
/// dead letter an aggregate waits on.
#[tokio::test(flavor = "multi_thread")]
async fn an_aggregate_whose_dead_letter_is_gone_is_freed_by_skip_or_release_and_purge_refuses_to_strand_one()
{
    let mut h = harness().await;
    for user in ["a", "b", "c"] {
        h.behavior
            .reject_versions
            .lock()
            .unwrap()
            .insert((user.to_owned(), 2));
    }
    h.start().await;
    let mut poison = std::collections::HashMap::new();
    for user in ["a", "b", "c"] {
        let id = Uuid::now_v7();
        poison.insert(user, id);
        publish(&h, user, 1, Uuid::now_v7()).await;
        publish(&h, user, 2, id).await;
    }
    // a and b have followers parked behind their dead letters; c none.
    for user in ["a", "b"] {
        publish(&h, user, 3, Uuid::now_v7()).await;
        publish(&h, user, 4, Uuid::now_v7()).await;
    }
    wait_parked(&h, "a", &[3, 4]).await;
    wait_parked(&h, "b", &[3, 4]).await;
    h.expect_dead_letters(3).await;
    shop_testkit::eventually("c held by its dead letter", WAIT, || async {
        let mut conn = h.pool.get().await.unwrap();
        let position = sequence::position(&mut conn, &h.queue, &user("c")).await.unwrap();
        (position.dead_letter == Some((poison["c"], 2))).then_some(())
    })
    .await;
    h.behavior.reject_versions.lock().unwrap().clear();
    let dlq = DeadLetters::connect(&h.broker.config(), &h.queue).await.unwrap();
    let mut conn = h.pool.get().await.unwrap();

    // Purging would strand all three: refused, nothing deleted.
    let refused = dlq.purge_unless_held(&mut conn).await.unwrap_err().to_string();
    for user in ["a", "b", "c"] {
        assert!(refused.contains(&format!("user/{user}")), "{refused}");
        assert!(refused.contains(&poison[user].to_string()), "{refused}");
    }
    assert_eq!(h.dead_letters().await.len(), 3, "nothing purged");

    // The letters go anyway, past the tools.
    assert_eq!(dlq.purge().await.unwrap(), 3);

    let skipped = dlq.skip(&mut conn, &poison["a"].to_string()).await.unwrap();
    assert_eq!((skipped.removed, skipped.released), (0, 1));
    let released = dlq.release(&mut conn, &user("b")).await.unwrap();
    assert_eq!(
        (released.from_version, released.through_version, released.released),
        (1, 2, 1)
    );
    let released = dlq.release(&mut conn, &user("c")).await.unwrap();
    assert_eq!(
        (released.from_version, released.through_version, released.released),
        (1, 2, 0)
    );
    publish(&h, "c", 3, Uuid::now_v7()).await;

    expect_seen(&h, &[("a", &[1, 3, 4]), ("b", &[1, 3, 4]), ("c", &[1, 3])]).await;
    nothing_parked(&h).await;
    // With no aggregate held, purge goes ahead.
    assert_eq!(dlq.purge_unless_held(&mut conn).await.unwrap(), 0);
    dlq.close().await;
}

/// A released event whose send back the broker confirmed, and whose copy
/// never came back (its partition queue purged): the sweep leaves it (it
/// was sent), so `shop dlq release` sends it again, giving nothing up.
#[tokio::test(flavor = "multi_thread")]
async fn release_sends_again_a_next_in_line_event_whose_confirmed_copy_was_lost() {
    let mut h = harness_with(|mut config, _| {
        config.sweep_interval = Duration::from_millis(200);
        config
    })
    .await;
    h.start().await;
    publish(&h, "a", 1, Uuid::now_v7()).await;
    publish(&h, "a", 3, Uuid::now_v7()).await;
    wait_parked(&h, "a", &[3]).await;
    let mut conn = h.pool.get().await.unwrap();
    // Version 2 given up and version 3 released, its send confirmed and
    // recorded, and the copy lost on the way.
    let (_, released) = sequence::release(&mut conn, &h.queue, &user("a"), 2)
        .await
        .unwrap();
    assert_eq!(released.len(), 1);
    sequence::mark_sent(&mut conn, &h.queue, &released).await.unwrap();
    released_a_minute_ago(&h).await;
    let dlq = DeadLetters::connect(&h.broker.config(), &h.queue).await.unwrap();

    let resent = dlq.release(&mut conn, &user("a")).await.unwrap();

    assert_eq!(
        (resent.from_version, resent.through_version, resent.released),
        (2, 2, 1),
        "nothing given up, version 3 sent again"
    );
    expect_seen(&h, &[("a", &[1, 3])]).await;
    nothing_parked(&h).await;
    dlq.close().await;
}
