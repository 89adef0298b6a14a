//! The database itself, its schema and its pool.
//!
//! [`connect`] is the one call a service makes at start-up: it creates the
//! database when it does not exist yet (and the role may create it, so a
//! newcomer's first run just works), applies the service's embedded
//! migrations while holding an advisory lock (replicas starting together
//! migrate once), and returns a deadpool pool of diesel-async connections. No
//! libpq is involved at build or run time: the driver is tokio-postgres.
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
use diesel_async::{AsyncConnection as _, AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl as _};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness as _};
use futures::FutureExt as _;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use secrecy::{ExposeSecret as _, SecretString};
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

/// A pool of diesel-async PostgreSQL connections.
pub type Pool = diesel_async::pooled_connection::deadpool::Pool<AsyncPgConnection>;
/// A connection checked out of a [`Pool`].
pub type PooledConnection = diesel_async::pooled_connection::deadpool::Object<AsyncPgConnection>;

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
/// `LISTEN` session), over TLS when the URL asks for it.
pub async fn establish(settings: &DatabaseConfig) -> ConnectionResult<AsyncPgConnection> {
    let tls = settings
        .tls()
        .map_err(|error| ConnectionError::BadConnection(format!("{error:#}")))?;
    establish_with(settings.url.expose_secret(), tls).await
}

async fn establish_with(url: &str, tls: Option<MakeRustlsConnect>) -> ConnectionResult<AsyncPgConnection> {
    match tls {
        None => AsyncPgConnection::establish(url).await,
        Some(tls) => {
            let (client, connection) = tokio_postgres::connect(url, tls)
                .await
                .map_err(|error| ConnectionError::BadConnection(error_chain(&error)))?;
            AsyncPgConnection::try_from_client_and_connection(client, connection).await
        }
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

/// Creates the database if needed, migrates it and returns a pool.
pub async fn connect(settings: &DatabaseConfig, migrations: EmbeddedMigrations) -> anyhow::Result<Pool> {
    ensure_database_exists(settings).await?;
    let pool = pool(settings)?;
    migrate(&pool, migrations).await?;
    Ok(pool)
}

/// A pool for `settings`; connections open lazily.
pub fn pool(settings: &DatabaseConfig) -> anyhow::Result<Pool> {
    let mut config = ManagerConfig::default();
    // A checked-out connection is not pinged first: a dead one fails its query
    // and is discarded, and each command saves a round trip.
    config.recycling_method = RecyclingMethod::Fast;
    if let Some(tls) = settings.tls()? {
        config.custom_setup = Box::new(move |url| establish_with(url, Some(tls.clone())).boxed());
    }
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
        settings.url.expose_secret(),
        config,
    );
    Pool::builder(manager)
        .max_size(usize::from(settings.pool_size))
        .wait_timeout(Some(settings.acquire_timeout))
        .create_timeout(Some(settings.acquire_timeout))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .context("failed to build the database pool")
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
    let mut conn = pool.get().await.context("failed to connect to the database")?;
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
    diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))
        .execute(&mut conn)
        .await
        .context("failed to release the migration lock")?;
    let applied = applied?;
    if applied > 0 {
        tracing::info!(applied, "applied migrations");
    }
    Ok(())
}

/// `name` as a quoted SQL identifier.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
