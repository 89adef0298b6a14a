//! Overload, message size, TLS and secrets.

use std::time::Duration;

use secrecy::SecretString;
use shop_client::{ClientConfig, RetryPolicy, TlsConfig, UserClient};
use shop_contracts::user as pb;
use shop_testkit::TestKeys;
use tonic::Code;

use crate::helpers::{spawn_app, spawn_app_with};

fn create(email: &str) -> pb::CreateUserRequest {
    pb::CreateUserRequest {
        email: email.to_owned(),
        name: "Limit".to_owned(),
        request_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_past_the_in_flight_bound_are_refused_at_once_and_health_still_answers() {
    let app = spawn_app_with(|settings| {
        settings.host.grpc.max_in_flight = 1;
    })
    .await;
    // Hold the users table so the first call stays in flight.
    let (mut locker, connection) = tokio_postgres::connect(app.db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut first_client = app.client.clone();
    let first = tokio::spawn(async move { first_client.create_user(create("first@example.com")).await });
    let (watcher, connection) = tokio_postgres::connect(app.db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    shop_testkit::eventually(
        "the first call to wait on the lock",
        Duration::from_secs(10),
        || async {
            let waiting: i64 = watcher
                // This test's database only: other tests on the server
                // wait on locks of their own.
                .query_one(
                    "SELECT count(*) FROM pg_locks l \
                     JOIN pg_database d ON d.oid = l.database \
                     WHERE NOT l.granted AND d.datname = current_database() \
                     AND l.relation = 'users'::regclass",
                    &[],
                )
                .await
                .ok()?
                .get(0);
            (waiting > 0).then_some(())
        },
    )
    .await;

    let refused = app
        .client
        .clone()
        .create_user(create("second@example.com"))
        .await
        .unwrap_err();
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    lock.rollback().await.unwrap();

    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    assert!(first.await.unwrap().is_ok(), "the call in flight completes");
    app.client
        .clone()
        .create_user(create("third@example.com"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_over_the_message_size_limit_is_refused_without_reaching_the_handler() {
    let app = spawn_app_with(|settings| {
        settings.host.grpc.max_message_bytes = 64 * 1024;
    })
    .await;

    let huge = pb::CreateUserRequest {
        name: "x".repeat(100 * 1024),
        ..create("huge@example.com")
    };
    let status = app.client.clone().create_user(huge).await.unwrap_err();

    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(app.user_count().await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_speaks_tls_with_a_certificate_the_client_trusts() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = std::env::temp_dir().join(format!("shop-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let certificate = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&certificate, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    let app = spawn_app_with(|settings| {
        settings.host.grpc.tls_cert = Some(certificate.clone());
        settings.host.grpc.tls_key = Some(key.clone());
    })
    .await;
    let endpoint = format!("https://localhost:{}", app.addr.port());

    let token = || shop_client::SecretString::from(TestKeys::shared().service_token());
    let trusted = UserClient::connect(
        ClientConfig::new(&endpoint)
            .with_tls(TlsConfig {
                ca_certificate_pem: Some(certified.cert.pem().into_bytes()),
                domain: Some("localhost".to_owned()),
                ..TlsConfig::default()
            })
            .with_token(token()),
    )
    .unwrap();
    let user = trusted.create_user("tls@example.com", "Tls").await.unwrap();
    let untrusted = UserClient::connect(
        ClientConfig::new(&endpoint)
            .with_tls(TlsConfig::default())
            .with_token(token())
            .with_retry(RetryPolicy::none()),
    )
    .unwrap();
    let refused = untrusted.get_user(&user.id).await.unwrap_err();
    let plaintext = UserClient::connect(
        ClientConfig::new(format!("http://localhost:{}", app.addr.port()))
            .with_token(token())
            .with_retry(RetryPolicy::none()),
    )
    .unwrap();
    let garbled = plaintext.get_user(&user.id).await.unwrap_err();
    // The container probe, beside the server: it pins the server's own
    // certificate, and refuses another.
    let probe = |certificate: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_user-service"))
            .arg("healthcheck")
            .env("GRPC_ADDR", format!("0.0.0.0:{}", app.addr.port()))
            .env("GRPC_TLS_CERT", certificate)
            .env("GRPC_TLS_KEY", &key)
            .output()
            .unwrap()
    };
    let probed = probe(&certificate);
    let other = dir.join("other.pem");
    let stranger = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(&other, stranger.cert.pem()).unwrap();
    let mistrusted = probe(&other);
    std::fs::remove_dir_all(&dir).ok();

    assert!(probed.status.success(), "the healthcheck over TLS: {probed:?}");
    assert!(
        !mistrusted.status.success(),
        "another certificate was accepted: {mistrusted:?}"
    );
    assert_eq!(user.email, "tls@example.com");
    assert_eq!(
        refused.code(),
        Code::Unavailable,
        "a certificate nobody vouches for is refused: {refused:?}"
    );
    assert_ne!(garbled.code(), Code::Ok);
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_never_print_their_secrets() {
    let app = spawn_app().await;
    let mut settings = user_service::Config::defaults();
    settings.host.database.url = SecretString::from("postgres://app:db-pass-123@db:5432/users");
    settings.host.amqp.url = SecretString::from("amqp://shop:mq-pass-456@mq:5672/shop");

    let printed = format!("{settings:?} {settings:#?} {:?}", app.running);

    for secret in ["db-pass-123", "mq-pass-456"] {
        assert!(!printed.contains(secret), "{secret} printed in {printed}");
    }
}
