//! A database per test.

use std::path::Path;

use anyhow::Context as _;
use diesel_migrations::EmbeddedMigrations;
use shop_database::{DatabaseConfig, Pool, quote_identifier};
use tokio_postgres::NoTls;

/// A database created for one test from a migrated template, dropped (with
/// its connections) when this value is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    admin_url: String,
}

/// `TEST_DATABASE_URL`, or the documented test identity on the local
/// server: `shop_test`, which may create databases and roles (compose makes
/// it; `.ci/run` makes it on a native server).
pub(crate) fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_TEST_DATABASE_URL.to_owned())
}

/// The test identity's default URL.
pub const DEFAULT_TEST_DATABASE_URL: &str = "postgres://shop_test:shop_test@localhost:5432/postgres";

/// `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            parsed.set_path(&format!("/{name}"));
            parsed.to_string()
        }
        Err(_) => url.to_owned(),
    }
}

async fn admin_client() -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(&admin_url(), NoTls)
        .await
        .context("PostgreSQL is not reachable at TEST_DATABASE_URL (is it running?)")?;
    tokio::spawn(connection);
    Ok(client)
}

impl TestDatabase {
    /// A new database with `migrations` applied. `migrations_dir` is the
    /// folder they were embedded from: its contents name the template, so a
    /// changed migration gets a new template.
    pub async fn create(migrations: EmbeddedMigrations, migrations_dir: &Path) -> anyhow::Result<Self> {
        let template = ensure_template(migrations, migrations_dir).await?;
        let name = format!("test_{}", crate::short_id());
        let client = admin_client().await?;
        let statement = format!(
            "CREATE DATABASE {} TEMPLATE {}",
            quote_identifier(&name),
            quote_identifier(&template)
        );
        // Copies of one template may collide briefly ("source database is
        // being accessed by other users"); retry those.
        let mut attempt = 0;
        loop {
            match client.batch_execute(&statement).await {
                Ok(()) => break,
                Err(error)
                    if attempt < 50
                        && error.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) =>
                {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(20 + attempt * 5)).await;
                }
                Err(error) => return Err(error).context("failed to create the test database"),
            }
        }
        Ok(Self {
            url: with_database(&admin_url(), &name),
            admin_url: admin_url(),
            name,
        })
    }

    /// A new, empty database owned by `owner` (a role of [`TestRoles`]), for
    /// a service that migrates it itself as its owner.
    pub async fn empty_owned_by(owner: &str) -> anyhow::Result<Self> {
        let name = format!("test_{}", crate::short_id());
        let client = admin_client().await?;
        client
            .batch_execute(&format!(
                "CREATE DATABASE {} OWNER {}",
                quote_identifier(&name),
                quote_identifier(owner)
            ))
            .await
            .context("failed to create the test database")?;
        Ok(Self {
            url: with_database(&admin_url(), &name),
            admin_url: admin_url(),
            name,
        })
    }

    /// A database name no database has (nothing is created), dropped at the
    /// end of the test in case something created it after all.
    pub fn missing() -> Self {
        let name = format!("test_{}", crate::short_id());
        Self {
            url: with_database(&admin_url(), &name),
            admin_url: admin_url(),
            name,
        }
    }

    /// Whether the database exists (for tests of who may create one).
    pub async fn exists(&self) -> anyhow::Result<bool> {
        let client = admin_client().await?;
        Ok(client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&self.name])
            .await?
            .is_some())
    }

    /// Turns the database read-only, or writable again, as a failover onto a
    /// standby (or an operator's `default_transaction_read_only`) would: the
    /// setting applies to new sessions, so every session of the database
    /// but this one is ended and its clients reconnect into the new state.
    /// The server itself is untouched; the setting goes with the database
    /// when the test ends.
    pub async fn set_read_only(&self, read_only: bool) -> anyhow::Result<()> {
        let client = admin_client().await?;
        let name = quote_identifier(&self.name);
        let statement = if read_only {
            format!("ALTER DATABASE {name} SET default_transaction_read_only = on")
        } else {
            format!("ALTER DATABASE {name} RESET default_transaction_read_only")
        };
        client.batch_execute(&statement).await?;
        self.end_sessions().await
    }

    /// Sets the language of the server's messages for the database's new
    /// sessions (`lc_messages`, e.g. `de_DE.UTF-8`) and ends the current
    /// ones, so that every client reconnects into it: for proving that an
    /// error is told by its SQLSTATE, not by PostgreSQL's English text. The
    /// server must have the locale (`.ci/install-tools` generates
    /// `de_DE.UTF-8`), and the test identity the privilege to set it
    /// (`deploy/compose/test-identity.sql`).
    pub async fn set_message_language(&self, locale: &str) -> anyhow::Result<()> {
        let client = admin_client().await?;
        client
            .batch_execute(&format!(
                "ALTER DATABASE {} SET lc_messages = '{}'",
                quote_identifier(&self.name),
                locale.replace('\'', "''")
            ))
            .await
            .with_context(|| {
                format!(
                    "failed to set lc_messages = {locale} (is the locale generated where the server runs, \
                     and was it restarted since? see .ci/install-tools)"
                )
            })?;
        self.end_sessions().await
    }

    /// Ends every session of the database (`pg_terminate_backend`), as an
    /// administrator or a restarting server would; returns how many.
    pub async fn end_sessions(&self) -> anyhow::Result<()> {
        let client = admin_client().await?;
        client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&self.name],
            )
            .await?;
        Ok(())
    }

    /// A copy of the database as it is now (`CREATE DATABASE … TEMPLATE`),
    /// dropped with the copy; nothing may be connected to it meanwhile, so
    /// stop its service first. What a dump taken then would restore.
    pub async fn copy(&self) -> anyhow::Result<Self> {
        let name = format!("test_{}", crate::short_id());
        self.end_sessions().await?;
        admin_client()
            .await?
            .batch_execute(&format!(
                "CREATE DATABASE {} TEMPLATE {}",
                quote_identifier(&name),
                quote_identifier(&self.name)
            ))
            .await
            .context("failed to copy the test database")?;
        Ok(Self {
            url: with_database(&self.admin_url, &name),
            admin_url: self.admin_url.clone(),
            name,
        })
    }

    /// Restores the database to `copy` (a [`Self::copy`] of it): drops it,
    /// ending its sessions, and creates it again from the copy, under the
    /// same name, as an operator restoring a dump would.
    pub async fn restore_from(&self, copy: &Self) -> anyhow::Result<()> {
        let client = admin_client().await?;
        client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_identifier(&self.name)
            ))
            .await
            .context("failed to drop the test database")?;
        client
            .batch_execute(&format!(
                "CREATE DATABASE {} TEMPLATE {}",
                quote_identifier(&self.name),
                quote_identifier(&copy.name)
            ))
            .await
            .context("failed to restore the test database")?;
        Ok(())
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its connection URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Settings for a service pool over it.
    pub fn config(&self) -> DatabaseConfig {
        let mut config = DatabaseConfig::new(self.url.clone());
        config.pool_size = 8;
        config
    }

    /// Settings for a service pool over it that connects through `proxy`
    /// (a [`crate::TcpProxy`] in front of the PostgreSQL server).
    pub fn config_via(&self, proxy: &crate::TcpProxy) -> DatabaseConfig {
        let mut config = self.config();
        config.url = proxy.url_for(&self.url).into();
        config
    }

    /// A pool over it.
    pub fn pool(&self) -> Pool {
        #[allow(clippy::expect_used)]
        shop_database::pool(&self.config()).expect("pool settings are valid")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let statement = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_identifier(&self.name)
        );
        if !run_from_drop(&self.admin_url, vec![statement]) {
            eprintln!("warning: could not drop test database {}", self.name);
        }
    }
}

/// Runs `statements` as the test identity from a `Drop`, each on its own;
/// whether all of them succeeded. Drop runs inside the test's runtime; a
/// thread of its own can block on a small runtime without upsetting it.
fn run_from_drop(admin_url: &str, statements: Vec<String>) -> bool {
    let admin_url = admin_url.to_owned();
    let done = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        runtime.block_on(async move {
            let (client, connection) = tokio_postgres::connect(&admin_url, NoTls).await.ok()?;
            tokio::spawn(connection);
            let mut all = true;
            for statement in statements {
                all &= client.batch_execute(&statement).await.is_ok();
            }
            all.then_some(())
        })
    })
    .join();
    matches!(done, Ok(Some(())))
}

/// Login roles of one test, with passwords of their own. Roles are
/// cluster-wide in PostgreSQL, so each is named after the test's id
/// (`t<id>_<base>`); all are dropped when this value is dropped (drop the
/// test's databases first: declare this before them). The test identity
/// is made a member of each, so it can create databases they own and drop
/// them again without being a superuser.
#[derive(Debug)]
pub struct TestRoles {
    prefix: String,
    roles: Vec<(String, String)>,
    admin_url: String,
}

impl TestRoles {
    /// Creates a login role per `(base, attributes)`, e.g. `("migrator",
    /// "CREATEDB")`, `("runtime", "")`.
    pub async fn create(roles: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut created = Self {
            prefix: format!("t{}", crate::short_id()),
            roles: Vec::new(),
            admin_url: admin_url(),
        };
        let client = admin_client().await?;
        for (base, attributes) in roles {
            let name = format!("{}_{base}", created.prefix);
            let password = crate::short_id();
            client
                .batch_execute(&format!(
                    "CREATE ROLE {} LOGIN {attributes} PASSWORD '{password}'; GRANT {} TO CURRENT_USER",
                    quote_identifier(&name),
                    quote_identifier(&name)
                ))
                .await
                .with_context(|| format!("failed to create role {name}"))?;
            created.roles.push((name, password));
        }
        Ok(created)
    }

    /// The role made for `base`.
    ///
    /// # Panics
    ///
    /// When no role was made for `base`.
    pub fn name(&self, base: &str) -> String {
        format!("{}_{base}", self.prefix)
    }

    /// A URL to `database` as the role made for `base`, on the test server.
    ///
    /// # Panics
    ///
    /// When no role was made for `base`.
    pub fn url(&self, base: &str, database: &TestDatabase) -> String {
        let name = self.name(base);
        #[allow(clippy::expect_used)]
        let (_, password) = self
            .roles
            .iter()
            .find(|(role, _)| *role == name)
            .expect("a role made for the test");
        let mut url = url::Url::parse(&database.url).ok();
        if let Some(url) = url.as_mut() {
            let _ = url.set_username(&name);
            let _ = url.set_password(Some(password));
        }
        url.map_or_else(|| database.url.clone(), |url| url.to_string())
    }
}

impl Drop for TestRoles {
    fn drop(&mut self) {
        // What a role still owns or was granted in the admin's own
        // database goes first; its test databases are gone.
        let statements = self
            .roles
            .iter()
            .map(|(role, _)| {
                format!(
                    "DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}",
                    role = quote_identifier(role)
                )
            })
            .collect();
        if !run_from_drop(&self.admin_url, statements) {
            eprintln!("warning: could not drop every test role of {}", self.prefix);
        }
    }
}

/// The name of the migrated template for `migrations_dir`, creating it if
/// needed (under an advisory lock, so parallel tests build it once). Only
/// its owner may copy a database that is not a superuser's, so the name
/// carries the test identity too.
async fn ensure_template(migrations: EmbeddedMigrations, migrations_dir: &Path) -> anyhow::Result<String> {
    let owner = url::Url::parse(&admin_url())
        .map(|url| url.username().to_owned())
        .unwrap_or_default();
    let template = format!("tpl_{}", digest_with(migrations_dir, &owner)?);
    let client = admin_client().await?;
    if template_exists(&client, &template).await? {
        return Ok(template);
    }
    client.batch_execute("SELECT pg_advisory_lock(7315)").await?;
    let built = async {
        if template_exists(&client, &template).await? {
            return Ok(());
        }
        let building = format!("{template}_building_{}", crate::short_id());
        client
            .batch_execute(&format!("CREATE DATABASE {}", quote_identifier(&building)))
            .await?;
        let mut config = DatabaseConfig::new(with_database(&admin_url(), &building));
        config.pool_size = 1;
        config.acquire_timeout = std::time::Duration::from_secs(10);
        let pool = shop_database::pool(&config)?;
        shop_database::migrate(&pool, migrations).await?;
        pool.close();
        drop(pool);
        client
            .batch_execute(&format!(
                "ALTER DATABASE {} RENAME TO {}",
                quote_identifier(&building),
                quote_identifier(&template)
            ))
            .await
            .context("failed to publish the template database")?;
        anyhow::Ok(())
    }
    .await;
    client.batch_execute("SELECT pg_advisory_unlock(7315)").await?;
    built?;
    Ok(template)
}

async fn template_exists(client: &tokio_postgres::Client, template: &str) -> anyhow::Result<bool> {
    Ok(client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&template])
        .await?
        .is_some())
}

/// FNV-1a over `salt`, then the names and contents of every file below
/// `dir`, as 16 hex digits.
fn digest_with(dir: &Path, salt: &str) -> anyhow::Result<String> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in salt.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    for file in files {
        let name = file
            .strip_prefix(dir)
            .unwrap_or(&file)
            .to_string_lossy()
            .into_owned();
        for byte in name.bytes().chain(std::fs::read(&file)?) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    Ok(format!("{hash:016x}"))
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn with_database_replaces_only_the_database() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres", "t1"),
            "postgres://u:p@h:5432/t1"
        );
        assert_eq!(
            with_database("postgres://h/postgres?sslmode=disable", "t1"),
            "postgres://h/t1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "t1"), "postgres://h/t1");
    }
}
