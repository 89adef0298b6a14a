//! Any request, however malformed, gets one of the documented codes: never
//! INTERNAL, never a crash.

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

#[tokio::test(flavor = "multi_thread")]
async fn any_create_user_gets_a_documented_code() {
    let app = spawn_app().await;
    run((text(), text(), text()), |(email, name, request_id)| {
        let outcome = call(app.client.clone().create_user(pb::CreateUserRequest {
            email,
            name,
            request_id,
        }));
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
    let known = known_user(&app).await;
    run(id(known.id.clone()), |id| {
        check(
            call(app.client.clone().get_user(pb::GetUserRequest { id })).map(drop),
            &[Code::Ok, Code::InvalidArgument, Code::NotFound],
        )
    });
    run(
        (
            id(known.id.clone()),
            any::<i64>(),
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
            check(
                call(app.client.clone().update_user(request)).map(drop),
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
    run((id(known.id.clone()), any::<i64>()), |(id, expected_version)| {
        let request = pb::DeleteUserRequest { id, expected_version };
        check(
            call(app.client.clone().delete_user(request)).map(drop),
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
            check(
                call(app.client.clone().list_users(request)).map(drop),
                &[Code::Ok, Code::InvalidArgument],
            )
        },
    );
    app.create_user("after@example.com", "Still serving").await;
}
