//! The consumer against the real PostgreSQL and RabbitMQ, with handlers
//! written for the tests: inbox, ordering by version, retries, dead letters,
//! reconnection.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

mod consumer;
mod dead_letters;
mod delivery_limit;
mod faults;
mod ordered;
mod resync;
mod routing;
mod support;
mod trust;
