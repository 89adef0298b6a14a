//! The database itself, its schema and its pool.
//!
//! [`connect`] is the one call a service makes at start-up: it creates the
//! database when it does not exist yet (and the role may create it, so a
//! newcomer's first run just works), applies the service's embedded
//! migrations while holding an advisory lock (replicas starting together
//! migrate once), and returns a deadpool pool of diesel-async connections. No
//! libpq is involved at build or run time: the driver is tokio-postgres.
//!
//! # Two roles: the migrator and the runtime
//!
//! With `DATABASE_MIGRATION_URL` set, the service migrates as that URL's
//! user (the migrator, which owns the schema), grants the user of
//! `DATABASE_URL` (the runtime role) only row access (`runtime_grants.sql`,
//! [`RUNTIME_GRANTS`], with default privileges so the tables of later
//! migrations are reachable too), and serves as the runtime role, which
//! can then neither change the schema nor create databases. In that setup
//! the service creates no database: the operator creates it, owned by the
//! migrator, and a missing one is an error that says so. Unset, the service migrates and
//! serves as `DATABASE_URL`'s user, as one role does everything in
//! development. Other roles can be granted what they need at the same
//! moment, by the owner ([`Grant`]; the dead-letter commands' role is one).
//!
//! # TLS
//!
//! With `sslmode=require` in the URL, every connection (the pool's, the
//! relay's `LISTEN` session, the one that creates the database) speaks TLS
//! through rustls, and the server's certificate is **verified**: its chain
//! against the Mozilla roots plus the PEM certificates in
//! `DATABASE_CA_FILE`, and its name against the URL's host. That is libpq's
//! `verify-full`, which tokio-postgres' URL parser does not accept by name.
//! A managed server's CA (RDS, Cloud SQL, Azure) goes in `DATABASE_CA_FILE`.
//! `sslmode=disable` and `prefer` (the default) connect without TLS.

use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;

use anyhow::Context as _;
use diesel::{ConnectionError, ConnectionResult};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod};
use diesel_async::{AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl as _};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness as _};
use futures::FutureExt as _;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use secrecy::{ExposeSecret as _, SecretString};
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

type DeadpoolPool = diesel_async::pooled_connection::deadpool::Pool<AsyncPgConnection>;
/// A connection checked out of a [`Pool`].
pub type PooledConnection = diesel_async::pooled_connection::deadpool::Object<AsyncPgConnection>;
/// Why no connection could be had.
pub type PoolError = diesel_async::pooled_connection::deadpool::PoolError;

/// A pool of diesel-async PostgreSQL connections, and the deadline of the
/// work done on them.
#[derive(Clone)]
pub struct Pool {
    inner: DeadpoolPool,
    deadline: Duration,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("status", &self.inner.status())
            .field("deadline", &self.deadline)
            .finish()
    }
}

/// The database did not answer within the deadline: it is away or the
/// connection went silent. The connection was discarded.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the database did not answer within {0:?}")]
pub struct Timeout(pub Duration);

impl Pool {
    /// A connection, waiting at most the acquire timeout for one. Work on it
    /// has no deadline of the client's: prefer [`Pool::run`].
    pub async fn get(&self) -> Result<PooledConnection, PoolError> {
        self.inner.get().await
    }

    /// Runs `work` on a pooled connection within the deadline
    /// (`DATABASE_STATEMENT_TIMEOUT`). When the deadline passes, the
    /// connection is taken out of the pool and closed (it may be silent, not
    /// slow, and must not serve the next caller) and the caller gets a
    /// [`Timeout`]. Work that runs a transaction is rolled back by the
    /// server when the connection goes.
    pub async fn run<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, E>,
        E: From<PoolError> + From<Timeout>,
    {
        self.run_within(self.deadline, work).await
    }

    /// [`Pool::run`] with another deadline (a relay batch also waits for
    /// the broker inside its transaction).
    pub async fn run_within<T, E, F>(&self, deadline: Duration, work: F) -> Result<T, E>
    where
        F: AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, E>,
        E: From<PoolError> + From<Timeout>,
    {
        let mut conn = self.get().await?;
        let started = std::time::Instant::now();
        match tokio::time::timeout(deadline, work(&mut conn)).await {
            Ok(result) => result,
            Err(_) => {
                Self::discard(conn);
                // Its idle siblings went silent with it, most likely (one
                // network path, one frozen NAT table): they go too, so the
                // next callers open fresh connections instead of each
                // waiting out the deadline on a dead one.
                let purged = self.inner.retain(|_, metrics| metrics.created > started);
                if !purged.removed.is_empty() {
                    tracing::warn!(
                        discarded = purged.removed.len() + 1,
                        deadline_ms = deadline.as_millis() as u64,
                        "the database did not answer in time; discarded the pooled connections"
                    );
                }
                Err(Timeout(deadline).into())
            }
        }
    }

    /// Takes `conn` out of the pool for good and closes it: a connection
    /// that failed in a way that leaves its state unknown must not serve the
    /// next caller.
    pub fn discard(conn: PooledConnection) {
        drop(deadpool::managed::Object::take(conn));
    }

    /// The deadline of [`Pool::run`].
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Closes the pool: no new connections, the idle ones are closed.
    pub fn close(&self) {
        self.inner.close();
    }

    /// Connections open and idle, for metrics and tests.
    pub fn status(&self) -> deadpool::Status {
        self.inner.status()
    }
}

/// Where the database is, how many connections to keep and how long to wait
/// for one.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseConfig {
    /// PostgreSQL URL (`postgres://user:password@host:port/database`); the
    /// database is created if missing. `sslmode=require` turns TLS on.
    #[arg(
        id = "database_url",
        long = "database-url",
        env = "DATABASE_URL",
        value_name = "URL",
        default_value = "postgres://postgres:postgres@localhost:5432/postgres",
        hide_env_values = true,
        value_parser = shop_config::secret
    )]
    pub url: SecretString,
    /// Most connections the pool opens.
    #[arg(
        id = "database_pool_size",
        long = "database-pool-size",
        env = "DATABASE_POOL_SIZE",
        value_name = "N",
        default_value_t = 16,
        value_parser = clap::value_parser!(u16).range(1..=1000)
    )]
    pub pool_size: u16,
    /// How long a caller waits for a free connection (and a new connection
    /// may take to open) before the call fails as unavailable.
    #[arg(
        id = "database_acquire_timeout",
        long = "database-acquire-timeout",
        env = "DATABASE_ACQUIRE_TIMEOUT",
        value_name = "DURATION",
        default_value = "5s",
        value_parser = shop_config::duration
    )]
    pub acquire_timeout: Duration,
    /// Deadline of one unit of database work: each statement (the server
    /// cancels it, `statement_timeout`) and each short transaction a caller
    /// runs through [`Pool::run`] (the connection is then discarded, as it
    /// may be silent rather than slow).
    #[arg(
        id = "database_statement_timeout",
        long = "database-statement-timeout",
        env = "DATABASE_STATEMENT_TIMEOUT",
        value_name = "DURATION",
        default_value = "5s",
        value_parser = shop_config::duration
    )]
    pub statement_timeout: Duration,
    /// How long the server keeps a session that sits idle inside a
    /// transaction (`idle_in_transaction_session_timeout`): a client that
    /// went silent mid-transaction releases its locks after this. Longer than
    /// the relay's confirm wait, which it spends inside its batch's
    /// transaction.
    #[arg(
        id = "database_idle_in_transaction_timeout",
        long = "database-idle-in-transaction-timeout",
        env = "DATABASE_IDLE_IN_TRANSACTION_TIMEOUT",
        value_name = "DURATION",
        default_value = "15s",
        value_parser = shop_config::duration
    )]
    pub idle_in_transaction_timeout: Duration,
    /// How long sent data may stay unacknowledged before a connection counts
    /// as dead (`TCP_USER_TIMEOUT`); TCP keepalive probes start after a third
    /// of it, on both ends (`tcp_keepalives_*` on the server).
    #[arg(
        id = "database_tcp_timeout",
        long = "database-tcp-timeout",
        env = "DATABASE_TCP_TIMEOUT",
        value_name = "DURATION",
        default_value = "15s",
        value_parser = shop_config::duration
    )]
    pub tcp_timeout: Duration,
    /// `DATABASE_URL` read from this file instead (the file's content, its
    /// trailing line break dropped); setting both is an error.
    #[arg(
        id = "database_url_file",
        long = "database-url-file",
        env = "DATABASE_URL_FILE",
        value_name = "PATH",
        conflicts_with = "database_url",
        value_parser = shop_config::secret_file
    )]
    pub url_from_file: Option<SecretString>,
    /// PostgreSQL URL of the migrator: the role that owns the database and
    /// its schema, runs the migrations and grants `DATABASE_URL`'s role only
    /// row access. With it set the service creates no database (a missing
    /// one is an error). Unset: `DATABASE_URL` migrates and serves, as in
    /// development.
    #[arg(
        id = "database_migration_url",
        long = "database-migration-url",
        env = "DATABASE_MIGRATION_URL",
        value_name = "URL",
        hide_env_values = true,
        value_parser = shop_config::secret
    )]
    pub migration_url: Option<SecretString>,
    /// `DATABASE_MIGRATION_URL` read from this file instead; setting both
    /// is an error.
    #[arg(
        id = "database_migration_url_file",
        long = "database-migration-url-file",
        env = "DATABASE_MIGRATION_URL_FILE",
        value_name = "PATH",
        conflicts_with = "database_migration_url",
        value_parser = shop_config::secret_file
    )]
    pub migration_url_from_file: Option<SecretString>,
    /// PEM certificates trusted, beside the Mozilla roots, to sign the
    /// server's certificate when the URL says `sslmode=require` (as libpq's
    /// `verify-full`).
    #[arg(
        id = "database_ca_file",
        long = "database-ca-file",
        env = "DATABASE_CA_FILE",
        value_name = "PATH"
    )]
    pub ca_file: Option<PathBuf>,
}

impl DatabaseConfig {
    /// The defaults, for the database at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        let mut config: Self = shop_config::defaults();
        config.url = SecretString::from(url.into());
        config
    }

    /// Puts the secrets read from `*_FILE` settings in place of their
    /// variables' values; called once the settings are parsed.
    pub fn read_files(&mut self) {
        if let Some(url) = self.url_from_file.take() {
            self.url = url;
        }
        if let Some(url) = self.migration_url_from_file.take() {
            self.migration_url = Some(url);
        }
    }

    /// The checks that span this struct's settings: the migrator and the
    /// runtime role reach the same database, and the runtime role is named.
    /// One line naming the variables, never their values.
    pub fn validate(&self) -> Result<(), String> {
        let Some(migration_url) = &self.migration_url else {
            return Ok(());
        };
        let parse = |url: &SecretString| url.expose_secret().parse::<tokio_postgres::Config>().ok();
        let (Some(runtime), Some(migrator)) = (parse(&self.url), parse(migration_url)) else {
            return Err("DATABASE_URL or DATABASE_MIGRATION_URL is not a PostgreSQL URL".to_owned());
        };
        if runtime.get_user().is_none() {
            return Err(
                "DATABASE_URL must name its user when DATABASE_MIGRATION_URL is set: \
                        that user is granted row access by the migrator"
                    .to_owned(),
            );
        }
        if runtime.get_dbname() != migrator.get_dbname() {
            return Err("DATABASE_URL and DATABASE_MIGRATION_URL name different databases".to_owned());
        }
        Ok(())
    }

    /// Whether every connection this configures speaks TLS: `DATABASE_URL`
    /// and `DATABASE_MIGRATION_URL` (when set) ask for `sslmode=require`
    /// (which verifies the server's certificate and name, see the module
    /// docs). `disable`, `prefer` (which falls back to plaintext
    /// silently) and anything unparsable are not.
    pub fn is_tls(&self) -> bool {
        let requires = |url: &SecretString| {
            url.expose_secret()
                .parse::<tokio_postgres::Config>()
                .is_ok_and(|config| matches!(config.get_ssl_mode(), SslMode::Require))
        };
        requires(&self.url) && self.migration_url.as_ref().is_none_or(requires)
    }

    /// These settings for the migrator: `DATABASE_MIGRATION_URL` in place of
    /// `DATABASE_URL`, one connection.
    fn migrator(&self) -> Option<Self> {
        let url = self.migration_url.clone()?;
        let mut migrator = self.clone();
        migrator.url = url;
        migrator.migration_url = None;
        migrator.pool_size = 1;
        Some(migrator)
    }

    /// The driver's configuration of every connection: the URL, plus TCP
    /// keepalive and `TCP_USER_TIMEOUT` on our side, and the server-side
    /// timeouts of the session as startup options (added to any `options`
    /// the URL carries). A pooler that refuses startup options (PgBouncer)
    /// needs `ignore_startup_parameters = options`.
    fn driver_config(&self) -> anyhow::Result<tokio_postgres::Config> {
        let mut config: tokio_postgres::Config =
            self.url.expose_secret().parse().context("invalid DATABASE_URL")?;
        let probe = (self.tcp_timeout / 3).max(Duration::from_secs(1));
        config
            .connect_timeout(self.acquire_timeout)
            .keepalives(true)
            .keepalives_idle(probe)
            .keepalives_interval((probe / 3).max(Duration::from_secs(1)))
            .keepalives_retries(3)
            .tcp_user_timeout(self.tcp_timeout);
        let mut options = config.get_options().unwrap_or_default().to_owned();
        for (name, value) in [
            ("statement_timeout", self.statement_timeout.as_millis()),
            (
                "idle_in_transaction_session_timeout",
                self.idle_in_transaction_timeout.as_millis(),
            ),
            ("tcp_keepalives_idle", u128::from(probe.as_secs().max(1))),
            (
                "tcp_keepalives_interval",
                u128::from((probe / 3).as_secs().max(1)),
            ),
            ("tcp_keepalives_count", 3),
        ] {
            options.push_str(&format!(" -c {name}={value}"));
        }
        config.options(options.trim());
        Ok(config)
    }

    /// The TLS connector the URL's `sslmode` asks for: `None` for `disable`
    /// and `prefer`, a verifying rustls connector for `require`.
    fn tls(&self) -> anyhow::Result<Option<MakeRustlsConnect>> {
        let config: tokio_postgres::Config =
            self.url.expose_secret().parse().context("invalid DATABASE_URL")?;
        if !matches!(config.get_ssl_mode(), SslMode::Require) {
            return Ok(None);
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &self.ca_file {
            let certificates = CertificateDer::pem_file_iter(path)
                .with_context(|| format!("failed to read DATABASE_CA_FILE {}", path.display()))?;
            let mut added = 0;
            for certificate in certificates {
                let certificate = certificate.with_context(|| {
                    format!("DATABASE_CA_FILE {} holds an invalid certificate", path.display())
                })?;
                roots.add(certificate).with_context(|| {
                    format!(
                        "DATABASE_CA_FILE {} holds an unusable certificate",
                        path.display()
                    )
                })?;
                added += 1;
            }
            anyhow::ensure!(
                added > 0,
                "DATABASE_CA_FILE {} holds no certificate",
                path.display()
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("no TLS protocol version available")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Some(MakeRustlsConnect::new(config)))
    }
}

/// One connection to the database of `settings`, outside any pool (for a
/// `LISTEN` session), with the same timeouts and TLS as the pool's.
pub async fn establish(settings: &DatabaseConfig) -> ConnectionResult<AsyncPgConnection> {
    let config = settings
        .driver_config()
        .map_err(|error| ConnectionError::BadConnection(format!("{error:#}")))?;
    let tls = settings
        .tls()
        .map_err(|error| ConnectionError::BadConnection(format!("{error:#}")))?;
    establish_with(config, tls).await
}

async fn establish_with(
    config: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
) -> ConnectionResult<AsyncPgConnection> {
    // diesel's error type carries text only; the causes are kept in it.
    let failed = |error: tokio_postgres::Error| ConnectionError::BadConnection(error_chain(&error));
    let mut conn = match tls {
        None => {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(failed)?;
            AsyncPgConnection::try_from_client_and_connection(client, connection).await?
        }
        Some(tls) => {
            let (client, connection) = config.connect(tls).await.map_err(failed)?;
            AsyncPgConnection::try_from_client_and_connection(client, connection).await?
        }
    };
    pin_message_language(&mut conn).await;
    Ok(conn)
}

/// Sets the session's message language to PostgreSQL's own (`lc_messages
/// = C`, English), whatever the server, the database or the role say:
/// [`crate::Fault`] tells several outages (a cancelled statement, a full
/// disk, a shutdown) only by their text, since diesel does not show their
/// SQLSTATE, and the texts it knows are the English ones. The setting is
/// PostgreSQL's superuser's; a role may be granted it (`GRANT SET ON
/// PARAMETER lc_messages`, PostgreSQL 15 and later). Without the grant the
/// session keeps the server's language, and one warning says what that
/// costs: in another language those outages count as failures.
async fn pin_message_language(conn: &mut AsyncPgConnection) {
    use diesel_async::SimpleAsyncConnection as _;
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if let Err(error) = conn.batch_execute("SET lc_messages = 'C'").await
        && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        tracing::warn!(
            %error,
            "cannot set lc_messages for the database sessions (GRANT SET ON PARAMETER lc_messages TO <role>): \
             unless the server's messages are in English, a cancelled statement, a full disk or a shutdown \
             is taken for a failure of the statement, not an outage"
        );
    }
}

/// An error with its causes (a TLS failure says why the certificate was
/// refused only in its source).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

/// Key of the advisory lock held while migrating.
const MIGRATION_LOCK: i64 = 0x7368_6f70_6d69_6772; // "shopmigr"

/// Creates the database if needed, migrates it and returns a pool; see
/// [`connect_granting`].
pub async fn connect(settings: &DatabaseConfig, migrations: EmbeddedMigrations) -> anyhow::Result<Pool> {
    connect_granting(settings, migrations, &[]).await
}

/// Migrates the database, grants the runtime role and `grants` what they
/// may do, and returns a pool of the runtime role (see the module docs).
/// Without `DATABASE_MIGRATION_URL`, `DATABASE_URL`'s role does it all and
/// creates the database when missing; with it, nobody creates the database
/// (the operator does, owned by the migrator): a missing one is an error
/// that says so.
pub async fn connect_granting(
    settings: &DatabaseConfig,
    migrations: EmbeddedMigrations,
    grants: &[Grant],
) -> anyhow::Result<Pool> {
    let Some(migrator) = settings.migrator() else {
        ensure_database_exists(settings).await?;
        let pool = pool(settings)?;
        migrate_and_grant(&pool, migrations, grants).await?;
        return Ok(pool);
    };
    require_database(&migrator, "DATABASE_MIGRATION_URL").await?;
    let runtime: tokio_postgres::Config = settings
        .url
        .expose_secret()
        .parse()
        .context("invalid DATABASE_URL")?;
    let migrator_user = migrator
        .url
        .expose_secret()
        .parse::<tokio_postgres::Config>()
        .ok()
        .and_then(|config| config.get_user().map(str::to_owned));
    let mut all = Vec::with_capacity(grants.len() + 1);
    if let Some(user) = runtime.get_user()
        && migrator_user.as_deref() != Some(user)
    {
        all.push(Grant::new(user, RUNTIME_GRANTS));
    }
    all.extend(grants.iter().cloned());
    let migrating = pool(&migrator)?;
    let migrated = migrate_and_grant(&migrating, migrations, &all)
        .await
        .context("as the migrator (DATABASE_MIGRATION_URL)");
    migrating.close();
    migrated?;
    require_database(settings, "DATABASE_URL").await?;
    pool(settings)
}

/// Fails with an error that says so when the database of `settings` (read
/// from `setting`) does not exist: with a migrator set, nothing creates it.
async fn require_database(settings: &DatabaseConfig, setting: &str) -> anyhow::Result<()> {
    let config: tokio_postgres::Config = settings
        .url
        .expose_secret()
        .parse()
        .with_context(|| format!("invalid {setting}"))?;
    let name = config.get_dbname().unwrap_or_default().to_owned();
    match open(&config, settings.tls()?.as_ref()).await {
        Ok(_) => Ok(()),
        Err(error) if error.code() == Some(&SqlState::INVALID_CATALOG_NAME) => Err(anyhow::anyhow!(
            "database {name} ({setting}) does not exist: with DATABASE_MIGRATION_URL set it is not \
             created by the service; create it owned by the migrator (migrations/README.md)"
        )),
        Err(error) => Err(error).with_context(|| format!("failed to connect to database {name} ({setting})")),
    }
}

/// The statements that let a runtime role read and write rows (see the
/// module docs), with `{role}` for the role: the text of
/// `shared/database/src/runtime_grants.sql`.
pub const RUNTIME_GRANTS: &str = include_str!("runtime_grants.sql");

/// What a role other than the owner may do in a service's database:
/// `statements` (SQL with `{role}` where the role goes, quoted) run by the
/// migrator after every migration. Least privilege is written where it is
/// granted: each set of statements lives next to the code that needs it.
#[derive(Debug, Clone)]
pub struct Grant {
    role: String,
    statements: &'static str,
}

impl Grant {
    /// `statements` for `role`.
    pub fn new(role: impl Into<String>, statements: &'static str) -> Self {
        Self {
            role: role.into(),
            statements,
        }
    }

    /// The statements with the role filled in (quoted as an identifier).
    pub fn sql(&self) -> String {
        self.statements.replace("{role}", &quote_identifier(&self.role))
    }
}

/// A pool for `settings`; connections open lazily.
pub fn pool(settings: &DatabaseConfig) -> anyhow::Result<Pool> {
    let mut config = ManagerConfig::default();
    // A checked-out connection is not pinged first: a dead one fails its query
    // and is discarded, and each command saves a round trip. A silent one is
    // caught by the deadline of `Pool::run` and discarded there.
    config.recycling_method = RecyclingMethod::Fast;
    let driver = settings.driver_config()?;
    let tls = settings.tls()?;
    config.custom_setup = Box::new(move |_url| establish_with(driver.clone(), tls.clone()).boxed());
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
        settings.url.expose_secret(),
        config,
    );
    let inner = DeadpoolPool::builder(manager)
        .max_size(usize::from(settings.pool_size))
        .wait_timeout(Some(settings.acquire_timeout))
        .create_timeout(Some(settings.acquire_timeout))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .context("failed to build the database pool")?;
    Ok(Pool {
        inner,
        deadline: settings.statement_timeout,
    })
}

/// Creates the database of `settings` if it does not exist, connecting to
/// the `postgres` maintenance database to do so. Another process creating it
/// at the same moment is not an error.
pub async fn ensure_database_exists(settings: &DatabaseConfig) -> anyhow::Result<()> {
    let config: tokio_postgres::Config = settings
        .url
        .expose_secret()
        .parse()
        .context("invalid DATABASE_URL")?;
    let Some(name) = config.get_dbname().map(str::to_owned) else {
        return Ok(());
    };
    let tls = settings.tls()?;
    match open(&config, tls.as_ref()).await {
        Ok(_) => return Ok(()),
        Err(error) if error.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {}
        Err(error) => {
            return Err(error).with_context(|| format!("failed to connect to database {name}"));
        }
    }
    let mut admin = config.clone();
    admin.dbname("postgres");
    let client = open(&admin, tls.as_ref()).await.with_context(|| {
        format!("database {name} does not exist and the maintenance database is unreachable")
    })?;
    let created = client
        .batch_execute(&format!("CREATE DATABASE {}", quote_identifier(&name)))
        .await;
    match created {
        Ok(()) => {
            tracing::info!(database = %name, "created database");
            Ok(())
        }
        Err(error) if error.code() == Some(&SqlState::DUPLICATE_DATABASE) => Ok(()),
        Err(error) => Err(error).with_context(|| format!("failed to create database {name}")),
    }
}

/// A plain tokio-postgres client for `config`, over TLS when `tls` is set;
/// its connection runs on a task of its own until the client is dropped.
async fn open(
    config: &tokio_postgres::Config,
    tls: Option<&MakeRustlsConnect>,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    match tls {
        None => {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            Ok(client)
        }
        Some(tls) => {
            let (client, connection) = config.connect(tls.clone()).await?;
            tokio::spawn(connection);
            Ok(client)
        }
    }
}

/// Applies the pending migrations, one process at a time.
pub async fn migrate(pool: &Pool, migrations: EmbeddedMigrations) -> anyhow::Result<()> {
    migrate_and_grant(pool, migrations, &[]).await
}

/// Applies the pending migrations, then `grants`, one process at a time
/// (two sessions granting on the same table at once can fail with "tuple
/// concurrently updated").
pub async fn migrate_and_grant(
    pool: &Pool,
    migrations: EmbeddedMigrations,
    grants: &[Grant],
) -> anyhow::Result<()> {
    let mut conn = pool.get().await.context("failed to connect to the database")?;
    // Migrations may take long, and so may waiting for another instance's.
    diesel::sql_query("SET statement_timeout = 0")
        .execute(&mut conn)
        .await
        .context("failed to lift the statement timeout for migrations")?;
    diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))
        .execute(&mut conn)
        .await
        .context("failed to take the migration lock")?;
    let mut harness = AsyncMigrationHarness::new(conn);
    let applied = harness
        .run_pending_migrations(migrations)
        .map(|versions| versions.len())
        .map_err(|error| anyhow::Error::from_boxed(error).context("failed to run migrations"));
    let mut conn = harness.into_inner();
    let mut granted = Ok(());
    if applied.is_ok() {
        for grant in grants {
            use diesel_async::SimpleAsyncConnection as _;
            granted = conn
                .batch_execute(&grant.sql())
                .await
                .with_context(|| format!("failed to grant role {} what it needs", grant.role));
            if granted.is_err() {
                break;
            }
        }
    }
    diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))
        .execute(&mut conn)
        .await
        .context("failed to release the migration lock")?;
    diesel::sql_query("RESET statement_timeout")
        .execute(&mut conn)
        .await
        .context("failed to restore the statement timeout")?;
    let applied = applied?;
    granted?;
    if applied > 0 {
        tracing::info!(applied, "applied migrations");
    }
    Ok(())
}

/// Whether the database takes writes right now: it answers within the
/// deadline, is not a standby in recovery, and its sessions are not
/// read-only. A caller whose statement failed in a way it cannot classify
/// asks this before charging the failure to its input.
pub async fn probe(pool: &Pool) -> bool {
    #[derive(diesel::QueryableByName)]
    struct Writable {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        writable: bool,
    }
    let answer: Result<Writable, RunError> = pool
        .run(async |conn| {
            Ok(diesel::sql_query(
                "SELECT NOT pg_is_in_recovery() \
                 AND current_setting('transaction_read_only') = 'off' AS writable",
            )
            .get_result::<Writable>(conn)
            .await?)
        })
        .await;
    matches!(answer, Ok(Writable { writable: true }))
}

/// Why a unit of work on the [`Pool`] failed: a statement, no connection,
/// or no answer within the deadline. [`Fault::of`](crate::Fault::of) tells
/// an outage from a failure of the statement itself.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A statement failed.
    #[error("database error")]
    Database(#[from] diesel::result::Error),
    /// No pooled connection could be had.
    #[error("no database connection")]
    Pool(#[from] PoolError),
    /// The database did not answer in time; the connection was discarded.
    #[error(transparent)]
    Timeout(#[from] Timeout),
}

/// `name` as a quoted SQL identifier.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
