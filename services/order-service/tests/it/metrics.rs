//! Consumer metrics on the admin port.

use std::time::Duration;

use shop_contracts::Event as _;
use shop_contracts::user::UserCreated;
use shop_testkit::{http_get, metric};
use uuid::Uuid;

use crate::helpers::spawn_app;

#[tokio::test(flavor = "multi_thread")]
async fn consumed_duplicate_and_dead_lettered_events_are_counted() {
    let app = spawn_app().await;
    let queue = app.settings.service.user_events_queue.clone();
    let created = |id: Uuid| UserCreated {
        user_id: id.to_string(),
        version: 1,
        email: String::new(),
        name: String::new(),
        occurred_at: None,
    };
    let twice = Uuid::now_v7();
    let (first, second) = (Uuid::now_v7(), Uuid::now_v7());

    app.publish_user_event(&created(first)).await;
    app.publish_user_event_with_id(&created(second), twice).await;
    app.publish_user_event_with_id(&created(second), twice).await;
    // Signed by the user service's key, but not a UserCreated.
    app.publisher
        .publish_raw_signed(
            &app.settings.service.user_events_exchange,
            UserCreated::ROUTING_KEY,
            b"\xff",
            shop_testkit::TestPublisher::properties(&created(Uuid::now_v7()), Uuid::now_v7()),
        )
        .await
        .unwrap();

    let by = |outcome| [("queue", queue.as_str()), ("outcome", outcome)];
    let metrics = shop_testkit::eventually("the events counted", Duration::from_secs(15), || async {
        let metrics = http_get(app.admin, "/metrics").await.ok()?.1;
        let applied = metric(&metrics, "consumer_events_total", &by("applied"));
        let duplicate = metric(&metrics, "consumer_events_total", &by("duplicate"));
        let dead = metric(&metrics, "consumer_events_total", &by("dead_lettered"));
        (applied == Some(2.0) && duplicate == Some(1.0) && dead == Some(1.0)).then_some(metrics)
    })
    .await;

    assert_eq!(
        metric(
            &metrics,
            "consumer_dead_letters_total",
            &[("queue", queue.as_str()), ("reason", "undecodable")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&metrics, "consumer_connected", &[("queue", queue.as_str())]),
        Some(1.0)
    );
    assert!(
        metric(
            &metrics,
            "consumer_apply_seconds_count",
            &[("queue", queue.as_str())]
        )
        .unwrap()
            >= 1.0
    );
    let (status, health) = http_get(app.admin, "/health").await.unwrap();
    assert_eq!(status, 200, "{health}");
    assert!(
        health.contains(&format!("rabbitmq (consumer {queue}) up")),
        "{health}"
    );
}
