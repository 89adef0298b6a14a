//! Health: the API follows its database, the consumer has a name of its
//! own; reflection lists the service.

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

async fn status(health: &mut HealthClient<tonic::transport::Channel>, service: &str) -> i32 {
    health
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// The order API needs only PostgreSQL: a broker it cannot reach leaves it
/// SERVING (a readiness probe keeps it in the Service), while the
/// consumer's own health name says it is not connected.
#[tokio::test(flavor = "multi_thread")]
async fn while_the_consumer_cannot_connect_the_api_serves_and_only_the_consumer_reports_not_serving() {
    let refusing = shop_testkit::TcpProxy::start(shop_testkit::amqp_addr().await)
        .await
        .unwrap();
    refusing.refuse(true);
    let app = spawn_app_with(|settings| {
        settings.host.amqp = AmqpConfig::new(refusing.url_for(&shop_testkit::amqp_url()));
        settings.host.relay_enabled = false;
    })
    .await;
    let mut health = HealthClient::new(channel(app.addr).await);

    // The consumer has tried, and been refused, twice.
    shop_testkit::eventually("two refused attempts", Duration::from_secs(10), || async {
        (refusing.refused() >= 2).then_some(())
    })
    .await;
    for service in ["", "shop.order.v1.OrderService"] {
        assert_eq!(
            status(&mut health, service).await,
            ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }
    assert_eq!(
        status(&mut health, order_service::app::CONSUMER_HEALTH).await,
        ServingStatus::NotServing as i32
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_consumer_reports_serving_once_connected() {
    let app = spawn_app().await;
    let mut health = HealthClient::new(channel(app.addr).await);

    for service in [
        "",
        "shop.order.v1.OrderService",
        order_service::app::CONSUMER_HEALTH,
    ] {
        assert_eq!(
            status(&mut health, service).await,
            ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }
}

/// A database that refuses writes takes the API out of rotation (its calls
/// would only fail), and brings it back when it takes writes again.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_is_not_serving_while_its_database_is_read_only() {
    let app = spawn_app().await;
    let mut health = HealthClient::new(channel(app.addr).await);

    app.db.set_read_only(true).await.unwrap();
    shop_testkit::eventually("NOT_SERVING while read-only", Duration::from_secs(20), || {
        let mut health = health.clone();
        async move { (status(&mut health, "").await == ServingStatus::NotServing as i32).then_some(()) }
    })
    .await;
    app.db.set_read_only(false).await.unwrap();
    shop_testkit::eventually("SERVING again", Duration::from_secs(20), || {
        let mut health = health.clone();
        async move { (status(&mut health, "").await == ServingStatus::Serving as i32).then_some(()) }
    })
    .await;
    assert_eq!(
        status(&mut health, "shop.order.v1.OrderService").await,
        ServingStatus::Serving as i32
    );
}

/// Connections to PostgreSQL dropped and new ones refused: the API is
/// NOT_SERVING, and SERVING again once the database is reachable.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_is_not_serving_while_its_database_is_unreachable() {
    let proxy = shop_testkit::TcpProxy::start(shop_testkit::postgres_addr().await)
        .await
        .unwrap();
    let app = spawn_app_with(|settings| {
        use secrecy::ExposeSecret as _;
        let url = proxy.url_for(settings.host.database.url.expose_secret());
        settings.host.database.url = url.into();
        settings.host.database.acquire_timeout = Duration::from_secs(1);
    })
    .await;
    let mut health = HealthClient::new(channel(app.addr).await);
    assert_eq!(status(&mut health, "").await, ServingStatus::Serving as i32);

    proxy.refuse(true);
    proxy.cut();
    shop_testkit::eventually("NOT_SERVING while unreachable", Duration::from_secs(30), || {
        let mut health = health.clone();
        async move { (status(&mut health, "").await == ServingStatus::NotServing as i32).then_some(()) }
    })
    .await;
    assert_eq!(
        status(&mut health, "shop.order.v1.OrderService").await,
        ServingStatus::NotServing as i32
    );
    proxy.refuse(false);
    shop_testkit::eventually("SERVING again", Duration::from_secs(30), || {
        let mut health = health.clone();
        async move { (status(&mut health, "").await == ServingStatus::Serving as i32).then_some(()) }
    })
    .await;
    assert_eq!(
        status(&mut health, "shop.order.v1.OrderService").await,
        ServingStatus::Serving as i32
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_the_order_service() {
    let app = spawn_app().await;
    // Any authenticated caller, whatever its permissions.
    let mut client = ServerReflectionClient::new(shop_testkit::auth::with_token(
        channel(app.addr).await,
        &shop_testkit::TestKeys::shared().token_with(&[]),
    ));

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
