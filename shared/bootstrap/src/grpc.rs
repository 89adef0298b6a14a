//! gRPC server parts shared by the services: reflection over every contract
//! and errors with `google.rpc.BadRequest` field violations.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt as _};

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
/// detail is logged, the caller is told to retry.
pub fn unavailable(detail: &str) -> Status {
    tracing::warn!(error = %detail, "dependency unavailable");
    Status::unavailable("the service is temporarily unavailable, retry later")
}

/// The `INTERNAL` status of a failure that is not the caller's doing; the
/// detail is logged and never sent.
pub fn internal(detail: &str) -> Status {
    tracing::error!(error = %detail, "internal error");
    Status::internal("internal error")
}

/// Most field violations one status reports.
pub const MAX_REPORTED_VIOLATIONS: usize = 20;

/// `text` cut to at most `max` characters.
fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// Collects what is wrong with a request, field by field, and turns it into
/// one `INVALID_ARGUMENT` status carrying a `google.rpc.BadRequest`.
#[derive(Debug, Default)]
pub struct FieldViolations {
    violations: Vec<FieldViolation>,
}

impl FieldViolations {
    /// No violations yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `field` (a path such as `items[2].quantity`) is invalid.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.violations.push(FieldViolation::new(field, description));
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.violations.is_empty()
    }

    /// `Ok` when nothing was recorded, otherwise these violations as the
    /// error.
    pub fn check(self) -> Result<(), Self> {
        if self.violations.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }

    /// The field paths recorded, in order.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.violations.iter().map(|v| v.field.as_str())
    }

    /// The `INVALID_ARGUMENT` status whose details carry the violations as a
    /// `google.rpc.BadRequest` and whose message lists the first ones.
    ///
    /// Status details travel in a header, which HTTP/2 peers cap (16 KiB by
    /// default): a request with hundreds of bad fields would otherwise turn
    /// into a protocol error. At most [`MAX_REPORTED_VIOLATIONS`] are
    /// reported, the last one saying how many more there were.
    pub fn into_status(mut self) -> Status {
        if self.violations.len() > MAX_REPORTED_VIOLATIONS {
            let more = self.violations.len() - (MAX_REPORTED_VIOLATIONS - 1);
            self.violations.truncate(MAX_REPORTED_VIOLATIONS - 1);
            self.violations
                .push(FieldViolation::new("…", format!("and {more} more violations")));
        }
        let shown = self.violations.len().min(5);
        let mut summary = self.violations[..shown]
            .iter()
            .map(|v| format!("{}: {}", v.field, truncate(&v.description, 200)))
            .collect::<Vec<_>>()
            .join("; ");
        if self.violations.len() > shown {
            summary.push_str(&format!("; … ({} in all)", self.violations.len()));
        }
        for violation in &mut self.violations {
            violation.description = truncate(&violation.description, 200);
            violation.field = truncate(&violation.field, 100);
        }
        Status::with_error_details(
            Code::InvalidArgument,
            format!("invalid request: {summary}"),
            ErrorDetails::with_bad_request(self.violations),
        )
    }
}

/// Asks the gRPC health service at `addr` whether the server is serving:
/// the container health check (`<service> healthcheck`), with no extra
/// binary in the image.
pub async fn check_health(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let host = if addr.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{host}"))?
        .connect_timeout(std::time::Duration::from_secs(2))
        .timeout(std::time::Duration::from_secs(2))
        .connect()
        .await?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner()
        .status;
    anyhow::ensure!(
        status == ServingStatus::Serving as i32,
        "not serving (status {status})"
    );
    Ok(())
}

/// Limits and transport security of a gRPC server.
#[derive(Debug, Clone)]
pub struct GrpcOptions {
    /// `GRPC_MAX_IN_FLIGHT` (512): calls handled at once; past it calls are
    /// refused with `RESOURCE_EXHAUSTED` (see [`crate::limit`]).
    pub max_in_flight: usize,
    /// `GRPC_MAX_MESSAGE_BYTES` (1 MiB): largest request message accepted.
    pub max_message_bytes: usize,
    /// `GRPC_TLS_CERT` and `GRPC_TLS_KEY` (PEM files): serve TLS instead of
    /// plaintext.
    pub tls: Option<TlsFiles>,
}

/// A certificate chain and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain.
    pub certificate: std::path::PathBuf,
    /// The private key.
    pub key: std::path::PathBuf,
}

impl Default for GrpcOptions {
    fn default() -> Self {
        Self {
            max_in_flight: 512,
            max_message_bytes: 1024 * 1024,
            tls: None,
        }
    }
}

impl GrpcOptions {
    /// The options from the environment (see the fields).
    pub fn from_env() -> anyhow::Result<Self> {
        use crate::settings as env;
        let defaults = Self::default();
        let certificate = env::string("GRPC_TLS_CERT", "");
        let key = env::string("GRPC_TLS_KEY", "");
        let tls = match (certificate.is_empty(), key.is_empty()) {
            (true, true) => None,
            (false, false) => Some(TlsFiles {
                certificate: certificate.into(),
                key: key.into(),
            }),
            _ => anyhow::bail!("set both GRPC_TLS_CERT and GRPC_TLS_KEY, or neither"),
        };
        Ok(Self {
            max_in_flight: env::parse("GRPC_MAX_IN_FLIGHT", defaults.max_in_flight)?,
            max_message_bytes: env::parse("GRPC_MAX_MESSAGE_BYTES", defaults.max_message_bytes)?,
            tls,
        })
    }
}

/// Name of the gRPC health service.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// Serves `routes` (the service's own, named `services`, plus health and
/// reflection, which this adds) on `incoming` until `shutdown` resolves, then
/// drains the calls in flight. Every call gets a server span
/// ([`shop_telemetry::grpc::GrpcServerTraceLayer`]); calls past
/// [`GrpcOptions::max_in_flight`] are refused; TLS is served when
/// configured.
pub async fn serve<H>(
    routes: tonic::service::Routes,
    services: &[&str],
    health: tonic_health::pb::health_server::HealthServer<H>,
    incoming: tonic::transport::server::TcpIncoming,
    options: &GrpcOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()>
where
    H: tonic_health::pb::health_server::Health,
{
    let (reflection_v1, reflection_v1alpha) = reflection(services)?;
    let routes = routes
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &options.tls {
        let certificate = std::fs::read(&tls.certificate)
            .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", tls.certificate.display()))?;
        let key = std::fs::read(&tls.key)
            .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", tls.key.display()))?;
        server = server
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(certificate, key)),
            )
            .map_err(|error| anyhow::anyhow!("invalid TLS certificate or key: {error}"))?;
    }
    server
        .layer(shop_telemetry::grpc::GrpcServerTraceLayer)
        .layer(crate::limit::InFlightLimitLayer::new(options.max_in_flight))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|error| anyhow::anyhow!("gRPC server failed: {error}"))
}

/// What every service holds once started and before it runs: a migrated
/// database pool and a bound gRPC listener (its real address known, so tests
/// can ask for port 0).
pub struct Prepared {
    /// The migrated database's pool.
    pub pool: crate::db::Pool,
    /// The bound listener.
    pub incoming: tonic::transport::server::TcpIncoming,
    /// The address it is bound to.
    pub local_addr: std::net::SocketAddr,
    /// The bound admin HTTP listener (metrics, health).
    pub admin: tokio::net::TcpListener,
    /// The address the admin listener is bound to.
    pub admin_addr: std::net::SocketAddr,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Prepared {
    /// Connects to (creating and migrating as needed) the database and binds
    /// `grpc_addr` and `admin_addr`.
    pub async fn new(
        database: &crate::db::DatabaseSettings,
        migrations: diesel_migrations::EmbeddedMigrations,
        grpc_addr: std::net::SocketAddr,
        admin_addr: std::net::SocketAddr,
    ) -> anyhow::Result<Self> {
        // Installed before anything records a metric.
        crate::admin::metrics_handle()?;
        let pool = crate::db::connect(database, migrations).await?;
        let incoming = tonic::transport::server::TcpIncoming::bind(grpc_addr)
            .map_err(|error| anyhow::anyhow!("failed to bind {grpc_addr}: {error}"))?
            .with_nodelay(Some(true));
        let local_addr = incoming
            .local_addr()
            .map_err(|error| anyhow::anyhow!("bound listener has no address: {error}"))?;
        let admin = tokio::net::TcpListener::bind(admin_addr)
            .await
            .map_err(|error| anyhow::anyhow!("failed to bind the admin port {admin_addr}: {error}"))?;
        let admin_addr = admin.local_addr()?;
        Ok(Self {
            pool,
            incoming,
            local_addr,
            admin,
            admin_addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt as _;

    use super::*;

    #[test]
    fn hundreds_of_violations_are_reported_as_twenty_with_a_count_of_the_rest() {
        let mut violations = FieldViolations::new();
        for i in 0..250 {
            violations.add(format!("items[{i}].product_id"), "is required");
        }

        let status = violations.into_status();

        let reported = status.get_details_bad_request().unwrap().field_violations;
        assert_eq!(reported.len(), MAX_REPORTED_VIOLATIONS);
        assert_eq!(reported.last().unwrap().description, "and 231 more violations");
        assert!(status.message().contains("(20 in all)"), "{}", status.message());
        assert!(status.message().len() < 1000);
    }
}
