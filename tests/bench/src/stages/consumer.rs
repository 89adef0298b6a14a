//! The order service's consumer applying queued `user.created` events
//! (position + projection), against raw consume + ack of the same queue
//! type with the same prefetch, acknowledged in batches as the consumer does.

use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::json;
use shop_contracts::user::UserCreated;
use shop_messaging::consumer::Consumer;
use shop_testkit::Running;
use tokio::time::Instant;

use super::{raw_queues, wait_for_rows};
use crate::Options;
use crate::env::Bench;
use crate::report::{Report, Row};

/// Consumes and acknowledges `count` messages of `queue`, one ack each.
async fn raw_consume(bench: &Bench, queue: &str, count: usize, prefetch: u16) -> anyhow::Result<Duration> {
    let connection = Connection::connect(&bench.amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let started = Instant::now();
    let mut deliveries = channel
        .basic_consume(
            queue.into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // The best a client does: take every delivery already received (up to
    // half the prefetch, so the broker keeps sending meanwhile) and
    // acknowledge them with one `multiple` ack, as the consumer acknowledges
    // a batch.
    let most = usize::from(prefetch / 2).max(1);
    let mut received = 0;
    while received < count {
        let mut batch = 1;
        let mut last = tokio::time::timeout(Duration::from_secs(30), deliveries.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("consumer cancelled"))??;
        received += 1;
        while received < count && batch < most {
            match deliveries.next().now_or_never() {
                Some(Some(delivery)) => {
                    last = delivery?;
                    received += 1;
                    batch += 1;
                }
                Some(None) => anyhow::bail!("consumer cancelled"),
                None => break,
            }
        }
        last.ack(BasicAckOptions { multiple: true }).await?;
    }
    let elapsed = started.elapsed();
    let _ = connection.close(200, "done".into()).await;
    Ok(elapsed)
}

/// The consumer of the order service, in this process.
pub(crate) fn consumer(bench: &Bench, prefetch: u16) -> Consumer {
    consumer_on(bench, bench.order_pool.clone(), prefetch)
}

/// The consumer of the order service on a pool of its own.
pub(crate) fn consumer_on(bench: &Bench, pool: shop_database::Pool, prefetch: u16) -> Consumer {
    Consumer::new(bench.consumer_config(prefetch), pool, bench.amqp())
        .subscribe::<UserCreated, _>(order_service::projection::UserProjection)
}

/// Returns the consumer's rate, events/s. The relay stage left the events in
/// the queue.
pub(crate) async fn run(bench: &Bench, options: &Options, report: &mut Report) -> anyhow::Result<f64> {
    let measuring = crate::marker::measuring("consumer");
    let started = Instant::now();
    let consumer = consumer(bench, options.prefetch);
    let running = Running::spawn(|shutdown| consumer.run(shutdown));
    let elapsed = wait_for_rows(
        &bench.order_db,
        "known_users",
        options.events,
        started,
        Duration::from_secs(600),
    )
    .await?;
    drop(measuring);
    drop(running);
    let raw_elapsed = raw_consume(bench, &raw_queues(bench)[0], options.events, options.prefetch).await?;
    let rate = options.events as f64 / elapsed.as_secs_f64();
    let raw_rate = options.events as f64 / raw_elapsed.as_secs_f64();
    report.bound("consume + ack", raw_rate);
    report.add(Row {
        figure: format!("consumer: {} queued user.created applied (position + projection)", options.events),
        value: format!("{rate:.0} events/s"),
        raw: format!("lapin consume + multiple ack, prefetch {}: {raw_rate:.0}/s", options.prefetch),
        ratio: Some(rate / raw_rate),
        numbers: json!({"events": options.events, "prefetch": options.prefetch, "rate": rate, "raw_rate": raw_rate}),
    });
    Ok(rate)
}
