//! Places an order the way a client of the shop does, with nothing but the
//! SDK (`shop-client`): creates a user, waits until the order service knows
//! them (the `user.created` event travels through the outbox, RabbitMQ and
//! the order service's consumer), places an order, reads it back and
//! cancels it.
//!
//! ```sh
//! docker compose up --build          # or: cargo run --release -p shop-cli -- up
//! cargo run -p shop-examples --bin place-order
//! ```
//!
//! The endpoints come from `SHOP_USER_ENDPOINT` and `SHOP_ORDER_ENDPOINT`
//! (the `shop` command line's variables), `http://localhost:50051` and
//! `:50052` by default, and the bearer token from `SHOP_TOKEN` (the README's
//! "Try it" says how to get one; it needs `users:write`,
//! `orders:read` and `orders:write`). Every call has a deadline and is retried while the
//! server is unavailable; the create calls carry a request id, so a retry
//! never creates twice.
#![forbid(unsafe_code)]
// A command-line program: its output is the point.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use anyhow::Context as _;
use shop_client::{ClientConfig, Error, OrderClient, SecretString, UserClient};

/// The connection settings of both clients, in one place: the credentials
/// (the token; TLS with `.with_tls(...)`) are added here, and both clients
/// get them.
fn config(endpoint: String, token: &SecretString) -> ClientConfig {
    ClientConfig::new(endpoint)
        .with_timeout(Duration::from_secs(5))
        .with_token(token.clone())
}

fn endpoint(variable: &str, default: &str) -> String {
    std::env::var(variable).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let token = SecretString::from(
        std::env::var("SHOP_TOKEN").context("SHOP_TOKEN is not set: the services need a bearer token")?,
    );
    let users = UserClient::connect(config(
        endpoint("SHOP_USER_ENDPOINT", "http://localhost:50051"),
        &token,
    ))?;
    let orders = OrderClient::connect(config(
        endpoint("SHOP_ORDER_ENDPOINT", "http://localhost:50052"),
        &token,
    ))?;

    // A new email every run: the service refuses a taken one (ALREADY_EXISTS).
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis());
    let email = format!("ada+{stamp}@example.com");
    let ada = users
        .create_user(&email, "Ada Lovelace")
        .await
        .context("creating a user")?;
    println!("user {} ({}) created, version {}", ada.id, ada.email, ada.version);

    // The order service accepts orders only for users it has heard of:
    // until the user's event arrives (milliseconds, usually), it answers
    // FAILED_PRECONDITION. Anything else is final.
    let until = Instant::now() + Duration::from_secs(30);
    let order = loop {
        match orders.create_order(&ada.id, &[("sku-1", 2), ("sku-7", 1)]).await {
            Ok(order) => break order,
            Err(Error::FailedPrecondition(why)) if Instant::now() < until => {
                println!("not yet: {why}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(Error::InvalidArgument { violations, .. }) => {
                anyhow::bail!("the order was refused: {violations:?}")
            }
            Err(other) => return Err(other).context("placing an order"),
        }
    };
    println!(
        "order {} placed: {} item(s), status {:?}",
        order.id,
        order.items.len(),
        order.status()
    );

    let read = orders
        .get_order(&order.id)
        .await
        .context("reading the order back")?;
    let cancelled = orders
        .cancel_order(&read.id, read.version)
        .await
        .context("cancelling the order")?;
    println!(
        "order {} cancelled: status {:?}, version {}",
        cancelled.id,
        cancelled.status(),
        cancelled.version
    );
    Ok(())
}
