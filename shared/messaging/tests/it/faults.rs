//! Faults production brings that are harder to see than a closed
//! connection: connections that go silent.

use std::time::{Duration, Instant};

use diesel_async::RunQueryDsl as _;
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
    let (mut h, database_proxy) = replica_behind_a_proxy(|_| {}).await;
    h.start().await;
    // The healthy replica reaches the database directly.
    let healthy = h.consumer_on("healthy", h.pool.clone(), h.broker.config());
    let _healthy = tokio::spawn(healthy.run(h.shutdown.child_token()));
    // Until the healthy replica applies something: the partitions are
    // split between the two (one probe user after another, each in some
    // partition).
    until_consuming(&h, "healthy", "the healthy replica consuming").await;
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
    database_proxy.refuse(false);
    until_consuming(&h, "main", "the replica consuming again with its database back").await;
}

/// A live hand-over under a frozen owner: the replica that owns a user's
/// partition is inside the transaction of that user's version 2 when its
/// database link freezes (open, carrying nothing, new connections refused).
/// Its heartbeats fail, the partition moves, the server ends the silent
/// session past its idle-in-transaction timeout (the batch rolls back), and
/// the healthy replica applies versions 2 to 4. When the frozen one gets its
/// database back, it applies nothing again: the ledger holds versions 1 to
/// 4 once each, version 1 by the old owner and the rest by the new one.
#[tokio::test(flavor = "multi_thread")]
async fn a_partition_handed_over_from_a_frozen_owner_mid_transaction_is_applied_once_in_order() {
    // The server lets go of a silent session's locks after three seconds.
    let (mut h, database_proxy) = replica_behind_a_proxy(|config| {
        config.idle_in_transaction_timeout = Duration::from_secs(3);
    })
    .await;
    h.start().await;
    // The healthy replica reaches the database directly.
    let healthy = h.consumer_on("healthy", h.pool.clone(), h.broker.config());
    let _healthy = tokio::spawn(healthy.run(h.shutdown.child_token()));

    // A user whose partition the replica behind the proxy owns.
    let mut owned = None;
    for n in 0..200 {
        let user = format!("handover-{n}");
        h.publish(&created(&user, 1), Uuid::now_v7()).await;
        let user_clone = user.clone();
        let instance = shop_testkit::eventually(
            "the candidate's version 1 applied",
            Duration::from_secs(30),
            || {
                let user = user_clone.clone();
                let h = &h;
                async move { instance_of(h, &user, 1).await }
            },
        )
        .await;
        if instance == "main" {
            owned = Some(user);
            break;
        }
    }
    let user = owned.expect("the replica behind the proxy owns a partition");

    // Its version 2 held inside the owner's transaction.
    *h.behavior.hold_user.lock().unwrap() = Some(user.clone());
    h.publish(&crate::support::updated(&user, 2), Uuid::now_v7())
        .await;
    shop_testkit::eventually(
        "the owner inside version 2's transaction",
        Duration::from_secs(30),
        || async {
            h.behavior
                .deliveries
                .lock()
                .unwrap()
                .iter()
                .any(|(u, version, _)| *u == user && *version == 2)
                .then_some(())
        },
    )
    .await;
    let frozen = database_proxy.freeze();
    database_proxy.refuse(true);
    assert!(
        frozen > 0,
        "the owner held database connections to freeze ({frozen})"
    );
    for version in [3, 4] {
        h.publish(&crate::support::updated(&user, version), Uuid::now_v7())
            .await;
    }
    // The held handler goes on into its frozen connection.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    h.behavior.release.notify_one();

    shop_testkit::eventually(
        "versions 2 to 4 applied by the new owner",
        Duration::from_secs(60),
        || async {
            let mut versions = Vec::new();
            for version in 2..=4 {
                versions.push(instance_of(&h, &user, version).await?);
            }
            versions
                .iter()
                .all(|instance| instance == "healthy")
                .then_some(())
        },
    )
    .await;
    assert!(
        database_proxy.refused() > 0,
        "the frozen owner tried its database and was refused"
    );

    // The old owner's database back: nothing applied again.
    database_proxy.refuse(false);
    until_consuming(&h, "main", "the old owner consuming again").await;
    let seen = crate::support::seen_by_user(&h.applied().await);
    assert_eq!(
        seen[&user],
        [1, 2, 3, 4],
        "the ledger holds each version once, in order"
    );
    assert_eq!(instance_of(&h, &user, 1).await.as_deref(), Some("main"));
}

/// Which instance applied `user`'s `version`, if one did.
async fn instance_of(h: &crate::support::Harness, user: &str, version: i64) -> Option<String> {
    use diesel::{ExpressionMethods as _, QueryDsl as _};
    use diesel_async::RunQueryDsl as _;
    let mut conn = h.pool.get().await.ok()?;
    crate::support::applied::table
        .filter(crate::support::applied::user_id.eq(user))
        .filter(crate::support::applied::version.eq(version))
        .select(crate::support::applied::instance)
        .first::<String>(&mut conn)
        .await
        .ok()
}

/// A harness of four partitions and a member timeout of a second whose
/// consumer ("main", not started) reaches the database through the proxy
/// returned, with its database settings adjusted.
async fn replica_behind_a_proxy(
    adjust: impl FnOnce(&mut shop_database::DatabaseConfig),
) -> (crate::support::Harness, TcpProxy) {
    let mut h = crate::support::harness_with(|mut config, _| {
        config.partitions = 4;
        config.member_timeout = Duration::from_secs(1);
        config
    })
    .await;
    let database_proxy = TcpProxy::start(shop_testkit::postgres_addr().await)
        .await
        .unwrap();
    let mut config = h.db.config_via(&database_proxy);
    adjust(&mut config);
    h.consumer_pool = shop_database::pool(&config).unwrap();
    (h, database_proxy)
}

/// Publishes one probe user after another until `instance` applies one
/// more event than it had: the replica consuming (again).
async fn until_consuming(h: &crate::support::Harness, instance: &str, what: &str) {
    let before = applied_by(h, instance).await;
    shop_testkit::eventually(what, Duration::from_secs(30), || async {
        h.publish(&created(&format!("probe-{}", Uuid::now_v7()), 1), Uuid::now_v7())
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        (applied_by(h, instance).await > before).then_some(())
    })
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

/// What the server answers a plain session of the test's database (not
/// the consumer's) to a division by zero: in the database's language.
async fn division_by_zero_message(h: &crate::support::Harness) -> String {
    let (client, connection) = tokio_postgres::connect(h.db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let error = client.simple_query("SELECT 1/0").await.unwrap_err();
    error.as_db_error().unwrap().message().to_owned()
}

/// The session of the consumer whose handler's statement waits for a lock
/// the test holds, once there is one.
async fn session_waiting_for_the_lock(h: &crate::support::Harness) -> Option<i32> {
    #[derive(diesel::QueryableByName)]
    struct Session {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        pid: i32,
    }
    let mut conn = h.pool.get().await.ok()?;
    diesel::sql_query(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
         AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
    )
    .get_result::<Session>(&mut conn)
    .await
    .ok()
    .map(|session| session.pid)
}

/// An administrator (or a restarting server) ends the consumer's session
/// while its handler's statement runs: SQLSTATE 57P01, an outage. The batch
/// is held and tried again on a new connection: applied once, no attempt
/// charged (every call is attempt 1), nothing dead-lettered. With
/// `language`, the database's messages are in that language (the
/// consumer's sessions set their own, see `shop_database::Fault`). Returns
/// the message the handler's statement failed with.
async fn a_session_ended_under_the_handler(language: Option<&str>) -> String {
    interrupted_under_the_handler("pg_terminate_backend", language).await
}

/// The handler's statement is interrupted by `function` (`pg_terminate_backend`
/// ends the session, `pg_cancel_backend` the statement), with the
/// database's messages in `language`; see [`a_session_ended_under_the_handler`].
async fn interrupted_under_the_handler(function: &str, language: Option<&str>) -> String {
    use diesel_async::{AsyncConnection as _, AsyncPgConnection};

    const LOCK: i64 = 27;
    let mut h = harness().await;
    if let Some(language) = language {
        h.db.set_message_language(language).await.unwrap();
        let message = division_by_zero_message(&h).await;
        assert_ne!(message, "division by zero", "the database speaks {language}");
    }
    let mut holder = AsyncPgConnection::establish(h.db.url()).await.unwrap();
    diesel::sql_query(format!("SELECT pg_advisory_lock({LOCK})"))
        .execute(&mut holder)
        .await
        .unwrap();
    *h.behavior.lock_user.lock().unwrap() = Some(("u1".to_owned(), LOCK));
    h.start().await;
    h.publish(&created("u1", 1), Uuid::now_v7()).await;

    let pid = shop_testkit::eventually(
        "the handler's statement waiting for the lock",
        Duration::from_secs(10),
        || session_waiting_for_the_lock(&h),
    )
    .await;
    #[derive(diesel::QueryableByName)]
    struct Ended {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        ended: bool,
    }
    let ended: Ended = diesel::sql_query(format!("SELECT {function}($1) AS ended"))
        .bind::<diesel::sql_types::Integer, _>(pid)
        .get_result(&mut holder)
        .await
        .unwrap();
    assert!(
        ended.ended,
        "the handler's statement was interrupted ({function})"
    );
    h.publish(&created("u2", 1), Uuid::now_v7()).await;

    let applied = h.expect_applied(2).await;
    let mut users: Vec<&str> = applied.iter().map(|(_, user, _)| user.as_str()).collect();
    users.sort_unstable();
    assert_eq!(users, ["u1", "u2"], "each applied once");
    let attempts = h.behavior.attempts.lock().unwrap().clone();
    assert!(
        attempts.iter().filter(|(user, ..)| user == "u1").count() >= 2,
        "u1 was tried again after its session ended: {attempts:?}"
    );
    assert!(
        attempts.iter().all(|(_, _, attempt)| *attempt == 1),
        "an attempt was charged for the outage: {attempts:?}"
    );
    assert!(h.dead_letters().await.is_empty());
    h.behavior
        .lock_error
        .lock()
        .unwrap()
        .clone()
        .expect("the handler's statement failed")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_ended_by_an_administrator_under_the_handler_is_an_outage_not_the_events_fault() {
    let message = a_session_ended_under_the_handler(None).await;
    assert!(
        message.contains("terminating connection due to administrator command"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a PostgreSQL server with the de_DE.UTF-8 locale (.ci/install-tools generates it); run: cargo test -p shop-messaging --test it message_language -- --ignored"]
async fn a_session_ended_under_the_handler_is_an_outage_whatever_the_servers_message_language() {
    a_session_ended_under_the_handler(Some("de_DE.UTF-8")).await;
}

/// The server refuses the consumer's role any session (its `CONNECTION
/// LIMIT` reached: SQLSTATE 53300, as when `max_connections` is) and ends
/// the ones it had, while events arrive, for longer than the whole retry
/// schedule. Nothing is dead-lettered or charged an attempt; everything is
/// applied once the role may connect again. With `language`, the server's
/// messages are in that language.
async fn connections_refused_to_the_consumer(language: Option<&str>) {
    use diesel_async::{AsyncConnection as _, AsyncPgConnection, SimpleAsyncConnection as _};

    let roles = shop_testkit::TestRoles::create(&[("consumer", "")])
        .await
        .unwrap();
    let mut h = harness().await;
    if let Some(language) = language {
        h.db.set_message_language(language).await.unwrap();
        let message = division_by_zero_message(&h).await;
        assert_ne!(message, "division by zero", "the database speaks {language}");
    }
    let role = roles.name("consumer");
    let mut admin = AsyncPgConnection::establish(h.db.url()).await.unwrap();
    let sql = |statement: String| diesel::sql_query(statement);
    admin
        .batch_execute(&format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}; \
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}"
        ))
        .await
        .unwrap();
    let proxy = TcpProxy::start(shop_testkit::postgres_addr().await)
        .await
        .unwrap();
    let mut database = h.db.config();
    database.url = proxy.url_for(&roles.url("consumer", &h.db)).into();
    h.consumer_pool = shop_database::pool(&database).unwrap();
    h.start().await;
    h.publish(&created("before", 1), Uuid::now_v7()).await;
    h.expect_applied(1).await;

    sql(format!("ALTER ROLE {role} CONNECTION LIMIT 0"))
        .execute(&mut admin)
        .await
        .unwrap();
    sql(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    // The fault is real: the server refuses the role with 53300.
    let refused = tokio_postgres::connect(&roles.url("consumer", &h.db), tokio_postgres::NoTls)
        .await
        .map(drop)
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS),
        "{refused}"
    );
    let tried = proxy.accepted();
    for i in 0..5 {
        h.publish(&created(&format!("during-{i}"), 1), Uuid::now_v7())
            .await;
    }
    // The consumer tried (and was refused) again and again, past the whole
    // retry schedule (200 and 400 ms).
    shop_testkit::eventually(
        "the consumer refused five times",
        Duration::from_secs(30),
        || async { (proxy.accepted() >= tried + 5).then_some(()) },
    )
    .await;
    assert_eq!(h.applied().await.len(), 1, "nothing applied while refused");
    assert!(
        h.dead_letters().await.is_empty(),
        "events dead-lettered during the outage"
    );

    sql(format!("ALTER ROLE {role} CONNECTION LIMIT -1"))
        .execute(&mut admin)
        .await
        .unwrap();
    let applied = h.expect_applied(6).await;
    let mut ids: Vec<Uuid> = applied.iter().map(|(id, ..)| *id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6, "each event applied once");
    let attempts = h.behavior.attempts.lock().unwrap().clone();
    assert!(
        attempts.iter().all(|(_, _, attempt)| *attempt == 1),
        "an attempt was charged for the outage: {attempts:?}"
    );
    assert!(h.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_refused_connections_holds_its_events_without_charging_them() {
    connections_refused_to_the_consumer(None).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a PostgreSQL server with the de_DE.UTF-8 locale (.ci/install-tools generates it); run: cargo test -p shop-messaging --test it message_language -- --ignored"]
async fn a_consumer_refused_connections_in_another_message_language_holds_its_events_too() {
    connections_refused_to_the_consumer(Some("de_DE.UTF-8")).await;
}

/// SQLSTATE 57014 (a statement cancelled by an administrator, or by the
/// server's `statement_timeout`) is an outage too; the session survives it,
/// so only the error tells (in another language, it was charged to the
/// event before the sessions pinned their message language).
#[tokio::test(flavor = "multi_thread")]
async fn a_statement_cancelled_under_the_handler_is_an_outage_not_the_events_fault() {
    let message = interrupted_under_the_handler("pg_cancel_backend", None).await;
    assert!(
        message.contains("canceling statement due to user request"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a PostgreSQL server with the de_DE.UTF-8 locale (.ci/install-tools generates it); run: cargo test -p shop-messaging --test it message_language -- --ignored"]
async fn a_statement_cancelled_under_the_handler_is_an_outage_whatever_the_servers_message_language() {
    interrupted_under_the_handler("pg_cancel_backend", Some("de_DE.UTF-8")).await;
}
