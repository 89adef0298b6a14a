//! End-to-end latency: CreateUser returned → the user's row visible in the
//! order service's projection, at a steady rate; against the raw publish →
//! confirm → deliver round trip.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use shop_contracts::user as pb;
use shop_contracts::user::user_service_client::UserServiceClient;
use tokio::time::Instant;

use super::raw_queues;
use crate::Options;
use crate::env::Bench;
use crate::report::{Report, Row};
use crate::stats::Sample;

/// When each user's projection row was committed, from a trigger's NOTIFY
/// (the benchmark's own, on its own database): the instant, and the wall
/// clock (seconds since the epoch) to compare with the databases' own
/// timestamps.
type Seen = Arc<Mutex<HashMap<String, (Instant, f64)>>>;

/// Seconds since the epoch, now.
fn wall() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

async fn watch_projection(bench: &Bench) -> anyhow::Result<Seen> {
    let (client, mut connection) = tokio_postgres::connect(&bench.order_db, tokio_postgres::NoTls).await?;
    let seen: Seen = Arc::default();
    let recorder = seen.clone();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(notification) = message {
                recorder
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(notification.payload().to_owned(), (Instant::now(), wall()));
            }
        }
    });
    client
        .batch_execute(
            "CREATE OR REPLACE FUNCTION bench_projection_notify() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_notify('bench_projection', NEW.user_id::text); RETURN NULL; END $$; \
             DROP TRIGGER IF EXISTS bench_projection_notify ON known_users; \
             CREATE TRIGGER bench_projection_notify AFTER INSERT ON known_users \
             FOR EACH ROW EXECUTE FUNCTION bench_projection_notify(); \
             LISTEN bench_projection;",
        )
        .await?;
    // The client must stay alive for the notifications to keep coming.
    std::mem::forget(client);
    Ok(seen)
}

/// Offers CreateUser at `rate` for `duration`; the latency of each call
/// from its return to its projection row, and (user id, wall clock at the
/// return) of each call.
async fn measure(
    endpoint: &str,
    seen: &Seen,
    rate: u32,
    duration: Duration,
) -> anyhow::Result<(Sample, Vec<(String, f64)>)> {
    let channel = crate::env::with_token(
        tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
            .connect()
            .await?,
    );
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut calls = Vec::new();
    while started.elapsed() < duration {
        ticker.tick().await;
        let mut client = UserServiceClient::new(channel.clone());
        calls.push(tokio::spawn(async move {
            let request = pb::CreateUserRequest {
                email: format!("lat-{}@example.com", uuid::Uuid::new_v4().simple()),
                name: "Latency".to_owned(),
                request_id: String::new(),
            };
            let user = client.create_user(request).await.ok()?.into_inner().user?;
            Some((user.id, Instant::now(), wall()))
        }));
    }
    let mut returned = Vec::new();
    for call in calls {
        if let Some(done) = call.await? {
            returned.push(done);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sample = Sample {
        elapsed: started.elapsed(),
        ..Sample::default()
    };
    let mut returns = Vec::with_capacity(returned.len());
    for (id, at, wall_at) in returned {
        returns.push((id.clone(), wall_at));
        loop {
            let visible = seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&id)
                .map(|(visible, _)| *visible);
            if let Some(visible) = visible {
                sample.latencies.push(visible.saturating_duration_since(at));
                break;
            }
            if Instant::now() > deadline {
                sample.errors += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok((sample, returns))
}

/// Where an event's time goes, as medians over `returns` (ms after the
/// command's transaction began, from the rows' own timestamps: the outbox
/// row's `created_at` is the command's `now()`, `published_at` the relay
/// batch's, and the projection row's `updated_at` the consumer
/// transaction's): the call returned, the relay's batch began, the
/// consumer's transaction began, the projection row was seen committed.
async fn hops(bench: &Bench, seen: &Seen, returns: &[(String, f64)]) -> anyhow::Result<[f64; 4]> {
    let connect = async |url: &str| -> anyhow::Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    };
    let ids: Vec<String> = returns.iter().map(|(id, _)| id.clone()).collect();
    let outbox: HashMap<String, (f64, f64)> = connect(&bench.user_db)
        .await?
        .query(
            "SELECT aggregate_id, extract(epoch FROM created_at)::float8, extract(epoch FROM published_at)::float8 \
             FROM outbox WHERE aggregate_id = ANY($1) AND published_at IS NOT NULL",
            &[&ids],
        )
        .await?
        .into_iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect();
    let projected: HashMap<String, f64> = connect(&bench.order_db)
        .await?
        .query(
            "SELECT user_id::text, extract(epoch FROM updated_at)::float8 FROM known_users \
             WHERE user_id::text = ANY($1)",
            &[&ids],
        )
        .await?
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let seen = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut columns: [Vec<f64>; 4] = Default::default();
    for (id, returned) in returns {
        let (Some((created, published)), Some(consumed), Some((_, visible))) =
            (outbox.get(id), projected.get(id), seen.get(id))
        else {
            continue;
        };
        for (column, at) in columns.iter_mut().zip([returned, published, consumed, visible]) {
            column.push((at - created) * 1000.0);
        }
    }
    Ok(columns.map(|mut column| {
        column.sort_by(f64::total_cmp);
        column.get(column.len() / 2).copied().unwrap_or(f64::NAN)
    }))
}

/// Publish with confirm, then wait for the delivery, `count` times.
async fn raw_round_trip(bench: &Bench, count: usize) -> anyhow::Result<Sample> {
    let queue = &raw_queues(bench)[1];
    let connection = Connection::connect(&bench.amqp_url, ConnectionProperties::default()).await?;
    let publisher = connection.create_channel().await?;
    super::relay::raw_queue(&publisher, queue).await?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await?;
    let consumer = connection.create_channel().await?;
    let mut deliveries = consumer
        .basic_consume(
            queue.as_str().into(),
            "rt".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let body = super::user_created_body(&uuid::Uuid::now_v7().to_string());
    let mut sample = Sample::default();
    let started = Instant::now();
    for _ in 0..count {
        let at = Instant::now();
        let confirm = publisher
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        anyhow::ensure!(confirm.await?.is_ack());
        let delivery = deliveries
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("no delivery"))??;
        sample.latencies.push(at.elapsed());
        delivery.ack(BasicAckOptions::default()).await?;
    }
    sample.elapsed = started.elapsed();
    let _ = connection.close(200, "done".into()).await;
    Ok(sample)
}

pub(crate) async fn run(bench: &Bench, options: &Options, report: &mut Report) -> anyhow::Result<()> {
    bench.reset_tables().await?;
    super::relay::fresh_consumer_queue(bench, options.prefetch).await?;
    let seen = watch_projection(bench).await?;
    let mut users = bench.spawn_user_service(true).await?;
    let mut orders = bench.spawn_order_service(options.prefetch).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let endpoint = format!("http://{}", users.addr);
    let raw = raw_round_trip(bench, if options.smoke { 50 } else { 1000 }).await?;
    for rate in [1, 50] {
        let (sample, returns) =
            measure(&endpoint, &seen, rate, Duration::from_secs(options.latency_secs)).await?;
        report.add(Row {
            figure: format!("end-to-end latency at {rate} CreateUser/s (returned → projection row)"),
            value: format!(
                "p50 {:.2} ms, p99 {:.2} ms ({} calls{})",
                sample.quantile_ms(0.5),
                sample.quantile_ms(0.99),
                sample.latencies.len(),
                if sample.errors > 0 {
                    format!(", {} missing", sample.errors)
                } else {
                    String::new()
                }
            ),
            raw: format!(
                "publish → confirm → deliver: p50 {:.2} ms, p99 {:.2} ms",
                raw.quantile_ms(0.5),
                raw.quantile_ms(0.99)
            ),
            ratio: Some(raw.quantile_ms(0.5) / sample.quantile_ms(0.5)),
            numbers: json!({
                "rate": rate,
                "p50_ms": sample.quantile_ms(0.5),
                "p99_ms": sample.quantile_ms(0.99),
                "missing": sample.errors,
                "raw_p50_ms": raw.quantile_ms(0.5),
                "raw_p99_ms": raw.quantile_ms(0.99),
            }),
        });
        if rate == 50 {
            let [returned, relay, consumer, visible] = hops(bench, &seen, &returns).await?;
            report.add(Row {
                figure: format!("end-to-end latency at {rate} CreateUser/s, where the time goes (medians, ms after the command's transaction began)"),
                value: format!(
                    "call returned {returned:.2} · relay batch began {relay:.2} · consumer transaction began {consumer:.2} · projection row seen {visible:.2}"
                ),
                raw: "—".to_owned(),
                ratio: None,
                numbers: json!({
                    "returned_ms": returned,
                    "relay_batch_began_ms": relay,
                    "consumer_transaction_began_ms": consumer,
                    "projection_seen_ms": visible,
                }),
            });
        }
    }
    users.terminate().await?;
    orders.terminate().await?;
    Ok(())
}
