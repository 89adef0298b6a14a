//! Connecting to RabbitMQ, and waiting between attempts when it is away.
//!
//! # TLS
//!
//! An `amqps://` URL (port 5671 by default) connects over TLS through rustls
//! and verifies the broker: its certificate chain against the Mozilla roots
//! plus the PEM certificates in `AMQP_CA_FILE`, its name against the URL's
//! host. A broker signed by a private CA (the RabbitMQ Cluster Operator's
//! cert-manager issuer, a company CA) needs that CA in `AMQP_CA_FILE`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder};
use secrecy::{ExposeSecret as _, SecretString};

/// Where the broker is.
#[derive(Debug, Clone)]
pub struct AmqpSettings {
    /// `amqp://user:password@host:port/vhost` (the vhost `/` is `%2f`), or
    /// `amqps://` for TLS.
    pub url: SecretString,
    /// PEM certificates trusted, beside the Mozilla roots, to sign the
    /// broker's certificate on an `amqps://` URL.
    pub ca_file: Option<PathBuf>,
}

impl AmqpSettings {
    /// `AMQP_URL` (default `amqp://guest:guest@localhost:5672/%2f`),
    /// `AMQP_CA_FILE` (none).
    pub fn from_env() -> Self {
        Self {
            url: shop_bootstrap::settings::secret("AMQP_URL", "amqp://guest:guest@localhost:5672/%2f"),
            ca_file: std::env::var_os("AMQP_CA_FILE")
                .filter(|path| !path.is_empty())
                .map(PathBuf::from),
        }
    }

    /// Settings for `url` with no extra CA.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: SecretString::from(url.into()),
            ca_file: None,
        }
    }

    /// The TLS configuration for an `amqps://` URL: the extra CA, checked
    /// to hold at least one certificate (the TLS library would skip
    /// unparsable ones silently).
    fn tls(&self) -> anyhow::Result<OwnedTLSConfig> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;

        let Some(path) = &self.ca_file else {
            return Ok(OwnedTLSConfig::default());
        };
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read AMQP_CA_FILE {}", path.display()))?;
        let certificates = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("AMQP_CA_FILE {} holds an invalid certificate", path.display()))?;
        anyhow::ensure!(
            !certificates.is_empty(),
            "AMQP_CA_FILE {} holds no certificate",
            path.display()
        );
        Ok(OwnedTLSConfig {
            identity: None,
            cert_chain: Some(pem),
        })
    }
}

/// Opens a connection named `name` (shown in the management UI and by
/// `rabbitmqctl list_connections`).
pub async fn connect(settings: &AmqpSettings, name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    DefaultConnectionBuilder::new()
        .context("no async runtime for the RabbitMQ connection")?
        .with_uri_str(settings.url.expose_secret().to_owned())
        .with_properties(properties)
        .with_tls_config(settings.tls()?)
        .connect()
        .await
        .with_context(|| format!("failed to connect to RabbitMQ as {name}"))
}

/// Capped exponential backoff with jitter, for reconnecting: no busy loop
/// while a dependency is down, and replicas do not retry in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Starts at `initial`, doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay (the current step, jittered to 50–100 %), then doubles
    /// the step.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.current;
        self.current = (self.current * 2).min(self.max);
        step.mul_f64(rand::random_range(0.5..=1.0))
    }

    /// Back to the initial step, after a success.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }

    /// Whether the next delay is already at the cap (the dependency has been
    /// away for a while: log less).
    pub fn at_cap(&self) -> bool {
        self.current >= self.max
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let delays: Vec<_> = (0..5).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays[0] >= Duration::from_millis(50));
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(400)));
        assert!(delays[4] >= Duration::from_millis(200));
        assert!(backoff.at_cap());
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
