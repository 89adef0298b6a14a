//! `shop users resync`: progress for people and scripts, and the
//! permission it needs.

use assert_cmd::Command;
use serde_json::Value;
use shop_host::auth::Permission;
use shop_testkit::TestKeys;

use crate::system::{System, start};

/// `shop` against `system` with a token of `permissions` only.
fn shop_with(system: &System, permissions: &[Permission]) -> Command {
    let mut command = crate::session::anonymous(system);
    command.env("SHOP_TOKEN", TestKeys::shared().token_with(permissions));
    command
}

fn create_user(system: &System, email: &str) -> String {
    let output = shop_with(system, &[Permission::UsersWrite])
        .args([
            "--json", "users", "create", "--email", email, "--name", "Resynced",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let user: Value = serde_json::from_slice(&output.stdout).unwrap();
    user["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn users_resync_streams_progress_as_json_lines_and_as_text_and_names_unknown_users() {
    let system = start(true).await;
    let ada = create_user(&system, "ada@example.com");
    create_user(&system, "bob@example.com");
    let stranger = uuid::Uuid::now_v7().to_string();

    let listed = shop_with(&system, &[Permission::UsersResync])
        .args(["--json", "users", "resync", "--user", &ada, "--user", &stranger])
        .output()
        .unwrap();
    let all = shop_with(&system, &[Permission::UsersResync])
        .args(["users", "resync", "--all", "--max-per-second", "10"])
        .output()
        .unwrap();

    assert!(listed.status.success(), "{listed:?}");
    let lines: Vec<Value> = String::from_utf8(listed.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(
        (last["written"].as_i64(), last["total"].as_i64()),
        (Some(1), Some(1))
    );
    assert_eq!(last["unknown_ids"], serde_json::json!([stranger]));
    assert!(all.status.success(), "{all:?}");
    let text = String::from_utf8(all.stdout).unwrap();
    assert!(text.contains("written 2 of 2 snapshots"), "{text}");
    assert!(text.contains("resync done: 2 snapshots written"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn users_resync_without_the_permission_or_with_a_bad_selection_exits_with_its_code() {
    let system = start(false).await;

    let denied = shop_with(&system, &[Permission::UsersRead, Permission::UsersWrite])
        .args(["users", "resync", "--all"])
        .output()
        .unwrap();
    let invalid = shop_with(&system, &[Permission::UsersResync])
        .args(["--json", "users", "resync", "--user", "not-a-uuid"])
        .output()
        .unwrap();
    let nothing = shop_with(&system, &[Permission::UsersResync])
        .args(["users", "resync"])
        .output()
        .unwrap();
    let both = shop_with(&system, &[Permission::UsersResync])
        .args([
            "users",
            "resync",
            "--all",
            "--changed-since",
            "2026-12-01T00:00:00Z",
        ])
        .output()
        .unwrap();

    assert_eq!(
        denied.status.code(),
        Some(i32::from(shop_cli::EXIT_DENIED)),
        "{denied:?}"
    );
    assert_eq!(
        invalid.status.code(),
        Some(i32::from(shop_cli::EXIT_USAGE)),
        "{invalid:?}"
    );
    let error: Value = serde_json::from_slice(&invalid.stdout).unwrap();
    assert_eq!(error["error"]["violations"][0]["field"], "users.ids[0]");
    assert_eq!(nothing.status.code(), Some(2), "{nothing:?}");
    assert_eq!(both.status.code(), Some(2), "{both:?}");
}

#[test]
fn users_resync_help_names_every_selection_and_the_permission() {
    let help = Command::cargo_bin("shop")
        .unwrap()
        .args(["users", "resync", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8(help.stdout).unwrap();
    for flag in [
        "--all",
        "--user <ID>",
        "--changed-since <RFC3339>",
        "--max-per-second <N>",
        "users:resync",
    ] {
        assert!(text.contains(flag), "{flag} in {text}");
    }
}
