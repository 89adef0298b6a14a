//! Cross-service tests against the real PostgreSQL and RabbitMQ.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]
// `system` is shared with the trace tests, which use more of it.
#![allow(dead_code)]

mod alarms;
mod auth;
mod brokers;
mod contract;
mod database_roles;
mod envelopes;
mod flow;
mod golden;
mod model;
mod monitoring;
mod processes;
mod python;
mod readme;
mod restore;
mod system;
