//! `sslmode=require`: the service's every database connection speaks TLS
//! and verifies the server's certificate. The local PostgreSQL serves TLS
//! with its own certificate (Debian's default, `ssl = on`); the test trusts
//! that certificate through `DATABASE_CA_FILE`.

use std::path::PathBuf;
use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Bool, Text};
use diesel_async::RunQueryDsl as _;
use secrecy::{ExposeSecret as _, SecretString};

use crate::helpers::{settings, spawn_app_with, test_database};

#[derive(QueryableByName)]
struct Setting {
    #[diesel(sql_type = Text)]
    setting: String,
}

/// The server's certificate file, after checking it serves TLS at all.
async fn server_certificate() -> PathBuf {
    let db = test_database().await;
    let mut conn = db.pool().get().await.unwrap();
    let show = |name: &str| diesel::sql_query(format!("SELECT current_setting('{name}') AS setting"));
    let ssl: Setting = show("ssl").get_result(&mut conn).await.unwrap();
    assert_eq!(
        ssl.setting, "on",
        "the local PostgreSQL must serve TLS (ssl = on, Debian's default) for this test"
    );
    let file: Setting = show("ssl_cert_file").get_result(&mut conn).await.unwrap();
    PathBuf::from(file.setting)
}

fn with_tls(url: &SecretString) -> SecretString {
    let url = url.expose_secret();
    let separator = if url.contains('?') { '&' } else { '?' };
    SecretString::from(format!("{url}{separator}sslmode=require"))
}

#[derive(QueryableByName)]
struct Backends {
    #[diesel(sql_type = BigInt)]
    total: i64,
    #[diesel(sql_type = BigInt)]
    over_tls: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a PostgreSQL with ssl = on and its certificate on this disk (.ci/install-tools); run: cargo test -p user-service --test it database_tls -- --ignored"]
async fn with_sslmode_require_every_connection_of_the_service_is_tls() {
    let certificate = server_certificate().await;
    let app = spawn_app_with(|settings| {
        settings.host.database.url = with_tls(&settings.host.database.url);
        settings.host.database.ca_file = Some(certificate);
    })
    .await;
    let _consumer = app.broker.probe(&app.exchange, "#").await.unwrap();
    let user = app.create_user("tls@example.com", "Over TLS").await;
    assert_eq!(user.email, "tls@example.com");

    // The relay publishes it: its batch connection and its LISTEN session
    // are up.
    let mut conn = app.pool.get().await.unwrap();
    shop_testkit::eventually("the relay to publish the event", Duration::from_secs(10), || {
        let pool = app.pool.clone();
        async move {
            let mut conn = pool.get().await.ok()?;
            #[derive(QueryableByName)]
            struct Pending {
                #[diesel(sql_type = Bool)]
                pending: bool,
            }
            let row: Pending = diesel::sql_query(
                "SELECT EXISTS (SELECT 1 FROM outbox WHERE published_at IS NULL) AS pending",
            )
            .get_result(&mut conn)
            .await
            .ok()?;
            (!row.pending).then_some(())
        }
    })
    .await;

    let backends: Backends = diesel::sql_query(
        "SELECT count(*) AS total, count(*) FILTER (WHERE s.ssl) AS over_tls \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = current_database() AND a.backend_type = 'client backend'",
    )
    .get_result(&mut conn)
    .await
    .unwrap();
    // At least the pool's connections and the relay's LISTEN session.
    assert!(backends.total >= 2, "{} backends", backends.total);
    assert_eq!(backends.over_tls, backends.total, "every connection is TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a PostgreSQL with ssl = on and its certificate on this disk (.ci/install-tools); run: cargo test -p user-service --test it database_tls -- --ignored"]
async fn with_sslmode_require_an_untrusted_server_certificate_is_refused() {
    server_certificate().await;
    let db = test_database().await;
    let broker = shop_testkit::TestBroker::new();
    let mut settings = settings(&db, &broker);
    settings.host.database.url = with_tls(&settings.host.database.url);
    settings.host.database.ca_file = None;
    let error = user_service::Application::build(settings)
        .await
        .expect_err("a server certificate no trusted root signed is refused");
    let text = format!("{error:#}");
    assert!(text.contains("certificate"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_without_certificates_is_a_clear_start_up_error() {
    let db = test_database().await;
    let broker = shop_testkit::TestBroker::new();
    let empty = std::env::temp_dir().join(format!("empty-ca-{}.pem", uuid::Uuid::new_v4()));
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let mut settings = settings(&db, &broker);
    settings.host.database.url = with_tls(&settings.host.database.url);
    settings.host.database.ca_file = Some(empty.clone());
    let error = user_service::Application::build(settings)
        .await
        .expect_err("an unusable CA file stops the start");
    std::fs::remove_file(&empty).unwrap();
    let text = format!("{error:#}");
    assert!(text.contains("DATABASE_CA_FILE"), "{text}");
}
