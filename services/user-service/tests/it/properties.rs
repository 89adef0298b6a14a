//! Any request, however malformed, gets one of the documented codes: never
//! INTERNAL, never a crash. A refused request changes nothing (no user
//! row, no outbox row); an accepted one is read back as it was answered,
//! and each change of the users table comes with exactly one outbox row.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use shop_contracts::user as pb;
use tonic::Code;

use crate::helpers::{TestApp, spawn_app};

/// Text of every kind: empty, ASCII, any Unicode (control characters,
/// emoji, NUL), long, email-like, UUID-like.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[ -~]{0,40}",
        "\\PC{0,80}",
        any::<String>(),
        "[a-zA-Z0-9._%+-]{1,20}@[a-z0-9-]{1,15}\\.[a-z]{2,6}",
        "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        proptest::collection::vec(any::<char>(), 200..3000).prop_map(|chars| chars.into_iter().collect()),
    ]
}

/// A version that is sometimes the known user's current one, so that some
/// updates and deletes are accepted.
fn version() -> impl Strategy<Value = i64> {
    prop_oneof![0..5i64, any::<i64>()]
}

/// A known user's id, sometimes, so the deeper paths are reached too.
fn id(known: String) -> impl Strategy<Value = String> {
    prop_oneof![Just(known), text()]
}

fn check(outcome: Result<(), tonic::Status>, allowed: &[Code]) -> Result<(), TestCaseError> {
    let code = outcome.err().map_or(Code::Ok, |status| status.code());
    prop_assert!(allowed.contains(&code), "code {code:?} is not one of {allowed:?}");
    Ok(())
}

fn run<S: Strategy>(strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(failure) = runner.run(&strategy, test) {
        panic!("{failure}");
    }
}

fn call<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

async fn known_user(app: &TestApp) -> pb::User {
    app.create_user("known@example.com", "Known").await
}

/// What a call may change: a digest of every user row, and the number of
/// outbox rows.
#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    users: String,
    outbox: i64,
}

async fn database(app: &TestApp) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(app.db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

fn state(db: &tokio_postgres::Client) -> State {
    let row = call(db.query_one(
        "SELECT coalesce(md5(string_agg(u::text, ',' ORDER BY u.id)), ''), \
         (SELECT count(*) FROM outbox) FROM users u",
        &[],
    ))
    .unwrap();
    State {
        users: row.get(0),
        outbox: row.get(1),
    }
}

/// A refused call left everything as it was; an accepted one that changed
/// the users wrote one outbox row, and one that changed nothing (a repeated
/// request id) wrote none.
fn check_effect(accepted: bool, before: &State, after: &State) -> Result<(), TestCaseError> {
    if !accepted {
        prop_assert_eq!(before, after, "a refused call changed the database");
        return Ok(());
    }
    let events = if before.users == after.users { 0 } else { 1 };
    prop_assert_eq!(
        after.outbox - before.outbox,
        events,
        "users changed: {}",
        before.users != after.users
    );
    Ok(())
}

/// The user as GetUser reads it now.
fn read_back(app: &TestApp, id: &str) -> Result<pb::User, tonic::Status> {
    call(
        app.client
            .clone()
            .get_user(pb::GetUserRequest { id: id.to_owned() }),
    )
    .map(|response| response.into_inner().user.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn any_create_user_gets_a_documented_code() {
    let app = spawn_app().await;
    let db = database(&app).await;
    run((text(), text(), text()), |(email, name, request_id)| {
        let before = state(&db);
        let outcome = call(app.client.clone().create_user(pb::CreateUserRequest {
            email,
            name,
            request_id,
        }))
        .map(|response| response.into_inner().user.unwrap());
        check_effect(outcome.is_ok(), &before, &state(&db))?;
        if let Ok(user) = &outcome {
            prop_assert_eq!(&read_back(&app, &user.id).unwrap(), user);
        }
        check(
            outcome.map(drop),
            &[Code::Ok, Code::InvalidArgument, Code::AlreadyExists],
        )
    });
    app.create_user("still@example.com", "Still serving").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn any_get_update_delete_or_list_gets_a_documented_code() {
    let app = spawn_app().await;
    let db = database(&app).await;
    let known = known_user(&app).await;
    run(id(known.id.clone()), |id| {
        let before = state(&db);
        let outcome = call(app.client.clone().get_user(pb::GetUserRequest { id }));
        prop_assert_eq!(&before, &state(&db), "a read changed the database");
        check(
            outcome.map(drop),
            &[Code::Ok, Code::InvalidArgument, Code::NotFound],
        )
    });
    run(
        (
            id(known.id.clone()),
            version(),
            proptest::option::of(text()),
            proptest::option::of(text()),
        ),
        |(id, expected_version, email, name)| {
            let request = pb::UpdateUserRequest {
                id,
                expected_version,
                email,
                name,
            };
            let before = state(&db);
            let outcome = call(app.client.clone().update_user(request))
                .map(|response| response.into_inner().user.unwrap());
            check_effect(outcome.is_ok(), &before, &state(&db))?;
            if let Ok(user) = &outcome {
                prop_assert_eq!(&read_back(&app, &user.id).unwrap(), user);
            }
            check(
                outcome.map(drop),
                &[
                    Code::Ok,
                    Code::InvalidArgument,
                    Code::NotFound,
                    Code::Aborted,
                    Code::AlreadyExists,
                ],
            )
        },
    );
    run((id(known.id.clone()), version()), |(id, expected_version)| {
        let request = pb::DeleteUserRequest {
            id: id.clone(),
            expected_version,
        };
        let before = state(&db);
        let outcome = call(app.client.clone().delete_user(request));
        check_effect(outcome.is_ok(), &before, &state(&db))?;
        if outcome.is_ok() {
            let gone = read_back(&app, &id).unwrap_err();
            prop_assert_eq!(gone.code(), Code::NotFound);
        }
        check(
            outcome.map(drop),
            &[Code::Ok, Code::InvalidArgument, Code::NotFound, Code::Aborted],
        )
    });
    run(
        (proptest::option::of(any::<i32>()), text()),
        |(page_size, page_token)| {
            let request = pb::ListUsersRequest {
                page_size,
                page_token,
            };
            let before = state(&db);
            let outcome = call(app.client.clone().list_users(request));
            prop_assert_eq!(&before, &state(&db), "a read changed the database");
            check(outcome.map(drop), &[Code::Ok, Code::InvalidArgument])
        },
    );
    app.create_user("after@example.com", "Still serving").await;
}
