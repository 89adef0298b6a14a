//! Telemetry for every service: human-readable (or JSON) logs and
//! OpenTelemetry traces, set up by one call to [`init`] at start-up.
//!
//! - Logs go to stdout through `tracing-subscriber`, filtered by `RUST_LOG`
//!   (default `info`), as text or, with `LOG_FORMAT=json`, one JSON object per
//!   line. Every line written inside a span carries its `trace_id` and
//!   `span_id`.
//! - Spans are turned into OpenTelemetry spans by `tracing-opentelemetry` and,
//!   when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, exported over OTLP/gRPC in
//!   batches. With no endpoint nothing is exported and nothing is logged
//!   about it; trace ids still exist, so logs and propagated contexts stay
//!   correlated.
//! - The W3C TraceContext and Baggage propagators are installed globally;
//!   [`propagation`] carries contexts through string maps (the outbox row),
//!   gRPC metadata and, in the messaging crate, AMQP headers.
//! - [`grpc`] opens one server span per call following the OpenTelemetry RPC
//!   conventions.
//!
//! The standard variables the SDK reads are honoured: `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`,
//! `OTEL_TRACES_SAMPLER_ARG`.
#![forbid(unsafe_code)]

pub mod grpc;
mod logfmt;
pub mod propagation;

use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{KeyValue, global};
use opentelemetry_otlp::{WithExportConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (the default).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// What [`init`] sets up: the logs' filter and format, and where traces go.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryConfig {
    /// `service.name` unless `OTEL_SERVICE_NAME` says otherwise (set by the
    /// service).
    #[arg(skip)]
    pub service_name: String,
    /// `service.version` (set by the service).
    #[arg(skip)]
    pub service_version: String,
    /// Log lines as `text` or one `json` object per line.
    #[arg(
        long = "log-format",
        env = "LOG_FORMAT",
        value_name = "FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Which log lines are written (tracing's `EnvFilter` syntax). lapin logs
    /// the normal closing of a channel as an error; connection problems are
    /// reported by the services themselves, with context.
    #[arg(
        long = "log-filter",
        env = "RUST_LOG",
        value_name = "FILTER",
        default_value = "info,lapin=off",
        value_parser = parse_filter
    )]
    pub log_filter: String,
    /// OTLP/gRPC endpoint traces are exported to (`http://jaeger:4317`);
    /// export is off when unset.
    #[arg(
        long = "otlp-endpoint",
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        value_name = "URL",
        value_parser = parse_endpoint
    )]
    pub otlp_endpoint: Option<String>,
    /// How long shutdown waits for the last spans to be exported.
    #[arg(skip = Duration::from_secs(3))]
    pub shutdown_timeout: Duration,
}

impl TelemetryConfig {
    /// The defaults for `service_name` at `service_version`.
    pub fn new(service_name: &str, service_version: &str) -> Self {
        let mut config: Self = shop_config::defaults();
        config.service_name = service_name.to_owned();
        config.service_version = service_version.to_owned();
        config
    }
}

fn parse_filter(value: &str) -> Result<String, String> {
    EnvFilter::try_new(value)
        .map(|_| value.to_owned())
        .map_err(|error| format!("{error}: expected a filter such as info or info,shop_outbox=debug"))
}

fn parse_endpoint(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.starts_with("http://") || value.starts_with("https://") {
        Ok(value.to_owned())
    } else {
        Err("expected an http:// or https:// URL such as http://localhost:4317".to_owned())
    }
}

/// `error` and its sources, `: `-separated, for a log field: a typed error
/// keeps its cause as its source, and a log line should show all of it.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

/// Keeps the tracer provider alive; [`TelemetryGuard::shutdown`] flushes the
/// spans still buffered, bounded by the configured timeout.
#[must_use = "dropping the guard without shutdown loses the last spans"]
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
    timeout: Duration,
}

impl TelemetryGuard {
    /// Exports every finished span now instead of at the next batch tick.
    pub fn force_flush(&self) {
        if let Err(error) = self.provider.force_flush() {
            tracing::debug!(%error, "span flush incomplete");
        }
    }

    /// Exports what is still buffered (bounded by the timeout) and stops the
    /// exporter. Call it while the tokio runtime still runs.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown_with_timeout(self.timeout) {
            tracing::debug!(%error, "tracer provider shutdown incomplete");
        }
    }
}

/// Targets whose spans never reach OpenTelemetry: connection-level machinery
/// whose long-lived spans would show up as traces of their own.
const NOT_TRACED: &[&str] = &[
    "lapin",
    "h2",
    "hyper",
    "hyper_util",
    "tower",
    "tonic",
    "tokio_postgres",
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
];

/// Sets up logs, traces and propagators for this process. Call it once, from
/// inside the tokio runtime, before anything else logs.
///
/// Fails when a global subscriber is already installed or the OTLP exporter
/// cannot be built (a malformed endpoint).
pub fn init(config: &TelemetryConfig) -> anyhow::Result<TelemetryGuard> {
    let provider = tracer_provider(config)?;
    global::set_text_map_propagator(opentelemetry::propagation::TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]));
    global::set_tracer_provider(provider.clone());

    // Per-layer filters: the OpenTelemetry layer needs every span of ours even
    // when RUST_LOG only lets warnings through to the log.
    let log_filter = EnvFilter::try_new(&config.log_filter)
        .with_context(|| format!("invalid RUST_LOG filter {:?}", config.log_filter))?;
    let mut otel_filter = EnvFilter::new("info");
    for target in NOT_TRACED {
        otel_filter = otel_filter.add_directive(format!("{target}=off").parse()?);
    }
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("shop"))
        .with_filter(otel_filter);

    let fmt_layer = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .event_format(logfmt::WithTraceIds::new(
                tracing_subscriber::fmt::format().compact(),
            ))
            .with_filter(log_filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(logfmt::JsonWithTraceIds)
            .with_filter(log_filter)
            .boxed(),
    };

    tracing_subscriber::registry()
        .with(otel_layer)
        .with(fmt_layer)
        .try_init()
        .context("failed to install the global tracing subscriber")?;

    Ok(TelemetryGuard {
        provider,
        timeout: config.shutdown_timeout,
    })
}

fn tracer_provider(config: &TelemetryConfig) -> anyhow::Result<SdkTracerProvider> {
    let mut resource =
        Resource::builder().with_attribute(KeyValue::new("service.version", config.service_version.clone()));
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(config.service_name.clone());
    }
    let mut builder = SdkTracerProvider::builder().with_resource(resource.build());
    if let Some(endpoint) = &config.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(Duration::from_secs(3))
            .with_retry_policy(opentelemetry_otlp::RetryPolicy::recommended())
            .build()
            .with_context(|| format!("failed to build the OTLP exporter for {endpoint}"))?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}
