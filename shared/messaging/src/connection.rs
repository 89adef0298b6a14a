//! Connecting to RabbitMQ.
//!
//! # TLS
//!
//! An `amqps://` URL (port 5671 by default) connects over TLS through rustls
//! and verifies the broker: its certificate chain against the Mozilla roots
//! plus the PEM certificates in `AMQP_CA_FILE`, its name against the URL's
//! host. A broker signed by a private CA (the RabbitMQ Cluster Operator's
//! cert-manager issuer, a company CA) needs that CA in `AMQP_CA_FILE`.

use std::path::PathBuf;

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
/// `rabbitmqctl list_connections`).
pub async fn connect(config: &AmqpConfig, name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    DefaultConnectionBuilder::new()
        .context("no async runtime for the RabbitMQ connection")?
        .with_uri_str(config.url.expose_secret().to_owned())
        .with_properties(properties)
        .with_tls_config(config.tls()?)
        .connect()
        .await
        .with_context(|| format!("failed to connect to RabbitMQ as {name}"))
}
