//! The whole pipeline at steady state: CreateUser at a fixed offered rate
//! with the relay and the consumer running, stepped up until they no longer
//! keep up, with the CPU every process spent per event.
//!
//! A step keeps up when at least 95 % of the offered commands succeed and,
//! at its end, what is not yet through (outbox rows not published plus
//! users created but not in the projection) is under half a second of the
//! offered rate. The CPU of each process (both services, PostgreSQL's
//! postmaster and backends, the RabbitMQ node, this load generator) comes
//! from `/proc/<pid>/stat`, divided by the commands of the step.
//!
//! The bound beside it is the sum of the raw per-event costs measured in the
//! same run, each the inverse of a raw rate that saturates the machine: the
//! command transaction (the create-user stage's best plain-client rate),
//! the confirmed publish (relay stage), consume + ack (consumer stage) and
//! the projection transaction (measured here, batches of 100 as the
//! consumer applies them). Running all four one after the other at their
//! raw rates, the machine could carry `1 / Σ (1 / rate)` events a second.
//! That rate bound is kept as a row; the CPU bound (`cpu-bound`, run after
//! this stage) measures the raw stages' CPU instead.
//!
//! Once a step has drained, it also measures the batches the pipeline
//! formed: rows per relay batch (outbox rows per distinct `published_at`)
//! and events per consumer transaction (projection rows per distinct
//! `updated_at`), over the rows the step committed. The CPU bound measures
//! the raw stages at those sizes.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use shop_contracts::user as pb;
use shop_contracts::user::user_service_client::UserServiceClient;
use tokio::time::Instant;

use crate::Options;
use crate::cpu;
use crate::env::Bench;
use crate::report::{Report, Row};

/// How much one step may leave behind, in seconds of its offered rate.
const BACKLOG_SECONDS: f64 = 0.5;
/// Rate steps: each the one before times this.
const STEP: f64 = 1.4;
/// Steps at most.
const MAX_STEPS: usize = 12;
/// Calls in flight at most before the load generator counts itself behind.
const MAX_IN_FLIGHT: usize = 512;

/// What one step measured.
struct Step {
    offered: f64,
    succeeded: usize,
    elapsed: Duration,
    backlog: i64,
    cpu_us_per_event: BTreeMap<&'static str, f64>,
    /// The batches the pipeline formed (measured once the step drained).
    batches: Option<Batches>,
    /// Calls in flight on average.
    in_flight: f64,
}

/// The mean batch sizes of a step: what the relay published per batch
/// transaction and the consumer applied per transaction.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Batches {
    pub(crate) relay: f64,
    pub(crate) consumer: f64,
}

/// The database server's clock, as text PostgreSQL reads back.
async fn database_now(url: &str) -> anyhow::Result<String> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client
        .query_one("SELECT clock_timestamp()::text", &[])
        .await?
        .get(0))
}

/// The mean batch sizes of what was committed between `from` and `to` (the
/// database's clock): the relay marks a batch's rows with one `now()` (its
/// transaction's start) in `published_at`, and the projection writes one
/// `now()` in `updated_at` for every user of a consumer transaction, so the
/// rows per distinct timestamp are the rows per transaction.
async fn batches(bench: &Bench, from: &str, to: &str) -> anyhow::Result<Batches> {
    let mean = async |url: &str, query: &str| -> anyhow::Result<f64> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let row = client.query_one(query, &[&from, &to]).await?;
        let (rows, transactions): (i64, i64) = (row.get(0), row.get(1));
        Ok(rows as f64 / transactions.max(1) as f64)
    };
    Ok(Batches {
        relay: mean(
            &bench.user_db,
            "SELECT count(*), count(DISTINCT published_at) FROM outbox \
             WHERE created_at >= $1::text::timestamptz AND created_at < $2::text::timestamptz \
             AND published_at IS NOT NULL",
        )
        .await?,
        consumer: mean(
            &bench.order_db,
            "SELECT count(*), count(DISTINCT updated_at) FROM known_users \
             WHERE updated_at >= $1::text::timestamptz AND updated_at < $2::text::timestamptz",
        )
        .await?,
    })
}

impl Step {
    fn rate(&self) -> f64 {
        self.succeeded as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn kept_up(&self) -> bool {
        self.rate() >= 0.95 * self.offered && (self.backlog as f64) < BACKLOG_SECONDS * self.offered
    }

    fn total_us(&self) -> f64 {
        self.cpu_us_per_event.values().sum()
    }
}

/// What [`offer`] did.
struct Offered {
    succeeded: usize,
    elapsed: Duration,
    /// Calls in flight, on average over the time (sampled every
    /// millisecond).
    in_flight: f64,
}

/// Offers CreateUser at `rate` a second for `duration`.
async fn offer(endpoint: &str, rate: f64, duration: Duration) -> anyhow::Result<Offered> {
    let channel = crate::env::with_token(
        tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
            .connect()
            .await?,
    );
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    let mut succeeded = 0;
    let mut sent = 0_u64;
    let (mut samples, mut in_flight) = (0_u64, 0_u64);
    while started.elapsed() < duration {
        // The calls due by now at the offered rate, whatever the timer's
        // granularity.
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        while sent < due && calls.len() < MAX_IN_FLIGHT {
            sent += 1;
            let mut client = UserServiceClient::new(channel.clone());
            calls.spawn(async move {
                let request = pb::CreateUserRequest {
                    email: format!("steady-{}@example.com", uuid::Uuid::new_v4().simple()),
                    name: "Steady".to_owned(),
                    request_id: String::new(),
                };
                client.create_user(request).await.is_ok()
            });
        }
        while let Some(done) = calls.try_join_next() {
            succeeded += usize::from(done.unwrap_or(false));
        }
        samples += 1;
        in_flight += calls.len() as u64;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    while let Some(done) = calls.join_next().await {
        succeeded += usize::from(done.unwrap_or(false));
    }
    Ok(Offered {
        succeeded,
        elapsed: started.elapsed(),
        in_flight: in_flight as f64 / samples.max(1) as f64,
    })
}

/// Outbox rows not yet published plus users not yet in the projection.
async fn backlog(bench: &Bench, created: usize) -> anyhow::Result<i64> {
    let count = async |url: &str, query: &str| -> anyhow::Result<i64> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client.query_one(query, &[]).await?.get(0))
    };
    let pending = count(
        &bench.user_db,
        "SELECT count(*) FROM outbox WHERE published_at IS NULL",
    )
    .await?;
    let projected = count(&bench.order_db, "SELECT count(*) FROM known_users").await?;
    Ok(pending + (i64::try_from(created).unwrap_or(i64::MAX) - projected).max(0))
}

/// The projection transaction alone, from a plain client: `count` users
/// upserted in transactions of 100, the consumer's batch. Events/s.
async fn raw_projection(bench: &Bench, count: usize) -> anyhow::Result<f64> {
    let (mut client, connection) = tokio_postgres::connect(&bench.order_db, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let upsert = client
        .prepare(
            "INSERT INTO known_users (user_id, version, deleted) \
             SELECT u.id, 1, false FROM unnest($1::uuid[]) AS u(id) \
             ON CONFLICT (user_id) DO UPDATE SET version = excluded.version \
             WHERE known_users.version < excluded.version",
        )
        .await?;
    let started = Instant::now();
    let mut done = 0;
    while done < count {
        let ids: Vec<uuid::Uuid> = (0..100.min(count - done)).map(|_| uuid::Uuid::now_v7()).collect();
        let transaction = client.transaction().await?;
        transaction.execute(&upsert, &[&ids]).await?;
        transaction.commit().await?;
        done += ids.len();
    }
    let rate = count as f64 / started.elapsed().as_secs_f64().max(1e-9);
    client.batch_execute("TRUNCATE known_users").await?;
    Ok(rate)
}

/// The name the load generator's CPU goes under.
pub(crate) const LOAD_GENERATOR: &str = "load generator";

/// The highest step that kept up, for the CPU bound beside it.
#[derive(Debug, Clone)]
pub(crate) struct Sustained {
    /// Commands a second.
    pub(crate) rate: f64,
    /// CPU µs per event, by process (the load generator's too).
    pub(crate) cpu_us_per_event: BTreeMap<&'static str, f64>,
    /// The batches the relay and the consumer formed.
    pub(crate) batches: Batches,
    /// CreateUser calls in flight on average.
    pub(crate) in_flight: f64,
}

/// Returns the highest step that kept up, if any.
pub(crate) async fn run(
    bench: &Bench,
    options: &Options,
    report: &mut Report,
) -> anyhow::Result<Option<Sustained>> {
    bench.reset_tables().await?;
    let projection_rate = raw_projection(bench, options.events.min(20_000)).await?;
    report.bound("projection transaction", projection_rate);

    let mut users = bench.spawn_user_service(true).await?;
    let mut orders = bench.spawn_order_service(options.prefetch).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut processes = vec![
        ("user-service", users.pid().unwrap_or(0)),
        ("order-service", orders.pid().unwrap_or(0)),
        (LOAD_GENERATOR, std::process::id()),
    ];
    processes.extend(cpu::servers(options));
    let processes = cpu::Processes::new(processes);
    let endpoint = format!("http://{}", users.addr);
    let duration = Duration::from_secs(options.steady_secs);

    let mut steps: Vec<Step> = Vec::new();
    let mut created = 0;
    let mut rate = options.steady_start;
    for _ in 0..MAX_STEPS {
        let began = database_now(&bench.user_db).await?;
        let meter = cpu::Meter::start(&processes);
        let measuring = crate::marker::measuring(&format!("steady {rate:.0}/s"));
        let Offered {
            succeeded,
            elapsed,
            in_flight,
        } = offer(&endpoint, rate, duration).await?;
        drop(measuring);
        created += succeeded;
        let backlog = backlog(bench, created).await?;
        let spent = meter.per_event(succeeded);
        let mut step = Step {
            offered: rate,
            succeeded,
            elapsed,
            backlog,
            cpu_us_per_event: spent.us_per_event,
            batches: None,
            in_flight,
        };
        if !step.kept_up() {
            steps.push(step);
            break;
        }
        // Let what is in flight drain before the next step, so each step
        // starts from an empty pipeline.
        super::wait_for_count(
            &bench.order_db,
            "SELECT count(*) FROM known_users",
            "users projected",
            created,
            Instant::now(),
            Duration::from_secs(60),
        )
        .await?;
        step.batches = Some(batches(bench, &began, &database_now(&bench.user_db).await?).await?);
        steps.push(step);
        rate *= STEP;
    }
    users.terminate().await?;
    orders.terminate().await?;

    let best = steps.iter().rfind(|step| step.kept_up());
    let bound = report.bound_rate(&[
        "command transaction",
        "confirmed publish",
        "consume + ack",
        "projection transaction",
    ]);
    let (value, cpu) = match best {
        Some(step) => (
            format!("{:.0} commands/s sustained", step.rate()),
            step.cpu_us_per_event
                .iter()
                .map(|(name, us)| format!("{name} {us:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        None => (format!("not even {:.0}/s", options.steady_start), String::new()),
    };
    report.add(Row {
        figure: "steady state: CreateUser, relay and consumer keeping up".to_owned(),
        value,
        raw: match &bound {
            Some((rate, parts)) => format!("bound, Σ raw per-event costs ({parts}): {rate:.0}/s"),
            None => "bound needs the create-user, relay and consumer stages in the same run".to_owned(),
        },
        ratio: best
            .zip(bound.as_ref())
            .map(|(step, (rate, _))| step.rate() / rate),
        numbers: json!({
            "steps": steps.iter().map(|step| json!({
                "offered": step.offered,
                "rate": step.rate(),
                "backlog": step.backlog,
                "kept_up": step.kept_up(),
                "cpu_us_per_event": step.cpu_us_per_event,
                "cpu_us_per_event_total": step.total_us(),
                "relay_batch": step.batches.map(|b| b.relay),
                "consumer_batch": step.batches.map(|b| b.consumer),
                "in_flight": step.in_flight,
            })).collect::<Vec<_>>(),
        }),
    });
    if let Some(step) = best {
        report.add(Row {
            figure: "steady state: CPU µs per event, by process".to_owned(),
            value: format!("{:.0} µs in all", step.total_us()),
            raw: cpu,
            ratio: None,
            numbers: json!(step.cpu_us_per_event),
        });
    }
    Ok(best.and_then(|step| {
        Some(Sustained {
            rate: step.rate(),
            cpu_us_per_event: step.cpu_us_per_event.clone(),
            batches: step.batches?,
            in_flight: step.in_flight,
        })
    }))
}
