//! Test isolation against the real PostgreSQL and RabbitMQ.
//!
//! - [`TestDatabase`]: a fresh database per test, copied from a migrated
//!   template (one template per migration set, rebuilt when the migration
//!   files change), dropped when the test ends.
//! - [`TestBroker`]: a name prefix per test for exchanges and queues, and the
//!   deletion of what the test declared when it ends; [`ProbeQueue`] reads
//!   what was published to an exchange.
//! - [`TestPublisher`]: publishes events as the relay would, or any bytes.
//! - [`TcpProxy`]: a proxy between a service and PostgreSQL or RabbitMQ that
//!   cuts or refuses connections on demand.
//! - [`ServiceProcess`]: a service binary run as a child process, stopped
//!   with SIGTERM or killed.
//! - [`Running`]: a service running in the test process, stopped with the
//!   test.
//! - [`eventually`]: polling with a deadline instead of sleeping.
//! - [`RabbitCluster`]: a RabbitMQ cluster of its own (three nodes of the
//!   local installation by default) for failover, quorum queue and partition
//!   tests.
//!
//! `TEST_DATABASE_URL` (default
//! `postgres://postgres:postgres@localhost:5432/postgres`) names the server
//! and a maintenance database; `TEST_AMQP_URL` (default
//! `amqp://guest:guest@localhost:5672/%2f`) the broker. Set `TEST_LOG` to see
//! the services' logs.
#![forbid(unsafe_code)]

mod broker;
pub mod cluster;
mod database;
mod process;
mod proxy;
mod publisher;
mod running;

pub use broker::{ProbeQueue, TestBroker};
pub use cluster::{ClusterOptions, QuorumMember, RabbitCluster};
pub use database::TestDatabase;
pub use process::{ServiceProcess, http_get};
pub use proxy::TcpProxy;
pub use publisher::TestPublisher;
pub use running::Running;

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

/// `TEST_AMQP_URL`, or the local default.
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@localhost:5672/%2f".to_owned())
}

/// The address of the broker in [`amqp_url`].
pub async fn amqp_addr() -> std::net::SocketAddr {
    let url = amqp_url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5672")
    };
    #[allow(clippy::expect_used)]
    let addrs: Vec<_> = tokio::net::lookup_host(host_port)
        .await
        .expect("TEST_AMQP_URL host resolves")
        .collect();
    // Brokers often listen on IPv4 only, while `localhost` may resolve to ::1 first.
    addrs
        .iter()
        .find(|addr| addr.is_ipv4())
        .or(addrs.first())
        .copied()
        .expect("TEST_AMQP_URL host has an address")
}

/// The field paths of the `google.rpc.BadRequest` of an `INVALID_ARGUMENT`
/// status (panics on any other status).
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt as _;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    #[allow(clippy::expect_used)]
    let details = status.get_details_bad_request().expect("BadRequest details");
    details.field_violations.into_iter().map(|v| v.field).collect()
}

/// The value of the Prometheus sample `name` whose labels include every one
/// of `labels`, in the text exposition `metrics`.
pub fn metric(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((series_name, rest)) => (series_name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            let present: Vec<(&str, &str)> = series_labels
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .map(|(key, value)| (key, value.trim_matches('"')))
                .collect();
            labels
                .iter()
                .all(|wanted| present.contains(wanted))
                .then(|| value.parse().ok())
                .flatten()
        })
}

#[cfg(test)]
mod metric_tests {
    use super::metric;

    #[test]
    fn metric_finds_a_sample_by_name_and_labels() {
        let text = "# TYPE a counter\na{x=\"1\",y=\"2\"} 3\na{x=\"2\"} 4\nb 5\n";
        assert_eq!(metric(text, "a", &[("y", "2")]), Some(3.0));
        assert_eq!(metric(text, "a", &[("x", "2")]), Some(4.0));
        assert_eq!(metric(text, "b", &[]), Some(5.0));
        assert_eq!(metric(text, "a", &[("x", "3")]), None);
    }
}
