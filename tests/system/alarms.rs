//! A broker that blocks publishers (a memory or disk alarm), on a RabbitMQ
//! node of the test's own, so the alarm touches no other test.

use std::time::{Duration, Instant};

use shop_contracts::order as order_pb;
use shop_contracts::user as user_pb;
use shop_testkit::cluster::{ClusterOptions, RabbitCluster};

use crate::system::{System, WAIT, start_on};

fn order_request(user_id: &str) -> order_pb::CreateOrderRequest {
    order_pb::CreateOrderRequest {
        user_id: user_id.to_owned(),
        items: vec![order_pb::OrderItem {
            product_id: "sku-1".to_owned(),
            quantity: 1,
        }],
        request_id: String::new(),
    }
}

async fn create_user(system: &System, email: &str) -> user_pb::User {
    system
        .users
        .clone()
        .create_user(user_pb::CreateUserRequest {
            email: email.to_owned(),
            name: "Alarm".to_owned(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
}

async fn order_accepted(system: &System, user: &user_pb::User) -> bool {
    system
        .orders
        .clone()
        .create_order(order_request(&user.id))
        .await
        .is_ok()
}

/// The broker raises a memory alarm and blocks every publishing connection
/// while commands keep coming: commands are still answered, the relay waits
/// (nothing deadlocks, nothing is published twice into a blocked socket),
/// the consumer stays connected, and once the alarm clears every event
/// arrives, with no dead letter.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs rabbitmq-server on the PATH (.ci/install-tools); run: cargo test -p system-tests --test system alarms -- --ignored"]
async fn a_broker_memory_alarm_pauses_publishing_and_everything_flows_once_it_clears() {
    let node = RabbitCluster::start_with(ClusterOptions {
        nodes: 1,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let system = start_on(Some(node.amqp_url(1)), true).await;
    let before = create_user(&system, "before-alarm@example.com").await;
    shop_testkit::eventually("the first user to reach the order service", WAIT, || async {
        order_accepted(&system, &before).await.then_some(())
    })
    .await;

    node.rabbitmqctl(1, &["set_vm_memory_high_watermark", "absolute", "1000000"])
        .await
        .unwrap();
    let alarm_at = Instant::now();
    let mut during = Vec::new();
    for i in 0..3 {
        during.push(create_user(&system, &format!("during-alarm-{i}@example.com")).await);
    }
    // Longer than the relay's confirm wait: a blocked connection must be
    // told from a silent one, and kept.
    let metrics = shop_host::admin::metrics_handle().unwrap();
    let exchange = system.user_settings.service.events_exchange.clone();
    let relay_connection = [("connection", "user-service outbox relay")];
    shop_testkit::eventually("the relay to report the broker blocking it", WAIT, || async {
        (shop_testkit::metric(&metrics.render(), "broker_blocked", &relay_connection) == Some(1.0))
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(alarm_at.elapsed())).await;
    for user in &during {
        assert!(
            !order_accepted(&system, user).await,
            "an event went through the alarm"
        );
    }
    shop_host::healthcheck::check_at(system.order_addr, order_service::app::CONSUMER_HEALTH)
        .await
        .expect("the consumer stays connected through the alarm");

    node.rabbitmqctl(1, &["set_vm_memory_high_watermark", "0.4"])
        .await
        .unwrap();
    let cleared_at = Instant::now();
    for user in &during {
        shop_testkit::eventually("the users created during the alarm to arrive", WAIT, || async {
            order_accepted(&system, user).await.then_some(())
        })
        .await;
    }
    eprintln!(
        "broker alarm: held {:?}; events arrived {:?} after it cleared",
        cleared_at - alarm_at,
        cleared_at.elapsed()
    );
    let dead = shop_messaging::dlq::DeadLetters::connect(
        &system.order_settings.host.amqp,
        &system.order_settings.service.user_events_queue,
    )
    .await
    .unwrap();
    assert_eq!(
        dead.summary().await.unwrap().count,
        0,
        "dead letters after the alarm"
    );
    dead.close().await;
    let text = metrics.render();
    let failures = shop_testkit::metric(&text, "outbox_batch_failures_total", &[("exchange", &exchange)]);
    assert_eq!(
        failures.unwrap_or(0.0),
        0.0,
        "the relay counted the alarm as failures (and replaced its connection)"
    );
    assert_eq!(
        shop_testkit::metric(&text, "broker_blocked", &relay_connection),
        Some(0.0)
    );
}
