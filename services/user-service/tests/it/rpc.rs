//! Every RPC's success path and every documented error code.

use shop_contracts::user as pb;
use tonic::Code;

use crate::helpers::{spawn_app, violated_fields};

fn create(email: &str, name: &str) -> pb::CreateUserRequest {
    pb::CreateUserRequest {
        email: email.to_owned(),
        name: name.to_owned(),
        request_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn create_user_returns_the_user_at_version_one_and_writes_one_event() {
    let app = spawn_app().await;

    let user = app.create_user("ada@example.com", "  Ada Lovelace ").await;

    assert!(uuid::Uuid::parse_str(&user.id).is_ok());
    assert_eq!(user.email, "ada@example.com");
    assert_eq!(user.name, "Ada Lovelace", "name is trimmed");
    assert_eq!(user.version, 1);
    assert!(user.created_at.is_some() && user.created_at == user.updated_at);
    assert_eq!(
        app.outbox().await,
        [("shop.user.v1.UserCreated".to_owned(), user.id.clone(), 1)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn create_user_with_invalid_fields_lists_every_violation() {
    let app = spawn_app().await;

    let status = app
        .client
        .clone()
        .create_user(pb::CreateUserRequest {
            email: "not-an-email".to_owned(),
            name: "   ".to_owned(),
            request_id: "nope".to_owned(),
        })
        .await
        .unwrap_err();

    assert_eq!(violated_fields(&status), ["email", "name", "request_id"]);
    assert!(status.message().contains("email"), "{}", status.message());
    assert_eq!(app.user_count().await, 0);
    assert!(app.outbox().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn create_user_with_too_long_email_or_name_is_invalid() {
    let app = spawn_app().await;
    let long_email = format!("{}@example.com", "a".repeat(64) + "." + &"b".repeat(180));
    assert!(long_email.len() > 254);

    let status = app
        .client
        .clone()
        .create_user(create(&long_email, &"n".repeat(201)))
        .await
        .unwrap_err();

    assert_eq!(violated_fields(&status), ["email", "name"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn create_user_with_taken_email_in_any_case_returns_already_exists() {
    let app = spawn_app().await;
    app.create_user("grace@example.com", "Grace").await;

    let status = app
        .client
        .clone()
        .create_user(create("GRACE@Example.com", "Other"))
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(app.user_count().await, 1);
    assert_eq!(app.outbox().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn create_user_with_the_same_request_id_returns_the_same_user_and_no_second_event() {
    let app = spawn_app().await;
    let request_id = uuid::Uuid::new_v4().to_string();
    let request = pb::CreateUserRequest {
        request_id: request_id.clone(),
        ..create("alan@example.com", "Alan")
    };

    let first = app
        .client
        .clone()
        .create_user(request.clone())
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let second = app
        .client
        .clone()
        .create_user(request)
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();

    assert_eq!(first, second);
    assert_eq!(app.user_count().await, 1);
    assert_eq!(app.outbox().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_creates_with_one_request_id_create_one_user() {
    let app = spawn_app().await;
    let request = pb::CreateUserRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        ..create("edsger@example.com", "Edsger")
    };

    let calls = (0..8).map(|_| {
        let mut client = app.client.clone();
        let request = request.clone();
        async move {
            client
                .create_user(request)
                .await
                .map(|r| r.into_inner().user.unwrap().id)
        }
    });
    let ids = futures::future::join_all(calls).await;

    let first = ids[0].as_ref().unwrap();
    assert!(ids.iter().all(|id| id.as_ref().unwrap() == first), "{ids:?}");
    assert_eq!(app.user_count().await, 1);
    assert_eq!(app.outbox().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn create_user_with_a_reused_request_id_for_other_fields_returns_already_exists() {
    let app = spawn_app().await;
    let request_id = uuid::Uuid::new_v4().to_string();
    app.client
        .clone()
        .create_user(pb::CreateUserRequest {
            request_id: request_id.clone(),
            ..create("barbara@example.com", "Barbara")
        })
        .await
        .unwrap();

    let status = app
        .client
        .clone()
        .create_user(pb::CreateUserRequest {
            request_id,
            ..create("other@example.com", "Barbara")
        })
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(status.message().contains("request_id"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn get_user_returns_the_stored_user() {
    let app = spawn_app().await;
    let created = app.create_user("ken@example.com", "Ken").await;

    let got = app
        .client
        .clone()
        .get_user(pb::GetUserRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();

    assert_eq!(got, created);
}

#[tokio::test(flavor = "multi_thread")]
async fn get_user_with_unknown_id_returns_not_found_and_with_bad_id_invalid_argument() {
    let app = spawn_app().await;

    let missing = app
        .client
        .clone()
        .get_user(pb::GetUserRequest {
            id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    let malformed = app
        .client
        .clone()
        .get_user(pb::GetUserRequest { id: "42".to_owned() })
        .await
        .unwrap_err();
    let empty = app
        .client
        .clone()
        .get_user(pb::GetUserRequest { id: String::new() })
        .await
        .unwrap_err();

    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(violated_fields(&malformed), ["id"]);
    assert_eq!(violated_fields(&empty), ["id"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn update_user_changes_fields_bumps_the_version_and_writes_an_event() {
    let app = spawn_app().await;
    let created = app.create_user("linus@example.com", "Linus").await;

    let updated = app
        .client
        .clone()
        .update_user(pb::UpdateUserRequest {
            id: created.id.clone(),
            expected_version: 1,
            email: Some("torvalds@example.com".to_owned()),
            name: None,
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();

    assert_eq!(updated.version, 2);
    assert_eq!(updated.email, "torvalds@example.com");
    assert_eq!(updated.name, "Linus");
    assert_eq!(updated.created_at, created.created_at);
    assert_ne!(updated.updated_at, created.updated_at);
    assert_eq!(
        app.outbox().await.last().unwrap(),
        &("shop.user.v1.UserUpdated".to_owned(), created.id.clone(), 2)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn update_user_that_changes_nothing_keeps_the_version_and_writes_no_event() {
    let app = spawn_app().await;
    let created = app.create_user("same@example.com", "Same").await;

    let updated = app
        .client
        .clone()
        .update_user(pb::UpdateUserRequest {
            id: created.id.clone(),
            expected_version: 1,
            email: None,
            name: Some(" Same ".to_owned()),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();

    assert_eq!(updated, created);
    assert_eq!(app.outbox().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn update_user_with_a_stale_version_returns_aborted() {
    let app = spawn_app().await;
    let created = app.create_user("stale@example.com", "Stale").await;
    let change = |version| pb::UpdateUserRequest {
        id: created.id.clone(),
        expected_version: version,
        email: None,
        name: Some(format!("Name {version}")),
    };
    app.client.clone().update_user(change(1)).await.unwrap();

    let status = app.client.clone().update_user(change(1)).await.unwrap_err();

    assert_eq!(status.code(), Code::Aborted);
    assert!(status.message().contains("version 2"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn update_user_errors_not_found_invalid_and_email_taken() {
    let app = spawn_app().await;
    app.create_user("taken@example.com", "Taken").await;
    let other = app.create_user("other@example.com", "Other").await;
    let mut client = app.client.clone();

    let missing = client
        .update_user(pb::UpdateUserRequest {
            id: uuid::Uuid::new_v4().to_string(),
            expected_version: 1,
            email: None,
            name: Some("x".to_owned()),
        })
        .await
        .unwrap_err();
    let nothing = client
        .update_user(pb::UpdateUserRequest {
            id: other.id.clone(),
            expected_version: 1,
            email: None,
            name: None,
        })
        .await
        .unwrap_err();
    let invalid = client
        .update_user(pb::UpdateUserRequest {
            id: "x".to_owned(),
            expected_version: 0,
            email: Some("bad".to_owned()),
            name: Some(String::new()),
        })
        .await
        .unwrap_err();
    let taken = client
        .update_user(pb::UpdateUserRequest {
            id: other.id.clone(),
            expected_version: 1,
            email: Some("Taken@example.com".to_owned()),
            name: None,
        })
        .await
        .unwrap_err();

    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(violated_fields(&nothing), ["email"]);
    assert_eq!(
        violated_fields(&invalid),
        ["id", "expected_version", "email", "name"]
    );
    assert_eq!(taken.code(), Code::AlreadyExists);
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_user_removes_it_and_writes_an_event_at_the_next_version() {
    let app = spawn_app().await;
    let created = app.create_user("gone@example.com", "Gone").await;
    let mut client = app.client.clone();

    client
        .delete_user(pb::DeleteUserRequest {
            id: created.id.clone(),
            expected_version: 1,
        })
        .await
        .unwrap();

    let status = client
        .get_user(pb::GetUserRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(
        app.outbox().await.last().unwrap(),
        &("shop.user.v1.UserDeleted".to_owned(), created.id.clone(), 2)
    );
    // The email is free again.
    app.create_user("gone@example.com", "Back").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_user_errors_aborted_not_found_and_invalid() {
    let app = spawn_app().await;
    let created = app.create_user("keep@example.com", "Keep").await;
    let mut client = app.client.clone();

    let stale = client
        .delete_user(pb::DeleteUserRequest {
            id: created.id.clone(),
            expected_version: 7,
        })
        .await
        .unwrap_err();
    let missing = client
        .delete_user(pb::DeleteUserRequest {
            id: uuid::Uuid::new_v4().to_string(),
            expected_version: 1,
        })
        .await
        .unwrap_err();
    let invalid = client
        .delete_user(pb::DeleteUserRequest {
            id: String::new(),
            expected_version: -1,
        })
        .await
        .unwrap_err();

    assert_eq!(stale.code(), Code::Aborted);
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(violated_fields(&invalid), ["id", "expected_version"]);
    assert_eq!(app.user_count().await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn list_users_pages_through_every_user_in_creation_order() {
    let app = spawn_app().await;
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(
            app.create_user(&format!("u{i}@example.com"), &format!("User {i}"))
                .await
                .id,
        );
    }
    let mut client = app.client.clone();

    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_users(pb::ListUsersRequest {
                page_size: Some(2),
                page_token: page_token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.users.len() <= 2);
        seen.extend(page.users.into_iter().map(|u| u.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }

    assert_eq!(seen, created);
    assert_eq!(pages, 3);
    let all = client
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.users.len(), 5, "unset page_size means the default (50)");
    assert!(all.next_page_token.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn list_users_with_out_of_range_page_size_or_bad_token_is_invalid() {
    let app = spawn_app().await;
    let mut client = app.client.clone();

    for size in [0, -1, 1001] {
        let status = client
            .list_users(pb::ListUsersRequest {
                page_size: Some(size),
                page_token: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["page_size"], "page_size {size}");
    }
    let status = client
        .list_users(pb::ListUsersRequest {
            page_size: Some(10),
            page_token: "garbage".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["page_token"]);
}
