//! Typed async clients for the shop's gRPC services.
//!
//! [`UserClient`] and [`OrderClient`] are built from a [`ClientConfig`]
//! (endpoint, optional TLS, credentials, per-call deadline, retry policy).
//! Every call
//!
//! - carries the credentials: a bearer token ([`ClientConfig::with_token`],
//!   sent as `authorization: Bearer …`, marked sensitive so HTTP/2 header
//!   compression never indexes it) and/or a client certificate
//!   ([`TlsConfig::client_identity`]). A token is sent over TLS, or in
//!   plaintext only to this machine (`localhost`, `127.0.0.0/8`, `::1`),
//!   unless [`ClientConfig::allow_plaintext_token`] says otherwise: on any
//!   other network it could be read and replayed. Over TLS the server's
//!   certificate is checked against Mozilla's roots (built in, the same as
//!   the services' database and broker connections) unless a CA is given;
//!
//! - carries the current trace context (`traceparent`), so a call made
//!   inside a traced operation continues its trace;
//! - has a deadline ([`ClientConfig::timeout`]);
//! - is retried with exponential backoff and jitter when the server is
//!   `UNAVAILABLE` (and, for calls that are safe to repeat, when the deadline
//!   passed). Creates are safe to repeat because the client sends a
//!   `request_id` it generates once per logical call: a retried create
//!   returns what the first attempt created. Updates, deletes and
//!   cancellations carry the caller's `expected_version`, so a retry can
//!   never apply twice (at worst it reports a conflict);
//! - fails with a typed [`Error`]: not found, already exists, invalid with
//!   its field violations, conflict, failed precondition, unavailable.
//!
//! ```no_run
//! use shop_client::{ClientConfig, Error, OrderClient, UserClient};
//!
//! # async fn example() -> Result<(), Error> {
//! let token = shop_client::SecretString::from(std::env::var("SHOP_TOKEN").unwrap_or_default());
//! let users = UserClient::connect(ClientConfig::new("http://localhost:50051").with_token(token.clone()))?;
//! let orders = OrderClient::connect(ClientConfig::new("http://localhost:50052").with_token(token))?;
//!
//! let ada = users.create_user("ada@example.com", "Ada Lovelace").await?;
//! let order = orders.create_order(&ada.id, &[("sku-1", 2), ("sku-7", 1)]).await?;
//! orders.cancel_order(&order.id, order.version).await?;
//!
//! match users.get_user("3f2504e0-4f89-41d3-9a0c-0305e82c3301").await {
//!     Err(Error::NotFound(message)) => println!("no such user: {message}"),
//!     other => println!("{other:?}"),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Errors keep what the server said:
//!
//! ```
//! use shop_client::Error;
//!
//! let error = Error::from(tonic::Status::aborted("user 1 is at version 3, not the expected version 2"));
//! assert!(matches!(error, Error::Conflict(_)));
//! assert_eq!(error.code(), tonic::Code::Aborted);
//! ```
#![forbid(unsafe_code)]

mod config;
mod error;
mod orders;
mod retry;
mod users;

pub use config::{Backoff, ClientConfig, ClientIdentity, RetryPolicy, TlsConfig};
pub use error::{Error, FieldViolation};
pub use orders::OrderClient;
pub use secrecy::SecretString;
pub use shop_contracts::order::{Order, OrderItem, OrderStatus};
pub use shop_contracts::user::{ResyncUsersProgress as ResyncProgress, User};
pub use users::{ResyncSelection, UserClient, UserUpdate};

/// One page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// Pass as `page_token` for the next page; empty on the last page.
    pub next_page_token: String,
}
