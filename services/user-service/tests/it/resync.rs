//! `ResyncUsers`: one `UserSnapshot` per selected user at its current
//! version, through the outbox like any event, paced, and never out of
//! version order with the user's own events.

use std::time::Duration;

use diesel::{ExpressionMethods as _, QueryDsl as _};
use diesel_async::{AsyncConnection as _, RunQueryDsl as _};
use prost::Message as _;
use shop_contracts::Event as _;
use shop_contracts::user as pb;
use shop_contracts::user::resync_users_request::Selection;
use shop_host::auth::Permission;
use shop_messaging::wire::{header_i64, header_str};
use shop_testkit::TestKeys;
use tonic::Code;

use crate::helpers::{TestApp, client_with_token, spawn_app, violated_fields};

const WAIT: Duration = Duration::from_secs(30);

fn request(selection: Selection) -> pb::ResyncUsersRequest {
    pb::ResyncUsersRequest {
        selection: Some(selection),
        max_per_second: None,
    }
}

/// Every user, at most `max_per_second` a second.
fn every_user_at(max_per_second: i32) -> pb::ResyncUsersRequest {
    pb::ResyncUsersRequest {
        selection: Some(Selection::All(true)),
        max_per_second: Some(max_per_second),
    }
}

fn ids(ids: &[&str]) -> Selection {
    Selection::Users(pb::UserIds {
        ids: ids.iter().map(|id| (*id).to_owned()).collect(),
    })
}

/// Every progress message of a resync, to its end.
async fn resync(
    app: &TestApp,
    request: pb::ResyncUsersRequest,
) -> Result<Vec<pb::ResyncUsersProgress>, tonic::Status> {
    tokio::time::timeout(WAIT, async {
        let mut stream = app.client.clone().resync_users(request).await?.into_inner();
        let mut progress = Vec::new();
        while let Some(message) = stream.message().await? {
            progress.push(message);
        }
        Ok(progress)
    })
    .await
    .expect("the resync ends within its deadline")
}

/// The snapshots in the outbox, oldest first.
async fn snapshots(app: &TestApp) -> Vec<pb::UserSnapshot> {
    use shop_outbox::schema::outbox::dsl;
    let mut conn = app.pool.get().await.unwrap();
    let payloads: Vec<Vec<u8>> = dsl::outbox
        .filter(dsl::event_type.eq(pb::UserSnapshot::TYPE_NAME))
        .order(dsl::seq.asc())
        .select(dsl::payload)
        .load(&mut conn)
        .await
        .unwrap();
    payloads
        .iter()
        .map(|payload| pb::UserSnapshot::decode(payload.as_slice()).unwrap())
        .collect()
}

async fn update_name(app: &TestApp, user: &pb::User, name: &str) -> pb::User {
    app.client
        .clone()
        .update_user(pb::UpdateUserRequest {
            id: user.id.clone(),
            expected_version: user.version,
            email: None,
            name: Some(name.to_owned()),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
}

async fn delete(app: &TestApp, user: &pb::User) {
    app.client
        .clone()
        .delete_user(pb::DeleteUserRequest {
            id: user.id.clone(),
            expected_version: user.version,
        })
        .await
        .unwrap();
}

/// (user id, version, deleted) of each snapshot, sorted.
fn summary(snapshots: &[pb::UserSnapshot]) -> Vec<(String, i64, bool)> {
    let mut rows: Vec<_> = snapshots
        .iter()
        .map(|s| (s.user_id.clone(), s.version, s.deleted))
        .collect();
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_user_keeps_a_tombstone_at_the_version_of_its_deletion() {
    use user_service::schema::user_tombstones::dsl;
    let app = spawn_app().await;
    let ada = app.create_user("ada@example.com", "Ada").await;
    let ada = update_name(&app, &ada, "Ada L").await;

    delete(&app, &ada).await;

    let mut conn = app.pool.get().await.unwrap();
    let tombstones: Vec<(uuid::Uuid, i64)> = dsl::user_tombstones
        .select((dsl::id, dsl::version))
        .load(&mut conn)
        .await
        .unwrap();
    assert_eq!(tombstones, [(ada.id.parse().unwrap(), 3)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn resync_of_listed_users_writes_one_snapshot_each_at_its_current_version_and_names_unknown_ids() {
    let app = spawn_app().await;
    let ada = app.create_user("ada@example.com", "Ada").await;
    let ada = update_name(&app, &ada, "Ada Lovelace").await;
    let bob = app.create_user("bob@example.com", "Bob").await;
    delete(&app, &bob).await;
    let untouched = app.create_user("carl@example.com", "Carl").await;
    let stranger = uuid::Uuid::now_v7().to_string();

    let progress = resync(&app, request(ids(&[&stranger, &bob.id, &ada.id])))
        .await
        .unwrap();

    let last = progress.last().expect("at least one progress message");
    assert_eq!((last.written, last.total), (2, 2));
    assert_eq!(last.unknown_ids, [stranger]);
    let snapshots = snapshots(&app).await;
    assert_eq!(
        summary(&snapshots),
        summary(&[
            pb::UserSnapshot {
                user_id: ada.id.clone(),
                version: 2,
                ..Default::default()
            },
            pb::UserSnapshot {
                user_id: bob.id.clone(),
                version: 2,
                deleted: true,
                ..Default::default()
            },
        ])
    );
    let of_ada = snapshots.iter().find(|s| s.user_id == ada.id).unwrap();
    assert_eq!(
        (of_ada.email.as_str(), of_ada.name.as_str()),
        ("ada@example.com", "Ada Lovelace")
    );
    assert!(of_ada.occurred_at.is_some());
    let of_bob = snapshots.iter().find(|s| s.user_id == bob.id).unwrap();
    assert_eq!(
        (of_bob.email.as_str(), of_bob.name.as_str()),
        ("", ""),
        "no personal data of a deleted user"
    );
    assert!(snapshots.iter().all(|s| s.user_id != untouched.id));
}

#[tokio::test(flavor = "multi_thread")]
async fn resync_of_all_users_and_of_users_changed_since_a_time_select_live_and_deleted_users() {
    let app = spawn_app().await;
    let old = app.create_user("old@example.com", "Old").await;
    let recent = app.create_user("recent@example.com", "Recent").await;
    let gone = app.create_user("gone@example.com", "Gone").await;
    delete(&app, &gone).await;
    let since = recent.created_at.unwrap();

    let changed = resync(&app, request(Selection::ChangedSince(since)))
        .await
        .unwrap();

    assert_eq!(changed.last().map(|p| (p.written, p.total)), Some((2, 2)));
    assert_eq!(
        summary(&snapshots(&app).await),
        [(recent.id.clone(), 1, false), (gone.id.clone(), 2, true)]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    );

    let old = update_name(&app, &old, "Older").await;
    let all = resync(&app, request(Selection::All(true))).await.unwrap();

    assert_eq!(all.last().map(|p| (p.written, p.total)), Some((3, 3)));
    let all_snapshots = snapshots(&app).await;
    assert_eq!(
        all_snapshots.len(),
        5,
        "two from the first call, three from the second"
    );
    let mut expected = vec![
        (old.id.clone(), 2, false),
        (recent.id.clone(), 1, false),
        (gone.id.clone(), 2, true),
    ];
    expected.sort();
    assert_eq!(summary(&all_snapshots[2..]), expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_resync_requests_are_refused_with_every_violation_and_write_nothing() {
    let app = spawn_app().await;
    let id = uuid::Uuid::now_v7().to_string();
    let too_many: Vec<String> = (0..1001).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let cases: Vec<(pb::ResyncUsersRequest, Vec<&str>)> = vec![
        (
            pb::ResyncUsersRequest {
                selection: None,
                max_per_second: None,
            },
            vec!["selection"],
        ),
        (request(ids(&[])), vec!["users.ids"]),
        (
            request(ids(&[&id, "not-a-uuid", &id])),
            vec!["users.ids[1]", "users.ids[2]"],
        ),
        (
            request(Selection::Users(pb::UserIds { ids: too_many })),
            vec!["users.ids"],
        ),
        (request(Selection::All(false)), vec!["all"]),
        (
            request(Selection::ChangedSince(shop_contracts::prost_types::Timestamp {
                seconds: 0,
                nanos: -1,
            })),
            vec!["changed_since"],
        ),
        (
            pb::ResyncUsersRequest {
                selection: Some(Selection::All(true)),
                max_per_second: Some(0),
            },
            vec!["max_per_second"],
        ),
        (
            pb::ResyncUsersRequest {
                selection: Some(Selection::All(true)),
                max_per_second: Some(501),
            },
            vec!["max_per_second"],
        ),
    ];
    app.create_user("ada@example.com", "Ada").await;

    for (request, fields) in cases {
        let status = resync(&app, request.clone()).await.unwrap_err();

        assert_eq!(status.code(), Code::InvalidArgument, "{request:?}: {status:?}");
        assert_eq!(
            violated_fields(&status),
            fields,
            "{request:?}: {}",
            status.message()
        );
    }
    assert!(snapshots(&app).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn resync_needs_the_resync_permission_and_refuses_user_tokens() {
    let app = spawn_app().await;
    let ada = app.create_user("ada@example.com", "Ada").await;
    let keys = TestKeys::shared();
    let everything_else: Vec<Permission> = Permission::ALL
        .into_iter()
        .filter(|permission| *permission != Permission::UsersResync)
        .collect();
    let service = keys.token_with(&everything_else);
    let user = keys.token(&ada.id, [Permission::UsersResync].into_iter().collect());

    for (who, token) in [("a service without users:resync", service), ("a user", user)] {
        let status = client_with_token(app.addr, &token)
            .await
            .resync_users(request(Selection::All(true)))
            .await
            .unwrap_err();

        assert_eq!(status.code(), Code::PermissionDenied, "{who}: {status:?}");
    }
    let allowed = client_with_token(app.addr, &keys.token_with(&[Permission::UsersResync])).await;
    let mut stream = allowed
        .clone()
        .resync_users(request(Selection::All(true)))
        .await
        .unwrap()
        .into_inner();
    while stream.message().await.unwrap().is_some() {}
    assert_eq!(
        snapshots(&app).await.len(),
        1,
        "a caller with users:resync resyncs"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resync_is_paced_to_its_rate_and_reports_progress_after_every_batch() {
    let app = spawn_app().await;
    for n in 0..200 {
        app.create_user(&format!("user{n}@example.com"), "Paced").await;
    }

    let progress = resync(&app, every_user_at(50)).await.unwrap();

    assert!(progress.len() >= 4, "{} progress messages", progress.len());
    assert!(progress.windows(2).all(|pair| pair[0].written < pair[1].written));
    assert!(progress.iter().all(|p| p.total == 200));
    assert_eq!(progress.last().unwrap().written, 200);
    // The rate, from the rows' own commit times: no second holds more than
    // a second's worth and one batch.
    use shop_outbox::schema::outbox::dsl;
    let mut conn = app.pool.get().await.unwrap();
    let mut written_at: Vec<chrono::DateTime<chrono::Utc>> = dsl::outbox
        .filter(dsl::event_type.eq(pb::UserSnapshot::TYPE_NAME))
        .select(dsl::created_at)
        .load(&mut conn)
        .await
        .unwrap();
    written_at.sort();
    assert_eq!(written_at.len(), 200);
    let batch = 10;
    for (at, start) in written_at.iter().enumerate() {
        let within = written_at[at..]
            .iter()
            .take_while(|t| **t < *start + chrono::Duration::seconds(1))
            .count();
        assert!(
            within <= 50 + batch,
            "{within} snapshots within a second from {start}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_waits_for_a_concurrent_update_and_follows_it_in_the_outbox_at_its_version() {
    let app = spawn_app().await;
    let ada = app.create_user("ada@example.com", "Ada").await;
    let change = user_service::store::UserChange {
        id: ada.id.parse().unwrap(),
        expected_version: 1,
        email: None,
        name: Some("Ada Lovelace".to_owned()),
    };
    let mut updater = app.pool.get().await.unwrap();

    // An update holds the user's row (its event already in the outbox,
    // uncommitted) while the resync starts; it commits only once the
    // resync is seen waiting for that row.
    let resyncing = updater
        .transaction(async |conn| {
            user_service::store::update_user(conn, &change).await?;
            let client = app.client.clone();
            let id = ada.id.clone();
            let resyncing = tokio::spawn(async move {
                let mut client = client;
                let mut stream = client.resync_users(request(ids(&[&id]))).await?.into_inner();
                let mut last = None;
                while let Some(message) = stream.message().await? {
                    last = Some(message);
                }
                Ok::<_, tonic::Status>(last)
            });
            shop_testkit::eventually("the resync waits for the updated row", WAIT, || async {
                let mut conn = app.pool.get().await.unwrap();
                let waiting: i64 = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
                    "(SELECT count(*) FROM pg_stat_activity \
                      WHERE datname = current_database() AND wait_event_type = 'Lock')",
                ))
                .get_result(&mut conn)
                .await
                .unwrap();
                (waiting > 0).then_some(())
            })
            .await;
            Ok::<_, user_service::error::Error>(resyncing)
        })
        .await
        .unwrap();
    let last = tokio::time::timeout(WAIT, resyncing)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    assert_eq!(last.map(|p| p.written), Some(1));
    let versions: Vec<(String, i64)> = app
        .outbox()
        .await
        .into_iter()
        .map(|(kind, _, version)| (kind, version))
        .collect();
    assert_eq!(
        versions,
        [
            (pb::UserCreated::TYPE_NAME.to_owned(), 1),
            (pb::UserUpdated::TYPE_NAME.to_owned(), 2),
            (pb::UserSnapshot::TYPE_NAME.to_owned(), 2),
        ]
    );
    assert_eq!(snapshots(&app).await[0].name, "Ada Lovelace");
}

#[tokio::test(flavor = "multi_thread")]
async fn updates_during_a_resync_of_all_users_keep_each_users_outbox_rows_in_version_order() {
    let app = spawn_app().await;
    let mut users = Vec::new();
    for n in 0..60 {
        users.push(app.create_user(&format!("busy{n}@example.com"), "Busy").await);
    }
    let updating = {
        let app_client = app.client.clone();
        let users = users.clone();
        tokio::spawn(async move {
            let mut updated = 0;
            for round in 0..3 {
                for user in &users {
                    let mut client = app_client.clone();
                    client
                        .update_user(pb::UpdateUserRequest {
                            id: user.id.clone(),
                            expected_version: user.version + round,
                            email: None,
                            name: Some(format!("Busy {round}")),
                        })
                        .await
                        .unwrap();
                    updated += 1;
                }
            }
            updated
        })
    };

    let progress = resync(&app, every_user_at(100)).await.unwrap();
    assert_eq!(updating.await.unwrap(), 180);

    assert_eq!(progress.last().unwrap().written, 60);
    let mut by_user: std::collections::HashMap<String, Vec<(String, i64)>> = Default::default();
    for (kind, id, version) in app.outbox().await {
        by_user.entry(id).or_default().push((kind, version));
    }
    for (id, rows) in by_user {
        let versions: Vec<i64> = rows.iter().map(|(_, v)| *v).collect();
        assert!(
            versions.windows(2).all(|pair| pair[0] <= pair[1]),
            "{id}: {rows:?}"
        );
        // A snapshot repeats the version of the event before it, never
        // another.
        for pair in rows.windows(2) {
            if pair[1].0 == pb::UserSnapshot::TYPE_NAME {
                assert_eq!(pair[0].1, pair[1].1, "{id}: {rows:?}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_is_published_signed_with_the_aggregate_headers_at_the_users_version() {
    let mut app = spawn_app().await;
    let mut probe = app.broker.probe(&app.exchange, "#").await.unwrap();
    let ada = app.create_user("ada@example.com", "Ada").await;
    let ada = update_name(&app, &ada, "Ada Lovelace").await;

    resync(&app, request(ids(&[&ada.id]))).await.unwrap();

    let deliveries = probe.expect(3, WAIT).await;
    let delivery = &deliveries[2];
    assert_eq!(delivery.routing_key.as_str(), pb::UserSnapshot::ROUTING_KEY);
    let properties = &delivery.properties;
    assert_eq!(
        properties.kind().as_ref().unwrap().as_str(),
        pb::UserSnapshot::TYPE_NAME
    );
    let headers = properties.headers().as_ref().unwrap();
    assert_eq!(header_str(headers, "aggregate_type"), Some("user"));
    assert_eq!(header_str(headers, "aggregate_id"), Some(ada.id.as_str()));
    assert_eq!(header_i64(headers, "aggregate_version"), Some(2));
    let signer = shop_testkit::keys::trusted_keys()
        .verify(properties, &delivery.data)
        .expect("signed like every event");
    assert_eq!(signer, shop_testkit::keys::signing_key().id());
    let snapshot = pb::UserSnapshot::decode(&*delivery.data).unwrap();
    assert_eq!((snapshot.version, snapshot.name.as_str()), (2, "Ada Lovelace"));
    app.running.stop().await.unwrap();
}
