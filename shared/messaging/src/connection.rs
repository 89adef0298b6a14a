//! Connecting to RabbitMQ, and bounding every wait on it.
//!
//! # Silent connections
//!
//! A connection can stop carrying bytes without being closed (a NAT or a
//! firewall that forgot the flow, a paused VM). Two things notice: the AMQP
//! heartbeat (`AMQP_HEARTBEAT`, 5 s: lapin closes a connection that
//! received nothing for twice the interval), and the deadline every
//! operation is given ([`within`], `AMQP_TIMEOUT`). Either ends the
//! connection's users with an error, and they reconnect with backoff.
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
#[derive(Debug, Clone, clap::Args)]
pub struct AmqpConfig {
    /// RabbitMQ URL: `amqp://user:password@host:port/vhost` (the vhost `/`
    /// is `%2f`), or `amqps://…:5671/…` for TLS.
    #[arg(
        id = "amqp_url",
        long = "amqp-url",
        env = "AMQP_URL",
        value_name = "URL",
        default_value = "amqp://guest:guest@localhost:5672/%2f",
        hide_env_values = true,
        value_parser = shop_config::secret
    )]
    pub url: SecretString,
    /// PEM certificates trusted, beside the Mozilla roots, to sign the
    /// broker's certificate on an `amqps://` URL.
    #[arg(
        id = "amqp_ca_file",
        long = "amqp-ca-file",
        env = "AMQP_CA_FILE",
        value_name = "PATH"
    )]
    pub ca_file: Option<PathBuf>,
    /// Heartbeat interval asked of the broker (the lower of the broker's and
    /// this wins): a connection that carries nothing for twice this is
    /// declared dead and replaced, so a silent one is noticed within about
    /// twice this.
    #[arg(
        id = "amqp_heartbeat",
        long = "amqp-heartbeat",
        env = "AMQP_HEARTBEAT",
        value_name = "DURATION",
        default_value = "5s",
        value_parser = heartbeat
    )]
    pub heartbeat: Duration,
    /// Deadline of every broker operation (connecting, opening a channel,
    /// declaring, a publisher confirm, an acknowledgement): past it the
    /// connection counts as lost.
    #[arg(
        id = "amqp_timeout",
        long = "amqp-timeout",
        env = "AMQP_TIMEOUT",
        value_name = "DURATION",
        default_value = "10s",
        value_parser = shop_config::duration
    )]
    pub timeout: Duration,
}

fn heartbeat(value: &str) -> Result<Duration, String> {
    let heartbeat = shop_config::duration(value)?;
    if heartbeat < Duration::from_secs(1) || heartbeat > Duration::from_secs(600) {
        return Err("must be between 1s and 10m (whole seconds on the wire)".to_owned());
    }
    Ok(heartbeat)
}

impl AmqpConfig {
    /// The defaults, for the broker at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        let mut config: Self = shop_config::defaults();
        config.url = SecretString::from(url.into());
        config
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
/// `rabbitmqctl list_connections`), with the configured heartbeat, within
/// the configured deadline.
pub async fn connect(config: &AmqpConfig, name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let mut uri: lapin::uri::AMQPUri = config
        .url
        .expose_secret()
        .parse()
        .map_err(|error: String| anyhow::anyhow!("invalid AMQP_URL: {error}"))?;
    uri.query.heartbeat = Some(u16::try_from(config.heartbeat.as_secs()).unwrap_or(u16::MAX));
    let builder = DefaultConnectionBuilder::new()
        .context("no async runtime for the RabbitMQ connection")?
        .with_uri(uri)
        .with_properties(properties)
        .with_tls_config(config.tls()?);
    within(config.timeout, "connecting", builder.connect())
        .await?
        .with_context(|| format!("failed to connect to RabbitMQ as {name}"))
}

/// The broker did not answer an operation within its deadline.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the broker did not answer {operation} within {deadline:?}")]
pub struct Timeout {
    /// What was waited for.
    pub operation: &'static str,
    /// How long.
    pub deadline: Duration,
}

/// `operation` (a broker round trip) within `deadline`: every wait on the
/// broker has one, so no task waits forever on a silent connection.
pub async fn within<T>(
    deadline: Duration,
    operation: &'static str,
    future: impl std::future::Future<Output = T>,
) -> Result<T, Timeout> {
    tokio::time::timeout(deadline, future)
        .await
        .map_err(|_| Timeout { operation, deadline })
}
