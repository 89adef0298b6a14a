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
//! # Several brokers
//!
//! `AMQP_URL` may name the nodes of a cluster, separated by commas:
//! [`connect`] tries them in turn, each attempt within the connect
//! deadline, and returns the first connection that opens. Every reconnect
//! (relay lanes, the consumer and its publisher, the dead-letter commands)
//! goes through it, so the clients of a node that stops, crashes or is cut
//! off from the others reconnect to another node. Each call starts one node
//! further than the call before, from a random node for the process's
//! first, so one instance's connections and instances started together
//! spread over the nodes. One URL behaves as it always did.
//!
//! # TLS
//!
//! An `amqps://` URL (port 5671 by default) connects over TLS through rustls
//! and verifies the broker: its certificate chain against the Mozilla roots
//! plus the PEM certificates in `AMQP_CA_FILE`, its name against the URL's
//! host. A broker signed by a private CA (the RabbitMQ Cluster Operator's
//! cert-manager issuer, a company CA) needs that CA in `AMQP_CA_FILE`.

use std::hash::{BuildHasher as _, Hasher as _};
use std::path::PathBuf;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder};
use secrecy::{ExposeSecret as _, SecretString};

/// Where the broker is.
#[derive(Debug, Clone, clap::Args)]
pub struct AmqpConfig {
    /// RabbitMQ URL: `amqp://user:password@host:port/vhost` (the vhost `/`
    /// is `%2f`), or `amqps://…:5671/…` for TLS. For a cluster, the URLs of
    /// its nodes separated by commas: every connection tries them in turn,
    /// starting one node further each time, so connections spread over the
    /// nodes and those of a lost node reconnect to another.
    #[arg(
        id = "amqp_url",
        long = "amqp-url",
        env = "AMQP_URL",
        value_name = "URL[,URL…]",
        default_value = "amqp://guest:guest@localhost:5672/%2f",
        hide_env_values = true,
        value_parser = amqp_urls
    )]
    pub url: SecretString,
    /// `AMQP_URL` read from this file instead (its content, the trailing
    /// line break dropped, checked as `AMQP_URL` is); setting both is an
    /// error.
    #[arg(
        id = "amqp_url_file",
        long = "amqp-url-file",
        env = "AMQP_URL_FILE",
        value_name = "PATH",
        conflicts_with = "amqp_url",
        value_parser = amqp_urls_file
    )]
    pub url_from_file: Option<SecretString>,
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

/// `AMQP_URL`, checked entry by entry at start-up: every entry names the
/// same user, the one every message this process publishes carries as its
/// `user_id` ([`AmqpConfig::user`]).
fn amqp_urls(value: &str) -> Result<SecretString, String> {
    let urls = shop_config::secret(value)?;
    let parsed = addresses(urls.expose_secret())?;
    if let Some(first) = parsed.first()
        && let Some(other) = parsed
            .iter()
            .find(|address| address.uri.authority.userinfo.username != first.uri.authority.userinfo.username)
    {
        return Err(format!(
            "every entry must name the same user: {} and {} do not",
            first.shown, other.shown
        ));
    }
    Ok(urls)
}

/// `AMQP_URL_FILE`: the file's content, checked as `AMQP_URL` is.
fn amqp_urls_file(path: &str) -> Result<SecretString, String> {
    amqp_urls(&shop_config::read_secret_file(path)?)
}

/// One broker of `AMQP_URL`.
#[derive(Debug)]
struct Address {
    uri: lapin::uri::AMQPUri,
    /// `host:port`, for logs and errors (never the credentials).
    shown: String,
}

/// The entries of `AMQP_URL` (one URL, or several separated by commas),
/// parsed. An error names the bad entry with its credentials hidden.
fn addresses(value: &str) -> Result<Vec<Address>, String> {
    let entries: Vec<&str> = value.split(',').map(str::trim).collect();
    let count = entries.len();
    entries
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            let which = if count == 1 {
                String::new()
            } else {
                format!("entry {} of {count} ", index + 1)
            };
            if entry.is_empty() {
                return Err(format!("{which}is empty"));
            }
            let hidden = without_credentials(entry);
            let uri = entry.parse::<lapin::uri::AMQPUri>().map_err(|error| {
                format!(
                    "{which}`{hidden}` is not an AMQP URL: {}",
                    error.replace(entry, &hidden)
                )
            })?;
            Ok(Address {
                uri,
                shown: host_and_port(entry).to_owned(),
            })
        })
        .collect()
}

/// `entry` with anything before an `@` in it (user and password) hidden.
fn without_credentials(entry: &str) -> String {
    let (scheme, rest) = entry.split_once("://").unwrap_or(("", entry));
    match rest.rsplit_once('@') {
        Some((_, host)) if scheme.is_empty() => format!("***@{host}"),
        Some((_, host)) => format!("{scheme}://***@{host}"),
        None => entry.to_owned(),
    }
}

/// The `host:port` of a URL (as written: the port may be the scheme's
/// default, left out).
fn host_and_port(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    rest.split(['/', '?']).next().unwrap_or(rest)
}

/// Where the next [`connect`] starts in the list of brokers: a random one
/// for the process's first connection, one further for each next.
static NEXT_ADDRESS: LazyLock<AtomicUsize> = LazyLock::new(|| {
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    AtomicUsize::new(usize::try_from(random % 1024).unwrap_or(0))
});

/// The order in which to try `count` addresses, starting at `start`
/// (wrapped): each once.
fn attempt_order(count: usize, start: usize) -> impl Iterator<Item = usize> {
    (0..count).map(move |step| (start.wrapping_add(step)) % count)
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

    /// Puts `AMQP_URL_FILE`'s content in place of `AMQP_URL`'s value;
    /// called once the settings are parsed.
    pub fn read_files(&mut self) {
        if let Some(url) = self.url_from_file.take() {
            self.url = url;
        }
    }

    /// The user this process connects as (the user of `AMQP_URL`, `guest`
    /// when the URL names none). RabbitMQ checks the `user_id` property of
    /// every message published against the connection's user and refuses
    /// any other, so whatever this process publishes (events, and the
    /// copies it makes of a delivery: retries, dead letters, replays, moved
    /// messages) carries this one.
    pub fn user(&self) -> String {
        addresses(self.url.expose_secret())
            .ok()
            .and_then(|parsed| parsed.into_iter().next())
            .map_or_else(
                || "guest".to_owned(),
                |address| address.uri.authority.userinfo.username,
            )
    }

    /// Whether every entry of `AMQP_URL` speaks TLS (`amqps://`).
    pub fn is_tls(&self) -> bool {
        self.url
            .expose_secret()
            .split(',')
            .all(|entry| entry.trim().to_ascii_lowercase().starts_with("amqps://"))
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
/// `rabbitmqctl list_connections`), with the configured heartbeat, to the
/// first broker of `AMQP_URL` that takes it, each attempt within the
/// configured deadline (so with N brokers at most N deadlines in all).
pub async fn connect(config: &AmqpConfig, name: &str) -> anyhow::Result<Connection> {
    let addresses = addresses(config.url.expose_secret())
        .map_err(|error| anyhow::anyhow!("invalid AMQP_URL: {error}"))?;
    let tls = config.tls()?;
    let start = NEXT_ADDRESS.fetch_add(1, Ordering::Relaxed);
    let mut tried = Vec::with_capacity(addresses.len());
    let mut last_error = None;
    for index in attempt_order(addresses.len(), start) {
        let address = &addresses[index];
        match connect_to(config, address, name, tls.clone()).await {
            Ok(connection) => return Ok(connection),
            Err(error) => {
                if addresses.len() > 1 {
                    tracing::warn!(
                        broker = %address.shown,
                        connection = name,
                        error = format!("{error:#}"),
                        "broker unreachable, trying the next"
                    );
                }
                tried.push(address.shown.as_str());
                last_error = Some(error);
            }
        }
    }
    let error = last_error.unwrap_or_else(|| anyhow::anyhow!("AMQP_URL names no broker"));
    Err(error.context(format!(
        "failed to connect to RabbitMQ as {name} (tried {})",
        tried.join(", ")
    )))
}

async fn connect_to(
    config: &AmqpConfig,
    address: &Address,
    name: &str,
    tls: OwnedTLSConfig,
) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let mut uri = address.uri.clone();
    uri.query.heartbeat = Some(u16::try_from(config.heartbeat.as_secs()).unwrap_or(u16::MAX));
    let builder = DefaultConnectionBuilder::new()
        .context("no async runtime for the RabbitMQ connection")?
        .with_uri(uri)
        .with_properties(properties)
        .with_tls_config(tls);
    Ok(within(config.timeout, "connecting", builder.connect()).await??)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_is_one_address() {
        let parsed = addresses("amqp://guest:guest@localhost:5672/%2f").unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].shown, "localhost:5672");
        assert_eq!(parsed[0].uri.authority.port, 5672);
        assert_eq!(parsed[0].uri.vhost, "/");
    }

    #[test]
    fn a_list_is_every_node_in_order_with_spaces_allowed() {
        let parsed = addresses(
            "amqp://u:p@rabbit-1:5672/%2f, amqp://u:p@rabbit-2:5673/%2f ,amqps://u:p@rabbit-3/shop",
        )
        .unwrap();
        let shown: Vec<&str> = parsed.iter().map(|a| a.shown.as_str()).collect();
        assert_eq!(shown, ["rabbit-1:5672", "rabbit-2:5673", "rabbit-3"]);
        assert_eq!(parsed[2].uri.authority.port, 5671);
        assert_eq!(parsed[2].uri.vhost, "shop");
    }

    #[test]
    fn a_bad_entry_is_named_without_its_password() {
        let error =
            addresses("amqp://u:s3cret@rabbit-1:5672/%2f,http://u:s3cret@rabbit-2:5672/%2f").unwrap_err();
        assert!(
            error.starts_with("entry 2 of 2 `http://***@rabbit-2:5672/%2f`"),
            "{error}"
        );
        assert!(!error.contains("s3cret"), "{error}");
        assert!(!error.contains('\n'), "{error}");

        let error = addresses("amqp://u:s3cret@rabbit-1:notaport/%2f").unwrap_err();
        assert!(
            error.starts_with("`amqp://***@rabbit-1:notaport/%2f` is not an AMQP URL"),
            "{error}"
        );
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn the_user_is_the_urls_and_every_entry_must_name_the_same() {
        assert_eq!(
            AmqpConfig::new("amqp://order-service:pw@rabbit:5672/%2f").user(),
            "order-service"
        );
        assert_eq!(
            AmqpConfig::new("amqp://shop%2Ddlq:pw@rabbit/%2f").user(),
            "shop-dlq"
        );
        assert_eq!(AmqpConfig::new("amqp://rabbit:5672/%2f").user(), "guest");
        assert!(amqp_urls("amqp://a:p@rabbit-1/%2f,amqp://a:q@rabbit-2/%2f").is_ok());
        let error = amqp_urls("amqp://a:s3cret@rabbit-1/%2f,amqp://b:s3cret@rabbit-2/%2f").unwrap_err();
        assert!(
            error.contains("same user") && !error.contains("s3cret"),
            "{error}"
        );
    }

    #[test]
    fn tls_means_every_entry_is_amqps() {
        assert!(AmqpConfig::new("amqps://u:p@a:5671/%2f,AMQPS://u:p@b/%2f").is_tls());
        assert!(!AmqpConfig::new("amqps://u:p@a:5671/%2f,amqp://u:p@b/%2f").is_tls());
        assert!(!AmqpConfig::new("amqp://u:p@a/%2f").is_tls());
    }

    #[test]
    fn empty_entries_are_refused() {
        assert_eq!(
            addresses("amqp://localhost,").unwrap_err(),
            "entry 2 of 2 is empty"
        );
        assert_eq!(
            addresses("amqp://a,,amqp://b").unwrap_err(),
            "entry 2 of 3 is empty"
        );
        assert!(amqp_urls("  ").is_err());
    }

    #[test]
    fn the_setting_accepts_a_list_and_refuses_a_bad_entry() {
        assert!(amqp_urls("amqp://guest:guest@localhost:5672/%2f").is_ok());
        assert!(amqp_urls("amqp://a:5672/%2f,amqp://b:5672/%2f,amqp://c:5672/%2f").is_ok());
        let error = amqp_urls("amqp://a:5672/%2f,postgres://x:pw@b/db").unwrap_err();
        assert!(
            error.contains("entry 2 of 2") && !error.contains("pw@"),
            "{error}"
        );
    }

    #[test]
    fn every_address_is_tried_once_from_the_start_on() {
        assert_eq!(attempt_order(3, 0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(attempt_order(3, 1).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(attempt_order(3, 5).collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(attempt_order(1, 7).collect::<Vec<_>>(), [0]);
        assert_eq!(attempt_order(3, usize::MAX).count(), 3);
    }

    #[test]
    fn successive_connections_start_at_successive_nodes() {
        // Consecutive starts, wherever the counter stands, cover every node
        // before one repeats: the connections of an instance spread over
        // the cluster.
        for base in [0_usize, 1, 1022] {
            let mut firsts: Vec<usize> = (0..3)
                .map(|step| attempt_order(3, base.wrapping_add(step)).next().unwrap())
                .collect();
            firsts.sort_unstable();
            assert_eq!(firsts, [0, 1, 2], "from {base}");
        }
    }

    #[tokio::test]
    async fn connect_names_every_address_it_tried() {
        // Two ports nothing listens on (bound, then released).
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (a, b) = (free(), free());
        let config = AmqpConfig::new(format!(
            "amqp://guest:s3cret@127.0.0.1:{a}/%2f,amqp://guest:s3cret@127.0.0.1:{b}/%2f"
        ));
        let error = format!("{:#}", connect(&config, "test").await.unwrap_err());
        assert!(error.contains(&format!("127.0.0.1:{a}")), "{error}");
        assert!(error.contains(&format!("127.0.0.1:{b}")), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
    }
}
