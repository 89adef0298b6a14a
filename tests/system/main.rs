//! Cross-service tests against the real PostgreSQL and RabbitMQ.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

mod flow;
mod golden;
mod system;
