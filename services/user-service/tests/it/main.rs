//! Integration tests of the user service against the real PostgreSQL and
//! RabbitMQ: each test has its own database and its own exchange.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

mod atomicity;
mod auth;
mod binary;
mod broker_tls;
mod callers;
mod consumers;
mod database_tls;
mod faults;
mod helpers;
mod limits;
mod metrics;
mod properties;
mod relay;
mod resync;
mod retention;
mod rpc;
mod server;
