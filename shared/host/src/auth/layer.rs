//! The tower layer in front of every handler: it reads the credentials
//! from the request's headers (and the connection's client certificate),
//! refuses the call or puts the [`Principal`] in the request's extensions,
//! and calls the service. It never reads the body: placed in front of the
//! in-flight limit ([`crate::limit`]), which buffers bodies, it refuses an
//! unauthenticated call before a byte of its body is held.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use shop_telemetry::grpc::{Call, KnownMethods};
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::certificate::PermissionMap;
use super::jwt::TokenVerifier;
use super::{AuthConfig, Callers, Identity, Mechanisms, Permissions, Principal, Reason, Reflection, refuse};

/// Paths answered without credentials.
const HEALTH: &str = "/grpc.health.v1.Health/";

/// Paths of server reflection.
const REFLECTION: &[&str] = &[
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// Decides who calls: the settings of [`AuthConfig`], the key set and the
/// methods the server serves.
#[derive(Debug)]
pub struct Authenticator {
    accepted: Mechanisms,
    tokens: Option<Arc<TokenVerifier>>,
    certificates: PermissionMap,
    reflection: Reflection,
    known: KnownMethods,
}

impl Authenticator {
    /// The authenticator of a server serving `known` with `config` (checked
    /// with [`AuthConfig::validate`]); reads the key file.
    pub fn new(config: &AuthConfig, tls_cert: bool, known: KnownMethods) -> anyhow::Result<Self> {
        let accepted = config
            .validate(tls_cert)
            .map_err(|error| anyhow::anyhow!(error))?;
        let tokens = match (&config.jwt_keys, accepted.jwt) {
            (Some(path), true) => Some(Arc::new(TokenVerifier::new(
                path.clone(),
                config.jwt_issuer.clone(),
                config.jwt_audience.clone(),
                config.jwt_leeway,
            )?)),
            _ => None,
        };
        Ok(Self {
            accepted,
            tokens,
            certificates: config.client_permissions.clone(),
            reflection: config.reflection,
            known,
        })
    }

    /// What the server accepts.
    pub fn accepted(&self) -> Mechanisms {
        self.accepted
    }

    /// The token verifier, whose key file is watched while the server runs.
    pub fn tokens(&self) -> Option<&Arc<TokenVerifier>> {
        self.tokens.as_ref()
    }

    /// Who calls `request` and whether it may: the principal for the
    /// handler, `Ok(None)` for calls that need none (health, public
    /// reflection), or the refusal.
    pub fn authorize<B>(&self, request: &http::Request<B>) -> Result<Option<Principal>, tonic::Status> {
        let path = request.uri().path();
        if path.starts_with(HEALTH) {
            return Ok(None);
        }
        let reflection = REFLECTION.iter().any(|prefix| path.starts_with(prefix));
        if reflection && self.reflection == Reflection::Public {
            return Ok(None);
        }
        let call = self.known.classify(path);
        let principal = self
            .authenticate(request)
            .map_err(|reason| refuse(&call, reason))?
            .for_call(call.clone());
        // Reflection and paths the server does not serve (answered
        // UNIMPLEMENTED after this) need a principal, no permission.
        let Call::Known { .. } = call else {
            return Ok(Some(principal));
        };
        let Some((permission, callers)) = super::method_policy(path) else {
            // The server refuses to start with such a method; never let
            // one through should it happen.
            return Err(refuse(&call, Reason::MissingPermission));
        };
        if !principal.permissions.contains(permission) {
            return Err(refuse(&call, Reason::MissingPermission));
        }
        if callers == Callers::ServicesOnly && principal.user().is_some() {
            return Err(refuse(&call, Reason::ServicesOnly));
        }
        Ok(Some(principal))
    }

    /// The caller's principal from its token or its client certificate.
    fn authenticate<B>(&self, request: &http::Request<B>) -> Result<Principal, Reason> {
        if self.accepted.is_none() {
            return Ok(Principal::new(Identity::Anonymous, Permissions::all()));
        }
        if let Some(tokens) = &self.tokens
            && let Some(value) = request.headers().get(http::header::AUTHORIZATION)
        {
            return tokens.verify(bearer(value)?);
        }
        if self.accepted.mtls {
            let certificates = request
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(TlsConnectInfo::peer_certs);
            if let Some(certificate) = certificates.as_ref().and_then(|chain| chain.first()) {
                return self
                    .certificates
                    .principal(certificate.as_ref())
                    .ok_or(Reason::InvalidClaims);
            }
        }
        Err(Reason::MissingCredentials)
    }
}

/// The token of an `authorization: Bearer <token>` value.
fn bearer(value: &http::HeaderValue) -> Result<&str, Reason> {
    let value = value.to_str().map_err(|_| Reason::MalformedToken)?;
    let (scheme, token) = value.split_once(' ').ok_or(Reason::MalformedToken)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(Reason::MalformedToken);
    }
    Ok(token.trim())
}

/// Authenticates and authorizes every call (see the module docs).
#[derive(Debug, Clone)]
pub struct AuthLayer {
    authenticator: Arc<Authenticator>,
}

impl AuthLayer {
    /// Calls checked by `authenticator`.
    pub fn new(authenticator: Arc<Authenticator>) -> Self {
        Self { authenticator }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            authenticator: self.authenticator.clone(),
        }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    authenticator: Arc<Authenticator>,
}

impl<S> tower::Service<http::Request<Body>> for Auth<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // Credentials never reach the handler, nor any layer after this.
        let authorized = self.authenticator.authorize(&request);
        request.headers_mut().remove(http::header::AUTHORIZATION);
        match authorized {
            Ok(principal) => {
                if let Some(principal) = principal {
                    request.extensions_mut().insert(principal);
                }
                Box::pin(self.inner.call(request))
            }
            // The body is dropped unread: the stream is reset after the
            // answer, and nothing of it is buffered here.
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}
