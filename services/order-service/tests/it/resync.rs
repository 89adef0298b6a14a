//! Re-synchronisation end to end: a gap past `CONSUMER_GAP_TIMEOUT` makes
//! the order service ask a real gRPC server standing in for the user
//! service for a snapshot of the stuck user, as its own principal; the
//! snapshot heals the gap. And the settings that make it so.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use order_service::OrderService;
use shop_contracts::user as pb;
use shop_contracts::user::user_service_server::{UserService, UserServiceServer};
use shop_contracts::user::{UserSnapshot, UserUpdated};
use shop_host::Service as _;
use shop_host::auth::Permissions;
use shop_host::auth::jwt::TokenVerifier;
use shop_messaging::sequence::GapPolicy;
use shop_testkit::{Running, TestKeys, metric};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::helpers::{WAIT, spawn_app_with};

/// The subject of the order service's own token in these tests.
const ORDER_SERVICE: &str = "service:order-service";

/// The principal that token proves, as the stand-in records it.
fn order_service() -> String {
    shop_host::auth::Identity::Service(Arc::from("order-service")).to_string()
}

/// Stands in for the user service: answers `ResyncUsers` after recording
/// who asked (the principal its bearer token proves, checked against the
/// test's keys) and for which users; every other method is unimplemented.
struct Producer {
    verifier: TokenVerifier,
    asked: Mutex<Vec<(String, Vec<String>)>>,
}

type Progress = Pin<Box<dyn Stream<Item = Result<pb::ResyncUsersProgress, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl UserService for Producer {
    type ResyncUsersStream = Progress;

    async fn resync_users(
        &self,
        request: Request<pb::ResyncUsersRequest>,
    ) -> Result<Response<Progress>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("no bearer token"))?;
        let principal = self
            .verifier
            .verify(token)
            .map_err(|reason| Status::unauthenticated(reason.message()))?;
        let Some(pb::resync_users_request::Selection::Users(users)) = request.into_inner().selection else {
            return Err(Status::invalid_argument("expected users"));
        };
        let written = users.ids.len() as i64;
        self.asked
            .lock()
            .unwrap()
            .push((principal.identity().to_string(), users.ids));
        let last = pb::ResyncUsersProgress {
            written,
            total: written,
            unknown_ids: Vec::new(),
        };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(last)]))))
    }

    async fn create_user(
        &self,
        _: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }

    async fn get_user(
        &self,
        _: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }

    async fn update_user(
        &self,
        _: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::UpdateUserResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }

    async fn delete_user(
        &self,
        _: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }

    async fn list_users(
        &self,
        _: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
}

/// The stand-in, serving on a port of its own.
async fn producer() -> (Arc<Producer>, std::net::SocketAddr, Running) {
    let auth = TestKeys::shared().auth_config();
    let producer = Arc::new(Producer {
        verifier: TokenVerifier::new(
            TestKeys::shared().path().to_owned(),
            auth.jwt_issuer.clone(),
            auth.jwt_audience.clone(),
            auth.jwt_leeway,
        )
        .unwrap(),
        asked: Mutex::new(Vec::new()),
    });
    let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let service = UserServiceServer::from_arc(producer.clone());
    let running = Running::spawn(|shutdown| async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
            .map_err(anyhow::Error::from)
    });
    (producer, addr, running)
}

/// A file holding the order service's token, removed on drop.
struct TokenFile(std::path::PathBuf);

impl TokenFile {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("order-service-resync-token-{}", Uuid::now_v7()));
        std::fs::write(&path, TestKeys::shared().token(ORDER_SERVICE, Permissions::all())).unwrap();
        Self(path)
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn gauge(metrics: &str, name: &str, queue: &str) -> Option<f64> {
    metric(metrics, name, &[("queue", queue)])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_gap_asks_the_user_service_for_the_user_as_the_order_service_and_its_snapshot_heals_it() {
    let (producer, addr, _serving) = producer().await;
    let token = TokenFile::new();
    let app = spawn_app_with(|settings| {
        settings.service.consumer.gap_timeout = Duration::from_secs(1);
        settings.service.consumer.sweep_interval = Duration::from_millis(100);
        settings.service.resync.url = Some(format!("http://{addr}"));
        settings.service.resync.token_file = Some(token.0.clone());
        settings.service.resync.timeout = Duration::from_secs(10);
    })
    .await;
    app.wait_for_consumer().await;
    let queue = app.settings.service.user_events_queue.clone();
    let user = app.known_user_id().await;
    shop_testkit::eventually("consumer_stuck_gaps 0", WAIT, || async {
        let metrics = shop_testkit::http_get(app.admin, "/metrics").await.ok()?.1;
        (gauge(&metrics, "consumer_stuck_gaps", &queue) == Some(0.0)).then_some(())
    })
    .await;

    // Version 2 never comes: 3 waits behind the gap, stuck after 1 s.
    app.publish_user_event(&UserUpdated {
        user_id: user.to_string(),
        version: 3,
        email: format!("{user}@example.com"),
        name: "Three".to_owned(),
        occurred_at: None,
    })
    .await;
    app.wait_for_parked(user, &[3]).await;
    shop_testkit::eventually("consumer_stuck_gaps 1", WAIT, || async {
        let metrics = shop_testkit::http_get(app.admin, "/metrics").await.ok()?.1;
        (gauge(&metrics, "consumer_stuck_gaps", &queue) == Some(1.0)).then_some(())
    })
    .await;

    // The user service is asked for exactly that user, by the order
    // service's principal.
    let asked = shop_testkit::eventually("the resync request", WAIT, || async {
        let asked = producer.asked.lock().unwrap().clone();
        (!asked.is_empty()).then_some(asked)
    })
    .await;
    assert_eq!(asked[0], (order_service(), vec![user.to_string()]));
    let requested = shop_testkit::eventually("the request counted", WAIT, || async {
        let metrics = shop_testkit::http_get(app.admin, "/metrics").await.ok()?.1;
        metric(
            &metrics,
            "consumer_gap_actions_total",
            &[
                ("queue", queue.as_str()),
                ("policy", "resync"),
                ("outcome", "requested"),
            ],
        )
        .filter(|count| *count >= 1.0)
    })
    .await;
    assert!(requested >= 1.0);
    let held = app.held().await;
    let action = held[0]
        .gap_action
        .clone()
        .expect("the action recorded for the listing");
    assert_eq!(
        (action.action.as_str(), action.outcome.as_deref()),
        ("resync", Some("requested"))
    );

    // The snapshot the user service would write to its outbox arrives.
    app.publish_user_event(&UserSnapshot {
        user_id: user.to_string(),
        version: 3,
        email: format!("{user}@example.com"),
        name: "Three".to_owned(),
        deleted: false,
        occurred_at: None,
    })
    .await;
    app.wait_for_user_version(user, 3).await;
    shop_testkit::eventually("the gap healed", WAIT, || async {
        let metrics = shop_testkit::http_get(app.admin, "/metrics").await.ok()?.1;
        let healed =
            gauge(&metrics, "consumer_stuck_gaps", &queue) == Some(0.0) && app.held().await.is_empty();
        healed.then_some(())
    })
    .await;
    let asked = producer.asked.lock().unwrap().clone();
    assert!(
        asked
            .iter()
            .all(|request| *request == (order_service(), vec![user.to_string()])),
        "{asked:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_users_snapshot_leaves_a_tombstone_at_its_version() {
    let app = crate::helpers::spawn_app().await;
    let user = app.known_user_id().await;
    app.publish_user_event(&UserSnapshot {
        user_id: user.to_string(),
        version: 4,
        deleted: true,
        ..UserSnapshot::default()
    })
    .await;
    let known = app.wait_for_user_version(user, 4).await;
    assert!(known.deleted, "{known:?}");
}

#[test]
fn the_resync_settings_are_checked_at_start() {
    let mut config = order_service::Config::defaults().service;
    config.user_events_keys = Some(shop_testkit::keys::trusted_keys());
    assert_eq!(OrderService::validate(&config), Ok(()));

    config.consumer.gap_policy = Some(GapPolicy::Resync);
    let error = OrderService::validate(&config).unwrap_err();
    assert!(error.contains("CONSUMER_RESYNC_URL"), "{error}");

    config.resync.url = Some("http://127.0.0.1:50051".to_owned());
    let error = OrderService::validate(&config).unwrap_err();
    assert!(error.contains("CONSUMER_RESYNC_TOKEN_FILE"), "{error}");

    let token = TokenFile::new();
    config.resync.token_file = Some(token.0.clone());
    assert_eq!(OrderService::validate(&config), Ok(()));

    config.resync.url = Some("http://user-service:50051".to_owned());
    let error = OrderService::validate(&config).unwrap_err();
    assert!(
        error.contains("https://"),
        "a token in plaintext over the network: {error}"
    );
    config.resync.allow_plaintext_token = true;
    assert_eq!(OrderService::validate(&config), Ok(()), "allowed explicitly");

    config.resync.url = Some("https://user-service:50051".to_owned());
    config.resync.token_file = Some(token.0.with_extension("missing"));
    let error = OrderService::validate(&config).unwrap_err();
    assert!(error.contains("CONSUMER_RESYNC_TOKEN_FILE"), "{error}");
}
