//! Any request, however malformed, gets one of the documented codes; a
//! refused one changes nothing (no order row, no outbox row), an accepted
//! one is read back as it was answered and wrote one event. Any message on
//! the consumed queue is applied or dead-lettered with the reason it calls
//! for, and the consumer keeps going.

use std::time::Duration;

use base64::Engine as _;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use shop_contracts::Event as _;
use shop_contracts::order as pb;
use shop_contracts::user::{UserCreated, UserDeleted, UserUpdated};
use tonic::Code;

use crate::helpers::{TestApp, spawn_app};

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[ -~]{0,40}",
        "\\PC{0,80}",
        any::<String>(),
        "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        proptest::collection::vec(any::<char>(), 200..2000).prop_map(|chars| chars.into_iter().collect()),
    ]
}

fn run<S: Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(failure) = runner.run(&strategy, test) {
        panic!("{failure}");
    }
}

/// [`run`] without shrinking, for cases that depend on the ones before (a
/// model of what the service accepted): shrinking would replay them against
/// a database that has moved on.
fn run_in_order<S: Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 0,
        ..Config::default()
    });
    if let Err(failure) = runner.run(&strategy, test) {
        panic!("{failure}");
    }
}

fn block<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

/// What a call may change: a digest of every order, item and remembered
/// request id, and the number of outbox rows.
#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    orders: String,
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
    let row = block(db.query_one(
        "SELECT coalesce((SELECT md5(string_agg(o::text, ',' ORDER BY o.id)) FROM orders o), '') \
         || coalesce((SELECT md5(string_agg(i::text, ',' ORDER BY i.order_id, i.line)) FROM order_items i), '') \
         || coalesce((SELECT md5(string_agg(r::text, ',' ORDER BY r.request_id)) FROM create_order_requests r), ''), \
         (SELECT count(*) FROM outbox)",
        &[],
    ))
    .unwrap();
    State {
        orders: row.get(0),
        outbox: row.get(1),
    }
}

/// A refused call left everything as it was; an accepted one that changed
/// the orders wrote one outbox row, one that changed nothing (a repeated
/// request id) none.
fn check_effect(accepted: bool, before: &State, after: &State) -> Result<(), TestCaseError> {
    if !accepted {
        prop_assert_eq!(before, after, "a refused call changed the database");
        return Ok(());
    }
    let events = if before.orders == after.orders { 0 } else { 1 };
    prop_assert_eq!(after.outbox - before.outbox, events);
    Ok(())
}

/// Whether an order's items meet the documented rules: 1 to 100 items,
/// each product id 1 to 100 characters without whitespace or control
/// characters and named once, each quantity 1 to 1000.
fn valid_items(lines: &[(String, i32)]) -> bool {
    let mut seen = std::collections::HashSet::new();
    (1..=100).contains(&lines.len())
        && lines.iter().all(|(product, quantity)| {
            !product.is_empty()
                && product.chars().count() <= 100
                && !product.chars().any(|c| c.is_whitespace() || c.is_control())
                && seen.insert(product.as_str())
                && (1..=1000).contains(quantity)
        })
}

fn read_back(app: &TestApp, id: &str) -> pb::Order {
    block(
        app.client
            .clone()
            .get_order(pb::GetOrderRequest { id: id.to_owned() }),
    )
    .unwrap()
    .into_inner()
    .order
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn any_order_request_gets_a_documented_code() {
    let app = spawn_app().await;
    let db = database(&app).await;
    let known = app.known_user_id().await.to_string();
    let order = app.create_order(known.parse().unwrap(), &[("sku-1", 1)]).await;
    // CreateOrder: the one code each request calls for, from a model of the
    // documented rules and of the request ids accepted so far. Valid users,
    // items and request ids (a few, so that they are reused) are generated
    // often enough to be accepted, and garbage beside them.
    let user = prop_oneof![2 => Just(known.clone()), 1 => text()];
    // Nearly valid product ids and quantities beside garbage: a space, a
    // tab or a control character in an id, a repeated id (ten names), a
    // quantity at either edge.
    let product = prop_oneof![
        4 => "sku-[0-9]",
        1 => "sku[ \t\x7f\u{85}-][0-9]",
        1 => text(),
    ];
    let quantity = prop_oneof![
        4 => 1..=1000i32,
        1 => -1..=1i32,
        1 => 999..=1001i32,
        1 => any::<i32>(),
    ];
    let item = move || {
        (product.clone(), quantity.clone())
            .prop_map(|(product_id, quantity)| pb::OrderItem { product_id, quantity })
    };
    let items = prop_oneof![
        4 => proptest::collection::vec(item(), 1..4),
        1 => proptest::collection::vec(item(), 0..1),
        1 => proptest::collection::vec(item(), 95..110),
    ];
    let request_ids = [uuid::Uuid::now_v7(), uuid::Uuid::now_v7(), uuid::Uuid::now_v7()];
    let request_id = prop_oneof![
        2 => Just(String::new()),
        3 => proptest::sample::select(request_ids.to_vec()).prop_map(|id| id.to_string()),
        1 => text(),
    ];
    let known_uuid = uuid::Uuid::try_parse(&known).unwrap();
    // Each request id accepted, and the user and items it was accepted for.
    let used = std::sync::Mutex::new(std::collections::HashMap::<
        uuid::Uuid,
        (uuid::Uuid, Vec<(String, i32)>),
    >::new());
    let accepted = std::sync::Mutex::new(0_u32);
    run_in_order(
        96,
        (user.clone(), items, request_id),
        |(user_id, items, request_id)| {
            let lines: Vec<(String, i32)> = items
                .iter()
                .map(|item| (item.product_id.clone(), item.quantity))
                .collect();
            let user_uuid = uuid::Uuid::try_parse(&user_id).ok();
            let request_uuid = uuid::Uuid::try_parse(&request_id).ok();
            let expected = match (user_uuid, request_uuid) {
                _ if !valid_items(&lines) => Code::InvalidArgument,
                (None, _) => Code::InvalidArgument,
                (_, None) if !request_id.is_empty() => Code::InvalidArgument,
                (Some(user), Some(request)) if used.lock().unwrap().contains_key(&request) => {
                    if used.lock().unwrap()[&request] == (user, lines.clone()) {
                        Code::Ok
                    } else {
                        Code::AlreadyExists
                    }
                }
                (Some(user), _) if user != known_uuid => Code::FailedPrecondition,
                (Some(_), _) => Code::Ok,
            };
            let request = pb::CreateOrderRequest {
                user_id: user_id.clone(),
                items,
                request_id: request_id.clone(),
            };
            let before = state(&db);
            let outcome = block(app.client.clone().create_order(request))
                .map(|response| response.into_inner().order.unwrap());
            check_effect(outcome.is_ok(), &before, &state(&db))?;
            if let Ok(order) = &outcome {
                prop_assert_eq!(&read_back(&app, &order.id), order);
                *accepted.lock().unwrap() += 1;
                if let (Some(user), Some(request)) = (user_uuid, request_uuid) {
                    used.lock()
                        .unwrap()
                        .entry(request)
                        .or_insert((user, lines.clone()));
                }
            }
            let code = outcome.err().map_or(Code::Ok, |status| status.code());
            prop_assert_eq!(
                code,
                expected,
                "CreateOrder for {:?} with {:?}, request id {:?}",
                user_id,
                lines,
                request_id
            );
            Ok(())
        },
    );
    assert!(
        *accepted.lock().unwrap() > 0,
        "valid orders were generated and accepted"
    );
    let order_id = prop_oneof![Just(order.id.clone()), text()];
    // The one code each id calls for, from the documented rules: the known
    // order's is found, any other UUID is not, anything else is not an id.
    let order_uuid = uuid::Uuid::try_parse(&order.id).unwrap();
    let by_id = |id: &str| match uuid::Uuid::try_parse(id) {
        Ok(parsed) if parsed == order_uuid => None,
        Ok(_) => Some(Code::NotFound),
        Err(_) => Some(Code::InvalidArgument),
    };
    run(48, order_id.clone(), |id| {
        let expected = by_id(&id).unwrap_or(Code::Ok);
        let before = state(&db);
        let outcome = block(
            app.client
                .clone()
                .get_order(pb::GetOrderRequest { id: id.clone() }),
        );
        prop_assert_eq!(&before, &state(&db), "a read changed the database");
        let code = outcome.err().map_or(Code::Ok, |status| status.code());
        prop_assert_eq!(code, expected, "GetOrder {:?}", id);
        Ok(())
    });
    // ListOrders: a malformed user id, a page size outside 1..=1000 or a
    // token that is not a page token (a UUID's 16 bytes in unpadded
    // URL-safe base64) is INVALID_ARGUMENT; anything else a page.
    let token = prop_oneof![
        2 => Just(String::new()),
        2 => any::<[u8; 16]>().prop_map(|bytes| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)),
        1 => text(),
    ];
    let size = prop_oneof![
        1 => Just(None),
        2 => (1..=1000i32).prop_map(Some),
        1 => any::<i32>().prop_map(Some),
    ];
    let listed = std::sync::Mutex::new(0_u32);
    run(48, (user, size, token), |(user_id, page_size, page_token)| {
        let token_ok = page_token.is_empty()
            || base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(&page_token)
                .is_ok_and(|bytes| bytes.len() == 16);
        let expected = if uuid::Uuid::try_parse(&user_id).is_err()
            || page_size.is_some_and(|size| !(1..=1000).contains(&size))
            || !token_ok
        {
            Code::InvalidArgument
        } else {
            Code::Ok
        };
        let request = pb::ListOrdersRequest {
            user_id: user_id.clone(),
            page_size,
            page_token: page_token.clone(),
        };
        let before = state(&db);
        let outcome = block(app.client.clone().list_orders(request));
        prop_assert_eq!(&before, &state(&db), "a read changed the database");
        if let Ok(page) = &outcome {
            *listed.lock().unwrap() += 1;
            prop_assert!(
                page.get_ref().orders.len() <= usize::try_from(page_size.unwrap_or(50)).unwrap_or(0)
            );
        }
        let code = outcome.err().map_or(Code::Ok, |status| status.code());
        prop_assert_eq!(
            code,
            expected,
            "ListOrders {:?} size {:?} token {:?}",
            user_id,
            page_size,
            page_token
        );
        Ok(())
    });
    assert!(
        *listed.lock().unwrap() > 0,
        "valid pages were generated and listed"
    );
    // CancelOrder: a malformed id or a version under 1 is INVALID_ARGUMENT;
    // then an unknown order NOT_FOUND; then a cancelled one
    // FAILED_PRECONDITION whatever the version; then a version that is not
    // the current one ABORTED. The known order's version (1) is generated
    // often, so that it is cancelled once and then refused.
    let cancelled = std::sync::Mutex::new(None::<i64>);
    run_in_order(
        48,
        (
            order_id,
            prop_oneof![2 => Just(1i64), 1 => 0..3i64, 1 => any::<i64>()],
        ),
        |(id, expected_version)| {
            let expected = match by_id(&id) {
                _ if expected_version < 1 => Code::InvalidArgument,
                Some(code) => code,
                None if cancelled.lock().unwrap().is_some() => Code::FailedPrecondition,
                None if expected_version != order.version => Code::Aborted,
                None => Code::Ok,
            };
            let request = pb::CancelOrderRequest {
                id: id.clone(),
                expected_version,
            };
            let before = state(&db);
            let outcome = block(app.client.clone().cancel_order(request))
                .map(|response| response.into_inner().order.unwrap());
            check_effect(outcome.is_ok(), &before, &state(&db))?;
            if let Ok(cancelled_order) = &outcome {
                prop_assert_eq!(cancelled_order.status, pb::OrderStatus::Cancelled as i32);
                prop_assert_eq!(&read_back(&app, &cancelled_order.id), cancelled_order);
                *cancelled.lock().unwrap() = Some(cancelled_order.version);
            }
            let code = outcome.err().map_or(Code::Ok, |status| status.code());
            prop_assert_eq!(
                code,
                expected,
                "CancelOrder {:?} at version {}",
                id,
                expected_version
            );
            Ok(())
        },
    );
    assert!(
        cancelled.lock().unwrap().is_some(),
        "a valid cancellation was generated and accepted"
    );
    app.create_order(known.parse().unwrap(), &[("sku-2", 1)]).await;
}

/// A message as anything might publish it: random body, type, message id
/// and headers, signed by the user service's key or not.
#[derive(Debug, Clone)]
struct Message {
    body: Vec<u8>,
    kind: Option<String>,
    message_id: Option<String>,
    headers: Vec<(String, AMQPValue)>,
    /// Signed as it is (with the aggregate headers and `app_id` a signature
    /// needs, where the message has none), when it can be.
    signed: bool,
}

fn message() -> impl Strategy<Value = Message> {
    let kind = proptest::option::of(prop_oneof![
        Just(UserCreated::TYPE_NAME.to_owned()),
        Just(UserUpdated::TYPE_NAME.to_owned()),
        Just(UserDeleted::TYPE_NAME.to_owned()),
        "[ -~]{0,30}",
    ]);
    let message_id = proptest::option::of(prop_oneof![
        Just(()).prop_map(|()| uuid::Uuid::new_v4().to_string()),
        "[ -~]{0,40}",
    ]);
    let value = prop_oneof![
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        "[ -~]{0,20}".prop_map(|s| AMQPValue::LongString(s.as_str().into())),
        any::<bool>().prop_map(AMQPValue::Boolean),
    ];
    let header_name = prop_oneof![
        Just("attempt".to_owned()),
        Just("aggregate_version".to_owned()),
        Just("traceparent".to_owned()),
        Just("original_exchange".to_owned()),
        "[a-z_]{1,12}",
    ];
    (
        proptest::collection::vec(any::<u8>(), 0..256),
        kind,
        message_id,
        proptest::collection::vec((header_name, value), 0..4),
        proptest::bool::weighted(0.8),
    )
        .prop_map(|(body, kind, message_id, headers, signed)| Message {
            body,
            kind,
            message_id,
            headers,
            signed,
        })
}

/// What the consumer must do with `message` (published with a valid
/// signature or not): the dead-letter reason it must give, or `None` when
/// the projection decides (applied, or refused as `rejected`, which a body
/// that disagrees with its headers is too).
fn expected_reason(message: &Message, signed: bool) -> Option<&'static str> {
    if !signed {
        return Some("unauthenticated");
    }
    let valid_id = message
        .message_id
        .as_deref()
        .is_some_and(|id| uuid::Uuid::try_parse(id).is_ok());
    if !valid_id {
        return Some("missing-message-id");
    }
    let kind = message.kind.as_deref().unwrap_or_default();
    if ![
        UserCreated::TYPE_NAME,
        UserUpdated::TYPE_NAME,
        UserDeleted::TYPE_NAME,
    ]
    .contains(&kind)
    {
        return Some("unknown-type");
    }
    match shop_contracts::describe_event(kind, &message.body) {
        Some(Ok(_)) => None,
        _ => Some("undecodable"),
    }
}

/// Where a message ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    Applied,
    DeadLettered(String),
}

/// Polls (up to 20 s) for where the message tagged `tag` ended.
async fn outcome_of(
    app: &TestApp,
    dlq: &shop_messaging::dlq::DeadLetters,
    message: &Message,
    tag: &str,
) -> Option<Outcome> {
    let id = message
        .message_id
        .as_deref()
        .and_then(|id| uuid::Uuid::try_parse(id).ok());
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < until {
        if let Some(id) = id
            && app.applications_of(id).await > 0
        {
            return Some(Outcome::Applied);
        }
        let letters = dlq.browse().await.ok()?;
        if let Some(letter) = letters
            .iter()
            .find(|letter| letter.headers.get("test_case").map(String::as_str) == Some(tag))
        {
            return Some(Outcome::DeadLettered(letter.reason.clone()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Each case publishes one message, tagged with a header of its own, to the
/// one consumer of the run, and waits for where it ended: the inbox (by its
/// id) or the dead-letter queue (by its tag). The reason must be the one
/// the message's faults call for, and the consumer must carry on; a failing
/// case shrinks to the smallest message that shows it.
#[tokio::test(flavor = "multi_thread")]
async fn any_message_on_the_queue_is_applied_or_dead_lettered_and_the_consumer_carries_on() {
    let app = spawn_app().await;
    let dlq = shop_messaging::dlq::DeadLetters::connect(
        &app.settings.host.amqp,
        &app.settings.service.user_events_queue,
    )
    .await
    .unwrap();
    run(48, message(), |message| {
        let tag = uuid::Uuid::new_v4().to_string();
        let mut properties = BasicProperties::default();
        if let Some(kind) = &message.kind {
            properties = properties.with_type(kind.as_str().into());
        }
        if let Some(id) = &message.message_id {
            properties = properties.with_message_id(id.as_str().into());
        }
        let mut headers = FieldTable::default();
        for (name, value) in &message.headers {
            headers.insert(name.as_str().into(), value.clone());
        }
        headers.insert("test_case".into(), AMQPValue::LongString(tag.as_str().into()));
        let mut properties = properties.with_headers(headers);
        let mut signed = false;
        if message.signed {
            let mut headers = properties.headers().clone().unwrap_or_default();
            for (name, value) in [
                ("aggregate_type", AMQPValue::LongString("user".into())),
                (
                    "aggregate_id",
                    AMQPValue::LongString(uuid::Uuid::new_v4().to_string().as_str().into()),
                ),
                ("aggregate_version", AMQPValue::LongLongInt(1)),
            ] {
                if !headers.inner().contains_key(name) {
                    headers.insert(name.into(), value);
                }
            }
            let signable = properties
                .clone()
                .with_app_id("test".into())
                .with_headers(headers);
            if let Ok(with_signature) =
                shop_testkit::keys::signing_key().sign_properties(signable, &message.body)
            {
                properties = with_signature;
                signed = true;
            }
        }
        block(app.publisher.publish_raw(
            &app.settings.service.user_events_exchange,
            UserCreated::ROUTING_KEY,
            &message.body,
            properties,
        ))
        .map_err(|error| TestCaseError::fail(format!("publishing the message: {error:#}")))?;

        let outcome = block(outcome_of(&app, &dlq, &message, &tag));
        let Some(outcome) = outcome else {
            return Err(TestCaseError::fail(
                "neither applied nor dead-lettered within 20 s",
            ));
        };
        match (expected_reason(&message, signed), &outcome) {
            (Some(expected), Outcome::DeadLettered(reason)) => {
                prop_assert_eq!(expected, reason.as_str());
            }
            (None, Outcome::Applied) => {}
            (None, Outcome::DeadLettered(reason)) => {
                prop_assert_eq!(
                    reason.as_str(),
                    "rejected",
                    "a decodable event is applied or rejected"
                );
            }
            (Some(expected), Outcome::Applied) => {
                prop_assert!(
                    false,
                    "applied, but it should have been dead-lettered as {}",
                    expected
                );
            }
        }
        Ok(())
    });
    dlq.close().await;

    // Still consuming after all of them.
    let good = app.known_user_id().await;
    assert!(app.known_user(good).await.is_some());
}
