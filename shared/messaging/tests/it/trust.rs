//! Who may publish, tried as a stranger would: unsigned, changed after
//! signing, signed by a key the consumer does not (or no longer) trust,
//! inconsistent, too large, far ahead of its turn, carrying forged
//! bookkeeping. Each refused message lands in the dead-letter queue with its
//! reason, holds nothing, moves no position, and the genuine events around
//! it apply.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::types::AMQPValue;
use prost::Message as _;
use shop_contracts::Event as _;
use shop_contracts::user::{UserCreated, UserUpdated};
use shop_messaging::dlq::{DeadLetters, Selection};
use shop_messaging::sequence::{self, Aggregate};
use shop_messaging::signing::{SigningKey, TrustedKeys};
use shop_messaging::wire;
use shop_testkit::TestPublisher;
use uuid::Uuid;

use crate::support::{Harness, created, harness, harness_with, seen_by_user, updated};

const WAIT: Duration = Duration::from_secs(30);

fn user(id: &str) -> Aggregate {
    Aggregate {
        kind: "user".to_owned(),
        id: id.to_owned(),
    }
}

/// `event`'s properties as the relay would send them, signed by `key`.
fn signed<E: shop_contracts::Event>(key: &SigningKey, event: &E, id: Uuid) -> (BasicProperties, Vec<u8>) {
    let body = event.encode_to_vec();
    let properties = key
        .sign_properties(TestPublisher::properties(event, id), &body)
        .unwrap();
    (properties, body)
}

fn with_header(properties: BasicProperties, name: &str, value: AMQPValue) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(name.into(), value);
    properties.with_headers(headers)
}

async fn position(h: &Harness, id: &str) -> i64 {
    let mut conn = h.pool.get().await.unwrap();
    sequence::position(&mut conn, &h.queue, &user(id))
        .await
        .unwrap()
        .last_version
}

/// The reasons of the dead letters, sorted, once there are `count`.
async fn dead_letter_reasons(h: &Harness, count: usize) -> Vec<String> {
    let mut reasons: Vec<String> = h
        .expect_dead_letters(count)
        .await
        .into_iter()
        .map(|letter| letter.reason)
        .collect();
    reasons.sort();
    reasons
}

#[tokio::test(flavor = "multi_thread")]
async fn unsigned_changed_and_foreign_events_are_dead_lettered_as_unauthenticated_and_move_nothing() {
    let mut h = harness().await;
    h.start().await;
    let producer = shop_testkit::keys::signing_key();
    let (stranger, _) = shop_testkit::keys::new_key("stranger-1");

    // Version 1 of "a", as the producer signed it, with one body byte flipped.
    let (properties, mut body) = signed(producer, &created("a", 1), Uuid::now_v7());
    let last = body.len() - 1;
    body[last] ^= 0x01;
    h.publish_raw(UserCreated::ROUTING_KEY, &body, properties).await;
    // Signed, then its version changed in the header: a version far ahead
    // would park a real aggregate's events, or tombstone it.
    let (properties, body) = signed(producer, &updated("a", 2), Uuid::now_v7());
    let properties = with_header(
        properties,
        wire::AGGREGATE_VERSION,
        AMQPValue::LongLongInt(i64::MAX),
    );
    h.publish_raw(UserUpdated::ROUTING_KEY, &body, properties).await;
    // No signature at all.
    h.publisher
        .publish_unsigned(&h.exchange, &updated("a", 2), Uuid::now_v7())
        .await
        .unwrap();
    // A stranger's own key, and the stranger's key under the producer's id.
    let (properties, body) = signed(&stranger, &updated("a", 2), Uuid::now_v7());
    h.publish_raw(UserUpdated::ROUTING_KEY, &body, properties).await;
    let (impostor, _) = shop_testkit::keys::new_key(producer.id());
    let (properties, body) = signed(&impostor, &updated("a", 2), Uuid::now_v7());
    h.publish_raw(UserUpdated::ROUTING_KEY, &body, properties).await;

    let reasons = dead_letter_reasons(&h, 5).await;
    assert_eq!(reasons, ["unauthenticated"; 5]);
    assert_eq!(position(&h, "a").await, 0, "no forged event moved a's position");
    let mut conn = h.pool.get().await.unwrap();
    assert!(
        sequence::held(&mut conn, &h.queue).await.unwrap().is_empty(),
        "nothing parked behind a forged event"
    );
    drop(conn);

    // The genuine events of "a" apply, in order, as if nothing happened.
    h.publish(&created("a", 1), Uuid::now_v7()).await;
    h.publish(&updated("a", 2), Uuid::now_v7()).await;
    let applied = h.expect_applied(2).await;
    assert_eq!(seen_by_user(&applied)["a"], [1, 2]);
    let letters = h.dead_letters().await;
    assert!(
        letters
            .iter()
            .all(|letter| letter.error.as_deref().is_some_and(|e| !e.is_empty())),
        "each says why: {letters:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stranger_writing_straight_to_a_partition_queue_is_refused_too() {
    let mut h = harness().await;
    h.start().await;
    let connection =
        lapin::Connection::connect(&shop_testkit::amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let partition = h.config.topology().partition_queue(0);
    let event = updated("b", 5);
    // Through the default exchange, past every binding.
    channel
        .basic_publish(
            "".into(),
            partition.as_str().into(),
            BasicPublishOptions::default(),
            &event.encode_to_vec(),
            TestPublisher::properties(&event, Uuid::now_v7()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;

    assert_eq!(dead_letter_reasons(&h, 1).await, ["unauthenticated"]);
    assert_eq!(position(&h, "b").await, 0);
    h.publish(&created("b", 1), Uuid::now_v7()).await;
    h.expect_applied(1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signed_body_that_disagrees_with_its_headers_is_rejected() {
    let mut h = harness().await;
    h.start().await;
    let producer = shop_testkit::keys::signing_key();
    // The headers say "c", the body "someone-else"; signed by a key the
    // consumer trusts, so only the comparison can catch it.
    let event = created("someone-else", 1);
    let mut properties = TestPublisher::properties(&event, Uuid::now_v7());
    properties = with_header(properties, wire::AGGREGATE_ID, wire::long_string("c"));
    let body = event.encode_to_vec();
    let properties = producer.sign_properties(properties, &body).unwrap();
    h.publish_raw(UserCreated::ROUTING_KEY, &body, properties).await;
    // The body's version is 3, the header's 1.
    let event = updated("c", 3);
    let properties = with_header(
        TestPublisher::properties(&event, Uuid::now_v7()),
        wire::AGGREGATE_VERSION,
        AMQPValue::LongLongInt(1),
    );
    let body = event.encode_to_vec();
    let properties = producer.sign_properties(properties, &body).unwrap();
    h.publish_raw(UserUpdated::ROUTING_KEY, &body, properties).await;

    let letters = h.expect_dead_letters(2).await;
    for letter in &letters {
        assert_eq!(letter.reason, "rejected", "{letter:?}");
        assert!(
            letter.error.as_deref().unwrap().contains("the headers say"),
            "{letter:?}"
        );
    }
    assert_eq!(h.applied().await, []);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_attempt_header_on_a_fresh_delivery_counts_as_a_first_attempt() {
    let mut h = harness().await;
    // Fails once, transiently: a first attempt is retried.
    h.behavior
        .fail_times
        .store(1, std::sync::atomic::Ordering::SeqCst);
    h.start().await;
    let event = created("d", 1);
    let mut properties = TestPublisher::properties(&event, Uuid::now_v7());
    properties = with_header(properties, wire::ATTEMPT, AMQPValue::LongLongInt(99));
    properties = with_header(properties, wire::ORIGINAL_EXCHANGE, wire::long_string("made-up"));
    properties = with_header(properties, wire::SEAL, wire::long_string("AAAAAAAA"));
    h.publisher
        .publish_raw_signed(
            &h.exchange,
            UserCreated::ROUTING_KEY,
            &event.encode_to_vec(),
            properties,
        )
        .await
        .unwrap();

    let applied = h.expect_applied(1).await;
    assert_eq!(applied[0].1, "d");
    let attempts: Vec<u32> = h
        .behavior
        .attempts
        .lock()
        .unwrap()
        .iter()
        .map(|(_, _, attempt)| *attempt)
        .collect();
    assert_eq!(
        attempts,
        [1, 2],
        "the forged attempt was ignored, the retry counted"
    );
    assert!(h.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signed_event_one_byte_over_the_size_cap_is_dead_lettered_as_too_large() {
    let event = created("e", 1);
    let cap = event.encoded_len() - 1;
    let mut h = harness_with(|mut config, _| {
        config.max_message_bytes = u32::try_from(cap).unwrap();
        config
    })
    .await;
    h.start().await;
    h.publish(&event, Uuid::now_v7()).await;
    let small = UserCreated {
        email: String::new(),
        name: String::new(),
        ..created("f", 1)
    };
    assert!(small.encoded_len() <= cap);
    h.publish(&small, Uuid::now_v7()).await;

    let letters = h.expect_dead_letters(1).await;
    assert_eq!(letters[0].reason, "too-large");
    assert!(
        letters[0]
            .error
            .as_deref()
            .unwrap()
            .contains("CONSUMER_MAX_MESSAGE_BYTES")
    );
    assert_eq!(
        letters[0].body.len(),
        cap + 1,
        "kept whole, to be replayed with a larger cap"
    );
    let applied = h.expect_applied(1).await;
    assert_eq!(applied[0].1, "f");
    assert_eq!(position(&h, "e").await, 0);
}

/// Messages in `queue` (ready).
async fn depth(queue: &str) -> u32 {
    crate::support::depth(queue).await.expect("the queue exists")
}

/// The reason of the first few dead letters, read without taking them.
async fn sample_reasons(queue: &str, count: usize) -> Vec<String> {
    let connection =
        lapin::Connection::connect(&shop_testkit::amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut reasons = Vec::new();
    for _ in 0..count {
        let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
        else {
            break;
        };
        let headers = message.delivery.properties.headers().clone().unwrap_or_default();
        reasons.push(
            wire::header_str(&headers, wire::DEAD_LETTER_REASON)
                .unwrap_or_default()
                .to_owned(),
        );
    }
    // Unacknowledged: back to the queue with the channel.
    let _ = connection.close(200, "sampled".into()).await;
    reasons
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_far_future_versions_fill_parking_to_its_limits_and_no_further() {
    const USERS: usize = 20;
    const VERSIONS: i64 = 500;
    let mut h = harness_with(|mut config, _| {
        config.max_parked_per_aggregate = 100;
        config.max_parked = 1_500;
        config.batch_size = 100;
        config
    })
    .await;
    h.start().await;
    // Versions 3 to 502 of twenty users none of which has a version 1 or 2:
    // every one of them is ahead of its turn. Signed by the trusted key, as
    // a buggy or compromised producer would: strangers never get this far.
    let events: Vec<_> = (0..VERSIONS)
        .flat_map(|version| {
            (0..USERS).map(move |index| (updated(&format!("far-{index}"), version + 3), Uuid::now_v7()))
        })
        .collect();
    h.publisher.publish_all(&h.exchange, &events).await.unwrap();
    let total = USERS * VERSIONS as usize;
    let dead_letter_queue = shop_messaging::topology::dead_letter_queue(&h.queue);
    let parked = shop_testkit::eventually(
        "every far-future event parked or dead-lettered",
        Duration::from_secs(180),
        || async {
            let mut conn = h.pool.get().await.unwrap();
            let held = sequence::held(&mut conn, &h.queue).await.unwrap();
            let parked: usize = held.iter().map(|held| held.parked.len()).sum();
            let dead = depth(&dead_letter_queue).await as usize;
            (parked + dead == total).then_some((held, dead))
        },
    )
    .await;
    let (held, dead) = parked;
    let parked: usize = held.iter().map(|held| held.parked.len()).sum();
    assert_eq!(parked, 1_500, "parking filled to its total limit");
    assert!(
        held.iter().all(|held| held.parked.len() <= 100),
        "no aggregate past its own limit"
    );
    assert_eq!(dead, total - 1_500);
    let reasons = sample_reasons(&dead_letter_queue, 5).await;
    assert_eq!(reasons, ["park-limit"; 5]);

    // Another user's events still flow.
    h.publish(&created("ok", 1), Uuid::now_v7()).await;
    shop_testkit::eventually("the next user's event applied", WAIT, || async {
        (!h.applied().await.is_empty()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_signed_by_the_old_and_the_new_key_apply_until_the_old_one_is_removed() {
    let (old, _) = shop_testkit::keys::new_key("user-2026-11");
    let (new, _) = shop_testkit::keys::new_key("user-2026-12");
    let both = TrustedKeys::none().with_key(&old).with_key(&new);
    let mut h = harness_with(|mut config, _| {
        config.trusted_keys = both;
        config
    })
    .await;
    h.start().await;
    h.publisher
        .publish_signed_by(&old, &h.exchange, &created("g", 1), Uuid::now_v7())
        .await
        .unwrap();
    h.publisher
        .publish_signed_by(&new, &h.exchange, &updated("g", 2), Uuid::now_v7())
        .await
        .unwrap();
    let applied = h.expect_applied(2).await;
    assert_eq!(seen_by_user(&applied)["g"], [1, 2]);

    // The old key retired: only the new one is listed.
    h.stop().await;
    h.config.trusted_keys = TrustedKeys::none().with_key(&new);
    h.restart().await;
    h.publisher
        .publish_signed_by(&old, &h.exchange, &updated("g", 3), Uuid::now_v7())
        .await
        .unwrap();
    h.publisher
        .publish_signed_by(&new, &h.exchange, &created("h", 1), Uuid::now_v7())
        .await
        .unwrap();
    let letters = h.expect_dead_letters(1).await;
    assert_eq!(letters[0].reason, "unauthenticated");
    assert!(
        letters[0].error.as_deref().unwrap().contains("user-2026-11"),
        "{:?}",
        letters[0].error
    );
    shop_testkit::eventually("h applied", WAIT, || async {
        (h.applied().await.len() == 3).then_some(())
    })
    .await;
    assert_eq!(position(&h, "g").await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_dead_letter_and_a_released_parked_event_still_verify() {
    let mut h = harness().await;
    h.behavior
        .reject_versions
        .lock()
        .unwrap()
        .insert(("r".to_owned(), 2));
    h.start().await;
    let dead = Uuid::now_v7();
    h.publish(&created("r", 1), Uuid::now_v7()).await;
    h.publish(&updated("r", 2), dead).await;
    h.publish(&updated("r", 3), Uuid::now_v7()).await;
    let letters = h.expect_dead_letters(1).await;
    assert!(
        letters[0].headers.contains_key(wire::SIGNATURE),
        "the dead letter keeps its signature: {:?}",
        letters[0].headers
    );
    shop_testkit::eventually("version 3 parked behind the dead letter", WAIT, || async {
        let mut conn = h.pool.get().await.unwrap();
        let held = sequence::held(&mut conn, &h.queue).await.unwrap();
        (held.iter().map(|held| held.parked.len()).sum::<usize>() == 1).then_some(())
    })
    .await;

    h.behavior.reject_versions.lock().unwrap().clear();
    let dlq = DeadLetters::connect(&h.broker.config(), &h.queue).await.unwrap();
    let replayed = dlq
        .replay(&Selection {
            message_id: Some(dead.to_string()),
            ..Selection::default()
        })
        .await
        .unwrap();
    dlq.close().await;
    assert_eq!(replayed.replayed, 1);

    // Version 2 came back through the dead-letter round trip and version 3
    // through parking (its headers stored as JSON, integers rewritten):
    // both verified, both applied, in order.
    let applied = h.expect_applied(3).await;
    assert_eq!(seen_by_user(&applied)["r"], [1, 2, 3]);
    assert!(h.dead_letters().await.is_empty(), "nothing refused on the way");
}

#[tokio::test(flavor = "multi_thread")]
async fn unsigned_events_apply_only_while_the_upgrade_window_is_open() {
    let mut h = harness_with(|mut config, _| {
        config.accept_unsigned_until = Some(chrono::Utc::now() + chrono::TimeDelta::hours(1));
        config
    })
    .await;
    h.start().await;
    h.publisher
        .publish_unsigned(&h.exchange, &created("i", 1), Uuid::now_v7())
        .await
        .unwrap();
    // A bad signature is refused even inside the window.
    let (stranger, _) = shop_testkit::keys::new_key("stranger-2");
    h.publisher
        .publish_signed_by(&stranger, &h.exchange, &updated("i", 2), Uuid::now_v7())
        .await
        .unwrap();
    h.expect_applied(1).await;
    assert_eq!(dead_letter_reasons(&h, 1).await, ["unauthenticated"]);

    h.stop().await;
    h.config.accept_unsigned_until = Some(chrono::Utc::now() - chrono::TimeDelta::seconds(1));
    h.restart().await;
    h.publisher
        .publish_unsigned(&h.exchange, &updated("i", 2), Uuid::now_v7())
        .await
        .unwrap();
    assert_eq!(
        dead_letter_reasons(&h, 2).await,
        ["unauthenticated", "unauthenticated"]
    );
    assert_eq!(position(&h, "i").await, 1);
}
