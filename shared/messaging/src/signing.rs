//! Who may publish: every event carries its producer's signature, and a
//! consumer applies only what a key it trusts signed.
//!
//! # The scheme
//!
//! Ed25519 (RFC 8032), through `ring`, the crypto library already in the
//! build for TLS: one crate signs, verifies, seals ([`crate::seal`]) and
//! draws the randomness for all of it. (`ed25519-dalek` was the
//! alternative; its batch verification is faster per signature, but it
//! brings a second elliptic-curve stack into every binary.)
//!
//! The producer's relay signs each event as it publishes it ([`SigningKey`],
//! through [`crate::wire::EventHeaders::signed_properties`]) and puts two
//! headers on it: [`SIGNATURE`] (the 64-byte signature, base64, standard
//! alphabet, padded) and [`SIGNATURE_KEY_ID`] (the id of the key, so keys
//! rotate). A consumer verifies it against the keys it trusts for the
//! producer ([`TrustedKeys`]) before it decodes, sequences or hands anything
//! to a handler.
//!
//! # What is signed: the canonical bytes
//!
//! Not the header table as sent (the broker, the consumer's parking table and
//! its retries keep some header types and rewrite integers), but fixed bytes
//! built from the values ([`SignedFields::canonical`]). Each text or byte
//! field is its length as a 4-byte unsigned big-endian integer followed by
//! its bytes; the version is 8 bytes, signed big-endian (two's complement).
//! In this order:
//!
//! | # | field | from |
//! |---|---|---|
//! | 1 | the tag `shop.event-signature.v1` | a constant: a signature of anything else never passes for an event's |
//! | 2 | key id | header `signature_key_id` |
//! | 3 | event id | AMQP `message_id`, as sent (the UUID's text) |
//! | 4 | type | AMQP `type` (`shop.user.v1.UserDeleted`) |
//! | 5 | aggregate type | header `aggregate_type` |
//! | 6 | aggregate id | header `aggregate_id` |
//! | 7 | aggregate version | header `aggregate_version`, as an integer (whatever integer type carries it) |
//! | 8 | producer | AMQP `app_id` |
//! | 9 | body | the message body |
//!
//! That is everything the consumer decides by: which handler, which
//! aggregate and position, whether it is a repeat. The timestamp, the trace
//! context, `partition` and `CC` (derived from the aggregate id) and the
//! consumer's own bookkeeping headers are not signed. An event missing any
//! signed field does not verify.
//!
//! Verifying from another language, e.g. Python with `cryptography`:
//!
//! ```text
//! def field(b): return len(b).to_bytes(4, "big") + b
//! signed = (field(b"shop.event-signature.v1") + field(kid) + field(message_id) + field(type_)
//!           + field(aggregate_type) + field(aggregate_id) + aggregate_version.to_bytes(8, "big", signed=True)
//!           + field(app_id) + field(body))
//! Ed25519PublicKey.from_public_bytes(trusted[kid]).verify(base64.b64decode(signature), signed)
//! ```
//!
//! # When: at publishing, in the relay
//!
//! The relay signs when it publishes, not when the command writes the outbox
//! row: the private key then lives in the relay alone (a deployment that
//! runs the relay separately, `<service> relay`, keeps it out of the
//! processes that answer calls), the command path pays nothing, and the
//! outbox needs no new column (no migration, and rows written before
//! signing existed go out signed). An event published twice (a relay that
//! died between the confirm and its commit) is signed twice with the same
//! result: Ed25519 signatures are deterministic.
//!
//! # Keys
//!
//! - The producer's private key, `EVENT_SIGNING_KEY_FILE` with its id
//!   `EVENT_SIGNING_KEY_ID` ([`SigningConfig`]): a file holding a PKCS#8
//!   Ed25519 key in PEM (what `shop event-keys new` and `openssl genpkey
//!   -algorithm ed25519` write) or DER, or the raw 32-byte seed (binary or
//!   base64). A producer without one does not start.
//! - The keys a consumer trusts for a producer, e.g. `USER_EVENTS_KEYS_FILE`
//!   ([`TrustedKeys`]): a text file, one key a line, `<key id> <public key>`,
//!   the public key as the 32 raw bytes in base64 (standard or URL-safe);
//!   blank lines and `#` comments are ignored. Public keys only: a consumer
//!   can check a producer's events, never make them. From an OpenSSL key:
//!   `openssl pkey -in key.pem -pubout -outform DER | tail -c 32 | base64`.
//!
//! Rotation: make the new key, add its public line to every consumer's file
//! (both keys trusted), restart the consumers, switch the producer to the
//! new key, and once the old key's events are consumed (the queues, the
//! dead-letter queues and the parked events hold none), remove its line and
//! restart the consumers again: an event signed by a key no longer listed is
//! refused as `unauthenticated`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use secrecy::SecretString;
use secrecy::zeroize::Zeroizing;

use crate::wire::{self, header_i64, header_str};
pub use crate::wire::{SIGNATURE, SIGNATURE_KEY_ID};

/// The first field of every signed message: the scheme and its version.
pub const DOMAIN: &[u8] = b"shop.event-signature.v1";

/// Longest key id accepted (in a header, in a file, in a setting).
pub const MAX_KEY_ID_LEN: usize = 64;

/// Length of an Ed25519 signature.
const SIGNATURE_LEN: usize = 64;

/// Length of an Ed25519 public key, and of a private key's seed.
const KEY_LEN: usize = 32;

/// The values an event's signature covers (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedFields<'a> {
    /// AMQP `message_id`.
    pub event_id: &'a str,
    /// AMQP `type`.
    pub type_name: &'a str,
    /// Header `aggregate_type`.
    pub aggregate_type: &'a str,
    /// Header `aggregate_id`.
    pub aggregate_id: &'a str,
    /// Header `aggregate_version`.
    pub aggregate_version: i64,
    /// AMQP `app_id`: the producing service.
    pub producer: &'a str,
    /// The body.
    pub body: &'a [u8],
}

impl<'a> SignedFields<'a> {
    /// The signed fields of a delivery, or the name of the first one it
    /// lacks.
    pub fn of_delivery(properties: &'a BasicProperties, body: &'a [u8]) -> Result<Self, &'static str> {
        let headers = properties.headers().as_ref();
        let text = |key: &'static str| headers.and_then(|h| header_str(h, key)).ok_or(key);
        Ok(Self {
            event_id: properties
                .message_id()
                .as_ref()
                .map(ShortString::as_str)
                .ok_or("message_id")?,
            type_name: properties
                .kind()
                .as_ref()
                .map(ShortString::as_str)
                .ok_or("type")?,
            aggregate_type: text(wire::AGGREGATE_TYPE)?,
            aggregate_id: text(wire::AGGREGATE_ID)?,
            aggregate_version: headers
                .and_then(|h| header_i64(h, wire::AGGREGATE_VERSION))
                .ok_or(wire::AGGREGATE_VERSION)?,
            producer: properties
                .app_id()
                .as_ref()
                .map(ShortString::as_str)
                .ok_or("app_id")?,
            body,
        })
    }

    /// The bytes a signature by key `key_id` covers: each field as a 4-byte
    /// big-endian length and its bytes, the version as 8 bytes big-endian.
    pub fn canonical(&self, key_id: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            DOMAIN.len()
                + key_id.len()
                + self.event_id.len()
                + self.type_name.len()
                + self.aggregate_type.len()
                + self.aggregate_id.len()
                + self.producer.len()
                + self.body.len()
                + 8 * 4
                + 8,
        );
        for part in [
            DOMAIN,
            key_id.as_bytes(),
            self.event_id.as_bytes(),
            self.type_name.as_bytes(),
            self.aggregate_type.as_bytes(),
            self.aggregate_id.as_bytes(),
        ] {
            push_field(&mut out, part);
        }
        out.extend_from_slice(&self.aggregate_version.to_be_bytes());
        push_field(&mut out, self.producer.as_bytes());
        push_field(&mut out, self.body);
        out
    }
}

/// A length-prefixed field. Nothing the broker carries comes near 4 GiB;
/// a longer field would saturate its length (and fail to verify).
pub(crate) fn push_field(out: &mut Vec<u8>, bytes: &[u8]) {
    let length = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Why a key could not be read. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The contents are not a key of the expected form.
    #[error("{0}")]
    Invalid(&'static str),
    /// A list of trusted keys with a bad line.
    #[error("line {line}: {problem}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong (never the key itself).
        problem: String,
    },
    /// The system's random source failed.
    #[error("no randomness for a new key")]
    Random,
}

/// Checks a key id: 1 to 64 characters of `A-Z a-z 0-9 . _ : -`.
pub fn check_key_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_KEY_ID_LEN {
        return Err(format!("a key id is 1 to {MAX_KEY_ID_LEN} characters"));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
    {
        return Err("a key id uses only letters, digits and . _ : -".to_owned());
    }
    Ok(())
}

/// An Ed25519 private key, without its id: what a key file holds.
#[derive(Clone)]
pub struct PrivateKey(Arc<Ed25519KeyPair>);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateKey")
            .field("public", &STANDARD.encode(self.0.public_key().as_ref()))
            .finish_non_exhaustive()
    }
}

impl PrivateKey {
    /// A key from a file's contents: PKCS#8 in PEM (`-----BEGIN PRIVATE
    /// KEY-----`) or DER, or the 32-byte seed, raw or in base64.
    pub fn parse(contents: &[u8]) -> Result<Self, KeyError> {
        use rustls_pki_types::pem::PemObject as _;
        let text = std::str::from_utf8(contents).ok().map(str::trim);
        let pair = if let Some(pem) = text.filter(|t| t.starts_with("-----BEGIN")) {
            let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
                .map_err(|_| KeyError::Invalid("not a PEM \"PRIVATE KEY\" (PKCS#8) block"))?;
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
                .map_err(|_| KeyError::Invalid("the PKCS#8 key is not an Ed25519 key"))?
        } else if contents.len() == KEY_LEN {
            seed(contents)?
        } else if let Some(seed_text) = text.filter(|t| !t.is_empty() && t.len() <= 64)
            && let Ok(bytes) = STANDARD
                .decode(seed_text)
                .or_else(|_| URL_SAFE_NO_PAD.decode(seed_text))
        {
            let bytes = zeroize_on_drop(bytes);
            seed(&bytes)?
        } else {
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(contents).map_err(|_| {
                KeyError::Invalid("not an Ed25519 key: expected PKCS#8 (PEM or DER) or a 32-byte seed")
            })?
        };
        Ok(Self(Arc::new(pair)))
    }

    /// The key in file `path` (see [`PrivateKey::parse`]).
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let contents = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let contents = zeroize_on_drop(contents);
        Self::parse(&contents)
    }

    /// The public half, 32 bytes.
    pub fn public_key(&self) -> [u8; KEY_LEN] {
        let mut public = [0; KEY_LEN];
        public.copy_from_slice(self.0.public_key().as_ref());
        public
    }
}

/// A buffer that held key material, wiped when it is dropped.
fn zeroize_on_drop(bytes: Vec<u8>) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(bytes)
}

fn seed(bytes: &[u8]) -> Result<Ed25519KeyPair, KeyError> {
    if bytes.len() != KEY_LEN {
        return Err(KeyError::Invalid("an Ed25519 seed is 32 bytes"));
    }
    Ed25519KeyPair::from_seed_unchecked(bytes).map_err(|_| KeyError::Invalid("not an Ed25519 seed"))
}

/// A producer's signing key with its id: what its relay signs events with.
#[derive(Clone)]
pub struct SigningKey {
    id: Arc<str>,
    key: PrivateKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("id", &self.id)
            .field("key", &self.key)
            .finish()
    }
}

impl SigningKey {
    /// `key` under id `id` (checked by [`check_key_id`]).
    pub fn new(id: &str, key: PrivateKey) -> Result<Self, String> {
        check_key_id(id)?;
        Ok(Self { id: id.into(), key })
    }

    /// A new random key with id `id`, and its private key as a PKCS#8 PEM
    /// file's text (to write where the producer reads it, and nowhere else).
    pub fn generate(id: &str) -> Result<(Self, SecretString), KeyError> {
        check_key_id(id).map_err(|_| KeyError::Invalid("bad key id"))?;
        let random = ring::rand::SystemRandom::new();
        let document = Ed25519KeyPair::generate_pkcs8(&random).map_err(|_| KeyError::Random)?;
        let pem = pem_private_key(document.as_ref());
        let key = PrivateKey(Arc::new(
            Ed25519KeyPair::from_pkcs8(document.as_ref())
                .map_err(|_| KeyError::Invalid("a key just made does not read back"))?,
        ));
        Ok((Self { id: id.into(), key }, pem))
    }

    /// The key's id, sent in [`SIGNATURE_KEY_ID`].
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The public half, 32 bytes.
    pub fn public_key(&self) -> [u8; KEY_LEN] {
        self.key.public_key()
    }

    /// The line that makes a consumer trust this key: `<id> <public key in
    /// base64>` (see [`TrustedKeys`]).
    pub fn trusted_line(&self) -> String {
        format!("{} {}", self.id, STANDARD.encode(self.public_key()))
    }

    /// The signature of `fields`, base64 (the [`SIGNATURE`] header's value).
    pub fn sign(&self, fields: &SignedFields<'_>) -> String {
        let signature = self.key.0.sign(&fields.canonical(&self.id));
        STANDARD.encode(signature.as_ref())
    }

    /// Adds [`SIGNATURE`] and [`SIGNATURE_KEY_ID`] for `fields` to `headers`.
    pub fn sign_into(&self, fields: &SignedFields<'_>, headers: &mut FieldTable) {
        headers.insert(SIGNATURE.into(), wire::long_string(&self.sign(fields)));
        headers.insert(SIGNATURE_KEY_ID.into(), wire::long_string(&self.id));
    }

    /// `properties` signed as they stand with `body`: for tools and tests
    /// that publish events by hand. Fails when a signed field is missing.
    pub fn sign_properties(
        &self,
        properties: BasicProperties,
        body: &[u8],
    ) -> Result<BasicProperties, String> {
        let signature = {
            let fields = SignedFields::of_delivery(&properties, body)
                .map_err(|missing| format!("cannot sign without {missing}"))?;
            self.sign(&fields)
        };
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(SIGNATURE.into(), wire::long_string(&signature));
        headers.insert(SIGNATURE_KEY_ID.into(), wire::long_string(&self.id));
        Ok(properties.with_headers(headers))
    }
}

/// PKCS#8 DER as a PEM `PRIVATE KEY` block.
fn pem_private_key(der: &[u8]) -> SecretString {
    let encoded = zeroize_on_drop(STANDARD.encode(der).into_bytes());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in encoded.chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    SecretString::from(pem)
}

/// Why an event is not the producer's: the reason it is dead-lettered as
/// `unauthenticated`. Texts quote what the message says with `{:?}` (so
/// control characters are escaped in logs and headers) and cut it short.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unauthenticated {
    /// No [`SIGNATURE`] header.
    #[error("unsigned: no signature header")]
    Unsigned,
    /// A [`SIGNATURE`] or [`SIGNATURE_KEY_ID`] header of the wrong type or
    /// shape, or only one of the two.
    #[error("malformed signature headers")]
    Malformed,
    /// Signed with a key id the consumer does not trust.
    #[error("signed with key {0:?}, which this consumer does not trust")]
    UnknownKey(String),
    /// A field the signature covers is missing.
    #[error("signed, but without {0}, which the signature must cover")]
    Incomplete(&'static str),
    /// The signature does not match the event as it arrived (a changed
    /// byte, header or property, or another key's signature).
    #[error("the signature does not match the event (signed by key {0:?})")]
    BadSignature(String),
}

impl Unauthenticated {
    /// Every [`Unauthenticated::cause`].
    pub const CAUSES: [&'static str; 5] = [
        "unsigned",
        "malformed",
        "unknown-key",
        "incomplete",
        "bad-signature",
    ];

    /// The metric label: `unsigned`, `malformed`, `unknown-key`,
    /// `incomplete`, `bad-signature`.
    pub fn cause(&self) -> &'static str {
        match self {
            Self::Unsigned => "unsigned",
            Self::Malformed => "malformed",
            Self::UnknownKey(_) => "unknown-key",
            Self::Incomplete(_) => "incomplete",
            Self::BadSignature(_) => "bad-signature",
        }
    }
}

/// A key id from a header, cut for messages.
fn shown(id: &str) -> String {
    id.chars().take(MAX_KEY_ID_LEN).collect()
}

/// The public keys a consumer trusts, by key id: every event it applies was
/// signed by one of them. Made from a file of `<key id> <public key>` lines
/// (see the module docs).
#[derive(Clone, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<String, [u8; KEY_LEN]>,
}

impl std::fmt::Debug for TrustedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.keys.keys()).finish()
    }
}

impl TrustedKeys {
    /// Trusts no key: every event is refused.
    pub fn none() -> Self {
        Self::default()
    }

    /// Also trusts `public_key` under `id`.
    #[must_use]
    pub fn with(mut self, id: &str, public_key: [u8; KEY_LEN]) -> Self {
        self.keys.insert(id.to_owned(), public_key);
        self
    }

    /// Also trusts what `key` signs.
    #[must_use]
    pub fn with_key(self, key: &SigningKey) -> Self {
        self.with(key.id(), key.public_key())
    }

    /// The ids of the keys trusted.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys of a file's text: one `<key id> <public key>` a line, the
    /// key as 32 bytes in base64; blank lines and `#` comments ignored; at
    /// least one key, each id once.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let mut keys = BTreeMap::new();
        for (index, line) in text.lines().enumerate() {
            let line_error = |problem: String| KeyError::Line {
                line: index + 1,
                problem,
            };
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(id), Some(key), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(line_error(
                    "expected `<key id> <public key in base64>`".to_owned(),
                ));
            };
            check_key_id(id).map_err(line_error)?;
            let bytes = STANDARD
                .decode(key)
                .or_else(|_| URL_SAFE_NO_PAD.decode(key))
                .map_err(|_| line_error(format!("the public key of {id} is not base64")))?;
            let public: [u8; KEY_LEN] = bytes
                .try_into()
                .map_err(|_| line_error(format!("the public key of {id} is not 32 bytes")))?;
            if keys.insert(id.to_owned(), public).is_some() {
                return Err(line_error(format!("key id {id} is listed twice")));
            }
        }
        if keys.is_empty() {
            return Err(KeyError::Invalid("no key in the list"));
        }
        Ok(Self { keys })
    }

    /// The keys in file `path` (see [`TrustedKeys::parse`]).
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Checks a delivery's signature: the id of the trusted key that made
    /// it, or why it is not the producer's event. Reads nothing but the
    /// properties and the body's bytes; decodes nothing.
    pub fn verify(&self, properties: &BasicProperties, body: &[u8]) -> Result<String, Unauthenticated> {
        let headers = properties.headers().as_ref();
        let present = |key: &str| headers.is_some_and(|h| h.inner().contains_key(&ShortString::from(key)));
        if !present(SIGNATURE) && !present(SIGNATURE_KEY_ID) {
            return Err(Unauthenticated::Unsigned);
        }
        let text = |key: &str| {
            headers.and_then(|h| match h.inner().get(&ShortString::from(key)) {
                Some(AMQPValue::LongString(value)) => std::str::from_utf8(value.as_bytes()).ok(),
                _ => None,
            })
        };
        let (Some(signature), Some(key_id)) = (text(SIGNATURE), text(SIGNATURE_KEY_ID)) else {
            return Err(Unauthenticated::Malformed);
        };
        let Some(public) = self.keys.get(key_id) else {
            return Err(Unauthenticated::UnknownKey(shown(key_id)));
        };
        let fields = SignedFields::of_delivery(properties, body).map_err(Unauthenticated::Incomplete)?;
        let signature = STANDARD
            .decode(signature)
            .ok()
            .filter(|bytes| bytes.len() == SIGNATURE_LEN)
            .ok_or(Unauthenticated::Malformed)?;
        UnparsedPublicKey::new(&ED25519, public)
            .verify(&fields.canonical(key_id), &signature)
            .map_err(|_| Unauthenticated::BadSignature(shown(key_id)))?;
        Ok(key_id.to_owned())
    }
}

/// clap's parser of a trusted keys file setting (`USER_EVENTS_KEYS_FILE`):
/// the keys, read and checked at start-up.
pub fn trusted_keys_file(path: &str) -> Result<TrustedKeys, String> {
    TrustedKeys::from_file(Path::new(path)).map_err(|error| error.to_string())
}

/// clap's parser of `EVENT_SIGNING_KEY_FILE`: the key, read and checked at
/// start-up (the error never shows the file's contents).
pub fn private_key_file(path: &str) -> Result<PrivateKey, String> {
    PrivateKey::from_file(Path::new(path)).map_err(|error| error.to_string())
}

/// clap's parser of a key id setting.
pub fn key_id(id: &str) -> Result<String, String> {
    check_key_id(id).map(|()| id.to_owned())
}

/// The producer's signing key, as settings: what a relay signs with.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SigningConfig {
    /// The producer's Ed25519 private key, a file: PKCS#8 in PEM (what
    /// `shop event-keys new` and `openssl genpkey -algorithm ed25519`
    /// write) or DER, or the 32-byte seed (raw or base64). Required by
    /// every relay: events are signed with it as they are published.
    #[arg(
        id = "event_signing_key_file",
        long = "event-signing-key-file",
        env = "EVENT_SIGNING_KEY_FILE",
        value_name = "FILE",
        value_parser = private_key_file
    )]
    pub key: Option<PrivateKey>,
    /// The id of that key, sent with every signature so that consumers
    /// find the public key to check it with (and keys can rotate): 1 to 64
    /// characters of letters, digits and `. _ : -`, e.g. `user-2026-12`.
    #[arg(
        id = "event_signing_key_id",
        long = "event-signing-key-id",
        env = "EVENT_SIGNING_KEY_ID",
        value_name = "ID",
        value_parser = key_id
    )]
    pub key_id: Option<String>,
}

impl SigningConfig {
    /// Settings that sign with `key`.
    pub fn of(key: &SigningKey) -> Self {
        Self {
            key: Some(key.key.clone()),
            key_id: Some(key.id().to_owned()),
        }
    }

    /// The signing key, or the one line that says which setting is missing.
    pub fn key(&self) -> Result<SigningKey, String> {
        match (&self.key, &self.key_id) {
            (Some(key), Some(id)) => SigningKey::new(id, key.clone()),
            (None, _) => Err(
                "EVENT_SIGNING_KEY_FILE is not set: every event is signed with the producer's \
                 private key as it is published (make one with `shop event-keys new`)"
                    .to_owned(),
            ),
            (Some(_), None) => Err(
                "EVENT_SIGNING_KEY_ID is not set: the id consumers know the signing key by \
                 (the first word of its line in their keys file)"
                    .to_owned(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn properties(version: i64) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(wire::AGGREGATE_TYPE.into(), wire::long_string("user"));
        headers.insert(wire::AGGREGATE_ID.into(), wire::long_string("u-1"));
        headers.insert(wire::AGGREGATE_VERSION.into(), AMQPValue::LongLongInt(version));
        BasicProperties::default()
            .with_message_id("0190b7d2-0000-7000-8000-000000000001".into())
            .with_type("shop.user.v1.UserDeleted".into())
            .with_app_id("user-service".into())
            .with_headers(headers)
    }

    #[test]
    fn the_canonical_bytes_are_the_documented_layout() {
        let fields = SignedFields {
            event_id: "e",
            type_name: "t",
            aggregate_type: "user",
            aggregate_id: "u-1",
            aggregate_version: 258,
            producer: "p",
            body: b"\x01\x02",
        };
        let mut expected = Vec::new();
        expected.extend(23_u32.to_be_bytes());
        expected.extend(b"shop.event-signature.v1");
        expected.extend([0, 0, 0, 2]);
        expected.extend(b"k1");
        expected.extend([0, 0, 0, 1, b'e', 0, 0, 0, 1, b't', 0, 0, 0, 4]);
        expected.extend(b"user");
        expected.extend([0, 0, 0, 3]);
        expected.extend(b"u-1");
        expected.extend([0, 0, 0, 0, 0, 0, 1, 2]);
        expected.extend([0, 0, 0, 1, b'p', 0, 0, 0, 2, 1, 2]);
        assert_eq!(fields.canonical("k1"), expected);
    }

    #[test]
    fn a_signed_event_verifies_and_any_change_to_a_signed_field_does_not() {
        let (key, _) = SigningKey::generate("k1").unwrap();
        let trusted = TrustedKeys::none().with_key(&key);
        let body = b"body".to_vec();
        let signed = key.sign_properties(properties(2), &body).unwrap();
        assert_eq!(trusted.verify(&signed, &body), Ok("k1".to_owned()));

        let mut flipped = body.clone();
        flipped[0] ^= 1;
        assert!(matches!(
            trusted.verify(&signed, &flipped),
            Err(Unauthenticated::BadSignature(_))
        ));

        let mut headers = signed.headers().clone().unwrap();
        headers.insert(wire::AGGREGATE_VERSION.into(), AMQPValue::LongLongInt(3));
        let changed = signed.clone().with_headers(headers);
        assert!(matches!(
            trusted.verify(&changed, &body),
            Err(Unauthenticated::BadSignature(_))
        ));

        // The same value in another integer type still verifies (parking
        // rewrites integers).
        let mut headers = signed.headers().clone().unwrap();
        headers.insert(wire::AGGREGATE_VERSION.into(), AMQPValue::ShortInt(2));
        let retyped = signed.clone().with_headers(headers);
        assert!(trusted.verify(&retyped, &body).is_ok());

        let other = signed.clone().with_app_id("someone-else".into());
        assert!(matches!(
            trusted.verify(&other, &body),
            Err(Unauthenticated::BadSignature(_))
        ));

        assert_eq!(
            trusted.verify(&properties(2), &body),
            Err(Unauthenticated::Unsigned)
        );
        let (stranger, _) = SigningKey::generate("k2").unwrap();
        let foreign = stranger.sign_properties(properties(2), &body).unwrap();
        assert_eq!(
            trusted.verify(&foreign, &body),
            Err(Unauthenticated::UnknownKey("k2".to_owned()))
        );
        // A stranger's key under a trusted id: its signature does not match.
        let (impostor, _) = SigningKey::generate("k1").unwrap();
        let forged = impostor.sign_properties(properties(2), &body).unwrap();
        assert!(matches!(
            trusted.verify(&forged, &body),
            Err(Unauthenticated::BadSignature(_))
        ));
    }

    #[test]
    fn every_cause_is_listed_for_the_metric() {
        for refused in [
            Unauthenticated::Unsigned,
            Unauthenticated::Malformed,
            Unauthenticated::UnknownKey(String::new()),
            Unauthenticated::Incomplete("type"),
            Unauthenticated::BadSignature(String::new()),
        ] {
            assert!(Unauthenticated::CAUSES.contains(&refused.cause()), "{refused:?}");
        }
    }

    #[test]
    fn a_generated_key_reads_back_from_its_pem_and_its_public_line() {
        use secrecy::ExposeSecret as _;
        let (key, pem) = SigningKey::generate("user-1").unwrap();
        let read = PrivateKey::parse(pem.expose_secret().as_bytes()).unwrap();
        assert_eq!(read.public_key(), key.public_key());
        let trusted =
            TrustedKeys::parse(&format!("# comment\n\n{}  # trailing\n", key.trusted_line())).unwrap();
        assert_eq!(trusted.ids().collect::<Vec<_>>(), ["user-1"]);
        let seed = [7_u8; 32];
        let from_raw = PrivateKey::parse(&seed).unwrap();
        let from_base64 = PrivateKey::parse(STANDARD.encode(seed).as_bytes()).unwrap();
        assert_eq!(from_raw.public_key(), from_base64.public_key());
    }

    #[test]
    fn a_key_in_the_form_openssl_writes_reads_with_the_public_key_of_its_seed() {
        // `openssl genpkey -algorithm ed25519` writes PKCS#8 v1 with no
        // public key inside: this fixed DER prefix and the 32-byte seed. The
        // key is made here, from a fresh seed, and its public key is the
        // seed's as ring derives it.
        use secrecy::ExposeSecret as _;
        const OPENSSL_PKCS8_V1_PREFIX: [u8; 16] = [
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
        ];
        let mut seed = [0_u8; KEY_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed).unwrap();
        let der = [OPENSSL_PKCS8_V1_PREFIX.as_slice(), seed.as_slice()].concat();
        let pem = pem_private_key(&der);
        let key = PrivateKey::parse(pem.expose_secret().as_bytes()).unwrap();
        let expected = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        assert_eq!(key.public_key(), expected.public_key().as_ref());
    }

    #[test]
    fn bad_key_files_are_refused_without_showing_their_contents() {
        use secrecy::ExposeSecret as _;
        // A PEM block of three zero bytes ("AAAA"): the right shape, no key.
        let empty_block = pem_private_key(&[0, 0, 0]);
        for bad in [&b"not a key"[..], empty_block.expose_secret().as_bytes(), b""] {
            let error = PrivateKey::parse(bad).unwrap_err().to_string();
            assert!(!error.contains("AAAA") && !error.contains("not a key"), "{error}");
        }
        for (text, problem) in [
            ("", "no key"),
            ("k1", "expected"),
            ("k1 notbase64!!", "not base64"),
            ("k1 AAAA", "not 32 bytes"),
            ("bad/id AAAA", "key id"),
        ] {
            let error = TrustedKeys::parse(text).unwrap_err().to_string();
            assert!(error.contains(problem), "{text:?}: {error}");
        }
        let (key, _) = SigningKey::generate("k1").unwrap();
        let twice = format!("{}\n{}\n", key.trusted_line(), key.trusted_line());
        assert!(
            TrustedKeys::parse(&twice)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
    }
}
