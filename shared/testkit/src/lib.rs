//! Test isolation against the real PostgreSQL and RabbitMQ.
//!
//! - [`TestDatabase`]: a fresh database per test, copied from a migrated
//!   template (one template per migration set, rebuilt when the migration
//!   files change), dropped when the test ends.
//! - [`TestBroker`]: a name prefix per test for exchanges and queues, and the
//!   deletion of what the test declared when it ends; [`ProbeQueue`] reads
//!   what was published to an exchange.
//! - [`eventually`]: polling with a deadline instead of sleeping.
//!
//! `TEST_DATABASE_URL` (default
//! `postgres://postgres:postgres@localhost:5432/postgres`) names the server
//! and a maintenance database; `TEST_AMQP_URL` (default
//! `amqp://guest:guest@localhost:5672/%2f`) the broker. Set `TEST_LOG` to see
//! the services' logs.
#![forbid(unsafe_code)]

mod broker;
mod database;

pub use broker::{ProbeQueue, TestBroker};
pub use database::TestDatabase;

use std::future::Future;
use std::time::Duration;

/// Installs telemetry for the test process once, as the services' `main`
/// would: spans and trace propagation always, log output only when
/// `TEST_LOG` is set.
pub fn init_test_log() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut config = shop_telemetry::TelemetryConfig::from_env("test", "0");
        if std::env::var_os("TEST_LOG").is_none() {
            config.log_filter = "off".to_owned();
        }
        if let Ok(guard) = shop_telemetry::init(&config) {
            // Lives for the whole test process.
            std::mem::forget(guard);
        }
    });
}

/// Polls `check` every 20 ms until it returns `Some`, or fails after
/// `deadline` with `what` in the message.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A short random id for names.
pub(crate) fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}
