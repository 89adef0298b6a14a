//! The binary as an operator runs it.

use std::time::Duration;

use shop_contracts::user as pb;
use shop_contracts::user::user_service_client::UserServiceClient;
use shop_testkit::{ServiceProcess, TestBroker, TestKeys};

use crate::helpers::test_database;

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_without_a_collector_logs_json_with_trace_ids_no_errors_and_stops_on_sigterm() {
    let db = test_database().await;
    let broker = TestBroker::new();
    // A queue that takes the events: the relay warns about events no queue
    // takes.
    let _consumer = broker.probe(&broker.exchange("user.events"), "#").await.unwrap();
    let mut service = ServiceProcess::start(
        env!("CARGO_BIN_EXE_user-service"),
        &[
            // Trust authentication ignores the password; the logs must not show it.
            (
                "DATABASE_URL",
                db.url()
                    .replace("://postgres:postgres@", "://postgres:s3cret-db-pw@"),
            ),
            ("AMQP_URL", shop_testkit::amqp_url()),
            ("USER_EVENTS_EXCHANGE", broker.exchange("user.events")),
            ("RUST_LOG", "info,shop_telemetry=debug,shop_host=debug".to_owned()),
        ]
        .into_iter()
        .chain(TestKeys::shared().env())
        .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", service.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let mut request = tonic::Request::new(pb::CreateUserRequest {
        email: "process@example.com".to_owned(),
        name: "Process".to_owned(),
        request_id: String::new(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-b7ad6b7169203331-01").parse().unwrap(),
    );

    let token = TestKeys::shared().service_token();
    let mut client = UserServiceClient::new(shop_testkit::auth::with_token(channel.clone(), &token));
    client.create_user(request).await.unwrap();
    // A refused call too: its token must not be logged either.
    let wrong = TestKeys::new().service_token();
    UserServiceClient::new(shop_testkit::auth::with_token(channel, &wrong))
        .get_user(pb::GetUserRequest::default())
        .await
        .unwrap_err();
    // Let the relay publish, so its path is in the logs too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = service.terminate().await.unwrap();

    assert!(status.success(), "exit status {status}");
    let lines = service.lines();
    for line in &lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        let level = value["level"].as_str().unwrap_or_default();
        assert!(
            level != "WARN" && level != "ERROR",
            "unexpected {level} line: {line}"
        );
    }
    assert!(
        !lines.iter().any(|line| line.contains("s3cret-db-pw")),
        "a log line shows the database password"
    );
    let signature = |token: &str| token.rsplit('.').next().unwrap().to_owned();
    assert!(
        !lines
            .iter()
            .any(|line| line.contains(&signature(&token)) || line.contains(&signature(&wrong))),
        "a log line shows a bearer token"
    );
    let call = lines
        .iter()
        .find(|line| line.contains("call finished"))
        .expect("the call is logged");
    assert!(call.contains(&format!("\"trace_id\":\"{trace_id}\"")), "{call}");
    assert!(call.contains("\"span_id\":\""), "{call}");
    assert!(lines.iter().any(|line| line.contains("user service stopped")));
}

#[test]
fn the_command_line_answers_help_version_and_print_config_and_refuses_bad_settings_in_one_line() {
    shop_testkit::command_line::assert_command_line(
        env!("CARGO_BIN_EXE_user-service"),
        &[
            "DATABASE_URL",
            "AMQP_URL",
            "GRPC_ADDR",
            "RELAY_LANES",
            "USER_EVENTS_EXCHANGE",
        ],
    );
}
