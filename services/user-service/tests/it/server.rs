//! Reflection, health and graceful shutdown.

use std::time::Duration;

use futures::StreamExt as _;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::helpers::{TestApp, spawn_app};

async fn channel(app: &TestApp) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn reflect(
    client: &mut ServerReflectionClient<shop_testkit::AuthChannel>,
    request: MessageRequest,
) -> MessageResponse {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    response.message_response.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_the_user_service_health_and_reflection_and_describes_each() {
    let app = spawn_app().await;
    // Reflection answers any authenticated caller, with or without
    // permissions (GRPC_REFLECTION=authenticated, the default).
    let mut client = ServerReflectionClient::new(shop_testkit::auth::with_token(
        channel(&app).await,
        &shop_testkit::TestKeys::shared().token_with(&[]),
    ));

    let MessageResponse::ListServicesResponse(list) =
        reflect(&mut client, MessageRequest::ListServices(String::new())).await
    else {
        panic!("unexpected reflection response");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "shop.user.v1.UserService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    // What `grpcurl describe` and dynamic clients ask next: the file that
    // defines each listed service.
    for name in &names {
        let response = reflect(&mut client, MessageRequest::FileContainingSymbol(name.clone())).await;
        let MessageResponse::FileDescriptorResponse(files) = response else {
            panic!("{name} listed but not described: {response:?}");
        };
        assert!(!files.file_descriptor_proto.is_empty(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_serving_then_not_serving_on_shutdown() {
    let app = spawn_app().await;
    let mut health = HealthClient::new(channel(&app).await);
    let check = |service: &str| HealthCheckRequest {
        service: service.to_owned(),
    };

    let status = health
        .check(check("shop.user.v1.UserService"))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let overall = health.check(check("")).await.unwrap().into_inner().status;
    assert_eq!(overall, ServingStatus::Serving as i32);

    let mut watch = health
        .watch(check("shop.user.v1.UserService"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    app.running.shutdown().cancel();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap();
    // The watcher hears NOT_SERVING before the server closes the stream.
    let update = next
        .expect("an update before the stream ends")
        .expect("the update, not an error");
    assert_eq!(update.status, ServingStatus::NotServing as i32);
}

/// The API's readiness follows its database: when the service's
/// connections to PostgreSQL drop and new ones are refused, health turns
/// NOT_SERVING (a load balancer stops sending calls that would only fail),
/// and SERVING again once the database is reachable.
#[tokio::test(flavor = "multi_thread")]
async fn health_is_not_serving_while_the_database_is_unreachable_and_serving_again_after() {
    let proxy = shop_testkit::TcpProxy::start(shop_testkit::postgres_addr().await)
        .await
        .unwrap();
    let app = crate::helpers::spawn_app_with(|settings| {
        use secrecy::ExposeSecret as _;
        let url = proxy.url_for(settings.host.database.url.expose_secret());
        settings.host.database.url = url.into();
        settings.host.database.acquire_timeout = Duration::from_secs(1);
    })
    .await;
    let mut health = HealthClient::new(channel(&app).await);
    let status = |mut health: HealthClient<tonic::transport::Channel>| async move {
        health
            .check(HealthCheckRequest {
                service: "shop.user.v1.UserService".to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
    };
    assert_eq!(status(health.clone()).await, ServingStatus::Serving as i32);

    proxy.refuse(true);
    proxy.cut();
    shop_testkit::eventually("NOT_SERVING while unreachable", Duration::from_secs(30), || {
        let health = health.clone();
        async move { (status(health).await == ServingStatus::NotServing as i32).then_some(()) }
    })
    .await;
    let overall = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(overall, ServingStatus::NotServing as i32);
    proxy.refuse(false);
    shop_testkit::eventually("SERVING again", Duration::from_secs(30), || {
        let health = health.clone();
        async move { (status(health).await == ServingStatus::Serving as i32).then_some(()) }
    })
    .await;
    app.create_user("back@example.com", "Back").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_stops_the_service_within_the_grace_period() {
    let mut app = spawn_app().await;
    app.create_user("bye@example.com", "Bye").await;

    app.running
        .stop()
        .await
        .expect("clean stop within the grace period");

    assert!(
        tokio::net::TcpStream::connect(app.addr).await.is_err(),
        "the listener is closed"
    );
}
