//! Any request, however malformed, gets one of the documented codes; any
//! message on the consumed queue is applied or dead-lettered with a reason,
//! and the consumer keeps going.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use shop_contracts::Event as _;
use shop_contracts::order as pb;
use shop_contracts::user::{UserCreated, UserDeleted, UserUpdated};
use tonic::Code;

use crate::helpers::spawn_app;

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

fn block<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

fn check(outcome: Result<(), tonic::Status>, allowed: &[Code]) -> Result<(), TestCaseError> {
    let code = outcome.err().map_or(Code::Ok, |status| status.code());
    prop_assert!(allowed.contains(&code), "code {code:?} is not one of {allowed:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn any_order_request_gets_a_documented_code() {
    let app = spawn_app().await;
    let known = app.known_user_id().await.to_string();
    let order = app.create_order(known.parse().unwrap(), &[("sku-1", 1)]).await;
    let user = prop_oneof![Just(known.clone()), text()];
    let item = || {
        (text(), prop_oneof![1..=1000i32, any::<i32>()])
            .prop_map(|(product_id, quantity)| pb::OrderItem { product_id, quantity })
    };
    let items = prop_oneof![
        proptest::collection::vec(item(), 0..4),
        proptest::collection::vec(item(), 95..110),
    ];
    run(
        64,
        (user.clone(), items, text()),
        |(user_id, items, request_id)| {
            let request = pb::CreateOrderRequest {
                user_id,
                items,
                request_id,
            };
            check(
                block(app.client.clone().create_order(request)).map(drop),
                &[
                    Code::Ok,
                    Code::InvalidArgument,
                    Code::FailedPrecondition,
                    Code::AlreadyExists,
                ],
            )
        },
    );
    let order_id = prop_oneof![Just(order.id.clone()), text()];
    run(48, order_id.clone(), |id| {
        check(
            block(app.client.clone().get_order(pb::GetOrderRequest { id })).map(drop),
            &[Code::Ok, Code::InvalidArgument, Code::NotFound],
        )
    });
    run(
        48,
        (user, proptest::option::of(any::<i32>()), text()),
        |(user_id, page_size, page_token)| {
            let request = pb::ListOrdersRequest {
                user_id,
                page_size,
                page_token,
            };
            check(
                block(app.client.clone().list_orders(request)).map(drop),
                &[Code::Ok, Code::InvalidArgument],
            )
        },
    );
    run(48, (order_id, any::<i64>()), |(id, expected_version)| {
        let request = pb::CancelOrderRequest { id, expected_version };
        check(
            block(app.client.clone().cancel_order(request)).map(drop),
            &[
                Code::Ok,
                Code::InvalidArgument,
                Code::NotFound,
                Code::Aborted,
                Code::FailedPrecondition,
            ],
        )
    });
    app.create_order(known.parse().unwrap(), &[("sku-2", 1)]).await;
}

/// A message as anything might publish it: random body, type, message id
/// and headers.
#[derive(Debug, Clone)]
struct Message {
    body: Vec<u8>,
    kind: Option<String>,
    message_id: Option<String>,
    headers: Vec<(String, AMQPValue)>,
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
    )
        .prop_map(|(body, kind, message_id, headers)| Message {
            body,
            kind,
            message_id,
            headers,
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn any_message_on_the_queue_is_applied_or_dead_lettered_and_the_consumer_carries_on() {
    let app = spawn_app().await;
    let mut runner = TestRunner::new(Config {
        cases: 1,
        failure_persistence: None,
        ..Config::default()
    });
    let messages = proptest::collection::vec(message(), 100)
        .new_tree(&mut runner)
        .unwrap();
    let messages = proptest::strategy::ValueTree::current(&messages);

    for message in &messages {
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
        app.publisher
            .publish_raw(
                &app.settings.service.user_events_exchange,
                UserCreated::ROUTING_KEY,
                &message.body,
                properties.with_headers(headers),
            )
            .await
            .unwrap();
    }
    // The consumer is still alive: a good event after all of them is applied.
    let good = app.known_user_id().await;

    let dlq = shop_messaging::dlq::DeadLetters::connect(
        &app.settings.host.amqp,
        &app.settings.service.user_events_queue,
    )
    .await
    .unwrap();
    let random_ids_applied = |inbox: i64| inbox - 1; // minus the good event
    let (letters, inbox) =
        shop_testkit::eventually("every message accounted for", Duration::from_secs(60), || async {
            let letters = dlq.browse().await.ok()?;
            let inbox = app.inbox_count().await;
            (letters.len() as i64 + random_ids_applied(inbox) == messages.len() as i64)
                .then_some((letters, inbox))
        })
        .await;
    dlq.close().await;

    assert!(app.known_user(good).await.is_some());
    for letter in &letters {
        assert!(
            [
                "missing-message-id",
                "unknown-type",
                "undecodable",
                "rejected",
                "max-attempts"
            ]
            .contains(&letter.reason.as_str()),
            "unexpected reason {}",
            letter.reason
        );
        assert!(letter.error.as_deref().is_some_and(|e| !e.is_empty()));
    }
    assert_eq!(letters.len() as i64 + random_ids_applied(inbox), 100);
}
