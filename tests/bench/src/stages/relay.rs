//! The relay draining a pre-filled outbox, against pipelined confirmed
//! publishes of the same bodies with lapin alone, both into a quorum queue.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use tokio::time::Instant;

use super::{prefill_outbox, raw_queues, user_created_body};
use crate::Options;
use crate::env::Bench;
use crate::report::{Report, Row};

/// Declares the consumer's queues (so what the relay publishes is stored,
/// and the consumer stage has it to drain) and empties them.
pub(crate) async fn fresh_consumer_queue(bench: &Bench, prefetch: u16) -> anyhow::Result<()> {
    let connection = Connection::connect(&bench.amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let topology = shop_messaging::topology::ConsumerTopology {
        routing_keys: vec!["user.created".to_owned()],
        ..bench.consumer_config(prefetch).topology()
    };
    topology.declare(&channel).await?;
    for queue in topology.queue_names() {
        channel
            .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
            .await?;
    }
    let _ = connection.close(200, "declared".into()).await;
    Ok(())
}

/// A durable quorum queue of the benchmark's own, empty.
pub(crate) async fn raw_queue(channel: &lapin::Channel, name: &str) -> anyhow::Result<()> {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            name.into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    channel
        .queue_purge(name.into(), QueuePurgeOptions::default())
        .await?;
    Ok(())
}

/// Publishes `count` bodies to `queue`, fully pipelined (every publish
/// sent, then every confirm awaited): the fastest confirmed publishing lapin
/// does on this machine. Windows of 1000 measured half as fast, which would
/// flatter the relay.
async fn raw_publish(bench: &Bench, queue: &str, count: usize) -> anyhow::Result<Duration> {
    let connection = Connection::connect(&bench.amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    raw_queue(&channel, queue).await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let bodies: Vec<Vec<u8>> = (0..count)
        .map(|_| user_created_body(&uuid::Uuid::now_v7().to_string()))
        .collect();
    let started = Instant::now();
    let mut confirms = Vec::with_capacity(bodies.len());
    for body in &bodies {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(uuid::Uuid::now_v7().to_string().as_str().into())
            .with_type("shop.user.v1.UserCreated".into());
        confirms.push(
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await?,
        );
    }
    for confirm in confirms {
        anyhow::ensure!(confirm.await?.is_ack(), "raw publish not confirmed");
    }
    let elapsed = started.elapsed();
    let _ = connection.close(200, "done".into()).await;
    Ok(elapsed)
}

/// Waits until none of the `total` outbox rows is left unpublished; the
/// time since `started`.
async fn wait_until_published(bench: &Bench, total: usize, started: Instant) -> anyhow::Result<Duration> {
    let (client, connection) = tokio_postgres::connect(&bench.user_db, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    loop {
        let left: i64 = client
            .query_one("SELECT count(*) FROM outbox WHERE published_at IS NULL", &[])
            .await?
            .get(0);
        let left = usize::try_from(left).unwrap_or(0);
        if left == 0 {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "{left} rows still unpublished"
        );
        let done = total.saturating_sub(left);
        tokio::time::sleep(super::next_poll(done, total, started.elapsed())).await;
    }
}

/// One relay measurement: a pre-filled outbox drained by a running relay.
async fn relay_once(bench: &Bench, options: &Options) -> anyhow::Result<Duration> {
    bench.reset_tables().await?;
    fresh_consumer_queue(bench, options.prefetch).await?;
    prefill_outbox(bench, options.events).await?;
    let relay = shop_outbox::Relay::new(
        bench.user_pool.clone(),
        bench.user_database(),
        bench.amqp(),
        bench.relay_config()?,
        bench.signing_key(),
    );
    let measuring = crate::marker::measuring("relay");
    let started = Instant::now();
    let running = shop_testkit::Running::spawn(|shutdown| relay.run(shutdown));
    let elapsed = wait_until_published(bench, options.events, started).await?;
    drop(measuring);
    drop(running);
    Ok(elapsed)
}

/// Returns the relay's rate, events/s. Rounds alternate the relay and the
/// raw publish (the broker's and the disk's speed drift); the median round
/// by ratio is reported. The last relay round leaves its events queued for
/// the consumer stage.
pub(crate) async fn run(bench: &Bench, options: &Options, report: &mut Report) -> anyhow::Result<f64> {
    let mut rounds = Vec::new();
    for _ in 0..options.rounds.max(1) {
        let raw = raw_publish(bench, &raw_queues(bench)[0], options.events).await?;
        let relay = relay_once(bench, options).await?;
        rounds.push((
            options.events as f64 / relay.as_secs_f64(),
            options.events as f64 / raw.as_secs_f64(),
        ));
    }
    let (rate, raw_rate) = crate::stats::median_by_ratio(&rounds, |(relay, raw)| relay / raw)
        .ok_or_else(|| anyhow::anyhow!("no relay round ran"))?;
    report.bound("confirmed publish", raw_rate);
    report.add(Row {
        figure: format!(
            "relay: {} outbox rows published, confirmed, marked",
            options.events
        ),
        value: format!("{rate:.0} events/s"),
        raw: format!("lapin pipelined confirmed publish: {raw_rate:.0}/s"),
        ratio: Some(rate / raw_rate),
        numbers: json!({"events": options.events, "rate": rate, "raw_rate": raw_rate, "rounds": rounds}),
    });
    Ok(rate)
}
