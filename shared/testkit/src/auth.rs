//! Real credentials for tests: a real Ed25519 key pair made per test, its
//! public key written as the JWKS a server reads (`GRPC_JWT_KEYS`), and
//! tokens signed with it, so that tests run with authentication on, the
//! way the services are deployed. Nothing here is a stand-in: the servers
//! verify these tokens as they verify any.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::ExposeSecret as _;
use shop_host::auth::issue::{SigningKey, TokenRequest, jwks, write_public};
use shop_host::auth::{AuthConfig, Mechanisms, Permission, Permissions};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The subject of [`TestKeys::service_token`].
pub const TEST_SERVICE: &str = "service:test";

/// A key pair of the test's own, with the key set file a server verifies
/// its tokens against; the file is removed when it is dropped.
#[derive(Debug)]
pub struct TestKeys {
    dir: PathBuf,
    keys: PathBuf,
    signing: Vec<SigningKey>,
}

/// The prefix of the directories of [`TestKeys::shared`].
const SHARED_PREFIX: &str = "shop-test-keys-shared-";

impl Default for TestKeys {
    fn default() -> Self {
        Self::new()
    }
}

impl TestKeys {
    /// A new key pair, its public key written to a key set file.
    ///
    /// # Panics
    ///
    /// When the key cannot be made or the file written (a broken test
    /// machine).
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        Self::in_dir(std::env::temp_dir().join(format!("shop-test-keys-{}", crate::short_id())))
    }

    /// A new key pair, its key set written in `dir` (made anew).
    #[allow(clippy::expect_used)]
    fn in_dir(dir: PathBuf) -> Self {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a directory for the test's keys");
        let keys = dir.join("jwt-keys.json");
        let signing = vec![SigningKey::generate().expect("an Ed25519 key")];
        let this = Self { dir, keys, signing };
        this.publish(&[0]);
        this
    }

    /// One key pair for the whole test process, for the tests that are not
    /// about keys: their services are configured with it (and keep it, so
    /// it is never rotated). Its directory is left when the process ends;
    /// those of processes that no longer run are removed here.
    ///
    /// # Panics
    ///
    /// As [`TestKeys::new`].
    #[allow(clippy::expect_used)]
    pub fn shared() -> &'static Self {
        static SHARED: std::sync::OnceLock<TestKeys> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| {
            remove_stale_shared_dirs();
            Self::in_dir(std::env::temp_dir().join(format!("{SHARED_PREFIX}{}", std::process::id())))
        })
    }

    /// The key set file (`GRPC_JWT_KEYS`).
    pub fn path(&self) -> &Path {
        &self.keys
    }

    /// The settings of a server that accepts these keys' tokens.
    pub fn auth_config(&self) -> AuthConfig {
        let mut config: AuthConfig = shop_config::defaults();
        config.mechanisms = Some(Mechanisms {
            mtls: false,
            jwt: true,
        });
        config.jwt_keys = Some(self.keys.clone());
        config
    }

    /// The same as environment variables, for a service binary.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("GRPC_AUTH", "jwt".to_owned()),
            ("GRPC_JWT_KEYS", self.keys.display().to_string()),
        ]
    }

    /// A token of the current key for `subject` with `permissions`, valid
    /// for an hour.
    pub fn token(&self, subject: &str, permissions: Permissions) -> String {
        self.issue(&TokenRequest::new(subject, permissions))
    }

    /// A token as `request` says, signed by the current key.
    #[allow(clippy::expect_used)]
    pub fn issue(&self, request: &TokenRequest) -> String {
        self.current()
            .issue(request)
            .expect("a token")
            .expose_secret()
            .to_owned()
    }

    /// A service's token with every permission: what the tests that are
    /// not about authorization call with.
    pub fn service_token(&self) -> String {
        self.token(TEST_SERVICE, Permissions::all())
    }

    /// A token of user `id` with every permission (still only for itself).
    pub fn user_token(&self, id: uuid::Uuid) -> String {
        self.token(&id.to_string(), Permissions::all())
    }

    /// A token with only `permissions`, as a service.
    pub fn token_with(&self, permissions: &[Permission]) -> String {
        self.token(TEST_SERVICE, permissions.iter().copied().collect())
    }

    /// A token that expired `ago`.
    pub fn expired_token(&self, ago: Duration) -> String {
        let mut request = TokenRequest::new(TEST_SERVICE, Permissions::all());
        request.lifetime = Duration::from_secs(60);
        request.issued_at = Some(std::time::SystemTime::now() - ago - request.lifetime);
        self.issue(&request)
    }

    /// The key that signs now.
    #[allow(clippy::expect_used)]
    fn current(&self) -> &SigningKey {
        self.signing.last().expect("at least one key")
    }

    /// Rotates: a new signing key; the key set holds the new key and the
    /// previous one (both verify), as an operator rotates.
    #[allow(clippy::expect_used)]
    pub fn rotate(&mut self) {
        self.signing.push(SigningKey::generate().expect("an Ed25519 key"));
        let last = self.signing.len() - 1;
        self.publish(&[last - 1, last]);
    }

    /// Drops every key but the current one from the key set (the end of a
    /// rotation).
    pub fn retire_old_keys(&self) {
        self.publish(&[self.signing.len() - 1]);
    }

    /// Writes the key set of the keys at `indexes`.
    #[allow(clippy::expect_used)]
    fn publish(&self, indexes: &[usize]) {
        let set = jwks(indexes.iter().map(|index| self.signing[*index].public_jwk())).expect("a JWKS");
        write_public(&self.keys, set.as_bytes()).expect("the key set file written");
    }

    /// A signing key the servers do not know, for tokens they must refuse.
    #[allow(clippy::expect_used)]
    pub fn stranger() -> SigningKey {
        SigningKey::generate().expect("an Ed25519 key")
    }
}

/// Removes the shared key directories of test processes that have ended.
fn remove_stale_shared_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|name| name.strip_prefix(SHARED_PREFIX)) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for TestKeys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Puts `authorization: Bearer <token>` on every request of a raw tonic
/// client.
#[derive(Debug, Clone)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Bearer {
    /// Sends `token`.
    ///
    /// # Panics
    ///
    /// When the token is not ASCII (tokens are).
    #[allow(clippy::expect_used)]
    pub fn new(token: &str) -> Self {
        let mut value: AsciiMetadataValue =
            MetadataValue::try_from(format!("Bearer {token}")).expect("an ASCII token");
        value.set_sensitive(true);
        Self(Some(value))
    }

    /// Sends nothing: a caller without credentials.
    pub fn none() -> Self {
        Self(None)
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry a token.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// `channel` with `token` on every call.
pub fn with_token(channel: Channel, token: &str) -> AuthChannel {
    InterceptedService::new(channel, Bearer::new(token))
}
