//! Event signing keys for tests: real Ed25519 keys, made when a test
//! process first asks for one (never committed), and the files a service
//! process reads them from.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use secrecy::{ExposeSecret as _, SecretString};
use shop_messaging::signing::{SigningKey, TrustedKeys};

/// The key test producers sign with (the relays the tests build, and
/// [`crate::TestPublisher`]), made once per test process.
pub fn signing_key() -> &'static SigningKey {
    &made().0
}

/// The keys test consumers trust: [`signing_key`].
pub fn trusted_keys() -> TrustedKeys {
    TrustedKeys::none().with_key(signing_key())
}

fn made() -> &'static (SigningKey, SecretString) {
    static KEY: OnceLock<(SigningKey, SecretString)> = OnceLock::new();
    #[allow(clippy::expect_used)]
    KEY.get_or_init(|| SigningKey::generate("test-producer").expect("a new Ed25519 key"))
}

/// Another new key with id `id`, for tests of strangers and rotation.
pub fn new_key(id: &str) -> (SigningKey, SecretString) {
    #[allow(clippy::expect_used)]
    SigningKey::generate(id).expect("a new Ed25519 key")
}

/// Key files for a service run as a process: the producer's private key and
/// a consumer's trusted keys, in a directory of their own that is removed
/// when this is dropped.
#[derive(Debug)]
pub struct KeyFiles {
    dir: PathBuf,
    /// `EVENT_SIGNING_KEY_FILE`.
    pub private_key: PathBuf,
    /// `EVENT_SIGNING_KEY_ID`.
    pub key_id: String,
    /// `USER_EVENTS_KEYS_FILE` (the public line of the same key).
    pub trusted: PathBuf,
}

impl KeyFiles {
    /// The files of [`signing_key`].
    pub fn write() -> anyhow::Result<Self> {
        let (key, pem) = made();
        Self::write_key(key, pem)
    }

    /// The files of `key`, whose private key is `pem`.
    pub fn write_key(key: &SigningKey, pem: &SecretString) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("shop-test-keys-{}", crate::short_id()));
        std::fs::create_dir_all(&dir)?;
        let private_key = dir.join("event-signing.key");
        write_private(&private_key, pem.expose_secret().as_bytes())?;
        let trusted = dir.join("trusted.keys");
        std::fs::write(&trusted, format!("{}\n", key.trusted_line()))?;
        Ok(Self {
            dir,
            private_key,
            key_id: key.id().to_owned(),
            trusted,
        })
    }

    /// The settings of a producer signing with these files and a consumer
    /// trusting them, as a process's environment.
    pub fn envs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("EVENT_SIGNING_KEY_FILE", self.private_key.display().to_string()),
            ("EVENT_SIGNING_KEY_ID", self.key_id.clone()),
            ("USER_EVENTS_KEYS_FILE", self.trusted.display().to_string()),
        ]
    }
}

impl Drop for KeyFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)
}
