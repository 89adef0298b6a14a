//! One server span per gRPC call, after the OpenTelemetry RPC conventions.
//!
//! [`GrpcServerTraceLayer`] is a tower layer for `tonic::transport::Server`:
//! it continues the caller's trace from the `traceparent` metadata, names the
//! span `package.Service/Method`, sets `rpc.system`, `rpc.service`,
//! `rpc.method` and, once the response head is known,
//! `rpc.grpc.status_code`, logs `call finished` (debug) with the code and
//! the latency, and counts the call in `grpc_server_requests_total` and
//! `grpc_server_request_duration_seconds`. Health checks and reflection get no span: they would flood
//! the trace store with probes.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Opens the server span of each call; see the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcServerTraceLayer;

impl<S> tower::Layer<S> for GrpcServerTraceLayer {
    type Service = GrpcServerTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcServerTrace { inner }
    }
}

/// The service made by [`GrpcServerTraceLayer`].
#[derive(Debug, Clone)]
pub struct GrpcServerTrace<S> {
    inner: S,
}

/// Services whose calls are not traced.
const UNTRACED: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// gRPC codes that mark a server span as failed (the others are the caller's
/// doing, per the OpenTelemetry RPC conventions).
const SERVER_ERROR_CODES: &[i64] = &[2, 4, 12, 13, 14, 15];

/// The server span of a call to `path` (`/package.Service/Method`).
pub fn server_span(path: &str, headers: &http::HeaderMap) -> Span {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or(("unknown", "unknown"));
    if UNTRACED.contains(&service) {
        return Span::none();
    }
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
fn record_metrics(path: &str, code: i64, elapsed: std::time::Duration) {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or(("unknown", "unknown"));
    if UNTRACED.contains(&service) {
        return;
    }
    let (service, method) = (service.to_owned(), method.to_owned());
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
        let path = request.uri().path().to_owned();
        let span = server_span(&path, request.headers());
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
                record_metrics(&path, code, elapsed);
                tracing::debug!(parent: &span, code, elapsed_us = elapsed.as_micros() as u64, "call finished");
            }
            result
        })
    }
}
