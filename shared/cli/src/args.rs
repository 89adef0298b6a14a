//! The command line's arguments.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use shop_config::{ExposeSecret as _, SecretString};

/// The shop's command line: users, orders and dead letters over gRPC and
/// AMQP, and the whole system run locally.
#[derive(Debug, Parser)]
#[command(
    name = "shop",
    version,
    about,
    after_help = EXAMPLES,
    after_long_help = EXAMPLES,
)]
pub struct Cli {
    /// Print JSON instead of tables (errors too, on stdout).
    #[arg(long, global = true)]
    pub json: bool,
    /// Where the services and the broker are.
    #[command(flatten)]
    pub connection: Connection,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

const EXAMPLES: &str = "\
Examples:
  shop users create --email ada@example.com --name 'Ada Lovelace'
  shop users list --all
  shop users update <id> --version 1 --name 'Ada King'
  shop users resync --changed-since 2026-12-01T00:00:00Z --max-per-second 200
  shop orders create --user <user id> --item sku-1:2 --item sku-7:1
  shop orders cancel <order id> --version 1
  shop --json orders list --user <user id> | jq '.orders[].status'
  shop dlq list
  shop dlq replay --reason max-attempts
  shop dlq skip <message id>   # give up on one dead letter; what waited behind it goes on
  shop up                      # both services, against the local PostgreSQL and RabbitMQ
  shop token issue --subject service:ops --permission users:read,orders:read --ttl 1h
  shop event-keys new --id user-service-2026-12 --private user.key --public user-events.keys

Credentials: --token / SHOP_TOKEN, --token-file / SHOP_TOKEN_FILE, else the
token `shop up` writes; --cert-file and --key-file for a client certificate;
https:// endpoints for TLS (--ca-file for a private CA).

Exit codes: 0 ok, 2 usage or invalid request, 3 not found, 4 conflict
(already exists, version mismatch, failed precondition), 5 unavailable,
6 unauthenticated or not permitted, 1 other.";

/// Endpoints and deadlines.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The user service.
    #[arg(
        long,
        global = true,
        env = "SHOP_USER_ENDPOINT",
        default_value = "http://localhost:50051"
    )]
    pub user_endpoint: String,
    /// The order service.
    #[arg(
        long,
        global = true,
        env = "SHOP_ORDER_ENDPOINT",
        default_value = "http://localhost:50052"
    )]
    pub order_endpoint: String,
    /// Deadline of each call.
    #[arg(
        long,
        global = true,
        env = "SHOP_TIMEOUT",
        default_value = "10s",
        value_parser = shop_config::duration
    )]
    pub timeout: Duration,
    /// A bearer token for the services; unset, the token file.
    #[arg(
        long,
        global = true,
        env = "SHOP_TOKEN",
        hide_env_values = true,
        value_parser = shop_config::secret
    )]
    pub token: Option<shop_config::SecretString>,
    /// A file holding the token; unset, the `token` that `shop up` writes in
    /// the state directory (SHOP_STATE_DIR, else ~/.local/state/shop), when
    /// there is one.
    #[arg(long, global = true, env = "SHOP_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// PEM certificates of the CA that signs the services' certificates
    /// (https:// endpoints); unset, Mozilla's root certificates.
    #[arg(long, global = true, env = "SHOP_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// A client certificate (PEM), for services that authenticate callers
    /// by certificate; with --key-file.
    #[arg(long, global = true, env = "SHOP_CERT_FILE", requires = "key_file")]
    pub cert_file: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "SHOP_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<std::path::PathBuf>,
    /// Send the token over plaintext (http://) to a host that is not this
    /// machine, where anyone on the path could read it; only on a network
    /// you trust.
    #[arg(long, global = true, env = "SHOP_ALLOW_PLAINTEXT_TOKEN")]
    pub allow_plaintext_token: bool,
    /// RabbitMQ, for the dead-letter commands (a cluster: its nodes' URLs,
    /// separated by commas, tried in turn), as their own broker user
    /// (`shop-dlq` in the shipped definitions).
    #[arg(
        long,
        global = true,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@localhost:5672/%2f",
        hide_env_values = true,
        value_parser = shop_config::secret
    )]
    pub amqp_url: SecretString,
    /// `--amqp-url` read from this file instead; setting both is an error.
    #[arg(
        long,
        global = true,
        env = "AMQP_URL_FILE",
        value_name = "PATH",
        conflicts_with = "amqp_url",
        value_parser = shop_config::secret_file
    )]
    pub amqp_url_file: Option<SecretString>,
    /// PEM certificates that sign the broker's certificate, for an
    /// `amqps://` URL whose CA is not a public one.
    #[arg(long, global = true, env = "AMQP_CA_FILE")]
    pub amqp_ca_file: Option<std::path::PathBuf>,
    /// The consumer queue whose dead letters the dlq commands manage.
    #[arg(
        long,
        global = true,
        env = "USER_EVENTS_QUEUE",
        default_value = "order-service.user-events"
    )]
    pub queue: String,
    /// That consumer's database, where the events parked behind dead
    /// letters and gaps wait (the dlq commands), as their own role (the one
    /// the order service's `DLQ_DATABASE_ROLE` names). Unset:
    /// `DATABASE_URL` if set, else the local `orders`.
    #[arg(
        long,
        global = true,
        env = "CONSUMER_DATABASE_URL",
        hide_env_values = true,
        value_parser = shop_config::secret
    )]
    pub consumer_database_url: Option<SecretString>,
    /// `--consumer-database-url` read from this file instead; setting both
    /// is an error.
    #[arg(
        long,
        global = true,
        env = "CONSUMER_DATABASE_URL_FILE",
        value_name = "PATH",
        conflicts_with = "consumer_database_url",
        value_parser = shop_config::secret_file
    )]
    pub consumer_database_url_file: Option<SecretString>,
}

impl Connection {
    /// The broker settings of the dead-letter commands.
    pub fn amqp(&self) -> shop_messaging::AmqpConfig {
        let url = self.amqp_url_file.as_ref().unwrap_or(&self.amqp_url);
        let mut amqp = shop_messaging::AmqpConfig::new(url.expose_secret());
        amqp.ca_file.clone_from(&self.amqp_ca_file);
        amqp
    }

    /// The client settings of `endpoint`: the deadline, the token and TLS.
    pub fn client_config(&self, endpoint: &str) -> anyhow::Result<shop_client::ClientConfig> {
        let mut config = shop_client::ClientConfig::new(endpoint).with_timeout(self.timeout);
        config.token = self.token()?;
        config.allow_plaintext_token = self.allow_plaintext_token;
        let read = |path: &std::path::Path| {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
        };
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(certificate), Some(key)) => {
                Some(shop_client::ClientIdentity::new(read(certificate)?, read(key)?))
            }
            _ => None,
        };
        if endpoint.starts_with("https://") || self.ca_file.is_some() || identity.is_some() {
            config.tls = Some(shop_client::TlsConfig {
                ca_certificate_pem: self.ca_file.as_deref().map(read).transpose()?,
                domain: None,
                client_identity: identity,
            });
        }
        Ok(config)
    }

    /// The token: `--token`, else the file `--token-file`, else the state
    /// directory's `token` when there is one.
    fn token(&self) -> anyhow::Result<Option<shop_config::SecretString>> {
        if let Some(token) = &self.token {
            return Ok(Some(token.clone()));
        }
        let (path, required) = match &self.token_file {
            Some(path) => (path.clone(), true),
            None => match crate::token::state_dir() {
                Ok(dir) => (dir.join(crate::token::TOKEN), false),
                Err(_) => return Ok(None),
            },
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(shop_config::secret(&text).map_err(|error| {
                anyhow::anyhow!("the token file {}: {error}", path.display())
            })?)),
            Err(error) if !required && error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => {
                Err(error).with_context(|| format!("cannot read the token file {}", path.display()))
            }
        }
    }

    /// The consumer's database: `--consumer-database-url` (or its file),
    /// else `DATABASE_URL`, else the local `orders`.
    pub fn consumer_database(&self) -> SecretString {
        self.consumer_database_url_file
            .clone()
            .or_else(|| self.consumer_database_url.clone())
            .or_else(|| std::env::var("DATABASE_URL").ok().map(SecretString::from))
            .unwrap_or_else(|| {
                SecretString::from(
                    <order_service::app::OrderService as shop_host::Service>::DEFAULTS.database_url,
                )
            })
    }
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, read, change, delete and list users.
    #[command(subcommand)]
    Users(UsersCommand),
    /// Place, read, list and cancel orders.
    #[command(subcommand)]
    Orders(OrdersCommand),
    /// Inspect and repair the dead-letter queue of a consumer.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Run both services in this process against the local PostgreSQL and
    /// RabbitMQ (databases created and migrated, topology declared) until
    /// Ctrl-C, with authentication on: development credentials in the state
    /// directory (a signing key made at the first start, a token the other
    /// commands use). Each service reads its own variables (see
    /// `user-service --help`), except where the flags below give it its own.
    Up(crate::up::UpArgs),
    /// Bearer tokens for calling the services, and the key that signs them.
    #[command(subcommand)]
    Token(crate::token::TokenCommand),
    /// Event signing keys: every event is signed by its producer, and
    /// consumers apply only what a key they trust signed.
    #[command(subcommand)]
    EventKeys(EventKeysCommand),
}

/// Event signing key commands.
#[derive(Debug, Subcommand)]
pub enum EventKeysCommand {
    /// Make a producer's signing key (kept if its file exists) and add its
    /// public line to the consumers' keys file; prints that line.
    New(crate::keys::NewKey),
}

/// Paging of a listing.
#[derive(Debug, Clone, Args)]
pub struct PageArgs {
    /// Rows per page (1 to 1000; the server's default when unset).
    #[arg(long)]
    pub page_size: Option<i32>,
    /// Start at this page (a next_page_token from a previous listing).
    #[arg(long, default_value = "")]
    pub page_token: String,
    /// Follow the pages to the end.
    #[arg(long)]
    pub all: bool,
}

/// User commands.
#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a user (retried safely: a request id makes it happen once).
    Create {
        /// Email address.
        #[arg(long)]
        email: String,
        /// Display name.
        #[arg(long)]
        name: String,
    },
    /// Show a user.
    Get {
        /// User id.
        id: String,
    },
    /// Change a user's email and/or name.
    Update {
        /// User id.
        id: String,
        /// The version you last saw (the change is refused if it moved).
        #[arg(long)]
        version: i64,
        /// New email.
        #[arg(long)]
        email: Option<String>,
        /// New name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Delete a user.
    Delete {
        /// User id.
        id: String,
        /// The version you last saw.
        #[arg(long)]
        version: i64,
    },
    /// List users in creation order.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Republish users' current state as snapshot events, so that a
    /// consumer that missed events catches up (needs users:resync). Prints
    /// progress after every batch.
    Resync(ResyncArgs),
}

/// Which users `shop users resync` republishes, and how fast.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("selection").required(true).args(["all", "users", "changed_since"])))]
pub struct ResyncArgs {
    /// Every user, deleted ones included.
    #[arg(long)]
    pub all: bool,
    /// These users (ids; repeat or separate with commas, at most 1000).
    #[arg(long = "user", value_name = "ID", value_delimiter = ',', num_args = 1..)]
    pub users: Vec<String>,
    /// Users created, updated or deleted at or after this time (RFC 3339,
    /// e.g. 2026-12-01T00:00:00Z).
    #[arg(long, value_name = "RFC3339", value_parser = rfc3339)]
    pub changed_since: Option<std::time::SystemTime>,
    /// At most this many snapshots a second (unset: the service's bound,
    /// RESYNC_MAX_PER_SECOND).
    #[arg(long, value_name = "N")]
    pub max_per_second: Option<i32>,
}

fn rfc3339(value: &str) -> Result<std::time::SystemTime, String> {
    chrono::DateTime::parse_from_rfc3339(value)
        .map(std::time::SystemTime::from)
        .map_err(|error| format!("{value:?} is not an RFC 3339 time such as 2026-12-01T00:00:00Z: {error}"))
}

/// One item of an order on the command line: `product_id:quantity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Product id.
    pub product_id: String,
    /// Quantity.
    pub quantity: i32,
}

impl std::str::FromStr for Item {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        let (product_id, quantity) = value
            .rsplit_once(':')
            .ok_or_else(|| format!("{value:?} is not product_id:quantity"))?;
        let quantity = quantity
            .parse()
            .map_err(|_| format!("quantity {quantity:?} in {value:?} is not a number"))?;
        Ok(Self {
            product_id: product_id.to_owned(),
            quantity,
        })
    }
}

/// Order commands.
#[derive(Debug, Subcommand)]
pub enum OrdersCommand {
    /// Place an order (retried safely: a request id makes it happen once).
    Create {
        /// Id of the user placing it.
        #[arg(long)]
        user: String,
        /// An item as product_id:quantity; repeat for more items.
        #[arg(long = "item", required = true)]
        items: Vec<Item>,
    },
    /// Show an order.
    Get {
        /// Order id.
        id: String,
    },
    /// List a user's orders in creation order.
    List {
        /// User id.
        #[arg(long)]
        user: String,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Cancel a pending order.
    Cancel {
        /// Order id.
        id: String,
        /// The version you last saw.
        #[arg(long)]
        version: i64,
    },
}

/// Dead-letter commands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Count the dead letters by reason and type, and list every aggregate
    /// whose events are parked: behind a dead letter, or behind a gap.
    List,
    /// Print one dead letter (headers, decoded body) and the events of its
    /// aggregate parked behind it.
    Show {
        /// Its message id (the event id).
        message_id: String,
    },
    /// Send dead letters back to the consumer (all, or those matching every
    /// filter given); applied, each releases the events parked behind it,
    /// in order.
    Replay {
        /// Only this reason: too-large, unauthenticated, missing-message-id,
        /// unknown-type, undecodable, rejected, max-attempts, park-limit,
        /// crashed.
        #[arg(long)]
        reason: Option<String>,
        /// Only this type, e.g. shop.user.v1.UserCreated.
        #[arg(long = "type")]
        type_name: Option<String>,
        /// Only this message id.
        #[arg(long)]
        message_id: Option<String>,
    },
    /// Give up on one dead letter: remove it without applying it, and let
    /// the events parked behind it go on, in order. Works also when the
    /// letter is no longer in the queue, for the aggregate that waits on it.
    Skip {
        /// Its message id (the event id).
        message_id: String,
    },
    /// Give up on the versions an aggregate's parked events wait for (a gap
    /// that will not fill): the first parked event and those after it are
    /// applied, in order. A dead letter that holds the aggregate and is no
    /// longer in the queue is given up too; a first parked event already
    /// next in line is sent again.
    Release {
        /// The aggregate, TYPE/ID as `shop dlq list` prints it.
        aggregate: String,
    },
    /// Set an aggregate's position to VERSION, back or forth: the way out
    /// of a version conflict after the producer's database was restored
    /// (set it below the reused versions, then resync the aggregate from
    /// the producer: its snapshot applies). Parked events at or below it
    /// are forgotten; the next one is released.
    SetPosition {
        /// The aggregate, TYPE/ID as `shop dlq list` prints it.
        aggregate: String,
        /// The version it counts as having applied (0: none).
        #[arg(value_parser = clap::value_parser!(i64).range(0..))]
        version: i64,
    },
    /// Delete every dead letter; refused (nothing deleted) while an
    /// aggregate waits on one of them: replay or skip those first.
    Purge {
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_parse_as_product_and_quantity() {
        assert_eq!(
            "sku:1:3".parse::<Item>(),
            Ok(Item {
                product_id: "sku:1".to_owned(),
                quantity: 3
            })
        );
        assert!("sku".parse::<Item>().is_err());
        assert!("sku:x".parse::<Item>().is_err());
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
