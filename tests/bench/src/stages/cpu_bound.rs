//! The CPU bound of the steady state: the CPU (client and server processes)
//! each raw stage of the pipeline spends per event, at the batch sizes the
//! steady pipeline formed, summed, against the CPU the system spent per
//! event in the same run.
//!
//! Four raw stages, each alone on the machine, flat out for `--cpu-secs`
//! with the concurrency the pipeline has (the calls in flight at the steady
//! step, the relay's lanes, the group's partition queues):
//!
//! - a gRPC unary call that does nothing: `CreateUser` of the same bytes to
//!   a server that answers at once ([`crate::noop`], a process of its own);
//!   the server's CPU counts, the caller's is the load generator's and is
//!   shown apart;
//! - the command as a plain client writes it: the user row and the outbox
//!   row in one transaction (tokio-postgres, prepared statements), after the
//!   caller's token is checked as the service checks it (a SHA-256 of the
//!   token and a lookup of the tokens already verified: the signature of
//!   the run's one token is checked once);
//! - publish, confirm, deliver and ack through the relay's routing (a topic
//!   exchange → the group's direct exchange → its partition queues), each
//!   event signed as the relay signs it and checked and decoded as the
//!   consumer does; published in batches of the relay's mean batch and
//!   acknowledged (`multiple`) in batches of the consumer's;
//! - the projection transaction: the consumer's versioned upsert of its
//!   mean batch of users in one transaction.
//!
//! Each stage counts the CPU of this process's own threads (the plain
//! client) and of the server it uses (PostgreSQL's postmaster with its
//! backends, or the RabbitMQ node), from `/proc` ([`crate::cpu`]). Their sum
//! is what the machine must spend on an event at those batch sizes; two
//! cores divided by it is the CPU bound, beside the steady state's
//! throughput. CPU efficiency is that sum over the system's CPU per event
//! (services, PostgreSQL and RabbitMQ; not the load generator).
//!
//! The commit ceiling is the command transaction's rate from 8 connections
//! as deployed (no trigger on the outbox: relays are woken in memory and by
//! coalesced announcements, `shop_outbox::Wake`) and with a `NOTIFY`
//! trigger per commit, as the outbox had before (created in the
//! benchmark's own database for the measurement, and dropped again),
//! rounds alternating.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use prost::Message as _;
use serde_json::json;
use shop_contracts::user as pb;
use shop_contracts::user::user_service_client::UserServiceClient;
use shop_messaging::topology::ConsumerTopology;
use tokio::time::Instant;

use super::steady::Sustained;
use crate::Options;
use crate::cpu::{self, CLIENT, Meter, Processes, Spent};
use crate::env::Bench;
use crate::report::{Report, Row};

/// Connections of the commit ceiling.
const COMMAND_CONNECTIONS: usize = 8;
/// Connections of the raw projection stage: at the steady state's rates the
/// consumer's transactions seldom overlap (a few hundred a second, each
/// well under a millisecond), so one, not one per partition, whose commits
/// would share WAL flushes the pipeline's do not.
const PROJECTION_CONNECTIONS: usize = 1;
/// The CPU of the no-op gRPC server.
const NOOP_SERVER: &str = "no-op server";

/// The caller's bearer token checked as the user service checks it.
pub(crate) struct TokenCheck {
    verifier: shop_host::auth::jwt::TokenVerifier,
    token: String,
}

impl TokenCheck {
    /// The verifier of the benchmark's keys and the token the load sends.
    fn new() -> anyhow::Result<Self> {
        let keys = shop_testkit::TestKeys::shared();
        let config = keys.auth_config();
        let verifier = shop_host::auth::jwt::TokenVerifier::new(
            keys.path().to_path_buf(),
            config.jwt_issuer,
            config.jwt_audience,
            config.jwt_leeway,
        )?;
        Ok(Self {
            verifier,
            token: keys.service_token(),
        })
    }

    pub(crate) fn check(&self) -> anyhow::Result<()> {
        self.verifier
            .verify(&self.token)
            .map(|_| ())
            .map_err(|reason| anyhow::anyhow!("the benchmark's token was refused: {reason:?}"))
    }
}

/// Batch sizes whose mean is `mean`: the `k`-th is
/// `⌊(k + 1)·mean⌋ − ⌊k·mean⌋` (at least 1), so any run of them averages
/// `mean` within one event.
#[derive(Debug, Clone)]
struct Sizes {
    mean: f64,
    next: u64,
}

impl Sizes {
    fn new(mean: f64) -> Self {
        Self {
            mean: mean.max(1.0),
            next: 0,
        }
    }

    fn take(&mut self) -> usize {
        let k = self.next as f64;
        self.next += 1;
        let size = ((k + 1.0) * self.mean).floor() - (k * self.mean).floor();
        (size as usize).max(1)
    }
}

/// What one raw stage measured.
struct Raw {
    events: usize,
    elapsed: Duration,
    spent: Spent,
    /// The counted CPU per event of every round, when this is the median.
    rounds: Vec<f64>,
}

impl Raw {
    /// One run's figures (no rounds of its own).
    fn new(events: usize, elapsed: Duration, spent: Spent) -> Self {
        Self {
            events,
            elapsed,
            spent,
            rounds: Vec::new(),
        }
    }
}

/// The events the tasks of a raw stage handled, in all.
async fn handled(tasks: Vec<tokio::task::JoinHandle<anyhow::Result<usize>>>) -> anyhow::Result<usize> {
    let mut events = 0;
    for task in tasks {
        events += task.await??;
    }
    Ok(events)
}

/// The median of `runs` by their counted CPU per event, with every run's.
fn median(mut runs: Vec<Raw>) -> Raw {
    runs.sort_by(|a, b| a.counted().total_cmp(&b.counted()));
    let rounds: Vec<f64> = runs.iter().map(Raw::counted).collect();
    let mut median = runs.swap_remove(runs.len() / 2);
    median.rounds = rounds;
    median
}

impl Raw {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The CPU per event that counts toward the bound: everything but the
    /// caller of the no-op server.
    fn counted(&self) -> f64 {
        if self.spent.us_per_event.contains_key(NOOP_SERVER) {
            self.spent.total_without(CLIENT)
        } else {
            self.spent.total()
        }
    }

    fn numbers(&self) -> serde_json::Value {
        json!({
            "events": self.events,
            "rate": self.rate(),
            "cpu_us_per_event": self.spent.us_per_event,
            "counted_us_per_event": self.counted(),
            "machine_busy": self.spent.machine_busy,
            "rounds_counted_us_per_event": self.rounds,
        })
    }
}

/// (a) `CreateUser` to the no-op server from `concurrency` tasks on one
/// channel, with the token the load sends.
async fn grpc_noop(bench: &Bench, options: &Options, concurrency: usize) -> anyhow::Result<Raw> {
    let mut server = bench.spawn_noop().await?;
    let processes = Processes::new(vec![(NOOP_SERVER, server.pid().unwrap_or(0))]).with_own(CLIENT);
    let channel = crate::env::with_token(
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))?
            .connect()
            .await?,
    );
    let duration = options.cpu_duration();
    let measuring = crate::marker::measuring("cpu grpc no-op");
    let meter = Meter::start(&processes);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut client = UserServiceClient::new(channel.clone());
            tokio::spawn(async move {
                let mut done = 0_usize;
                while started.elapsed() < duration {
                    let request = pb::CreateUserRequest {
                        email: format!("noop-{}@example.com", uuid::Uuid::new_v4().simple()),
                        name: "Steady".to_owned(),
                        request_id: String::new(),
                    };
                    client.create_user(request).await?;
                    done += 1;
                }
                anyhow::Ok(done)
            })
        })
        .collect();
    let events = handled(tasks).await?;
    let elapsed = started.elapsed();
    let spent = meter.per_event(events);
    drop(measuring);
    server.terminate().await?;
    Ok(Raw::new(events, elapsed, spent))
}

/// (b) The command transaction from `connections` connections, each after
/// the token check.
async fn command(
    bench: &Bench,
    options: &Options,
    servers: &[(&'static str, u32)],
    connections: usize,
) -> anyhow::Result<Raw> {
    let check = Arc::new(TokenCheck::new()?);
    check.check()?;
    bench.reset_tables().await?;
    let processes = Processes::new(only(servers, cpu::POSTGRESQL)).with_own(CLIENT);
    let measuring = crate::marker::measuring("cpu command");
    let meter = Meter::start(&processes);
    let sample =
        super::create_user::raw_load_on(&bench.user_db, connections, options.cpu_duration(), Some(check))
            .await?;
    let spent = meter.per_event(sample.latencies.len());
    drop(measuring);
    Ok(Raw::new(sample.latencies.len(), sample.elapsed, spent))
}

fn only(servers: &[(&'static str, u32)], name: &str) -> Vec<(&'static str, u32)> {
    servers.iter().copied().filter(|(n, _)| *n == name).collect()
}

/// The exchange and consumer group of the raw broker stage: the relay's
/// routing under names of their own, so the relay's events never reach
/// them.
pub(crate) fn raw_topology(bench: &Bench, prefetch: u16) -> ConsumerTopology {
    ConsumerTopology {
        exchange: format!("{}.raw", bench.user_exchange),
        queue: format!("{}.raw-cpu", bench.consumer_queue),
        routing_keys: vec!["user.created".to_owned()],
        retry_delays: Vec::new(),
        ..bench.consumer_config(prefetch).topology()
    }
}

/// The broker user of an AMQP URL (`amqp://user:password@…`).
fn amqp_user(url: &str) -> Option<String> {
    let (_, rest) = url.split_once("://")?;
    let (credentials, _) = rest.split_once('@')?;
    Some(credentials.split(':').next()?.to_owned())
}

/// (c) Publish + confirm + deliver + ack through the relay's routing: as
/// many publishers as the relay has lanes, each publishing batches of
/// `relay_batch` (mean) pipelined and awaiting their confirms; one consumer
/// per partition queue, acknowledging batches of `consumer_batch` (mean)
/// with one `multiple` ack, after checking each event's signature and
/// decoding it.
async fn broker(
    bench: &Bench,
    options: &Options,
    servers: &[(&'static str, u32)],
    (relay_batch, consumer_batch): (f64, f64),
) -> anyhow::Result<Raw> {
    let topology = raw_topology(bench, options.prefetch);
    let publishing = Connection::connect(&bench.amqp_url, ConnectionProperties::default()).await?;
    let consuming = Connection::connect(&bench.amqp_url, ConnectionProperties::default()).await?;
    {
        let channel = publishing.create_channel().await?;
        shop_messaging::topology::declare_event_exchange(&channel, &topology.exchange).await?;
        topology.declare(&channel).await?;
        for queue in topology.queue_names() {
            channel
                .queue_purge(queue.as_str().into(), Default::default())
                .await?;
        }
    }
    let lanes = usize::from(bench.relay_config()?.lanes.max(1));
    let key = bench.signing_key();
    let trusted = Arc::new(bench.trusted_keys());
    let user = amqp_user(&bench.amqp_url);
    let received = Arc::new(AtomicUsize::new(0));

    let mut consumers = Vec::new();
    for index in 0..topology.partition_count() {
        let channel = consuming.create_channel().await?;
        channel
            .basic_qos(options.prefetch, BasicQosOptions::default())
            .await?;
        let mut deliveries = channel
            .basic_consume(
                topology.partition_queue(index).as_str().into(),
                format!("raw-cpu-{index}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let trusted = trusted.clone();
        let received = received.clone();
        consumers.push(tokio::spawn(async move {
            let mut sizes = Sizes::new(consumer_batch);
            while let Some(first) = deliveries.next().await {
                let mut batch = vec![first?];
                let size = sizes.take();
                while batch.len() < size {
                    match deliveries.next().now_or_never() {
                        Some(Some(delivery)) => batch.push(delivery?),
                        Some(None) => anyhow::bail!("consumer cancelled"),
                        None => break,
                    }
                }
                for delivery in &batch {
                    trusted
                        .verify(&delivery.properties, &delivery.data)
                        .map_err(|error| anyhow::anyhow!("signature refused: {}", error.cause()))?;
                    pb::UserCreated::decode(delivery.data.as_slice())?;
                }
                if let Some(last) = batch.last() {
                    last.ack(BasicAckOptions { multiple: true }).await?;
                }
                received.fetch_add(batch.len(), Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }

    let processes = Processes::new(only(servers, cpu::RABBITMQ)).with_own(CLIENT);
    let duration = options.cpu_duration();
    let measuring = crate::marker::measuring("cpu broker");
    let meter = Meter::start(&processes);
    let started = Instant::now();
    let mut publishers = Vec::new();
    for _ in 0..lanes {
        let channel = publishing.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        let (key, user, exchange) = (key.clone(), user.clone(), topology.exchange.clone());
        publishers.push(tokio::spawn(async move {
            let trace = HashMap::new();
            let mut sizes = Sizes::new(relay_batch);
            let mut confirmed = 0_usize;
            while started.elapsed() < duration {
                let mut confirms = Vec::new();
                for _ in 0..sizes.take() {
                    let aggregate = uuid::Uuid::now_v7().to_string();
                    let event_id = uuid::Uuid::now_v7().to_string();
                    let body = super::user_created_body(&aggregate);
                    let headers = shop_messaging::wire::EventHeaders {
                        event_id: &event_id,
                        type_name: "shop.user.v1.UserCreated",
                        app_id: "user-service",
                        timestamp: std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |since| since.as_secs()),
                        aggregate_type: "user",
                        aggregate_id: &aggregate,
                        aggregate_version: 1,
                        partition: shop_messaging::wire::partition_of(&aggregate),
                        trace: &trace,
                    };
                    let mut properties = headers.signed_properties(&body, &key);
                    if let Some(user) = &user {
                        properties = shop_messaging::wire::sent_by(properties, user);
                    }
                    confirms.push(
                        channel
                            .basic_publish(
                                exchange.as_str().into(),
                                "user.created".into(),
                                BasicPublishOptions::default(),
                                &body,
                                properties,
                            )
                            .await?,
                    );
                }
                for confirm in confirms {
                    let confirmation = tokio::time::timeout(Duration::from_secs(30), confirm).await??;
                    anyhow::ensure!(confirmation.is_ack(), "raw publish not confirmed");
                    confirmed += 1;
                }
            }
            anyhow::Ok(confirmed)
        }));
    }
    let mut events = 0;
    for publisher in publishers {
        events += publisher.await??;
    }
    let until = Instant::now() + Duration::from_secs(60);
    while received.load(Ordering::Relaxed) < events && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let delivered = received.load(Ordering::Relaxed) >= events;
    let elapsed = started.elapsed();
    let spent = meter.per_event(events);
    drop(measuring);
    for consumer in &consumers {
        consumer.abort();
    }
    for consumer in consumers {
        if let Ok(Err(error)) = consumer.await {
            return Err(error.context("raw consumer"));
        }
    }
    anyhow::ensure!(
        delivered,
        "{} of {events} raw events delivered",
        received.load(Ordering::Relaxed)
    );
    let _ = publishing.close(200, "done".into()).await;
    let _ = consuming.close(200, "done".into()).await;
    Ok(Raw::new(events, elapsed, spent))
}

/// (d) The projection's upsert of new users, `consumer_batch` (mean) a
/// transaction, from [`PROJECTION_CONNECTIONS`].
async fn projection(
    bench: &Bench,
    options: &Options,
    servers: &[(&'static str, u32)],
    consumer_batch: f64,
) -> anyhow::Result<Raw> {
    let mut clients = Vec::new();
    for _ in 0..PROJECTION_CONNECTIONS {
        let (client, connection) = tokio_postgres::connect(&bench.order_db, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        clients.push(client);
    }
    let processes = Processes::new(only(servers, cpu::POSTGRESQL)).with_own(CLIENT);
    let duration = options.cpu_duration();
    let measuring = crate::marker::measuring("cpu projection");
    let meter = Meter::start(&processes);
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let upsert = client
                    .prepare(
                        "INSERT INTO known_users (user_id, version, deleted) \
                         SELECT u.id, u.version, false \
                         FROM unnest($1::uuid[], $2::bigint[]) AS u(id, version) \
                         ON CONFLICT (user_id) DO UPDATE SET version = excluded.version, updated_at = now() \
                         WHERE known_users.version < excluded.version",
                    )
                    .await?;
                let mut sizes = Sizes::new(consumer_batch);
                let mut done = 0_usize;
                while started.elapsed() < duration {
                    let size = sizes.take();
                    let ids: Vec<uuid::Uuid> = (0..size).map(|_| uuid::Uuid::now_v7()).collect();
                    let versions = vec![1_i64; size];
                    let transaction = client.transaction().await?;
                    transaction.execute(&upsert, &[&ids, &versions]).await?;
                    transaction.commit().await?;
                    done += size;
                }
                anyhow::Ok(done)
            })
        })
        .collect();
    let events = handled(tasks).await?;
    let elapsed = started.elapsed();
    let spent = meter.per_event(events);
    drop(measuring);
    bench.reset_tables().await?;
    Ok(Raw::new(events, elapsed, spent))
}

/// Creates or drops, in the benchmark's user database, the `NOTIFY`
/// trigger per commit the outbox had before relays were woken without one.
async fn notify_trigger(bench: &Bench, present: bool) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(&bench.user_db, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let statements = if present {
        "CREATE OR REPLACE FUNCTION bench_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_notify('outbox', ''); RETURN NULL; END $$; \
         CREATE TRIGGER bench_outbox_notify AFTER INSERT ON outbox \
         FOR EACH STATEMENT EXECUTE FUNCTION bench_outbox_notify();"
    } else {
        "DROP TRIGGER IF EXISTS bench_outbox_notify ON outbox; \
         DROP FUNCTION IF EXISTS bench_outbox_notify();"
    };
    client.batch_execute(statements).await?;
    Ok(())
}

/// One commit-ceiling measurement: the command transaction from
/// [`COMMAND_CONNECTIONS`] connections; commits/s and CPU per commit.
async fn ceiling_once(
    bench: &Bench,
    options: &Options,
    servers: &[(&'static str, u32)],
) -> anyhow::Result<Raw> {
    bench.reset_tables().await?;
    let processes = Processes::new(only(servers, cpu::POSTGRESQL)).with_own(CLIENT);
    let meter = Meter::start(&processes);
    let sample =
        super::create_user::raw_load_on(&bench.user_db, COMMAND_CONNECTIONS, options.cpu_duration(), None)
            .await?;
    Ok(Raw::new(
        sample.latencies.len(),
        sample.elapsed,
        meter.per_event(sample.latencies.len()),
    ))
}

/// The commit ceiling with a trigger and as deployed, rounds alternating,
/// the median round by ratio. The trigger is dropped again whatever
/// happened.
async fn commit_ceiling(
    bench: &Bench,
    options: &Options,
    servers: &[(&'static str, u32)],
) -> anyhow::Result<(Raw, Raw)> {
    let mut rounds = Vec::new();
    for _ in 0..options.rounds.max(1) {
        let without = ceiling_once(bench, options, servers).await?;
        notify_trigger(bench, true).await?;
        let with = ceiling_once(bench, options, servers).await;
        notify_trigger(bench, false).await?;
        rounds.push((with?, without));
    }
    let index = {
        let mut order: Vec<usize> = (0..rounds.len()).collect();
        order.sort_by(|a, b| {
            let ratio = |i: usize| rounds[i].0.rate() / rounds[i].1.rate();
            ratio(*a).total_cmp(&ratio(*b))
        });
        order[order.len() / 2]
    };
    Ok(rounds.swap_remove(index))
}

pub(crate) async fn run(
    bench: &Bench,
    options: &Options,
    report: &mut Report,
    steady: Option<&Sustained>,
) -> anyhow::Result<()> {
    let servers = cpu::servers(options);
    let (relay_batch, consumer_batch) = steady.map_or((1.0, 1.0), |s| (s.batches.relay, s.batches.consumer));
    // The calls in flight at the steady state (sampled every millisecond),
    // so the raw calls and commits coalesce no more than the pipeline's do.
    let concurrency = steady.map_or(1, |s| (s.in_flight.round() as usize).max(1));
    let sizes_from = if steady.is_some() {
        "the steady state's highest step that kept up"
    } else {
        "assumed (no steady state in this run)"
    };

    // Rounds go through the four stages in turn (the machine drifts within
    // minutes; each stage's median round is kept).
    let (mut grpcs, mut commands, mut brokers, mut projections) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..options.rounds.max(1) {
        grpcs.push(grpc_noop(bench, options, concurrency).await?);
        commands.push(command(bench, options, &servers, concurrency).await?);
        brokers.push(broker(bench, options, &servers, (relay_batch, consumer_batch)).await?);
        projections.push(projection(bench, options, &servers, consumer_batch).await?);
    }
    let [grpc, command, broker, projection] = [grpcs, commands, brokers, projections].map(median);
    report.add(Row {
        figure: "raw CPU: gRPC unary call that does nothing".to_owned(),
        value: format!(
            "{:.0} µs per call in the server ({:.0} µs in the caller, not counted)",
            grpc.counted(),
            grpc.spent.us_per_event.get(CLIENT).copied().unwrap_or(f64::NAN)
        ),
        raw: format!(
            "CreateUser's bytes, {concurrency} in flight, {:.0} calls/s, machine {:.0} % busy",
            grpc.rate(),
            grpc.spent.machine_busy * 100.0
        ),
        ratio: None,
        numbers: grpc.numbers(),
    });
    report.add(Row {
        figure: "raw CPU: the command transaction from a plain client".to_owned(),
        value: format!("{:.0} µs per command ({})", command.counted(), command.spent.spelled()),
        raw: format!(
            "token check + user and outbox rows in one transaction, {concurrency} connection(s), {:.0}/s, machine {:.0} % busy",
            command.rate(),
            command.spent.machine_busy * 100.0
        ),
        ratio: None,
        numbers: command.numbers(),
    });
    report.add(Row {
        figure: "raw CPU: publish + confirm + deliver + ack, relay's routing".to_owned(),
        value: format!("{:.0} µs per event ({})", broker.counted(), broker.spent.spelled()),
        raw: format!(
            "signed, checked; published {relay_batch:.1} a batch, acked {consumer_batch:.1} a batch; {:.0}/s, machine {:.0} % busy",
            broker.rate(),
            broker.spent.machine_busy * 100.0
        ),
        ratio: None,
        numbers: broker.numbers(),
    });
    report.add(Row {
        figure: "raw CPU: the projection transaction".to_owned(),
        value: format!(
            "{:.0} µs per event ({})",
            projection.counted(),
            projection.spent.spelled()
        ),
        raw: format!(
            "{consumer_batch:.1} users a transaction, {PROJECTION_CONNECTIONS} connection, {:.0}/s, machine {:.0} % busy",
            projection.rate(),
            projection.spent.machine_busy * 100.0
        ),
        ratio: None,
        numbers: projection.numbers(),
    });

    let parts = [
        ("gRPC", &grpc),
        ("command", &command),
        ("broker", &broker),
        ("projection", &projection),
    ];
    let raw_us: f64 = parts.iter().map(|(_, raw)| raw.counted()).sum();
    let spelled = parts
        .iter()
        .map(|(name, raw)| format!("{name} {:.0}", raw.counted()))
        .collect::<Vec<_>>()
        .join(" + ");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let bound = cores * 1e6 / raw_us;
    let batches = json!({"relay": relay_batch, "consumer": consumer_batch, "in_flight": concurrency, "from": sizes_from});
    match steady {
        Some(steady) => {
            let system_us: f64 = steady
                .cpu_us_per_event
                .iter()
                .filter(|(name, _)| **name != super::steady::LOAD_GENERATOR)
                .map(|(_, us)| us)
                .sum();
            report.add(Row {
                figure: "CPU efficiency: Σ raw CPU per event ÷ the system's".to_owned(),
                value: format!("Σ raw {raw_us:.0} µs ({spelled})"),
                raw: format!("system {system_us:.0} µs (services, PostgreSQL, RabbitMQ; not the load)"),
                ratio: Some(raw_us / system_us),
                numbers: json!({"raw_us_per_event": raw_us, "system_us_per_event": system_us, "batches": batches, "rounds": options.rounds}),
            });
            report.add(Row {
                figure: "steady state against the CPU bound".to_owned(),
                value: format!("{:.0} commands/s sustained", steady.rate),
                raw: format!("CPU bound: {cores:.0} cores ÷ Σ raw {raw_us:.0} µs = {bound:.0}/s"),
                ratio: Some(steady.rate / bound),
                numbers: json!({"rate": steady.rate, "cpu_bound": bound, "cores": cores, "raw_us_per_event": raw_us}),
            });
            // Where the difference is: each server against the raw stages'
            // use of it, the services against the raw clients (the no-op
            // server being the gRPC server's raw side).
            let raw_of = |name: &str| -> f64 {
                parts
                    .iter()
                    .filter_map(|(_, raw)| raw.spent.us_per_event.get(name))
                    .sum()
            };
            let system_of = |name: &str| steady.cpu_us_per_event.get(name).copied().unwrap_or(0.0);
            let services = system_of("user-service") + system_of("order-service");
            let clients = raw_us - raw_of(cpu::POSTGRESQL) - raw_of(cpu::RABBITMQ);
            let split = [
                (
                    cpu::POSTGRESQL,
                    system_of(cpu::POSTGRESQL),
                    raw_of(cpu::POSTGRESQL),
                ),
                (cpu::RABBITMQ, system_of(cpu::RABBITMQ), raw_of(cpu::RABBITMQ)),
                ("services", services, clients),
            ];
            report.add(Row {
                figure: "CPU per event, system against raw, by side".to_owned(),
                value: split
                    .iter()
                    .map(|(name, system, _)| format!("{name} {system:.0}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                raw: format!(
                    "raw: {} µs (services: the raw clients and the no-op server)",
                    split
                        .iter()
                        .map(|(name, _, raw)| format!("{name} {raw:.0}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                ratio: None,
                numbers: json!(
                    split
                        .iter()
                        .map(|(name, system, raw)| (
                            (*name).to_owned(),
                            json!({"system": system, "raw": raw})
                        ))
                        .collect::<serde_json::Map<_, _>>()
                ),
            });
        }
        None => report.add(Row {
            figure: "CPU bound (no steady state in this run)".to_owned(),
            value: format!("Σ raw {raw_us:.0} µs ({spelled})"),
            raw: format!("{cores:.0} cores ÷ Σ raw = {bound:.0}/s, batches of 1 assumed"),
            ratio: None,
            numbers: json!({"raw_us_per_event": raw_us, "cpu_bound": bound, "batches": batches}),
        }),
    }

    let (with, without) = commit_ceiling(bench, options, &servers).await?;
    report.add(Row {
        figure: "commit ceiling: the command transaction with a NOTIFY trigger per commit (the outbox before)"
            .to_owned(),
        value: format!("{:.0} commits/s, {:.0} µs CPU each", with.rate(), with.counted()),
        raw: format!(
            "as deployed, no trigger: {:.0} commits/s, {:.0} µs CPU each ({COMMAND_CONNECTIONS} connections)",
            without.rate(),
            without.counted()
        ),
        ratio: Some(with.rate() / without.rate()),
        numbers: json!({"connections": COMMAND_CONNECTIONS, "rounds": options.rounds, "with": with.numbers(), "without": without.numbers()}),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Sizes, amqp_user};

    #[test]
    fn batch_sizes_average_their_mean() {
        let mut sizes = Sizes::new(2.4);
        let taken: Vec<usize> = (0..5).map(|_| sizes.take()).collect();
        assert_eq!(taken.iter().sum::<usize>(), 12);
        assert!(taken.iter().all(|size| (2..=3).contains(size)), "{taken:?}");
        let mut ones = Sizes::new(0.3);
        assert_eq!((0..4).map(|_| ones.take()).collect::<Vec<_>>(), vec![1, 1, 1, 1]);
    }

    #[test]
    fn the_broker_user_comes_from_the_url() {
        assert_eq!(
            amqp_user("amqp://guest:guest@localhost:5672/%2f").as_deref(),
            Some("guest")
        );
        assert_eq!(amqp_user("amqp://localhost:5672"), None);
    }
}
