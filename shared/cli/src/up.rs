//! `shop up`: the whole system in one process, against the local
//! PostgreSQL and RabbitMQ, until Ctrl-C.
//!
//! Authentication is on, as in any deployment: unless `GRPC_AUTH` is set,
//! `shop up` keeps development credentials in the state directory
//! ([`crate::token::state_dir`]): an Ed25519 signing key made at the first
//! start (`jwt-signing-key.pem`, readable by its owner only), its public key
//! set, which both services verify tokens with (`GRPC_JWT_KEYS`), and a
//! token for the other `shop` commands (`token`: a service with every
//! permission, valid for 30 days, written anew at every start). The order
//! service gets a token of its own (`order-service.token`:
//! `service:order-service`, `users:resync` only) and the user service's
//! address, so a gap its consumer cannot fill is healed by asking the user
//! service for the user's snapshot (gap policy `resync`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use shop_host::shutdown::{self, TaskGroup};
use shop_host::{CancellationToken, Service};

/// Where each service of `shop up` listens and keeps its data, when not
/// its own default: one `DATABASE_URL` or `GRPC_ADDR` cannot serve two
/// services.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct UpArgs {
    /// Run only this service (`user` or `order`), configured exactly as its
    /// own binary (DATABASE_URL, GRPC_ADDR, …).
    #[arg(long)]
    pub service: Option<String>,
    /// The user service's database (default: its own default, the local `users`).
    #[arg(long, env = "USER_DATABASE_URL", hide_env_values = true)]
    pub user_database_url: Option<String>,
    /// The order service's database (default: the local `orders`).
    #[arg(long, env = "ORDER_DATABASE_URL", hide_env_values = true)]
    pub order_database_url: Option<String>,
    /// The user service's gRPC address (default `0.0.0.0:50051`).
    #[arg(long, env = "USER_GRPC_ADDR")]
    pub user_grpc_addr: Option<String>,
    /// The order service's gRPC address (default `0.0.0.0:50052`).
    #[arg(long, env = "ORDER_GRPC_ADDR")]
    pub order_grpc_addr: Option<String>,
    /// The user service's admin address (default `0.0.0.0:9101`).
    #[arg(long, env = "USER_ADMIN_ADDR")]
    pub user_admin_addr: Option<String>,
    /// The order service's admin address (default `0.0.0.0:9102`).
    #[arg(long, env = "ORDER_ADMIN_ADDR")]
    pub order_admin_addr: Option<String>,
    /// Where `shop up` keeps what it makes at its first start: each
    /// service's event signing key (`event-keys/<service>/event-signing.key`)
    /// and the public keys the order service trusts
    /// (`event-keys/public/user-events.keys`). Default
    /// `$XDG_STATE_HOME/shop`, else `~/.local/state/shop`: outside any
    /// checkout, so no key is ever committed.
    #[arg(long, env = "SHOP_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

/// The event signing keys of `shop up`, made at its first start under
/// `state`: each service signs with its own, the order service trusts the
/// user service's.
#[derive(Debug, Clone)]
struct LocalKeys {
    user: crate::keys::NewKey,
    order: crate::keys::NewKey,
}

impl LocalKeys {
    fn ensure(state: &Path) -> anyhow::Result<Self> {
        let keys = state.join("event-keys");
        let key = |service: &str, public: &str| crate::keys::NewKey {
            id: format!("{service}-local"),
            private: keys.join(service).join("event-signing.key"),
            public: keys.join("public").join(public),
            owner: None,
        };
        let local = Self {
            user: key("user-service", "user-events.keys"),
            order: key("order-service", "order-events.keys"),
        };
        for key in [&local.user, &local.order] {
            crate::keys::ensure(key)?;
        }
        Ok(local)
    }

    fn flags(key: &crate::keys::NewKey) -> [OsString; 2] {
        [
            OsString::from(format!("--event-signing-key-file={}", key.private.display())),
            OsString::from(format!("--event-signing-key-id={}", key.id)),
        ]
    }
}

/// `--state-dir`, else the state directory of every `shop` command
/// ([`crate::token::state_dir`]).
fn state_dir(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    given.map_or_else(crate::token::state_dir, Ok)
}

/// Runs both services (or only `args.service`); each creates and migrates
/// its database and declares its exchanges and queues. Log lines name their
/// service in their target (`user_service::…`, `order_service::…`).
pub(crate) async fn run(args: UpArgs) -> anyhow::Result<()> {
    if let Some(service) = &args.service {
        return serve(service).await;
    }
    let state = state_dir(args.state_dir)?;
    let credentials = development_credentials(&state)?;
    let keys = LocalKeys::ensure(&state)?;
    let user_grpc_addr = args.user_grpc_addr.clone().unwrap_or_else(|| {
        <user_service::UserService as Service>::DEFAULTS
            .grpc_addr
            .to_owned()
    });
    let mut user_flags =
        flags::<user_service::UserService>(args.user_database_url, args.user_grpc_addr, args.user_admin_addr);
    user_flags.extend(credentials.iter().flat_map(auth_flags));
    user_flags.extend(LocalKeys::flags(&keys.user));
    let mut order_flags = flags::<order_service::OrderService>(
        args.order_database_url,
        args.order_grpc_addr,
        args.order_admin_addr,
    );
    if let Some(credentials) = &credentials {
        order_flags.extend(auth_flags(credentials));
        order_flags.extend(resync_flags(credentials, &user_grpc_addr)?);
    }
    order_flags.extend(LocalKeys::flags(&keys.order));
    order_flags.push(OsString::from(format!(
        "--user-events-keys-file={}",
        keys.user.public.display()
    )));
    let users = shop_host::Config::<user_service::UserService>::from_env_and_flags(user_flags)?;
    let orders = shop_host::Config::<order_service::OrderService>::from_env_and_flags(order_flags)?;
    let mut telemetry = users.host.telemetry.clone();
    telemetry.service_name = "shop".to_owned();
    let telemetry = shop_telemetry::init(&telemetry)?;
    tracing::info!(
        user_service = %keys.user.private.display(),
        order_service = %keys.order.private.display(),
        "event signing keys (made at the first start)"
    );
    let outcome = run_both(users, orders).await;
    if let Err(error) = &outcome {
        tracing::error!(error = format!("{error:#}"), "shop up failed");
    }
    telemetry.shutdown();
    outcome
}

/// The flags that turn authentication on with the development credentials
/// of the state directory, made as needed (see the module docs); none when
/// `GRPC_AUTH` is set, which then configures both services as it does their
/// binaries.
fn development_credentials(dir: &Path) -> anyhow::Result<Option<crate::token::DevelopmentCredentials>> {
    if std::env::var_os("GRPC_AUTH").is_some() {
        return Ok(None);
    }
    let credentials = crate::token::development_credentials(dir)?;
    // Before telemetry is set up: said on stderr, once.
    #[allow(clippy::print_stderr)]
    {
        eprintln!(
            "shop up: authentication on; development credentials in {} (the shop commands use its token)",
            dir.display()
        );
    }
    Ok(Some(credentials))
}

/// The flags that turn authentication on for both services.
fn auth_flags(credentials: &crate::token::DevelopmentCredentials) -> [OsString; 2] {
    [
        OsString::from("--grpc-auth=jwt"),
        OsString::from(format!("--grpc-jwt-keys={}", credentials.key_set.display())),
    ]
}

/// The flags that let the order service's gap policy ask the user service
/// of this process for snapshots of the users it misses, as
/// `service:order-service` (the default policy, `resync`, once these are
/// set): the user service's gRPC port on this machine.
fn resync_flags(
    credentials: &crate::token::DevelopmentCredentials,
    user_grpc_addr: &str,
) -> anyhow::Result<[OsString; 2]> {
    let port = user_grpc_addr
        .parse::<std::net::SocketAddr>()
        .map(|addr| addr.port())
        .with_context(|| format!("the user service's gRPC address {user_grpc_addr:?} is not HOST:PORT"))?;
    Ok([
        OsString::from(format!("--consumer-resync-url=http://127.0.0.1:{port}")),
        OsString::from(format!(
            "--consumer-resync-token-file={}",
            credentials.order_service_token.display()
        )),
    ])
}

/// The flags that give service `S` its own database and addresses: the
/// given ones, or the service's defaults.
fn flags<S: Service>(
    database_url: Option<String>,
    grpc_addr: Option<String>,
    admin_addr: Option<String>,
) -> Vec<OsString> {
    let defaults = S::DEFAULTS;
    [
        ("--database-url", database_url, defaults.database_url),
        ("--grpc-addr", grpc_addr, defaults.grpc_addr),
        ("--admin-addr", admin_addr, defaults.admin_addr),
    ]
    .into_iter()
    .map(|(flag, value, default)| OsString::from(format!("{flag}={}", value.as_deref().unwrap_or(default))))
    .collect()
}

async fn run_both(users: user_service::Config, orders: order_service::Config) -> anyhow::Result<()> {
    let grace = users.host.shutdown_grace.max(orders.host.shutdown_grace);
    let user_app = user_service::Application::build(users).await?;
    let order_app = order_service::Application::build(orders).await?;
    let shutdown = CancellationToken::new();
    shutdown::cancel_on_signal(shutdown.clone());
    tracing::info!(
        user_service = %user_app.local_addr(),
        order_service = %order_app.local_addr(),
        "shop is up; Ctrl-C stops both services"
    );
    let mut tasks = TaskGroup::new(shutdown.clone());
    tasks.spawn("user service", user_app.run(shutdown.clone()));
    tasks.spawn("order service", order_app.run(shutdown));
    // Each service drains within its own grace period; this adds a margin.
    tasks.run(grace + std::time::Duration::from_secs(2)).await
}

/// One service, configured from the environment exactly as its own binary
/// is (`DATABASE_URL`, `GRPC_ADDR`, …), with its telemetry, until
/// SIGINT/SIGTERM.
pub async fn serve(service: &str) -> anyhow::Result<()> {
    fn from_env<S: Service>() -> anyhow::Result<shop_host::Config<S>> {
        shop_host::Config::<S>::from_env_and_flags(Vec::<OsString>::new())
    }
    let shutdown = CancellationToken::new();
    shutdown::cancel_on_signal(shutdown.clone());
    match service {
        "user" => {
            let config = from_env::<user_service::UserService>()?;
            let telemetry = shop_telemetry::init(&config.host.telemetry)?;
            let outcome = user_service::Application::build(config)
                .await?
                .run(shutdown)
                .await;
            telemetry.shutdown();
            outcome
        }
        "order" => {
            let config = from_env::<order_service::OrderService>()?;
            let telemetry = shop_telemetry::init(&config.host.telemetry)?;
            let outcome = order_service::Application::build(config)
                .await?
                .run(shutdown)
                .await;
            telemetry.shutdown();
            outcome
        }
        other => Err(anyhow::anyhow!(
            "unknown service {other:?}: expected user or order"
        )),
    }
}
