//! Any request, however malformed, gets one of the documented codes: never
//! INTERNAL, never a crash. A refused request changes nothing (no user
//! row, no outbox row); an accepted one is read back as it was answered,
//! and each change of the users table comes with exactly one outbox row.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
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

/// The known user's current version (`None`, filled in from the model when
/// the case runs), often, so that updates and deletes are accepted too;
/// otherwise any version.
fn current_or_any_version() -> impl Strategy<Value = Option<i64>> {
    prop_oneof![2 => Just(None), 1 => version().prop_map(Some)]
}

/// A known user's id, sometimes, so the deeper paths are reached too.
fn id(known: String) -> impl Strategy<Value = String> {
    prop_oneof![Just(known), text()]
}

fn run<S: Strategy>(strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    run_with(Config::default().max_shrink_iters, strategy, test);
}

/// [`run`] for a test whose cases depend on the ones before (a model of what
/// the service accepted): no shrinking, which would replay cases against a
/// database that has moved on, so the first failing case is the one shown.
fn run_in_order<S: Strategy>(strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    run_with(0, strategy, test);
}

fn run_with<S: Strategy>(
    max_shrink_iters: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        max_shrink_iters,
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

/// The documented email rule (README, `CreateUser`), written again here so
/// the test does not ask the service's own validator: at most 254
/// characters, ASCII, one `@`; before it dot-separated atoms of letters,
/// digits and ``!#$%&'*+/=?^_`{|}~-``, at most 64 characters; after it at
/// least two dot-separated labels of letters, digits and inner hyphens, each
/// at most 63.
fn documented_email(value: &str) -> bool {
    fn atom(atom: &str) -> bool {
        !atom.is_empty()
            && atom
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~-".contains(&b))
    }
    fn label(label: &str) -> bool {
        (1..=63).contains(&label.len())
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    }
    if value.is_empty() || value.len() > 254 || !value.is_ascii() || value.matches('@').count() != 1 {
        return false;
    }
    let Some((local, domain)) = value.split_once('@') else {
        return false;
    };
    local.len() <= 64
        && local.split('.').all(atom)
        && domain.split('.').count() >= 2
        && domain.split('.').all(label)
}

/// The documented name rule: 1 to 200 characters once trimmed, no control
/// characters.
fn documented_name(value: &str) -> bool {
    let trimmed = value.trim();
    (1..=200).contains(&trimmed.chars().count()) && !trimmed.chars().any(char::is_control)
}

/// Emails that are valid, often, and some that differ only in case.
fn email() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9]{1,10}(\\.[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,5}){0,2}@[a-z0-9]{1,10}(-[a-z0-9]{1,5})?\\.[a-z]{2,6}",
        1 => prop_oneof![Just("taken@example.com".to_owned()), Just("TAKEN@Example.COM".to_owned())],
        2 => text(),
    ]
}

/// Names that are valid, often, and the boundaries: blank, one over the
/// limit.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => " {0,2}[A-Za-z][A-Za-z '-]{0,30} {0,2}",
        1 => Just(" \t ".to_owned()),
        1 => Just("n".repeat(201)),
        2 => text(),
    ]
}

/// Request ids: none, a UUID, or anything.
fn request_id() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => Just(String::new()),
        2 => "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        1 => text(),
    ]
}

/// What the service has accepted so far, to tell the one right code of the
/// next `CreateUser`.
#[derive(Default)]
struct CreateModel {
    /// Emails taken, in lower case (uniqueness ignores case).
    emails: std::collections::HashSet<String>,
    /// Each request id accepted, with the email and trimmed name it carried.
    requests: std::collections::HashMap<uuid::Uuid, (String, String)>,
}

impl CreateModel {
    /// The one code the documented rules give `request`; records what an
    /// accepted one takes.
    fn answer(&mut self, request: &pb::CreateUserRequest) -> Code {
        let request_id = (!request.request_id.is_empty()).then(|| uuid::Uuid::try_parse(&request.request_id));
        if !documented_email(&request.email)
            || !documented_name(&request.name)
            || matches!(request_id, Some(Err(_)))
        {
            return Code::InvalidArgument;
        }
        let request_id = request_id.and_then(Result::ok);
        let name = request.name.trim().to_owned();
        if let Some(seen) = request_id.and_then(|id| self.requests.get(&id)) {
            // The same request again is answered as the first time; another
            // one under its id is refused.
            return if *seen == (request.email.clone(), name) {
                Code::Ok
            } else {
                Code::AlreadyExists
            };
        }
        if !self.emails.insert(request.email.to_ascii_lowercase()) {
            return Code::AlreadyExists;
        }
        if let Some(id) = request_id {
            self.requests.insert(id, (request.email.clone(), name));
        }
        Code::Ok
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn any_create_user_gets_the_one_code_its_request_calls_for() {
    let app = spawn_app().await;
    let db = database(&app).await;
    let model = std::sync::Mutex::new(CreateModel::default());
    let accepted = std::sync::atomic::AtomicUsize::new(0);
    run_in_order((email(), name(), request_id()), |(email, name, request_id)| {
        let request = pb::CreateUserRequest {
            email,
            name,
            request_id,
        };
        let expected = model.lock().unwrap().answer(&request);
        let before = state(&db);
        let outcome = call(app.client.clone().create_user(request.clone()))
            .map(|response| response.into_inner().user.unwrap());
        check_effect(outcome.is_ok(), &before, &state(&db))?;
        if let Ok(user) = &outcome {
            prop_assert_eq!(&read_back(&app, &user.id).unwrap(), user);
            accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let code = outcome.err().map_or(Code::Ok, |status| status.code());
        prop_assert_eq!(code, expected, "{:?}", request);
        Ok(())
    });
    assert!(
        accepted.load(std::sync::atomic::Ordering::Relaxed) >= 5,
        "valid requests were generated and accepted"
    );
    app.create_user("still@example.com", "Still serving").await;
}

/// The one user the update and delete cases may reach, as the documented
/// rules leave it.
struct KnownUser {
    id: uuid::Uuid,
    version: i64,
    deleted: bool,
}

impl KnownUser {
    /// The one code an update or delete of `id` at `expected_version` gets:
    /// a malformed request (`valid` false, an id that is not a UUID, a
    /// version under 1) is INVALID_ARGUMENT whatever else; then an unknown
    /// or deleted user is NOT_FOUND; then a version that is not the current
    /// one is ABORTED.
    fn answer(&self, id: &str, expected_version: i64, valid: bool) -> Code {
        let parsed = uuid::Uuid::try_parse(id);
        if !valid || parsed.is_err() || expected_version < 1 {
            return Code::InvalidArgument;
        }
        if parsed.ok() != Some(self.id) || self.deleted {
            return Code::NotFound;
        }
        if expected_version != self.version {
            return Code::Aborted;
        }
        Code::Ok
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn any_get_update_or_delete_gets_the_one_code_its_request_calls_for_and_list_a_documented_one() {
    let app = spawn_app().await;
    let db = database(&app).await;
    let known = known_user(&app).await;
    // The one code each id calls for: the known user's is found, any other
    // UUID is not, anything else is not an id.
    let known_id = uuid::Uuid::try_parse(&known.id).unwrap();
    run(id(known.id.clone()), |id| {
        let expected = match uuid::Uuid::try_parse(&id) {
            Ok(parsed) if parsed == known_id => Code::Ok,
            Ok(_) => Code::NotFound,
            Err(_) => Code::InvalidArgument,
        };
        let before = state(&db);
        let outcome = call(app.client.clone().get_user(pb::GetUserRequest { id: id.clone() }));
        prop_assert_eq!(&before, &state(&db), "a read changed the database");
        let code = outcome.err().map_or(Code::Ok, |status| status.code());
        prop_assert_eq!(code, expected, "GetUser {:?}", id);
        Ok(())
    });
    // The known user as the documented rules leave it after each accepted
    // call: its version, and whether it was deleted. Updates and deletes
    // then each get the one code their request calls for (the only other
    // user is none, so an email is never taken by another).
    let updated = std::sync::atomic::AtomicUsize::new(0);
    let model = std::sync::Mutex::new(KnownUser {
        id: known_id,
        version: known.version,
        deleted: false,
    });
    run_in_order(
        (
            id(known.id.clone()),
            current_or_any_version(),
            proptest::option::of(prop_oneof![email(), text()]),
            proptest::option::of(prop_oneof![name(), text()]),
        ),
        |(id, expected_version, email, name)| {
            let expected_version = expected_version.unwrap_or_else(|| model.lock().unwrap().version);
            let request = pb::UpdateUserRequest {
                id,
                expected_version,
                email,
                name,
            };
            let valid = (request.email.is_some() || request.name.is_some())
                && request.email.as_deref().is_none_or(documented_email)
                && request.name.as_deref().is_none_or(documented_name);
            let expected = model
                .lock()
                .unwrap()
                .answer(&request.id, request.expected_version, valid);
            let before = state(&db);
            let outcome = call(app.client.clone().update_user(request.clone()))
                .map(|response| response.into_inner().user.unwrap());
            check_effect(outcome.is_ok(), &before, &state(&db))?;
            if let Ok(user) = &outcome {
                prop_assert_eq!(&read_back(&app, &user.id).unwrap(), user);
                prop_assert_eq!(user.version, request.expected_version + 1);
                model.lock().unwrap().version = user.version;
                updated.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let code = outcome.err().map_or(Code::Ok, |status| status.code());
            prop_assert_eq!(code, expected, "{:?}", request);
            Ok(())
        },
    );
    assert!(
        updated.load(std::sync::atomic::Ordering::Relaxed) >= 3,
        "valid updates were generated and accepted"
    );
    run_in_order(
        (id(known.id.clone()), current_or_any_version()),
        |(id, expected_version)| {
            let expected_version = expected_version.unwrap_or_else(|| model.lock().unwrap().version);
            let request = pb::DeleteUserRequest {
                id: id.clone(),
                expected_version,
            };
            let expected = model.lock().unwrap().answer(&id, expected_version, true);
            let before = state(&db);
            let outcome = call(app.client.clone().delete_user(request));
            check_effect(outcome.is_ok(), &before, &state(&db))?;
            if outcome.is_ok() {
                let gone = read_back(&app, &id).unwrap_err();
                prop_assert_eq!(gone.code(), Code::NotFound);
                model.lock().unwrap().deleted = true;
            }
            let code = outcome.err().map_or(Code::Ok, |status| status.code());
            prop_assert_eq!(
                code,
                expected,
                "DeleteUser {:?} at version {}",
                id,
                expected_version
            );
            Ok(())
        },
    );
    assert!(
        model.lock().unwrap().deleted,
        "a valid delete was generated and accepted"
    );
    // ListUsers: a page size outside 1..=1000 or a token that is not a page
    // token (a UUID's 16 bytes in unpadded URL-safe base64) is
    // INVALID_ARGUMENT; anything else a page, at most its size long.
    let size = prop_oneof![
        1 => Just(None),
        2 => (1..=1000i32).prop_map(Some),
        1 => prop_oneof![-1..=1i32, 999..=1001i32].prop_map(Some),
        1 => any::<i32>().prop_map(Some),
    ];
    let token = prop_oneof![
        2 => Just(String::new()),
        2 => any::<[u8; 16]>().prop_map(|bytes| URL_SAFE_NO_PAD.encode(bytes)),
        1 => any::<Vec<u8>>().prop_map(|bytes| URL_SAFE_NO_PAD.encode(bytes)),
        1 => text(),
    ];
    let listed = std::sync::Mutex::new(0_u32);
    run((size, token), |(page_size, page_token)| {
        let token_ok = page_token.is_empty()
            || URL_SAFE_NO_PAD
                .decode(&page_token)
                .is_ok_and(|bytes| bytes.len() == 16);
        let expected = if page_size.is_some_and(|size| !(1..=1000).contains(&size)) || !token_ok {
            Code::InvalidArgument
        } else {
            Code::Ok
        };
        let request = pb::ListUsersRequest {
            page_size,
            page_token: page_token.clone(),
        };
        let before = state(&db);
        let outcome = call(app.client.clone().list_users(request));
        prop_assert_eq!(&before, &state(&db), "a read changed the database");
        if let Ok(page) = &outcome {
            *listed.lock().unwrap() += 1;
            prop_assert!(page.get_ref().users.len() <= usize::try_from(page_size.unwrap_or(50)).unwrap_or(0));
        }
        let code = outcome.err().map_or(Code::Ok, |status| status.code());
        prop_assert_eq!(
            code,
            expected,
            "ListUsers size {:?} token {:?}",
            page_size,
            page_token
        );
        Ok(())
    });
    assert!(
        *listed.lock().unwrap() > 0,
        "valid pages were generated and listed"
    );
    app.create_user("after@example.com", "Still serving").await;
}
