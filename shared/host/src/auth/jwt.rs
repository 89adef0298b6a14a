//! Bearer tokens: the keys of `GRPC_JWT_KEYS` ([`KeySet`]), read again when
//! the file changes, and the verification of a token into a
//! [`Principal`] ([`TokenVerifier`]).
//!
//! A client sends the same token with every call until it expires, and a
//! signature check costs tens of microseconds, so a token that verified is
//! remembered ([`VERIFIED_CACHE_ENTRIES`] at most, by its SHA-256 digest)
//! until its `exp` (plus the leeway): the next calls with it cost a digest
//! and a lookup. The memory is bounded (the cache is emptied when full) and
//! emptied whenever the key set changes, so a key removed from the file
//! refuses its tokens from the moment the new file is read. Refusals are
//! not remembered: they cost their check each time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use uuid::Uuid;

use super::{Identity, Permissions, Principal, Reason};

/// The longest `authorization` value looked at; a JWT of this system is
/// about 300 bytes, those of identity providers rarely past 2 KiB.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// How often the key file is checked for a change.
pub const KEYS_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// The prefix of a service subject (`service:ops`).
pub const SERVICE_SUBJECT_PREFIX: &str = "service:";

/// Longest service name in a subject.
const MAX_SERVICE_NAME: usize = 128;

/// Most verified tokens remembered at once (see the module docs).
pub const VERIFIED_CACHE_ENTRIES: usize = 4096;

/// A verified token: who it names and until when (seconds since the epoch,
/// leeway included).
type Verified = (Principal, u64);

/// One verification key.
struct Key {
    decoding: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// The keys tokens are verified with, by `kid`.
pub struct KeySet {
    by_kid: HashMap<String, Arc<Key>>,
    /// The key of tokens without a `kid`: the only key, when there is one.
    only: Option<Arc<Key>>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.by_kid.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl KeySet {
    /// Reads `path`: a JWKS (`{"keys": [...]}`) or PEM public keys (each PEM
    /// key's `kid` is its RFC 7638 thumbprint, as [`super::issue`] names
    /// keys).
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&bytes).with_context(|| format!("{} holds no valid key set", path.display()))
    }

    /// Parses a JWKS or PEM public keys.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Self> {
        let text = std::str::from_utf8(bytes).context("not UTF-8")?;
        let jwks: JwkSet = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).context("not a JWKS")?
        } else {
            pem_keys(text)?
        };
        let mut by_kid = HashMap::new();
        let mut all = Vec::new();
        for (index, jwk) in jwks.keys.iter().enumerate() {
            let key = Arc::new(key_of(jwk).with_context(|| format!("key {index}"))?);
            all.push(key.clone());
            if let Some(kid) = &jwk.common.key_id {
                anyhow::ensure!(
                    by_kid.insert(kid.clone(), key).is_none(),
                    "two keys have the kid {kid:?}"
                );
            }
        }
        let only = if all.len() == 1 { all.pop() } else { None };
        Ok(Self { by_kid, only })
    }

    /// How many keys by `kid`.
    pub fn len(&self) -> usize {
        self.by_kid.len().max(usize::from(self.only.is_some()))
    }

    /// Whether the set has no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn find(&self, kid: Option<&str>) -> Option<&Arc<Key>> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            None => self.only.as_ref(),
        }
    }
}

/// PEM public keys as JWKs (with their thumbprints as `kid`).
fn pem_keys(text: &str) -> anyhow::Result<JwkSet> {
    let mut keys = Vec::new();
    for block in text.split_inclusive("-----END PUBLIC KEY-----") {
        if !block.contains("-----BEGIN") {
            continue;
        }
        let block = block.trim().as_bytes();
        let (decoding, algorithm) = DecodingKey::from_ed_pem(block)
            .map(|key| (key, Algorithm::EdDSA))
            .or_else(|_| DecodingKey::from_ec_pem(block).map(|key| (key, Algorithm::ES256)))
            .or_else(|_| DecodingKey::from_rsa_pem(block).map(|key| (key, Algorithm::RS256)))
            .context("a PEM block that is not an Ed25519, EC or RSA public key")?;
        let mut jwk = Jwk::from_decoding_key(&decoding, Some(algorithm))?;
        jwk.common.key_algorithm = None;
        jwk.common.key_id = Some(jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)?);
        keys.push(jwk);
    }
    anyhow::ensure!(!keys.is_empty(), "no PEM public key");
    Ok(JwkSet { keys })
}

/// The key of `jwk` with the algorithms tokens signed by it may use: the
/// JWK's `alg` when given, else those of its key type. Symmetric keys are
/// refused (see the module docs).
fn key_of(jwk: &Jwk) -> anyhow::Result<Key> {
    let algorithms = match &jwk.algorithm {
        AlgorithmParameters::OctetKey(_) => {
            anyhow::bail!("a symmetric (oct) key: only public keys are accepted")
        }
        AlgorithmParameters::OctetKeyPair(params) => {
            anyhow::ensure!(
                params.curve == EllipticCurve::Ed25519,
                "an OKP key not on Ed25519"
            );
            vec![Algorithm::EdDSA]
        }
        AlgorithmParameters::EllipticCurve(params) => match params.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => anyhow::bail!("an EC key on an unsupported curve"),
        },
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        _ => anyhow::bail!("an unsupported key type"),
    };
    let algorithms = match jwk.common.key_algorithm {
        None => algorithms,
        Some(declared) => {
            let declared = match declared {
                KeyAlgorithm::EdDSA => Algorithm::EdDSA,
                KeyAlgorithm::ES256 => Algorithm::ES256,
                KeyAlgorithm::ES384 => Algorithm::ES384,
                KeyAlgorithm::RS256 => Algorithm::RS256,
                KeyAlgorithm::RS384 => Algorithm::RS384,
                KeyAlgorithm::RS512 => Algorithm::RS512,
                KeyAlgorithm::PS256 => Algorithm::PS256,
                KeyAlgorithm::PS384 => Algorithm::PS384,
                KeyAlgorithm::PS512 => Algorithm::PS512,
                other => anyhow::bail!("the algorithm {other:?} is not accepted"),
            };
            anyhow::ensure!(
                algorithms.contains(&declared),
                "alg {declared:?} does not fit the key's type"
            );
            vec![declared]
        }
    };
    Ok(Key {
        decoding: DecodingKey::from_jwk(jwk)?,
        algorithms,
    })
}

/// The claims read from a token; `exp`, `iss`, `aud` are checked by the
/// validation.
#[derive(Debug, serde::Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    scope: String,
}

/// Verifies bearer tokens against the keys of a file, read again when it
/// changes.
#[derive(Debug)]
pub struct TokenVerifier {
    path: PathBuf,
    keys: RwLock<(Arc<KeySet>, Option<FileStamp>)>,
    verified: std::sync::Mutex<HashMap<[u8; 32], Verified>>,
    issuer: String,
    audience: String,
    leeway: Duration,
}

/// What tells a changed file: its modification time and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    let metadata = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: metadata.modified().ok(),
        len: metadata.len(),
    })
}

impl TokenVerifier {
    /// Reads the keys at `path`; tokens must carry `issuer` and `audience`,
    /// with `leeway` on their times.
    pub fn new(path: PathBuf, issuer: String, audience: String, leeway: Duration) -> anyhow::Result<Self> {
        let stamp = stamp(&path);
        let keys = KeySet::read(&path).context("GRPC_JWT_KEYS")?;
        if keys.is_empty() {
            tracing::warn!(path = %path.display(), "GRPC_JWT_KEYS holds no key: every token is refused");
        }
        Ok(Self {
            path,
            keys: RwLock::new((Arc::new(keys), stamp)),
            verified: std::sync::Mutex::new(HashMap::new()),
            issuer,
            audience,
            leeway,
        })
    }

    /// Reads the key file again if it changed since it was last read; a
    /// file that does not parse keeps the keys in force (logged). Returns
    /// whether new keys are in force.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamp(&self.path);
        let last = self
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1;
        if now == last {
            return false;
        }
        match KeySet::read(&self.path) {
            Ok(keys) => {
                tracing::info!(path = %self.path.display(), keys = keys.len(), "GRPC_JWT_KEYS read again");
                let mut in_force = self
                    .keys
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                *in_force = (Arc::new(keys), now);
                // Under the keys' lock: no token verified with the keys read
                // before is remembered after this.
                self.verified
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clear();
                true
            }
            Err(error) => {
                tracing::error!(
                    path = %self.path.display(),
                    error = format!("{error:#}"),
                    "GRPC_JWT_KEYS changed but does not parse: the keys read before stay in force"
                );
                self.keys
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .1 = now;
                false
            }
        }
    }

    /// Checks the key file every [`KEYS_CHECK_INTERVAL`] until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(KEYS_CHECK_INTERVAL) => {}
            }
            let verifier = self.clone();
            // File I/O off the runtime's workers.
            let _ = tokio::task::spawn_blocking(move || verifier.reload_if_changed()).await;
        }
    }

    /// The principal of `token`, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<Principal, Reason> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Reason::MalformedToken);
        }
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .map_err(|_| Reason::MalformedToken)?;
        let now = jsonwebtoken::get_current_timestamp();
        // The keys' read lock is held until the result is remembered, so a
        // reload cannot slip between the check and the remembering.
        let keys = self
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        {
            let verified = self
                .verified
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((principal, until)) = verified.get(&digest) {
                if now <= *until {
                    return Ok(principal.clone());
                }
                return Err(Reason::Expired);
            }
        }
        let (principal, exp) = self.check(&keys.0, token)?;
        let until = exp.saturating_add(self.leeway.as_secs());
        let mut verified = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if verified.len() >= VERIFIED_CACHE_ENTRIES {
            verified.clear();
        }
        verified.insert(digest, (principal.clone(), until));
        Ok(principal)
    }

    /// Checks `token` against `keys`: its principal and `exp`.
    fn check(&self, keys: &KeySet, token: &str) -> Result<(Principal, u64), Reason> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Reason::MalformedToken)?;
        let key = keys.find(header.kid.as_deref()).ok_or(Reason::UnknownKey)?;
        if !key.algorithms.contains(&header.alg) {
            return Err(Reason::BadSignature);
        }
        let mut validation = Validation::new(header.alg);
        validation.algorithms.clone_from(&key.algorithms);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = self.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation).map_err(|error| match error
                .kind()
            {
                ErrorKind::ExpiredSignature => Reason::Expired,
                ErrorKind::InvalidIssuer => Reason::WrongIssuer,
                ErrorKind::InvalidAudience => Reason::WrongAudience,
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => Reason::BadSignature,
                ErrorKind::MissingRequiredClaim(_)
                | ErrorKind::InvalidClaimFormat(_)
                | ErrorKind::InvalidSubject
                | ErrorKind::ImmatureSignature => Reason::InvalidClaims,
                _ => Reason::MalformedToken,
            })?;
        let identity = identity(&data.claims.sub).ok_or(Reason::InvalidClaims)?;
        let principal = Principal::new(identity, Permissions::from_scope(&data.claims.scope));
        Ok((principal, data.claims.exp))
    }
}

/// The identity a subject names: a UUID is a user, `service:<name>` a
/// service; anything else none (see the module docs).
pub fn identity(subject: &str) -> Option<Identity> {
    if let Some(name) = subject.strip_prefix(SERVICE_SUBJECT_PREFIX) {
        let valid =
            !name.is_empty() && name.len() <= MAX_SERVICE_NAME && name.chars().all(|c| c.is_ascii_graphic());
        return valid.then(|| Identity::Service(Arc::from(name)));
    }
    Uuid::parse_str(subject).ok().map(Identity::User)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_subject_is_a_user_by_uuid_a_service_by_prefix_and_nothing_else() {
        let id = Uuid::now_v7();
        assert_eq!(identity(&id.to_string()), Some(Identity::User(id)));
        assert_eq!(identity("service:ops"), Some(Identity::Service(Arc::from("ops"))));
        for refused in ["", "ops", "service:", "service:two words", "user:1", "admin"] {
            assert_eq!(identity(refused), None, "{refused:?}");
        }
    }

    #[test]
    fn symmetric_keys_are_refused() {
        let jwks = br#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"s"}]}"#;

        let error = KeySet::parse(jwks).unwrap_err();

        assert!(format!("{error:#}").contains("symmetric"), "{error:#}");
    }

    #[test]
    fn two_keys_with_one_kid_are_refused() {
        let key =
            r#"{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"a"}"#;
        let jwks = format!(r#"{{"keys":[{key},{key}]}}"#);

        assert!(KeySet::parse(jwks.as_bytes()).is_err());
    }
}
