//! Nobody unnamed: every RPC of both services, as the contracts list them,
//! refuses a caller without credentials; health answers everyone; a user
//! reaches only its own data in either service.

use prost::Message as _;
use shop_contracts::order as order_pb;
use shop_contracts::order::order_service_client::OrderServiceClient;
use shop_contracts::user as user_pb;
use shop_contracts::user::user_service_client::UserServiceClient;
use shop_testkit::{Bearer, TestKeys};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::system::{WAIT, channel, start};

/// Every `(service, method)` of the contracts, from their descriptors: a
/// new RPC is in this list the moment it is in a `.proto`.
fn every_rpc() -> Vec<(String, String)> {
    let descriptors =
        shop_contracts::prost_types::FileDescriptorSet::decode(shop_contracts::FILE_DESCRIPTOR_SET).unwrap();
    descriptors
        .file
        .iter()
        .flat_map(|file| {
            file.service.iter().flat_map(move |service| {
                let name = format!("{}.{}", file.package(), service.name());
                service
                    .method
                    .iter()
                    .map(move |method| (name.clone(), method.name().to_owned()))
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_of_both_services_refuses_a_caller_without_credentials_and_health_answers() {
    let system = start(false).await;
    let rpcs = every_rpc();
    let served: Vec<_> = rpcs
        .iter()
        .map(|(service, method)| {
            let addr = match service.as_str() {
                "shop.user.v1.UserService" => system.user_addr,
                "shop.order.v1.OrderService" => system.order_addr,
                other => panic!("the contracts have a service no test serves: {other}"),
            };
            (addr, format!("/{service}/{method}"))
        })
        .collect();

    let mut refused = Vec::new();
    for (addr, path) in &served {
        // An empty message: the call must be refused before it is read.
        let mut grpc = tonic::client::Grpc::new(shop_testkit::AuthChannel::new(
            channel(*addr).await,
            Bearer::none(),
        ));
        grpc.ready().await.unwrap();
        let status = grpc
            .unary(
                tonic::Request::new(()),
                http::uri::PathAndQuery::try_from(path.as_str()).unwrap(),
                tonic_prost::ProstCodec::<(), ()>::default(),
            )
            .await
            .unwrap_err();
        refused.push((path.clone(), status.code()));
    }
    let mut serving = Vec::new();
    for addr in [system.user_addr, system.order_addr] {
        let status = HealthClient::new(channel(addr).await)
            .check(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner()
            .status;
        serving.push(status);
    }

    assert!(rpcs.len() >= 9, "{rpcs:?}");
    for (path, code) in &refused {
        assert_eq!(*code, Code::Unauthenticated, "{path}");
    }
    assert_eq!(serving, [ServingStatus::Serving as i32; 2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_token_reaches_that_user_and_its_orders_in_both_services_and_nothing_else() {
    let system = start(true).await;
    let create = |email: &str| user_pb::CreateUserRequest {
        email: email.to_owned(),
        name: "Someone".to_owned(),
        request_id: String::new(),
    };
    let ada = system
        .users
        .clone()
        .create_user(create("ada@example.com"))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let grace = system
        .users
        .clone()
        .create_user(create("grace@example.com"))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let order_for = |user: &str| order_pb::CreateOrderRequest {
        user_id: user.to_owned(),
        items: vec![order_pb::OrderItem {
            product_id: "sku-1".to_owned(),
            quantity: 1,
        }],
        request_id: String::new(),
    };
    // The order service knows both once their events arrived.
    let graces_order = shop_testkit::eventually("grace known to the order service", WAIT, || async {
        system
            .orders
            .clone()
            .create_order(order_for(&grace.id))
            .await
            .ok()
    })
    .await
    .into_inner()
    .order
    .unwrap();
    let token = TestKeys::shared().user_token(ada.id.parse().unwrap());
    let users = UserServiceClient::new(shop_testkit::auth::with_token(
        channel(system.user_addr).await,
        &token,
    ));
    let orders = OrderServiceClient::new(shop_testkit::auth::with_token(
        channel(system.order_addr).await,
        &token,
    ));

    let own_user = users
        .clone()
        .get_user(user_pb::GetUserRequest { id: ada.id.clone() })
        .await;
    let other_user = users
        .clone()
        .get_user(user_pb::GetUserRequest { id: grace.id.clone() })
        .await
        .unwrap_err();
    let own_order = shop_testkit::eventually("ada known to the order service", WAIT, || async {
        orders.clone().create_order(order_for(&ada.id)).await.ok()
    })
    .await;
    let other_order = orders
        .clone()
        .get_order(order_pb::GetOrderRequest {
            id: graces_order.id.clone(),
        })
        .await
        .unwrap_err();
    let other_orders = orders
        .clone()
        .list_orders(order_pb::ListOrdersRequest {
            user_id: grace.id.clone(),
            ..order_pb::ListOrdersRequest::default()
        })
        .await
        .unwrap_err();

    assert!(own_user.is_ok(), "{own_user:?}");
    assert_eq!(own_order.into_inner().order.unwrap().user_id, ada.id);
    for (what, status) in [
        ("another user", other_user),
        ("another user's order", other_order),
        ("another user's orders", other_orders),
    ] {
        assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
    }
}
