//! The user service: owns users and tells the rest of the system about every
//! change.
//!
//! Each command (`CreateUser`, `UpdateUser`, `DeleteUser`) validates its
//! request ([`validate`]), then runs one PostgreSQL transaction that changes
//! the `users` row and writes the matching event (`UserCreated`,
//! `UserUpdated`, `UserDeleted`) to the outbox ([`store`]). The outbox relay
//! publishes the events to the `user.events` topic exchange.
//!
//! `ResyncUsers` republishes the current state of selected users as
//! `UserSnapshot` events, paced and in batches ([`resync`]); a deleted
//! user leaves a tombstone (its id and last version, no personal data) so
//! that it can be republished as deleted.
//!
//! [`app::UserService`] tells the service host (`shop-host`) what is the
//! user service's own: its settings, migrations and gRPC service; the host
//! does the rest (configuration, command line, server, relay, shutdown).
#![forbid(unsafe_code)]

pub mod app;
pub mod error;
pub mod grpc;
pub mod resync;
pub mod schema;
pub mod store;
pub mod validate;

pub use app::{Application, Config, UserConfig, UserService};
