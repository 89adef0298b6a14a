//! A stranger on the broker (any client that is not the user service)
//! trying to change the order service's view of a user.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use prost::Message as _;
use shop_contracts::Event as _;
use shop_contracts::user::{UserDeleted, UserUpdated};
use shop_testkit::{http_get, metric};
use tonic::Code;
use uuid::Uuid;

use crate::helpers::{KnownUser, WAIT, create_request, spawn_app};

#[tokio::test(flavor = "multi_thread")]
async fn a_strangers_unsigned_user_deleted_changes_nothing_is_dead_lettered_and_counted() {
    let app = spawn_app().await;
    let queue = app.settings.service.user_events_queue.clone();
    let user = app.known_user_id().await;
    let deleted = |version| UserDeleted {
        user_id: user.to_string(),
        version,
        occurred_at: None,
    };

    // To the user service's exchange, with every header the relay sets but
    // no signature: version 2, as a genuine delete would be.
    app.publisher
        .publish_unsigned(
            &app.settings.service.user_events_exchange,
            &deleted(2),
            Uuid::now_v7(),
        )
        .await
        .unwrap();
    // Straight to the user's partition queue through the default exchange,
    // bare: no aggregate headers, the furthest version there is.
    let topology = app.settings.service.consumer().topology();
    let partition =
        topology.partition_queue(topology.queue_of(shop_messaging::wire::partition_of(&user.to_string())));
    let connection =
        lapin::Connection::connect(&shop_testkit::amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_publish(
            "".into(),
            partition.as_str().into(),
            BasicPublishOptions::default(),
            &deleted(i64::MAX).encode_to_vec(),
            lapin::BasicProperties::default()
                .with_type(UserDeleted::TYPE_NAME.into())
                .with_message_id(Uuid::now_v7().to_string().as_str().into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;

    let metrics = shop_testkit::eventually("both counted as unauthenticated", WAIT, || async {
        let metrics = http_get(app.admin, "/metrics").await.ok()?.1;
        let counted = metric(
            &metrics,
            "consumer_unauthenticated_events_total",
            &[("queue", queue.as_str()), ("cause", "unsigned")],
        );
        // Counted once refused, then as a dead letter once the broker
        // confirmed the copy.
        let dead_lettered = metric(
            &metrics,
            "consumer_dead_letters_total",
            &[("queue", queue.as_str()), ("reason", "unauthenticated")],
        );
        (counted == Some(2.0) && dead_lettered == Some(2.0)).then_some(metrics)
    })
    .await;
    assert_eq!(
        metric(
            &metrics,
            "consumer_unauthenticated_events_total",
            &[("queue", queue.as_str()), ("cause", "bad-signature")]
        ),
        Some(0.0),
        "registered at 0, nothing else counted"
    );
    let dlq = shop_messaging::dlq::DeadLetters::connect(&app.settings.host.amqp, &queue)
        .await
        .unwrap();
    let letters = dlq.browse().await.unwrap();
    dlq.close().await;
    assert_eq!(
        letters.iter().map(|l| l.reason.as_str()).collect::<Vec<_>>(),
        ["unauthenticated", "unauthenticated"]
    );

    // The projection is as the user service left it, and the user orders.
    assert_eq!(
        app.known_user(user).await,
        Some(KnownUser {
            version: 1,
            deleted: false
        })
    );
    app.create_order(user, &[("sku-1", 1)]).await;
    // Its real version 2 is still the next one: nothing took its place.
    app.publish_user_event(&UserUpdated {
        user_id: user.to_string(),
        version: 2,
        email: String::new(),
        name: "Still Here".to_owned(),
        occurred_at: None,
    })
    .await;
    app.wait_for_user_version(user, 2).await;
    let status = app
        .client
        .clone()
        .create_order(create_request(user, &[("sku-2", 1)]))
        .await;
    assert!(status.is_ok(), "{status:?}");
    // A signed delete still works.
    app.publish_user_event(&deleted(3)).await;
    app.wait_for_user_version(user, 3).await;
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        app.client
            .clone()
            .create_order(create_request(user, &[("sku-3", 1)])),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
}
