//! The `shop` binary end to end, against both services running in this
//! process on real PostgreSQL and RabbitMQ.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub, dead_code)]

// Both services wired together, as the cross-service tests run them.
#[path = "../../../../tests/system/system.rs"]
mod system;

mod dlq;
mod identities;
mod resync;
mod session;
mod up;
mod up_keys;
