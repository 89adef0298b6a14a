//! Carrying a trace context across process boundaries with the globally
//! installed W3C TraceContext + Baggage propagators.
//!
//! Three carriers are used in the system: a string map (stored with each
//! outbox row, so the relay can continue the trace of the command that wrote
//! it), gRPC metadata / HTTP headers, and AMQP headers (in the messaging
//! crate, on top of [`inject_map`] / [`extract_map`]).

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::{Context, global};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The propagation fields (`traceparent`, `tracestate`, `baggage`) of `cx`.
pub fn inject_map(cx: &Context) -> HashMap<String, String> {
    let mut map = HashMap::new();
    global::get_text_map_propagator(|propagator| propagator.inject_context(cx, &mut map));
    map
}

/// The propagation fields of the current `tracing` span.
pub fn current_map() -> HashMap<String, String> {
    inject_map(&tracing::Span::current().context())
}

/// The context described by propagation fields; an empty context when they
/// hold none.
pub fn extract_map(map: &HashMap<String, String>) -> Context {
    global::get_text_map_propagator(|propagator| propagator.extract(map))
}

/// Reads propagation fields from HTTP headers (gRPC metadata on the wire).
#[derive(Debug)]
pub struct HeaderExtractor<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The context carried by HTTP headers.
pub fn extract_headers(headers: &http::HeaderMap) -> Context {
    global::get_text_map_propagator(|propagator| propagator.extract(&HeaderExtractor(headers)))
}

/// Writes propagation fields into outgoing gRPC metadata (clients).
#[derive(Debug)]
pub struct MetadataInjector<'a>(pub &'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let Ok(key) = tonic::metadata::MetadataKey::from_bytes(key.as_bytes()) else {
            return;
        };
        if let Ok(value) = tonic::metadata::MetadataValue::try_from(value) {
            self.0.insert(key, value);
        }
    }
}

/// Adds the current span's context to an outgoing gRPC request: a tonic
/// client interceptor.
#[allow(clippy::result_large_err)] // the signature tonic's interceptors have
pub fn inject_grpc<T>(mut request: tonic::Request<T>) -> Result<tonic::Request<T>, tonic::Status> {
    let cx = tracing::Span::current().context();
    global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&cx, &mut MetadataInjector(request.metadata_mut()));
    });
    Ok(request)
}
