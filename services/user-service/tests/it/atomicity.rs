//! A command is one transaction: the users row and the outbox row commit
//! together or not at all.

use diesel_async::RunQueryDsl as _;
use shop_contracts::user as pb;
use tonic::Code;

use crate::helpers::{TestApp, spawn_app};

/// Makes every insert into the outbox fail, as a full disk or a lost
/// connection would at that point of the transaction.
async fn refuse_outbox_inserts(app: &TestApp) {
    let mut conn = app.pool.get().await.unwrap();
    diesel::sql_query(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'outbox refused by the test'; END $$",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    diesel::sql_query("CREATE TRIGGER refuse BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION refuse()")
        .execute(&mut conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn create_user_whose_outbox_insert_fails_leaves_neither_row() {
    let app = spawn_app().await;
    // The outbox insert runs after the users insert.
    refuse_outbox_inserts(&app).await;

    let status = app
        .client
        .clone()
        .create_user(pb::CreateUserRequest {
            email: "atomic@example.com".to_owned(),
            name: "Atomic".to_owned(),
            request_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::Internal);
    assert_eq!(
        status.message(),
        "internal error",
        "no internal details leak to the caller"
    );
    assert_eq!(app.user_count().await, 0);
    assert!(app.outbox().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn update_user_whose_outbox_insert_fails_keeps_the_old_state() {
    let app = spawn_app().await;
    let user = app.create_user("before@example.com", "Before").await;
    refuse_outbox_inserts(&app).await;

    let status = app
        .client
        .clone()
        .update_user(pb::UpdateUserRequest {
            id: user.id.clone(),
            expected_version: 1,
            email: None,
            name: Some("After".to_owned()),
        })
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::Internal);
    let stored = app
        .client
        .clone()
        .get_user(pb::GetUserRequest { id: user.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(stored, user);
    assert_eq!(app.outbox().await.len(), 1);
}
