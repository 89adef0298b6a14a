//! Making credentials: an Ed25519 signing key ([`SigningKey`], made with
//! `ring`), its public key as a JWKS for `GRPC_JWT_KEYS`, and tokens in
//! the shape the servers verify ([`TokenRequest`]). `shop up`, `shop token`
//! and the test kit use it; a deployment may use its identity provider
//! instead, with tokens of the same shape.
//!
//! A key is named (`kid`) by its RFC 7638 thumbprint, so the same key has
//! the same name wherever it is written (JWKS or PEM).

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, OctetKeyPairParameters,
    OctetKeyPairType, PublicKeyUse, ThumbprintHash,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::KeyPair as _;
use secrecy::{ExposeSecret as _, SecretBox, SecretString};

use super::Permissions;

/// The PEM label of a PKCS#8 private key.
const PRIVATE_KEY_LABEL: &str = "PRIVATE KEY";

/// An Ed25519 key that signs tokens. Its private half never prints.
pub struct SigningKey {
    pkcs8: SecretBox<Vec<u8>>,
    public: Jwk,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new random key.
    pub fn generate() -> anyhow::Result<Self> {
        let random = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&random)
            .map_err(|_| anyhow::anyhow!("failed to generate an Ed25519 key"))?;
        Self::from_pkcs8(pkcs8.as_ref().to_vec())
    }

    /// The key in a PKCS#8 document (DER).
    pub fn from_pkcs8(pkcs8: Vec<u8>) -> anyhow::Result<Self> {
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8)
            .map_err(|_| anyhow::anyhow!("not an Ed25519 private key (PKCS#8)"))?;
        let x = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            pair.public_key().as_ref(),
        );
        let mut public = Jwk {
            common: CommonParameters {
                public_key_use: Some(PublicKeyUse::Signature),
                key_algorithm: Some(KeyAlgorithm::EdDSA),
                ..CommonParameters::default()
            },
            algorithm: AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
                key_type: OctetKeyPairType::OctetKeyPair,
                curve: EllipticCurve::Ed25519,
                x,
            }),
        };
        public.common.key_id = Some(public.thumbprint(ThumbprintHash::SHA256)?);
        Ok(Self {
            pkcs8: SecretBox::new(Box::new(pkcs8)),
            public,
        })
    }

    /// Reads a PEM private key written by [`SigningKey::write`].
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let block = pem::parse(&text).with_context(|| format!("{} is not a PEM file", path.display()))?;
        anyhow::ensure!(
            block.tag() == PRIVATE_KEY_LABEL,
            "{} holds no PKCS#8 private key",
            path.display()
        );
        Self::from_pkcs8(block.into_contents()).with_context(|| path.display().to_string())
    }

    /// Writes the private key as PEM to `path`, readable by its owner only
    /// (mode 0600), replacing what was there.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let pem = pem::encode(&pem::Pem::new(
            PRIVATE_KEY_LABEL,
            self.pkcs8.expose_secret().clone(),
        ));
        write_private(path, pem.as_bytes())
    }

    /// Its name in tokens and key sets.
    pub fn kid(&self) -> &str {
        self.public.common.key_id.as_deref().unwrap_or_default()
    }

    /// Its public key as a JWK.
    pub fn public_jwk(&self) -> &Jwk {
        &self.public
    }

    /// Signs a token for `request`, valid from now for its lifetime.
    pub fn issue(&self, request: &TokenRequest) -> anyhow::Result<SecretString> {
        let now = request
            .issued_at
            .unwrap_or_else(SystemTime::now)
            .duration_since(UNIX_EPOCH)?
            .as_secs();
        let claims = Claims {
            sub: &request.subject,
            scope: request.permissions.to_scope(),
            iss: &request.issuer,
            aud: &request.audience,
            iat: now,
            exp: now.saturating_add(request.lifetime.as_secs().max(1)),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid().to_owned());
        let key = EncodingKey::from_ed_der(self.pkcs8.expose_secret());
        Ok(SecretString::from(jsonwebtoken::encode(&header, &claims, &key)?))
    }
}

/// What a token says: who, what it may do, for whom and how long.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// `sub`: a user's id, or `service:<name>`.
    pub subject: String,
    /// `scope`.
    pub permissions: Permissions,
    /// `iss` (the servers' `GRPC_JWT_ISSUER`).
    pub issuer: String,
    /// `aud` (the servers' `GRPC_JWT_AUDIENCE`).
    pub audience: String,
    /// From `iat` until `exp`.
    pub lifetime: Duration,
    /// `iat`: now when `None` (another time only for tests of expiry).
    pub issued_at: Option<SystemTime>,
}

impl TokenRequest {
    /// A token for `subject` with `permissions`, for the servers' default
    /// issuer and audience, valid for an hour.
    pub fn new(subject: impl Into<String>, permissions: Permissions) -> Self {
        Self {
            subject: subject.into(),
            permissions,
            issuer: "shop".to_owned(),
            audience: "shop".to_owned(),
            lifetime: Duration::from_secs(3600),
            issued_at: None,
        }
    }
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    sub: &'a str,
    #[serde(skip_serializing_if = "String::is_empty")]
    scope: String,
    iss: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

/// The JWKS of `keys`' public keys, for `GRPC_JWT_KEYS`.
pub fn jwks<'a>(keys: impl IntoIterator<Item = &'a Jwk>) -> anyhow::Result<String> {
    let set = JwkSet {
        keys: keys.into_iter().cloned().collect(),
    };
    Ok(serde_json::to_string_pretty(&set)?)
}

/// Writes `contents` to `path` with mode 0600, through a file beside it
/// renamed into place, so a reader never sees half a file.
pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    write_with_mode(path, contents, 0o600)
}

/// Writes `contents` to `path`, readable by everyone (a public key set),
/// through a file beside it renamed into place.
pub fn write_public(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    write_with_mode(path, contents, 0o644)
}

fn write_with_mode(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;

    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?
        .to_string_lossy();
    let temporary = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .with_context(|| format!("cannot create {}", temporary.display()))?;
    let written = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", temporary.display()));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(error);
    }
    std::fs::rename(&temporary, path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::super::jwt::{KeySet, TokenVerifier};
    use super::super::{Identity, Permission, Reason};
    use super::*;

    fn verifier(dir: &Path, keys: &[&SigningKey]) -> TokenVerifier {
        let path = dir.join("keys.json");
        write_public(
            &path,
            jwks(keys.iter().map(|key| key.public_jwk())).unwrap().as_bytes(),
        )
        .unwrap();
        TokenVerifier::new(path, "shop".into(), "shop".into(), Duration::from_secs(30)).unwrap()
    }

    fn temporary_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("shop-auth-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_issued_token_verifies_into_its_subject_and_permissions() {
        let dir = temporary_dir();
        let key = SigningKey::generate().unwrap();
        let verifier = verifier(&dir, &[&key]);
        let user = uuid::Uuid::now_v7();
        let permissions = [Permission::UsersRead].into_iter().collect();

        let token = key
            .issue(&TokenRequest::new(user.to_string(), permissions))
            .unwrap();
        let principal = verifier.verify(token.expose_secret()).unwrap();

        assert_eq!(principal.identity(), &Identity::User(user));
        assert_eq!(principal.permissions(), permissions);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_key_written_and_read_back_signs_as_before() {
        let dir = temporary_dir();
        let key = SigningKey::generate().unwrap();
        key.write(&dir.join("key.pem")).unwrap();

        let read = SigningKey::read(&dir.join("key.pem")).unwrap();
        let verifier = verifier(&dir, &[&key]);
        let token = read
            .issue(&TokenRequest::new("service:ops", Permissions::all()))
            .unwrap();

        assert_eq!(read.kid(), key.kid());
        assert!(verifier.verify(token.expose_secret()).is_ok());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_token_of_a_key_not_in_the_set_is_refused_as_unknown() {
        let dir = temporary_dir();
        let trusted = SigningKey::generate().unwrap();
        let stranger = SigningKey::generate().unwrap();
        let verifier = verifier(&dir, &[&trusted]);

        let token = stranger
            .issue(&TokenRequest::new("service:ops", Permissions::all()))
            .unwrap();

        assert_eq!(
            verifier.verify(token.expose_secret()).unwrap_err(),
            Reason::UnknownKey
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_pem_public_key_is_named_by_the_same_thumbprint_as_its_jwk() {
        let key = SigningKey::generate().unwrap();
        let AlgorithmParameters::OctetKeyPair(params) = &key.public_jwk().algorithm else {
            panic!("an OKP key")
        };
        let raw =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &params.x).unwrap();
        // SubjectPublicKeyInfo of an Ed25519 key: a fixed 12-byte prefix.
        let mut spki = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        spki.extend_from_slice(&raw);
        let pem = pem::encode(&pem::Pem::new("PUBLIC KEY", spki));

        let set = KeySet::parse(pem.as_bytes()).unwrap();

        assert_eq!(set.len(), 1);
        let token = key
            .issue(&TokenRequest::new("service:ops", Permissions::all()))
            .unwrap();
        let dir = temporary_dir();
        std::fs::write(dir.join("keys.pem"), pem).unwrap();
        let verifier = TokenVerifier::new(
            dir.join("keys.pem"),
            "shop".into(),
            "shop".into(),
            Duration::from_secs(30),
        )
        .unwrap();
        assert!(verifier.verify(token.expose_secret()).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[cfg(test)]
mod rotation {
    #![allow(clippy::unwrap_used)]

    use super::super::Reason;
    use super::super::jwt::TokenVerifier;
    use super::*;

    #[test]
    fn a_key_removed_from_the_file_refuses_its_tokens_once_the_file_is_read_again() {
        let dir = std::env::temp_dir().join(format!("shop-auth-r-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.json");
        let old = SigningKey::generate().unwrap();
        let new = SigningKey::generate().unwrap();
        write_public(&path, jwks([old.public_jwk()]).unwrap().as_bytes()).unwrap();
        let verifier = TokenVerifier::new(
            path.clone(),
            "shop".into(),
            "shop".into(),
            Duration::from_secs(30),
        )
        .unwrap();
        let request = TokenRequest::new("service:ops", Permissions::all());
        let old_token = old.issue(&request).unwrap();
        let new_token = new.issue(&request).unwrap();
        assert!(verifier.verify(old_token.expose_secret()).is_ok());

        write_public(
            &path,
            jwks([old.public_jwk(), new.public_jwk()]).unwrap().as_bytes(),
        )
        .unwrap();
        assert!(verifier.reload_if_changed());
        let both = (
            verifier.verify(old_token.expose_secret()),
            verifier.verify(new_token.expose_secret()),
        );
        write_public(&path, jwks([new.public_jwk()]).unwrap().as_bytes()).unwrap();
        assert!(verifier.reload_if_changed());

        assert!(both.0.is_ok() && both.1.is_ok(), "{both:?}");
        assert_eq!(
            verifier.verify(old_token.expose_secret()).unwrap_err(),
            Reason::UnknownKey
        );
        assert!(verifier.verify(new_token.expose_secret()).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
