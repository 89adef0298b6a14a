//! Test isolation against the real PostgreSQL and RabbitMQ.
//!
//! - [`TestDatabase`]: a fresh database per test, copied from a migrated
//!   template (one template per migration set, rebuilt when the migration
//!   files change), dropped when the test ends; [`TestRoles`]: login roles
//!   of one test (a migrator, a runtime role), dropped with it.
//! - [`TestBroker`]: a name prefix per test for exchanges and queues, and the
//!   deletion of what the test declared when it ends; [`ProbeQueue`] reads
//!   what was published to an exchange.
//! - [`TestPublisher`]: publishes events as the relay would (signed with
//!   [`keys::signing_key`]), or any bytes.
//! - [`keys`]: real event signing keys made in the test process, and the
//!   files a service process reads them from.
//! - [`TcpProxy`]: a proxy between a service and PostgreSQL or RabbitMQ that
//!   cuts or refuses connections on demand.
//! - [`ServiceProcess`]: a service binary run as a child process, stopped
//!   with SIGTERM or killed.
//! - [`Running`]: a service running in the test process, stopped with the
//!   test.
//! - [`auth`]: a real key pair per test and tokens signed with it, so
//!   services run with authentication on ([`TestKeys`]).
//! - [`eventually`]: polling with a deadline instead of sleeping.
//! - [`command_line`]: what a service binary does before it runs (help,
//!   version, printed configuration, bad settings).
//! - [`RabbitCluster`]: a RabbitMQ cluster of its own (three nodes of the
//!   local installation by default) for failover, quorum queue and partition
//!   tests.
//!
//! `TEST_DATABASE_URL` (default
//! `postgres://shop_test:shop_test@localhost:5432/postgres`) names the server
//! and a maintenance database; `TEST_AMQP_URL` (default
//! `amqp://shop_test:shop_test@localhost:5672/%2f`) the broker. Both
//! defaults are the documented test identity, which compose creates (and
//! `.ci/run` on a native server): it may create databases, roles (and end
//! their sessions), exchanges and queues, and is no superuser and no
//! administrator. Set `TEST_LOG` to see the services' logs.
#![forbid(unsafe_code)]

pub mod auth;
mod broker;
pub mod cluster;
pub mod command_line;
mod database;
pub mod keys;
mod process;
mod proxy;
mod publisher;
mod running;

pub use auth::{AuthChannel, Bearer, TestKeys};
pub use broker::{ProbeQueue, TestBroker};
pub use cluster::{ClusterOptions, QuorumMember, RabbitCluster};
pub use database::{DEFAULT_TEST_DATABASE_URL, TestDatabase, TestRoles};
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
        let mut config = shop_telemetry::TelemetryConfig::new("test", "0");
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

/// `TEST_AMQP_URL`, or the test identity on the local broker.
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_TEST_AMQP_URL.to_owned())
}

/// The test identity's default broker URL.
pub const DEFAULT_TEST_AMQP_URL: &str = "amqp://shop_test:shop_test@localhost:5672/%2f";

/// The address of the broker in [`amqp_url`].
pub async fn amqp_addr() -> std::net::SocketAddr {
    address_of(&amqp_url(), 5672).await
}

/// The address of the PostgreSQL server in `TEST_DATABASE_URL`.
pub async fn postgres_addr() -> std::net::SocketAddr {
    address_of(&database::admin_url(), 5432).await
}

/// The IPv4 address (when it has one) of the host and port of `url`.
async fn address_of(url: &str, default_port: u16) -> std::net::SocketAddr {
    #[allow(clippy::expect_used)]
    let parsed = url::Url::parse(url).expect("the test URL is a URL");
    let host_port = format!(
        "{}:{}",
        parsed.host_str().unwrap_or("localhost"),
        parsed.port().unwrap_or(default_port)
    );
    #[allow(clippy::expect_used)]
    let addrs: Vec<_> = tokio::net::lookup_host(host_port)
        .await
        .expect("the test URL's host resolves")
        .collect();
    // Servers often listen on IPv4 only, while `localhost` may resolve to ::1 first.
    #[allow(clippy::expect_used)]
    addrs
        .iter()
        .find(|addr| addr.is_ipv4())
        .or(addrs.first())
        .copied()
        .expect("the test URL's host has an address")
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
    let scrape = prometheus_parse::Scrape::parse(metrics.lines().map(|line| Ok(line.to_owned()))).ok()?;
    scrape
        .samples
        .iter()
        .filter(|sample| sample.metric == name)
        .find(|sample| {
            labels
                .iter()
                .all(|(key, value)| sample.labels.get(key) == Some(*value))
        })
        .and_then(|sample| match sample.value {
            prometheus_parse::Value::Counter(value)
            | prometheus_parse::Value::Gauge(value)
            | prometheus_parse::Value::Untyped(value) => Some(value),
            _ => None,
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
