//! Every RPC's success path and every documented error code.

use std::collections::HashSet;
use std::time::Duration;

use prost::Message as _;
use shop_contracts::Event as _;
use shop_contracts::order as pb;
use shop_messaging::wire::{header_i64, header_str};
use tonic::Code;
use uuid::Uuid;

use crate::helpers::{create_request, spawn_app, violated_fields};

#[tokio::test(flavor = "multi_thread")]
async fn create_order_returns_a_pending_order_at_version_one_and_writes_one_event() {
    let app = spawn_app().await;
    let user = app.known_user_id().await;

    let order = app.create_order(user, &[("sku-1", 2), ("sku-2", 1)]).await;

    assert!(Uuid::parse_str(&order.id).is_ok());
    assert_eq!(order.status, pb::OrderStatus::Pending as i32);
    assert_eq!(order.version, 1);
    assert_eq!(
        order
            .items
            .iter()
            .map(|i| (i.product_id.as_str(), i.quantity))
            .collect::<Vec<_>>(),
        [("sku-1", 2), ("sku-2", 1)]
    );
    assert_eq!(
        app.outbox().await,
        [(pb::OrderCreated::TYPE_NAME.to_owned(), order.id.clone(), 1)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn create_order_with_invalid_fields_lists_every_violation() {
    let app = spawn_app().await;

    let status = app
        .client
        .clone()
        .create_order(pb::CreateOrderRequest {
            user_id: "x".to_owned(),
            items: vec![
                pb::OrderItem {
                    product_id: String::new(),
                    quantity: 0,
                },
                pb::OrderItem {
                    product_id: "ok".to_owned(),
                    quantity: 1001,
                },
            ],
            request_id: "y".to_owned(),
        })
        .await
        .unwrap_err();
    let empty = app
        .client
        .clone()
        .create_order(create_request(Uuid::now_v7(), &[]))
        .await
        .unwrap_err();

    assert_eq!(
        violated_fields(&status),
        [
            "user_id",
            "request_id",
            "items[0].product_id",
            "items[0].quantity",
            "items[1].quantity"
        ]
    );
    assert_eq!(violated_fields(&empty), ["items"]);
    assert!(app.outbox().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn create_order_with_the_same_request_id_returns_the_same_order_once() {
    let app = spawn_app().await;
    let user = app.known_user_id().await;
    let request = pb::CreateOrderRequest {
        request_id: Uuid::new_v4().to_string(),
        ..create_request(user, &[("sku-1", 1)])
    };

    let first = app
        .client
        .clone()
        .create_order(request.clone())
        .await
        .unwrap()
        .into_inner()
        .order;
    let second = app
        .client
        .clone()
        .create_order(request.clone())
        .await
        .unwrap()
        .into_inner()
        .order;
    let other = app
        .client
        .clone()
        .create_order(pb::CreateOrderRequest {
            items: vec![pb::OrderItem {
                product_id: "sku-2".to_owned(),
                quantity: 1,
            }],
            ..request
        })
        .await
        .unwrap_err();

    assert_eq!(first, second);
    assert_eq!(app.outbox().await.len(), 1);
    assert_eq!(other.code(), Code::AlreadyExists);
}

/// Two different item lists never look alike to the request-id check,
/// whatever characters product ids carry: a reused request id with other
/// items is refused, not answered with the first order.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_id_reused_with_items_that_spell_the_same_text_is_refused() {
    let app = spawn_app().await;
    let user = app.known_user_id().await;
    let request_id = Uuid::new_v4().to_string();
    let first = pb::CreateOrderRequest {
        request_id: request_id.clone(),
        ..create_request(user, &[("a:1|b", 2)])
    };
    let lookalike = pb::CreateOrderRequest {
        request_id,
        ..create_request(user, &[("a", 1), ("b", 2)])
    };

    app.client.clone().create_order(first).await.unwrap();
    let reused = app.client.clone().create_order(lookalike).await.unwrap_err();

    assert_eq!(reused.code(), Code::AlreadyExists, "{reused:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn get_order_returns_it_and_errors_for_unknown_and_malformed_ids() {
    let app = spawn_app().await;
    let user = app.known_user_id().await;
    let order = app.create_order(user, &[("sku-1", 3)]).await;
    let mut client = app.client.clone();

    let got = client
        .get_order(pb::GetOrderRequest { id: order.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    let missing = client
        .get_order(pb::GetOrderRequest {
            id: Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    let malformed = client
        .get_order(pb::GetOrderRequest { id: "1".to_owned() })
        .await
        .unwrap_err();

    assert_eq!(got, order);
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(violated_fields(&malformed), ["id"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn list_orders_pages_through_a_users_orders_only() {
    let app = spawn_app().await;
    let user = app.known_user_id().await;
    let other = app.known_user_id().await;
    let mut mine = Vec::new();
    for i in 0..5 {
        mine.push(app.create_order(user, &[(&format!("sku-{i}"), 1)]).await.id);
    }
    app.create_order(other, &[("sku-x", 1)]).await;
    let mut client = app.client.clone();

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_orders(pb::ListOrdersRequest {
                user_id: user.to_string(),
                page_size: Some(2),
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.orders.iter().map(|o| o.id.clone()));
        assert!(page.orders.iter().all(|o| o.items.len() == 1));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let invalid = client
        .list_orders(pb::ListOrdersRequest {
            user_id: String::new(),
            page_size: Some(0),
            page_token: "%%".to_owned(),
        })
        .await
        .unwrap_err();

    assert_eq!(seen, mine);
    assert_eq!(violated_fields(&invalid), ["user_id", "page_size", "page_token"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_order_cancels_once_and_refuses_twice_stale_and_unknown() {
    let app = spawn_app().await;
    let user = app.known_user_id().await;
    let order = app.create_order(user, &[("sku-1", 1)]).await;
    let mut client = app.client.clone();
    let cancel = |id: &str, version| pb::CancelOrderRequest {
        id: id.to_owned(),
        expected_version: version,
    };

    let stale = client.cancel_order(cancel(&order.id, 2)).await.unwrap_err();
    let cancelled = client
        .cancel_order(cancel(&order.id, 1))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    let twice = client.cancel_order(cancel(&order.id, 2)).await.unwrap_err();
    let unknown = client
        .cancel_order(cancel(&Uuid::now_v7().to_string(), 1))
        .await
        .unwrap_err();
    let invalid = client.cancel_order(cancel("", 0)).await.unwrap_err();

    assert_eq!(stale.code(), Code::Aborted);
    assert_eq!(cancelled.status, pb::OrderStatus::Cancelled as i32);
    assert_eq!(cancelled.version, 2);
    assert_eq!(cancelled.items, order.items);
    assert_eq!(twice.code(), Code::FailedPrecondition);
    assert!(twice.message().contains("already cancelled"));
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(violated_fields(&invalid), ["id", "expected_version"]);
    assert_eq!(
        app.outbox().await,
        [
            (pb::OrderCreated::TYPE_NAME.to_owned(), order.id.clone(), 1),
            (pb::OrderCancelled::TYPE_NAME.to_owned(), order.id.clone(), 2),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn order_events_are_published_to_the_order_exchange() {
    let mut app = spawn_app().await;
    let mut probe = app
        .broker
        .probe(&app.settings.service.events_exchange, "#")
        .await
        .unwrap();
    let user = app.known_user_id().await;

    let order = app.create_order(user, &[("sku-9", 4)]).await;
    app.client
        .clone()
        .cancel_order(pb::CancelOrderRequest {
            id: order.id.clone(),
            expected_version: 1,
        })
        .await
        .unwrap();

    // Every row marked and the service stopped: nothing more can come.
    shop_testkit::eventually("every row marked", Duration::from_secs(15), || async {
        (app.unpublished().await == 0).then_some(())
    })
    .await;
    app.stop().await;
    let deliveries = probe.expect(2, Duration::from_secs(15)).await;
    assert_eq!(deliveries[0].routing_key.as_str(), pb::OrderCreated::ROUTING_KEY);
    assert_eq!(
        deliveries[1].routing_key.as_str(),
        pb::OrderCancelled::ROUTING_KEY
    );
    let created = pb::OrderCreated::decode(&*deliveries[0].data).unwrap();
    assert_eq!(
        (created.order_id.as_str(), created.user_id.as_str()),
        (order.id.as_str(), user.to_string().as_str())
    );
    assert_eq!(created.items, order.items);
    let cancelled = pb::OrderCancelled::decode(&*deliveries[1].data).unwrap();
    assert_eq!(cancelled.version, 2);
    let ids: HashSet<_> = deliveries
        .iter()
        .map(|d| d.properties.message_id().clone())
        .collect();
    assert_eq!(ids.len(), 2);
    for delivery in &deliveries {
        let headers = delivery.properties.headers().as_ref().unwrap();
        assert_eq!(header_str(headers, "aggregate_type"), Some("order"));
        assert_eq!(header_str(headers, "aggregate_id"), Some(order.id.as_str()));
        assert!(header_i64(headers, "aggregate_version").is_some());
        assert_eq!(
            delivery.properties.app_id().as_ref().unwrap().as_str(),
            "order-service"
        );
    }
}
