//! `shop dlq`, run as an operator would.

use std::time::Duration;

use assert_cmd::Command;
use lapin::BasicProperties;
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
        .publish_raw(
            exchange,
            UserCreated::ROUTING_KEY,
            b"\xff\xfe",
            BasicProperties::default()
                .with_type(UserCreated::TYPE_NAME.into())
                .with_message_id(id.as_str().into()),
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

    let (ok, purged, _) = dlq(&system, &["purge", "--yes"]);
    assert!(ok);
    assert!(purged.starts_with("purged 1"), "{purged}");
}
