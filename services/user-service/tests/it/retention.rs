//! Tables that grow with traffic stay bounded: rows past their window are
//! deleted however many there are, and every start sweeps.

use std::time::Duration;

use diesel_async::RunQueryDsl as _;
use shop_database::retention::Retention;
use shop_testkit::Running;

use crate::helpers::{self, TestApp, spawn_app_with};

const DAY: Duration = Duration::from_secs(24 * 3600);

/// Adds `count` rows to the outbox published `age` ago (`None`: unpublished,
/// created `age` ago) and `count` request ids created `age` ago, in bulk.
async fn back_date(app: &TestApp, count: i64, age: &str, published: bool) {
    let mut conn = app.pool.get().await.unwrap();
    let published_at = if published {
        format!("now() - interval '{age}'")
    } else {
        "NULL".to_owned()
    };
    diesel::sql_query(format!(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, aggregate_version, partition_key, \
         event_type, routing_key, payload, created_at, published_at) \
         SELECT gen_random_uuid(), 'user', gen_random_uuid()::text, 1, 0, 'shop.user.v1.UserCreated', \
         'user.created', '\\x00', now() - interval '{age}', {published_at} FROM generate_series(1, {count})"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    diesel::sql_query(format!(
        "INSERT INTO create_user_requests (request_id, user_id, email, name, created_at) \
         SELECT gen_random_uuid(), gen_random_uuid(), 'x@example.com', 'x', now() - interval '{age}' \
         FROM generate_series(1, {count})"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = app.pool.get().await.unwrap();
    diesel::sql_query(format!("SELECT count(*) AS n FROM {sql}"))
        .get_result::<Count>(&mut conn)
        .await
        .unwrap()
        .n
}

async fn app_that_sweeps_hourly() -> TestApp {
    spawn_app_with(|config| {
        config.host.relay_enabled = false;
        config.host.retention_interval = Duration::from_secs(3600);
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn one_sweep_deletes_every_row_past_the_window_whatever_the_count_and_nothing_else() {
    let app = app_that_sweeps_hourly().await;
    // More than two batches of the sweep past the window; some inside it;
    // old rows never published, which must stay.
    back_date(&app, 12_345, "2 days", true).await;
    back_date(&app, 7, "1 hour", true).await;
    back_date(&app, 5, "3 days", false).await;

    let outbox = Retention {
        table: "outbox",
        column: "published_at",
        window: DAY,
        consumer: None,
    };
    let requests = Retention {
        table: "create_user_requests",
        column: "created_at",
        window: DAY,
        consumer: None,
    };
    let deleted = outbox.sweep(&app.pool).await.unwrap();
    let deleted_requests = requests.sweep(&app.pool).await.unwrap();

    assert_eq!(deleted, 12_345);
    assert_eq!(
        count(&app, "outbox WHERE published_at < now() - interval '1 day'").await,
        0
    );
    assert_eq!(count(&app, "outbox WHERE published_at IS NOT NULL").await, 7);
    assert_eq!(
        count(&app, "outbox WHERE published_at IS NULL").await,
        5,
        "unpublished rows are never deleted"
    );
    // 12,345 + 5 old request ids; the 7 recent ones stay.
    assert_eq!(deleted_requests, 12_350);
    assert_eq!(count(&app, "create_user_requests").await, 7);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_start_sweeps_so_a_service_restarted_often_still_keeps_its_tables_bounded() {
    let mut app = app_that_sweeps_hourly().await;
    back_date(&app, 3_000, "2 days", true).await;
    app.running.stop().await.unwrap();

    // Restarted with an hourly schedule: the sweep at start does the work.
    let mut config = helpers::settings(&app.db, &app.broker);
    config.host.relay_enabled = false;
    config.host.retention_interval = Duration::from_secs(3600);
    let restarted = user_service::Application::build(config).await.unwrap();
    let _running = Running::spawn(|shutdown| restarted.run(shutdown));

    shop_testkit::eventually("the sweep at start", Duration::from_secs(20), || async {
        (count(&app, "outbox WHERE published_at < now() - interval '1 day'").await == 0
            && count(&app, "create_user_requests").await == 0)
            .then_some(())
    })
    .await;
}
