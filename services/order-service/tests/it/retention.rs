//! The inbox stays bounded: applied event ids past `INBOX_RETENTION` are
//! deleted by the service's sweep, only for its own consumer.

use std::time::Duration;

use diesel_async::RunQueryDsl as _;

use crate::helpers::spawn_app_with;

#[tokio::test(flavor = "multi_thread")]
async fn the_sweep_at_start_deletes_this_consumers_inbox_past_the_window_and_nothing_else() {
    let app = spawn_app_with(|config| {
        config.host.relay_enabled = false;
        config.host.retention_interval = Duration::from_millis(300);
        config.service.consumer.inbox_retention = Duration::from_secs(24 * 3600);
    })
    .await;
    let queue = app.settings.service.user_events_queue.clone();
    let mut conn = app.pool.get().await.unwrap();
    for (consumer, age) in [
        (queue.as_str(), "8 days"),
        (queue.as_str(), "1 hour"),
        ("another-consumer", "8 days"),
    ] {
        diesel::sql_query(format!(
            "INSERT INTO inbox (consumer, event_id, event_type, processed_at) \
             SELECT $1, gen_random_uuid(), 'shop.user.v1.UserCreated', now() - interval '{age}' \
             FROM generate_series(1, 6000)"
        ))
        .bind::<diesel::sql_types::Text, _>(consumer)
        .execute(&mut conn)
        .await
        .unwrap();
    }

    #[derive(diesel::QueryableByName)]
    struct Left {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        old: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        recent: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        others: i64,
    }
    let left = shop_testkit::eventually("the sweep", Duration::from_secs(20), || {
        let queue = queue.clone();
        let pool = app.pool.clone();
        async move {
            let mut conn = pool.get().await.ok()?;
            let left = diesel::sql_query(
                "SELECT count(*) FILTER (WHERE consumer = $1 AND processed_at < now() - interval '1 day') AS old, \
                 count(*) FILTER (WHERE consumer = $1 AND processed_at >= now() - interval '1 day') AS recent, \
                 count(*) FILTER (WHERE consumer <> $1) AS others FROM inbox",
            )
            .bind::<diesel::sql_types::Text, _>(queue)
            .get_result::<Left>(&mut conn)
            .await
            .ok()?;
            (left.old == 0).then_some(left)
        }
    })
    .await;

    assert_eq!(left.recent, 6000);
    assert_eq!(left.others, 6000, "another consumer's inbox is its own business");
}

/// The consumer's crash counts (`inbox_crashes`) left behind for events that
/// never came back are swept with the inbox's window; recent ones stay.
#[tokio::test(flavor = "multi_thread")]
async fn the_sweep_deletes_crash_counts_past_the_inbox_window() {
    let app = spawn_app_with(|config| {
        config.host.relay_enabled = false;
        config.host.retention_interval = Duration::from_millis(300);
        config.service.consumer.inbox_retention = Duration::from_secs(24 * 3600);
    })
    .await;
    let queue = app.settings.service.user_events_queue.clone();
    let mut conn = app.pool.get().await.unwrap();
    for age in ["8 days", "1 hour"] {
        diesel::sql_query(format!(
            "INSERT INTO inbox_crashes (consumer, event_id, handlings, counted_at) \
             SELECT $1, gen_random_uuid(), 1, now() - interval '{age}' FROM generate_series(1, 10)"
        ))
        .bind::<diesel::sql_types::Text, _>(&queue)
        .execute(&mut conn)
        .await
        .unwrap();
    }

    #[derive(diesel::QueryableByName)]
    struct Left {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        old: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        recent: i64,
    }
    let left = shop_testkit::eventually("the sweep", Duration::from_secs(20), || {
        let pool = app.pool.clone();
        async move {
            let mut conn = pool.get().await.ok()?;
            let left = diesel::sql_query(
                "SELECT count(*) FILTER (WHERE counted_at < now() - interval '1 day') AS old, \
                 count(*) FILTER (WHERE counted_at >= now() - interval '1 day') AS recent FROM inbox_crashes",
            )
            .get_result::<Left>(&mut conn)
            .await
            .ok()?;
            (left.old == 0).then_some(left)
        }
    })
    .await;

    assert_eq!(left.recent, 10);
}
