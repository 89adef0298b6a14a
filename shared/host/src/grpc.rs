//! The gRPC server of a service: reflection over every contract, health,
//! limits, TLS and the trace layer, and the statuses of failures that are not
//! the caller's doing.
//!
//! # Callers that stall, vanish or flood
//!
//! Whoever can connect can hold resources without doing any work; each kind
//! of hold has a bound here:
//!
//! - A stream that sends its headers and then stalls: the request deadline
//!   (`GRPC_REQUEST_TIMEOUT`) ends it, and it never holds an in-flight permit
//!   (see [`crate::limit`]).
//! - Too many streams on one connection: at most
//!   `GRPC_MAX_STREAMS_PER_CONNECTION` at once (HTTP/2
//!   `SETTINGS_MAX_CONCURRENT_STREAMS`); the client queues the rest.
//! - A client that is gone without closing (a dead host, a cut network, a
//!   process that stopped reading): an HTTP/2 PING every
//!   `GRPC_KEEPALIVE_INTERVAL` on a quiet connection, which is closed when
//!   the PING is not answered within `GRPC_KEEPALIVE_TIMEOUT`. TCP keepalive
//!   probes (first after the same interval, then three within the timeout)
//!   also catch a dead peer on a connection that never got as far as
//!   HTTP/2.
//! - Floods of reset streams: a client opening streams and resetting them
//!   at once (HTTP/2 "Rapid Reset", CVE-2023-44487) gets a GOAWAY after
//!   [`MAX_PENDING_ACCEPT_RESET_STREAMS`] of them are pending; one making
//!   the server reset streams by protocol errors ("MadeYouReset") after
//!   [`MAX_LOCAL_ERROR_RESET_STREAMS`]. Both are h2's current defaults,
//!   pinned here so an upgrade cannot loosen them unseen.
//! - Made-up method paths: answered `UNIMPLEMENTED` like any unknown method,
//!   and named `unknown` in metrics and spans, never after the path (see
//!   [`shop_telemetry::grpc`]), with the known names taken from the services
//!   this server registered ([`known_methods`]).
//!
//! Left unbounded: the number of connections (a connection that never sends
//! its HTTP/2 preface holds a socket and a small task until TCP keepalive
//! finds its peer dead or it closes) and a connection's age (no
//! `max_connection_age`: it would break up long-lived, healthy channels for
//! no gain here). A front proxy or the platform bounds connections per
//! client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use shop_contracts::prost::Message as _;
use shop_telemetry::grpc::KnownMethods;
use tonic::Status;
use tonic::transport::server::TcpIncoming;

/// Streams a client may have reset before the server accepted them, per
/// connection, before the connection is closed with `ENHANCE_YOUR_CALM`
/// (h2's default).
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

/// Streams the server may reset because of the client's protocol errors,
/// per connection, before it is closed with `ENHANCE_YOUR_CALM` (h2's
/// default).
pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// TCP keepalive probes sent, within `GRPC_KEEPALIVE_TIMEOUT`, before a
/// silent peer's connection is dropped.
const TCP_KEEPALIVE_PROBES: u32 = 3;

/// Server reflection (v1 and v1alpha, so both new and older grpcurl builds
/// work) advertising `services` and the health service, with every message
/// of the system described.
pub fn reflection(
    services: &[&str],
) -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let builder = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(shop_contracts::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Every listed service must be describable: clients that build
            // their stubs from reflection ask for each one.
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
            .with_service_name(HEALTH_SERVICE)
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        for service in services {
            builder = builder.with_service_name(*service);
        }
        builder
    };
    let v1 = builder().build_v1()?;
    let v1alpha = builder().build_v1alpha()?;
    Ok((v1, v1alpha))
}

/// The `UNAVAILABLE` status of a call that could not reach a dependency; the
/// error (with its causes) is logged, the caller is told to retry.
pub fn unavailable(error: &(dyn std::error::Error + 'static)) -> Status {
    tracing::warn!(error = %shop_telemetry::error_chain(error), "dependency unavailable");
    Status::unavailable("the service is temporarily unavailable, retry later")
}

/// The `INTERNAL` status of a failure that is not the caller's doing; the
/// error (with its causes) is logged and never sent.
pub fn internal(error: &(dyn std::error::Error + 'static)) -> Status {
    tracing::error!(error = %shop_telemetry::error_chain(error), "internal error");
    Status::internal("internal error")
}

/// Where a gRPC server listens, its limits and its transport security.
#[derive(Debug, Clone, clap::Args)]
pub struct GrpcConfig {
    /// gRPC listen address; port 0 picks a free port.
    #[arg(
        id = "grpc_addr",
        long = "grpc-addr",
        env = "GRPC_ADDR",
        value_name = "ADDR",
        default_value = "0.0.0.0:50051"
    )]
    pub addr: SocketAddr,
    /// Calls handled at once; past it calls are refused with
    /// `RESOURCE_EXHAUSTED`.
    #[arg(
        long = "grpc-max-in-flight",
        env = "GRPC_MAX_IN_FLIGHT",
        value_name = "N",
        default_value_t = 512,
        value_parser = clap::value_parser!(u32).range(1..=100_000)
    )]
    pub max_in_flight: u32,
    /// Largest request message accepted, in bytes.
    #[arg(
        long = "grpc-max-message-bytes",
        env = "GRPC_MAX_MESSAGE_BYTES",
        value_name = "BYTES",
        default_value_t = 1024 * 1024,
        value_parser = clap::value_parser!(u32).range(1024..=64 * 1024 * 1024)
    )]
    pub max_message_bytes: u32,
    /// Longest a call may take, from its headers to its answer: receiving
    /// the whole request and handling it. Past it the call ends with
    /// `DEADLINE_EXCEEDED`, so a caller that stalls mid-request holds a
    /// stream no longer than this (and never an in-flight permit).
    #[arg(
        id = "grpc_request_timeout",
        long = "grpc-request-timeout",
        env = "GRPC_REQUEST_TIMEOUT",
        value_name = "DURATION",
        default_value = "30s",
        value_parser = shop_config::duration
    )]
    pub request_timeout: Duration,
    /// How long a connection may be quiet before the server sends an HTTP/2
    /// PING (and TCP keepalive probes start).
    #[arg(
        id = "grpc_keepalive_interval",
        long = "grpc-keepalive-interval",
        env = "GRPC_KEEPALIVE_INTERVAL",
        value_name = "DURATION",
        default_value = "20s",
        value_parser = shop_config::duration
    )]
    pub keepalive_interval: Duration,
    /// How long the server waits for the answer to its PING before it
    /// closes the connection as dead.
    #[arg(
        id = "grpc_keepalive_timeout",
        long = "grpc-keepalive-timeout",
        env = "GRPC_KEEPALIVE_TIMEOUT",
        value_name = "DURATION",
        default_value = "20s",
        value_parser = shop_config::duration
    )]
    pub keepalive_timeout: Duration,
    /// Calls one connection may have open at once (HTTP/2
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`); a client queues the rest.
    #[arg(
        id = "grpc_max_streams_per_connection",
        long = "grpc-max-streams-per-connection",
        env = "GRPC_MAX_STREAMS_PER_CONNECTION",
        value_name = "N",
        default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(1..=10_000)
    )]
    pub max_streams_per_connection: u32,
    /// PEM certificate chain: serve TLS instead of plaintext (with
    /// `GRPC_TLS_KEY`).
    #[arg(
        long = "grpc-tls-cert",
        env = "GRPC_TLS_CERT",
        value_name = "PATH",
        requires = "grpc_tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `GRPC_TLS_CERT`.
    #[arg(
        id = "grpc_tls_key",
        long = "grpc-tls-key",
        env = "GRPC_TLS_KEY",
        value_name = "PATH",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Who may call (see [`crate::auth`]).
    #[command(flatten)]
    pub auth: crate::auth::AuthConfig,
}

impl GrpcConfig {
    /// The largest request message, for a generated server's
    /// `max_decoding_message_size`.
    pub fn max_message_size(&self) -> usize {
        usize::try_from(self.max_message_bytes).unwrap_or(usize::MAX)
    }

    /// Binds the gRPC listener at [`GrpcConfig::addr`], with `TCP_NODELAY`
    /// and TCP keepalive (see the module docs). The keepalive is set here
    /// because tonic's `Server::tcp_keepalive` is ignored for a listener
    /// bound beforehand.
    pub fn bind(&self) -> anyhow::Result<TcpIncoming> {
        let probe_interval = (self.keepalive_timeout / TCP_KEEPALIVE_PROBES).max(Duration::from_secs(1));
        Ok(TcpIncoming::bind(self.addr)
            .with_context(|| format!("failed to bind the gRPC address {}", self.addr))?
            .with_nodelay(Some(true))
            .with_keepalive(Some(self.keepalive_interval))
            .with_keepalive_interval(Some(probe_interval))
            .with_keepalive_retries(Some(TCP_KEEPALIVE_PROBES)))
    }
}

/// The methods of `services` (fully qualified names, as registered), read
/// from the contracts' descriptors: the names the trace layer may use. A
/// service missing from the descriptors is an error, so a service cannot be
/// served uncounted by mistake.
pub fn known_methods(services: &[&str]) -> anyhow::Result<KnownMethods> {
    Ok(KnownMethods::new(methods_of(services)?))
}

/// The `(service, method)` pairs of `services`, from the contracts'
/// descriptors; see [`known_methods`].
pub fn methods_of(services: &[&str]) -> anyhow::Result<Vec<(String, String)>> {
    let descriptors =
        shop_contracts::prost_types::FileDescriptorSet::decode(shop_contracts::FILE_DESCRIPTOR_SET)
            .context("the contracts' file descriptor set does not decode")?;
    let mut methods = Vec::new();
    let mut found = Vec::new();
    for file in &descriptors.file {
        for service in &file.service {
            let name = match file.package() {
                "" => service.name().to_owned(),
                package => format!("{package}.{}", service.name()),
            };
            if !services.contains(&name.as_str()) {
                continue;
            }
            methods.extend(
                service
                    .method
                    .iter()
                    .map(|method| (name.clone(), method.name().to_owned())),
            );
            found.push(name);
        }
    }
    if let Some(missing) = services
        .iter()
        .find(|service| !found.iter().any(|name| name == *service))
    {
        anyhow::bail!("the service {missing} is not in the contracts' file descriptor set");
    }
    Ok(methods)
}

/// Name of the gRPC health service.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// Serves `routes` (the service's own, named `services`, plus health and
/// reflection, which this adds) on `incoming` until `shutdown` resolves, then
/// drains the calls in flight. Every call gets a server span
/// ([`shop_telemetry::grpc::GrpcServerTraceLayer`], naming the methods of
/// `services` and no others); is authenticated and authorized from its
/// headers ([`crate::auth`]) before its body is read; and is received whole
/// within the request deadline before it may take one of
/// [`GrpcConfig::max_in_flight`] permits ([`crate::limit`]); connections get
/// the keepalive and stream bounds of the module docs; TLS is served when
/// configured, asking for client certificates with `GRPC_TLS_CLIENT_CA`.
pub async fn serve<H>(
    routes: tonic::service::Routes,
    services: &[&str],
    health: tonic_health::pb::health_server::HealthServer<H>,
    incoming: tonic::transport::server::TcpIncoming,
    config: &GrpcConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()>
where
    H: tonic_health::pb::health_server::Health,
{
    let known = known_methods(services)?;
    let authenticator = std::sync::Arc::new(authenticator(config, services, known.clone())?);
    let mut routes = routes.add_service(health);
    if config.auth.reflection != crate::auth::Reflection::Off {
        let (reflection_v1, reflection_v1alpha) = reflection(services)?;
        routes = routes.add_service(reflection_v1).add_service(reflection_v1alpha);
    }
    let mut server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .max_concurrent_streams(config.max_streams_per_connection)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESET_STREAMS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS));
    if let (Some(certificate), Some(key)) = (&config.tls_cert, &config.tls_key) {
        let certificate_pem =
            std::fs::read(certificate).with_context(|| format!("cannot read {}", certificate.display()))?;
        let key_pem = std::fs::read(key).with_context(|| format!("cannot read {}", key.display()))?;
        let mut tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(certificate_pem, key_pem));
        if let Some(client_ca) = &config.auth.client_ca {
            let ca = std::fs::read(client_ca)
                .with_context(|| format!("GRPC_TLS_CLIENT_CA: cannot read {}", client_ca.display()))?;
            // Asked for and verified in the handshake, required per call
            // (crate::auth): health checks need none.
            tls = tls
                .client_ca_root(tonic::transport::Certificate::from_pem(ca))
                .client_auth_optional(true);
        }
        server = server
            .tls_config(tls)
            .context("invalid TLS certificate, key or client CA")?;
    }
    let (stop_watching, watching) = (
        tokio_util::sync::CancellationToken::new(),
        authenticator.tokens().cloned(),
    );
    if let Some(tokens) = watching {
        tokio::spawn(tokens.watch(stop_watching.clone()));
    }
    let _stop_watching = stop_watching.drop_guard();
    server
        .layer(shop_telemetry::grpc::GrpcServerTraceLayer::new(known))
        .layer(crate::auth::AuthLayer::new(authenticator))
        .layer(crate::limit::InFlightLimitLayer::new(
            config.max_in_flight as usize,
            config.max_message_size(),
            config.request_timeout,
        ))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("gRPC server failed")
}

/// The authenticator of a server serving `services`, after checking that
/// each of their methods has a permission ([`crate::auth::METHODS`]);
/// announces `GRPC_AUTH=none` (a warning and the gauge
/// `grpc_server_auth_disabled`).
fn authenticator(
    config: &GrpcConfig,
    services: &[&str],
    known: KnownMethods,
) -> anyhow::Result<crate::auth::Authenticator> {
    let authenticator = crate::auth::Authenticator::new(&config.auth, config.tls_cert.is_some(), known)?;
    if let Some(path) = methods_of(services)?
        .into_iter()
        .map(|(service, method)| format!("/{service}/{method}"))
        .find(|path| crate::auth::method_policy(path).is_none())
    {
        anyhow::bail!(
            "the method {path} has no permission in shop_host::auth::METHODS: it would be served unchecked"
        );
    }
    let disabled = authenticator.accepted().is_none();
    if disabled {
        tracing::warn!("gRPC authentication is off (GRPC_AUTH=none): every caller may call every method");
    }
    metrics::gauge!("grpc_server_auth_disabled").set(if disabled { 1.0 } else { 0.0 });
    Ok(authenticator)
}

/// `ABORTED`: a change guarded by `expected_version` found the aggregate at
/// another version (optimistic concurrency); the caller reads it again.
#[derive(Debug, thiserror::Error)]
#[error("{aggregate} {id} is at version {actual}, not the expected version {expected}")]
pub struct StaleVersion {
    /// What kind of aggregate (`user`, `order`).
    pub aggregate: &'static str,
    /// Which one.
    pub id: uuid::Uuid,
    /// The version the caller expected.
    pub expected: i64,
    /// The version stored.
    pub actual: i64,
}

impl StaleVersion {
    /// `Ok` when `actual` is the version the caller expected.
    pub fn check(aggregate: &'static str, id: uuid::Uuid, expected: i64, actual: i64) -> Result<(), Self> {
        if expected == actual {
            return Ok(());
        }
        Err(Self {
            aggregate,
            id,
            expected,
            actual,
        })
    }
}

impl From<StaleVersion> for Status {
    fn from(error: StaleVersion) -> Self {
        Status::aborted(error.to_string())
    }
}

/// A failure of a service's storage that is not the caller's doing, as a
/// gRPC status: `UNAVAILABLE` during a database outage (the caller retries),
/// `INTERNAL` otherwise. The cause is kept and logged, never sent.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// `UNAVAILABLE`: the database is unreachable, the pool is exhausted, or
    /// the database cannot do the work right now.
    #[error("database unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// `INTERNAL`: a bug or an unexpected database failure.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<diesel::result::Error> for StorageError {
    fn from(error: diesel::result::Error) -> Self {
        // A conflict with a concurrent transaction succeeds when retried,
        // as an outage does: the caller is told to retry.
        match shop_database::Fault::of(&error) {
            shop_database::Fault::Outage | shop_database::Fault::Conflict => Self::Unavailable(error.into()),
            shop_database::Fault::Failure => Self::Internal(error.into()),
        }
    }
}

impl From<shop_database::PoolError> for StorageError {
    fn from(error: shop_database::PoolError) -> Self {
        Self::Unavailable(error.into())
    }
}

impl From<shop_database::Timeout> for StorageError {
    fn from(error: shop_database::Timeout) -> Self {
        Self::Unavailable(error.into())
    }
}

impl From<StorageError> for Status {
    fn from(error: StorageError) -> Self {
        match &error {
            StorageError::Unavailable(_) => unavailable(&error),
            StorageError::Internal(_) => internal(&error),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use shop_telemetry::grpc::Call;

    use super::*;

    #[test]
    fn the_known_methods_are_those_of_the_registered_services_in_the_contracts() {
        let known = known_methods(&["shop.user.v1.UserService"]).unwrap();

        for method in ["CreateUser", "GetUser", "UpdateUser", "DeleteUser", "ListUsers"] {
            let call = known.classify(&format!("/shop.user.v1.UserService/{method}"));
            assert_eq!(
                (call.service(), call.method()),
                ("shop.user.v1.UserService", method)
            );
        }
        assert_eq!(
            known.classify("/shop.order.v1.OrderService/CreateOrder"),
            Call::Unknown,
            "a service of the contracts this server does not serve"
        );
    }

    #[test]
    fn every_method_of_every_service_in_the_contracts_has_a_permission() {
        let descriptors =
            shop_contracts::prost_types::FileDescriptorSet::decode(shop_contracts::FILE_DESCRIPTOR_SET)
                .unwrap();
        let services: Vec<String> = descriptors
            .file
            .iter()
            .flat_map(|file| {
                file.service
                    .iter()
                    .map(|service| format!("{}.{}", file.package(), service.name()))
            })
            .collect();
        let services: Vec<&str> = services.iter().map(String::as_str).collect();
        let methods = methods_of(&services).unwrap();

        assert!(methods.len() >= 9, "{methods:?}");
        for (service, method) in methods {
            let path = format!("/{service}/{method}");
            assert!(
                crate::auth::method_policy(&path).is_some(),
                "{path} has no permission"
            );
        }
    }

    #[test]
    fn a_registered_service_missing_from_the_contracts_is_an_error() {
        let error = known_methods(&["shop.user.v1.UserService", "shop.nothing.v1.Ghost"]).unwrap_err();

        assert!(error.to_string().contains("shop.nothing.v1.Ghost"), "{error}");
    }
}
