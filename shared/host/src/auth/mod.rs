//! Who may call: every gRPC call is authenticated and checked against the
//! permission of its method before the request body is read, and the
//! handlers receive the caller as a [`Principal`] in the request's
//! extensions, never its credentials.
//!
//! # Mechanisms (`GRPC_AUTH`)
//!
//! `GRPC_AUTH` names what the server accepts and has no default: a server
//! started without it refuses to start, naming the setting.
//!
//! | `GRPC_AUTH` | a call is accepted with |
//! |---|---|
//! | `jwt` | `authorization: Bearer <JWT>`, verified against `GRPC_JWT_KEYS` |
//! | `mtls` | a client certificate signed by `GRPC_TLS_CLIENT_CA` |
//! | `mtls,jwt` | either; a call that carries a token is judged by its token alone (an invalid token is refused even over a trusted certificate) |
//! | `none` | anything: every caller may call every method. Only when given explicitly; the server logs a warning at start and sets `grpc_server_auth_disabled` to 1 |
//!
//! **Bearer tokens** ([`jwt`]) are JWTs verified with the `jsonwebtoken`
//! crate against the public keys in the file `GRPC_JWT_KEYS`: a JWKS
//! (`{"keys": [...]}`) or PEM public keys. A token names its key by `kid`;
//! several keys may be in the file at once, so keys rotate without
//! refusing a valid token, and the file is read again within seconds of a
//! change (a file that no longer parses keeps the keys in force, logged as
//! an error). Only asymmetric keys are accepted (EdDSA, ES256/384,
//! RS/PS256-512): a shared secret in a file every service reads would let
//! any of them mint tokens. The signature, `exp` (required), `nbf` (when
//! present), `iss` (`GRPC_JWT_ISSUER`) and `aud` (`GRPC_JWT_AUDIENCE`) are
//! checked, with a clock skew of `GRPC_JWT_LEEWAY` (30 s by default, at
//! most 5 min). The token's algorithm must be its key's: a token cannot
//! choose how it is checked.
//!
//! The token's `sub` says who calls: a UUID is a **user** (the user with
//! that id); `service:<name>` is a **service** (a workload or an operator
//! acting for the system). Any other subject is refused: a subject that is
//! not recognised is never taken for a service, which may act for every
//! user. Permissions come from the `scope` claim (space-separated, as
//! OAuth 2 writes it); unknown scopes are ignored.
//!
//! **Client certificates** ([`certificate`]): with `GRPC_TLS_CLIENT_CA` the
//! server asks for a client certificate in the TLS handshake and verifies
//! any certificate presented against that CA there: a certificate the CA
//! did not sign fails the handshake. Presenting one is optional at the TLS
//! level, so that health checks (the containers' own probe included) work
//! without one; every other call without a certificate is refused per RPC
//! with `UNAUTHENTICATED`. The principal of a certificate is, in this
//! order, its first URI subject alternative name (a SPIFFE id such as
//! `spiffe://shop/ops`), else its first DNS name, else its subject's
//! common name; certificate principals are services. Their permissions
//! come from `GRPC_TLS_CLIENT_PERMISSIONS`
//! (`spiffe://shop/ops=users:read,orders:read;batch=*`); a principal not
//! listed there has none.
//!
//! # Permissions
//!
//! One table, [`METHODS`], gives every method its permission and says
//! whether a user may call it for itself:
//!
//! | method | permission | a user principal |
//! |---|---|---|
//! | `shop.user.v1.UserService/CreateUser` | `users:write` | refused (services create users) |
//! | `shop.user.v1.UserService/GetUser` | `users:read` | itself only |
//! | `shop.user.v1.UserService/UpdateUser` | `users:write` | itself only |
//! | `shop.user.v1.UserService/DeleteUser` | `users:write` | itself only |
//! | `shop.user.v1.UserService/ListUsers` | `users:read` | refused (it lists every user's email) |
//! | `shop.user.v1.UserService/ResyncUsers` | `users:resync` | refused (it republishes every user) |
//! | `shop.order.v1.OrderService/CreateOrder` | `orders:write` | its own orders only |
//! | `shop.order.v1.OrderService/GetOrder` | `orders:read` | its own orders only |
//! | `shop.order.v1.OrderService/ListOrders` | `orders:read` | its own orders only |
//! | `shop.order.v1.OrderService/CancelOrder` | `orders:write` | its own orders only |
//! | `grpc.health.v1.Health/*` | none, no credentials needed | |
//! | `grpc.reflection.*` | a principal, any permissions (`GRPC_REFLECTION`) | |
//!
//! A server refuses to start when one of the methods it serves has no row
//! (so a new RPC cannot be served unchecked), and a test derives the list
//! of methods from the contracts' descriptors.
//!
//! **Ownership** (object-level authorization): a service principal acts for
//! every user; a user principal only for itself. What the layer cannot see
//! without reading the request (the user a request names, the user an
//! order belongs to) the service checks with
//! [`Principal::check_owner`], the one place that decides, after it has
//! read the request or the stored row.
//!
//! # Refusals
//!
//! No credentials, or credentials that do not verify: `UNAUTHENTICATED`. A
//! principal without the method's permission, a user calling for another
//! user or calling a method only services may call: `PERMISSION_DENIED`.
//! Each refusal is counted in
//! `grpc_server_auth_failures_total{service,method,code,reason}`, with the
//! method from the methods the server serves (anything else is `unknown`)
//! and the reason from [`Reason`]; the message names the reason, never the
//! token. A refused call is answered before its body is read
//! ([`layer`]: the layer runs in front of the in-flight limit, which
//! buffers bodies), so an unauthenticated caller holds no memory for its
//! body.
//!
//! # Reflection (`GRPC_REFLECTION`)
//!
//! `authenticated` (the default): reflection answers any principal, with or
//! without permissions, and everyone when `GRPC_AUTH=none`. `public`:
//! anyone, also with authentication on (the method names are not secret to
//! every deployment). `off`: not served.
//!
//! # Issuing credentials
//!
//! [`issue`] makes Ed25519 signing keys, writes their public keys as a
//! JWKS, and signs tokens in the shape above: what `shop up`, `shop token`
//! and the test kit use.

pub mod certificate;
pub mod issue;
pub mod jwt;
pub mod layer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use shop_telemetry::grpc::Call;
use tonic::Status;
use uuid::Uuid;

pub use layer::{AuthLayer, Authenticator};

/// A permission a method needs (see the module docs' table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// `users:read`: GetUser, ListUsers.
    UsersRead,
    /// `users:write`: CreateUser, UpdateUser, DeleteUser.
    UsersWrite,
    /// `orders:read`: GetOrder, ListOrders.
    OrdersRead,
    /// `orders:write`: CreateOrder, CancelOrder.
    OrdersWrite,
    /// `users:resync`: ResyncUsers (republishing users' state is an
    /// operator's repair, not a write: a token that may write users may not
    /// flood the outbox).
    UsersResync,
}

impl Permission {
    /// Every permission.
    pub const ALL: [Self; 5] = [
        Self::UsersRead,
        Self::UsersWrite,
        Self::OrdersRead,
        Self::OrdersWrite,
        Self::UsersResync,
    ];

    /// Its name in tokens and settings (`users:read`).
    pub fn name(self) -> &'static str {
        match self {
            Self::UsersRead => "users:read",
            Self::UsersWrite => "users:write",
            Self::OrdersRead => "orders:read",
            Self::OrdersWrite => "orders:write",
            Self::UsersResync => "users:resync",
        }
    }

    /// Every permission's name, for messages: `users:read, …`.
    pub fn names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }

    /// The permission named `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|permission| permission.name() == name)
    }

    fn bit(self) -> u8 {
        match self {
            Self::UsersRead => 1,
            Self::UsersWrite => 2,
            Self::OrdersRead => 4,
            Self::OrdersWrite => 8,
            Self::UsersResync => 16,
        }
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of permissions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Permissions(u8);

impl Permissions {
    /// Every permission.
    pub fn all() -> Self {
        Permission::ALL.into_iter().collect()
    }

    /// Whether `permission` is in the set.
    pub fn contains(self, permission: Permission) -> bool {
        self.0 & permission.bit() != 0
    }

    /// The permissions named in `scope` (space-separated); unknown names are
    /// ignored.
    pub fn from_scope(scope: &str) -> Self {
        scope
            .split_ascii_whitespace()
            .filter_map(Permission::from_name)
            .collect()
    }

    /// The names, space-separated (a `scope` claim).
    pub fn to_scope(self) -> String {
        Permission::ALL
            .into_iter()
            .filter(|permission| self.contains(*permission))
            .map(Permission::name)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl FromIterator<Permission> for Permissions {
    fn from_iter<I: IntoIterator<Item = Permission>>(iter: I) -> Self {
        Self(
            iter.into_iter()
                .fold(0, |bits, permission| bits | permission.bit()),
        )
    }
}

/// Whether a user principal may call a method (services always may, with
/// the permission).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callers {
    /// Users for their own data (checked by the service), and services.
    OwnData,
    /// Services only: the method is not about one user's data.
    ServicesOnly,
}

/// Every method of the system with its permission and callers: the table of
/// the module docs. A server refuses to start if it serves a method that
/// is not here.
pub const METHODS: &[(&str, Permission, Callers)] = &[
    (
        "/shop.user.v1.UserService/CreateUser",
        Permission::UsersWrite,
        Callers::ServicesOnly,
    ),
    (
        "/shop.user.v1.UserService/GetUser",
        Permission::UsersRead,
        Callers::OwnData,
    ),
    (
        "/shop.user.v1.UserService/UpdateUser",
        Permission::UsersWrite,
        Callers::OwnData,
    ),
    (
        "/shop.user.v1.UserService/DeleteUser",
        Permission::UsersWrite,
        Callers::OwnData,
    ),
    (
        "/shop.user.v1.UserService/ListUsers",
        Permission::UsersRead,
        Callers::ServicesOnly,
    ),
    (
        "/shop.user.v1.UserService/ResyncUsers",
        Permission::UsersResync,
        Callers::ServicesOnly,
    ),
    (
        "/shop.order.v1.OrderService/CreateOrder",
        Permission::OrdersWrite,
        Callers::OwnData,
    ),
    (
        "/shop.order.v1.OrderService/GetOrder",
        Permission::OrdersRead,
        Callers::OwnData,
    ),
    (
        "/shop.order.v1.OrderService/ListOrders",
        Permission::OrdersRead,
        Callers::OwnData,
    ),
    (
        "/shop.order.v1.OrderService/CancelOrder",
        Permission::OrdersWrite,
        Callers::OwnData,
    ),
];

/// The permission and callers of the method at `path`, if it is in
/// [`METHODS`].
pub fn method_policy(path: &str) -> Option<(Permission, Callers)> {
    METHODS
        .iter()
        .find(|(method, _, _)| *method == path)
        .map(|(_, permission, callers)| (*permission, *callers))
}

/// Who a caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A user, by id: acts only for itself.
    User(Uuid),
    /// A service or an operator (a token's `service:<name>`, a client
    /// certificate's principal): acts for every user.
    Service(Arc<str>),
    /// Anyone, with `GRPC_AUTH=none`: acts for every user.
    Anonymous,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::User(id) => write!(f, "user {id}"),
            Self::Service(name) => write!(f, "service {name}"),
            Self::Anonymous => f.write_str("anonymous"),
        }
    }
}

/// The authenticated caller of one call, as the handlers see it: put in
/// the request's extensions by the [`layer`], read with [`principal`].
#[derive(Debug, Clone)]
pub struct Principal {
    identity: Identity,
    permissions: Permissions,
    call: Call,
}

impl Principal {
    /// A caller with `identity` and `permissions` (the call is named once
    /// the layer knows it).
    pub fn new(identity: Identity, permissions: Permissions) -> Self {
        Self {
            identity,
            permissions,
            call: Call::Unknown,
        }
    }

    /// Who calls.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// What it may do.
    pub fn permissions(&self) -> Permissions {
        self.permissions
    }

    /// The user it is, when it is a user.
    pub fn user(&self) -> Option<Uuid> {
        match self.identity {
            Identity::User(id) => Some(id),
            Identity::Service(_) | Identity::Anonymous => None,
        }
    }

    /// `Ok` when the caller may act on the data of user `owner`: a service
    /// (or anyone, with `GRPC_AUTH=none`) for every user, a user for itself.
    /// Otherwise `PERMISSION_DENIED`, counted with the reason `not_owner`.
    /// The one check of ownership: the services call it with the user a
    /// request names or the stored row belongs to.
    pub fn check_owner(&self, owner: Uuid) -> Result<(), Status> {
        match self.identity {
            Identity::User(id) if id != owner => Err(refuse(&self.call, Reason::NotOwner)),
            _ => Ok(()),
        }
    }

    pub(crate) fn for_call(mut self, call: Call) -> Self {
        self.call = call;
        self
    }
}

/// The caller of `request`, as the authentication layer put it there. A
/// request without one did not pass the layer (a handler served outside
/// the host): refused with `UNAUTHENTICATED`, never served as anyone.
#[allow(clippy::result_large_err)]
pub fn principal<T>(request: &tonic::Request<T>) -> Result<&Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .ok_or_else(|| Status::unauthenticated(Reason::MissingCredentials.message()))
}

/// Why a call was refused: the `reason` label of
/// `grpc_server_auth_failures_total`, a fixed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No token and no client certificate (`UNAUTHENTICATED`).
    MissingCredentials,
    /// A token that is not a well-formed JWT, an `authorization` value that
    /// is not `Bearer <token>`, or a token too long (`UNAUTHENTICATED`).
    MalformedToken,
    /// A token whose `kid` names no key in `GRPC_JWT_KEYS`
    /// (`UNAUTHENTICATED`).
    UnknownKey,
    /// A signature that does not verify, or an algorithm that is not its
    /// key's (`UNAUTHENTICATED`).
    BadSignature,
    /// `exp` in the past (`UNAUTHENTICATED`).
    Expired,
    /// `iss` not `GRPC_JWT_ISSUER` (`UNAUTHENTICATED`).
    WrongIssuer,
    /// `aud` not `GRPC_JWT_AUDIENCE` (`UNAUTHENTICATED`).
    WrongAudience,
    /// A required claim missing or of the wrong form, a subject neither a
    /// UUID nor `service:<name>`, `nbf` in the future (`UNAUTHENTICATED`).
    InvalidClaims,
    /// The method needs a permission the caller lacks (`PERMISSION_DENIED`).
    MissingPermission,
    /// A user calling a method only services may call
    /// (`PERMISSION_DENIED`).
    ServicesOnly,
    /// A user acting on another user's data (`PERMISSION_DENIED`).
    NotOwner,
}

impl Reason {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::MissingCredentials => "missing_credentials",
            Self::MalformedToken => "malformed_token",
            Self::UnknownKey => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::InvalidClaims => "invalid_claims",
            Self::MissingPermission => "missing_permission",
            Self::ServicesOnly => "services_only",
            Self::NotOwner => "not_owner",
        }
    }

    /// The code the caller gets.
    pub fn code(self) -> tonic::Code {
        match self {
            Self::MissingPermission | Self::ServicesOnly | Self::NotOwner => tonic::Code::PermissionDenied,
            _ => tonic::Code::Unauthenticated,
        }
    }

    /// What the caller is told (never its credentials).
    pub fn message(self) -> &'static str {
        match self {
            Self::MissingCredentials => "credentials required: a bearer token or a client certificate",
            Self::MalformedToken => "the authorization metadata is not a well-formed bearer token",
            Self::UnknownKey => "the token is signed by a key this server does not know",
            Self::BadSignature => "the token's signature does not verify",
            Self::Expired => "the token has expired",
            Self::WrongIssuer => "the token's issuer is not the one this server trusts",
            Self::WrongAudience => "the token is not meant for this server (audience)",
            Self::InvalidClaims => "the token's claims are missing or invalid",
            Self::MissingPermission => "the caller lacks the permission this method needs",
            Self::ServicesOnly => "only services may call this method",
            Self::NotOwner => "the caller may act only on its own data",
        }
    }
}

/// The status of a refusal for `reason`, counted in
/// `grpc_server_auth_failures_total`.
pub(crate) fn refuse(call: &Call, reason: Reason) -> Status {
    let code = reason.code();
    metrics::counter!(
        "grpc_server_auth_failures_total",
        "service" => call.service().to_owned(),
        "method" => call.method().to_owned(),
        "code" => shop_telemetry::grpc::code_name(code as i64),
        "reason" => reason.label(),
    )
    .increment(1);
    tracing::debug!(reason = reason.label(), "call refused");
    Status::new(code, reason.message())
}

/// What `GRPC_AUTH` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mechanisms {
    /// Client certificates.
    pub mtls: bool,
    /// Bearer tokens.
    pub jwt: bool,
}

impl Mechanisms {
    /// `GRPC_AUTH=none`.
    pub const NONE: Self = Self {
        mtls: false,
        jwt: false,
    };

    /// Whether authentication is off.
    pub fn is_none(self) -> bool {
        self == Self::NONE
    }
}

impl std::fmt::Display for Mechanisms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match (self.mtls, self.jwt) {
            (false, false) => "none",
            (true, false) => "mtls",
            (false, true) => "jwt",
            (true, true) => "mtls,jwt",
        })
    }
}

/// Parses `GRPC_AUTH`: `none`, or `mtls` and/or `jwt`, comma-separated.
pub fn mechanisms(value: &str) -> Result<Mechanisms, String> {
    const EXPECTED: &str = "expected none, mtls, jwt or mtls,jwt";
    let value = value.trim();
    if value == "none" {
        return Ok(Mechanisms::NONE);
    }
    let mut accepted = Mechanisms::NONE;
    for word in value.split(',').map(str::trim) {
        match word {
            "mtls" => accepted.mtls = true,
            "jwt" => accepted.jwt = true,
            _ => return Err(EXPECTED.to_owned()),
        }
    }
    if accepted.is_none() {
        return Err(EXPECTED.to_owned());
    }
    Ok(accepted)
}

/// Who may use server reflection (`GRPC_REFLECTION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Reflection {
    /// Any authenticated caller (everyone with `GRPC_AUTH=none`).
    Authenticated,
    /// Anyone, without credentials.
    Public,
    /// Not served.
    Off,
}

/// The longest clock skew `GRPC_JWT_LEEWAY` accepts.
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);

fn leeway(value: &str) -> Result<Duration, String> {
    let leeway = shop_config::duration(value)?;
    if leeway > MAX_LEEWAY {
        return Err("must be at most 5m: a longer skew keeps expired tokens alive".to_owned());
    }
    Ok(leeway)
}

fn client_permissions(value: &str) -> Result<certificate::PermissionMap, String> {
    certificate::PermissionMap::parse(value)
}

/// Who may call the gRPC server: the settings of the module docs.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthConfig {
    /// What the gRPC server accepts from callers: jwt (bearer tokens),
    /// mtls (client certificates), mtls,jwt (either), or none (no
    /// authentication: every caller may call every method). No default:
    /// a server without it refuses to start.
    #[arg(
        id = "grpc_auth",
        long = "grpc-auth",
        env = "GRPC_AUTH",
        value_name = "MECHANISMS",
        value_parser = mechanisms
    )]
    pub mechanisms: Option<Mechanisms>,
    /// With GRPC_AUTH=jwt: the file of public keys tokens are verified
    /// with, a JWKS or PEM public keys; tokens pick one by `kid`. Read again
    /// within seconds when it changes.
    #[arg(long = "grpc-jwt-keys", env = "GRPC_JWT_KEYS", value_name = "PATH")]
    pub jwt_keys: Option<PathBuf>,
    /// The `iss` a token must carry.
    #[arg(
        long = "grpc-jwt-issuer",
        env = "GRPC_JWT_ISSUER",
        value_name = "ISSUER",
        default_value = "shop"
    )]
    pub jwt_issuer: String,
    /// The `aud` a token must carry (one of its audiences).
    #[arg(
        long = "grpc-jwt-audience",
        env = "GRPC_JWT_AUDIENCE",
        value_name = "AUDIENCE",
        default_value = "shop"
    )]
    pub jwt_audience: String,
    /// Clock skew allowed on a token's `exp` and `nbf` (at most 5m).
    #[arg(
        long = "grpc-jwt-leeway",
        env = "GRPC_JWT_LEEWAY",
        value_name = "DURATION",
        default_value = "30s",
        value_parser = leeway
    )]
    pub jwt_leeway: Duration,
    /// With GRPC_AUTH=mtls: PEM certificates of the CA that signs client
    /// certificates; the server asks for one in the TLS handshake (needs
    /// GRPC_TLS_CERT).
    #[arg(long = "grpc-tls-client-ca", env = "GRPC_TLS_CLIENT_CA", value_name = "PATH")]
    pub client_ca: Option<PathBuf>,
    /// Permissions of client certificate principals:
    /// `PRINCIPAL=PERMISSION,...;...`, `*` for all
    /// (`spiffe://shop/ops=users:read,orders:read;batch=*`).
    #[arg(
        long = "grpc-tls-client-permissions",
        env = "GRPC_TLS_CLIENT_PERMISSIONS",
        value_name = "MAP",
        default_value = "",
        value_parser = client_permissions
    )]
    pub client_permissions: certificate::PermissionMap,
    /// Who may use server reflection: authenticated (any principal;
    /// everyone with GRPC_AUTH=none), public, or off.
    #[arg(
        long = "grpc-reflection",
        env = "GRPC_REFLECTION",
        value_name = "WHO",
        default_value = "authenticated"
    )]
    pub reflection: Reflection,
}

impl AuthConfig {
    /// The checks of a server's settings (`tls_cert`: whether gRPC TLS is
    /// on): one line naming the settings when one fails.
    pub fn validate(&self, tls_cert: bool) -> Result<Mechanisms, String> {
        let Some(accepted) = self.mechanisms else {
            return Err(
                "GRPC_AUTH is not set: name what the gRPC server accepts (jwt, mtls or mtls,jwt), \
                 or none to serve every caller without authentication"
                    .to_owned(),
            );
        };
        if accepted.jwt && self.jwt_keys.is_none() {
            return Err(format!(
                "GRPC_JWT_KEYS must be set with GRPC_AUTH={accepted}: the public keys tokens are verified with"
            ));
        }
        if !accepted.jwt && self.jwt_keys.is_some() {
            return Err(format!(
                "GRPC_JWT_KEYS is set but GRPC_AUTH={accepted} accepts no tokens"
            ));
        }
        if accepted.mtls && self.client_ca.is_none() {
            return Err(format!(
                "GRPC_TLS_CLIENT_CA must be set with GRPC_AUTH={accepted}: the CA client certificates are verified with"
            ));
        }
        if !accepted.mtls && self.client_ca.is_some() {
            return Err(format!(
                "GRPC_TLS_CLIENT_CA is set but GRPC_AUTH={accepted} accepts no client certificates"
            ));
        }
        if accepted.mtls && !tls_cert {
            return Err(format!(
                "GRPC_AUTH={accepted} needs gRPC over TLS: set GRPC_TLS_CERT and GRPC_TLS_KEY"
            ));
        }
        Ok(accepted)
    }
}
