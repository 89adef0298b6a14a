//! Faults production brings that are harder to see than a closed
//! connection: connections that go silent.

use std::time::{Duration, Instant};

use shop_messaging::AmqpConfig;
use shop_testkit::TcpProxy;
use uuid::Uuid;

use crate::support::{created, harness};

/// Every connection the consumer holds (to the broker, and its database
/// pool) stops carrying bytes without being closed, as when a NAT or a
/// firewall forgets the flows; new connections work. The consumer must
/// notice within 30 s, replace them, and apply what was published
/// meanwhile, each event once.
#[tokio::test(flavor = "multi_thread")]
async fn the_consumer_replaces_connections_that_go_silent_and_applies_what_came_meanwhile() {
    let mut h = harness().await;
    let broker_proxy = TcpProxy::start(shop_testkit::amqp_addr().await).await.unwrap();
    let database_proxy = TcpProxy::start(shop_testkit::postgres_addr().await)
        .await
        .unwrap();
    h.consumer_pool = shop_database::pool(&h.db.config_via(&database_proxy)).unwrap();
    h.start_with(AmqpConfig::new(broker_proxy.url_for(&shop_testkit::amqp_url())))
        .await;
    for i in 0..10 {
        h.publish(&created(&format!("before-{i}"), 1), Uuid::now_v7())
            .await;
    }
    h.expect_applied(10).await;

    let frozen = broker_proxy.freeze() + database_proxy.freeze();
    let frozen_at = Instant::now();
    assert!(frozen >= 2, "the consumer held connections to freeze ({frozen})");
    for i in 0..10 {
        h.publish(&created(&format!("after-{i}"), 1), Uuid::now_v7())
            .await;
    }

    shop_testkit::eventually(
        "the events published after the freeze",
        Duration::from_secs(30),
        || async { (h.applied().await.len() >= 20).then_some(()) },
    )
    .await;
    eprintln!(
        "silent connections: first events applied again {:?} after the freeze",
        frozen_at.elapsed()
    );
    let applied = h.expect_applied(20).await;
    let mut ids: Vec<Uuid> = applied.iter().map(|(id, ..)| *id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20, "each event applied once");
    assert!(h.dead_letters().await.is_empty());
    assert!(
        broker_proxy.accepted() >= 2,
        "the consumer opened a new broker connection"
    );
    assert!(
        database_proxy.accepted() >= 2,
        "the consumer opened a new database connection"
    );
}

/// The database switches to read-only (a failover onto a standby) for
/// longer than the whole retry schedule while events arrive: nothing is
/// dead-lettered, nothing is charged an attempt, and every event is applied
/// once the database takes writes again.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_database_holds_events_without_charging_them_and_applies_them_after() {
    let mut h = harness().await;
    h.start().await;
    h.publish(&created("before", 1), Uuid::now_v7()).await;
    h.expect_applied(1).await;

    h.db.set_read_only(true).await.unwrap();
    for i in 0..10 {
        h.publish(&created(&format!("during-{i}"), 1), Uuid::now_v7())
            .await;
    }
    // The whole schedule (attempts at 0, 200 and 400 ms) five times over.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        h.dead_letters().await.is_empty(),
        "events dead-lettered during the outage"
    );
    h.db.set_read_only(false).await.unwrap();

    let applied = h.expect_applied(11).await;
    let mut ids: Vec<Uuid> = applied.iter().map(|(id, ..)| *id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 11, "each event applied once");
    assert!(h.dead_letters().await.is_empty());
}
