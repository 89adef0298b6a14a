//! The users projection: known users gate CreateOrder; events are applied
//! once and by version.

use std::time::Duration;

use shop_contracts::user::{UserCreated, UserDeleted, UserUpdated};
use tonic::Code;
use uuid::Uuid;

use crate::helpers::{KnownUser, WAIT, create_request, spawn_app};

fn created(id: Uuid, version: i64, name: &str) -> UserCreated {
    UserCreated {
        user_id: id.to_string(),
        version,
        email: format!("{name}@example.com").to_lowercase(),
        name: name.to_owned(),
        occurred_at: None,
    }
}

fn updated(id: Uuid, version: i64, name: &str) -> UserUpdated {
    UserUpdated {
        user_id: id.to_string(),
        version,
        email: format!("{name}@example.com").to_lowercase(),
        name: name.to_owned(),
        occurred_at: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn create_order_is_refused_until_the_users_creation_arrives_then_succeeds() {
    let app = spawn_app().await;
    let user = Uuid::now_v7();

    let status = app
        .client
        .clone()
        .create_order(create_request(user, &[("sku-1", 1)]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("not known"), "{}", status.message());

    app.publish_user_event(&created(user, 1, "Ada")).await;
    app.wait_for_user_version(user, 1).await;
    let order = app.create_order(user, &[("sku-1", 1)]).await;

    assert_eq!(order.user_id, user.to_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn create_order_for_a_deleted_user_is_refused() {
    let app = spawn_app().await;
    let user = app.known_user_id().await;

    app.publish_user_event(&UserDeleted {
        user_id: user.to_string(),
        version: 2,
        occurred_at: None,
    })
    .await;
    app.wait_for_user_version(user, 2).await;
    let status = app
        .client
        .clone()
        .create_order(create_request(user, &[("sku-1", 1)]))
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("deleted"), "{}", status.message());
}

/// The projection's version guard alone would hide a second application
/// (a repeated create changes no row), and the inbox holds one row per id
/// whatever happens: what shows an effect is the consumer handing the event
/// to the projection, counted in `consumer_events_total{outcome="applied"}`.
#[tokio::test(flavor = "multi_thread")]
async fn the_same_event_delivered_three_times_has_one_effect() {
    let app = spawn_app().await;
    let user = Uuid::now_v7();
    let event_id = Uuid::now_v7();

    for _ in 0..3 {
        app.publish_user_event_with_id(&created(user, 1, "Grace"), event_id)
            .await;
    }
    app.publish_user_event(&updated(user, 2, "Grace Hopper")).await;
    // Four deliveries: each one counted once, as applied or as a duplicate.
    shop_testkit::eventually("all four deliveries consumed", WAIT, || async {
        (app.consumer_events("applied") + app.consumer_events("duplicate") >= 4).then_some(())
    })
    .await;

    assert_eq!(
        (app.consumer_events("applied"), app.consumer_events("duplicate")),
        (2, 2),
        "each distinct event handed to the projection once, the copies skipped"
    );
    assert_eq!(app.applications().await, 2, "two applications in the ledger");
    assert_eq!(app.known_user(user).await.unwrap().version, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_delivered_before_its_create_waits_for_it_then_both_apply_in_order() {
    let app = spawn_app().await;
    let user = Uuid::now_v7();

    app.publish_user_event(&updated(user, 2, "Later")).await;
    // Parked, not applied: the projection has not seen the user.
    app.wait_for_parked(user, &[2]).await;
    assert_eq!(app.known_user(user).await, None);

    app.publish_user_event(&created(user, 1, "Earlier")).await;
    app.wait_for_user_version(user, 2).await;
    assert_eq!(
        app.known_user(user).await.unwrap(),
        KnownUser {
            version: 2,
            deleted: false
        }
    );
    shop_testkit::eventually("nothing parked", WAIT, || async {
        app.held().await.is_empty().then_some(())
    })
    .await;
    assert_eq!(app.applications().await, 2, "both applied");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delete_delivered_before_the_create_waits_for_it_and_ends_deleted() {
    let app = spawn_app().await;
    let user = Uuid::now_v7();

    app.publish_user_event(&UserDeleted {
        user_id: user.to_string(),
        version: 2,
        occurred_at: None,
    })
    .await;
    app.wait_for_parked(user, &[2]).await;
    assert_eq!(app.known_user(user).await, None);
    app.publish_user_event(&created(user, 1, "Ghost")).await;
    app.wait_for_user_version(user, 2).await;

    assert!(app.known_user(user).await.unwrap().deleted);
    let status = app
        .client
        .clone()
        .create_order(create_request(user, &[("sku-1", 1)]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_event_with_a_malformed_user_id_is_dead_lettered_and_the_next_one_applied() {
    let app = spawn_app().await;
    let bad = UserCreated {
        user_id: "not-a-uuid".to_owned(),
        version: 1,
        email: String::new(),
        name: String::new(),
        occurred_at: None,
    };

    app.publish_user_event(&bad).await;
    let good = app.known_user_id().await;

    assert!(app.known_user(good).await.is_some());
    let dlq = shop_messaging::dlq::DeadLetters::connect(
        &app.settings.host.amqp,
        &app.settings.service.user_events_queue,
    )
    .await
    .unwrap();
    let letters = shop_testkit::eventually("the dead letter", Duration::from_secs(10), || async {
        let letters = dlq.browse().await.ok()?;
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    dlq.close().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "rejected");
    assert!(letters[0].error.as_deref().unwrap().contains("not a UUID"));
}
