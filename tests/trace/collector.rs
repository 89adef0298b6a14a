//! An OTLP trace receiver (the collector's gRPC service, from
//! `opentelemetry-proto`) that keeps every span it is sent.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use shop_telemetry::{TelemetryConfig, TelemetryGuard};
use tonic::{Request, Response, Status};

#[derive(Clone, Default)]
pub struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

pub static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
});

struct Installed {
    collector: Collector,
    guard: TelemetryGuard,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Starts the collector and installs telemetry exporting to it, once.
pub fn install() {
    INSTALLED.get_or_init(|| {
        let _entered = RUNTIME.enter();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = Collector::default();
        let incoming =
            tonic::transport::server::TcpIncoming::from(tokio::net::TcpListener::from_std(listener).unwrap());
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(incoming);
        RUNTIME.spawn(server);
        let mut config = TelemetryConfig::new("system-tests", "0");
        config.otlp_endpoint = Some(format!("http://{addr}"));
        if std::env::var_os("TEST_LOG").is_none() {
            config.log_filter = "off".to_owned();
        }
        let guard = shop_telemetry::init(&config).unwrap();
        Installed { collector, guard }
    });
}

/// One exported span, reduced to what the assertions need.
#[derive(Debug, Clone)]
pub struct Seen {
    pub name: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub kind: i32,
    pub attributes: HashMap<String, String>,
    pub events: Vec<String>,
    pub links: Vec<String>,
}

fn text(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The spans of trace `trace_id` (hex) exported so far.
pub fn spans_of(trace_id: &str) -> Vec<Seen> {
    let installed = INSTALLED.get().expect("install() first");
    // The flush waits for the export, which runs on this runtime.
    tokio::task::block_in_place(|| installed.guard.force_flush());
    let spans = installed.collector.spans.lock().unwrap();
    spans
        .iter()
        .filter(|span| hex(&span.trace_id) == trace_id)
        .map(|span| Seen {
            name: span.name.clone(),
            span_id: hex(&span.span_id),
            parent_span_id: hex(&span.parent_span_id),
            kind: span.kind,
            attributes: span
                .attributes
                .iter()
                .map(|kv| (kv.key.clone(), text(&kv.value)))
                .collect(),
            events: span.events.iter().map(|event| event.name.clone()).collect(),
            links: span.links.iter().map(|link| hex(&link.span_id)).collect(),
        })
        .collect()
}

/// Waits until the trace holds a span of each of `names`, then returns its
/// spans.
pub async fn wait_for_spans(trace_id: &str, names: &[&str]) -> Vec<Seen> {
    shop_testkit::eventually(
        &format!("spans {names:?} in trace {trace_id}"),
        Duration::from_secs(30),
        || async {
            let spans = spans_of(trace_id);
            names
                .iter()
                .all(|name| spans.iter().any(|span| span.name == *name))
                .then_some(spans)
        },
    )
    .await
}
