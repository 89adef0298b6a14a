//! `shop dlq`, run as an operator would.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use assert_cmd::Command;
use shop_contracts::Event as _;
use shop_contracts::user::UserCreated;
use shop_testkit::TestPublisher;
use uuid::Uuid;

use crate::system::{System, start};

fn dlq(system: &System, args: &[&str]) -> (bool, String, String) {
    let output = Command::cargo_bin("shop")
        .unwrap()
        .arg("dlq")
        .args(args)
        .env("AMQP_URL", shop_testkit::amqp_url())
        .env(
            "USER_EVENTS_QUEUE",
            &system.order_settings.service.user_events_queue,
        )
        .env("CONSUMER_DATABASE_URL", system.order_db_url())
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_commands_list_show_replay_and_purge() {
    let system = start(true).await;
    let exchange = &system.order_settings.service.user_events_exchange;
    let id = Uuid::now_v7().to_string();
    TestPublisher::connect(exchange)
        .await
        .unwrap()
        .publish_raw_signed(
            exchange,
            UserCreated::ROUTING_KEY,
            b"\xff\xfe",
            TestPublisher::signable(UserCreated::TYPE_NAME, &id, "garbled", 1),
        )
        .await
        .unwrap();
    let dead_letters = shop_messaging::dlq::DeadLetters::connect(
        &system.order_settings.host.amqp,
        &system.order_settings.service.user_events_queue,
    )
    .await
    .unwrap();
    shop_testkit::eventually("the dead letter", Duration::from_secs(10), || async {
        (dead_letters.summary().await.ok()?.count == 1).then_some(())
    })
    .await;
    dead_letters.close().await;

    let (ok, listed, _) = dlq(&system, &["list"]);
    assert!(ok);
    assert!(listed.contains(": 1 dead letter(s)"), "{listed}");
    assert!(listed.contains("reason undecodable: 1"), "{listed}");

    let (ok, shown, _) = dlq(&system, &["show", &id]);
    assert!(ok);
    assert!(shown.contains("reason: undecodable"), "{shown}");
    assert!(shown.contains("dead_letter_error"), "{shown}");

    let (ok, _, stderr) = dlq(&system, &["purge"]);
    assert!(!ok, "purge without --yes is refused");
    assert!(stderr.contains("--yes"), "{stderr}");

    let (ok, replayed, _) = dlq(&system, &["replay", "--reason", "max-attempts"]);
    assert!(ok);
    assert_eq!(replayed.trim(), "replayed 0, kept 1");

    // The garbled event holds its aggregate (user/garbled, version 1):
    // purging it would strand the aggregate, so purge deletes nothing until
    // it is skipped (or replayed).
    let (ok, _, stderr) = dlq(&system, &["purge", "--yes"]);
    assert!(!ok, "purge refused while an aggregate waits on a dead letter");
    assert!(
        stderr.contains("user/garbled") && stderr.contains(&id),
        "{stderr}"
    );
    let (ok, listed, _) = dlq(&system, &["list"]);
    assert!(ok && listed.contains(": 1 dead letter(s)"), "{listed}");
    let (ok, skipped, stderr) = dlq(&system, &["skip", &id]);
    assert!(ok, "{stderr}");
    assert!(skipped.contains("removed 1 dead letter(s)"), "{skipped}");

    let (ok, purged, stderr) = dlq(&system, &["purge", "--yes"]);
    assert!(ok, "{stderr}");
    assert!(purged.starts_with("purged 0"), "{purged}");
}

/// Publishes `event` as the relay would (signed), with a body that decodes
/// or not.
async fn publish_user_event(
    system: &System,
    publisher: &TestPublisher,
    event: &shop_contracts::user::UserUpdated,
    decodable: bool,
) -> Uuid {
    use prost::Message as _;
    let id = Uuid::now_v7();
    let exchange = &system.order_settings.service.user_events_exchange;
    let trace = Default::default();
    let id_text = id.to_string();
    let headers = shop_messaging::wire::EventHeaders {
        event_id: &id_text,
        type_name: shop_contracts::user::UserUpdated::TYPE_NAME,
        app_id: "test",
        timestamp: 0,
        aggregate_type: "user",
        aggregate_id: &event.user_id,
        aggregate_version: event.version,
        partition: shop_messaging::wire::partition_of(&event.user_id),
        trace: &trace,
    };
    let body = if decodable {
        event.encode_to_vec()
    } else {
        b"\xff\xfe".to_vec()
    };
    publisher
        .publish_raw_signed(
            exchange,
            shop_contracts::user::UserUpdated::ROUTING_KEY,
            &body,
            headers.properties(),
        )
        .await
        .unwrap();
    id
}

fn updated(user: &str, version: i64) -> shop_contracts::user::UserUpdated {
    shop_contracts::user::UserUpdated {
        user_id: user.to_owned(),
        version,
        email: format!("{user}@example.com"),
        name: format!("Version {version}"),
        occurred_at: None,
    }
}

/// Publishes a new user's creation and its version 3 (version 2 never
/// comes: 3 parks behind a gap); returns the user's id.
async fn user_with_a_gap(system: &System, publisher: &TestPublisher) -> String {
    let exchange = &system.order_settings.service.user_events_exchange;
    let user = Uuid::now_v7().to_string();
    publisher
        .publish(
            exchange,
            &UserCreated {
                user_id: user.clone(),
                version: 1,
                email: format!("{user}@example.com"),
                name: "First".to_owned(),
                occurred_at: None,
            },
            Uuid::now_v7(),
        )
        .await
        .unwrap();
    publish_user_event(system, publisher, &updated(&user, 3), true).await;
    user
}

/// `shop dlq list` until its text contains `needle`.
async fn wait_for_listing(system: &System, needle: &str) -> String {
    shop_testkit::eventually(
        &format!("`shop dlq list` showing {needle:?}"),
        Duration::from_secs(20),
        || async {
            let (ok, listed, _) = dlq(system, &["list"]);
            (ok && listed.contains(needle)).then_some(listed)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_holds_its_users_later_events_until_skipped_and_a_gap_until_released() {
    let system = start(true).await;
    let publisher = TestPublisher::connect(&system.order_settings.service.user_events_exchange)
        .await
        .unwrap();
    let user = Uuid::now_v7().to_string();
    publisher
        .publish(
            &system.order_settings.service.user_events_exchange,
            &shop_contracts::user::UserCreated {
                user_id: user.clone(),
                version: 1,
                email: format!("{user}@example.com"),
                name: "First".to_owned(),
                occurred_at: None,
            },
            Uuid::now_v7(),
        )
        .await
        .unwrap();
    let poison = publish_user_event(&system, &publisher, &updated(&user, 2), false).await;
    publish_user_event(&system, &publisher, &updated(&user, 3), true).await;

    // The dead letter is in its queue a moment before the position that
    // records it commits: wait for the position, not only the queue.
    let listed = wait_for_listing(
        &system,
        &format!("user/{user} at version 1, behind dead letter {poison} (version 2)"),
    )
    .await;
    assert!(listed.contains(": 1 dead letter(s)"), "{listed}");
    assert!(listed.contains("version(s) 3 parked"), "{listed}");
    let (ok, shown, _) = dlq(&system, &["show", &poison.to_string()]);
    assert!(ok);
    assert!(shown.contains("parked behind it: user/"), "{shown}");

    let (ok, skipped, stderr) = dlq(&system, &["skip", &poison.to_string()]);
    assert!(ok, "{stderr}");
    assert!(
        skipped.contains("removed 1 dead letter(s), released 1 parked event(s)"),
        "{skipped}"
    );
    wait_for_listing(&system, "parked: 0 aggregate(s), 0 event(s)").await;
    let (_, listed, _) = dlq(&system, &["list"]);
    assert!(listed.contains(": 0 dead letter(s)"), "{listed}");

    // A gap: version 4 never comes.
    publish_user_event(&system, &publisher, &updated(&user, 5), true).await;
    wait_for_listing(
        &system,
        "at version 3, waiting for version 4 (a gap): version(s) 5 parked",
    )
    .await;
    let (ok, released, stderr) = dlq(&system, &["release", &format!("user/{user}")]);
    assert!(ok, "{stderr}");
    assert!(
        released.contains("gave up on versions 4 to 4; released 1"),
        "{released}"
    );
    wait_for_listing(&system, "parked: 0 aggregate(s), 0 event(s)").await;

    let mut order_db = shop_database::establish(&system.order_settings.host.database)
        .await
        .unwrap();
    let aggregate: shop_messaging::sequence::Aggregate = format!("user/{user}").parse().unwrap();
    let position = shop_messaging::sequence::position(
        &mut order_db,
        &system.order_settings.service.user_events_queue,
        &aggregate,
    )
    .await
    .unwrap();
    assert_eq!(
        position.last_version, 5,
        "versions 1, 3 and 5 applied; 2 skipped, 4 given up"
    );
}

/// `consumer_stuck_gaps` of the order service's consumer of user events,
/// and `consumer_parked_events{reason="gap"}` (None before the first sweep).
fn gap_gauges(system: &System) -> (Option<f64>, Option<f64>) {
    let metrics = shop_host::admin::metrics_handle().unwrap().render();
    let queue = system.order_settings.service.user_events_queue.as_str();
    (
        shop_testkit::metric(&metrics, "consumer_stuck_gaps", &[("queue", queue)]),
        shop_testkit::metric(
            &metrics,
            "consumer_parked_events",
            &[("queue", queue), ("reason", "gap")],
        ),
    )
}

/// The gap timeout end to end, with the gap policy of today (wait): version
/// 2 of a user never comes, so version 3 waits. Not before
/// `CONSUMER_GAP_TIMEOUT` (1 s here) has passed since it parked,
/// `consumer_stuck_gaps` goes from 0 to 1; `shop dlq list` shows the user
/// waiting for version 2; `shop dlq release` gives up on it, version 3 is
/// applied and the count falls back to 0.
#[tokio::test(flavor = "multi_thread")]
async fn a_gap_past_the_gap_timeout_is_counted_stuck_listed_and_released_by_the_cli() {
    let system = crate::system::start_with(crate::system::Options {
        adjust_order: Some(Box::new(|settings: &mut order_service::Config| {
            settings.service.consumer.gap_timeout = shop_config::duration("1s").unwrap();
            // Sampled often, so that the count is seen soon after it moves.
            settings.service.consumer.sweep_interval = Duration::from_millis(100);
        })),
        ..crate::system::Options::default()
    })
    .await;
    shop_testkit::eventually(
        "the gauges of the first sweep",
        Duration::from_secs(10),
        || async { (gap_gauges(&system) == (Some(0.0), Some(0.0))).then_some(()) },
    )
    .await;

    let exchange = &system.order_settings.service.user_events_exchange;
    let publisher = TestPublisher::connect(exchange).await.unwrap();
    let user = user_with_a_gap(&system, &publisher).await;

    // Parked behind the gap, and not yet stuck.
    let queue = &system.order_settings.service.user_events_queue;
    let aggregate: shop_messaging::sequence::Aggregate = format!("user/{user}").parse().unwrap();
    let database = &system.order_settings.host.database;
    let held = shop_testkit::eventually("version 3 parked", Duration::from_secs(10), || async {
        let mut conn = shop_database::establish(database).await.ok()?;
        shop_messaging::sequence::held(&mut conn, queue)
            .await
            .ok()?
            .into_iter()
            .find(|held| held.aggregate == aggregate && held.parked.len() == 1)
    })
    .await;
    let parked_at = held.parked[0].parked_at;
    assert_eq!(held.position.last_version, 1);
    assert_eq!(held.position.dead_letter, None, "a gap, not a dead letter");
    assert_eq!(held.parked[0].version, 3);

    // Counted as a gap at once, as stuck only past the timeout.
    let counted_before_timeout = AtomicBool::new(false);
    let stuck_seen_at =
        shop_testkit::eventually("consumer_stuck_gaps 1", Duration::from_secs(10), || async {
            let (stuck, gaps) = gap_gauges(&system);
            let now = chrono::Utc::now();
            if stuck == Some(0.0) && gaps == Some(1.0) {
                counted_before_timeout.store(true, Ordering::SeqCst);
            }
            (stuck == Some(1.0)).then_some(now)
        })
        .await;
    assert!(
        stuck_seen_at - parked_at >= chrono::Duration::seconds(1),
        "counted stuck {} ms after it parked, before CONSUMER_GAP_TIMEOUT",
        (stuck_seen_at - parked_at).num_milliseconds()
    );
    assert!(
        counted_before_timeout.load(Ordering::SeqCst),
        "the gap was seen parked and not yet stuck"
    );

    let listed = wait_for_listing(
        &system,
        &format!("user/{user} at version 1, waiting for version 2 (a gap): version(s) 3 parked"),
    )
    .await;
    assert!(listed.contains("parked: 1 aggregate(s), 1 event(s)"), "{listed}");

    let (ok, released, stderr) = dlq(&system, &["release", &format!("user/{user}")]);
    assert!(ok, "{stderr}");
    assert!(
        released.contains("gave up on versions 2 to 2; released 1"),
        "{released}"
    );
    shop_testkit::eventually("consumer_stuck_gaps 0", Duration::from_secs(10), || async {
        (gap_gauges(&system) == (Some(0.0), Some(0.0))).then_some(())
    })
    .await;
    wait_for_listing(&system, "parked: 0 aggregate(s), 0 event(s)").await;
    let mut order_db = shop_database::establish(database).await.unwrap();
    let position = shop_messaging::sequence::position(&mut order_db, queue, &aggregate)
        .await
        .unwrap();
    assert_eq!(position.last_version, 3, "version 3 applied after the release");
}

/// A counter of the order service's consumer of user events (None before
/// it is exported).
fn consumer_counter(system: &System, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let metrics = shop_host::admin::metrics_handle().unwrap().render();
    let queue = system.order_settings.service.user_events_queue.as_str();
    let mut labels = labels.to_vec();
    labels.push(("queue", queue));
    shop_testkit::metric(&metrics, name, &labels)
}

/// The gap policy's action and a version conflict, as an operator sees
/// them: counted, and listed by `shop dlq list`; then `shop dlq
/// set-position` moves the stuck user past the gap.
#[tokio::test(flavor = "multi_thread")]
async fn the_gap_policys_action_and_a_version_conflict_are_counted_and_listed_and_set_position_frees_the_user()
 {
    let system = crate::system::start_with(crate::system::Options {
        adjust_order: Some(Box::new(|settings: &mut order_service::Config| {
            settings.service.consumer.gap_timeout = shop_config::duration("1s").unwrap();
            settings.service.consumer.sweep_interval = Duration::from_millis(100);
            settings.service.consumer.gap_policy = Some(shop_messaging::sequence::GapPolicy::Wait);
        })),
        ..crate::system::Options::default()
    })
    .await;
    let exchange = &system.order_settings.service.user_events_exchange;
    let publisher = TestPublisher::connect(exchange).await.unwrap();
    let user = user_with_a_gap(&system, &publisher).await;

    let listed = wait_for_listing(&system, "gap policy wait: waited").await;
    assert!(
        listed.contains(&format!(
            "user/{user} at version 1, waiting for version 2 (a gap)"
        )),
        "{listed}"
    );
    shop_testkit::eventually("the wait counted", Duration::from_secs(10), || async {
        consumer_counter(
            &system,
            "consumer_gap_actions_total",
            &[("policy", "wait"), ("outcome", "waited")],
        )
        .filter(|count| *count >= 1.0)
    })
    .await;
    assert_eq!(
        consumer_counter(&system, "consumer_version_conflicts_total", &[]),
        Some(0.0)
    );

    // Another event claiming version 1, which the creation holds.
    let reused = publish_user_event(&system, &publisher, &updated(&user, 1), true).await;
    let listed = wait_for_listing(&system, "version conflicts: 1").await;
    assert!(
        listed.contains(&format!(
            "user/{user} version 1: shop.user.v1.UserUpdated {reused} not applied"
        )),
        "{listed}"
    );
    assert_eq!(
        consumer_counter(&system, "consumer_version_conflicts_total", &[]),
        Some(1.0)
    );

    let (ok, set, stderr) = dlq(&system, &["set-position", &format!("user/{user}"), "2"]);
    assert!(ok, "{stderr}");
    assert!(
        set.contains("position set from version 1 to 2; released 1 parked event(s)"),
        "{set}"
    );
    wait_for_listing(&system, "parked: 0 aggregate(s), 0 event(s)").await;
    let mut order_db = shop_database::establish(&system.order_settings.host.database)
        .await
        .unwrap();
    let aggregate: shop_messaging::sequence::Aggregate = format!("user/{user}").parse().unwrap();
    let position = shop_messaging::sequence::position(
        &mut order_db,
        &system.order_settings.service.user_events_queue,
        &aggregate,
    )
    .await
    .unwrap();
    assert_eq!(position.last_version, 3, "version 3 applied after the move");
}
