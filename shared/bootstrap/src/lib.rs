//! The parts every service is built from, so each service's `main.rs` stays a
//! page long and both services start, serve and stop the same way.
//!
//! - [`admin`]: the admin HTTP port (Prometheus metrics, dependency health).
//! - [`settings`]: typed values from environment variables, with secrets that
//!   never print.
//! - [`db`]: the PostgreSQL pool (diesel-async on deadpool), creating the
//!   database on first run and applying embedded migrations under a lock.
//! - [`grpc`]: reflection, health, field-violation errors, limits and TLS.
//! - [`limit`]: load shedding past a bound on calls in flight.
//! - [`shutdown`]: SIGINT/SIGTERM to a cancellation token, and waiting for
//!   tasks bounded by a grace period.
#![forbid(unsafe_code)]

pub mod admin;
pub mod db;
pub mod grpc;
pub mod limit;
pub mod settings;
pub mod shutdown;
pub mod validate;
