//! One server span per gRPC call, after the OpenTelemetry RPC conventions.
//!
//! [`GrpcServerTraceLayer`] is a tower layer for `tonic::transport::Server`:
//! it continues the caller's trace from the `traceparent` metadata, names the
//! span `package.Service/Method`, sets `rpc.system`, `rpc.service`,
//! `rpc.method` and, once the response head is known,
//! `rpc.grpc.status_code`, logs `call finished` (debug) with the code and
//! the latency, and counts the call in `grpc_server_requests_total` and
//! `grpc_server_request_duration_seconds`. Health checks and reflection get
//! no span and are not counted: they would flood the trace store with probes.
//!
//! # Bounded names
//!
//! The request path is the caller's to choose, so it never becomes a label
//! value or a span name as it is: every metric series and span name would
//! then be one more entry that lives as long as the process, and a caller
//! inventing paths would grow memory and the scrape without bound. The layer
//! is given the methods the server serves ([`KnownMethods`], built by the
//! server from what it registered) and [`KnownMethods::classify`] maps each
//! path to one of them or to [`Call::Unknown`], whose service and method are
//! both [`UNKNOWN`]. So the series are at most (methods + 1) × codes, known
//! before the first call. The path of an unknown call is only written to a
//! debug log line (clipped), for whoever looks for the misdirected client.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The `service` and `method` of a call to a method the server does not
/// serve, in labels and in the span name.
pub const UNKNOWN: &str = "unknown";

/// Services whose calls are neither traced nor counted.
const UNTRACED: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// How much of an unknown path a log line shows.
const LOGGED_PATH_CHARS: usize = 128;

/// The methods a server serves, by path (`/package.Service/Method`): the
/// only names its metric labels and span names take (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct KnownMethods {
    /// Each path with its [`Call::Known`].
    by_path: Arc<HashMap<String, Call>>,
}

impl KnownMethods {
    /// The set of `(service, method)` pairs, the service fully qualified
    /// (`shop.user.v1.UserService`, `CreateUser`).
    pub fn new<I, S, M>(methods: I) -> Self
    where
        I: IntoIterator<Item = (S, M)>,
        S: AsRef<str>,
        M: AsRef<str>,
    {
        let by_path = methods
            .into_iter()
            .map(|(service, method)| {
                let (service, method) = (service.as_ref(), method.as_ref());
                let call = Call::Known {
                    service: Arc::from(service),
                    method: Arc::from(method),
                };
                (format!("/{service}/{method}"), call)
            })
            .collect();
        Self {
            by_path: Arc::new(by_path),
        }
    }

    /// What a call to `path` is for telemetry: untraced (health,
    /// reflection), one of the known methods, or unknown.
    pub fn classify(&self, path: &str) -> Call {
        let service = path
            .strip_prefix('/')
            .and_then(|rest| rest.split_once('/'))
            .map(|(service, _)| service);
        if service.is_some_and(|service| UNTRACED.contains(&service)) {
            return Call::Untraced;
        }
        self.by_path.get(path).cloned().unwrap_or(Call::Unknown)
    }
}

/// A call as telemetry names it; see [`KnownMethods::classify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// Health checks and reflection: no span, no metrics.
    Untraced,
    /// A method the server serves.
    Known {
        /// The fully qualified service (`shop.user.v1.UserService`).
        service: Arc<str>,
        /// The method (`CreateUser`).
        method: Arc<str>,
    },
    /// Any other path: named [`UNKNOWN`], whatever the path was.
    Unknown,
}

impl Call {
    /// The `service` label and `rpc.service` attribute.
    pub fn service(&self) -> &str {
        match self {
            Self::Known { service, .. } => service,
            Self::Untraced | Self::Unknown => UNKNOWN,
        }
    }

    /// The `method` label and `rpc.method` attribute.
    pub fn method(&self) -> &str {
        match self {
            Self::Known { method, .. } => method,
            Self::Untraced | Self::Unknown => UNKNOWN,
        }
    }

    /// Both as label values, shared rather than copied.
    fn labels(&self) -> (metrics::SharedString, metrics::SharedString) {
        match self {
            Self::Known { service, method } => (service.clone().into(), method.clone().into()),
            Self::Untraced | Self::Unknown => (
                metrics::SharedString::const_str(UNKNOWN),
                metrics::SharedString::const_str(UNKNOWN),
            ),
        }
    }
}

/// Opens the server span of each call; see the module docs.
#[derive(Debug, Clone)]
pub struct GrpcServerTraceLayer {
    known: KnownMethods,
}

impl GrpcServerTraceLayer {
    /// Names calls after `known`, every other path [`UNKNOWN`].
    pub fn new(known: KnownMethods) -> Self {
        Self { known }
    }
}

impl<S> tower::Layer<S> for GrpcServerTraceLayer {
    type Service = GrpcServerTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcServerTrace {
            inner,
            known: self.known.clone(),
        }
    }
}

/// The service made by [`GrpcServerTraceLayer`].
#[derive(Debug, Clone)]
pub struct GrpcServerTrace<S> {
    inner: S,
    known: KnownMethods,
}

/// gRPC codes that mark a server span as failed (the others are the caller's
/// doing, per the OpenTelemetry RPC conventions).
const SERVER_ERROR_CODES: &[i64] = &[2, 4, 12, 13, 14, 15];

/// The server span of `call`, continuing the trace in `headers`.
pub fn server_span(call: &Call, headers: &http::HeaderMap) -> Span {
    if *call == Call::Untraced {
        return Span::none();
    }
    let (service, method) = (call.service(), call.method());
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    // Fails only when the span is disabled; then there is nothing to parent.
    let _ = span.set_parent(crate::propagation::extract_headers(headers));
    span
}

/// Records the gRPC status of a response head on its server span. A unary
/// success carries its status in the trailers, so a head without
/// `grpc-status` means OK.
pub fn record_status(span: &Span, headers: &http::HeaderMap) -> i64 {
    let code = headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i64>().ok())
        .unwrap_or(0);
    span.record("rpc.grpc.status_code", code);
    if SERVER_ERROR_CODES.contains(&code) {
        span.record("otel.status_code", "ERROR");
    }
    code
}

/// `grpc_server_requests_total{service, method, code}` and
/// `grpc_server_request_duration_seconds{service, method}`; health checks and
/// reflection are not counted.
fn record_metrics(call: &Call, code: i64, elapsed: std::time::Duration) {
    if *call == Call::Untraced {
        return;
    }
    let (service, method) = call.labels();
    metrics::counter!(
        "grpc_server_requests_total",
        "service" => service.clone(),
        "method" => method.clone(),
        "code" => code_name(code),
    )
    .increment(1);
    metrics::histogram!("grpc_server_request_duration_seconds", "service" => service, "method" => method)
        .record(elapsed.as_secs_f64());
}

/// The canonical name of a gRPC status code.
pub fn code_name(code: i64) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("UNKNOWN")
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcServerTrace<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let call = self.known.classify(request.uri().path());
        let span = server_span(&call, request.headers());
        if call == Call::Unknown {
            let path = request.uri().path();
            let clipped = path
                .char_indices()
                .nth(LOGGED_PATH_CHARS)
                .map_or(path, |(end, _)| &path[..end]);
            tracing::debug!(parent: &span, path = ?clipped, "call to an unknown method");
        }
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let started = std::time::Instant::now();
        Box::pin(async move {
            let result = tracing::Instrument::instrument(future, span.clone()).await;
            if let Ok(response) = &result {
                let code = record_status(&span, response.headers());
                let elapsed = started.elapsed();
                record_metrics(&call, code, elapsed);
                tracing::debug!(parent: &span, code, elapsed_us = elapsed.as_micros() as u64, "call finished");
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> KnownMethods {
        KnownMethods::new([
            ("shop.user.v1.UserService", "CreateUser"),
            ("shop.user.v1.UserService", "GetUser"),
        ])
    }

    fn labels(call: &Call) -> (&str, &str) {
        (call.service(), call.method())
    }

    #[test]
    fn a_method_the_server_serves_is_named_after_its_service_and_method() {
        let call = known().classify("/shop.user.v1.UserService/CreateUser");

        assert_eq!(labels(&call), ("shop.user.v1.UserService", "CreateUser"));
    }

    #[test]
    fn any_other_path_is_unknown_in_both_labels() {
        let known = known();
        let paths = [
            "/shop.user.v1.UserService/DropAllUsers",
            "/shop.user.v1.UserService/createuser",
            "/shop.user.v1.UserService/CreateUser/",
            "/shop.user.v1.UserService/CreateUser/extra",
            "/shop.user.v2.UserService/CreateUser",
            "/shop.order.v1.OrderService/CreateOrder",
            "/made.up.Service/Method",
            "/shop.user.v1.UserService",
            "/CreateUser",
            "/",
            "",
            "shop.user.v1.UserService/CreateUser",
        ];

        for path in paths {
            let call = known.classify(path);
            assert_eq!(call, Call::Unknown, "{path:?}");
            assert_eq!(labels(&call), (UNKNOWN, UNKNOWN), "{path:?}");
        }
    }

    #[test]
    fn health_checks_and_reflection_are_untraced_whatever_the_method() {
        let known = known();

        for path in [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.health.v1.Health/NoSuchMethod",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(known.classify(path), Call::Untraced, "{path:?}");
        }
    }

    #[test]
    fn thousands_of_made_up_paths_map_to_one_pair_of_labels() {
        let known = known();

        let distinct: std::collections::HashSet<(String, String)> = (0..2000)
            .map(|i| known.classify(&format!("/made.up.v{i}.Service/Method{i}")))
            .map(|call| (call.service().to_owned(), call.method().to_owned()))
            .collect();

        assert_eq!(distinct.len(), 1);
        assert!(distinct.contains(&(UNKNOWN.to_owned(), UNKNOWN.to_owned())));
    }

    #[test]
    fn an_empty_set_knows_no_method() {
        let call = KnownMethods::default().classify("/shop.user.v1.UserService/CreateUser");

        assert_eq!(call, Call::Unknown);
    }
}
