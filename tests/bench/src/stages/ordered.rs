//! The ordered drain: a queue of user events, each user created then
//! updated (versions 1, 2, …), applied by the order service's consumer with
//! 1, 2 and 4 partitions and one and two consumer instances. Each figure is
//! measured beside the same drain with sequencing off (the same messages
//! without their `aggregate_version` header, so the inbox alone guards
//! them, as before ordered consumption; a sequenced event writes no inbox
//! row, its user's position is its record): the ratio is what ordering costs at
//! the same parallelism.

use std::time::Duration;

use diesel_async::RunQueryDsl as _;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use prost::Message as _;
use serde_json::json;
use shop_contracts::Event as _;
use shop_contracts::user::{UserCreated, UserUpdated};
use shop_messaging::consumer::{Consumer, ConsumerConfig};
use shop_messaging::topology::ConsumerTopology;
use shop_messaging::wire::{self, EventHeaders};
use shop_testkit::Running;
use tokio::time::Instant;

use super::wait_for_count;
use crate::Options;
use crate::env::Bench;
use crate::report::{Report, Row};

/// Versions of each user in the queue.
const VERSIONS: usize = 5;

/// The consumer configuration of one measurement.
fn config(bench: &Bench, queue: &str, partitions: u16, prefetch: u16) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(bench.user_exchange.clone(), queue.to_owned());
    config.partitions = partitions;
    config.prefetch = prefetch;
    config.trusted_keys = bench.trusted_keys();
    // The events go in unsigned, applied inside a window for unsigned
    // events, with sequencing and without alike: without a version header
    // an event cannot be signed, and this stage compares sequencing, not
    // signatures (the signing stage measures those).
    config.accept_unsigned_until = Some(chrono::Utc::now() + chrono::TimeDelta::hours(1));
    config
}

/// The events of one measurement, user by user interleaved version after
/// version (as commands of many users would commit them).
fn events(count: usize) -> Vec<(String, i64, Vec<u8>, &'static str, &'static str)> {
    let users: Vec<String> = (0..count.div_ceil(VERSIONS))
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    let mut events = Vec::with_capacity(count);
    'versions: for version in 1..=VERSIONS as i64 {
        for user in &users {
            if events.len() == count {
                break 'versions;
            }
            let (body, type_name, routing_key) = if version == 1 {
                (
                    UserCreated {
                        user_id: user.clone(),
                        version,
                        email: format!("{user}@example.com"),
                        name: "Bench User".to_owned(),
                        occurred_at: None,
                    }
                    .encode_to_vec(),
                    UserCreated::TYPE_NAME,
                    UserCreated::ROUTING_KEY,
                )
            } else {
                (
                    UserUpdated {
                        user_id: user.clone(),
                        version,
                        email: format!("{user}@example.com"),
                        name: format!("Bench User v{version}"),
                        occurred_at: None,
                    }
                    .encode_to_vec(),
                    UserUpdated::TYPE_NAME,
                    UserUpdated::ROUTING_KEY,
                )
            };
            events.push((user.clone(), version, body, type_name, routing_key));
        }
    }
    events
}

/// Declares `topology`, publishes `count` events to it (with or without the
/// version header), pipelined and confirmed.
async fn fill(
    bench: &Bench,
    topology: &ConsumerTopology,
    count: usize,
    sequenced: bool,
) -> anyhow::Result<()> {
    let connection = Connection::connect(&bench.amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let trace = Default::default();
    let mut confirms = Vec::with_capacity(count);
    for (user, version, body, type_name, routing_key) in events(count) {
        let id = uuid::Uuid::now_v7().to_string();
        let mut properties = EventHeaders {
            event_id: &id,
            type_name,
            app_id: "bench",
            timestamp: 0,
            aggregate_type: "user",
            aggregate_id: &user,
            aggregate_version: version,
            partition: wire::partition_of(&user),
            trace: &trace,
        }
        .properties();
        if !sequenced {
            let mut headers: FieldTable = properties.headers().clone().unwrap_or_default();
            let kept: Vec<(lapin::types::ShortString, AMQPValue)> = headers
                .inner()
                .iter()
                .filter(|(key, _)| key.as_str() != wire::AGGREGATE_VERSION)
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect();
            headers = FieldTable::default();
            for (key, value) in kept {
                headers.insert(key, value);
            }
            properties = properties.with_headers(headers);
        }
        confirms.push(
            channel
                .basic_publish(
                    bench.user_exchange.as_str().into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &body,
                    properties,
                )
                .await?,
        );
    }
    for confirm in confirms {
        anyhow::ensure!(confirm.await?.is_ack(), "the broker refused a bench event");
    }
    let _ = connection.close(200, "filled".into()).await;
    Ok(())
}

/// Deadline of each broker operation of the stage's own set-up and
/// clean-up: a connection the broker closed may leave a call waiting for
/// ever.
const BROKER_DEADLINE: Duration = Duration::from_secs(10);

/// Deletes the queues and exchanges of `topology`, one channel each (a
/// failed delete closes its channel). The broker may close the connection
/// itself meanwhile (the queues' consumers going away): a connection that
/// fails or stalls is replaced, and each delete is tried twice.
async fn remove(bench: &Bench, topology: &ConsumerTopology) -> anyhow::Result<()> {
    let names = topology
        .queue_names()
        .into_iter()
        .map(|name| (name, true))
        .chain(topology.exchange_names().into_iter().map(|name| (name, false)));
    let mut connection: Option<Connection> = None;
    for (name, queue) in names {
        for _ in 0..2 {
            let deleted = tokio::time::timeout(BROKER_DEADLINE, async {
                let open = match connection.take() {
                    Some(open) if open.status().connected() => open,
                    _ => Connection::connect(&bench.amqp_url, ConnectionProperties::default()).await?,
                };
                let channel = open.create_channel().await;
                connection = Some(open);
                let channel = channel?;
                if queue {
                    channel
                        .queue_delete(name.as_str().into(), Default::default())
                        .await
                        .map(|_| ())
                } else {
                    channel
                        .exchange_delete(name.as_str().into(), Default::default())
                        .await
                }
            })
            .await;
            match deleted {
                Ok(Ok(())) => break,
                Ok(Err(_)) => {}
                Err(_) => connection = None,
            }
        }
    }
    if let Some(connection) = connection {
        let _ = tokio::time::timeout(BROKER_DEADLINE, connection.close(200, "removed".into())).await;
    }
    Ok(())
}

/// Empties what the consumer writes in the orders database.
async fn reset(bench: &Bench) -> anyhow::Result<()> {
    let mut orders = bench.order_pool.get().await?;
    diesel::sql_query(
        "TRUNCATE known_users, inbox, inbox_sequence, inbox_parked, consumer_members, inbox_ledger",
    )
    .execute(&mut orders)
    .await?;
    Ok(())
}

/// Writes every dirty page out before a drain: a checkpoint that begins in
/// the middle of a two-second drain (one is due every few hundred MB of WAL
/// here) slowed that drain alone by a third, and the rounds swung from 64 %
/// to 137 %. Both drains of a round now begin just after one. Needs a
/// superuser or `pg_checkpoint`; without it the drains run as they are.
async fn checkpoint(bench: &Bench) {
    let done = async {
        let mut orders = bench.order_pool.get().await?;
        diesel::sql_query("CHECKPOINT").execute(&mut orders).await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(error) = done {
        eprintln!("no checkpoint before the ordered drain ({error:#}); rounds may swing more");
    }
}

/// One drain of `count` events by `instances` consumers over `partitions`
/// partitions; events/s.
async fn drain(
    bench: &Bench,
    options: &Options,
    partitions: u16,
    instances: usize,
    sequenced: bool,
) -> anyhow::Result<f64> {
    let count = options.events;
    let queue = format!(
        "{}.ordered-p{partitions}-i{instances}-{}",
        bench.consumer_queue,
        if sequenced { "seq" } else { "unseq" }
    );
    let consumer_config = config(bench, &queue, partitions, options.prefetch);
    let topology = ConsumerTopology {
        routing_keys: vec![
            UserCreated::ROUTING_KEY.to_owned(),
            UserUpdated::ROUTING_KEY.to_owned(),
        ],
        ..consumer_config.topology()
    };
    reset(bench).await?;
    tokio::time::timeout(BROKER_DEADLINE * 12, fill(bench, &topology, count, sequenced))
        .await
        .map_err(|_| anyhow::anyhow!("filling the ordered drain's queues took over two minutes"))??;
    checkpoint(bench).await;
    let mut running = Vec::with_capacity(instances);
    let measuring = crate::marker::measuring(&format!(
        "ordered {} partitions={partitions} instances={instances}",
        if sequenced { "sequenced" } else { "unsequenced" }
    ));
    let started = Instant::now();
    for _ in 0..instances {
        let (_, pool) = bench.new_pools().await?;
        let consumer = Consumer::new(consumer_config.clone(), pool, bench.amqp())
            .subscribe::<UserCreated, _>(order_service::projection::UserProjection)
            .subscribe::<UserUpdated, _>(order_service::projection::UserProjection);
        running.push(Running::spawn(|shutdown| consumer.run(shutdown)));
    }
    // Sequenced events are counted by their users' positions (every version
    // up to the position was applied), the others by their inbox rows.
    let elapsed = wait_for_count(
        &bench.order_db,
        "SELECT (SELECT count(*) FROM inbox) + (SELECT coalesce(sum(last_version), 0)::bigint FROM inbox_sequence)",
        "events applied",
        count,
        started,
        Duration::from_secs(600),
    )
    .await?;
    drop(measuring);
    drop(running);
    remove(bench, &topology).await?;
    Ok(count as f64 / elapsed.as_secs_f64())
}

pub(crate) async fn run(bench: &Bench, options: &Options, report: &mut Report) -> anyhow::Result<()> {
    for &instances in &options.ordered_instances {
        for &partitions in &options.ordered_partitions {
            let mut rounds = Vec::new();
            for _ in 0..options.rounds.max(1) {
                let unsequenced = drain(bench, options, partitions, instances, false).await?;
                let sequenced = drain(bench, options, partitions, instances, true).await?;
                rounds.push((sequenced, unsequenced));
            }
            let (sequenced, unsequenced) =
                crate::stats::median_by_ratio(&rounds, |(sequenced, unsequenced)| sequenced / unsequenced)
                    .ok_or_else(|| anyhow::anyhow!("no round ran"))?;
            report.add(Row {
                figure: format!(
                    "ordered drain: {} events of {} versions per user, {partitions} partition(s), {instances} instance(s)",
                    options.events, VERSIONS
                ),
                value: format!("{sequenced:.0} events/s"),
                raw: format!("same drain, sequencing off: {unsequenced:.0}/s"),
                ratio: Some(sequenced / unsequenced),
                numbers: json!({
                    "events": options.events,
                    "partitions": partitions,
                    "instances": instances,
                    "sequenced": sequenced,
                    "unsequenced": unsequenced,
                    "rounds": rounds,
                }),
            });
        }
    }
    Ok(())
}
