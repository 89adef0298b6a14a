//! Who may call: tokens that must be refused, permissions, ownership, key
//! rotation, client certificates, and what refused callers cost and leave
//! behind, against the real service.

use std::time::Duration;

use secrecy::ExposeSecret as _;
use shop_contracts::user as pb;
use shop_contracts::user::user_service_client::UserServiceClient;
use shop_host::auth::Permission;
use shop_host::auth::issue::TokenRequest;
use shop_testkit::{AuthChannel, ServiceProcess, TestBroker, TestKeys, http_get, metric};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{TestApp, channel, client_with_token, spawn_app, spawn_app_with, test_database};

/// A deadline for anything the test itself waits on.
const WAIT: Duration = Duration::from_secs(15);

fn get(id: &str) -> pb::GetUserRequest {
    pb::GetUserRequest { id: id.to_owned() }
}

async fn health_is_serving(app: &TestApp) -> bool {
    let status = HealthClient::new(channel(app.addr).await)
        .check(HealthCheckRequest::default())
        .await
        .map(|response| response.into_inner().status);
    status.ok() == Some(ServingStatus::Serving as i32)
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_that_are_expired_unknown_or_for_another_audience_or_issuer_are_unauthenticated() {
    let app = spawn_app().await;
    let user = app.create_user("ada@example.com", "Ada").await;
    let keys = TestKeys::shared();
    let stranger = TestKeys::stranger();
    let with = |change: fn(&mut TokenRequest)| {
        let mut request = TokenRequest::new("service:test", shop_host::auth::Permissions::all());
        change(&mut request);
        keys.issue(&request)
    };
    let header = |token: &str| token.split('.').next().unwrap().to_owned();
    let forged = {
        // The test's own header and claims, the signature of another key.
        let good = keys.service_token();
        let theirs = stranger
            .issue(&TokenRequest::new(
                "service:test",
                shop_host::auth::Permissions::all(),
            ))
            .unwrap();
        let (head_and_claims, _) = good.rsplit_once('.').unwrap();
        let (_, signature) = theirs.expose_secret().rsplit_once('.').unwrap();
        format!("{head_and_claims}.{signature}")
    };
    let cases = [
        (
            "expired two minutes ago",
            keys.expired_token(Duration::from_secs(120)),
            "expired",
        ),
        (
            "signed by an unknown key",
            stranger
                .issue(&TokenRequest::new(
                    "service:test",
                    shop_host::auth::Permissions::all(),
                ))
                .unwrap()
                .expose_secret()
                .to_owned(),
            "unknown_key",
        ),
        ("a forged signature", forged, "bad_signature"),
        (
            "for another audience",
            with(|request| request.audience = "billing".to_owned()),
            "wrong_audience",
        ),
        (
            "from another issuer",
            with(|request| request.issuer = "someone-else".to_owned()),
            "wrong_issuer",
        ),
        (
            "naming neither a user nor a service",
            with(|request| request.subject = "admin".to_owned()),
            "invalid_claims",
        ),
        ("not a token", "not-a-jwt".to_owned(), "malformed_token"),
        (
            "its header alone",
            format!("{}..", header(&keys.service_token())),
            "malformed_token",
        ),
    ];

    for (what, token, _) in &cases {
        let status = client_with_token(app.addr, token)
            .await
            .get_user(get(&user.id))
            .await
            .expect_err(what);
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        assert!(
            !status.message().contains(token.as_str()),
            "{what}: the token echoed"
        );
    }
    let valid = client_with_token(app.addr, &keys.service_token())
        .await
        .get_user(get(&user.id))
        .await;
    assert!(valid.is_ok(), "a valid token: {valid:?}");
    assert!(health_is_serving(&app).await, "health answers throughout");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_without_credentials_is_unauthenticated_and_health_answers_without_any() {
    let app = spawn_app().await;
    let mut anonymous = UserServiceClient::new(AuthChannel::new(
        channel(app.addr).await,
        shop_testkit::Bearer::none(),
    ));

    let status = anonymous
        .get_user(get(&uuid::Uuid::now_v7().to_string()))
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(health_is_serving(&app).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_users_read_token_calling_delete_user_is_permission_denied_and_nothing_changes() {
    let app = spawn_app().await;
    let user = app.create_user("ada@example.com", "Ada").await;
    let outbox = app.outbox().await;
    let reader = client_with_token(app.addr, &TestKeys::shared().token_with(&[Permission::UsersRead])).await;

    let status = reader
        .clone()
        .delete_user(pb::DeleteUserRequest {
            id: user.id.clone(),
            expected_version: 1,
        })
        .await
        .unwrap_err();
    let read = reader.clone().get_user(get(&user.id)).await;

    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(app.user_count().await, 1, "the user is still there");
    assert_eq!(app.outbox().await, outbox, "no event written");
    assert_eq!(
        read.unwrap().into_inner().user.unwrap(),
        user,
        "reading is allowed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_reads_and_changes_only_itself() {
    let app = spawn_app().await;
    let ada = app.create_user("ada@example.com", "Ada").await;
    let grace = app.create_user("grace@example.com", "Grace").await;
    let outbox = app.outbox().await;
    let as_ada = client_with_token(app.addr, &TestKeys::shared().user_token(ada.id.parse().unwrap())).await;

    let own = as_ada.clone().get_user(get(&ada.id)).await;
    let other = as_ada.clone().get_user(get(&grace.id)).await.unwrap_err();
    let update_other = as_ada
        .clone()
        .update_user(pb::UpdateUserRequest {
            id: grace.id.clone(),
            expected_version: 1,
            email: None,
            name: Some("Mallory".to_owned()),
        })
        .await
        .unwrap_err();
    let delete_other = as_ada
        .clone()
        .delete_user(pb::DeleteUserRequest {
            id: grace.id.clone(),
            expected_version: 1,
        })
        .await
        .unwrap_err();
    let list = as_ada
        .clone()
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap_err();
    let create = as_ada
        .clone()
        .create_user(pb::CreateUserRequest {
            email: "eve@example.com".to_owned(),
            name: "Eve".to_owned(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    let untouched = app.outbox().await;
    let update_own = as_ada
        .clone()
        .update_user(pb::UpdateUserRequest {
            id: ada.id.clone(),
            expected_version: 1,
            email: None,
            name: Some("Ada King".to_owned()),
        })
        .await;

    assert_eq!(own.unwrap().into_inner().user.unwrap(), ada);
    for (what, status) in [
        ("reading another user", other),
        ("changing another user", update_other),
        ("deleting another user", delete_other),
        ("listing every user", list),
        ("creating a user", create),
    ] {
        assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
    }
    assert_eq!(untouched, outbox, "nothing refused wrote an event");
    assert_eq!(app.user_count().await, 2);
    assert_eq!(update_own.unwrap().into_inner().user.unwrap().name, "Ada King");
}

#[tokio::test(flavor = "multi_thread")]
async fn rotated_keys_both_verify_while_both_are_in_the_file_and_a_removed_key_is_refused() {
    let mut keys = TestKeys::new();
    let app = spawn_app_with(|settings| settings.host.grpc.auth = keys.auth_config()).await;
    let user = app.create_user_as(&keys.service_token(), "ada@example.com").await;
    let old_token = keys.service_token();
    // Kept by the server until the file changes: a token verified before
    // the rotation is remembered, and must be forgotten when its key goes.
    let check = async |token: &str| {
        client_with_token(app.addr, token)
            .await
            .get_user(get(&user.id))
            .await
            .map(drop)
            .map_err(|status| status.code())
    };
    assert_eq!(check(&old_token).await, Ok(()));

    keys.rotate();
    let new_token = keys.service_token();
    let new_accepted = shop_testkit::eventually("the new key to be read", WAIT, || async {
        check(&new_token).await.ok()
    })
    .await;
    let old_still = check(&old_token).await;
    keys.retire_old_keys();
    let old_refused = shop_testkit::eventually("the old key to be dropped", WAIT, || async {
        (check(&old_token).await == Err(Code::Unauthenticated)).then_some(())
    })
    .await;
    let new_still = check(&new_token).await;

    assert_eq!(new_accepted, ());
    assert_eq!(old_still, Ok(()), "the old key verifies while it is in the file");
    assert_eq!(old_refused, ());
    assert_eq!(new_still, Ok(()));
    assert!(health_is_serving(&app).await, "health answers throughout");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_file_that_stops_parsing_keeps_the_keys_in_force() {
    let keys = TestKeys::new();
    let app = spawn_app_with(|settings| settings.host.grpc.auth = keys.auth_config()).await;
    let token = keys.service_token();
    let user = app.create_user_as(&token, "ada@example.com").await;

    std::fs::write(keys.path(), "{ not json").unwrap();
    // Two checks of the file pass.
    tokio::time::sleep(shop_host::auth::jwt::KEYS_CHECK_INTERVAL * 2 + Duration::from_millis(500)).await;
    let fresh = keys.service_token();
    let after = client_with_token(app.addr, &fresh)
        .await
        .get_user(get(&user.id))
        .await;

    assert!(after.is_ok(), "{after:?}");
}

/// The binary as its own process (its own metrics and memory), relay off,
/// with `envs` besides its database, broker names and `auth`'s variables.
/// The database and broker names live as long as the returned guards.
async fn binary(
    auth: Vec<(&'static str, String)>,
    envs: &[(&'static str, &str)],
) -> (ServiceProcess, shop_testkit::TestDatabase, TestBroker) {
    let db = test_database().await;
    let broker = TestBroker::new();
    let service = ServiceProcess::start(
        env!("CARGO_BIN_EXE_user-service"),
        &[
            ("DATABASE_URL", db.url().to_owned()),
            ("AMQP_URL", broker.config().url.expose_secret().to_owned()),
            ("USER_EVENTS_EXCHANGE", broker.exchange("user.events")),
            ("RELAY_ENABLED", "false".to_owned()),
        ]
        .into_iter()
        .chain(auth)
        .chain(envs.iter().map(|(key, value)| (*key, (*value).to_owned())))
        .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    (service, db, broker)
}

/// 1,000 calls without credentials, each with a 1 MiB body, on connections
/// that send them all at once: refused from their headers, they leave the
/// server's resident memory where it was (the in-flight limit would buffer
/// each body in full if it ran first).
#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_unauthenticated_calls_with_one_mib_bodies_leave_the_memory_bounded() {
    let keys = TestKeys::new();
    let (mut service, _db, _broker) = binary(keys.env(), &[]).await;
    let before = service.resident_bytes().unwrap();
    // A message of 1 MiB with its 5-byte gRPC header: the largest request
    // the server accepts.
    let body = bytes::Bytes::from({
        let message = 1024 * 1024 - 5;
        let mut frame = vec![0_u8];
        frame.extend_from_slice(&u32::try_from(message).unwrap().to_be_bytes());
        frame.resize(1024 * 1024, 7);
        frame
    });

    let (codes, peak) = flood(service.addr, &body, 10, 100, || service.resident_bytes().unwrap()).await;
    let after = service.resident_bytes().unwrap();
    service.terminate().await.unwrap();

    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    eprintln!(
        "1000 unauthenticated calls of 1 MiB: resident {:.1} MiB before, peak {:.1} MiB, {:.1} MiB after",
        mib(before),
        mib(peak),
        mib(after)
    );
    assert_eq!(codes.len(), 1000);
    assert!(
        codes.iter().all(|code| code.as_deref() == Some("16")),
        "every call UNAUTHENTICATED: {:?}",
        codes.iter().find(|code| code.as_deref() != Some("16"))
    );
    assert!(
        peak < before + 64 * 1024 * 1024,
        "the refused bodies were held: {:.1} MiB before, {:.1} MiB at the peak",
        mib(before),
        mib(peak)
    );
}

/// Opens `connections` HTTP/2 connections with `per_connection` calls each,
/// all started before any is answered, each sending `body`; returns each
/// call's `grpc-status` and the highest resident memory `sample` saw while
/// they were answered.
async fn flood(
    addr: std::net::SocketAddr,
    body: &bytes::Bytes,
    connections: usize,
    per_connection: usize,
    sample: impl Fn() -> u64,
) -> (Vec<Option<String>>, u64) {
    let mut responses = Vec::new();
    let mut senders = Vec::new();
    let mut drivers = Vec::new();
    for _ in 0..connections {
        let tcp = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        let (mut sender, connection) = tokio::time::timeout(WAIT, h2::client::handshake(tcp))
            .await
            .unwrap()
            .unwrap();
        drivers.push(tokio::spawn(async move {
            let _ = connection.await;
        }));
        for _ in 0..per_connection {
            sender = tokio::time::timeout(WAIT, sender.ready()).await.unwrap().unwrap();
            let request = http::Request::post(format!("http://{addr}/shop.user.v1.UserService/CreateUser"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            let (response, mut stream) = sender.send_request(request, false).unwrap();
            stream.reserve_capacity(body.len());
            let body = body.clone();
            senders.push(tokio::spawn(async move {
                // As much as flow control lets through; the rest is never
                // asked for once the call is refused.
                let mut rest = body;
                while !rest.is_empty() {
                    let Some(Ok(capacity)) = std::future::poll_fn(|cx| stream.poll_capacity(cx)).await else {
                        return;
                    };
                    let chunk = rest.split_to(capacity.min(rest.len()));
                    if stream.send_data(chunk, rest.is_empty()).is_err() {
                        return;
                    }
                }
            }));
            responses.push(response);
        }
    }
    let mut peak = sample();
    let mut codes = Vec::new();
    for response in responses {
        let response = tokio::time::timeout(WAIT, response)
            .await
            .expect("an answer in time");
        peak = peak.max(sample());
        codes.push(response.ok().and_then(|response| {
            response
                .headers()
                .get("grpc-status")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        }));
    }
    for task in senders.into_iter().chain(drivers) {
        task.abort();
    }
    (codes, peak)
}

/// Refusals are counted by method and reason, both from fixed sets, whatever
/// the caller sends; the tokens never reach the logs.
#[tokio::test(flavor = "multi_thread")]
async fn refusals_are_counted_by_method_and_reason_and_made_up_paths_add_no_series() {
    let keys = TestKeys::new();
    let (mut service, _db, _broker) = binary(
        keys.env(),
        &[("RUST_LOG", "debug,lapin=off,h2=off,hyper=off,tower=off")],
    )
    .await;
    let admin = service.admin_addr.unwrap();
    let connection = channel(service.addr).await;
    let anonymous =
        UserServiceClient::new(AuthChannel::new(connection.clone(), shop_testkit::Bearer::none()));
    let expired = keys.expired_token(Duration::from_secs(600));
    let reader_token = keys.token_with(&[Permission::UsersRead]);
    let reader = UserServiceClient::new(shop_testkit::auth::with_token(connection.clone(), &reader_token));
    let expired_client = UserServiceClient::new(shop_testkit::auth::with_token(connection.clone(), &expired));

    for _ in 0..3 {
        anonymous.clone().get_user(get("x")).await.unwrap_err();
    }
    expired_client
        .clone()
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap_err();
    reader
        .clone()
        .delete_user(pb::DeleteUserRequest::default())
        .await
        .unwrap_err();
    let mut grpc = tonic::client::Grpc::new(AuthChannel::new(connection, shop_testkit::Bearer::none()));
    for i in 0..200 {
        grpc.ready().await.unwrap();
        let path = http::uri::PathAndQuery::try_from(format!("/made.up.v{i}.Service/Method{i}")).unwrap();
        let status = grpc
            .unary(
                tonic::Request::new(()),
                path,
                tonic_prost::ProstCodec::<(), ()>::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    let scrape = http_get(admin, "/metrics").await.unwrap().1;
    service.terminate().await.unwrap();

    let count = |method: &str, reason: &str| {
        metric(
            &scrape,
            "grpc_server_auth_failures_total",
            &[("method", method), ("reason", reason)],
        )
    };
    assert_eq!(count("GetUser", "missing_credentials"), Some(3.0), "{scrape}");
    assert_eq!(count("ListUsers", "expired"), Some(1.0));
    assert_eq!(count("DeleteUser", "missing_permission"), Some(1.0));
    assert_eq!(count("unknown", "missing_credentials"), Some(200.0));
    let series: Vec<&str> = scrape
        .lines()
        .filter(|line| line.starts_with("grpc_server_auth_failures_total{"))
        .collect();
    assert_eq!(series.len(), 4, "{series:?}");
    assert!(
        series
            .iter()
            .any(|line| line.contains("code=\"PERMISSION_DENIED\"")),
        "{series:?}"
    );
    assert_eq!(metric(&scrape, "grpc_server_auth_disabled", &[]), Some(0.0));
    let lines = service.lines();
    for token in [&expired, &reader_token] {
        let signature = token.rsplit('.').next().unwrap();
        assert!(
            !lines.iter().any(|line| line.contains(signature)),
            "a log line shows a token"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_grpc_auth_none_every_caller_is_served_and_the_server_says_so() {
    // GRPC_AUTH=none on purpose: what this proves is that an explicit
    // `none` serves callers without credentials, and is announced.
    let (mut service, _db, _broker) = binary(vec![("GRPC_AUTH", "none".to_owned())], &[]).await;
    let admin = service.admin_addr.unwrap();
    let mut anonymous = UserServiceClient::new(channel(service.addr).await);

    let created = anonymous
        .create_user(pb::CreateUserRequest {
            email: "open@example.com".to_owned(),
            name: "Open".to_owned(),
            request_id: String::new(),
        })
        .await;
    let scrape = http_get(admin, "/metrics").await.unwrap().1;
    service.terminate().await.unwrap();

    assert!(created.is_ok(), "{created:?}");
    assert_eq!(
        metric(&scrape, "grpc_server_auth_disabled", &[]),
        Some(1.0),
        "{scrape}"
    );
    let warning = service
        .lines()
        .into_iter()
        .find(|line| line.contains("GRPC_AUTH=none"))
        .expect("a warning at start");
    assert!(warning.contains("\"level\":\"WARN\""), "{warning}");
}

mod mtls {
    //! Client certificates: a CA of the test's own signs them.

    use shop_client::{ClientConfig, ClientIdentity, RetryPolicy, TlsConfig, UserClient};

    use super::*;

    struct Pki {
        dir: std::path::PathBuf,
        ca: rcgen::Certificate,
        ca_key: rcgen::KeyPair,
        server_cert: std::path::PathBuf,
        server_key: std::path::PathBuf,
        ca_file: std::path::PathBuf,
    }

    impl Pki {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("shop-mtls-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&dir).unwrap();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "shop test client CA");
            let ca = params.self_signed(&ca_key).unwrap();
            let server = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
            let server_cert = dir.join("server.pem");
            let server_key = dir.join("server-key.pem");
            let ca_file = dir.join("client-ca.pem");
            std::fs::write(&server_cert, server.cert.pem()).unwrap();
            std::fs::write(&server_key, server.key_pair.serialize_pem()).unwrap();
            std::fs::write(&ca_file, ca.pem()).unwrap();
            Self {
                dir,
                ca,
                ca_key,
                server_cert,
                server_key,
                ca_file,
            }
        }

        /// A client certificate for `uri` (a SAN URI), signed by `issuer`.
        fn client(uri: &str, issuer: &rcgen::Certificate, issuer_key: &rcgen::KeyPair) -> ClientIdentity {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "not the principal");
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            let cert = params.signed_by(&key, issuer, issuer_key).unwrap();
            ClientIdentity::new(cert.pem().into_bytes(), key.serialize_pem().into_bytes())
        }

        fn client_config(
            &self,
            addr: std::net::SocketAddr,
            identity: Option<ClientIdentity>,
        ) -> ClientConfig {
            ClientConfig::new(format!("https://localhost:{}", addr.port()))
                .with_tls(TlsConfig {
                    ca_certificate_pem: Some(std::fs::read(&self.server_cert).unwrap()),
                    domain: Some("localhost".to_owned()),
                    client_identity: identity,
                })
                .with_retry(RetryPolicy::none())
        }
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn with_mtls_a_certificate_of_the_ca_is_served_by_its_permissions_and_a_call_without_one_is_refused_while_health_answers()
     {
        let pki = Pki::new();
        let app = spawn_app_with(|settings| {
            settings.host.grpc.tls_cert = Some(pki.server_cert.clone());
            settings.host.grpc.tls_key = Some(pki.server_key.clone());
            let auth = &mut settings.host.grpc.auth;
            auth.mechanisms = Some(shop_host::auth::Mechanisms {
                mtls: true,
                jwt: false,
            });
            auth.jwt_keys = None;
            auth.client_ca = Some(pki.ca_file.clone());
            auth.client_permissions = shop_host::auth::certificate::PermissionMap::parse(
                "spiffe://shop/ops=*;spiffe://shop/reader=users:read",
            )
            .unwrap();
        })
        .await;
        let ops = UserClient::connect(pki.client_config(
            app.addr,
            Some(Pki::client("spiffe://shop/ops", &pki.ca, &pki.ca_key)),
        ))
        .unwrap();
        let reader = UserClient::connect(pki.client_config(
            app.addr,
            Some(Pki::client("spiffe://shop/reader", &pki.ca, &pki.ca_key)),
        ))
        .unwrap();
        let unlisted = UserClient::connect(pki.client_config(
            app.addr,
            Some(Pki::client("spiffe://shop/nobody", &pki.ca, &pki.ca_key)),
        ))
        .unwrap();
        let other_ca_key = rcgen::KeyPair::generate().unwrap();
        let mut other_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        other_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let other_ca = other_params.self_signed(&other_ca_key).unwrap();
        let forged = UserClient::connect(pki.client_config(
            app.addr,
            Some(Pki::client("spiffe://shop/ops", &other_ca, &other_ca_key)),
        ))
        .unwrap();
        let without = UserClient::connect(pki.client_config(app.addr, None)).unwrap();

        let created = ops.create_user("mtls@example.com", "Mtls").await;
        let user = created.as_ref().unwrap().clone();
        let read = reader.get_user(&user.id).await;
        let write = reader.delete_user(&user.id, 1).await.unwrap_err();
        let nobody = unlisted.get_user(&user.id).await.unwrap_err();
        let no_certificate = without.get_user(&user.id).await.unwrap_err();
        let other_ca = forged.get_user(&user.id).await.unwrap_err();
        // The probe beside the server, without a certificate.
        let probe = std::process::Command::new(env!("CARGO_BIN_EXE_user-service"))
            .arg("healthcheck")
            .env("GRPC_ADDR", format!("127.0.0.1:{}", app.addr.port()))
            .env("GRPC_TLS_CERT", &pki.server_cert)
            .env("GRPC_TLS_KEY", &pki.server_key)
            .output()
            .unwrap();

        assert!(read.is_ok(), "{read:?}");
        assert_eq!(write.code(), Code::PermissionDenied, "{write:?}");
        assert_eq!(nobody.code(), Code::PermissionDenied, "{nobody:?}");
        assert_eq!(
            no_certificate.code(),
            Code::Unauthenticated,
            "refused per call, not in the handshake: {no_certificate:?}"
        );
        // The handshake fails: a transport error, no status from a server
        // that never saw the call. Which one depends on when the client's
        // connection task sees the alert: an error (Unknown, Unavailable) or
        // a connection dropped under the pending call (Cancelled).
        assert!(
            matches!(
                other_ca.code(),
                Code::Unknown | Code::Unavailable | Code::Cancelled
            ) && !other_ca.to_string().contains("credentials"),
            "a certificate of another CA fails the handshake: {other_ca:?}"
        );
        assert!(
            probe.status.success(),
            "health answers without a certificate: {probe:?}"
        );
        assert_eq!(app.user_count().await, 1);
    }
}

impl TestApp {
    /// Creates a user with `token`'s credentials.
    pub async fn create_user_as(&self, token: &str, email: &str) -> pb::User {
        client_with_token(self.addr, token)
            .await
            .create_user(pb::CreateUserRequest {
                email: email.to_owned(),
                name: "Someone".to_owned(),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap()
    }
}
