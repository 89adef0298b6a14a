//! A pre-filled outbox until every projection row exists, with the relay and
//! the consumer running together, against the slowest stage alone.

use std::time::Duration;

use serde_json::json;
use shop_testkit::Running;
use tokio::time::Instant;

use super::{prefill_outbox, wait_for_rows};
use crate::Options;
use crate::env::Bench;
use crate::report::{Report, Row};

/// Drains a pre-filled outbox of `options.events` rows until every
/// projection row exists, with `instances` relays and consumers running
/// side by side, each with pools of its own as separate processes would
/// have (the first uses the benchmark's pools). Returns events/s.
pub(crate) async fn drain(bench: &Bench, options: &Options, instances: usize) -> anyhow::Result<f64> {
    bench.reset_tables().await?;
    super::relay::fresh_consumer_queue(bench, options.prefetch).await?;
    prefill_outbox(bench, options.events).await?;
    let mut pools = vec![(bench.user_pool.clone(), bench.order_pool.clone())];
    for _ in 1..instances {
        pools.push(bench.new_pools().await?);
    }
    let started = Instant::now();
    let mut running = Vec::new();
    for (user_pool, order_pool) in pools {
        let relay = shop_outbox::Relay::new(
            user_pool,
            bench.user_database(),
            bench.amqp(),
            bench.relay_config()?,
            bench.signing_key(),
        );
        let consumer = super::consumer::consumer_on(bench, order_pool, options.prefetch);
        running.push(Running::spawn(|shutdown| relay.run(shutdown)));
        running.push(Running::spawn(|shutdown| consumer.run(shutdown)));
    }
    let elapsed = wait_for_rows(
        &bench.order_db,
        "known_users",
        options.events,
        started,
        Duration::from_secs(600),
    )
    .await?;
    drop(running);
    Ok(options.events as f64 / elapsed.as_secs_f64())
}

pub(crate) async fn run(
    bench: &Bench,
    options: &Options,
    report: &mut Report,
    slowest: f64,
) -> anyhow::Result<()> {
    let rate = drain(bench, options, 1).await?;
    report.add(Row {
        figure: format!(
            "end to end: {} outbox rows until all projection rows exist",
            options.events
        ),
        value: format!("{rate:.0} events/s"),
        raw: if slowest.is_finite() {
            format!("slowest stage alone: {slowest:.0}/s")
        } else {
            "—".to_owned()
        },
        ratio: slowest.is_finite().then(|| rate / slowest),
        numbers: json!({"events": options.events, "rate": rate, "slowest_stage_rate": slowest}),
    });
    Ok(())
}
