//! The SDK against the real user service (in process, on a real database),
//! wrapped in a server that fails on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use shop_client::{ClientConfig, Error, RetryPolicy, UserClient, UserUpdate};
use shop_contracts::user as pb;
use shop_contracts::user::user_service_server::{UserService, UserServiceServer};
use shop_testkit::{Running, TestDatabase, TestKeys};
use tonic::{Request, Response, Status};
use user_service::grpc::UserGrpc;

/// The real handlers, failing the first calls of CreateUser with
/// UNAVAILABLE: before they reach the handler, or after it committed (as a
/// lost response would).
struct Flaky {
    inner: UserGrpc,
    fail_before: AtomicU32,
    fail_after: AtomicU32,
    request_ids: Mutex<Vec<String>>,
    traceparents: Mutex<Vec<String>>,
}

fn take(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[tonic::async_trait]
impl UserService for Flaky {
    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        self.request_ids
            .lock()
            .unwrap()
            .push(request.get_ref().request_id.clone());
        if let Some(traceparent) = request.metadata().get("traceparent") {
            self.traceparents
                .lock()
                .unwrap()
                .push(traceparent.to_str().unwrap().to_owned());
        }
        if take(&self.fail_before) {
            return Err(Status::unavailable("not now"));
        }
        let response = self.inner.create_user(request).await;
        if take(&self.fail_after) {
            return Err(Status::unavailable("the response was lost"));
        }
        response
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        self.inner.get_user(request).await
    }

    async fn update_user(
        &self,
        request: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::UpdateUserResponse>, Status> {
        self.inner.update_user(request).await
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        self.inner.delete_user(request).await
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        self.inner.list_users(request).await
    }

    type ResyncUsersStream = <UserGrpc as UserService>::ResyncUsersStream;

    async fn resync_users(
        &self,
        request: Request<pb::ResyncUsersRequest>,
    ) -> Result<Response<Self::ResyncUsersStream>, Status> {
        self.inner.resync_users(request).await
    }
}

struct Server {
    flaky: std::sync::Arc<Flaky>,
    addr: SocketAddr,
    pool: shop_database::Pool,
    _running: Running,
    _db: TestDatabase,
}

async fn server(fail_before: u32, fail_after: u32) -> Server {
    shop_testkit::init_test_log();
    let db = TestDatabase::create(
        user_service::app::MIGRATIONS,
        std::path::Path::new(user_service::app::MIGRATIONS_DIR),
    )
    .await
    .unwrap();
    let pool = db.pool();
    let flaky = std::sync::Arc::new(Flaky {
        inner: UserGrpc::new(pool.clone(), shop_outbox::Wake::new()),
        fail_before: AtomicU32::new(fail_before),
        fail_after: AtomicU32::new(fail_after),
        request_ids: Mutex::default(),
        traceparents: Mutex::default(),
    });
    let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let service = UserServiceServer::from_arc(flaky.clone());
    // The host's own authentication in front, with the test's keys: the
    // handlers get their principal from it, and the SDK must send a token.
    let authenticator = shop_host::auth::Authenticator::new(
        &TestKeys::shared().auth_config(),
        false,
        shop_host::grpc::known_methods(&["shop.user.v1.UserService"]).unwrap(),
    )
    .unwrap();
    let running = Running::spawn(|shutdown| async move {
        tonic::transport::Server::builder()
            .layer(shop_host::auth::AuthLayer::new(std::sync::Arc::new(
                authenticator,
            )))
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await?;
        Ok(())
    });
    Server {
        flaky,
        addr,
        pool,
        _running: running,
        _db: db,
    }
}

fn client(server: &Server) -> UserClient {
    let retry = RetryPolicy {
        max_attempts: 4,
        backoff: shop_client::Backoff::new(Duration::from_millis(10), Duration::from_millis(50)),
    };
    UserClient::connect(
        ClientConfig::new(format!("http://{}", server.addr))
            .with_retry(retry)
            .with_token(shop_client::SecretString::from(
                TestKeys::shared().service_token(),
            )),
    )
    .unwrap()
}

async fn users_in_database(server: &Server) -> i64 {
    use diesel::QueryDsl as _;
    use diesel_async::RunQueryDsl as _;
    let mut conn = server.pool.get().await.unwrap();
    user_service::schema::users::table
        .count()
        .get_result(&mut conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_create_refused_as_unavailable_is_retried_and_succeeds() {
    let server = server(2, 0).await;

    let user = client(&server)
        .create_user("retry@example.com", "Retry")
        .await
        .unwrap();

    assert_eq!(user.email, "retry@example.com");
    assert_eq!(server.flaky.request_ids.lock().unwrap().len(), 3);
    assert_eq!(users_in_database(&server).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_create_whose_response_was_lost_is_retried_and_does_not_create_twice() {
    let server = server(0, 2).await;

    let user = client(&server)
        .create_user("once@example.com", "Once")
        .await
        .unwrap();

    let ids = server.flaky.request_ids.lock().unwrap().clone();
    assert_eq!(ids.len(), 3, "two lost responses, then the answer");
    assert!(
        ids.iter().all(|id| *id == ids[0] && !id.is_empty()),
        "one request id: {ids:?}"
    );
    assert_eq!(users_in_database(&server).await, 1);
    assert_eq!(user.version, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_stays_unavailable_ends_in_a_typed_unavailable_error() {
    let server = server(10, 0).await;

    let error = client(&server)
        .create_user("never@example.com", "Never")
        .await
        .unwrap_err();

    assert!(matches!(error, Error::Unavailable(_)), "{error:?}");
    assert_eq!(server.flaky.request_ids.lock().unwrap().len(), 4, "max_attempts");
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_come_back_typed() {
    let server = server(0, 0).await;
    let client = client(&server);
    let user = client.create_user("typed@example.com", "Typed").await.unwrap();

    let invalid = client.create_user("nope", "").await.unwrap_err();
    let taken = client
        .create_user("TYPED@example.com", "Again")
        .await
        .unwrap_err();
    let missing = client
        .get_user(&uuid::Uuid::now_v7().to_string())
        .await
        .unwrap_err();
    let stale = client
        .update_user(
            &user.id,
            9,
            UserUpdate {
                name: Some("x".to_owned()),
                ..UserUpdate::default()
            },
        )
        .await
        .unwrap_err();

    let Error::InvalidArgument { violations, .. } = invalid else {
        panic!("{invalid:?}")
    };
    let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
    assert_eq!(fields, ["email", "name"]);
    assert!(matches!(taken, Error::AlreadyExists(_)), "{taken:?}");
    assert!(matches!(missing, Error::NotFound(_)), "{missing:?}");
    assert!(matches!(stale, Error::Conflict(_)), "{stale:?}");
    assert_eq!(stale.code(), tonic::Code::Aborted);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_inside_a_traced_operation_carries_its_trace_context() {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    let server = server(0, 0).await;
    let client = client(&server);
    let span = tracing::info_span!("client operation");

    let trace_id = {
        let _entered = span.enter();
        span.context().span().span_context().trace_id().to_string()
    };
    tracing::Instrument::instrument(client.create_user("traced@example.com", "Traced"), span)
        .await
        .unwrap();

    let traceparents = server.flaky.traceparents.lock().unwrap().clone();
    assert_eq!(traceparents.len(), 1);
    assert!(
        traceparents[0].contains(&trace_id),
        "{traceparents:?} carries {trace_id}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_is_sent_on_every_call_and_a_refusal_comes_back_typed_and_is_not_retried() {
    let server = server(0, 0).await;
    let config = |token: Option<String>| {
        let mut config = ClientConfig::new(format!("http://{}", server.addr));
        config.token = token.map(shop_client::SecretString::from);
        UserClient::connect(config).unwrap()
    };
    let keys = TestKeys::shared();

    let without = config(None)
        .create_user("none@example.com", "None")
        .await
        .unwrap_err();
    let reader = config(Some(keys.token_with(&[shop_host::auth::Permission::UsersRead])))
        .create_user("reader@example.com", "Reader")
        .await
        .unwrap_err();
    let created = client(&server).create_user("ok@example.com", "Ok").await;
    let read = client(&server).get_user(&created.as_ref().unwrap().id).await;

    assert!(matches!(without, Error::Unauthenticated(_)), "{without:?}");
    assert!(matches!(reader, Error::PermissionDenied(_)), "{reader:?}");
    assert!(read.is_ok(), "{read:?}");
    assert!(
        server.flaky.request_ids.lock().unwrap().len() == 1,
        "refused calls never reached the handler, and were not retried"
    );
}
