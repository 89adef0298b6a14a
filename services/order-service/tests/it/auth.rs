//! Who may touch which orders: a user only its own, a service all of them;
//! permissions per method; health without credentials.

use shop_contracts::order as pb;
use shop_contracts::order::order_service_client::OrderServiceClient;
use shop_host::auth::Permission;
use shop_testkit::{AuthChannel, Bearer, TestKeys};
use tonic::Code;
use uuid::Uuid;

use crate::helpers::{TestApp, channel, create_request, spawn_app};

async fn client(app: &TestApp, token: &str) -> OrderServiceClient<AuthChannel> {
    OrderServiceClient::new(shop_testkit::auth::with_token(channel(app.addr).await, token))
}

fn get(id: &str) -> pb::GetOrderRequest {
    pb::GetOrderRequest { id: id.to_owned() }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_places_reads_lists_and_cancels_only_its_own_orders() {
    let app = spawn_app().await;
    let ada = app.known_user_id().await;
    let grace = app.known_user_id().await;
    let graces_order = app.create_order(grace, &[("sku-1", 1)]).await;
    let outbox = app.outbox().await;
    let as_ada = client(&app, &TestKeys::shared().user_token(ada)).await;

    let order_for_grace = as_ada
        .clone()
        .create_order(create_request(grace, &[("sku-9", 9)]))
        .await
        .unwrap_err();
    let read_graces = as_ada.clone().get_order(get(&graces_order.id)).await.unwrap_err();
    let list_graces = as_ada
        .clone()
        .list_orders(pb::ListOrdersRequest {
            user_id: grace.to_string(),
            ..pb::ListOrdersRequest::default()
        })
        .await
        .unwrap_err();
    let cancel_graces = as_ada
        .clone()
        .cancel_order(pb::CancelOrderRequest {
            id: graces_order.id.clone(),
            expected_version: 1,
        })
        .await
        .unwrap_err();
    let untouched = app.outbox().await;
    let own = as_ada
        .clone()
        .create_order(create_request(ada, &[("sku-2", 2)]))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    let read_own = as_ada.clone().get_order(get(&own.id)).await;
    let listed_own = as_ada
        .clone()
        .list_orders(pb::ListOrdersRequest {
            user_id: ada.to_string(),
            ..pb::ListOrdersRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .orders;
    let cancelled_own = as_ada
        .clone()
        .cancel_order(pb::CancelOrderRequest {
            id: own.id.clone(),
            expected_version: 1,
        })
        .await;
    let missing = as_ada
        .clone()
        .get_order(get(&Uuid::now_v7().to_string()))
        .await
        .unwrap_err();

    for (what, status) in [
        ("placing an order for another user", order_for_grace),
        ("reading another user's order", read_graces),
        ("listing another user's orders", list_graces),
        ("cancelling another user's order", cancel_graces),
    ] {
        assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
    }
    assert_eq!(untouched, outbox, "nothing refused wrote an event");
    let graces_now = app
        .client
        .clone()
        .get_order(get(&graces_order.id))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(graces_now, graces_order, "grace's order is as it was");
    assert_eq!(read_own.unwrap().into_inner().order.unwrap(), own);
    assert_eq!(listed_own, std::slice::from_ref(&own));
    assert_eq!(
        cancelled_own.unwrap().into_inner().order.unwrap().status,
        pb::OrderStatus::Cancelled as i32
    );
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_orders_read_token_cannot_place_or_cancel_and_a_missing_one_is_unauthenticated() {
    let app = spawn_app().await;
    let user = app.known_user_id().await;
    let order = app.create_order(user, &[("sku-1", 1)]).await;
    let outbox = app.outbox().await;
    let reader = client(&app, &TestKeys::shared().token_with(&[Permission::OrdersRead])).await;
    let users_only = client(
        &app,
        &TestKeys::shared().token_with(&[Permission::UsersRead, Permission::UsersWrite]),
    )
    .await;
    let mut anonymous = OrderServiceClient::new(AuthChannel::new(channel(app.addr).await, Bearer::none()));

    let read = reader.clone().get_order(get(&order.id)).await;
    let place = reader
        .clone()
        .create_order(create_request(user, &[("sku-2", 1)]))
        .await
        .unwrap_err();
    let cancel = reader
        .clone()
        .cancel_order(pb::CancelOrderRequest {
            id: order.id.clone(),
            expected_version: 1,
        })
        .await
        .unwrap_err();
    let other_service = users_only.clone().get_order(get(&order.id)).await.unwrap_err();
    let nobody = anonymous.get_order(get(&order.id)).await.unwrap_err();

    assert!(read.is_ok(), "{read:?}");
    assert_eq!(place.code(), Code::PermissionDenied, "{place:?}");
    assert_eq!(cancel.code(), Code::PermissionDenied, "{cancel:?}");
    assert_eq!(other_service.code(), Code::PermissionDenied, "{other_service:?}");
    assert_eq!(nobody.code(), Code::Unauthenticated, "{nobody:?}");
    assert_eq!(app.outbox().await, outbox, "nothing changed");
}
