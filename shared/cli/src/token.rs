//! `shop token`: the signing key of the services' bearer tokens, its public
//! key set, and tokens signed with it; and where `shop up` keeps them.
//!
//! ```text
//! shop token keygen [--dir DIR] [--public-dir DIR]  a signing key, made once; its JWKS for GRPC_JWT_KEYS
//! shop token rotate [--dir DIR] [--public-dir DIR]  a new signing key; the JWKS keeps the previous key too
//! shop token issue --subject S --permission P,...   a token on stdout, signed with the key in DIR
//! ```
//!
//! `DIR` holds the private key (`jwt-signing-key.pem`, mode 0600): only
//! whoever issues tokens reads it. The public key set
//! (`jwt-keys.json`) goes to `--public-dir` (default: `DIR`), which the
//! services read as `GRPC_JWT_KEYS`. Without `--dir`, `DIR` is the state
//! directory: `SHOP_STATE_DIR`, else `$XDG_STATE_HOME/shop`, else
//! `~/.local/state/shop` — never the repository.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use shop_config::ExposeSecret as _;
use shop_host::auth::issue::{SigningKey, TokenRequest, jwks, write_private, write_public};
use shop_host::auth::{Permission, Permissions};

/// The private key's file name.
pub const SIGNING_KEY: &str = "jwt-signing-key.pem";
/// The public key set's file name.
pub const KEY_SET: &str = "jwt-keys.json";
/// The file of the token `shop up` writes and the CLI reads by default.
pub const TOKEN: &str = "token";
/// The previous signing key, kept by `rotate` for its public key.
const PREVIOUS_KEY: &str = "jwt-signing-key.previous.pem";

/// Where `shop up` and `shop token` keep credentials: `SHOP_STATE_DIR`, else
/// `$XDG_STATE_HOME/shop`, else `~/.local/state/shop`.
pub fn state_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SHOP_STATE_DIR").filter(|dir| !dir.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|dir| !dir.is_empty()) {
        return Ok(PathBuf::from(dir).join("shop"));
    }
    let home = std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .context("no state directory: set SHOP_STATE_DIR (or HOME)")?;
    Ok(PathBuf::from(home).join(".local/state/shop"))
}

/// `shop token …`.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Make the signing key if there is none, and write its public key set
    /// (JWKS) for the services' GRPC_JWT_KEYS.
    Keygen(KeygenArgs),
    /// Make a new signing key; the public key set holds it and the previous
    /// one, so tokens of both verify until the old ones expire. Rotate again
    /// to drop the previous key.
    Rotate(KeyDirs),
    /// Print a token signed with the signing key.
    Issue(IssueArgs),
}

/// `shop token keygen`.
#[derive(Debug, Clone, clap::Args)]
pub struct KeygenArgs {
    #[command(flatten)]
    pub dirs: KeyDirs,
    /// Also write a service's own token, anew at every run (valid 30 days,
    /// readable by its owner only): NAME:PERMISSION[,PERMISSION…]=FILE, the
    /// subject `service:NAME`. E.g.
    /// `order-service:users:resync=/credentials/order-service/token`, what
    /// the order service asks the user service for snapshots with.
    #[arg(long = "service-token", value_name = "NAME:PERMISSIONS=FILE", value_parser = service_token)]
    pub service_tokens: Vec<ServiceToken>,
}

/// A service's token to write ([`KeygenArgs::service_tokens`]).
#[derive(Debug, Clone)]
pub struct ServiceToken {
    /// `service:NAME`.
    pub subject: String,
    /// What it may do.
    pub permissions: Vec<Permission>,
    /// Where it is written.
    pub file: PathBuf,
}

fn service_token(value: &str) -> Result<ServiceToken, String> {
    const EXPECTED: &str = "expected NAME:PERMISSION[,PERMISSION…]=FILE";
    let (token, file) = value.split_once('=').ok_or(EXPECTED)?;
    let (name, permissions) = token.split_once(':').ok_or(EXPECTED)?;
    let subject = format!("service:{name}");
    if shop_host::auth::jwt::identity(&subject).is_none() || file.is_empty() {
        return Err(format!("{value:?}: {EXPECTED}"));
    }
    Ok(ServiceToken {
        subject,
        permissions: permissions.split(',').map(permission).collect::<Result<_, _>>()?,
        file: PathBuf::from(file),
    })
}

/// Where the keys are.
#[derive(Debug, Clone, clap::Args)]
pub struct KeyDirs {
    /// Directory of the private signing key (default: the state directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Directory of the public key set (default: --dir).
    #[arg(long)]
    pub public_dir: Option<PathBuf>,
}

impl KeyDirs {
    fn private(&self) -> anyhow::Result<PathBuf> {
        self.dir.clone().map_or_else(state_dir, Ok)
    }

    fn public(&self) -> anyhow::Result<PathBuf> {
        self.public_dir.clone().map_or_else(|| self.private(), Ok)
    }
}

/// What a token says.
#[derive(Debug, Clone, clap::Args)]
pub struct IssueArgs {
    /// Who calls: a user's id (acts only for that user), or service:NAME
    /// (acts for every user).
    #[arg(long)]
    pub subject: String,
    /// What it may do, comma-separated or repeated: users:read,
    /// users:write, orders:read, orders:write, users:resync.
    #[arg(long = "permission", value_delimiter = ',', required = true, value_parser = permission)]
    pub permissions: Vec<Permission>,
    /// How long it is valid.
    #[arg(long, default_value = "1h", value_parser = shop_config::duration)]
    pub ttl: Duration,
    /// `iss`: the services' GRPC_JWT_ISSUER.
    #[arg(long, env = "GRPC_JWT_ISSUER", default_value = "shop")]
    pub issuer: String,
    /// `aud`: the services' GRPC_JWT_AUDIENCE.
    #[arg(long, env = "GRPC_JWT_AUDIENCE", default_value = "shop")]
    pub audience: String,
    /// Directory of the signing key (default: the state directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

fn permission(name: &str) -> Result<Permission, String> {
    Permission::from_name(name.trim())
        .ok_or_else(|| format!("expected one of {}, not {name:?}", Permission::names()))
}

/// Runs `shop token …`; what it prints goes to stdout.
pub(crate) fn run(command: TokenCommand) -> anyhow::Result<String> {
    match command {
        TokenCommand::Keygen(args) => {
            let key = ensure_key(&args.dirs.private()?, &args.dirs.public()?)?;
            let mut said = format!("signing key {} ready\n", key.kid());
            for token in &args.service_tokens {
                let mut request =
                    TokenRequest::new(&token.subject, token.permissions.iter().copied().collect());
                request.lifetime = Duration::from_secs(30 * 24 * 3600);
                write_private(
                    &token.file,
                    format!("{}\n", key.issue(&request)?.expose_secret()).as_bytes(),
                )?;
                said.push_str(&format!(
                    "token for {} written to {}\n",
                    token.subject,
                    token.file.display()
                ));
            }
            Ok(said)
        }
        TokenCommand::Rotate(dirs) => {
            let key = rotate(&dirs.private()?, &dirs.public()?)?;
            Ok(format!(
                "signing key {} in use; the previous one still verifies\n",
                key.kid()
            ))
        }
        TokenCommand::Issue(args) => {
            let dir = args.dir.clone().map_or_else(state_dir, Ok)?;
            let key = SigningKey::read(&dir.join(SIGNING_KEY)).with_context(|| {
                format!(
                    "no signing key in {}: run `shop token keygen` first",
                    dir.display()
                )
            })?;
            let request = TokenRequest {
                subject: args.subject.clone(),
                permissions: args.permissions.iter().copied().collect(),
                issuer: args.issuer,
                audience: args.audience,
                lifetime: args.ttl,
                issued_at: None,
            };
            check_subject(&request.subject)?;
            Ok(format!("{}\n", key.issue(&request)?.expose_secret()))
        }
    }
}

fn check_subject(subject: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        shop_host::auth::jwt::identity(subject).is_some(),
        "--subject {subject:?} is neither a user id (UUID) nor service:NAME; the services would refuse it"
    );
    Ok(())
}

/// The signing key in `dir`, made if there is none, with its key set
/// written to `public_dir` (again, when missing).
pub fn ensure_key(dir: &Path, public_dir: &Path) -> anyhow::Result<SigningKey> {
    create_dir(dir, 0o700)?;
    create_dir(public_dir, 0o755)?;
    let path = dir.join(SIGNING_KEY);
    let key = if path.exists() {
        SigningKey::read(&path)?
    } else {
        let key = SigningKey::generate()?;
        key.write(&path)?;
        key
    };
    if !public_dir.join(KEY_SET).exists() {
        publish(dir, public_dir, &key)?;
    }
    Ok(key)
}

/// A new signing key in `dir`; the key set holds it and the one it replaces.
pub fn rotate(dir: &Path, public_dir: &Path) -> anyhow::Result<SigningKey> {
    let current = ensure_key(dir, public_dir)?;
    current.write(&dir.join(PREVIOUS_KEY))?;
    let key = SigningKey::generate()?;
    key.write(&dir.join(SIGNING_KEY))?;
    publish(dir, public_dir, &key)?;
    Ok(key)
}

/// Writes the key set of `key` and of the previous key, if any.
fn publish(dir: &Path, public_dir: &Path, key: &SigningKey) -> anyhow::Result<()> {
    let previous = match dir.join(PREVIOUS_KEY) {
        path if path.exists() => Some(SigningKey::read(&path)?),
        _ => None,
    };
    let keys = previous
        .iter()
        .filter(|previous| previous.kid() != key.kid())
        .map(SigningKey::public_jwk)
        .chain([key.public_jwk()]);
    write_public(&public_dir.join(KEY_SET), jwks(keys)?.as_bytes())
}

fn create_dir(dir: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// The order service's own token in the state directory of `shop up`:
/// `service:order-service` with `users:resync` only, for its gap policy.
pub const ORDER_SERVICE_TOKEN: &str = "order-service.token";

/// What `shop up` runs with ([`development_credentials`]).
#[derive(Debug, Clone)]
pub(crate) struct DevelopmentCredentials {
    /// The public key set the services verify tokens with.
    pub key_set: PathBuf,
    /// The order service's token for asking the user service for
    /// snapshots ([`ORDER_SERVICE_TOKEN`]).
    pub order_service_token: PathBuf,
}

/// What `shop up` runs with: the signing key of the state directory (made
/// at the first start), its key set for the services, a token for the CLI
/// (a service with every permission) and one for the order service
/// (`service:order-service`, `users:resync` only: what its gap policy asks
/// the user service with), each valid for 30 days and written anew at every
/// start.
pub(crate) fn development_credentials(dir: &Path) -> anyhow::Result<DevelopmentCredentials> {
    let key = ensure_key(dir, dir)?;
    let tokens = [
        (TOKEN, "service:shop-cli", Permissions::all()),
        (
            ORDER_SERVICE_TOKEN,
            "service:order-service",
            [Permission::UsersResync].into_iter().collect(),
        ),
    ];
    for (file, subject, permissions) in tokens {
        let mut request = TokenRequest::new(subject, permissions);
        request.lifetime = Duration::from_secs(30 * 24 * 3600);
        let token = key.issue(&request)?;
        write_private(&dir.join(file), format!("{}\n", token.expose_secret()).as_bytes())?;
    }
    Ok(DevelopmentCredentials {
        key_set: dir.join(KEY_SET),
        order_service_token: dir.join(ORDER_SERVICE_TOKEN),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn keygen_is_made_once_and_rotate_keeps_the_previous_public_key_only() {
        let dir = std::env::temp_dir().join(format!("shop-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let public = dir.join("public");

        let first = ensure_key(&dir, &public).unwrap();
        let again = ensure_key(&dir, &public).unwrap();
        let second = rotate(&dir, &public).unwrap();
        let after_second = std::fs::read_to_string(public.join(KEY_SET)).unwrap();
        let third = rotate(&dir, &public).unwrap();
        let after_third = std::fs::read_to_string(public.join(KEY_SET)).unwrap();

        assert_eq!(first.kid(), again.kid());
        assert!(after_second.contains(first.kid()) && after_second.contains(second.kid()));
        assert!(
            !after_third.contains(first.kid()),
            "a key two rotations old is dropped"
        );
        assert!(after_third.contains(second.kid()) && after_third.contains(third.kid()));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join(SIGNING_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keygen_writes_a_services_own_token_that_verifies_with_only_its_permissions() {
        let dir = std::env::temp_dir().join(format!("shop-service-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = dir.join("order-service").join("token");
        let token = service_token(&format!("order-service:users:resync={}", file.display())).unwrap();
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();

        let said = run(TokenCommand::Keygen(KeygenArgs {
            dirs: KeyDirs {
                dir: Some(dir.clone()),
                public_dir: None,
            },
            service_tokens: vec![token],
        }))
        .unwrap();

        assert!(
            said.contains("token for service:order-service written to"),
            "{said}"
        );
        let verifier = shop_host::auth::jwt::TokenVerifier::new(
            dir.join(KEY_SET),
            "shop".to_owned(),
            "shop".to_owned(),
            Duration::from_secs(30),
        )
        .unwrap();
        let written = std::fs::read_to_string(&file).unwrap();
        let principal = verifier.verify(written.trim()).unwrap();
        assert_eq!(principal.identity().to_string(), "service order-service");
        assert_eq!(principal.permissions().to_scope(), "users:resync");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        for refused in [
            "order-service:users:resync",
            "order-service=f",
            ":users:read=f",
            "a:users:nope=f",
        ] {
            assert!(service_token(refused).is_err(), "{refused} accepted");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
