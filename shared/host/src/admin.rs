//! The admin HTTP port of a service: Prometheus metrics at `/metrics` and the
//! state of its dependencies at `/health`.
//!
//! Metrics are recorded anywhere in the process with the `metrics` macros;
//! [`metrics_handle`] installs the Prometheus recorder once per process
//! (histograms of `*_seconds` get latency buckets, `*_size` count buckets).
//! [`DependencyHealth`] collects whether each dependency (PostgreSQL, the
//! relay's and the consumer's RabbitMQ connections) is up; `/health` answers
//! 200 when all are, 503 otherwise, listing each, and the gauge
//! `dependency_up{dependency}` says the same to Prometheus.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use axum::http::StatusCode;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Latency buckets, in seconds: 100 µs to 10 s.
const SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Count buckets (batch sizes).
const SIZES: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// The process's Prometheus recorder, installed on first use. Fails only if
/// another recorder was installed first.
pub fn metrics_handle() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    // get_or_init runs the installation once; concurrent callers wait for it.
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS)
                .and_then(|builder| {
                    builder.set_buckets_for_metric(Matcher::Suffix("_size".to_owned()), SIZES)
                })
                .map_err(|error| error.to_string())?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder)
                .map_err(|_| "another metrics recorder is installed".to_owned())?;
            Ok(handle)
        })
        .clone()
        .map_err(|error| anyhow::anyhow!(error))
}

/// Whether each dependency of the service is up, shared by the parts that
/// know (the database watcher, the relay, the consumer) and the admin port
/// that tells.
#[derive(Debug, Clone, Default)]
pub struct DependencyHealth {
    states: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl DependencyHealth {
    /// Records whether `dependency` is up.
    pub fn set(&self, dependency: &str, up: bool) {
        metrics::gauge!("dependency_up", "dependency" => dependency.to_owned()).set(if up {
            1.0
        } else {
            0.0
        });
        self.states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(dependency.to_owned(), up);
    }

    /// Every dependency with its state.
    pub fn snapshot(&self) -> BTreeMap<String, bool> {
        self.states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether every known dependency is up.
    pub fn all_up(&self) -> bool {
        self.snapshot().values().all(|up| *up)
    }

    /// Records `dependency` as `state` says, now and at every change, until
    /// the sender is dropped or `shutdown`.
    pub fn follow(&self, dependency: String, mut state: watch::Receiver<bool>, shutdown: CancellationToken) {
        let health = self.clone();
        tokio::spawn(async move {
            loop {
                let up = *state.borrow_and_update();
                health.set(&dependency, up);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = state.changed() => if changed.is_err() { return },
                }
            }
        });
    }
}

/// Serves `/metrics` and `/health` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: DependencyHealth,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let handle = metrics_handle()?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || std::future::ready(handle.render())),
        )
        .route(
            "/health",
            axum::routing::get(move || {
                let states = health.snapshot();
                let body: String = states
                    .iter()
                    .map(|(dependency, up)| format!("{dependency} {}\n", if *up { "up" } else { "down" }))
                    .collect();
                let status = if states.values().all(|up| *up) {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                std::future::ready((status, body))
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("admin server failed")
}

/// Checks every `interval` that the database takes writes
/// ([`shop_database::probe`]: answers in time, not a standby, not
/// read-only) and records it as `postgres` in `health` and in `ready` (what
/// the gRPC health of the service follows), until `shutdown`.
pub async fn watch_database(
    pool: shop_database::Pool,
    health: DependencyHealth,
    ready: watch::Sender<bool>,
    interval: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let up = shop_database::probe(&pool).await;
        health.set("postgres", up);
        ready.send_if_modified(|was| std::mem::replace(was, up) != up);
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// The admin port and the database watcher together, until `shutdown`.
pub async fn run(
    listener: tokio::net::TcpListener,
    pool: shop_database::Pool,
    health: DependencyHealth,
    ready: watch::Sender<bool>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let watcher = watch_database(
        pool,
        health.clone(),
        ready,
        Duration::from_secs(5),
        shutdown.clone(),
    );
    let (served, watched) = tokio::join!(serve(listener, health, shutdown), watcher);
    served.and(watched)
}
