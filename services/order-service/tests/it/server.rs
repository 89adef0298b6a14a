//! Health follows the consumer; reflection lists the service.

use std::time::Duration;

use futures::StreamExt as _;
use shop_messaging::AmqpConfig;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::helpers::{channel, spawn_app, spawn_app_with};

#[tokio::test(flavor = "multi_thread")]
async fn health_is_not_serving_while_the_consumer_cannot_connect() {
    let app = spawn_app_with(|settings| {
        settings.host.amqp = AmqpConfig::new("amqp://guest:guest@127.0.0.1:1/%2f");
        settings.host.relay_enabled = false;
    })
    .await;
    let mut health = HealthClient::new(channel(app.addr).await);

    tokio::time::sleep(Duration::from_millis(500)).await;
    for service in ["", "shop.order.v1.OrderService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::NotServing as i32, "service {service:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_is_serving_once_the_consumer_is_connected() {
    let app = spawn_app().await;
    let mut health = HealthClient::new(channel(app.addr).await);

    let status = health
        .check(HealthCheckRequest {
            service: "shop.order.v1.OrderService".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;

    assert_eq!(status, ServingStatus::Serving as i32);
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_the_order_service() {
    let app = spawn_app().await;
    let mut client = ServerReflectionClient::new(channel(app.addr).await);

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let response = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner()
        .next()
        .await
        .unwrap()
        .unwrap();

    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.iter().any(|n| n == "shop.order.v1.OrderService"),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n == "grpc.health.v1.Health"), "{names:?}");
}
