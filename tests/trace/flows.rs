//! The span tree of a CreateUser and of a CreateOrder, from the client's
//! traceparent to the last database write of the consumer.

use std::time::Duration;

use diesel_async::AsyncPgConnection;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use shop_contracts::order::{self as order_pb, OrderCreated};
use shop_contracts::user as user_pb;
use shop_messaging::consumer::{Consumer, ConsumerConfig, EventMeta, Handler, HandlerError};
use shop_testkit::Running;

use crate::collector::{RUNTIME, Seen, install, wait_for_spans};
use crate::system::start;

fn random_hex(bytes: usize) -> String {
    uuid::Uuid::new_v4().simple().to_string()[..bytes * 2].to_owned()
}

fn the<'a>(spans: &'a [Seen], name: &str) -> &'a Seen {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "exactly one span {name} in {:#?}", names(spans));
    found[0]
}

fn names(spans: &[Seen]) -> Vec<(&str, &str, &str)> {
    spans
        .iter()
        .map(|s| (s.name.as_str(), s.span_id.as_str(), s.parent_span_id.as_str()))
        .collect()
}

fn assert_child(child: &Seen, parent: &Seen) {
    assert_eq!(
        child.parent_span_id, parent.span_id,
        "{} should be a child of {}",
        child.name, parent.name
    );
}

fn attr<'a>(span: &'a Seen, key: &str) -> &'a str {
    span.attributes
        .get(key)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("{} has no attribute {key}: {:?}", span.name, span.attributes))
}

fn traced<T>(message: T, trace_id: &str, parent_span_id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_span_id}-01").parse().unwrap(),
    );
    request
}

#[test]
fn a_create_user_call_is_one_trace_down_to_the_order_services_projection_write() {
    install();
    RUNTIME.block_on(async {
        let system = start(true).await;
        let (trace_id, client_span) = (random_hex(16), random_hex(8));
        let exchange = system.user_settings.service.events_exchange.clone();
        let queue = system.order_settings.service.user_events_queue.clone();

        system
            .users
            .clone()
            .create_user(traced(
                user_pb::CreateUserRequest {
                    email: "traced@example.com".to_owned(),
                    name: "Traced".to_owned(),
                    request_id: String::new(),
                },
                &trace_id,
                &client_span,
            ))
            .await
            .unwrap();

        let publish_name = format!("{exchange} publish");
        let process_name = format!("{queue} process");
        let spans = wait_for_spans(
            &trace_id,
            &[
                "shop.user.v1.UserService/CreateUser",
                "db.create_user",
                &publish_name,
                &process_name,
                "db.transaction",
                "projection.upsert_user",
            ],
        )
        .await;

        let server = the(&spans, "shop.user.v1.UserService/CreateUser");
        assert_eq!(server.parent_span_id, client_span, "continues the caller's span");
        assert_eq!(server.kind, SpanKind::Server as i32);
        assert_eq!(attr(server, "rpc.system"), "grpc");
        assert_eq!(attr(server, "rpc.service"), "shop.user.v1.UserService");
        assert_eq!(attr(server, "rpc.method"), "CreateUser");
        assert_eq!(attr(server, "rpc.grpc.status_code"), "0");

        let command = the(&spans, "db.create_user");
        assert_child(command, server);
        assert_eq!(attr(command, "db.system"), "postgresql");

        let publish = the(&spans, &publish_name);
        assert_child(publish, command);
        assert_eq!(publish.kind, SpanKind::Producer as i32);
        assert_eq!(attr(publish, "messaging.system"), "rabbitmq");
        assert_eq!(attr(publish, "messaging.destination.name"), exchange);
        assert_eq!(
            attr(publish, "messaging.rabbitmq.destination.routing_key"),
            "user.created"
        );
        let event_id = attr(publish, "messaging.message.id").to_owned();

        let process = the(&spans, &process_name);
        assert_child(process, publish);
        assert_eq!(process.kind, SpanKind::Consumer as i32);
        assert_eq!(attr(process, "messaging.system"), "rabbitmq");
        assert_eq!(attr(process, "messaging.operation.type"), "process");
        assert_eq!(attr(process, "messaging.destination.name"), queue);
        assert!(attr(process, "messaging.message.id").contains(&event_id));

        assert_child(the(&spans, "db.transaction"), process);
        assert_child(the(&spans, "projection.upsert_user"), process);
    });
}

/// A consumer of `order.events` the test runs, as another service would.
struct NoteOrder;

#[async_trait::async_trait]
impl Handler<OrderCreated> for NoteOrder {
    #[tracing::instrument(name = "test.note_order", skip_all)]
    async fn handle(
        &self,
        _: &mut AsyncPgConnection,
        _: OrderCreated,
        _: &EventMeta,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[test]
fn a_create_order_call_is_one_trace_through_order_events_to_its_consumer() {
    install();
    RUNTIME.block_on(async {
        let system = start(true).await;
        let exchange = system.order_settings.service.events_exchange.clone();
        let queue = system.broker.queue("trace.order-events");
        let mut consumer_config = ConsumerConfig::new(exchange.clone(), queue.clone());
        consumer_config.trusted_keys = shop_testkit::keys::trusted_keys();
        let consumer = Consumer::new(
            consumer_config,
            shop_database::pool(&system.order_settings.host.database).unwrap(),
            system.order_settings.host.amqp.clone(),
        )
        .subscribe::<OrderCreated, _>(NoteOrder);
        system.broker.track_topology(&consumer.topology());
        let mut connected = consumer.connected();
        let _consumer = Running::spawn(|shutdown| consumer.run(shutdown));
        tokio::time::timeout(Duration::from_secs(10), connected.wait_for(|c| *c))
            .await
            .unwrap()
            .unwrap();
        let user = system
            .users
            .clone()
            .create_user(user_pb::CreateUserRequest {
                email: "orders@example.com".to_owned(),
                name: "Orders".to_owned(),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        let orders = system.orders.clone();
        let request = |user_id: &str| order_pb::CreateOrderRequest {
            user_id: user_id.to_owned(),
            items: vec![order_pb::OrderItem {
                product_id: "sku-1".to_owned(),
                quantity: 1,
            }],
            request_id: String::new(),
        };
        // Untraced calls until the user is known, so the traced call below
        // is the only one in its trace.
        shop_testkit::eventually(
            "the order service to know the user",
            Duration::from_secs(20),
            || {
                let mut orders = orders.clone();
                let request = request(&user.id);
                async move { orders.create_order(request).await.ok() }
            },
        )
        .await;
        let (trace_id, client_span) = (random_hex(16), random_hex(8));

        orders
            .clone()
            .create_order(traced(request(&user.id), &trace_id, &client_span))
            .await
            .unwrap();

        let publish_name = format!("{exchange} publish");
        let process_name = format!("{queue} process");
        let spans = wait_for_spans(
            &trace_id,
            &[
                "shop.order.v1.OrderService/CreateOrder",
                "db.create_order",
                &publish_name,
                &process_name,
                "test.note_order",
            ],
        )
        .await;
        let server = the(&spans, "shop.order.v1.OrderService/CreateOrder");
        assert_eq!(server.parent_span_id, client_span);
        assert_eq!(server.kind, SpanKind::Server as i32);
        assert_eq!(attr(server, "rpc.method"), "CreateOrder");
        assert_eq!(attr(server, "rpc.grpc.status_code"), "0");
        let command = the(&spans, "db.create_order");
        assert_child(command, server);
        let publish = the(&spans, &publish_name);
        assert_child(publish, command);
        assert_eq!(publish.kind, SpanKind::Producer as i32);
        assert_eq!(
            attr(publish, "messaging.rabbitmq.destination.routing_key"),
            "order.created"
        );
        let process = the(&spans, &process_name);
        assert_child(process, publish);
        assert_eq!(process.kind, SpanKind::Consumer as i32);
        assert_child(the(&spans, "db.transaction"), process);
        assert_child(the(&spans, "test.note_order"), process);
    });
}
