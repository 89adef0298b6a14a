//! What signing and verifying events costs.
//!
//! - Alone: the relay's signature of `user.created` events as it builds
//!   their properties (`EventHeaders::signed_properties` against
//!   `EventHeaders::properties`), and the consumer's check
//!   (`TrustedKeys::verify`), one thread, per event.
//! - The consumer with and without: the same events queued signed, then
//!   unsigned (applied inside a `CONSUMER_ACCEPT_UNSIGNED_UNTIL` window,
//!   which skips the check), drained by the order service's consumer;
//!   rounds alternate, the median round by ratio is reported.
//! - The relay and the steady state: a relay cannot run unsigned (by
//!   design), so the cost there is the signature's share of the relay's time
//!   per event, and of the CPU time all processes spend per event in the
//!   steady state (signature plus check), from the same run.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Connection, ConnectionProperties};
use serde_json::json;
use shop_contracts::Event as _;
use shop_contracts::user::UserCreated;
use shop_messaging::consumer::Consumer;
use shop_messaging::wire::{EventHeaders, partition_of};
use shop_testkit::Running;
use tokio::time::Instant;

use super::relay::fresh_consumer_queue;
use super::{user_created_body, wait_for_rows};
use crate::Options;
use crate::env::Bench;
use crate::report::{Report, Row};

/// One event as the relay publishes it: its id, user and body.
struct Sample {
    id: String,
    user: String,
    body: Vec<u8>,
}

fn samples(count: usize) -> Vec<Sample> {
    (0..count)
        .map(|_| {
            let user = uuid::Uuid::now_v7().to_string();
            Sample {
                id: uuid::Uuid::now_v7().to_string(),
                body: user_created_body(&user),
                user,
            }
        })
        .collect()
}

fn headers<'a>(sample: &'a Sample, trace: &'a std::collections::HashMap<String, String>) -> EventHeaders<'a> {
    EventHeaders {
        event_id: &sample.id,
        type_name: UserCreated::TYPE_NAME,
        app_id: "user-service",
        timestamp: 0,
        aggregate_type: UserCreated::AGGREGATE_TYPE,
        aggregate_id: &sample.user,
        aggregate_version: 1,
        partition: partition_of(&sample.user),
        trace,
    }
}

/// µs per event of signing and of verifying, alone, on one thread.
fn alone(bench: &Bench, count: usize) -> (f64, f64) {
    let key = bench.signing_key();
    let trusted = bench.trusted_keys();
    let samples = samples(count);
    let trace = std::collections::HashMap::new();
    let started = std::time::Instant::now();
    let unsigned: Vec<_> = samples.iter().map(|s| headers(s, &trace).properties()).collect();
    let building = started.elapsed();
    let started = std::time::Instant::now();
    let signed: Vec<_> = samples
        .iter()
        .map(|s| headers(s, &trace).signed_properties(&s.body, &key))
        .collect();
    let signing = started.elapsed().saturating_sub(building);
    let started = std::time::Instant::now();
    let verified = signed
        .iter()
        .zip(&samples)
        .filter(|(properties, sample)| trusted.verify(properties, &sample.body).is_ok())
        .count();
    let verifying = started.elapsed();
    assert_eq!(verified, count, "every signed sample verifies");
    drop(unsigned);
    let per_event = |d: Duration| d.as_secs_f64() * 1e6 / count as f64;
    (per_event(signing), per_event(verifying))
}

/// Queues `count` events for the consumer, signed or not, pipelined.
async fn queue_events(bench: &Bench, count: usize, signed: bool) -> anyhow::Result<()> {
    let connection = Connection::connect(&bench.amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let key = bench.signing_key();
    let trace = std::collections::HashMap::new();
    let mut confirms = Vec::with_capacity(count);
    for sample in samples(count) {
        let headers = headers(&sample, &trace);
        let properties = if signed {
            headers.signed_properties(&sample.body, &key)
        } else {
            headers.properties()
        };
        confirms.push(
            channel
                .basic_publish(
                    bench.user_exchange.as_str().into(),
                    UserCreated::ROUTING_KEY.into(),
                    BasicPublishOptions::default(),
                    &sample.body,
                    properties,
                )
                .await?,
        );
    }
    for confirm in confirms {
        anyhow::ensure!(confirm.await?.is_ack(), "a queued event was not confirmed");
    }
    let _ = connection.close(200, "queued".into()).await;
    Ok(())
}

/// The consumer's rate, events/s, draining `count` queued events, signed
/// (checked) or not (inside a window for unsigned events).
async fn drain(bench: &Bench, options: &Options, count: usize, signed: bool) -> anyhow::Result<f64> {
    bench.reset_tables().await?;
    fresh_consumer_queue(bench, options.prefetch).await?;
    queue_events(bench, count, signed).await?;
    let mut config = bench.consumer_config(options.prefetch);
    if !signed {
        config.accept_unsigned_until = Some(chrono::Utc::now() + chrono::TimeDelta::hours(1));
    }
    let consumer = Consumer::new(config, bench.order_pool.clone(), bench.amqp())
        .subscribe::<UserCreated, _>(order_service::projection::UserProjection);
    let measuring = crate::marker::measuring(if signed {
        "consumer signed"
    } else {
        "consumer unsigned"
    });
    let started = Instant::now();
    let running = Running::spawn(|shutdown| consumer.run(shutdown));
    let elapsed = wait_for_rows(
        &bench.order_db,
        "known_users",
        count,
        started,
        Duration::from_secs(600),
    )
    .await?;
    drop(measuring);
    drop(running);
    Ok(count as f64 / elapsed.as_secs_f64())
}

pub(crate) async fn run(bench: &Bench, options: &Options, report: &mut Report) -> anyhow::Result<()> {
    let (sign_us, verify_us) = alone(bench, options.events.min(20_000));
    report.add(Row {
        figure: "event signature alone, one thread (relay / consumer)".to_owned(),
        value: format!("sign {sign_us:.1} µs, verify {verify_us:.1} µs per event"),
        raw: "Ed25519 (ring), user.created events".to_owned(),
        ratio: None,
        numbers: json!({"sign_us": sign_us, "verify_us": verify_us}),
    });

    let mut rounds = Vec::new();
    for _ in 0..options.rounds.max(1) {
        let unsigned = drain(bench, options, options.events, false).await?;
        let signed = drain(bench, options, options.events, true).await?;
        rounds.push((signed, unsigned));
    }
    let (signed, unsigned) = crate::stats::median_by_ratio(&rounds, |(signed, unsigned)| signed / unsigned)
        .ok_or_else(|| anyhow::anyhow!("no consumer round ran"))?;
    report.add(Row {
        figure: format!(
            "consumer: {} queued user.created, each signature checked",
            options.events
        ),
        value: format!("{signed:.0} events/s"),
        raw: format!("the same events unsigned, unchecked: {unsigned:.0}/s"),
        ratio: Some(signed / unsigned),
        numbers: json!({"events": options.events, "signed": signed, "unsigned": unsigned, "rounds": rounds}),
    });

    if let Some(relay_rate) = report.number("relay:", "rate") {
        let per_event = 1e6 / relay_rate;
        report.add(Row {
            figure: "relay: the signature's share of its time per event".to_owned(),
            value: format!("{sign_us:.1} µs of {per_event:.1} µs"),
            raw: format!(
                "unsigned, at most: {:.0} events/s",
                1e6 / (per_event - sign_us).max(1.0)
            ),
            ratio: Some((per_event - sign_us) / per_event),
            numbers: json!({"sign_us": sign_us, "relay_us_per_event": per_event}),
        });
    }
    let steady = report
        .numbers("steady state: CPU µs per event")
        .and_then(|numbers| numbers.as_object())
        .map(|processes| {
            processes
                .values()
                .filter_map(serde_json::Value::as_f64)
                .sum::<f64>()
        });
    if let Some(cpu_us) = steady {
        let crypto = sign_us + verify_us;
        report.add(Row {
            figure: "steady state: signature and check in the CPU time per event".to_owned(),
            value: format!("{crypto:.1} µs of {cpu_us:.0} µs (all processes)"),
            raw: format!("without them: {:.0} µs", cpu_us - crypto),
            ratio: Some((cpu_us - crypto) / cpu_us),
            numbers: json!({"crypto_us": crypto, "cpu_us_per_event": cpu_us}),
        });
    }
    Ok(())
}
