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

/// One replica loses its database (its link cut, new connections refused)
/// while its broker connection is fine: its heartbeats fail, and past the
/// member timeout it gives up its partitions, so the healthy replica takes
/// them and applies their events within seconds, instead of the cut one
/// holding them, unacknowledged, until its database comes back.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_loses_its_database_gives_up_its_partitions_to_a_healthy_one() {
    const USERS: usize = 20;
    let mut h = crate::support::harness_with(|mut config, _| {
        config.partitions = 4;
        config.member_timeout = Duration::from_secs(1);
        config
    })
    .await;
    let database_proxy = TcpProxy::start(shop_testkit::postgres_addr().await)
        .await
        .unwrap();
    h.consumer_pool = shop_database::pool(&h.db.config_via(&database_proxy)).unwrap();
    h.start().await;
    // The healthy replica reaches the database directly.
    let healthy =
        shop_messaging::consumer::Consumer::new(h.config.clone(), h.pool.clone(), h.broker.config())
            .subscribe::<shop_contracts::user::UserCreated, _>(crate::support::Recorder(
                h.behavior.clone(),
                "healthy".to_owned(),
            ))
            .subscribe::<shop_contracts::user::UserUpdated, _>(crate::support::Recorder(
                h.behavior.clone(),
                "healthy".to_owned(),
            ));
    let _healthy = tokio::spawn(healthy.run(h.shutdown.child_token()));
    // Until the healthy replica applies something: the partitions are
    // split between the two (one probe user after another, each in some
    // partition).
    let probes = std::sync::atomic::AtomicUsize::new(0);
    shop_testkit::eventually(
        "the healthy replica consuming",
        Duration::from_secs(30),
        || async {
            let probe = probes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            h.publish(&created(&format!("probe-{probe}"), 1), Uuid::now_v7())
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            (applied_by(&h, "healthy").await > 0).then_some(())
        },
    )
    .await;
    let users: Vec<String> = (0..USERS).map(|n| format!("fenced-{n}")).collect();
    for user in &users {
        h.publish(&created(user, 1), Uuid::now_v7()).await;
    }
    shop_testkit::eventually("every user's version 1", Duration::from_secs(30), || async {
        let seen = crate::support::seen_by_user(&h.applied().await);
        users.iter().all(|user| seen.contains_key(user)).then_some(())
    })
    .await;
    assert!(applied_by(&h, "main").await > 0, "both replicas consume");

    database_proxy.refuse(true);
    database_proxy.cut();
    let cut_at = Instant::now();
    for user in &users {
        h.publish(&crate::support::updated(user, 2), Uuid::now_v7()).await;
    }

    shop_testkit::eventually(
        "every user's version 2, though one replica lost its database",
        Duration::from_secs(15),
        || async {
            let seen = crate::support::seen_by_user(&h.applied().await);
            users
                .iter()
                .all(|user| seen.get(user).is_some_and(|versions| versions.len() >= 2))
                .then_some(())
        },
    )
    .await;
    eprintln!(
        "a replica without its database: its partitions' events applied {:?} after the cut",
        cut_at.elapsed()
    );
    assert!(
        database_proxy.refused() > 0,
        "the cut replica tried its database and was refused"
    );
    let seen = crate::support::seen_by_user(&h.applied().await);
    for user in &users {
        assert_eq!(seen[user], [1, 2], "{user}");
    }

    // Its database back, the replica takes its share again.
    let before = applied_by(&h, "main").await;
    database_proxy.refuse(false);
    let probes = std::sync::atomic::AtomicUsize::new(0);
    shop_testkit::eventually(
        "the replica consuming again with its database back",
        Duration::from_secs(30),
        || async {
            let probe = probes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            h.publish(&created(&format!("back-{probe}"), 1), Uuid::now_v7())
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            (applied_by(&h, "main").await > before).then_some(())
        },
    )
    .await;
}

/// How many applications `instance` recorded.
async fn applied_by(h: &crate::support::Harness, instance: &str) -> usize {
    use diesel::{ExpressionMethods as _, QueryDsl as _};
    use diesel_async::RunQueryDsl as _;
    let mut conn = h.pool.get().await.unwrap();
    crate::support::applied::table
        .filter(crate::support::applied::instance.eq(instance))
        .count()
        .get_result::<i64>(&mut conn)
        .await
        .map_or(0, |count| usize::try_from(count).unwrap_or(0))
}
