//! A consumer in another language, against the real services: the Python
//! consumer of `tests/python/consume_events.py`, which knows only the
//! contract bundle (`docs/contract/`), binds a queue of its own to every
//! channel of the AsyncAPI document, and checks every event both services
//! publish while the SDK drives them. Its output lists each event it checked;
//! any violation fails the test.
//!
//! The Python packages (pinned in `tests/python/requirements.txt`, the
//! minimum client versions the events page names) live in a virtualenv that
//! `.ci/install-tools` makes: `target/contract-venv`, or the interpreter in
//! `SHOP_CONTRACT_PYTHON`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use shop_client::{ClientConfig, Error, OrderClient, UserClient, UserUpdate};
use tokio::io::{AsyncBufReadExt as _, BufReader};

use crate::contract;

const DEADLINE: Duration = Duration::from_secs(90);

fn python() -> PathBuf {
    std::env::var_os("SHOP_CONTRACT_PYTHON").map_or_else(
        || contract::repository().join("target/contract-venv/bin/python"),
        PathBuf::from,
    )
}

/// Every user and order event type, driven through the SDK: two users (one
/// updated twice, one deleted), one order placed and cancelled.
async fn drive(users: &UserClient, orders: &OrderClient) -> usize {
    let ada = users.create_user("py-ada@example.com", "Ada").await.unwrap();
    let grace = users.create_user("py-grace@example.com", "Grace").await.unwrap();
    let update = |name: &str| UserUpdate {
        email: None,
        name: Some(name.to_owned()),
    };
    users.update_user(&ada.id, 1, update("Ada L.")).await.unwrap();
    users
        .update_user(&ada.id, 2, update("Ada Lovelace"))
        .await
        .unwrap();
    users.delete_user(&grace.id, 1).await.unwrap();
    // The order service accepts the order once Ada's events reached it.
    let order = shop_testkit::eventually("the order service to know the user", DEADLINE, || async {
        match orders.create_order(&ada.id, &[("sku-1", 2)]).await {
            Ok(order) => Some(order),
            Err(Error::FailedPrecondition(_)) => None,
            Err(other) => panic!("create order: {other}"),
        }
    })
    .await;
    orders.cancel_order(&order.id, 1).await.unwrap();
    // 2 created, 2 updated, 1 deleted; 1 order created, 1 cancelled.
    7
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the Python consumer's virtualenv (.ci/install-tools makes target/contract-venv); run: cargo test -p system-tests --test system python -- --ignored"]
async fn a_python_consumer_built_from_the_bundle_alone_accepts_every_event_both_services_publish() {
    let python = python();
    assert!(
        python.exists(),
        "{} is missing: run .ci/install-tools (or set SHOP_CONTRACT_PYTHON)",
        python.display()
    );
    let mut system = crate::processes::start(shop_testkit::amqp_url(), &[]).await;
    // Both services sign with the tests' key: the consumer trusts it alone.
    let trusted = std::env::temp_dir().join(format!("shop-python-trusted-{}.keys", std::process::id()));
    std::fs::write(
        &trusted,
        format!("{}\n", shop_testkit::keys::signing_key().trusted_line()),
    )
    .unwrap();
    let order_exchange = system.broker.exchange("order.events");

    let mut child = tokio::process::Command::new(&python)
        .arg(contract::repository().join("tests/python/consume_events.py"))
        .arg("--bundle")
        .arg(contract::bundle_dir())
        .args(["--amqp-url", &shop_testkit::amqp_url()])
        .args(["--exchange", &format!("user.events={}", system.user_exchange)])
        .args(["--exchange", &format!("order.events={order_exchange}")])
        .args(["--count", "7", "--timeout", "60"])
        .arg("--trusted-keys")
        .arg(&trusted)
        .args([
            "--expect-types",
            "shop.user.v1.UserCreated,shop.user.v1.UserUpdated,shop.user.v1.UserDeleted,\
             shop.order.v1.OrderCreated,shop.order.v1.OrderCancelled",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut output = Vec::new();
    // Its queue is bound before anything is published.
    tokio::time::timeout(DEADLINE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let ready = line.starts_with("ready:");
            output.push(line);
            if ready {
                return;
            }
        }
        panic!(
            "the Python consumer stopped before it was ready:\n{}",
            output.join("\n")
        );
    })
    .await
    .expect("the Python consumer binds its queue");

    // The services require credentials: a service token of the tests' issuer.
    let client = |addr| {
        let token = secrecy::SecretString::from(shop_testkit::TestKeys::shared().service_token());
        ClientConfig::new(format!("http://{addr}")).with_token(token)
    };
    let users = UserClient::connect(client(system.users.addr)).unwrap();
    let orders = OrderClient::connect(client(system.orders.addr)).unwrap();
    let published = drive(&users, &orders).await;

    let status = tokio::time::timeout(DEADLINE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            output.push(line);
        }
        child.wait().await.unwrap()
    })
    .await
    .expect("the Python consumer finishes");
    system.terminate().await;
    std::fs::remove_file(&trusted).unwrap();
    let output = output.join("\n");
    // Straight to the terminal, past the test harness's capture: CI's log
    // shows every event the consumer checked.
    writeln!(std::io::stderr(), "{output}").unwrap();
    assert!(
        status.success(),
        "the Python consumer found violations:\n{output}"
    );
    let checked = output.lines().filter(|l| l.starts_with("checked: ")).count();
    assert_eq!(checked, published, "every published event checked:\n{output}");
    let signed = output
        .lines()
        .filter(|l| l.starts_with("checked: ") && l.contains(" signed by "))
        .count();
    assert_eq!(signed, published, "every event's signature verified:\n{output}");
    for type_name in [
        "shop.user.v1.UserCreated",
        "shop.user.v1.UserUpdated",
        "shop.user.v1.UserDeleted",
        "shop.order.v1.OrderCreated",
        "shop.order.v1.OrderCancelled",
    ] {
        assert!(
            output.contains(&format!("checked: {type_name} ")),
            "no {type_name} checked:\n{output}"
        );
    }
}
