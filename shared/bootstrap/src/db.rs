//! PostgreSQL for a service: the database itself, its schema and its pool.
//!
//! [`connect`] is the one call a service makes at start-up: it creates the
//! database when it does not exist yet (and the role may create it, so a
//! newcomer's first run just works), applies the service's embedded
//! migrations while holding an advisory lock (replicas starting together
//! migrate once), and returns a deadpool pool of diesel-async connections. No
//! libpq is involved at build or run time: the driver is tokio-postgres.

use std::time::Duration;

use anyhow::Context as _;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod};
use diesel_async::{AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl as _};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness as _};
use secrecy::{ExposeSecret as _, SecretString};
use tokio_postgres::error::SqlState;

/// A pool of diesel-async PostgreSQL connections.
pub type Pool = diesel_async::pooled_connection::deadpool::Pool<AsyncPgConnection>;
/// A connection checked out of a [`Pool`].
pub type PooledConnection = diesel_async::pooled_connection::deadpool::Object<AsyncPgConnection>;

/// Where the database is and how many connections to keep.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// `postgres://user:password@host:port/database`.
    pub url: SecretString,
    /// Most connections the pool opens.
    pub pool_size: usize,
    /// How long a caller waits for a free connection (and a new connection
    /// may take to open) before the call fails as unavailable.
    pub acquire_timeout: Duration,
}

impl DatabaseSettings {
    /// `DATABASE_URL` (default `postgres://postgres:postgres@localhost:5432/<database>`),
    /// `DATABASE_POOL_SIZE` (16), `DATABASE_ACQUIRE_TIMEOUT_MS` (5000).
    pub fn from_env(database: &str) -> anyhow::Result<Self> {
        use crate::settings as env;
        Ok(Self {
            url: env::secret(
                "DATABASE_URL",
                &format!("postgres://postgres:postgres@localhost:5432/{database}"),
            ),
            pool_size: env::parse("DATABASE_POOL_SIZE", 16)?,
            acquire_timeout: env::millis("DATABASE_ACQUIRE_TIMEOUT_MS", Duration::from_secs(5))?,
        })
    }
}

/// Key of the advisory lock held while migrating.
const MIGRATION_LOCK: i64 = 0x7368_6f70_6d69_6772; // "shopmigr"

/// Creates the database if needed, migrates it and returns a pool.
pub async fn connect(settings: &DatabaseSettings, migrations: EmbeddedMigrations) -> anyhow::Result<Pool> {
    ensure_database_exists(settings.url.expose_secret()).await?;
    let pool = pool(settings)?;
    migrate(&pool, migrations).await?;
    Ok(pool)
}

/// A pool for `settings`; connections open lazily.
pub fn pool(settings: &DatabaseSettings) -> anyhow::Result<Pool> {
    let mut config = ManagerConfig::default();
    // A checked-out connection is not pinged first: a dead one fails its query
    // and is discarded, and each command saves a round trip.
    config.recycling_method = RecyclingMethod::Fast;
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
        settings.url.expose_secret(),
        config,
    );
    Pool::builder(manager)
        .max_size(settings.pool_size)
        .wait_timeout(Some(settings.acquire_timeout))
        .create_timeout(Some(settings.acquire_timeout))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .context("failed to build the database pool")
}

/// Creates the database named in `url` if it does not exist, connecting to
/// the `postgres` maintenance database to do so. Another process creating it
/// at the same moment is not an error.
pub async fn ensure_database_exists(url: &str) -> anyhow::Result<()> {
    let config: tokio_postgres::Config = url.parse().context("invalid DATABASE_URL")?;
    let Some(name) = config.get_dbname().map(str::to_owned) else {
        return Ok(());
    };
    match config.connect(tokio_postgres::NoTls).await {
        Ok(_) => return Ok(()),
        Err(error) if error.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {}
        Err(error) => {
            return Err(error).with_context(|| format!("failed to connect to database {name}"));
        }
    }
    let mut admin = config.clone();
    admin.dbname("postgres");
    let (client, connection) = admin.connect(tokio_postgres::NoTls).await.with_context(|| {
        format!("database {name} does not exist and the maintenance database is unreachable")
    })?;
    let connection = tokio::spawn(connection);
    let created = client
        .batch_execute(&format!("CREATE DATABASE {}", quote_identifier(&name)))
        .await;
    drop(client);
    let _ = connection.await;
    match created {
        Ok(()) => {
            tracing::info!(database = %name, "created database");
            Ok(())
        }
        Err(error) if error.code() == Some(&SqlState::DUPLICATE_DATABASE) => Ok(()),
        Err(error) => Err(error).with_context(|| format!("failed to create database {name}")),
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
        .map_err(|error| anyhow::anyhow!("failed to run migrations: {error}"));
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

/// Whether `error` is a violation of the unique constraint (or unique index)
/// named `constraint`.
pub fn is_unique_violation(error: &diesel::result::Error, constraint: &str) -> bool {
    matches!(
        error,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, info)
            if info.constraint_name() == Some(constraint)
    )
}

/// Whether `error` means the database could not be reached (the connection
/// closed under the query) rather than that the query failed: the call may
/// succeed if retried, so it maps to `UNAVAILABLE`.
pub fn is_unavailable(error: &diesel::result::Error) -> bool {
    matches!(
        error,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::ClosedConnection, _)
            | diesel::result::Error::BrokenTransactionManager
    )
}
