//! Restores heal: a database put back to an older dump, with both real
//! services running, and what the order service does about it without an
//! operator.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use shop_contracts::user as user_pb;
use shop_host::auth::Permission;
use shop_testkit::{Running, TestDatabase, TestKeys, metric};
use uuid::Uuid;

use crate::system::{System, WAIT, start};

/// How long a restore may take to heal: generous, not a timing assertion.
const HEAL: Duration = Duration::from_secs(90);

/// A file holding a token with `users:resync` from the test's keys,
/// removed on drop.
struct TokenFile(std::path::PathBuf);

impl TokenFile {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("restore-resync-token-{}", Uuid::now_v7()));
        std::fs::write(&path, TestKeys::shared().token_with(&[Permission::UsersResync])).unwrap();
        Self(path)
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn create_users(system: &System, count: usize) -> HashMap<String, i64> {
    let mut users = HashMap::new();
    for index in 0..count {
        let user = system
            .users
            .clone()
            .create_user(user_pb::CreateUserRequest {
                email: format!("restore-{index}-{}@example.com", Uuid::now_v7().simple()),
                name: format!("Restored {index}"),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        users.insert(user.id, user.version);
    }
    users
}

/// Updates `user` once, expecting `versions[user]`; counts the new version.
async fn update(system: &System, versions: &mut HashMap<String, i64>, user: &str) {
    let version = versions[user];
    system
        .users
        .clone()
        .update_user(user_pb::UpdateUserRequest {
            id: user.to_owned(),
            expected_version: version,
            name: Some(format!("Version {}", version + 1)),
            ..Default::default()
        })
        .await
        .unwrap();
    versions.insert(user.to_owned(), version + 1);
}

/// `settings` with a 1 s gap timeout and the resync settings: the real user
/// service, asked with the token in `token`.
fn resyncing_from(settings: &mut order_service::Config, system: &System, token: &TokenFile) {
    settings.service.consumer.gap_timeout = Duration::from_secs(1);
    settings.service.consumer.sweep_interval = Duration::from_millis(100);
    settings.service.resync.url = Some(format!("http://{}", system.user_addr));
    settings.service.resync.token_file = Some(token.0.clone());
    settings.service.resync.timeout = Duration::from_secs(10);
}

/// The order service's projection: each known user's version.
async fn projected(system: &System) -> HashMap<String, i64> {
    projected_in(system.order_db_url()).await
}

/// The projection in the order service database at `url`.
async fn projected_in(url: &str) -> HashMap<String, i64> {
    let (database, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    database
        .query("SELECT user_id::text, version FROM known_users", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Waits until the projection holds every user at `versions`.
async fn wait_for_projection(system: &System, versions: &HashMap<String, i64>, within: Duration) {
    wait_for_projection_in(system.order_db_url(), versions, within).await;
}

/// [`wait_for_projection`] in the order service database at `url`.
async fn wait_for_projection_in(url: &str, versions: &HashMap<String, i64>, within: Duration) {
    shop_testkit::eventually(
        "the projection at the user service's versions",
        within,
        || async {
            let projected = projected_in(url).await;
            versions
                .iter()
                .all(|(user, version)| projected.get(user) == Some(version))
                .then_some(())
        },
    )
    .await;
}

async fn order_metric(system: &System, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metric_at(system.order_admin, name, labels).await
}

/// The metric `name` with `labels` at the admin address `admin`.
async fn metric_at(admin: std::net::SocketAddr, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let metrics = shop_testkit::http_get(admin, "/metrics").await.ok()?.1;
    metric(&metrics, name, labels)
}

/// `consumer_gap_actions_total{policy="resync",outcome="requested"}` of
/// `queue` at the admin address `admin` (0 before any).
async fn resync_requests(admin: std::net::SocketAddr, queue: &str) -> f64 {
    metric_at(
        admin,
        "consumer_gap_actions_total",
        &[("queue", queue), ("policy", "resync"), ("outcome", "requested")],
    )
    .await
    .unwrap_or(0.0)
}

/// The orders database is put back to a dump taken 50 updates ago, while
/// the user service goes on: every user's next event arrives above the
/// restored position, parks behind a gap, and the gap policy (`resync`)
/// asks the real user service for the user's snapshot, which jumps the
/// projection back to the user service's version. No operator acts.
#[tokio::test(flavor = "multi_thread")]
async fn restoring_the_orders_database_from_an_older_dump_heals_by_resync_without_an_operator() {
    let mut system = start(true).await;
    let mut versions = create_users(&system, 20).await;
    let users: Vec<String> = versions.keys().cloned().collect();
    for round in 0..3 {
        for user in &users[round..] {
            update(&system, &mut versions, user).await;
        }
    }
    wait_for_projection(&system, &versions, WAIT).await;

    // The dump, taken while the order service is stopped.
    system.stop_order_service().await;
    let dump = system.order_database().copy().await.unwrap();
    let settings = system.order_settings.clone();
    system.start_order_service(settings.clone()).await;

    for index in 0..50 {
        update(&system, &mut versions, &users[index % users.len()]).await;
    }
    wait_for_projection(&system, &versions, WAIT).await;
    let before = projected(&system).await;

    // The restore, then the order service again with the resync settings.
    system.stop_order_service().await;
    system.order_database().restore_from(&dump).await.unwrap();
    let after_restore = projected(&system).await;
    let went_back = users
        .iter()
        .filter(|user| after_restore[*user] < before[*user])
        .count();
    assert!(
        went_back >= 19,
        "the restore put positions back: {went_back} of 20"
    );
    let token = TokenFile::new();
    let mut resyncing = settings;
    resyncing_from(&mut resyncing, &system, &token);
    let healing = Instant::now();
    system.start_order_service(resyncing).await;

    for user in &users {
        update(&system, &mut versions, user).await;
    }
    wait_for_projection(&system, &versions, HEAL).await;
    eprintln!(
        "restore healed: 20 users back at the user service's versions {:?} after the order service started",
        healing.elapsed()
    );
    let queue = &system.order_settings.service.user_events_queue;
    let requested = resync_requests(system.order_admin, queue).await;
    assert!(requested > 0.0, "healed by resync requests: {requested}");
    drop(token);
}

/// The users database is put back to when its users were at version 1,
/// after the order service applied their version 3: the user service
/// reuses versions 2 and 3 for new changes. Version 3 arrives with an event
/// id other than the one applied at 3: counted in
/// `consumer_version_conflicts_total`, listed in `inbox_conflicts`, not
/// applied. Not detected: the reused version 2, below the position, is
/// taken for a late duplicate and dropped like one (no conflict recorded);
/// only a version at the position is compared with the event applied there.
#[tokio::test(flavor = "multi_thread")]
async fn a_restored_users_database_reports_reused_versions_as_conflicts() {
    let mut system = start(true).await;
    let mut versions = create_users(&system, 5).await;
    let users: Vec<String> = versions.keys().cloned().collect();
    wait_for_projection(&system, &versions, WAIT).await;

    // The dump of the users database, all users at version 1.
    system.stop_user_service().await;
    let dump = system.user_database().copy().await.unwrap();
    system.start_user_service().await;
    for user in &users {
        update(&system, &mut versions, user).await;
        update(&system, &mut versions, user).await;
    }
    wait_for_projection(&system, &versions, WAIT).await;
    let applied = versions.clone();

    // The restore: the user service is back at version 1 and reuses 2, 3.
    system.stop_user_service().await;
    system.user_database().restore_from(&dump).await.unwrap();
    system.start_user_service().await;
    let mut reused: HashMap<String, i64> = users.iter().map(|user| (user.clone(), 1)).collect();
    for user in &users {
        update(&system, &mut reused, user).await;
        update(&system, &mut reused, user).await;
    }
    assert_eq!(reused, applied, "the same versions, reused");

    let queue = system.order_settings.service.user_events_queue.clone();
    let conflicts = shop_testkit::eventually("a conflict per user", WAIT, || async {
        order_metric(
            &system,
            "consumer_version_conflicts_total",
            &[("queue", queue.as_str())],
        )
        .await
        .filter(|count| *count >= users.len() as f64)
    })
    .await;
    assert_eq!(conflicts, users.len() as f64);
    let (database, connection) = tokio_postgres::connect(system.order_db_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut listed: Vec<(String, i64)> = database
        .query(
            "SELECT aggregate_id, aggregate_version FROM inbox_conflicts WHERE event_id <> applied_event",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    listed.sort();
    let mut expected: Vec<(String, i64)> = users.iter().map(|user| (user.clone(), 3)).collect();
    expected.sort();
    assert_eq!(
        listed, expected,
        "version 3 of each user listed; version 2 is not"
    );
    assert_eq!(
        projected(&system).await,
        applied,
        "the reused versions not applied"
    );
}

/// A new consumer group (another order service, its own database and
/// queue) started after the users' traffic: it never saw their earlier
/// events, so each user's next event parks behind a gap from version 1,
/// and the gap policy's resync catches the group up from the user service
/// (the snapshots reach the first group too, as duplicates).
#[tokio::test(flavor = "multi_thread")]
async fn a_new_consumer_group_started_after_the_traffic_catches_up_by_resync() {
    let system = start(true).await;
    let mut versions = create_users(&system, 10).await;
    let users: Vec<String> = versions.keys().cloned().collect();
    for user in &users {
        update(&system, &mut versions, user).await;
        update(&system, &mut versions, user).await;
    }
    wait_for_projection(&system, &versions, WAIT).await;

    let database = TestDatabase::create(
        order_service::app::MIGRATIONS,
        std::path::Path::new(order_service::app::MIGRATIONS_DIR),
    )
    .await
    .unwrap();
    let token = TokenFile::new();
    let mut settings = system.order_settings.clone();
    settings.host.database = database.config();
    let queue = system.broker.queue("order-service-2.user-events");
    settings.service.user_events_queue = queue.clone();
    settings.service.events_exchange = system.broker.exchange("order-service-2.order.events");
    resyncing_from(&mut settings, &system, &token);
    system
        .broker
        .track_topology(&settings.service.consumer().topology());
    let app = order_service::Application::build(settings).await.unwrap();
    let (addr, admin) = (app.local_addr(), app.admin_addr());
    let _group = Running::spawn(|shutdown| app.run(shutdown));
    shop_testkit::eventually("the new group's consumer to serve", WAIT, || async {
        shop_host::healthcheck::check_at(addr, order_service::app::CONSUMER_HEALTH)
            .await
            .ok()
    })
    .await;
    assert!(
        projected_in(database.url()).await.is_empty(),
        "the group starts empty"
    );

    let started = Instant::now();
    for user in &users {
        update(&system, &mut versions, user).await;
    }
    wait_for_projection_in(database.url(), &versions, HEAL).await;
    eprintln!(
        "new consumer group caught up: 10 users at the user service's versions {:?} after their first event",
        started.elapsed()
    );
    let requested = resync_requests(admin, &queue).await;
    assert!(requested > 0.0, "caught up by resync requests: {requested}");
    wait_for_projection(&system, &versions, WAIT).await;
}
