//! A session of a person (tables) and of a script (`--json`, exit codes).

use std::time::Duration;

use assert_cmd::Command;
use serde_json::Value;

use shop_testkit::TestKeys;

use crate::system::{System, start};

/// `shop` against `system`, with a token of the test's keys; no state
/// directory of the machine's is read.
fn shop(system: &System) -> Command {
    let mut command = anonymous(system);
    command.env("SHOP_TOKEN", TestKeys::shared().service_token());
    command
}

/// `shop` against `system` without credentials.
pub(crate) fn anonymous(system: &System) -> Command {
    let mut command = Command::cargo_bin("shop").unwrap();
    command
        .env("SHOP_USER_ENDPOINT", format!("http://{}", system.user_addr))
        .env("SHOP_ORDER_ENDPOINT", format!("http://{}", system.order_addr))
        .env("SHOP_STATE_DIR", "/nonexistent/shop-state")
        .env_remove("SHOP_TOKEN")
        .env_remove("SHOP_TOKEN_FILE")
        .timeout(Duration::from_secs(30));
    command
}

fn json(system: &System, args: &[&str]) -> (i32, Value) {
    let output = shop(system).arg("--json").args(args).output().unwrap();
    let value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&output.stdout)));
    (output.status.code().unwrap(), value)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_is_created_orders_once_known_cancels_and_lists_through_the_cli() {
    let system = start(true).await;

    let (code, user) = json(
        &system,
        &[
            "users",
            "create",
            "--email",
            "cli@example.com",
            "--name",
            "Cli User",
        ],
    );
    assert_eq!(code, 0, "{user}");
    let user_id = user["id"].as_str().unwrap().to_owned();
    assert_eq!(user["version"], 1);

    // The order service learns of the user from its event; until then the
    // CLI reports a conflict (failed precondition).
    let order = shop_testkit::eventually("the order to be accepted", Duration::from_secs(20), || {
        let system = &system;
        let user_id = user_id.clone();
        async move {
            let (code, order) = json(
                system,
                &[
                    "orders", "create", "--user", &user_id, "--item", "sku-1:2", "--item", "sku-7:1",
                ],
            );
            assert!(code == 0 || code == 4, "exit {code}: {order}");
            (code == 0).then_some(order)
        }
    })
    .await;
    assert_eq!(order["status"], "PENDING");
    assert_eq!(order["items"][1]["product_id"], "sku-7");
    let order_id = order["id"].as_str().unwrap().to_owned();

    let (code, cancelled) = json(&system, &["orders", "cancel", &order_id, "--version", "1"]);
    assert_eq!(code, 0, "{cancelled}");
    assert_eq!(cancelled["status"], "CANCELLED");
    assert_eq!(cancelled["version"], 2);

    let (code, listed) = json(&system, &["orders", "list", "--user", &user_id, "--all"]);
    assert_eq!(code, 0);
    assert_eq!(listed["orders"].as_array().unwrap().len(), 1);

    let table = shop(&system).args(["users", "list"]).output().unwrap();
    assert!(table.status.success());
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.contains("EMAIL") && table.contains("cli@example.com") && table.contains("Cli User"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_exit_with_codes_that_tell_them_apart() {
    let system = start(true).await;
    let (_, user) = json(
        &system,
        &[
            "users",
            "create",
            "--email",
            "codes@example.com",
            "--name",
            "Codes",
        ],
    );
    let user_id = user["id"].as_str().unwrap().to_owned();

    let (invalid, error) = json(
        &system,
        &["users", "create", "--email", "not-an-email", "--name", "X"],
    );
    assert_eq!(invalid, 2);
    assert_eq!(error["error"]["code"], "INVALID_ARGUMENT");
    assert_eq!(error["error"]["violations"][0]["field"], "email");

    let (missing, error) = json(&system, &["users", "get", "3f2504e0-4f89-41d3-9a0c-0305e82c3301"]);
    assert_eq!(missing, 3, "{error}");
    assert_eq!(error["error"]["code"], "NOT_FOUND");

    let (conflict, error) = json(
        &system,
        &["users", "update", &user_id, "--version", "7", "--name", "Late"],
    );
    assert_eq!(conflict, 4, "{error}");
    assert_eq!(error["error"]["code"], "ABORTED");

    let (taken, _) = json(
        &system,
        &[
            "users",
            "create",
            "--email",
            "CODES@example.com",
            "--name",
            "Again",
        ],
    );
    assert_eq!(taken, 4);

    let unavailable = shop(&system)
        .args(["--user-endpoint", "http://127.0.0.1:1", "users", "get", &user_id])
        .output()
        .unwrap();
    assert_eq!(unavailable.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&unavailable.stderr).contains("unavailable"));

    let usage = shop(&system)
        .args(["users", "create", "--email", "x@example.com"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2), "a missing --name is a usage error");

    let unauthenticated = anonymous(&system)
        .args(["users", "get", &user_id])
        .output()
        .unwrap();
    assert_eq!(unauthenticated.status.code(), Some(6), "{unauthenticated:?}");
    let reader = TestKeys::shared().token_with(&[shop_host::auth::Permission::UsersRead]);
    let denied = anonymous(&system)
        .env("SHOP_TOKEN", &reader)
        .args(["users", "delete", &user_id, "--version", "1"])
        .output()
        .unwrap();
    assert_eq!(denied.status.code(), Some(6), "{denied:?}");
    assert!(String::from_utf8_lossy(&denied.stderr).contains("permission denied"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_file_is_read_and_a_token_is_never_sent_in_plaintext_to_another_host() {
    let system = start(false).await;
    let dir = std::env::temp_dir().join(format!("shop-cli-token-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, format!("{}\n", TestKeys::shared().service_token())).unwrap();

    let listed = anonymous(&system)
        .env("SHOP_TOKEN_FILE", &file)
        .args(["users", "list"])
        .output()
        .unwrap();
    let remote = anonymous(&system)
        .env("SHOP_TOKEN_FILE", &file)
        .args([
            "--user-endpoint",
            "http://shop.example.com:50051",
            "users",
            "list",
        ])
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    assert!(listed.status.success(), "{listed:?}");
    assert_eq!(remote.status.code(), Some(2), "{remote:?}");
    let stderr = String::from_utf8_lossy(&remote.stderr);
    assert!(stderr.contains("plaintext"), "{stderr}");
    assert!(!stderr.contains(TestKeys::shared().service_token().as_str()));
}

#[test]
fn an_issued_token_verifies_against_the_key_set_keygen_wrote_and_names_its_subject_and_permissions() {
    let dir = std::env::temp_dir().join(format!("shop-cli-keys-{}", uuid::Uuid::new_v4().simple()));
    let run = |args: &[&str]| {
        let output = Command::cargo_bin("shop")
            .unwrap()
            .env("SHOP_STATE_DIR", &dir)
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}: {output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    run(&["token", "keygen"]);
    let token = run(&[
        "token",
        "issue",
        "--subject",
        "service:ops",
        "--permission",
        "users:read,orders:read",
        "--permission",
        "users:resync",
        "--ttl",
        "10m",
    ]);
    let refused = Command::cargo_bin("shop")
        .unwrap()
        .env("SHOP_STATE_DIR", &dir)
        .args([
            "token",
            "issue",
            "--subject",
            "admin",
            "--permission",
            "users:read",
        ])
        .output()
        .unwrap();

    let verifier = shop_host::auth::jwt::TokenVerifier::new(
        dir.join("jwt-keys.json"),
        "shop".to_owned(),
        "shop".to_owned(),
        Duration::from_secs(30),
    )
    .unwrap();
    let principal = verifier.verify(token.trim()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        principal.identity(),
        &shop_host::auth::Identity::Service("ops".into())
    );
    assert_eq!(
        principal.permissions().to_scope(),
        "users:read orders:read users:resync"
    );
    assert!(!refused.status.success(), "a subject the services would refuse");
}

#[test]
fn help_shows_examples_and_exit_codes() {
    let help = Command::cargo_bin("shop")
        .unwrap()
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8(help.stdout).unwrap();
    assert!(
        text.contains("Examples:") && text.contains("shop orders create") && text.contains("Exit codes"),
        "{text}"
    );
}
