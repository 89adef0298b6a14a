//! Integration tests of the order service against the real PostgreSQL and
//! RabbitMQ: each test has its own database, exchanges and queues.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

mod auth;
mod binary;
mod helpers;
mod metrics;
mod projection;
mod properties;
mod resync;
mod retention;
mod rpc;
mod server;
mod trust;
