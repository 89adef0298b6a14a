//! The user service: owns users and tells the rest of the system about every
//! change.
//!
//! Each command (`CreateUser`, `UpdateUser`, `DeleteUser`) validates its
//! request ([`validate`]), then runs one PostgreSQL transaction that changes
//! the `users` row and writes the matching event (`UserCreated`,
//! `UserUpdated`, `UserDeleted`) to the outbox ([`store`]). The outbox relay
//! publishes the events to the `user.events` topic exchange.
//!
//! [`app::Application`] builds the service (binding its listener, so tests
//! can use port 0) and runs it until shutdown; `main.rs` only wires
//! telemetry, settings and signals to it.
#![forbid(unsafe_code)]

pub mod app;
pub mod error;
pub mod grpc;
pub mod schema;
pub mod settings;
pub mod store;
pub mod validate;

pub use app::Application;
pub use settings::Settings;
