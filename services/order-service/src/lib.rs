//! The order service: owns orders and keeps a projection of users from the
//! user service's events.
//!
//! - Commands (`CreateOrder`, `CancelOrder`) validate their request
//!   ([`validate`]) and run one transaction that writes the order rows and
//!   the event (`OrderCreated`, `OrderCancelled`) to the outbox ([`store`]);
//!   the relay publishes them to the `order.events` exchange.
//! - An order can only be placed for a user the projection knows and has not
//!   seen deleted: `known_users`, fed by `user.created`, `user.updated` and
//!   `user.deleted` through a typed consumer with an inbox, retries and
//!   dead-lettering ([`projection`], `shop_messaging::consumer`), and by
//!   `user.snapshot`, which the consumer's gap policy asks the user service
//!   for when events are missing ([`resync`]).
//! - [`app::OrderService`] tells the service host (`shop-host`) what is the
//!   order service's own: its settings, migrations, gRPC service and
//!   consumer; the host does the rest.
#![forbid(unsafe_code)]

pub mod app;
pub mod error;
pub mod grpc;
pub mod projection;
pub mod resync;
pub mod schema;
pub mod store;
pub mod validate;

pub use app::{Application, Config, OrderConfig, OrderService};
